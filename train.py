"""
Fine-tune a pretrained MoE with DR-LoRA (or uniform LoRA). One flat loop, nanoGPT style.

    python train.py                                  # embedded default: tiny MoE, arithmetic, CPU
    python train.py --method lora                    # uniform LoRA at r_target, all else equal
    python train.py --model olmoe --task gsm8k       # OLMoE-1B-7B on one GPU, the paper's settings
    torchrun --nproc_per_node 4 train.py --model olmoe --task gsm8k    # data-parallel
    python train.py --resume                         # continue from out_dir/ckpt.pt
    python tools/evaluate.py --adapter out/adapter.safetensors         # score the saved adapter again

Every setting is a --flag: the loop's (TrainConfig) and the method's (drlora.DRLoRAConfig); --help shows
each one's reason, its paper default and its tiny value. `--preset tiny`, the default with `--model tiny`,
scales down the few that the embedded CPU run needs (PRESETS). The embedded run pretrains its base on first use.
"""
import argparse
import dataclasses
import datetime
import importlib
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import drlora
import evals
import hf
from data import common

# -----------------------------------------------------------------------------
# settings: the defaults are the paper's


@dataclass
class TrainConfig:
    model: str = "tiny"  # tiny (embedded, pretrained here) | olmoe | qwen2_moe | ... | a checkpoint folder
    preset: str = "auto"  # paper: these defaults | tiny: PRESETS["tiny"] over them | auto: tiny for the tiny model
    task: str = "arithmetic"  # data/<task>/ (data/<task>.py or tasks/<task>.py makes it) or a prepared folder
    out_dir: str = "out"  # ckpt.pt, adapter.safetensors, result.json
    steps: int = 3750  # optimizer steps T
    batch_size: int = 4  # samples per micro-batch and process
    grad_accum: int = 12  # micro-batches per optimizer step, over all processes together: 4 x 12 = 48 samples
    block_size: int = 2048  # longest sample in tokens (longer ones are truncated, with a warning)
    lr: float = 2e-5  # peak; linear warm-up until DR-LoRA's t_warm (where growth starts), then decay to 0
    weight_decay: float = 0.0  # >0 also shrinks the inactive A slots (harmless: B is 0 there)
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    seed: int = 1337  # LoRA init, data order, dropout
    eval_interval: int = 500  # optimizer steps between evaluations (and one before and one after training)
    eval_samples: int = 1319  # prompts decoded for the metric, and val samples for the loss (GSM8K's test: 1319)
    eval_split: str = "test"  # the split every evaluation's metric reads: val to choose settings, test to report
    max_new_tokens: int = 512  # generation length for the metric
    log_interval: int = 10  # optimizer steps between log lines
    eval_base: bool = True  # evaluate the base model before fine-tuning
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 base and autocast on CUDA, fp32 elsewhere) | float32 | bfloat16
    compile: bool = False  # torch.compile; each growth event changes the ranks and so recompiles
    grad_ckpt: bool = True  # gradient checkpointing per block: activations of one block at a time
    fsdp: bool = False  # under torchrun: shard the model over the processes (fsdp.py), not a replica each (DDP)
    ckpt_interval: int = 250  # steps between checkpoints (and one at the end), each written atomically
    resume: bool = False  # continue from out_dir/ckpt.pt, with the same settings
    lora: drlora.DRLoRAConfig = field(default_factory=drlora.DRLoRAConfig)  # the method's settings

    def __post_init__(self):  # each setting's range or choices, checked before anything is loaded
        for name in ("steps", "batch_size", "grad_accum", "block_size", "eval_interval", "eval_samples",
                     "max_new_tokens", "log_interval", "ckpt_interval"):
            drlora.check(getattr(self, name) >= 1, name, getattr(self, name), "at least 1")
        drlora.check(0 < self.lr < math.inf, "lr", self.lr, "positive and finite")
        for name in ("weight_decay", "grad_clip"):
            drlora.check(0 <= getattr(self, name) < math.inf, name, getattr(self, name), ">= 0 and finite")
        for name, allowed in (("preset", ("auto", "paper", "tiny")), ("eval_split", ("val", "test")),
                              ("dtype", ("auto", "float32", "bfloat16"))):
            drlora.check(getattr(self, name) in allowed, name, getattr(self, name), f"one of {', '.join(allowed)}")
        drlora.check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device), "device", self.device,
                     "auto, cpu, cuda, cuda:N or mps")
        drlora.check(not (self.fsdp and self.compile), "compile", self.compile, "off with --fsdp (not tested together)")


# The embedded run: the paper's method scaled down to a 3.5 M-parameter model and 2 CPU cores, each value
# chosen on the validation split (RESULTS.md, "Choosing the embedded default").
PRESETS = {"paper": {}, "tiny": dict(
    steps=1500,  # accuracy still climbs (7-12 % at step 500, 42-70 % at 1000); 2500 do better but not in 5 minutes
    batch_size=16,  # 16 x 256 bytes a step; 3000 steps of 8 learn no better, 1.6x slower per sample
    grad_accum=1,  # the step fits at once: nothing to accumulate
    block_size=256,  # an arithmetic problem with its answer is about 130 bytes
    lr=2e-3,  # a tiny model from a short pretraining takes 100x the paper's lr; 4e-3 did worse
    eval_interval=250,
    eval_samples=500,  # the whole split: SE about 2 points at 80 % exact match
    max_new_tokens=24,  # the answer " 3 + 5 = 8\n#### 8" is under 20 bytes
    log_interval=50,
    ckpt_interval=250,
    grad_ckpt=False,  # a 3.5 M model's activations fit anywhere: recomputing them would only cost time
    r_init=4,  # half of r_target, as the paper's 8 of 16
    r_target=8,  # where rank binds: uniform LoRA r=4 / 8 / 16 reach 57 / 83 / 94 % on validation
    r_max=16,  # twice r_target, as the paper's 32 for 16
    dT=100,  # 14 events (t_warm 45, the last at 1345), quota 3 < 8 experts x cap 1: saliency decides who grows
    dropout=0.0,  # its masks cost more than the rest of a tiny CPU step, and train loss stays at held-out loss
)}
# settings that may change when resuming: what is evaluated and logged, where, and how (not what) is computed
RESUMABLE = {"resume", "eval_interval", "log_interval", "ckpt_interval", "eval_samples", "eval_split", "eval_base",
             "max_new_tokens", "out_dir", "device", "compile", "grad_ckpt", "fsdp", "preset"}


def flat(cfg: TrainConfig) -> dict:
    """Every setting by its flag name: the loop's and the method's in one dict."""
    d = asdict(cfg)
    return {**d.pop("lora"), **d}


def comments(cls) -> dict[str, str]:
    """Each field's comment in its dataclass's source: the reason --help shows beside the default."""
    return {m[1]: m[2] for m in re.finditer(r"^    (\w+): .*?  # (.*)$", inspect.getsource(cls), re.MULTILINE)}


def boolean(s: str) -> bool:
    if s.lower() not in ("true", "1", "false", "0"):
        raise ValueError(s)
    return s.lower() in ("true", "1")


def parse_args(argv=None) -> TrainConfig:
    lora_fields = dataclasses.fields(drlora.DRLoRAConfig)
    why = {**comments(TrainConfig), **comments(drlora.DRLoRAConfig)}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in [f for f in dataclasses.fields(TrainConfig) if f.name != "lora"] + list(lora_fields):
        tiny = f"; tiny {PRESETS['tiny'][f.name]}" if f.name in PRESETS["tiny"] else ""
        kind = {bool: boolean, tuple: lambda s: tuple(s.split(","))}.get(type(f.default), type(f.default))
        note = why.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        p.add_argument("--" + f.name, type=kind, default=None, help=f"{note} (default {f.default}{tiny})",
                       **({"nargs": "?", "const": True} if type(f.default) is bool else {}))
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}  # unknown flags: argparse exits
    preset = given.pop("preset", "auto")
    if preset == "auto":
        preset = "tiny" if given.get("model", "tiny") == "tiny" else "paper"
    values = {**PRESETS.get(preset, {}), **given}
    names = {f.name for f in lora_fields}
    lora = drlora.DRLoRAConfig(**{k: v for k, v in values.items() if k in names})
    return TrainConfig(preset=preset, lora=lora, **{k: v for k, v in values.items() if k not in names})


def get_lr(t: int, lr: float, t_warm: int, steps: int) -> float:
    """Linear warm-up until t_warm (DR-LoRA's schedule: where growth starts), then linear decay to 0."""
    if t < t_warm:
        return lr * (t + 1) / t_warm
    return lr * (steps - t) / (steps - t_warm)


# -----------------------------------------------------------------------------
# checkpoints, evaluation, the processes' agreement


def read_checkpoint(path: str, cfg: TrainConfig) -> dict:
    """ckpt.pt, checked against the settings before anything heavy is loaded."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # every process reads it
        saved = json.loads(json.dumps(state["config"]))  # tuples as lists, as in `now`
    except Exception as e:  # truncated, not a checkpoint, or a checkpoint of something else
        raise ValueError(f"--resume: {path} cannot be read as a drlora checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else e!r}); start over without --resume, or point "
                         f"--out_dir elsewhere") from e
    saved = {**saved.pop("lora"), **saved}
    now = json.loads(json.dumps(flat(cfg)))  # tuples as lists, as in the file
    diff = {k: (saved.get(k), now.get(k)) for k in saved.keys() | now.keys()
            if k not in RESUMABLE and saved.get(k) != now.get(k)}
    if diff:
        raise ValueError(f"--resume with settings that differ from {path} (checkpoint, now): {diff}")
    return state


def resume(state: dict, model, drl, optimizer, rank: int, world: int, log, fsdp=None) -> tuple[int, int, dict]:
    """Restore the trainable tensors and the optimizer (each process its shards, with fsdp), DR-LoRA's state and
    each process's random stream. Returns (first step, samples consumed, history)."""
    if fsdp:
        fsdp.load(model, optimizer, state["trainable"], state["optimizer"])
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in state["trainable"].items():
                params[name].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
    drl.load_state_dict(state["drlora"])
    if len(state["rng"]) == world:  # each process continues its own random stream (LoRA dropout)
        rng = state["rng"][rank]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # the data stream is the same (pos counts samples over all processes); only dropout masks change
        log(f"resuming {len(state['rng'])} processes' run with {world}: dropout masks are drawn afresh")
        torch.manual_seed(state["config"]["seed"] + 1000 * state["step"] + rank)
    return state["step"], state["pos"], state["history"]


def save_checkpoint(out_dir: str, state: dict, model, optimizer, drl, device: str, world: int, fsdp=None):
    """ckpt.pt (what a resume needs, in one layout for any number of processes) and adapter.safetensors (what
    a user keeps), each written atomically by process 0: a kill leaves the old file or the new one, never half
    of one. Every process calls it: it gathers their random states and, with fsdp, the shards."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.startswith("cuda") else None}
    every = [rng]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, rng)
    adapter = os.path.join(out_dir, "adapter.safetensors")
    if fsdp:
        trainable, optim = fsdp.gather(model, optimizer)
        fsdp.save_adapter(model, drl, trainable, adapter)
    if world > 1 and dist.get_rank():
        return
    if not fsdp:
        trainable, optim = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, \
            optimizer.state_dict()
        hf.save_adapter(model, adapter, drl.cfg)
    path = os.path.join(out_dir, "ckpt.pt")
    torch.save({**state, "rng": every, "trainable": trainable, "optimizer": optim}, path + ".tmp")
    os.replace(path + ".tmp", path)


def evaluate(what: str, step: int, evaluation: dict, here: bool, waiting_room, examples: int = 0):
    """evals.evaluate where `here` ({"step", "val_loss", "metric", "score", ...}; None elsewhere): on process 0
    while the others wait in the waiting room (DDP), or on every process (FSDP: each forward needs them all)."""
    result = {"step": step, **evals.evaluate(what, **evaluation, examples=examples)} if here else None
    if waiting_room is not None:
        dist.barrier(group=waiting_room)
    return result


def check_replicas(drl, world: int, log):
    """Every process must hold the same ranks (the buffer, and the python mirror the forward slices by), f, g,
    adapters and router (a checksum of the active slots, gathered whole under FSDP)."""

    def whole(t):  # an FSDP shard gathered (every process takes part); a plain tensor as it is
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    total = torch.zeros((), dtype=torch.float64, device=drl.f.device)
    for lora in (blk.experts.lora for blk in drl.blocks):
        for A, B in ((whole(lora.A[p]), whole(lora.B[p])) for p in drl.cfg.targets):
            total += sum(A[e, :r].double().sum() + B[e, :, :r].double().sum() for e, r in enumerate(lora.r))
    total += sum(whole(p).double().sum() for p in drl.router_parameters())
    mirror = torch.tensor([blk.experts.lora.r for blk in drl.blocks], device=drl.f.device)
    mine = torch.cat([total.view(1), drl.ranks.flatten().double(), mirror.flatten().double(), drl.f.flatten().double(),
                      *(g.flatten().double() for g in drl.g.values())])
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if not all(torch.equal(c, mine) for c in every):
        raise RuntimeError(f"processes disagree after training (checksum, ranks, ...): "
                           f"{[c[:8].tolist() for c in every]}")
    log(f"all {world} processes hold identical adapters, ranks, routers, f and g")


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    cfg = parse_args(argv)
    lcfg = cfg.lora
    state = read_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), cfg) if cfg.resume else None
    fsdp = importlib.import_module("fsdp") if cfg.fsdp else None  # the sharded path: a module of its own
    # -------------------------------------------------------------------------
    # processes and device
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    rank, world, waiting_room = 0, 1, None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        if not fsdp:  # process 0 evaluates alone: the others wait here, where no timeout can stop them
            waiting_room = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    elif fsdp:
        raise ValueError("--fsdp shards the model over the processes of a torchrun: torchrun --nproc_per_node N ...")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if cfg.grad_accum % world:
        raise ValueError(f"--grad_accum {cfg.grad_accum} is the total over processes: it must divide by {world}")
    accum = cfg.grad_accum // world
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.startswith("cuda"))
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    os.makedirs(cfg.out_dir, exist_ok=True)
    # -------------------------------------------------------------------------
    # base model and DR-LoRA, tokenizer, data
    if cfg.model == "tiny":
        from data import pretrain  # making the embedded base is a program of its own, run once when it is missing

        if master:
            pretrain.ensure_tiny_base(log=log)
        path = pretrain.BASE_DIR
    else:
        path = hf.find_checkpoint(cfg.model)
        if device == "cpu":
            log(f"warning: {cfg.model} on the CPU: a step of a real model takes minutes or more; use a GPU")
    folder = common.task_folder(cfg.task, make=master and cfg.model == "tiny")
    if world > 1:
        dist.barrier()  # process 0 made what was missing
    # seeded here, after any pretraining: the same LoRA init on every process and in every run
    if fsdp:  # built on the meta device, each process reads only its shards of the base
        mesh = fsdp.init_device_mesh(device.split(":")[0], (world,))
        model, drl = fsdp.from_pretrained(path, mesh, lcfg, cfg.steps, cfg.seed, dtype)
    else:
        model = hf.from_pretrained(path, dtype=dtype, device=device)
        torch.manual_seed(cfg.seed)
        drl = drlora.DRLoRA(model, lcfg, total_steps=cfg.steps)
    if rank:  # LoRA dropout: each process its own masks (process 0 keeps the stream of a one-process run)
        torch.manual_seed(cfg.seed + rank)
    model.gradient_checkpointing = cfg.grad_ckpt
    tokenizer = hf.load_tokenizer(path, model.cfg)
    task = common.load_task(folder, tokenizer, cfg.eval_split)
    block_size = min(cfg.block_size, model.cfg.max_seq_len)
    if block_size < cfg.block_size:
        log(f"warning: block_size {cfg.block_size} > the model's {block_size} positions: using {block_size}")
    E, K = model.cfg.n_experts, model.cfg.top_k
    n_total = sum(p.numel() for n, p in model.named_parameters() if ".lora." not in n)
    n_idle = 3 * model.cfg.intermediate_size * model.cfg.hidden_size * (E - K) * len(model.moe_layers())  # a token's
    log(f"base model {path}: {model.cfg.model_type}, {n_total / 1e6:.1f} M parameters, "
        f"{(n_total - n_idle) / 1e6:.1f} M active per token, {E} experts top-{K}, dtype {dtype}")
    log(f"task {cfg.task}: {len(task.train):,} train / {len(task.val):,} val / {len(task.test):,} {task.split} samples")
    log(f"DR-LoRA {lcfg.method}: ranks {lcfg.r_init} -> {lcfg.r_target} (max {lcfg.r_max}); warm-up ends at step "
        f"{drl.t_warm}; {len(drl.events)} growth events {drl.events[:3]}{'...' if len(drl.events) > 3 else ''}, "
        f"quota {drl.quota}, cap {drl.cap}; trainable {sum(p.numel() for p in drl.trainable_parameters()) / 1e6:.2f} M"
        f" (allocated LoRA {sum(p.numel() for p in drl.lora_parameters()) / 1e6:.2f} M, active now "
        f"{drl.active_lora_parameters() / 1e6:.3f} M, at the end "
        f"{drl.active_lora_parameters() * lcfg.r_target / lcfg.r_init / 1e6:.3f} M)")
    log(f"{cfg.batch_size} samples x {accum} micro-batches x {world} processes = "
        f"{cfg.batch_size * cfg.grad_accum} samples per step")
    if fsdp:  # every process its own share: uneven when the experts do not divide by the processes
        print(f"process {rank}: {fsdp.share(model, lcfg, dtype)}", flush=True)
    # -------------------------------------------------------------------------
    # the optimizer, resume
    optimizer = torch.optim.AdamW(drl.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999))
    run = DDP(model, device_ids=[device] if device.startswith("cuda") else None) if world > 1 and not fsdp else model
    if cfg.compile:
        if not bf16:  # torch.compile traces grouped_mm for bf16 inputs only
            model.set_grouped(False)
            log("--compile without bf16: the experts run as the per-expert loop")
        run = torch.compile(run)  # recompiles after each growth event: the ranks are python ints
    start, pos, history = 0, 0, {"step": [], "loss": [], "lr": [], "eval": [], "events": []}
    if state is not None:
        start, pos, history = resume(state, model, drl, optimizer, rank, world, log, fsdp)
        log(f"resumed from {cfg.out_dir}/ckpt.pt at step {start}")
    evaluation = dict(model=model, tokenizer=tokenizer, task=task, n=cfg.eval_samples, block_size=block_size,
                      max_new_tokens=cfg.max_new_tokens, autocast=autocast, log=log)
    if start == 0 and cfg.eval_base:  # LoRA's B is zero: this is the base model
        history["base"] = evaluate("eval step 0", 0, evaluation, master or cfg.fsdp, waiting_room, examples=2)
    # -------------------------------------------------------------------------
    # the loop
    t0, tokens_seen = time.time(), 0
    model.train()
    for t in range(start, cfg.steps):
        lr = get_lr(t, cfg.lr, drl.t_warm, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = []
        for m in range(accum):  # this process's micro-batches, cut from one stream of samples for all processes
            first = pos + (m * world + rank) * cfg.batch_size
            idx = common.batch_indices(first, cfg.batch_size, len(task.train), cfg.seed)
            micro.append([a.to(device) for a in common.sft_batch(task.train, idx, block_size, tokenizer.pad_id)])
            tokens_seen += int(micro[-1][2].sum())
        loss, event = drlora.train_step(run, drl, optimizer, micro, t, cfg.grad_clip, autocast)
        pos += cfg.batch_size * accum * world
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        history["step"].append(t)
        history["loss"].append(loss.item())
        history["lr"].append(lr)
        if event:
            history["events"].append({"step": t, "ranks": event["ranks"], "f": drl.f.tolist()})
            log(f"growth event at step {t}: +{[sum(g) for g in event['grown']]} ranks per layer, now "
                f"{[sum(r) for r in event['ranks']]} (target {E * lcfg.r_target} each); layer 0 {event['ranks'][0]}")
        if t % cfg.log_interval == 0 or t == cfg.steps - 1:
            dt = time.time() - t0
            log(f"step {t:5d}/{cfg.steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                f"{tokens_seen * world / dt:,.0f} tok/s | ETA {dt / (t - start + 1) * (cfg.steps - t - 1):.0f}s")
        if t > 0 and t % cfg.eval_interval == 0 and t != cfg.steps - 1:
            history["eval"].append(evaluate(f"eval step {t}", t, evaluation, master or cfg.fsdp, waiting_room))
        if (t + 1) % cfg.ckpt_interval == 0 or t == cfg.steps - 1:
            save_checkpoint(cfg.out_dir, {"config": asdict(cfg), "base": path, "step": t + 1, "pos": pos,
                                          "history": history, "drlora": drl.state_dict()},
                            model, optimizer, drl, device, world, fsdp)
    # -------------------------------------------------------------------------
    # the end: replicas agree, final evaluation, record
    if world > 1:
        check_replicas(drl, world, log)
    history["final"] = evaluate(f"eval step {cfg.steps}", cfg.steps, evaluation, master or cfg.fsdp, None, examples=3)
    result = evals.record(cfg, history, drl, time.time() - t0, path, device, log) if master else {}
    if world > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: a clear message, no traceback
        sys.exit(f"error: {e}")
