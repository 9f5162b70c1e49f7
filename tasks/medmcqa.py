"""MedMCQA: 4-way multiple-choice questions from Indian medical entrance exams. Train on its train
split (182K), test on its validation split (4,183 questions; the test split has no answers).

    python tasks/medmcqa.py --model olmoe        # hf:openlifescienceai/medmcqa:train and :validation
    python tasks/medmcqa.py --model PATH --train train.json --test dev.json

Rows: {question, opa, opb, opc, opd, cop}; cop = the right option, 0..3 on the Hub, 1..4 in the
original JSON files. Each file says which: a cop of 0 means 0-based, a cop of 4 means 1-based (a
file with neither follows the other files). A file with both, or nothing to go by, is refused:
--zero_based / --one_based then say it for every file, and rows that do not fit are bad rows
(--skip_bad skips them). Prompt: the question and options "A. ..." to "D. ..."; answer:
"B. <option text>". Metric: log-likelihood of each of the four answers (tasks/metrics.py).
"""
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import prepare  # noqa: E402

FLAGS = "pass --zero_based (the Hub's files) or --one_based (MedMCQA's original JSON)"


def example(row: dict, args) -> dict:
    """The row checked; its question is built in finish(), once the file's answer base is known."""
    options = [prepare.text(row, k) for k in ("opa", "opb", "opc", "opd")]
    cop = row.get("cop")
    low, high = (1, 4) if args.one_based else (0, 3) if args.zero_based else (0, 4)
    if not isinstance(cop, int) or isinstance(cop, bool) or not low <= cop <= high:
        hint = " (the original JSON counts from 1: --one_based)" if cop == 4 and args.zero_based else ""
        raise ValueError(f"'cop' is {cop!r}, not an option number {low}..{high}{hint}")
    return {"question": prepare.text(row, "question"), "options": options, "cop": cop}


def base_of(examples: list[dict], source: str, args) -> int | None:
    """0 or 1: where source's option numbers start; None if its rows do not say."""
    if args.one_based or args.zero_based:
        return int(args.one_based)
    cops = Counter(ex["cop"] for ex in examples if ex["source"] == source)
    if cops[0] and cops[4]:
        raise ValueError(f"{source}: 'cop' is 0 in {cops[0]} rows and 4 in {cops[4]}, so the file counts options "
                         f"neither from 0 nor from 1 throughout; {FLAGS}, and --skip_bad to skip the rows that "
                         f"do not fit")
    return 0 if cops[0] else 1 if cops[4] else None


def finish(train: list[dict], test: list[dict], args, report: dict):
    rows = train + test
    sources = list(dict.fromkeys(ex["source"] for ex in rows))
    bases = {s: base_of(rows, s, args) for s in sources}
    known = set(bases.values()) - {None}
    for s, b in bases.items():
        if b is None and len(known) != 1:
            raise ValueError(f"{s}: 'cop' is never 0 nor 4, so the file does not say whether options count from 0 "
                             f"or from 1" + (" (the other files disagree)" if known else "") + f"; {FLAGS}")
    bases = {s: next(iter(known)) if b is None else b for s, b in bases.items()}
    for ex in rows:
        ex.update(prepare.multiple_choice(ex["question"], ex["options"], ex["cop"] - bases[ex["source"]]))
    return train, test


def add_args(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--one_based", action="store_true", help="cop counts options from 1 (MedMCQA's original JSON)")
    g.add_argument("--zero_based", action="store_true", help="cop counts options from 0 (the Hub's files)")


TASK = prepare.Task("medmcqa", train=["hf:openlifescienceai/medmcqa:train"],
                    test=["hf:openlifescienceai/medmcqa:validation"], train_example=example, test_example=example,
                    metric="multiple_choice", add_args=add_args, finish=finish)

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
