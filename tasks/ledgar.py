"""LEDGAR (LexGLUE): contract provisions labelled with one of 100 categories, asked as 4-way multiple
choice: the true category and 3 distractors drawn from the other categories.

    python tasks/ledgar.py --model olmoe         # hf:coastalcph/lex_glue:ledgar:train and :test
    python tasks/ledgar.py --model PATH --train train.jsonl --test test.jsonl --label_names labels.txt

Rows: {text, label}; label a category name, or its number with --label_names FILE (one name a line,
in label order) or from the Hub (datasets' ClassLabel names arrive as 'label_name').
Distractors and the true answer's position come from random.Random(f"{seed}:{text}"): fixed by the
seed and the provision, whatever the file order. The categories offered are those of --label_names,
else every label seen in train and test. Metric: as MedMCQA's (tasks/metrics.py's multiple_choice).
"""
import argparse
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import prepare  # noqa: E402

QUESTION = "Which category best describes the following contract provision?\n\n{text}"


def example(row: dict, args) -> dict:
    text, label = prepare.text(row, "text"), row.get("label_name", row.get("label"))
    if isinstance(label, int) and not isinstance(label, bool):
        if not args.label_names:
            raise ValueError("the label is a number: pass --label_names FILE to name the categories")
        if not 0 <= label < len(args.label_names):
            raise ValueError(f"label {label} is not in 0..{len(args.label_names) - 1} (--label_names)")
        label = args.label_names[label]
    if not isinstance(label, str) or not label.strip():
        raise ValueError("'label' is missing, empty or neither a string nor a number")
    if args.label_names and label not in args.label_names:
        raise ValueError(f"label {label!r} is not in --label_names")
    return {"text": text, "label_name": label}


def finish(train: list[dict], test: list[dict], args, report: dict):
    """Build the questions once every label is known."""
    labels = args.label_names or sorted({ex["label_name"] for ex in train + test})
    if len(labels) < 4:
        raise ValueError(f"only {len(labels)} categories: 4-way multiple choice needs at least 4")
    for ex in train + test:
        rng = random.Random(f"{args.seed}:{ex['text']}")
        options = rng.sample([lab for lab in labels if lab != ex["label_name"]], 3)
        k = rng.randrange(4)
        options.insert(k, ex["label_name"])
        ex.update(prepare.multiple_choice(QUESTION.format(text=ex["text"]), options, k))
    return train, test


def read_names(path: str) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{path}: category names repeat")
    return names


def add_args(p):
    p.add_argument("--label_names", type=read_names, help="file with one category name a line, in label-number order")


TASK = prepare.Task("ledgar", train=["hf:coastalcph/lex_glue:ledgar:train"], test=["hf:coastalcph/lex_glue:ledgar:test"],
                  train_example=example, test_example=example, metric="multiple_choice",
                  add_args=add_args, finish=finish)

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
