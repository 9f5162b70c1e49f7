"""
Fine-tune a pretrained MoE with DR-LoRA (or uniform LoRA). One flat loop, nanoGPT style.

    python train.py                                  # embedded default: tiny MoE, arithmetic, CPU
    python train.py --method lora                    # uniform LoRA at r_target, all else equal
    python train.py --model olmoe --task gsm8k       # OLMoE-1B-7B on one GPU, the paper's settings
    torchrun --nproc_per_node 4 train.py --model olmoe --task gsm8k    # data-parallel
    python train.py --resume                         # continue from out_dir/ckpt.pt

Every setting is a --flag: the loop's (TrainConfig) and the method's (drlora.DRLoRAConfig). Their
defaults are the paper's. `--preset tiny`, the default with `--model tiny`, scales down the few that
the embedded CPU run needs (PRESETS). The embedded run pretrains its tiny base on first use.
"""
import argparse
import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import drlora
import evals
import hf
import moe
from data import common

# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    model: str = "tiny"  # "tiny" (embedded, pretrained here) | olmoe | qwen2_moe | ... | a checkpoint folder
    preset: str = "auto"  # "paper": the defaults below | "tiny": PRESETS["tiny"] over them | auto: tiny for tiny
    task: str = "arithmetic"  # data/<task>/{train,val,test}.npz (data/<task>.py, tasks/<task>.py), or a folder
    out_dir: str = "out"
    adapter: str = ""  # evaluate this saved adapter (safetensors) on the base model, then exit
    # optimisation: 3,750 steps of 48 samples at lr 2e-5 (the paper)
    steps: int = 3750  # optimizer steps T
    batch_size: int = 4  # samples per micro-batch and process
    grad_accum: int = 12  # micro-batches per optimizer step, over all processes together
    block_size: int = 2048  # longest sample in tokens (longer ones are truncated, with a warning)
    lr: float = 2e-5  # peak; linear warm-up over lora.warmup_frac of the steps (growth waits for it), then decay to 0
    weight_decay: float = 0.0  # >0 also shrinks the inactive A slots (harmless: B is 0 there)
    grad_clip: float = 1.0  # 0 = off
    seed: int = 1337
    # evaluation and logging
    eval_interval: int = 500
    eval_samples: int = 1319  # prompts decoded for the metric, and val samples for the loss
    eval_split: str = "test"  # where the metric is read: choose settings on "val", read "test" once at the end
    max_new_tokens: int = 512
    log_interval: int = 10
    eval_base: bool = True  # evaluate the base model before fine-tuning
    # system
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 base and autocast on CUDA, fp32 elsewhere) | float32 | bfloat16
    compile: bool = False  # torch.compile; each growth event changes the ranks and so recompiles
    grad_ckpt: bool = True  # gradient checkpointing per block
    ckpt_interval: int = 250  # also at the end; written atomically
    resume: bool = False
    exit_at_step: int = -1  # testing: die (os._exit) right after this step, as a kill would
    lora: drlora.DRLoRAConfig = field(default_factory=drlora.DRLoRAConfig)  # the method's settings


# The embedded run: the paper's method, scaled down to a 3.5 M-parameter model and 2 CPU cores. LoRA
# dropout is off because its random masks cost more than the rest of a tiny CPU step, and this run
# does not overfit (train loss stays at held-out loss).
PRESETS = {"paper": {}, "tiny": dict(steps=1500, batch_size=16, grad_accum=1, block_size=256, lr=2e-3,
                                     eval_interval=250, eval_samples=500, max_new_tokens=24, log_interval=50,
                                     ckpt_interval=250, grad_ckpt=False, r_init=4, r_target=8, r_max=16, dT=100,
                                     dropout=0.0)}
# settings that may change when resuming
RESUMABLE = {"resume", "exit_at_step", "eval_interval", "log_interval", "ckpt_interval", "compile",
             "eval_samples", "device", "eval_base", "eval_split"}


def flat(cfg: TrainConfig) -> dict:
    """Every setting by its flag name: the loop's and the method's in one dict."""
    d = asdict(cfg)
    return {**d.pop("lora"), **d}


def parse_args(argv=None) -> TrainConfig:
    lora_fields = dataclasses.fields(drlora.DRLoRAConfig)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"--preset tiny sets: {PRESETS['tiny']}")
    for f in [f for f in dataclasses.fields(TrainConfig) if f.name != "lora"] + list(lora_fields):
        tiny = f"; tiny {PRESETS['tiny'][f.name]}" if f.name in PRESETS["tiny"] else ""
        kind = {bool: lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()],
                tuple: lambda s: tuple(s.split(","))}.get(type(f.default), type(f.default))
        p.add_argument("--" + f.name, type=kind, default=None, help=f"(default {f.default}{tiny})",
                       **({"nargs": "?", "const": True} if type(f.default) is bool else {}))
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}  # unknown flags: argparse exits
    preset = given.pop("preset", "auto")
    if preset == "auto":
        preset = "tiny" if given.get("model", "tiny") == "tiny" else "paper"
    if preset not in PRESETS:
        p.error(f"--preset must be auto, tiny or paper, got {preset!r}")
    values = {**PRESETS[preset], **given}
    names = {f.name for f in lora_fields}
    lora = drlora.DRLoRAConfig(**{k: v for k, v in values.items() if k in names})
    return TrainConfig(preset=preset, lora=lora, **{k: v for k, v in values.items() if k not in names})


def get_lr(t: int, cfg: TrainConfig) -> float:
    """Linear warm-up until t_warm (where DR-LoRA starts growing), then linear decay to 0."""
    t_warm = math.floor(cfg.lora.warmup_frac * cfg.steps)
    if t < t_warm:
        return cfg.lr * (t + 1) / t_warm
    return cfg.lr * (cfg.steps - t) / (cfg.steps - t_warm)


def task_folder(task: str, make: bool) -> str:
    """The folder of a task's token files; with make, an embedded task (byte tokens, for the tiny
    model) is generated there on first use."""
    folder = task if os.path.isdir(task) else os.path.join(common.DATA_DIR, task)
    if make and task in ("arithmetic", "sorting") and not os.path.exists(os.path.join(folder, "test.npz")):
        importlib.import_module(f"data.{task}").prepare(out_dir=folder)
    return folder


def batch_indices(pos: int, n: int, n_train: int, seed: int) -> list[int]:
    """Samples pos .. pos+n-1 of an endless stream of seeded per-epoch permutations of the training set."""
    out = []
    while len(out) < n:
        epoch, i = divmod(pos + len(out), n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch))
        out += perm[i: i + n - len(out)].tolist()
    return out


# -----------------------------------------------------------------------------
# evaluation and checkpoints


def evaluation(model, tokenizer, folder, val_set, test_set, cfg, autocast, log, step, examples=0, what=""):
    block_size = min(cfg.block_size, model.cfg.max_seq_len)
    loss = evals.val_loss(model, val_set, block_size, tokenizer.pad_id, n=cfg.eval_samples, autocast=autocast)
    r, shown = evals.evaluate_task(model, tokenizer, folder, test_set, cfg.eval_samples,
                                   max_new_tokens=cfg.max_new_tokens, autocast=autocast, examples=examples)
    log(f"{what or f'eval step {step}'}: val loss {loss:.4f}, {r['metric']} {r['score']:.3f} "
        f"({min(cfg.eval_samples, len(test_set))} {cfg.eval_split} samples)")
    for prompt, out, ok in shown:
        log(f"  {'ok ' if ok else 'bad'} {prompt!r} -> {out!r}")
    return {"step": step, "val_loss": loss, **r}  # r: the task's metric, its score, higher_is_better


def machine(base: str, device: str) -> dict:
    """What a result depends on beyond the settings: the processor, threads, torch, and the base's own bytes
    (a tiny base pretrained with another thread count is another model)."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    weights = os.path.join(base, "model.safetensors")
    digest = None
    if os.path.exists(weights):  # streamed: a real base is many GB
        with open(weights, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "base_sha256": digest}


def rng_state(device: str) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.startswith("cuda") else None}


def read_checkpoint(path: str, cfg: TrainConfig) -> dict:
    """ckpt.pt, checked against the settings before anything heavy is loaded."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = json.loads(json.dumps(state["config"]))  # tuples as lists, as in `now`
    saved = {**saved.pop("lora"), **saved}
    now = json.loads(json.dumps(flat(cfg)))  # tuples as lists, as in the file
    kept = [k for k in saved if k in now and k not in RESUMABLE | {"preset"}]  # flags since removed: ignored
    diff = {k: (saved[k], now.get(k)) for k in kept if now.get(k) != saved[k]}
    if diff:
        raise ValueError(f"--resume with settings that differ from {path} (checkpoint, now): {diff}")
    return state


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    cfg = parse_args(argv)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    state = read_checkpoint(ckpt_path, cfg) if cfg.resume else None
    # -------------------------------------------------------------------------
    # processes and device
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if ddp:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        # Process 0 evaluates alone; the others wait for it here, where no timeout can stop them, while a
        # stalled training collective still times out as usual.
        waiting_room = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if cfg.grad_accum % world:
        raise ValueError(f"grad_accum={cfg.grad_accum} is the total over processes: it must divide by {world}")
    accum = cfg.grad_accum // world
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    os.makedirs(cfg.out_dir, exist_ok=True)
    # -------------------------------------------------------------------------
    # base model, tokenizer, data
    if cfg.model == "tiny":
        from data import pretrain  # making the embedded base is a program of its own, run once when it is missing

        if master:
            pretrain.ensure_tiny_base(log=log)
        if ddp:
            dist.barrier()
        path = pretrain.BASE_DIR
    else:
        path = hf.find_checkpoint(cfg.model)
        if device == "cpu":
            log(f"warning: {cfg.model} on the CPU: a step of a real model takes minutes or more; use a GPU")
    model = hf.from_pretrained(path, dtype=dtype, device=device)
    tokenizer = hf.load_tokenizer(path, model.cfg)
    model.gradient_checkpointing = cfg.grad_ckpt
    block_size = min(cfg.block_size, model.cfg.max_seq_len)
    if block_size < cfg.block_size:
        log(f"warning: block_size {cfg.block_size} > the model's {block_size} positions: using {block_size}")
    n_total = sum(p.numel() for p in model.parameters())
    E, K, I, H = model.cfg.n_experts, model.cfg.top_k, model.cfg.intermediate_size, model.cfg.hidden_size
    n_idle = 3 * I * H * (E - K) * len(model.moe_layers())  # expert weights a token does not use
    log(f"base model {path}: {model.cfg.model_type}, {n_total / 1e6:.1f} M parameters, "
        f"{(n_total - n_idle) / 1e6:.1f} M active per token, {E} experts top-{K}, dtype {dtype}")
    folder = task_folder(cfg.task, make=master and cfg.model == "tiny")
    if ddp:
        dist.barrier()
    if cfg.eval_split not in ("val", "test"):
        raise ValueError(f"--eval_split must be val or test, got {cfg.eval_split!r}")
    splits = ("train", "val", cfg.eval_split)
    train_set, val_set, test_set = (common.load_sft(os.path.join(folder, f"{s}.npz")) for s in splits)
    made_with = train_set.manifest.get("tokenizer")
    if made_with != tokenizer.name:
        redo = common.maker(os.path.join(folder, "train.npz"))
        raise ValueError(f"{folder}/manifest.json: the data was tokenized by {made_with!r}, the model uses "
                         f"{tokenizer.name!r}; remake it for this model: `{redo}`"
                         + (f" with --model {cfg.model}" if redo.startswith("python tasks/") else ""))
    log(f"task {cfg.task}: {len(train_set):,} train / {len(val_set):,} val / {len(test_set):,} {splits[2]} samples")

    def evaluate(step, examples=0, what=""):
        return evaluation(model, tokenizer, folder, val_set, test_set, cfg, autocast, log, step, examples, what)

    if cfg.adapter:  # evaluate a saved adapter (it carries its own DR-LoRA settings and ranks), then stop
        drlora.load_adapter(model, cfg.adapter)
        return evaluate(0, examples=3, what=f"adapter {cfg.adapter}")
    # -------------------------------------------------------------------------
    # DR-LoRA and the optimizer
    torch.manual_seed(cfg.seed)  # here, after any pretraining: the same LoRA init on every process and in every run
    drl = drlora.DRLoRA(model, cfg.lora, total_steps=cfg.steps)
    if rank:  # LoRA dropout: each process its own masks (process 0 keeps the stream of a one-process run)
        torch.manual_seed(cfg.seed + rank)
    trainable = drl.trainable_parameters()
    names = {id(p): n for n, p in model.named_parameters()}
    lcfg = cfg.lora
    log(f"DR-LoRA {lcfg.method}: ranks {lcfg.r_init} -> {lcfg.r_target} (max {lcfg.r_max}); warm-up ends at step "
        f"{drl.t_warm}; {len(drl.events)} growth events {drl.events[:3]}{'...' if len(drl.events) > 3 else ''}, "
        f"quota {drl.quota}, cap {drl.cap}; trainable {sum(p.numel() for p in trainable) / 1e6:.2f} M "
        f"(allocated LoRA {sum(p.numel() for p in drl.lora_parameters()) / 1e6:.2f} M, active now "
        f"{drl.active_lora_parameters() / 1e6:.3f} M, at the end "
        f"{drl.active_lora_parameters() * lcfg.r_target / lcfg.r_init / 1e6:.3f} M)")
    log(f"{cfg.batch_size} samples x {accum} micro-batches x {world} processes = "
        f"{cfg.batch_size * cfg.grad_accum} samples per step")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    run = DDP(model, device_ids=[device] if device.startswith("cuda") else None) if ddp else model
    if cfg.compile:
        if dtype != torch.bfloat16:  # torch.compile traces grouped_mm for bf16 inputs only
            moe.Experts.grouped = False
            log("--compile without bf16: the experts run as the per-expert loop")
        run = torch.compile(run)  # recompiles after each growth event: the ranks are python ints
    start, pos = 0, 0
    history = {"step": [], "loss": [], "lr": [], "eval": [], "events": []}
    if state is not None:
        params = {names[id(p)]: p for p in trainable}
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        drl.load_state_dict(state["drlora"])
        optimizer.load_state_dict(state["optimizer"])
        start, pos, history = state["step"], state["pos"], state["history"]
        rngs = state["rng"]
        if len(rngs) == world:  # each process continues its own random stream (LoRA dropout)
            rng = rngs[rank]
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and device.startswith("cuda"):
                torch.cuda.set_rng_state(rng["cuda"])
        else:  # the data stream is the same (pos counts samples over all processes); only dropout masks change
            log(f"resuming {len(rngs)} processes' run with {world}: dropout masks are drawn afresh")
            torch.manual_seed(cfg.seed + 1000 * start + rank)
        log(f"resumed from {ckpt_path} at step {start}")

    def save_checkpoint(step: int):
        rng = [None] * world
        if ddp:
            dist.all_gather_object(rng, rng_state(device))
        else:
            rng = [rng_state(device)]
        if master:
            ckpt = {"config": asdict(cfg), "base": path, "step": step, "pos": pos, "history": history, "rng": rng,
                    "trainable": {names[id(p)]: p.detach().cpu() for p in trainable},
                    "drlora": drl.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save(ckpt, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a kill leaves the old or the new file, never half
            drlora.save_adapter(model, os.path.join(cfg.out_dir, "adapter.safetensors"), lcfg)

    def evaluate_on_master(step, examples=0):
        result = evaluate(step, examples) if master else None
        if ddp:
            dist.barrier(group=waiting_room)
        return result

    if start == 0 and cfg.eval_base:
        history["base"] = evaluate_on_master(0, examples=2)  # LoRA's B is zero: this is the base model
    # -------------------------------------------------------------------------
    # the loop
    t0, tokens_seen = time.time(), 0
    model.train()
    for t in range(start, cfg.steps):
        lr = get_lr(t, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = []
        for m in range(accum):
            first = pos + (m * world + rank) * cfg.batch_size
            idx = batch_indices(first, cfg.batch_size, len(train_set), cfg.seed)
            micro.append([a.to(device) for a in common.sft_batch(train_set, idx, block_size, tokenizer.pad_id)])
            tokens_seen += int(micro[-1][2].sum())
        loss, event = drlora.train_step(run, drl, optimizer, micro, t, cfg.grad_clip, autocast)
        pos += cfg.batch_size * accum * world
        if ddp:
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
            result = evaluate_on_master(t)
            if master:
                history["eval"].append(result)
        if (t + 1) % cfg.ckpt_interval == 0 or t == cfg.steps - 1:
            save_checkpoint(t + 1)
        if t == cfg.exit_at_step:
            os._exit(3)
    # -------------------------------------------------------------------------
    # the end: replicas agree, final evaluation, summary
    if ddp:  # every process must hold the same adapters, ranks and router
        # every expert's rank, not their sum: the last event brings every process's sum to the same target
        check = torch.cat([sum(p.double().sum() for p in trainable).view(1), drl.ranks.flatten().double()]).to(device)
        all_checks = [torch.zeros_like(check) for _ in range(world)]
        dist.all_gather(all_checks, check)
        if not all(torch.equal(c, check) for c in all_checks):
            raise RuntimeError(f"processes disagree after training: {[c.tolist() for c in all_checks]}")
        log(f"all {world} processes hold identical adapters, ranks and routers")
    result = {}
    if master:
        final = history["final"] = evaluate(cfg.steps, examples=3)
        base = history.get("base", {})
        result = {"method": lcfg.method, "metric": final["metric"], "base_score": base.get("score"),
                  "score": final["score"], "base_val_loss": base.get("val_loss"), "val_loss": final["val_loss"],
                  "active_lora_params": drl.active_lora_parameters(), "ranks": drl.ranks.tolist(),
                  "f": drl.f.tolist(), "g": drl.expert_importance().tolist(),
                  "seconds": time.time() - t0, "machine": machine(path, device)}
        with open(os.path.join(cfg.out_dir, "result.json"), "w") as f:
            json.dump({"config": asdict(cfg), "result": result, "history": history, "drlora": drl.history}, f)
        better = "" if final["higher_is_better"] else " (lower is better)"
        log(f"\n| | val loss | {final['metric']}{better} |\n|---|---|---|\n"
            f"| base model | {base.get('val_loss', math.nan):.4f} | {base.get('score', math.nan):.3f} |\n"
            f"| {lcfg.method} ({cfg.steps} steps) | {final['val_loss']:.4f} | {final['score']:.3f} |\n"
            f"active LoRA parameters {drl.active_lora_parameters():,}; ranks per layer "
            f"{[sum(r) for r in drl.ranks.tolist()]}; fine-tuning {result['seconds']:.0f}s; "
            f"adapter {cfg.out_dir}/adapter.safetensors; figures: python tools/plots.py {cfg.out_dir}")
    if ddp:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: a clear message, no traceback
        sys.exit(f"error: {e}")
