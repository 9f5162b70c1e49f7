"""
Evaluation: the held-out loss and the task's own metric (tools/evaluate.py scores a saved adapter with it),
and the record of a run (result.json).

An SFT sample is prompt + answer (the loss mask marks the answer), so one file serves the loss and the
prompts. val_loss: cross-entropy per answer token. The metric is the one the task's manifest.json names,
computed by the "evaluator" module it names: exact_match (the embedded tasks) is greedy decoding with the
final answers of output and reference read by the evaluator's extract_answer; any other metric is the
evaluator's own evaluate() (tasks/metrics.py for the real tasks), imported by name, so that the core
never imports the harness.
"""
import hashlib
import importlib
import json
import math
import os
import platform
import re
from dataclasses import asdict

import torch

from data import common
from moe import IGNORE_INDEX


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
        k = (y != IGNORE_INDEX).sum().item()
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


def exact_match(model, tokenizer, dataset, extract, n: int | None = None, batch_size: int = 64,
                max_new_tokens: int = 24, autocast=None, examples: int = 0):
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


def evaluate_task(model, tokenizer, folder, test_set, n: int | None = None, max_new_tokens: int = 24, autocast=None,
                  examples: int = 0) -> tuple[dict, list]:
    """The metric the task's manifest names, by the evaluator module it names: ({"metric", "score",
    "higher_is_better", ...}, [(prompt or task id, output, ok)])."""
    manifest, path = test_set.manifest, os.path.join(folder, "manifest.json")
    metric, evaluator = manifest.get("metric"), manifest.get("evaluator")
    if not (isinstance(metric, str) and isinstance(evaluator, str) and metric and evaluator):
        raise ValueError(f"{path} names no 'metric' and 'evaluator' to score the task with; remake the folder: "
                         f"`{common.maker(path)}`")
    try:
        module = importlib.import_module(evaluator)
    except ModuleNotFoundError as e:
        if e.name is None or not (evaluator + ".").startswith(e.name + "."):
            raise  # the evaluator exists but lacks one of its own dependencies: that error says which
        raise ValueError(f"{path}: evaluator {evaluator!r} cannot be imported ({e})") from e
    if metric == "exact_match":
        if not hasattr(module, "extract_answer"):
            raise ValueError(f"{path}: {evaluator} reads no answers for exact_match; remake the folder: "
                             f"`{common.maker(path)}`")
        acc, shown = exact_match(model, tokenizer, test_set, module.extract_answer, n, max_new_tokens=max_new_tokens,
                                 autocast=autocast, examples=examples)
        return {"metric": "accuracy", "score": acc, "higher_is_better": True}, shown
    return module.evaluate(metric, model, tokenizer, folder, test_set, n, max_new_tokens=max_new_tokens,
                           autocast=autocast, examples=examples)


def evaluate(what: str, model, tokenizer, task: common.Task, n: int, block_size: int, max_new_tokens: int,
             autocast=None, examples: int = 0, log=print) -> dict:
    """The held-out loss on task.val and the task's metric on task.test, logged with a few examples:
    {"val_loss", "metric", "score", "higher_is_better", ...}."""
    block_size = min(block_size, model.cfg.max_seq_len)
    loss = val_loss(model, task.val, block_size, tokenizer.pad_id, n=n, autocast=autocast)
    r, shown = evaluate_task(model, tokenizer, task.folder, task.test, n, max_new_tokens, autocast, examples)
    log(f"{what}: val loss {loss:.4f}, {r['metric']} {r['score']:.3f} ({min(n, len(task.test))} {task.split} samples)")
    for prompt, out, ok in shown:
        log(f"  {'ok ' if ok else 'bad'} {prompt!r} -> {out!r}")
    return {"val_loss": loss, **r}


# --- the record of a run


def machine(base: str, device: str) -> dict:
    """What a result depends on beyond the settings: the processor, threads, torch, and the base's own bytes
    (a tiny base pretrained with another thread count is another model)."""
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cpu = re.search(r"model name\s*: (.*)", info)
    weights, digest = os.path.join(base, "model.safetensors"), None
    if os.path.exists(weights):  # streamed: a real base is many GB
        with open(weights, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"cpu": cpu[1].strip() if cpu else platform.processor(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device, "base_sha256": digest}


def record(cfg, history: dict, drl, seconds: float, base: str, device: str, log=print) -> dict:
    """result.json in cfg.out_dir (the settings, the scores, the final ranks, f and g, the run's history, the
    machine) and a table of the scores. cfg: train.TrainConfig."""
    final, before, lcfg = history["final"], history.get("base") or {}, cfg.lora
    result = {"method": lcfg.method, "metric": final["metric"], "base_score": before.get("score"),
              "score": final["score"], "base_val_loss": before.get("val_loss"), "val_loss": final["val_loss"],
              "active_lora_params": drl.active_lora_parameters(), "ranks": drl.ranks.tolist(), "f": drl.f.tolist(),
              "g": drl.expert_importance().tolist(), "seconds": seconds, "machine": machine(base, device)}
    with open(os.path.join(cfg.out_dir, "result.json"), "w") as f:
        json.dump({"config": asdict(cfg), "result": result, "history": history, "drlora": drl.history}, f)
    better = "" if final["higher_is_better"] else " (lower is better)"
    log(f"\n| | val loss | {final['metric']}{better} |\n|---|---|---|\n"
        f"| base model | {before.get('val_loss', math.nan):.4f} | {before.get('score', math.nan):.3f} |\n"
        f"| {lcfg.method} ({cfg.steps} steps) | {final['val_loss']:.4f} | {final['score']:.3f} |\n"
        f"active LoRA parameters {result['active_lora_params']:,}; ranks per layer "
        f"{[sum(r) for r in result['ranks']]}; fine-tuning {seconds:.0f}s; adapter {cfg.out_dir}/adapter.safetensors; "
        f"figures: python tools/plots.py {cfg.out_dir}")
    return result
