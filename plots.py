"""PNG plots of a run (matplotlib, no display needed): loss curves, every expert's rank over
time as a layers x experts heat map, and the final f and g per expert."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(path, history):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], lw=0.8, alpha=0.6, label="train (per step)")
    evals = ([history["base"]] if "base" in history else []) + history["eval"] + ([history["final"]] if "final" in history else [])
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="val (answer tokens)")
    for e in history["events"]:
        ax.axvline(e["step"], color="grey", lw=0.4, alpha=0.5)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="loss (grey lines: growth events)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rank_heatmaps(path, events, r_init):
    """One panel per layer: experts (rows) x growth events (columns), colour = active rank."""
    if not events:
        return False
    ranks = np.array([e["ranks"] for e in events])  # (events, L, E)
    steps = [e["step"] for e in events]
    n_layers = ranks.shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(3 * n_layers + 1, 3.2), squeeze=False)
    vmax = ranks.max()
    for l, ax in enumerate(axes[0]):
        im = ax.imshow(ranks[:, l, :].T, aspect="auto", cmap="viridis", vmin=r_init, vmax=vmax, origin="lower",
                       extent=(-0.5, len(steps) - 0.5, -0.5, ranks.shape[2] - 0.5))
        ax.set(title=f"layer {l}", xlabel="growth event", ylabel="expert" if l == 0 else None)
        ax.set_xticks(range(len(steps))[:: max(1, len(steps) // 4)])
        ax.set_xticklabels(steps[:: max(1, len(steps) // 4)])
    fig.colorbar(im, ax=axes[0].tolist(), label="active rank")
    fig.suptitle("DR-LoRA: every expert's rank after each growth event (x: step of the event)", y=1.04)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def final_ranks(path, ranks, title):
    ranks = np.array(ranks)  # (L, E)
    fig, ax = plt.subplots(figsize=(0.45 * ranks.shape[1] + 2, 0.5 * ranks.shape[0] + 1.5))
    im = ax.imshow(ranks, cmap="viridis", aspect="auto")
    for (l, e), r in np.ndenumerate(ranks):
        ax.text(e, l, str(r), ha="center", va="center", color="white" if r < ranks.max() * 0.7 else "black", fontsize=8)
    ax.set(xlabel="expert", ylabel="layer", title=title)
    fig.colorbar(im, ax=ax, label="active rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def f_and_g(path, f, g, ranks):
    """Bars per layer: routing frequency f, rank importance g (both normalised per layer)."""
    f, g = np.array(f), np.array(g)
    L, E = f.shape
    fig, axes = plt.subplots(2, L, figsize=(3 * L, 4.5), squeeze=False, sharey="row")
    for l in range(L):
        axes[0, l].bar(range(E), f[l] / max(f[l].sum(), 1e-12), color="tab:blue")
        axes[1, l].bar(range(E), g[l] / max(g[l].sum(), 1e-12), color="tab:orange")
        axes[0, l].set_title(f"layer {l}")
        axes[1, l].set_xlabel("expert")
    axes[0, 0].set_ylabel("f_hat (routing)")
    axes[1, 0].set_ylabel("g_hat (importance)")
    fig.suptitle("routing frequency and rank importance per expert at the end")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_all(out_dir, history, drl) -> list[str]:
    files = []
    p = os.path.join(out_dir, "loss.png")
    loss_curves(p, history)
    files.append(p)
    p = os.path.join(out_dir, "ranks_over_time.png")
    if rank_heatmaps(p, history["events"], drl.cfg.r_init):
        files.append(p)
    p = os.path.join(out_dir, "ranks.png")
    final_ranks(p, drl.ranks.tolist(), f"final active ranks ({drl.cfg.method})")
    files.append(p)
    p = os.path.join(out_dir, "f_g.png")
    f_and_g(p, drl.f.tolist(), drl.expert_importance().tolist(), drl.ranks.tolist())
    files.append(p)
    return files
