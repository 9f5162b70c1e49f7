"""WMT translation, English into Czech, German and Chinese (the paper's pairs), as one task: fine-tune
on the references of WMT-DA-Human-Evaluation, test on WMT23's general test sets.

    python tasks/wmt.py --model olmoe --max_train 200000
        # hf:RicardoRei/wmt-da-human-evaluation:train, hf:haoranxu/WMT23-Test:{en-cs,en-de,en-zh}:test
    python tasks/wmt.py --model PATH --train wmt-da.jsonl --test wmt23.en-de.jsonl wmt23.en-cs.jsonl
    python tasks/wmt.py --model PATH --train wmt19.de-en.jsonl --test newstest.de-en.jsonl --pairs de-en

Rows, in any of three shapes (each source may mix them):
- WMT-DA-Human-Evaluation {lp: "en-de", src, ref, mt, score, raw, annotators, domain, year}: the
  human reference `ref` of the source `src` (one row per rated system: repeats are read once);
- WMT23-Test on the Hub {"en-de": {"en": ..., "de": ...}}: one key, naming the pair;
- WMT19 on the Hub {"translation": {"en": ..., "de": ...}}: no direction; --pairs gives it.
--pairs chooses the directions (default en-cs en-de en-zh): rows of other pairs are good rows left
out, counted in manifest.json ("not_used"). Also counted: repeated
(pair, source, reference) rows, read once ("duplicates"), and training rows whose (pair, source) is
a test row's, dropped so that no test source is trained on ("train_rows_in_test").
Prompt: "Translate the following English text into German:", a blank line and the source; answer:
the reference. The test rows are interleaved pair by pair, so that the first n (train.py's
--eval_samples, --max_test) hold every pair alike; test_translations.jsonl keeps {lp, src, ref}.
Metric: "translation" (tasks/metrics.py): greedy translations scored by sacrebleu's chrF and BLEU,
and by COMET (Unbabel/wmt22-comet-da) where unbabel-comet is installed and its model can be had.
"""
import argparse
import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import prepare  # noqa: E402

LANGUAGES = {"en": "English", "cs": "Czech", "de": "German", "zh": "Chinese", "ru": "Russian", "ja": "Japanese",
             "uk": "Ukrainian", "he": "Hebrew", "is": "Icelandic"}  # WMT23's general task
PAIRS = ("en-cs", "en-de", "en-zh")


def pair_of(row: dict, args) -> tuple[str, str, str] | None:
    """(lp, source, reference) of a row in any of the three shapes; None if its pair is not wanted."""
    if "lp" in row:
        lp = row["lp"]
        if not isinstance(lp, str) or lp.count("-") != 1:
            raise ValueError(f"'lp' is {lp!r}, not a language pair like 'en-de'")
        return (lp, prepare.text(row, "src"), prepare.text(row, "ref")) if lp in args.pairs else None
    if "translation" in row:
        texts = row["translation"]
        if not isinstance(texts, dict) or len(texts) != 2 or "en" not in texts:
            raise ValueError("'translation' is not {en: ..., xx: ...}")
        other = next(k for k in texts if k != "en")
        lp = next((p for p in (f"en-{other}", f"{other}-en") if p in args.pairs), None)
    else:
        keys = [k for k in row if isinstance(k, str) and k.count("-") == 1 and isinstance(row[k], dict)]
        if len(keys) != 1:
            raise ValueError("the row has neither 'lp' nor 'translation' nor one 'xx-yy' key (WMT23-Test)")
        lp, texts = keys[0], row[keys[0]]
        if lp not in args.pairs:
            return None
    if lp is None:
        return None
    src, tgt = lp.split("-")
    return lp, prepare.text(texts, src), prepare.text(texts, tgt)


def example(row: dict, args) -> dict | None:
    found = pair_of(row, args)
    if found is None:
        return None
    lp, source, reference = found
    src, tgt = lp.split("-")
    user = f"Translate the following {LANGUAGES[src]} text into {LANGUAGES[tgt]}:\n\n{source}"
    pair = {"lp": lp, "src": source, "ref": reference}
    return {"messages": prepare.chat(user, reference), "translation": pair}


def finish(train: list[dict], test: list[dict], args, report: dict):
    """Repeats out, test sources out of training, the test pairs interleaved."""
    def once(examples):
        seen, kept = set(), []
        for ex in examples:
            key = tuple(ex["translation"].values())
            if key not in seen:
                seen.add(key)
                kept.append(ex)
        return kept

    train_once, test_once = once(train), once(test)
    report["duplicates"] = {"train": len(train) - len(train_once), "test": len(test) - len(test_once)}
    tested = {(ex["translation"]["lp"], ex["translation"]["src"]) for ex in test_once}
    train = [ex for ex in train_once if (ex["translation"]["lp"], ex["translation"]["src"]) not in tested]
    report["train_rows_in_test"] = len(train_once) - len(train)
    by_pair = {}
    for ex in test_once:
        by_pair.setdefault(ex["translation"]["lp"], []).append(ex)
    test = [ex for group in itertools.zip_longest(*by_pair.values()) for ex in group if ex is not None]
    return train, test


def pairs(value: str) -> str:
    src, _, tgt = value.partition("-")
    if src not in LANGUAGES or tgt not in LANGUAGES or src == tgt:
        raise argparse.ArgumentTypeError(f"{value!r} is not a pair of two of {', '.join(LANGUAGES)} like en-de")
    return value


def add_args(p):
    p.add_argument("--pairs", type=pairs, nargs="+", default=list(PAIRS),
                   help=f"translation directions (default {' '.join(PAIRS)}); rows of others are not used")


TASK = prepare.Task("wmt", train=["hf:RicardoRei/wmt-da-human-evaluation:train"],
                    test=[f"hf:haoranxu/WMT23-Test:{p}:test" for p in PAIRS], train_example=example,
                    test_example=example, metric="translation", add_args=add_args, finish=finish,
                    record=("pairs",), unused="rows of language pairs other than --pairs")

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
