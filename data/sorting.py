"""Sorting letters: a second tiny fine-tuning task, for mixing with arithmetic.py.

    prompt: "Sort: q d m a\nAnswer:"      answer: " a d m q"   (then eos)

3 to 6 distinct lowercase letters. Its answer tokens are letters where arithmetic's are digits and
operators, and its prompt is not English, so it may route to other experts than arithmetic does.
Same API as arithmetic.py; here `target` and `extract_answer` give the sorted letters as a string.
`python data/sorting.py` writes data/sorting/{train,val,test}.npz and manifest.json.
"""
import string
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import common, write  # noqa: E402
from hf import ByteTokenizer  # noqa: E402

OUT_DIR = common.DATA_DIR / "sorting"
SIZES = {"train": 20_000, "val": 500, "test": 500}


def draw(rng) -> dict:
    letters = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
    target = " ".join(sorted(letters))
    return {"prompt": f"Sort: {' '.join(letters)}\nAnswer:", "answer": f" {target}", "target": target}


def generate(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    return write.sample_split(draw, n, seed, split)


def extract_answer(text: str) -> str | None:
    """The first line after the last 'Answer:' (or of the text), stripped; None when empty."""
    line = text.rsplit("Answer:", 1)[-1].strip().split("\n")[0].strip()
    return line or None


def prepare(out_dir=OUT_DIR, sizes: dict[str, int] = SIZES, seed: int = 0, tokenizer=None) -> dict:
    return write.prepare_task(out_dir, generate, sizes, seed, tokenizer or ByteTokenizer(),
                               source="data/sorting.py: sort 3-6 distinct letters", evaluator="data.sorting")


if __name__ == "__main__":
    m = prepare()
    for split, s in m["splits"].items():
        print(f"{split}: {s['samples']:,} samples, {s['tokens']:,} tokens -> {OUT_DIR / split}.npz")
