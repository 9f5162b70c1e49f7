"""Shared machinery of the real-task prepare scripts: tasks/gsm8k.py, humaneval.py, tulu.py, medmcqa.py,
wmt.py and ledgar.py. A script names its default sources and turns one row into a conversation; this
file reads the rows, formats them in the model's chat format (tasks/chat.py), writes the SFT files with
write.write_sft and completes manifest.json.

    python tasks/gsm8k.py --model olmoe                       # default sources, from the Hugging Face Hub
    python tasks/gsm8k.py --model PATH --train metamath.json --test gsm8k_test.jsonl --skip_bad

Sources (--train / --test take one or more):
- a local file: .jsonl, .jsonl.gz, .json (a JSON array, or JSON lines), .parquet (needs pyarrow);
- hf:REPO[:CONFIG]:SPLIT, read by the `datasets` library (optional; needs the network or its cache).
  A ClassLabel column also gets its names in '<column>_name'.
Splits: val = a seeded slice of --val_size training rows, train = the rest (at most --max_train);
test = the benchmark's rows in file order (WMT interleaves its language pairs; at most --max_test), plus
the files a metric needs next to test.npz (test_choices.jsonl, test_problems.jsonl,
test_translations.jsonl, test_prompts.jsonl). The manifest names the metric, the module that computes
it ("evaluator": tasks.metrics, imported by evals.evaluate_task) and the command that made the folder
("made_by", which error messages quote to say how to remake it).
A malformed row stops the script with its file and line; --skip_bad skips it, warns and counts it in
the manifest. Good rows a task leaves out (WMT's other language pairs) are counted there too
("not_used"). Samples longer than --max_len + 1 tokens are counted (train.py truncates them); samples
whose prompt alone fills --max_len are dropped and counted (no answer token would be left to learn).
"""
import argparse
import gzip
import json
import random
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tasks import chat as chat_format
from data import common, write

LETTERS = "ABCD"
EVALUATOR = "tasks.metrics"  # the module evals.evaluate_task imports to compute a metric other than exact match


@dataclass
class Task:
    name: str  # writes data/<name>/
    train: list[str]  # default training sources
    test: list[str] | Callable[[], list[str]]  # default test sources (a function: resolved when used)
    train_example: Callable  # (row, args) -> {"messages": [...], ...}, None for a row not used; ValueError: bad
    test_example: Callable
    metric: str  # evals.evaluate_task computes it: gsm8k | multiple_choice | humaneval | translation | ifeval
    # | test_loss (a task's own --metric flag, where it has one, chooses instead)
    prompts_only_test: bool = False  # test rows are prompts without answers (IFEval): test.npz is held out from train
    add_args: Callable | None = None  # (parser) -> None: the task's own flags
    finish: Callable | None = None  # (train, test, args, report): steps that need every row (LEDGAR's label set)
    record: tuple[str, ...] = ()  # the task's own flags kept in manifest.json (the metric reads --shots there)
    unused: str = ""  # which good rows a row function leaves out (returns None for), for messages


# --- JSON lines, read by the prepare scripts of downloaded data sets

def read_jsonl(path, required_keys: Sequence[str] = (), skip_bad: bool = False) -> Iterator[dict]:
    """Rows of a JSON-lines file. A malformed line (bad JSON or UTF-8, not an object, a required key
    missing) raises with the file name and line number, or with skip_bad is skipped and counted in
    one warning at the end. Blank lines are ignored."""
    return _jsonl_rows(common._existing(path), tuple(required_keys), skip_bad)


def _jsonl_rows(path: Path, required: tuple[str, ...], skip_bad: bool) -> Iterator[dict]:
    bad = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                missing = [k for k in required if k not in row]
                if missing:
                    raise ValueError(f"missing key(s) {missing}")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if not skip_bad:
                    raise ValueError(f"{path}, line {lineno}: {e}") from e
                bad += 1
                continue
            yield row
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)")


# --- small helpers for the row functions

def text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' is missing, empty or not a string")
    return value


def chat(user: str, assistant: str | None = None) -> list[dict]:
    return [{"role": "user", "content": user}] + ([{"role": "assistant", "content": assistant}] if assistant else [])


def multiple_choice(question: str, options: list[str], label: int) -> dict:
    """The question, options 'A. ...' to 'D. ...'; the answer and every choice is 'B. <option>'."""
    answers = [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
    user = question + "\n\n" + "\n".join(answers) + "\n\nAnswer with the letter and the text of the correct option."
    return {"messages": chat(user, answers[label]), "choices": answers, "label": label}


# --- reading rows

def read_rows(spec: str) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a source; where = 'FILE, line N' for messages. A line that is not
    JSON comes as a ValueError in place of the row, so that --skip_bad can skip it too."""
    if spec.startswith("hf:"):
        yield from _hub_rows(spec)
        return
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if path.is_dir():
        raise ValueError(f"{path} is a folder: pass the data file(s) in it")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or pass a JSON lines file") from e
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}, row {i}", row
        return
    try:
        yield from _file_rows(path)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated .gz raises EOFError
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {e})") from e


def _file_rows(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        first = f.read(4096).lstrip()[:1]
        f.seek(0)
        if first == b"[":  # one JSON array (CodeAlpaca's code_alpaca_20k.json)
            try:
                rows = json.loads(f.read().decode("utf-8"))
            except ValueError as e:
                raise ValueError(f"{path}: not a valid JSON array ({e})") from e
            for i, row in enumerate(rows):
                yield f"{path}, item {i}", row
            return
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield f"{path}, line {lineno}", json.loads(raw.decode("utf-8"))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                yield f"{path}, line {lineno}", ValueError(f"not valid JSON ({e})")


def _hub_rows(spec: str):
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"{spec}: a Hub source is hf:REPO:SPLIT or hf:REPO:CONFIG:SPLIT")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{spec}: reading from the Hugging Face Hub needs the datasets library (pip install "
                          f"datasets), or download the data and pass the file with --train / --test") from e
    ds = datasets.load_dataset(parts[0], parts[1] if len(parts) == 3 else None, split=parts[-1])
    names = {c: f.names for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    for i, row in enumerate(ds):
        for column, labels in names.items():
            if isinstance(row[column], int) and 0 <= row[column] < len(labels):
                row[column + "_name"] = labels[row[column]]
        yield f"{spec}, row {i}", row


def read_examples(specs: list[str], convert: Callable, args, report: dict, unused_rows: str = "") -> list[dict]:
    """Every row of every source through convert(row, args), with the source in 'source'; bad rows
    raise, or are counted with --skip_bad; rows convert leaves out (returns None for: unused_rows)
    are counted. A source without a single row used is an error."""
    out = []
    for spec in specs:
        good = bad = unused = 0
        for where, row in read_rows(spec):
            try:
                if isinstance(row, Exception):
                    raise row
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                example = convert(row, args)
            except ValueError as e:
                if not args.skip_bad:
                    raise ValueError(f"{where}: {e} (--skip_bad skips such rows)") from e
                bad += 1
                continue
            if example is None:
                unused += 1
                continue
            out.append({**example, "source": spec})
            good += 1
        if good + bad + unused == 0:
            raise ValueError(f"{spec} holds no rows")
        if good + bad == 0:
            raise ValueError(f"{spec}: none of its {unused} rows is used ({unused_rows} are left out)")
        report["rows"][spec] = good
        if unused:
            report["not_used"][spec] = unused
        if bad:
            report["skipped"][spec] = bad
            warnings.warn(f"{spec}: skipped {bad} malformed row(s)")
    return out


# --- formatting and writing

def encode(fmt, examples: list[dict], max_len: int, split: str, report: dict, sources: list[str]):
    """(samples, kept examples) in fmt; too-long samples counted, prompts that fill max_len dropped."""
    samples, kept, dropped, long = [], [], 0, 0
    for ex in examples:
        prompt, answer = fmt.encode(ex["messages"])
        if len(prompt) >= max_len:
            dropped += 1
            continue
        long += len(prompt) + len(answer) > max_len + 1
        samples.append((prompt, answer))
        kept.append(ex)
    report["dropped_prompt_too_long"][split] = dropped
    report["longer_than_max_len"][split] = long
    if not samples:
        raise ValueError(f"no {split} sample left from {' '.join(sources)} ({len(examples)} read, {dropped} of "
                         f"them with prompts longer than --max_len {max_len})")
    return samples, kept


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def write_test_extras(out: Path, fmt, test: list[dict], samples) -> dict:
    """The files a metric needs beyond test.npz, one line per test sample, in the same order."""
    files = {}
    if test and "choices" in test[0]:  # multiple choice: every option's answer ids after the same prompt
        rows = []
        for ex, (prompt, answer) in zip(test, samples):
            options = [fmt.encode(ex["messages"][:-1] + [{"role": "assistant", "content": c}]) for c in ex["choices"]]
            if any(p != prompt for p, _ in options) or options[ex["label"]][1] != answer:
                raise ValueError("the chat template renders the options' prompts differently: cannot score them")
            rows.append({"choices": [a for _, a in options], "label": ex["label"]})
        write_jsonl(out / "test_choices.jsonl", rows)
        files["test_choices.jsonl"] = len(rows)
    if test and "problem" in test[0]:  # HumanEval: what the program runner needs
        write_jsonl(out / "test_problems.jsonl", [ex["problem"] for ex in test])
        files["test_problems.jsonl"] = len(test)
    if test and "translation" in test[0]:  # WMT: the language pair, source and reference, as COMET reads them
        write_jsonl(out / "test_translations.jsonl", [ex["translation"] for ex in test])
        files["test_translations.jsonl"] = len(test)
    return files


def prepare(task: Task, args, made_by: str | None = None) -> dict:
    """Write args.out's SFT files and manifest.json; made_by: the command line, recorded there."""
    if args.val_size < 1:
        raise ValueError(f"--val_size must be at least 1 (train.py reads val.npz), got {args.val_size}")
    for name, low in (("max_train", 0), ("max_test", 0), ("max_len", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    tokenizer, fmt = chat_format.load_format(args.model, args.chat_template)
    test_specs = args.test or (task.test() if callable(task.test) else task.test)
    train_specs = args.train or task.train
    report = {"rows": {}, "skipped": {}, "not_used": {}, "dropped_prompt_too_long": {},
              "longer_than_max_len": {}}
    train = read_examples(train_specs, task.train_example, args, report, task.unused)
    test = read_examples(test_specs, task.test_example, args, report, task.unused)
    if task.finish:
        train, test = task.finish(train, test, args, report)
    random.Random(args.seed).shuffle(train)
    held = 2 * args.val_size if task.prompts_only_test else args.val_size
    if len(train) <= held:
        raise ValueError(f"{len(train)} training rows: need more than {held} to hold out --val_size {args.val_size}")
    splits = {"val": train[:args.val_size], "train": train[held:]}
    if args.max_train:
        splits["train"] = splits["train"][:args.max_train]
    prompts = test[:args.max_test or None]
    splits["test"] = train[args.val_size:held] if task.prompts_only_test else prompts
    out = Path(args.out)
    source = f"tasks/{task.name}.py: train {' '.join(train_specs)}; test {' '.join(test_specs)}"
    files = {}
    for split in ("train", "val", "test"):
        from_specs = test_specs if split == "test" and not task.prompts_only_test else train_specs
        samples, kept = encode(fmt, splits[split], args.max_len, split, report, from_specs)
        write.write_sft(out / f"{split}.npz", samples, tokenizer_name=getattr(tokenizer, "name", "?"),
                         source=source, seed=args.seed)
        if split == "test" and not task.prompts_only_test:
            files = write_test_extras(out, fmt, kept, samples)
    if task.prompts_only_test:  # IFEval: prompts for generation, with what their checks need
        write_jsonl(out / "test_prompts.jsonl", [{**ex["extra"], "prompt": ex["messages"][-1]["content"],
                                                  "prompt_ids": fmt.encode_prompt(ex["messages"])} for ex in prompts])
        files["test_prompts.jsonl"] = len(prompts)
    manifest = common.read_manifest(out)
    manifest.update(task=task.name, metric=getattr(args, "metric", task.metric), evaluator=EVALUATOR,
                    format=fmt.name, model=args.model, max_len=args.max_len, val_size=args.val_size, files=files,
                    made_by=made_by, **report, **{k: getattr(args, k) for k in task.record})
    write.write_manifest(out, manifest)
    return manifest


# --- command line

def parser(task: Task, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, a name train.py knows (olmoe, qwen2_moe, ...) "
                   "already downloaded, or 'tiny' (byte tokenizer, plain format)")
    p.add_argument("--train", nargs="+", help=f"training sources (default {' '.join(task.train)})")
    p.add_argument("--test", nargs="+", help="test sources (default " + ("as above" if callable(task.test) else
                                                                          " ".join(task.test)) + ")")
    p.add_argument("--out", default=str(common.DATA_DIR / task.name), help="output folder (default data/<task>)")
    p.add_argument("--chat_template", help="take the chat template from this checkpoint folder, "
                   "tokenizer_config.json or .jinja file (default: the model's own, else the plain format)")
    p.add_argument("--val_size", type=int, default=500, help="training rows held out for the val loss")
    p.add_argument("--max_train", type=int, default=0, help="at most this many training samples (0: all)")
    p.add_argument("--max_test", type=int, default=0, help="at most this many test samples (0: all)")
    p.add_argument("--max_len", type=int, default=2048, help="train.py's block_size: longer samples are counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_bad", action="store_true", help="skip malformed rows (counted) instead of stopping")
    if task.add_args:
        task.add_args(p)
    return p


def main(task: Task, doc: str, argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser(task, doc).parse_args(argv)
    t0 = time.time()
    m = prepare(task, args, made_by=shlex.join(["python", f"tasks/{task.name}.py", *argv]))
    for split, s in m["splits"].items():
        print(f"{split}: {s['samples']:,} samples, {s['tokens']:,} tokens, {s['answer_tokens']:,} in the loss, "
              f"{m['longer_than_max_len'][split]:,} longer than {args.max_len + 1} -> {Path(args.out) / split}.npz")
    print(f"format {m['format']}, metric {m['metric']} ({m['evaluator']}), extra files {m['files']}, "
          f"skipped rows {m['skipped'] or 0}; {time.time() - t0:.1f} s")
    return m


def cli(task: Task, doc: str, argv=None):
    try:
        main(task, doc, argv)
    except (ValueError, OSError, ImportError) as e:  # bad input: a clear message, no traceback
        sys.exit(f"error: {e}")
