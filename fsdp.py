"""
DR-LoRA on an MoE that no single GPU holds, sharded by PyTorch's FSDP2 (fully_shard) over the processes of
a torchrun. This module decides what to shard, fills each process's shards from the checkpoint files and
gathers what files need; drlora.train_step runs on the sharded model unchanged.

    model, drl = fsdp.from_pretrained(path, init_device_mesh("cuda", (world,)), lora_cfg, steps, seed, dtype)
    optimizer = torch.optim.AdamW(drl.trainable_parameters(), ...)  # after sharding: it holds the shards
    trainable, optim_state = fsdp.gather(model, optimizer)          # ckpt.pt's, on process 0

- Units: each block (attention, router, experts and their LoRA), then the root (embedding, norm, head).
  Every tensor splits on dim 0, so a process holds whole experts (FSDP pads an uneven split: 6 experts on 4
  processes are 2, 2, 2, 0). FSDP2 gathers a unit's mixed dtypes as bytes and asks only that its trainable
  tensors share one dtype: they do (LoRA and router are fp32 over a bf16 base).
- Loading: built and sharded on the meta device; each process allocates its shards and reads only their rows
  (safetensors get_slice) through hf.read_weights, whose strict checks read the files' headers alone and so
  fail alike everywhere. The adapters are drawn in full, as on one process.
- Statistics: f is all-reduced as with DDP; g's per-slot sums come from sharded gradients, a row per expert
  held, and update_statistics gathers all E rows: every process decides alike. Ranks, f and g are plain
  tensors, the same everywhere (expert_importance and set_ranks work as they are).
- Files: gather() gives process 0 full tensors in a one-process run's layout (trainables by name, positions
  of optimizer.state_dict()): one ckpt.pt for any process count, FSDP or not; save_adapter() writes
  hf.save_adapter's file from them. drlora.merge refuses a sharded model (W[e] of a DTensor is a gathered
  copy): merge from the adapter file, as tools/export.py does.
"""
import dataclasses
import math
import sys
import types

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh  # noqa: F401 (train.py's)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

import drlora
import hf
import moe


def shard(model: moe.MoETransformer, mesh):
    for block in model.layers:  # the inner units first
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def from_pretrained(path: str, mesh, lora: drlora.DRLoRAConfig, total_steps: int, seed: int,
                    dtype=torch.float32):
    """(model sharded over mesh, drl): a checkpoint folder with DR-LoRA attached, its adapters those that
    torch.manual_seed(seed) then drlora.DRLoRA draw on one process."""
    cfg = hf.read_config(path)
    device = torch.device(mesh.device_type, torch.cuda.current_device() if mesh.device_type == "cuda" else None)
    with torch.device("meta"):
        model = moe.MoETransformer(cfg).to(dtype)
    # DRLoRA makes adapters and statistics on the experts' device, so it must see a real one: one-element
    # stand-ins (stride 0) serve while it runs, then back to meta, which fully_shard accepts and they are not
    model._apply(lambda t: torch.empty((), dtype=t.dtype, device=device).expand(t.shape))
    torch.manual_seed(seed)
    drl = drlora.DRLoRA(model, lora, total_steps)
    model._apply(lambda t: torch.empty_like(t, device="meta") if 0 in t.stride() else t)
    shard(model, mesh)
    for m in model.modules():  # the base: this process's shards, allocated, then read
        if any(t.is_meta for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]):
            m.to_empty(device=device, recurse=False)
    load_shards(model, path)
    return model, drl


def rows(t) -> tuple[int, int]:
    """The rows [a, b) of t's dim 0 this process holds: FSDP2 splits as torch.chunk does."""
    if not isinstance(t, DTensor):  # a buffer: not sharded
        return 0, len(t)
    assert t.placements == (Shard(0),), t.placements
    n, step = t.shape[0], -(-t.shape[0] // t.device_mesh.size())
    a = min(t.device_mesh.get_local_rank() * step, n)
    b = min(a + step, n)
    assert t.to_local().shape[0] == b - a, (t.shape, t.to_local().shape, a, b)
    return a, b


def load_shards(model: moe.MoETransformer, path: str) -> int:
    """Fill this process's rows of every base tensor from the checkpoint, reading no others; the bytes read."""
    params = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if ".lora." not in n}
    read = 0

    @torch.no_grad()
    def copy(name, e, cols, handle):  # hf.read_weights' callback: tensor `name`, or its expert e
        nonlocal read
        t = params[name]
        (a, b), local = rows(t), t.to_local() if isinstance(t, DTensor) else t
        if e is None and a < b:
            src = handle[a:b] if cols is None else handle[a:b, cols]
            local.copy_(src)
        elif e is not None and a <= e < b:
            src = handle[:]
            local[e - a].copy_(src)
        else:
            return
        read += src.numel() * src.element_size()

    hf.read_weights(path, hf._checkpoint_files(path), model.cfg, {n: t.shape for n, t in params.items()}, copy)
    return read


# -----------------------------------------------------------------------------
# files: gathered to process 0 in a one-process run's layout, put back on any process count

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _names(model, optimizer) -> list[str]:
    """The optimizer's parameters by name, in the positions of optimizer.state_dict()."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather(model, optimizer) -> tuple[dict, dict]:
    """(trainables by name, optimizer.state_dict()), full, on process 0's CPU; ({}, {}) elsewhere. Every
    process calls it; only the trainables and their AdamW moments are gathered."""
    names = _names(model, optimizer)
    sd = get_model_state_dict(model, options=dataclasses.replace(FULL, ignore_frozen_params=True))
    osd = get_optimizer_state_dict(model, optimizer, options=FULL)
    if dist.get_rank() != 0:
        return {}, {}
    at = {n: i for i, n in enumerate(names)}
    return {n: sd[n] for n in names}, {"state": {at[n]: s for n, s in osd["state"].items()}, "param_groups": [
        {**g, "params": [at[n] for n in g["params"]]} for g in osd["param_groups"]]}


def load(model, optimizer, trainable: dict, optim_state: dict):
    """Put back what gather() or a one-process run saved: every process passes it whole and keeps its rows."""
    names = _names(model, optimizer)
    if sorted(trainable) != sorted(names):
        raise ValueError(f"the checkpoint's trainables are not the model's: {set(trainable) ^ set(names)}")
    set_model_state_dict(model, trainable, options=StateDictOptions(full_state_dict=True, strict=False))
    osd = {"state": {names[i]: s for i, s in optim_state["state"].items()}, "param_groups": [
        {**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))
    # set_optimizer_state_dict first gives every parameter a state (a step at lr 0): one without a state in
    # the file (the router, frozen until the warm-up ends) must have none, or its first update is Adam's second
    for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        if i not in optim_state["state"]:
            optimizer.state.pop(p, None)


def save_adapter(model, drl: drlora.DRLoRA, trainable: dict, path: str):
    """hf.save_adapter's file from gather()'s tensors, written by process 0 (the others return)."""
    if dist.get_rank() != 0:
        return
    ns, targets = types.SimpleNamespace, drl.cfg.targets
    prefixes = [n for n, m in model.named_modules() if isinstance(m, moe.MoE)]
    layers = [ns(experts=ns(lora=ns(ranks=blk.experts.lora.ranks, r=blk.experts.lora.r,
                                    A={p: trainable[f"{pre}.experts.lora.A.{p}"] for p in targets},
                                    B={p: trainable[f"{pre}.experts.lora.B.{p}"] for p in targets})),
                 gate=ns(state_dict=lambda pre=pre, blk=blk: {n: trainable[f"{pre}.gate.{n}"]
                                                              for n, _ in blk.gate.named_parameters()}))
              for pre, blk in zip(prefixes, drl.blocks)]
    embed = model.embed_tokens.weight.to_local()  # base_identity reads rows 0..7: process 0 holds them
    assert len(embed) >= 8
    view = ns(cfg=model.cfg, moe_layers=lambda: layers, embed_tokens=ns(weight=embed))  # what it reads
    hf.save_adapter(view, path, drl.cfg)


# -----------------------------------------------------------------------------
# memory per process: held, and worked out from shapes and dtypes


def held(model) -> dict:
    """The bytes this process holds: its shards of the base and of the trainables."""
    out = {"base": 0, "trainable": 0}
    for p in model.parameters():
        out["trainable" if p.requires_grad else "base"] += p.to_local().numel() * p.element_size()
    return out


def share(model, lora: drlora.DRLoRAConfig, dtype) -> str:
    """What this process holds (held(), and AdamW's two moments for its trainables) and what it gathers at most
    (two blocks at once, as memory() works out), in GiB."""
    mine, most = held(model), 2 * memory(model.cfg, lora, dist.get_world_size(), dtype)["block_gathered"]
    return (f"base {mine['base'] / 2**30:.2f} GiB, trainable {mine['trainable'] / 2**30:.2f} GiB, AdamW "
            f"{2 * mine['trainable'] / 2**30:.2f} GiB, two blocks gathered {most / 2**30:.2f} GiB, activations aside")


def memory(cfg: moe.MoEConfig, lora: drlora.DRLoRAConfig, world: int, dtype=torch.bfloat16) -> dict:
    """Bytes per process: the shards of the base, of the trainables (fp32 LoRA and router), of their gradients
    and of AdamW's two moments; the root's tensors gathered (so from forward to backward) and the largest
    block's (FSDP prefetches the next: two at once); the trainables in full (drawn so at load; micro-batches
    accumulated without sync hold their gradients so). Activations are left out: they depend on the batch."""
    with torch.device("meta"):
        model = moe.MoETransformer(cfg)

    def tensors(unit):  # (shape, bytes per element, trainable)
        for n, p in unit.named_parameters():
            router = n.startswith("mlp.gate.") and not lora.freeze_router  # fp32 under DRLoRA
            if unit is not model or not n.startswith("layers."):
                yield p.shape, 4 if router else dtype.itemsize, router
        for p in lora.targets if getattr(unit, "is_moe", False) else ():
            E, d_out, d_in = getattr(unit.mlp.experts, p).shape
            yield from (((E, lora.r_max, d_in), 4, True), ((E, d_out, lora.r_max), 4, True))

    out = dict(base=0, trainable=0, root_gathered=0, block_gathered=0, trainable_full=0)
    for unit in [model, *model.layers]:
        full = 0
        for shape, size, trainable in tensors(unit):
            out["trainable" if trainable else "base"] += -(-shape[0] // world) * math.prod(shape[1:]) * size
            out["trainable_full"] += math.prod(shape) * size if trainable else 0
            full += math.prod(shape) * size
        key = "root_gathered" if unit is model else "block_gathered"
        out[key] = max(out[key], full)
    out["grads"], out["adamw"] = out["trainable"], 2 * out["trainable"]
    parts = ("base", "trainable", "grads", "adamw", "root_gathered", "block_gathered", "block_gathered")
    out["total"] = sum(out[k] for k in parts)
    return out


PLAN = {  # the published config.json's shapes
    "Qwen3-30B-A3B": moe.MoEConfig(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, n_layer=48,
                                   n_head=32, n_kv_head=4, head_dim=128, n_experts=128, top_k=8,
                                   intermediate_size=768, norm_topk_prob=True, qk_norm="head"),
    "Mixtral-8x7B": moe.MoEConfig(model_type="mixtral", vocab_size=32000, hidden_size=4096, n_layer=32,
                                  n_head=32, n_kv_head=8, n_experts=8, top_k=2, intermediate_size=14336,
                                  norm_topk_prob=True, qk_norm="none"),
}


def plan(worlds=(2, 4, 8), gpu_gib: float = 80) -> str:
    """memory() for PLAN's models, bf16, DR-LoRA at the paper's settings, as a markdown table in GiB."""
    lora = drlora.DRLoRAConfig()
    cols = ["base", "trainable", "grads", "adamw", "root_gathered", "block_gathered", "total", "trainable_full"]
    lines = [f"Per process, GiB, worked out by fsdp.memory, not measured: bf16 base; fp32 router and LoRA on "
             f"{' + '.join(lora.targets)} of every expert at r_max {lora.r_max}; AdamW. total = base + "
             f"trainable + grads + adamw + root + 2 blocks gathered, without activations.\n",
             "| model | GPUs | " + " | ".join(cols) + f" | {gpu_gib:g} less total |", "|---|" + "---:|" * 10]
    for name, cfg in PLAN.items():
        for w in worlds:
            m = {k: v / 2**30 for k, v in memory(cfg, lora, w).items()}
            lines.append(f"| {name} | {w} | " + " | ".join(f"{m[c]:.2f}" for c in cols)
                         + f" | {gpu_gib - m['total']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--plan"]:
        sys.exit("usage: python fsdp.py --plan   (memory per process for Qwen3-30B-A3B and Mixtral-8x7B)")
    print(plan())
