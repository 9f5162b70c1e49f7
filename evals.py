"""
Evaluation used by train.py. A sample of an SFT split is prompt + answer (the loss mask marks the
answer), so the same files serve the loss and the prompts; a prepared task's manifest names its
metric and evaluate_task() computes it:

- val_loss: mean cross-entropy per answer token.
- exact_match (GSM8K, arithmetic): greedy decoding through moe.py's KV cache, then the final number
  of output and reference (extract_number: the first '#### N', else the last 'The answer is N';
  "1,234", "-3", "$18.50", "7.0" read as exact rationals) compared for equality.
- anything else (multiple choice, HumanEval's pass@1, the held-out test loss of the real tasks): the
  module the manifest names as "evaluator" (tasks/metrics.py), imported by name.
"""
import importlib
import os

import torch

from data import common

# --- answers


extract_number = common.extract_number  # the final number of a GSM8K-style answer (data/common.py)


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
    """The metric the task's manifest names: ({"metric": name, "score": headline number, "higher_is_better":
    bool, ...details}, [(prompt or task id, output, ok)]). Exact match when it names none (the generated
    tasks); any other metric is computed by the module the manifest names as its "evaluator"
    (tasks.metrics for the real tasks), imported by name: the core never imports the harness."""
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


# --- figures of a run (PNG; matplotlib is imported only when a figure is drawn)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def rank_heatmaps(path, events, r_init):
    """One panel per layer: experts (rows) x growth events (columns), colour = active rank."""
    plt = _pyplot()
    ranks = torch.tensor([e["ranks"] for e in events]).numpy()  # (events, L, E)
    steps = [e["step"] for e in events]
    fig, axes = plt.subplots(1, ranks.shape[1], figsize=(3 * ranks.shape[1] + 1, 3.2), squeeze=False)
    for l, ax in enumerate(axes[0]):
        im = ax.imshow(ranks[:, l, :].T, aspect="auto", cmap="viridis", vmin=r_init, vmax=int(ranks.max()),
                       origin="lower", extent=(-0.5, len(steps) - 0.5, -0.5, ranks.shape[2] - 0.5))
        ax.set(title=f"layer {l}", xlabel="growth event", ylabel="expert" if l == 0 else None)
        ax.set_xticks(range(len(steps))[:: max(1, len(steps) // 4)], steps[:: max(1, len(steps) // 4)])
    fig.colorbar(im, ax=axes[0].tolist(), label="active rank")
    fig.suptitle("DR-LoRA: every expert's rank after each growth event (x: step of the event)", y=1.04)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def save_plots(out_dir, history, drl) -> list[str]:
    """loss.png (train and held-out loss, growth events), ranks_over_time.png, f_g.png (final f and g)."""
    plt = _pyplot()
    files = [os.path.join(out_dir, name) for name in ("loss.png", "ranks_over_time.png", "f_g.png")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], lw=0.8, alpha=0.6, label="train (per step)")
    points = [history["base"]] if "base" in history else []
    points += history["eval"] + ([history["final"]] if "final" in history else [])
    ax.plot([e["step"] for e in points], [e["val_loss"] for e in points], "o-", label="val (answer tokens)")
    for e in history["events"]:
        ax.axvline(e["step"], color="grey", lw=0.4, alpha=0.5)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="loss (grey lines: growth events)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(files[0], dpi=110)
    plt.close(fig)
    start = {"step": 0, "ranks": [[drl.cfg.r_init] * drl.ranks.shape[1]] * drl.ranks.shape[0]}
    rank_heatmaps(files[1], [start] + history["events"], drl.cfg.r_init)
    f, g = drl.f.cpu().numpy(), drl.expert_importance().cpu().numpy()
    L, E = f.shape
    fig, axes = plt.subplots(2, L, figsize=(3 * L, 4.5), squeeze=False, sharey="row")
    for l in range(L):
        axes[0, l].bar(range(E), f[l] / max(float(f[l].sum()), 1e-12), color="tab:blue")
        axes[1, l].bar(range(E), g[l] / max(float(g[l].sum()), 1e-12), color="tab:orange")
        axes[0, l].set_title(f"layer {l}")
        axes[1, l].set_xlabel("expert")
    axes[0, 0].set_ylabel("f_hat (routing)")
    axes[1, 0].set_ylabel("g_hat (importance)")
    fig.suptitle("routing frequency and rank importance per expert at the end")
    fig.tight_layout()
    fig.savefig(files[2], dpi=110)
    plt.close(fig)
    return files
