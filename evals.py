"""
Evaluation for train.py. An SFT sample is prompt + answer (the loss mask marks the answer), so one
file serves the loss and the prompts. val_loss: cross-entropy per answer token. exact_match (GSM8K,
the embedded tasks): greedy decoding, then the final answers of output and reference compared
(common.extract_number, or the embedded task's extract_answer). Any other metric a task's manifest
names is computed by the "evaluator" module it names (tasks/metrics.py), imported by name.
"""
import importlib
import os

import torch

from data import common

extract_number = common.extract_number  # the final number of a GSM8K-style answer


def split_sample(ids, mask):
    """(prompt ids, answer ids) of one SFT sample: the answer starts at the first masked token."""
    start = int(mask.argmax())
    return ids[:start].tolist(), ids[start:].tolist()


# --- loss


@torch.no_grad()
def val_loss(model, dataset, block_size: int, pad_id: int, batch_size: int = 32, n: int | None = None, autocast=None):
    """Mean cross-entropy per answer token over the first n samples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = len(dataset) if n is None else min(n, len(dataset))
    device = model.lm_head.weight.device
    for i in range(0, n, batch_size):
        x, y, mask = common.sft_batch(dataset, range(i, min(i + batch_size, n)), block_size, pad_id)
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast or torch.autocast("cpu", enabled=False):
            loss = model(x, targets=y, attention_mask=mask).loss  # mean over this batch's answer tokens
        k = (y != common.IGNORE_INDEX).sum().item()
        total += loss.item() * k
        count += k
    model.train(was_training)
    return total / max(count, 1)


# --- generation


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64,
           autocast=None) -> list[str]:
    """Decoded greedy continuations of token prompts, stopped at eos."""
    was_training = model.training
    model.eval()
    texts = []
    for i in range(0, len(prompts), batch_size):
        with autocast or torch.autocast("cpu", enabled=False):
            outs = model.generate(prompts[i:i + batch_size], max_new_tokens, eos_id=tokenizer.eos_id,
                                  pad_id=tokenizer.pad_id)
        texts += [tokenizer.decode(o) for o in outs]
    model.train(was_training)
    return texts


def exact_match(model, tokenizer, dataset, n: int | None = None, batch_size: int = 64, max_new_tokens: int = 24,
                autocast=None, examples: int = 0, extract=extract_number):
    """Greedy-decode each prompt, extract the final answer from the output and from the reference
    answer, count equal ones. Returns (accuracy, [(prompt, output, ok)] examples)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    pairs = [split_sample(*dataset[j]) for j in range(n)]
    outs = greedy(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, autocast)
    correct, shown = 0, []
    for (prompt, answer), text in zip(pairs, outs):
        target = extract(tokenizer.decode(answer))
        ok = target is not None and extract(text) == target
        correct += ok
        if len(shown) < examples:
            shown.append((tokenizer.decode(prompt), text, ok))
    return correct / max(n, 1), shown


# --- the task's own metric


GENERATED = ("arithmetic", "sorting")  # embedded tasks: data/<name>.py reads its own answers (extract_answer)


def evaluate_task(model, tokenizer, folder, test_set, n: int | None = None, max_new_tokens: int = 24, autocast=None,
                  examples: int = 0) -> tuple[dict, list]:
    """The metric the task's manifest names (exact match if none): ({"metric", "score", "higher_is_better",
    ...}, [(prompt or task id, output, ok)]). Others come from the manifest's "evaluator" module, imported
    by name: the core never imports the harness (tasks/)."""
    manifest = test_set.manifest
    metric = manifest.get("metric", "exact_match")
    if metric == "exact_match":
        name = os.path.basename(os.path.normpath(folder))
        extract = importlib.import_module(f"data.{name}").extract_answer if name in GENERATED else extract_number
        acc, shown = exact_match(model, tokenizer, test_set, n, max_new_tokens=max_new_tokens, autocast=autocast,
                                 examples=examples, extract=extract)
        return {"metric": "accuracy", "score": acc, "higher_is_better": True}, shown
    path = os.path.join(folder, "manifest.json")
    evaluator = manifest.get("evaluator")
    if not isinstance(evaluator, str) or not evaluator:
        raise ValueError(f"{path}: metric {metric!r} but no 'evaluator' module to compute it (made by an older "
                         f"version); remake the folder with the task's prepare script: `{common.maker(path)}`")
    try:
        module = importlib.import_module(evaluator)
    except ModuleNotFoundError as e:
        if e.name is None or not (evaluator + ".").startswith(e.name + "."):
            raise  # the evaluator exists but lacks one of its own dependencies: that error says which
        raise ValueError(f"{path}: evaluator {evaluator!r} cannot be imported ({e})") from e
    return module.evaluate(metric, model, tokenizer, folder, test_set, n, max_new_tokens=max_new_tokens,
                           autocast=autocast, examples=examples)
