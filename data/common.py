"""On-disk formats of fine-tuning data: SFT sets, their manifest.json, and the batches train.py reads
(the pretraining token files are data/stdlib.py's).

A prepared folder (data/arithmetic/, data/gsm8k/, ...) holds manifest.json and SPLIT.npz: flat `tokens`
(uint32), `loss_mask` (uint8, 1 on answer tokens) and `offsets` (int64): sample i is
tokens[offsets[i]:offsets[i+1]]. A sample is BOS + prompt, then answer + eos (which teaches the model to
stop). Prompt and answer are encoded separately, exactly as the prompt is encoded alone at generation
time: a BPE tokenizer could otherwise merge tokens across the boundary. Readers fail loudly, naming the
file, key or line and the script that makes the file.
"""
import importlib
import json
import re
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from moe import IGNORE_INDEX

DATA_DIR = Path(__file__).resolve().parent
EMBEDDED = ("arithmetic", "sorting")  # the tasks data/NAME.py generates on first use, for the tiny model


def maker(path: Path) -> str:
    """The command that makes a prepared file: the one its folder's manifest.json records ("made_by",
    written by the prepare scripts of tasks/), else `python data/NAME.py` or `python tasks/NAME.py
    --model MODEL` for a folder named NAME, else a description. Never raises: it only words errors."""
    folder = Path(path).parent
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        made_by, model = manifest.get("made_by"), manifest.get("model")
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object: no record to use
        made_by = model = None
    if isinstance(made_by, str) and made_by:
        return made_by
    name = folder.name
    if (DATA_DIR.parent / "data" / f"{name}.py").exists():  # the embedded tasks write data/NAME/ only
        return f"python data/{name}.py"
    if (DATA_DIR.parent / "tasks" / f"{name}.py").exists():  # the real ones take the model and --out
        elsewhere = folder.resolve() != (DATA_DIR / name).resolve()
        return (f"python tasks/{name}.py --model {model if isinstance(model, str) else 'MODEL'}"
                + (f" --out {folder}" if elsewhere else ""))
    return (f"the script that prepares it: {' or '.join(f'python data/{t}.py' for t in EMBEDDED)} for a generated "
            f"task; python tasks/TASK.py --model MODEL --out {folder} for a real one (TASK: gsm8k, humaneval, "
            f"medmcqa, wmt, ledgar or tulu)")


def _existing(path, hint: str | None = None) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found" + (f"; it is made by `{hint}`" if hint else ""))
    return path


# --- tokenizer duck type: encode(str) -> list[int], decode(ids) -> str, eos_id, pad_id

def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """What the model sees before it answers: used for training data and for generation alike. It starts
    with the tokenizer's own BOS where it has one (LLaMA, Mixtral: <s>), else with eos, the separator
    between the documents the model was pretrained on (OLMoE, Qwen, the tiny model)."""
    first = getattr(tokenizer, "bos_id", None)
    return [tokenizer.eos_id if first is None else first] + tokenizer.encode(prompt)


def encode_sample(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    return encode_prompt(tokenizer, prompt), tokenizer.encode(answer) + [tokenizer.eos_id]


# --- manifest.json

def read_manifest(folder) -> dict:
    path = _existing(Path(folder) / "manifest.json", maker(Path(folder) / "x"))
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); remake it with `{maker(path)}`") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} should hold a JSON object; remake it with `{maker(path)}`")
    return manifest


def manifest_get(manifest: dict, key: str, folder):
    """manifest['splits']['train'] for key 'splits.train', or an error naming the file and key."""
    value = manifest
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{Path(folder) / 'manifest.json'} has no key '{key}'; "
                             f"remake it with `{maker(Path(folder) / 'x')}`")
        value = value[part]
    return value


# --- a task: its folder and its splits

def task_folder(task: str, make: bool = False) -> Path:
    """The folder of a task's token files: a folder, or data/<task>/. With make, an embedded task (byte
    tokens, for the tiny model) is generated there on first use."""
    folder = Path(task) if Path(task).is_dir() else DATA_DIR / task
    if not folder.is_dir() and (task.startswith((".", "/", "~")) or "/" in task):  # a path, not a task's name
        raise FileNotFoundError(f"--task {task}: no such folder; a task folder is made by {maker(folder / 'x')}")
    if make and task in EMBEDDED and not (folder / "test.npz").exists():
        importlib.import_module(f"data.{task}").prepare(out_dir=folder)
    return folder


class Task(NamedTuple):
    folder: Path
    train: "SFTDataset"
    val: "SFTDataset"  # the held-out loss
    test: "SFTDataset"  # the metric: the val or the test split, as `split` says
    split: str


def load_task(folder, tokenizer, split: str = "test") -> Task:
    """A prepared task's splits, checked to be tokenized by `tokenizer`; the metric reads `split`."""
    folder = Path(folder)
    train, val, test = (load_sft(folder / f"{s}.npz") for s in ("train", "val", split))
    made_with = train.manifest.get("tokenizer")
    if made_with != tokenizer.name:
        raise ValueError(f"{folder}/manifest.json: the data was tokenized by {made_with!r}, the model uses "
                         f"{tokenizer.name!r}; remake it for this model: `{maker(folder / 'train.npz')}`")
    return Task(folder, train, val, test, split)


# --- supervised fine-tuning sets

class SFTDataset:
    """Samples of an SFT split: dataset[i] -> (ids int64 (L,), mask bool (L,), True on answer)."""

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, offsets: np.ndarray, manifest: dict):
        self.tokens, self.loss_mask, self.offsets, self.manifest = tokens, loss_mask, offsets, manifest

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of a dataset of {len(self)}")
        a, b = self.offsets[i % len(self)], self.offsets[i % len(self) + 1]
        return self.tokens[a:b].astype(np.int64), self.loss_mask[a:b].astype(bool)


def load_sft(path) -> SFTDataset:
    path = _existing(path, maker(path))
    redo = f"remake it with `{maker(path)}`"
    try:
        with np.load(path) as f:
            arrays = {key: f[key] for key in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e}); {redo}") from e
    for key in ("tokens", "loss_mask", "offsets"):
        if key not in arrays or arrays[key].ndim != 1:
            raise ValueError(f"{path}: key '{key}' is missing or not a flat array; {redo}")
    tokens, mask, offsets = arrays["tokens"], arrays["loss_mask"], arrays["offsets"]
    if len(mask) != len(tokens):
        raise ValueError(f"{path}: key 'loss_mask' has {len(mask)} entries, 'tokens' {len(tokens)}; {redo}")
    if len(offsets) < 2:
        raise ValueError(f"{path} holds no samples (key 'offsets' has {len(offsets)} entries); {redo}")
    if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 2):
        raise ValueError(f"{path}: key 'offsets' does not cut 'tokens' into samples; {redo}")
    manifest = read_manifest(path.parent)
    n = manifest_get(manifest, f"splits.{path.stem}.samples", path.parent)
    if n != len(offsets) - 1:
        raise ValueError(f"{path} has {len(offsets) - 1} samples, manifest.json says {n}: stale; {redo}")
    return SFTDataset(tokens, mask, offsets, manifest)


def batch_indices(pos: int, n: int, n_train: int, seed: int) -> list[int]:
    """Samples pos .. pos+n-1 of an endless stream of seeded per-epoch permutations of the training set."""
    out = []
    while len(out) < n:
        epoch, i = divmod(pos + len(out), n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch))
        out += perm[i: i + n - len(out)].tolist()
    return out


def sft_batch(dataset, indices: Sequence[int], block_size: int,
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch: x (B, T) ids, y (B, T) next-token targets with -100 on prompt and padding,
    attention_mask (B, T) 1 on real tokens. T = longest sample - 1, at most block_size; a longer
    sample loses its tail (one warning per batch says how many)."""
    samples = [dataset[i] for i in indices]
    if not samples:
        raise ValueError("sft_batch got no indices")
    B, T = len(samples), min(max(len(ids) for ids, _ in samples) - 1, block_size)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    truncated = lost = 0
    for b, (ids, mask) in enumerate(samples):
        ids, mask = torch.from_numpy(ids[:T + 1]), torch.from_numpy(mask[:T + 1])
        if len(ids) < len(samples[b][0]):
            truncated += 1
            lost += not mask[1:].any()  # every answer token was in the cut-off tail
        n = len(ids) - 1
        x[b, :n] = ids[:-1]
        y[b, :n] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
        attention_mask[b, :n] = 1
    if truncated:
        warnings.warn(f"sft_batch: truncated {truncated} of {B} samples longer than block_size + 1 = "
                      f"{block_size + 1} tokens" + (f"; {lost} of them lost every answer token and "
                                                     "add nothing to the loss" if lost else ""))
    return x, y, attention_mask


_NUMBER = r"-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"  # 12, 1,234, -3, $18.50, -$5


def extract_number(text: str) -> Fraction | None:
    """The number after the first '####', else after the last 'The answer is' (any case, optional
    ':' and '$'), as an exact Fraction: '18.50' == '18.5', '7.0' == '7'. None if there is none."""
    m = re.search(r"####\s*(" + _NUMBER + ")", text)
    found = [m.group(1)] if m else re.findall(r"the answer is:?\s*(" + _NUMBER + ")", text, re.IGNORECASE)
    if not found:
        return None
    return Fraction(found[-1].replace(",", "").replace("$", ""))
