"""
DR-LoRA on an MoE that no single GPU holds: PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard) shards it
over the processes of a torchrun; this module decides what to shard, fills each process's shards from the
checkpoint files, and gathers what files need. drlora.train_step runs on the sharded model unchanged.

    mesh = init_device_mesh("cuda", (world,))
    model, drl = fsdp.from_pretrained(path, mesh, lora_cfg, total_steps, seed, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(drl.trainable_parameters(), ...)    # after sharding: it holds shards
    loss, event = drlora.train_step(model, drl, optimizer, micro_batches, t)
    trainable, optim_state = fsdp.gather(model, optimizer)            # process 0: ckpt.pt as one process writes
    fsdp.save_adapter(model, drl, trainable, "adapter.safetensors")

- Units: one per transformer block (attention, router, experts and their LoRA together), then the root
  (embedding, final norm, head). Every tensor is split on dim 0, so a process holds whole experts, E / world
  of them in each layer (FSDP pads an uneven split: 6 experts on 4 processes are 2, 2, 2, 0). Frozen bf16
  weights and fp32 trainables share a unit: FSDP2 all-gathers mixed dtypes as bytes, and asks only that a
  unit's trainable tensors share one dtype (LoRA and router are fp32).
- Loading: the model is built on the meta device and sharded there; each process then allocates its shards
  and reads only their rows from the files (safetensors get_slice), through hf.read_weights, as strict as
  hf.from_pretrained and with the same message on every process (its checks read the files' headers alone).
  DRLoRA creates its adapters in full beside the experts, drawn as on one process after the same seed;
  fully_shard keeps this process's rows of them.
- Statistics: f is all-reduced, as with DDP; g's per-slot sums come from sharded gradients, one row per
  expert a process holds, and drlora's update_statistics gathers the E rows, so every process decides alike.
- Files: gather() returns full CPU tensors on process 0 in a one-process run's layout (trainable tensors by
  name, optimizer.state_dict()'s positional layout), so one ckpt.pt serves any process count, FSDP or not.
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
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

import drlora
import hf
import moe


def shard(model: moe.MoETransformer, mesh):
    """fully_shard each block, then the root (FSDP2 wants the inner units first)."""
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def from_pretrained(path: str, mesh, lora: drlora.DRLoRAConfig, total_steps: int, seed: int,
                    dtype=torch.float32):
    """A checkpoint folder, sharded over mesh, with DR-LoRA attached: (model, drl). LoRA starts as
    torch.manual_seed(seed) + drlora.DRLoRA start it on one process."""
    cfg = hf.read_config(path)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else \
        torch.device(mesh.device_type)
    with torch.device("meta"):
        model = moe.MoETransformer(cfg).to(dtype)
    # DRLoRA creates adapters and statistics on the experts' device, so it must see a real one: one-element
    # stand-ins (stride 0) serve while it runs; then back to meta, which fully_shard accepts and they are not
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
    """The rows [a, b) of dim 0 this process holds of t: FSDP2 splits as torch.chunk does."""
    if not isinstance(t, DTensor):  # a buffer: not sharded
        return 0, len(t)
    assert t.placements == (Shard(0),), t.placements
    n, step = t.shape[0], -(-t.shape[0] // t.device_mesh.size())
    a = min(t.device_mesh.get_local_rank() * step, n)
    b = min(a + step, n)
    assert t.to_local().shape[0] == b - a, (t.shape, t.to_local().shape, a, b)
    return a, b


def load_shards(model: moe.MoETransformer, path: str) -> int:
    """Fill this process's rows of every base tensor from the checkpoint, reading no others.
    Returns the bytes read."""
    params = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if ".lora." not in n}
    read = 0

    @torch.no_grad()
    def copy(name, e, cols, handle):
        nonlocal read
        t = params[name]
        (a, b), local = rows(t), t.to_local() if isinstance(t, DTensor) else t
        if e is None and a < b:
            src = handle[a:b] if cols is None else handle[a:b, cols]
            local.copy_(src)
        elif e is not None and a <= e < b:
            src = handle[:]
            local[e - a].copy_(src)
        else:  # rows this process does not hold
            return
        read += src.numel() * src.element_size()

    hf.read_weights(path, hf._checkpoint_files(path), model.cfg, {n: t.shape for n, t in params.items()}, copy)
    return read


# -----------------------------------------------------------------------------
# files: gathered to process 0 in a one-process run's layout, and put back for any process count


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _names(model, optimizer) -> list[str]:
    """The optimizer's parameters by name, in its order (the positions of optimizer.state_dict())."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather(model, optimizer) -> tuple[dict, dict]:
    """(trainable tensors by name, optimizer.state_dict() layout), full, on the CPU of process 0; ({}, {})
    elsewhere. Every process must call it: it all-gathers the trainables and their AdamW moments only."""
    names = _names(model, optimizer)
    sd = get_model_state_dict(model, options=dataclasses.replace(FULL, ignore_frozen_params=True))
    osd = get_optimizer_state_dict(model, optimizer, options=FULL)
    if dist.get_rank() != 0:
        return {}, {}
    at = {n: i for i, n in enumerate(names)}
    return {n: sd[n] for n in names}, {"state": {at[n]: s for n, s in osd["state"].items()},
                                       "param_groups": [{**g, "params": [at[n] for n in g["params"]]}
                                                        for g in osd["param_groups"]]}


def load(model, optimizer, trainable: dict, optim_state: dict):
    """Put back what gather() (or a one-process run) saved: every process passes the full tensors and keeps
    its rows."""
    names = _names(model, optimizer)
    if sorted(trainable) != sorted(names):
        raise ValueError(f"checkpoint's trainable tensors differ from the model's: {sorted(set(trainable) ^ set(names))}")
    set_model_state_dict(model, trainable, options=StateDictOptions(full_state_dict=True, strict=False))
    osd = {"state": {names[i]: s for i, s in optim_state["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))
    # set_optimizer_state_dict first gives every parameter a state (a step at lr 0): one without a state in the
    # file (the router, frozen until the warm-up ends) must have none, or its first update would be Adam's second
    for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        if i not in optim_state["state"]:
            optimizer.state.pop(p, None)


def save_adapter(model, drl: drlora.DRLoRA, trainable: dict, path: str):
    """drlora.save_adapter's file, written by process 0 from gather()'s tensors (the others return)."""
    if dist.get_rank() != 0:
        return
    ns = types.SimpleNamespace
    prefixes = [n for n, m in model.named_modules() if isinstance(m, moe.MoE)]
    layers = [ns(experts=ns(lora=ns(ranks=blk.experts.lora.ranks, r=blk.experts.lora.r,
                                    A={p: trainable[f"{pre}.experts.lora.A.{p}"] for p in drl.cfg.targets},
                                    B={p: trainable[f"{pre}.experts.lora.B.{p}"] for p in drl.cfg.targets})),
                 gate=ns(state_dict=lambda pre=pre, blk=blk: {n: trainable[f"{pre}.gate.{n}"]
                                                              for n, _ in blk.gate.named_parameters()}))
              for pre, blk in zip(prefixes, drl.blocks)]
    embed = model.embed_tokens.weight.to_local()  # base_identity reads rows 0..7: process 0 holds them
    assert len(embed) >= 8
    drlora.save_adapter(ns(cfg=model.cfg, moe_layers=lambda: layers, embed_tokens=ns(weight=embed)), path, drl.cfg)


@torch.no_grad()
def check_replicas(drl: drlora.DRLoRA):
    """At the end of a run: every process holds the same ranks (buffer and python mirror), f, g and gathered
    adapter (a checksum of its active slots and the router). Raises if not; every process must call it."""
    total = torch.zeros((), dtype=torch.float64, device=drl.f.device)
    for blk in drl.blocks:
        lora = blk.experts.lora
        for p in drl.cfg.targets:
            A, B = lora.A[p].full_tensor(), lora.B[p].full_tensor()
            total += sum(A[e, :r].double().sum() + B[e, :, :r].double().sum() for e, r in enumerate(lora.r))
    for p in drl.router_parameters():
        total += p.full_tensor().double().sum()
    mirror = torch.tensor([blk.experts.lora.r for blk in drl.blocks], device=drl.f.device)
    check = torch.cat([total.view(1), drl.ranks.flatten().double(), mirror.flatten().double(),
                       drl.f.flatten().double(), *(g.flatten().double() for g in drl.g.values())])
    every = [torch.zeros_like(check) for _ in range(dist.get_world_size())]
    dist.all_gather(every, check)
    if not all(torch.equal(c, check) for c in every):
        raise RuntimeError(f"processes disagree after training (checksum, ranks, ...): {[c[:8].tolist() for c in every]}")


# -----------------------------------------------------------------------------
# memory per process, worked out from shapes and dtypes


def memory(cfg: moe.MoEConfig, lora: drlora.DRLoRAConfig, world: int, dtype=torch.bfloat16) -> dict:
    """Bytes per process: the shards of the base, of the trainables (LoRA and router, fp32), of their gradients
    and AdamW's two moments; the root's gathered tensors (kept from forward to backward) and the largest
    block's (FSDP prefetches the next block: two at a time); the adapters DRLoRA creates in full at load.
    Activations are not counted: they depend on the batch, and gradient checkpointing keeps one block's."""
    with torch.device("meta"):
        model = moe.MoETransformer(cfg)
    fp32 = 4

    def tensors(unit):  # (shape, bytes per element, trainable)
        for n, p in unit.named_parameters():
            router = n.startswith("mlp.gate.")  # a block's router: fp32 under DRLoRA
            yield p.shape, fp32 if router else dtype.itemsize, router and not lora.freeze_router
        if isinstance(unit, moe.Block) and unit.is_moe:
            for p in lora.targets:
                E, d_out, d_in = getattr(unit.mlp.experts, p).shape
                yield (E, lora.r_max, d_in), fp32, True
                yield (E, d_out, lora.r_max), fp32, True

    out = dict(base=0, trainable=0, root_gathered=0, block_gathered=0, adapters_at_load=0)
    root = types.SimpleNamespace(named_parameters=lambda: ((n, p) for n, p in model.named_parameters()
                                                           if not n.startswith("layers.")))
    for unit in [root, *model.layers]:
        full = 0
        for shape, size, trainable in tensors(unit):
            out["trainable" if trainable else "base"] += -(-shape[0] // world) * math.prod(shape[1:]) * size
            full += math.prod(shape) * size
            out["adapters_at_load"] += math.prod(shape) * size if trainable and len(shape) == 3 else 0
        key = "root_gathered" if unit is root else "block_gathered"
        out[key] = max(out[key], full)
    out["grads"], out["adamw"] = out["trainable"], 2 * out["trainable"]
    out["total"] = sum(out[k] for k in ("base", "trainable", "grads", "adamw", "root_gathered")) + \
        2 * out["block_gathered"]
    return out


PLAN = {  # the published config.json's shapes
    "Qwen3-30B-A3B": moe.MoEConfig(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, n_layer=48, n_head=32,
                                   n_kv_head=4, head_dim=128, n_experts=128, top_k=8, intermediate_size=768,
                                   norm_topk_prob=True, qk_norm="head"),
    "Mixtral-8x7B": moe.MoEConfig(model_type="mixtral", vocab_size=32000, hidden_size=4096, n_layer=32, n_head=32,
                                  n_kv_head=8, n_experts=8, top_k=2, intermediate_size=14336, norm_topk_prob=True,
                                  qk_norm="none"),
}


def plan(worlds=(2, 4, 8), gpu_gib: float = 80) -> str:
    """memory() as a markdown table for PLAN's models, bf16 base, DR-LoRA at the paper's settings."""
    lora, gib = drlora.DRLoRAConfig(), 2**30
    cols = ["base", "trainable", "grads", "adamw", "root_gathered", "block_gathered", "total"]
    lines = [f"Per process, GiB, worked out from shapes and dtypes (fsdp.memory), not measured: bf16 base, fp32 "
             f"LoRA (r_max {lora.r_max}, {' + '.join(lora.targets)}, every expert) and router, AdamW. total = "
             f"base + trainable + grads + adamw + root + 2 blocks gathered; activations not counted.\n",
             "| model | GPUs | " + " | ".join(cols) + f" | left of {gpu_gib:g} GiB | adapters at load |",
             "|---|---:|" + "---:|" * (len(cols) + 2)]
    for name, cfg in PLAN.items():
        for w in worlds:
            m = memory(cfg, lora, w)
            lines.append(f"| {name} | {w} | " + " | ".join(f"{m[c] / gib:.2f}" for c in cols) +
                         f" | {gpu_gib - m['total'] / gib:.1f} | {m['adapters_at_load'] / gib:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--plan"]:
        sys.exit("usage: python fsdp.py --plan   (per-process memory for Qwen3-30B-A3B and Mixtral-8x7B)")
    print(plan())
