"""
Figures of a finished train.py run, drawn from its result.json:

    python tools/plots.py out        # out/loss.png, out/ranks_over_time.png, out/f_g.png

- loss.png: train loss per step, held-out loss at each evaluation, grey lines at growth events;
- ranks_over_time.png: every expert's active rank after each growth event, one panel per layer
  (the README's figure);
- f_g.png: each expert's share of routing (f_hat) and of rank importance (g_hat) at the end.
"""
import argparse
import json
import os

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def rank_heatmaps(path, events, r_init):
    """One panel per layer: experts (rows) x growth events (columns), colour = active rank."""
    plt = _pyplot()
    ranks = np.array([e["ranks"] for e in events])  # (events, L, E)
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


def save_plots(out_dir) -> list[str]:
    with open(os.path.join(out_dir, "result.json")) as f:
        run = json.load(f)
    history, result, r_init = run["history"], run["result"], run["config"]["lora"]["r_init"]
    plt = _pyplot()
    files = [os.path.join(out_dir, name) for name in ("loss.png", "ranks_over_time.png", "f_g.png")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], lw=0.8, alpha=0.6, label="train (per step)")
    points = [history["base"]] if "base" in history else []
    points += history["eval"] + [history["final"]]
    ax.plot([e["step"] for e in points], [e["val_loss"] for e in points], "o-", label="val (answer tokens)")
    for e in history["events"]:
        ax.axvline(e["step"], color="grey", lw=0.4, alpha=0.5)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="loss (grey lines: growth events)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(files[0], dpi=110)
    plt.close(fig)
    L, E = len(result["ranks"]), len(result["ranks"][0])
    rank_heatmaps(files[1], [{"step": 0, "ranks": [[r_init] * E] * L}] + history["events"], r_init)
    f, g = np.array(result["f"]), np.array(result["g"])
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default="out", help="a train.py --out_dir holding result.json")
    print("\n".join(save_plots(p.parse_args().out_dir)))
