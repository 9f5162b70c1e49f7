"""Writing prepared folders: SFT sets and their manifest.json, and the generated tasks' disjoint
splits. The scripts that make data use it; training only reads (data/common.py)."""
import hashlib
import json
import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data import common


def write_manifest(folder, manifest: dict) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

def write_sft(path, samples: Sequence[tuple[Sequence[int], Sequence[int]]], *, tokenizer_name: str,
              source: str, seed: int | None = None) -> dict:
    """Write (prompt_ids, answer_ids) pairs to SPLIT.npz and record the split in manifest.json."""
    path = Path(path)
    tokens, mask, offsets = [], [], [0]
    for i, (prompt, answer) in enumerate(samples):
        if len(answer) == 0 or len(prompt) + len(answer) < 2:
            raise ValueError(f"sample {i} for {path} has no answer token that a loss could cover")
        tokens += list(prompt) + list(answer)
        mask += [0] * len(prompt) + [1] * len(answer)
        offsets.append(len(tokens))
    if len(offsets) == 1:
        raise ValueError(f"no samples to write to {path}: an empty dataset is an error")
    tokens = np.array(tokens, dtype=np.int64)
    if tokens.min() < 0 or tokens.max() >= 2**32:
        raise ValueError(f"token ids {tokens.min()}..{tokens.max()} do not fit uint32")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, tokens=tokens.astype(np.uint32), loss_mask=np.array(mask, dtype=np.uint8),
             offsets=np.array(offsets, dtype=np.int64))
    stats = {"samples": len(offsets) - 1, "tokens": len(tokens), "answer_tokens": sum(mask),
             "longest": int(np.diff(offsets).max()), "seed": seed}  # longest > block_size + 1: truncation
    try:
        manifest = common.read_manifest(path.parent)
    except (FileNotFoundError, ValueError):
        manifest = {}  # we are remaking the folder: a missing or broken manifest is replaced
    if manifest.get("source") != source or manifest.get("tokenizer") != tokenizer_name:
        manifest = {"source": source, "tokenizer": tokenizer_name, "splits": {}}  # others are stale
    manifest.setdefault("splits", {})[path.stem] = stats
    write_manifest(path.parent, manifest)
    return stats

# --- generated tasks (arithmetic.py, sorting.py): disjoint splits and preparation

def hash_split(text: str, val_pct: int = 5, test_pct: int = 5) -> str:
    """A text's split, fixed by its sha256: any sizes and seeds keep the splits disjoint."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if h < test_pct else "val" if h < test_pct + val_pct else "train"


def sample_split(draw: Callable[[random.Random], dict], n: int, seed: int, split: str) -> list[dict]:
    """n distinct rows (by 'prompt') from draw(rng), keeping those whose prompt hashes to `split`."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    rng, rows, seen = random.Random(seed), [], set()
    for _ in range(100 * n + 1000):
        if len(rows) == n:
            break
        row = draw(rng)
        if row["prompt"] not in seen and hash_split(row["prompt"]) == split:
            seen.add(row["prompt"])
            rows.append(row)
    if len(rows) < n:
        raise ValueError(f"found only {len(rows)} distinct {split} problems of the {n} asked for")
    return rows


def prepare_task(out_dir, generate: Callable[[int, int, str], list[dict]], sizes: dict[str, int],
                 seed: int, tokenizer, source: str, evaluator: str) -> dict:
    """Generate each split (seed + its index) and write it with write_sft; returns the manifest, which
    names the metric (exact match) and the module whose extract_answer reads the answers (evaluator)."""
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    for k, (split, n) in enumerate(sizes.items()):
        rows = generate(n, seed + k, split)
        samples = [common.encode_sample(tokenizer, r["prompt"], r["answer"]) for r in rows]
        write_sft(Path(out_dir) / f"{split}.npz", samples, tokenizer_name=name, source=source, seed=seed + k)
    manifest = {**common.read_manifest(out_dir), "metric": "exact_match", "evaluator": evaluator}
    write_manifest(out_dir, manifest)
    return manifest
