"""Pretraining corpus that every machine has: the Python standard library's own source.

- Files: every `*.py` under `sysconfig.get_paths()['stdlib']`, sorted by path, skipping folders
  named site-packages / dist-packages (installed packages: 100+ MB that differ from machine to
  machine), test / tests (CPython's test suite: large, repetitive, with deliberately broken
  files) and __pycache__. idlelib is kept: it is ordinary code (its small idle_test/ folder slips
  through the name rule; we keep it: 799 files, 12.6 MB on Python 3.11).
- Documents: each file's exact bytes (no newline translation), preceded by eos, which plays BOS.
- Split by file: every 20th file (indices 19, 39, ...) is validation, the rest training.
- The stdlib differs between Python versions, so the manifest records the version, the file count,
  the bytes and a sha256 of the paths and contents: compare those before comparing losses.
- `kind_samples` cuts held-out snippets of two kinds of text, code and English (docstrings and
  comments), to show whether experts specialise.

Writes data/stdlib/{train,val}.bin and manifest.json: `python data/stdlib.py`.
"""
import ast
import hashlib
import io
import os
import random
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import common  # noqa: E402
from hf import ByteTokenizer  # noqa: E402

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
OUT_DIR = common.DATA_DIR / "stdlib"


def list_files(root=None) -> list[Path]:
    """The corpus files under root (default: this Python's stdlib), sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib folder {root} not found")
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_DIRS]  # do not even walk them
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    if not files:
        raise ValueError(f"no .py files under {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(index: int, val_every: int) -> str:
    return "val" if index % val_every == val_every - 1 else "train"


def prepare(out_dir=OUT_DIR, root=None, tokenizer=None, val_every: int = 20) -> dict:
    """Tokenize the corpus into out_dir/{train,val}.bin; returns (and writes) the manifest."""
    t0, tokenizer = time.time(), tokenizer or ByteTokenizer()
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files, sha = list_files(root), hashlib.sha256()
    parts = {"train": [], "val": []}
    splits = {s: {"files": 0, "bytes": 0, "tokens": 0} for s in parts}
    for i, path in enumerate(files):
        raw, split = path.read_bytes(), split_of(i, val_every)
        sha.update(path.relative_to(root).as_posix().encode() + b"\0" + raw + b"\0")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 ({e})") from e
        parts[split].append(np.array([tokenizer.eos_id] + tokenizer.encode(text), dtype=np.int64))
        splits[split]["files"] += 1
        splits[split]["bytes"] += len(raw)
    if not parts["val"]:
        raise ValueError(f"{len(files)} files give no validation file with val_every={val_every}")
    dtype = common.token_dtype(common.vocab_size(tokenizer))
    for split, arrays in parts.items():
        ids = np.concatenate(arrays)
        common.write_tokens(Path(out_dir) / f"{split}.bin", ids, dtype)
        splits[split]["tokens"] = len(ids)
    manifest = {
        "source": f"python {sys.version.split()[0]} stdlib *.py at {root}",
        "python": sys.version.split()[0], "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
        "vocab_size": common.vocab_size(tokenizer), "dtype": dtype.name,
        "excluded_dirs": sorted(EXCLUDED_DIRS), "val_every": val_every,
        "files": len(files), "bytes": sum(s["bytes"] for s in splits.values()),
        "sha256": sha.hexdigest(), "splits": splits, "seconds": round(time.time() - t0, 2),
    }
    common.write_manifest(out_dir, manifest)
    return manifest


def split_kinds(source: str) -> tuple[str, str]:
    """Split Python source into (code, prose): prose is its docstrings and comments, minus lines
    without letters and doctest lines; code is every other non-blank line, inline comments cut."""
    lines, prose, not_code = source.splitlines(), [], set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc is not None:
                prose += [line.strip() for line in doc.splitlines()]
                not_code.update(range(node.body[0].lineno - 1, node.body[0].end_lineno))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start[0] - 1, tok.start[1]
            prose.append(tok.string.lstrip("#").strip())
            lines[row] = lines[row][:col].rstrip()
    prose = [p for p in prose if any(c.isalpha() for c in p) and not p.startswith((">>>", "...", "!"))]
    code = [line for i, line in enumerate(lines) if i not in not_code and line.strip()]
    return "\n".join(code), "\n".join(prose)


def kind_samples(n: int = 8, length: int = 256, seed: int = 0, root=None,
                 val_every: int = 20) -> dict[str, list[str]]:
    """n snippets of `length` characters per kind ('code', 'prose') from the validation files:
    a random file that has enough of that kind, then a random window of it."""
    files = [p for i, p in enumerate(list_files(root)) if split_of(i, val_every) == "val"]
    texts = {"code": [], "prose": []}
    for path in files:
        code, prose = split_kinds(path.read_text(encoding="utf-8"))
        texts["code"].append(code)
        texts["prose"].append(prose)
    rng, out = random.Random(seed), {}
    for kind, candidates in texts.items():
        candidates = [t for t in candidates if len(t) >= length]
        if not candidates:
            raise ValueError(f"no validation file has {length} characters of {kind}")
        out[kind] = []
        for _ in range(n):
            text = rng.choice(candidates)
            start = rng.randrange(len(text) - length + 1)
            out[kind].append(text[start:start + length])
    return out


if __name__ == "__main__":
    m = prepare()
    print(f"{m['source']}: {m['files']} files, {m['bytes']:,} bytes, sha256 {m['sha256'][:16]}...")
    for split, s in m["splits"].items():
        print(f"  {split}: {s['files']} files, {s['tokens']:,} tokens ({m['dtype']}) -> {OUT_DIR / split}.bin")
    print(f"  {m['seconds']} s")
