"""GSM8K: fine-tune on MetaMathQA (395K rewritten GSM8K and MATH problems), test on GSM8K's 1,319
test problems by exact match of the final number.

    python tasks/gsm8k.py --model olmoe          # hf:meta-math/MetaMathQA:train, hf:openai/gsm8k:main:test
    python tasks/gsm8k.py --model PATH --train MetaMathQA-395K.json --test gsm8k/test.jsonl

Rows: MetaMathQA {query, response} (responses end "The answer is: N") or GSM8K {question, answer}
(answers end "#### N"), on either side. One turn: user = the problem, assistant = the solution.
A test row whose answer has no final number (common.extract_number) is malformed: it could never
count as solved. Options: see tasks/prepare.py and --help.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import common  # noqa: E402
from tasks import prepare  # noqa: E402


def example(row: dict, args) -> dict:
    if "query" in row:
        question, solution = prepare.text(row, "query"), prepare.text(row, "response")
    else:
        question, solution = prepare.text(row, "question"), prepare.text(row, "answer")
    return {"messages": prepare.chat(question, solution)}


def test_example(row: dict, args) -> dict:
    ex = example(row, args)
    if common.extract_number(ex["messages"][-1]["content"]) is None:
        raise ValueError("the reference answer has no final number ('#### N' or 'The answer is N')")
    return ex


TASK = prepare.Task("gsm8k", train=["hf:meta-math/MetaMathQA:train"], test=["hf:openai/gsm8k:main:test"],
                  train_example=example, test_example=test_example, metric="exact_match")

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
