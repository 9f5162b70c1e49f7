"""MedMCQA: 4-way multiple-choice questions from Indian medical entrance exams. Train on its train
split (182K), test on its validation split (4,183 questions; the test split has no answers).

    python tasks/medmcqa.py --model olmoe        # hf:openlifescienceai/medmcqa:train and :validation
    python tasks/medmcqa.py --model PATH --train train.json --test dev.json --one_based

Rows: {question, opa, opb, opc, opd, cop}; cop = the right option, 0..3 on the Hub, 1..4 in the
original JSON files (--one_based). Prompt: the question and options "A. ..." to "D. ..."; answer:
"B. <option text>". Metric: log-likelihood of each of the four answers (evaluate.multiple_choice).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import prepare  # noqa: E402


def example(row: dict, args) -> dict:
    options = [prepare.text(row, k) for k in ("opa", "opb", "opc", "opd")]
    cop, first = row.get("cop"), 1 if args.one_based else 0
    if not isinstance(cop, int) or not first <= cop <= first + 3:
        hint = " (the original JSON counts from 1: --one_based)" if cop == 4 and not args.one_based else ""
        raise ValueError(f"'cop' is {cop!r}, not an option number {first}..{first + 3}{hint}")
    return prepare.multiple_choice(prepare.text(row, "question"), options, cop - first)


def add_args(p):
    p.add_argument("--one_based", action="store_true", help="cop counts options from 1 (MedMCQA's original JSON)")


TASK = prepare.Task("medmcqa", train=["hf:openlifescienceai/medmcqa:train"], test=["hf:openlifescienceai/medmcqa:validation"],
                  train_example=example, test_example=example, metric="multiple_choice", add_args=add_args)

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
