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
import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import common, write  # noqa: E402
from hf import ByteTokenizer  # noqa: E402

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
OUT_DIR = common.DATA_DIR / "stdlib"


def vocab_size(tokenizer) -> int:
    """`vocab_size` (ByteTokenizer, transformers) or `get_vocab_size()` (tokenizers library)."""
    n = getattr(tokenizer, "vocab_size", None)
    return int(n) if n is not None else int(tokenizer.get_vocab_size())


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab < 2**16 else np.uint32)


# --- the pretraining token files: SPLIT.bin, one flat array of token ids (the dtype in manifest.json)

def write_tokens(path, ids: np.ndarray, dtype: np.dtype) -> None:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids {ids.min()}..{ids.max()} do not fit {np.dtype(dtype).name}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ids.astype(dtype).tofile(path)


def load_tokens(path) -> np.memmap:
    """SPLIT.bin as a read-only memmap, checked against manifest.json's dtype and token count."""
    path = common._existing(path, common.maker(path))
    manifest = common.read_manifest(path.parent)
    dtype = np.dtype(common.manifest_get(manifest, "dtype", path.parent))
    n = common.manifest_get(manifest, f"splits.{path.stem}.tokens", path.parent)
    if path.stat().st_size != n * dtype.itemsize:
        raise ValueError(f"{path} has {path.stat().st_size} bytes but manifest.json says {n} "
                         f"{dtype.name} tokens: truncated or stale; remake it with `{common.maker(path)}`")
    if n == 0:
        raise ValueError(f"{path} is empty")
    return np.memmap(path, dtype=dtype, mode="r")


def get_batch(data: np.ndarray, batch_size: int, block_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x (B, T) int64 and its next-token targets y (B, T), y[:, t] = x[:, t+1]."""
    if len(data) <= block_size:
        raise ValueError(f"{len(data)} tokens are too few for windows of block_size={block_size} + 1")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts])
    return x, y


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
    dtype = token_dtype(vocab_size(tokenizer))
    for split, arrays in parts.items():
        ids = np.concatenate(arrays)
        write_tokens(Path(out_dir) / f"{split}.bin", ids, dtype)
        splits[split]["tokens"] = len(ids)
    manifest = {
        "source": f"python {sys.version.split()[0]} stdlib *.py at {root}",
        "python": sys.version.split()[0], "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
        "vocab_size": vocab_size(tokenizer), "dtype": dtype.name,
        "excluded_dirs": sorted(EXCLUDED_DIRS), "val_every": val_every,
        "files": len(files), "bytes": sum(s["bytes"] for s in splits.values()),
        "sha256": sha.hexdigest(), "splits": splits, "seconds": round(time.time() - t0, 2),
    }
    write.write_manifest(out_dir, manifest)
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
