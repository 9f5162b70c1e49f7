"""
The embedded default's base model: a tiny OLMoE-architecture MoE (3.5 M parameters,
8 experts top-2, byte tokens) pretrained here on the Python standard library's own
source, so that every machine can make it without a download. DR-LoRA then fine-tunes
it like a real pretrained MoE. train.py calls `ensure_tiny_base()`: the first run
pretrains (about 4 minutes on 2 CPU cores) and caches the model in the Hugging Face
layout; later runs load it. `python data/pretrain.py` does the same by hand.

It also checks whether the experts specialised: per layer, the total-variation
distance between the routing of code and of English prose (docstrings, comments),
next to the distance between two disjoint sets of code snippets as a baseline.
"""
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import hf

import moe
from data import common, stdlib

BASE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "tiny-olmoe")


@dataclass
class PretrainConfig:
    # fewer steps leave a base whose fine-tuned exact match swings with the thread count that made it (RESULTS.md)
    steps: int = 900
    batch_size: int = 16
    block_size: int = 256
    lr: float = 2e-3  # AdamW, warm-up then cosine to lr / 10
    warmup: int = 50
    weight_decay: float = 0.1
    aux_loss: float = 0.01  # load balancing: keeps every expert in use
    seed: int = 1337


def tiny_config() -> moe.MoEConfig:
    tok = hf.ByteTokenizer()
    return moe.MoEConfig(model_type="olmoe", vocab_size=tok.vocab_size, hidden_size=128, n_layer=4, n_head=4,
                         n_kv_head=4, n_experts=8, top_k=2, intermediate_size=256, qk_norm="full",
                         max_seq_len=256, pad_id=tok.pad_id, eos_id=tok.eos_id, tokenizer="byte")


def load_balancing_loss(routers: list[moe.RouterOut], n_experts: int, valid=None):
    """Switch-style auxiliary loss E * sum_e (share of slots to e) * (mean prob of e), averaged
    over layers; used to pretrain the tiny model, not during DR-LoRA fine-tuning."""
    total = 0.0
    for r in routers:
        probs = F.softmax(r.logits.float(), dim=-1)  # (N, E)
        slots = F.one_hot(r.ids, n_experts).sum(1).float()  # (N, E): 1 where the token went to e
        if valid is not None:
            probs, slots = probs[valid], slots[valid]
        total = total + n_experts * (slots.mean(0) / r.ids.shape[1] * probs.mean(0)).sum()
    return total / max(len(routers), 1)


@torch.no_grad()
def copy_loss(model, n: int = 32, length: int = 100, seed: int = 0) -> dict:
    """Loss (nats/byte) on random printable strings shown twice: a model that copies predicts the
    second showing far better than the first, which nothing predicts (ln 95 = 4.55)."""
    s = torch.randint(32, 127, (n, length), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([s, s], 1)
    nll = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return {"first": nll[:, :length - 1].mean().item(), "second": nll[:, length:].mean().item()}


@torch.no_grad()
def routing_by_kind(model, n: int = 16, length: int = 256, seed: int = 0) -> dict:
    """Per layer: routing distribution (share of top-k slots per expert) of code, prose, and a
    second, disjoint set of code; TV(code, prose) against the baseline TV(code, code')."""
    tok = hf.ByteTokenizer()
    texts = stdlib.kind_samples(2 * n, length, seed=seed)
    sets = {"code": texts["code"][:n], "code'": texts["code"][n:], "prose": texts["prose"][:n]}
    dist = {}
    for kind, snippets in sets.items():
        encoded = [tok.encode(s) for s in snippets]
        ids = torch.tensor([e[:length] for e in encoded if len(e) >= length])
        routers = model(ids).routers
        dist[kind] = [torch.bincount(r.ids.flatten(), minlength=model.cfg.n_experts).float() / r.ids.numel()
                      for r in routers]
    tv = lambda p, q: [0.5 * (a - b).abs().sum().item() for a, b in zip(p, q)]  # noqa: E731
    return {"tv_code_prose": tv(dist["code"], dist["prose"]), "tv_code_code": tv(dist["code"], dist["code'"]),
            "prose": [d.tolist() for d in dist["prose"]], "code": [d.tolist() for d in dist["code"]]}


def pretrain(out_dir: str = BASE_DIR, cfg: PretrainConfig | None = None, log=print) -> dict:
    cfg = cfg or PretrainConfig()
    torch.manual_seed(cfg.seed)
    corpus = stdlib.prepare() if not os.path.exists(stdlib.OUT_DIR / "manifest.json") else common.read_manifest(stdlib.OUT_DIR)
    train, val = stdlib.load_tokens(stdlib.OUT_DIR / "train.bin"), stdlib.load_tokens(stdlib.OUT_DIR / "val.bin")
    log(f"pretraining corpus: {corpus['files']} stdlib files, {corpus['bytes']:,} bytes, sha256 {corpus['sha256'][:12]}")
    model = moe.MoETransformer(tiny_config())
    model.init_weights(seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny MoE: {n_params / 1e6:.2f} M parameters, {model.cfg.n_experts} experts, top-{model.cfg.top_k}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()

    def val_loss(n_batches=8):
        model.eval()
        gv = torch.Generator().manual_seed(0)
        with torch.no_grad():
            losses = []
            for _ in range(n_batches):
                x, y = stdlib.get_batch(val, cfg.batch_size, cfg.block_size, gv)
                losses.append(model(x, targets=y).loss)
        model.train()
        return torch.stack(losses).mean().item()

    for step in range(cfg.steps):
        lr = cfg.lr * (step + 1) / cfg.warmup if step < cfg.warmup else \
            cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - cfg.warmup) / (cfg.steps - cfg.warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = stdlib.get_batch(train, cfg.batch_size, cfg.block_size, g)
        out = model(x, targets=y)
        loss = out.loss + cfg.aux_loss * load_balancing_loss(out.routers, model.cfg.n_experts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.steps - 1:
            dt = time.time() - t0
            tps = (step + 1) * cfg.batch_size * cfg.block_size / dt
            log(f"pretrain step {step:5d} | loss {out.loss.item():.3f} nats/byte | lr {lr:.1e} | {tps:,.0f} tok/s "
                f"| {dt:.0f}s, ETA {dt / (step + 1) * (cfg.steps - step - 1):.0f}s")
    model.eval()
    result = {"config": asdict(cfg), "val_loss": val_loss(), "seconds": time.time() - t0, "corpus": corpus}
    result["routing"] = routing_by_kind(model)
    result["copy_loss"] = copy_loss(model)
    tv, base = result["routing"]["tv_code_prose"], result["routing"]["tv_code_code"]
    log(f"pretraining done in {result['seconds']:.0f}s: val loss {result['val_loss']:.3f} nats/byte")
    log(f"copying: a repeated random string costs {result['copy_loss']['first']:.2f} nats/byte the first time, "
        f"{result['copy_loss']['second']:.2f} the second")
    log("expert specialisation, TV distance of routing per layer: code vs prose "
        f"{[round(v, 3) for v in tv]}, baseline code vs other code {[round(v, 3) for v in base]}")
    tmp = out_dir + ".tmp"
    hf.save_pretrained(model, tmp)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(result, f, indent=1)
    if os.path.exists(out_dir):  # replace a stale copy whole: never a half-written base model
        os.rename(out_dir, out_dir + ".old")
    os.rename(tmp, out_dir)
    if os.path.exists(out_dir + ".old"):
        shutil.rmtree(out_dir + ".old")
    return result


def ensure_tiny_base(path: str = BASE_DIR, log=print) -> str:
    """The cached tiny base model, pretraining it first if it is not there."""
    if not os.path.exists(os.path.join(path, "pretrain.json")):
        log(f"no tiny base model at {path}: pretraining it (once; later runs reuse it)")
        pretrain(path, log=log)
    return path


if __name__ == "__main__":
    pretrain()
