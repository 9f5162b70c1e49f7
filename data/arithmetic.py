"""Arithmetic word problems: the small sibling of GSM8K and the tiny model's fine-tuning task.

    prompt: "Question: Mia has 3 apples. She buys 5 more. How many apples does Mia have now?\\nAnswer:"
    answer: " 3 + 5 = 8\\n#### 8"   (then eos; the last line is GSM8K's answer format)

- One-digit operands: two-digit problems with carries were not learnt in minutes on a CPU
  (about 2 % exact match in an early exploratory LoRA run, not repeated on this code). Operations: + (buys, finds, is given), - (gives away, loses; never below zero) and
  * (boxes or bags holding b each). 16 names, 12 objects, 7 templates, a fixed seed.
- Splits are disjoint as exact prompt strings: a prompt's split is fixed by the sha256 of its text
  (write.hash_split: 5 % test, 5 % val, 90 % train), whatever the sizes and seeds.
- Be honest about what the test measures: the arithmetic FACTS overlap. There are only
  81 + 45 + 64 of them and training holds every one; only names, objects and wording are new.
  Accuracy measures the answer format, copying the operands out of the question and recalling
  a small table, not arithmetic generalisation.

`python data/arithmetic.py` writes data/arithmetic/{train,val,test}.npz and manifest.json.
"""
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import common, write  # noqa: E402
from hf import ByteTokenizer  # noqa: E402

OUT_DIR = common.DATA_DIR / "arithmetic"
SIZES = {"train": 20_000, "val": 500, "test": 500}  # val: loss during training, test: accuracy
NAMES = [("Mia", "She", "her"), ("Leo", "He", "him"), ("Ava", "She", "her"), ("Sam", "He", "him"),
         ("Zoe", "She", "her"), ("Max", "He", "him"), ("Emma", "She", "her"), ("Noah", "He", "him"),
         ("Lily", "She", "her"), ("Omar", "He", "him"), ("Nina", "She", "her"), ("Ben", "He", "him"),
         ("Ivy", "She", "her"), ("Tom", "He", "him"), ("Ana", "She", "her"), ("Raj", "He", "him")]
OBJECTS = [("apple", "apples"), ("pencil", "pencils"), ("marble", "marbles"), ("book", "books"),
           ("cookie", "cookies"), ("stamp", "stamps"), ("shell", "shells"), ("card", "cards"),
           ("toy car", "toy cars"), ("balloon", "balloons"), ("sticker", "stickers"), ("coin", "coins")]
# {A} / {B}: the number with its noun ("1 apple", "3 apples"); {a} / {b}: the bare number
TEMPLATES = {
    "+": ["{name} has {A}. {He} buys {b} more. How many {things} does {name} have now?",
          "{name} has {A}. {He} finds {b} more. How many {things} does {name} have now?",
          "{name} has {A}. {friend} gives {him} {b} more. How many {things} does {name} have now?"],
    "-": ["{name} has {A}. {He} gives away {b}. How many {things} does {name} have left?",
          "{name} has {A}. {He} loses {b}. How many {things} does {name} have left?"],
    "*": ["{name} has {a} boxes. Each box holds {B}. How many {things} does {name} have in total?",
          "{name} buys {a} bags with {B} in each. How many {things} does {name} buy?"],
}
OPERANDS = {"+": [(a, b) for a in range(1, 10) for b in range(1, 10)],
            "-": [(a, b) for a in range(1, 10) for b in range(1, a + 1)],  # results 0..8
            "*": [(a, b) for a in range(2, 10) for b in range(2, 10)]}
RESULT = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def draw(rng) -> dict:
    """One random problem: {prompt, answer, target}."""
    op = rng.choice("+-*")
    (name, he, him), (thing, things) = rng.choice(NAMES), rng.choice(OBJECTS)
    friend = rng.choice([n for n, _, _ in NAMES if n != name])
    a, b = rng.choice(OPERANDS[op])
    question = rng.choice(TEMPLATES[op]).format(
        name=name, He=he, him=him, friend=friend, things=things, a=a, b=b,
        A=f"{a} {thing if a == 1 else things}", B=f"{b} {thing if b == 1 else things}")
    c = RESULT[op](a, b)
    return {"prompt": f"Question: {question}\nAnswer:", "answer": f" {a} {op} {b} = {c}\n#### {c}", "target": c}


def generate(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """n distinct problems of one split, the same for the same (n, seed, split)."""
    return write.sample_split(draw, n, seed, split)


def extract_answer(text: str) -> int | None:
    """The integer after the first '####', else after the last 'The answer is', else None."""
    n = common.extract_number(text)
    return int(n) if n is not None and n.denominator == 1 else None  # 7.0 counts as 7, 7.5 is no integer


def prepare(out_dir=OUT_DIR, sizes: dict[str, int] = SIZES, seed: int = 0, tokenizer=None) -> dict:
    return write.prepare_task(out_dir, generate, sizes, seed, tokenizer or ByteTokenizer(),
                               source="data/arithmetic.py: one-digit word problems", evaluator="data.arithmetic")


if __name__ == "__main__":
    t0 = time.time()
    m = prepare()
    for split, s in m["splits"].items():
        print(f"{split}: {s['samples']:,} samples, {s['tokens']:,} tokens, "
              f"{s['answer_tokens']:,} in the loss -> {OUT_DIR / split}.npz")
    print(f"{time.time() - t0:.1f} s")
