"""WMT translation, English into Czech, German and Chinese, as one task (--to_english flips it).

    python tasks/wmt.py --model olmoe --max_train 200000     # hf:wmt/wmt19 cs-en, de-en, zh-en
    python tasks/wmt.py --model PATH --train en-de.jsonl en-cs.jsonl --test newstest.jsonl

Rows: {"translation": {"en": ..., "de": ...}}, as the Hub's wmt data sets hold them: each row
names its own pair. Prompt: "Translate the following English text into German:" and the text;
answer: the translation. WMT19's training sets hold tens of millions of pairs: use --max_train.
Metric: the held-out loss on test.npz ("test_loss", mean cross-entropy per answer token, lower is
better; tasks/metrics.py). BLEU / chrF would need sacrebleu and generation: not computed here.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import prepare  # noqa: E402

LANGUAGES = {"en": "English", "cs": "Czech", "de": "German", "zh": "Chinese"}


def example(row: dict, args) -> dict:
    pair = row.get("translation")
    if not isinstance(pair, dict) or len(pair) != 2 or "en" not in pair:
        raise ValueError("'translation' is not {en: ..., xx: ...}")
    other = next(k for k in pair if k != "en")
    if other not in LANGUAGES:
        raise ValueError(f"language {other!r} is not one of {sorted(LANGUAGES)}")
    src, tgt = ("en", other) if not args.to_english else (other, "en")
    source, target = prepare.text(pair, src), prepare.text(pair, tgt)
    return {"messages": prepare.chat(f"Translate the following {LANGUAGES[src]} text into {LANGUAGES[tgt]}:\n\n{source}", target)}


def add_args(p):
    p.add_argument("--to_english", action="store_true", help="translate into English instead of out of it")


TASK = prepare.Task("wmt", train=[f"hf:wmt/wmt19:{p}-en:train" for p in ("cs", "de", "zh")],
                  test=[f"hf:wmt/wmt19:{p}-en:validation" for p in ("cs", "de", "zh")],
                  train_example=example, test_example=example, metric="test_loss", add_args=add_args)

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
