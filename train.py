"""
Fine-tune a pretrained MoE with DR-LoRA (or uniform LoRA). One flat loop, nanoGPT style.

    python train.py                                  # embedded default: tiny MoE, arithmetic, CPU
    python train.py --method lora                    # uniform LoRA at r_target, all else equal
    python train.py --model olmoe --task gsm8k       # OLMoE-1B-7B on one GPU, the paper's settings
    torchrun --nproc_per_node 4 train.py --model olmoe --task gsm8k    # data-parallel
    python train.py --resume                         # continue from out_dir/ckpt.pt

Every setting is a TrainConfig field and a --flag; `python train.py --help` lists them.
The embedded default pretrains its tiny base model on the first run (pretrain.py).
"""
import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import drlora
import evals
import hf
from data import common, pretrain

# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    model: str = "tiny"  # "tiny" (embedded, pretrained here) | olmoe | qwen2_moe | ... | a checkpoint folder
    preset: str = "auto"  # defaults: "tiny" (embedded run) | "paper" (SPEC.md); auto: tiny for --model tiny
    task: str = "arithmetic"  # data/<task>/{train,val,test}.npz (made by data/<task>.py), or a folder
    out_dir: str = "out"
    adapter: str = ""  # evaluate this saved adapter (safetensors) on the base model, then exit
    export: str = ""  # at the end, write the merged model as a Hugging Face folder here (export.py)
    # DR-LoRA (drlora.DRLoRAConfig; the embedded default is the paper's setting scaled down)
    method: str = "drlora"  # drlora | lora
    r_init: int = 2
    r_target: int = 4
    r_max: int = 8
    dT: int = 50  # optimizer steps between growth events
    p_grow: float = 0.1
    beta: float = 0.9
    gamma: float = 1.2
    scale: float = 2.0
    lora_dropout: float = 0.0  # the paper's 0.1 for real models; on the tiny CPU default its random masks
    # cost 1.5x the step time (measured: 495 vs 323 ms) and train loss stays at val loss (no overfitting)
    targets: str = "up_proj,down_proj"
    saliency: str = "fg"  # fg | f | g
    freq: str = "weight"  # weight | count
    freeze_router: bool = False
    allocation: str = "layer"  # layer | global
    # optimisation
    steps: int = 600  # optimizer steps T
    batch_size: int = 32  # samples per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimizer step, over all processes together
    block_size: int = 256  # longest sample in tokens (longer ones are truncated, with a warning)
    lr: float = 2e-3  # peak; linear warm-up over 3 % of the steps, then linear decay to 0
    weight_decay: float = 0.0  # >0 also shrinks the inactive A slots (harmless: B is 0 there)
    grad_clip: float = 1.0  # 0 = off
    seed: int = 1337
    # evaluation and logging
    eval_interval: int = 200
    eval_samples: int = 500  # test prompts decoded for accuracy, and val samples for the loss
    max_new_tokens: int = 24
    log_interval: int = 25
    plots: bool = True
    eval_base: bool = True  # evaluate the base model before fine-tuning
    # system
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    grad_ckpt: bool = False  # gradient checkpointing per block
    ckpt_interval: int = 200  # also at the end; written atomically
    resume: bool = False
    exit_at_step: int = -1  # testing: die (os._exit) right after this step, as a kill would


# the paper's settings (SPEC.md), the defaults for a real model unless given on the command line
REAL_MODEL_DEFAULTS = dict(r_init=8, r_target=16, r_max=32, dT=200, steps=3750, lr=2e-5, lora_dropout=0.1, batch_size=4, grad_accum=12,
                           block_size=2048, eval_interval=500, eval_samples=1319, max_new_tokens=512,
                           log_interval=10, ckpt_interval=250, grad_ckpt=True)
# settings that may change when resuming
RESUMABLE = {"resume", "exit_at_step", "eval_interval", "log_interval", "ckpt_interval", "plots", "compile",
             "eval_samples", "device", "export", "eval_base"}


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        if f.type in (bool, "bool"):
            p.add_argument("--" + f.name, type=lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()],
                           nargs="?", const=True, default=None, help=f"(default {f.default})")
        else:
            p.add_argument("--" + f.name, type=type(f.default), default=None, help=f"(default {f.default})")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}  # unknown flags: argparse exits
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = "tiny" if given.get("model", "tiny") == "tiny" else "paper"
    if preset not in ("tiny", "paper"):
        p.error(f"--preset must be auto, tiny or paper, got {preset!r}")
    defaults = REAL_MODEL_DEFAULTS if preset == "paper" else {}
    return TrainConfig(**{**defaults, **given})


def task_folder(task: str, make: bool) -> str:
    """The folder of a task's token files; with make, an embedded task (byte tokens, for the tiny
    model) is generated there on first use."""
    folder = task if os.path.isdir(task) else os.path.join(common.DATA_DIR, task)
    if make and task in ("arithmetic", "sorting") and not os.path.exists(os.path.join(folder, "test.npz")):
        importlib.import_module(f"data.{task}").prepare(out_dir=folder)
    return folder


def get_lr(t: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first 3 % of steps (t_warm, where DR-LoRA starts growing), then linear decay."""
    t_warm = math.floor(0.03 * cfg.steps)
    if t < t_warm:
        return cfg.lr * (t + 1) / t_warm
    return cfg.lr * (cfg.steps - t) / (cfg.steps - t_warm)


def main(argv=None):
    cfg = parse_args(argv)
    # -------------------------------------------------------------------------
    # processes and device
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
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
    # base model and tokenizer
    if cfg.model == "tiny":
        if master:
            pretrain.ensure_tiny_base(log=log)
        if ddp:
            dist.barrier()
        path = pretrain.BASE_DIR
    else:
        path = hf.find_checkpoint(cfg.model)
    model = hf.from_pretrained(path, dtype=dtype, device=device)
    tokenizer = hf.load_tokenizer(path, model.cfg)
    model.gradient_checkpointing = cfg.grad_ckpt
    if cfg.block_size > model.cfg.max_seq_len:
        log(f"warning: block_size {cfg.block_size} > the model's {model.cfg.max_seq_len} positions: using {model.cfg.max_seq_len}")
        cfg.block_size = model.cfg.max_seq_len
    n_total = sum(p.numel() for p in model.parameters())
    E, K, I, H = model.cfg.n_experts, model.cfg.top_k, model.cfg.intermediate_size, model.cfg.hidden_size
    n_expert = 3 * I * H * E * len(model.moe_layers())
    log(f"base model {path}: {model.cfg.model_type}, {n_total / 1e6:.1f} M parameters, "
        f"{(n_total - n_expert * (E - K) / E) / 1e6:.1f} M active per token, {E} experts top-{K}, dtype {dtype}")
    # -------------------------------------------------------------------------
    # data
    folder = task_folder(cfg.task, make=master and cfg.model == "tiny")
    if ddp:
        dist.barrier()
    train_set, val_set, test_set = (common.load_sft(os.path.join(folder, f"{s}.npz")) for s in ("train", "val", "test"))
    made_with = train_set.manifest.get("tokenizer")
    if made_with != tokenizer.name:
        raise ValueError(f"{folder}/manifest.json: the data was tokenized by {made_with!r}, the model uses "
                         f"{tokenizer.name!r}; remake it with `python data/{cfg.task}.py` for this model")
    log(f"task {cfg.task}: {len(train_set):,} train / {len(val_set):,} val / {len(test_set):,} test samples")

    def batch_indices(pos: int, n: int) -> list[int]:
        """Samples pos .. pos+n-1 of an endless stream of seeded per-epoch permutations."""
        out = []
        while len(out) < n:
            epoch, i = divmod(pos + len(out), len(train_set))
            perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            out += perm[i: i + n - len(out)].tolist()
        return out

    # -------------------------------------------------------------------------
    # evaluation
    def evaluation(step: int, examples: int = 0, what: str = ""):
        loss = evals.val_loss(model, val_set, cfg.block_size, tokenizer.pad_id, n=cfg.eval_samples, autocast=autocast)
        r, shown = evals.evaluate_task(model, tokenizer, folder, test_set, cfg.eval_samples,
                                          max_new_tokens=cfg.max_new_tokens, autocast=autocast, examples=examples)
        log(f"{what or f'eval step {step}'}: val loss {loss:.4f}, {r['metric']} {r['score']:.3f} "
            f"({min(cfg.eval_samples, len(test_set))} test samples)")
        for prompt, out, ok in shown:
            log(f"  {'ok ' if ok else 'bad'} {prompt!r} -> {out!r}")
        return {"step": step, "val_loss": loss, "accuracy": r["score"], **r}

    if cfg.adapter:  # evaluate a saved adapter (it carries its own DR-LoRA settings and ranks), then stop
        drlora.load_adapter(model, cfg.adapter)
        return evaluation(0, examples=3, what=f"adapter {cfg.adapter}")
    # -------------------------------------------------------------------------
    # DR-LoRA and the optimizer
    dcfg = drlora.DRLoRAConfig(method=cfg.method, r_init=cfg.r_init, r_target=cfg.r_target, r_max=cfg.r_max, dT=cfg.dT,
                               p_grow=cfg.p_grow, beta=cfg.beta, gamma=cfg.gamma, scale=cfg.scale, dropout=cfg.lora_dropout,
                               targets=tuple(cfg.targets.split(",")), saliency=cfg.saliency, freq=cfg.freq,
                               freeze_router=cfg.freeze_router, allocation=cfg.allocation)
    # seeded here, after any pretraining: the same LoRA init on every process and in every run
    torch.manual_seed(cfg.seed)
    drl = drlora.DRLoRA(model, dcfg, total_steps=cfg.steps)
    trainable = drl.trainable_parameters()
    names = {id(p): n for n, p in model.named_parameters()}
    log(f"DR-LoRA {dcfg.method}: ranks {dcfg.r_init} -> {dcfg.r_target} (max {dcfg.r_max}); warm-up ends at step "
        f"{drl.t_warm}; {len(drl.events)} growth events {drl.events[:3]}{'...' if len(drl.events) > 3 else ''}, "
        f"quota {drl.quota}, cap {drl.cap}; trainable {sum(p.numel() for p in trainable) / 1e6:.2f} M "
        f"(allocated LoRA {sum(p.numel() for p in drl.lora_parameters()) / 1e6:.2f} M, active now "
        f"{drl.active_lora_parameters() / 1e6:.3f} M, at the end {drl.active_lora_parameters() * dcfg.r_target / dcfg.r_init / 1e6:.3f} M)")
    log(f"{cfg.batch_size} samples x {accum} micro-batches x {world} processes = {cfg.batch_size * cfg.grad_accum} samples per step")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    run = DDP(model, device_ids=[device] if device.startswith("cuda") else None) if ddp else model
    if cfg.compile:
        run = torch.compile(run)
    # -------------------------------------------------------------------------
    # checkpoints
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    def save_checkpoint(step: int, pos: int, history: dict):
        rng = [torch.get_rng_state()] if not ddp else [None] * world
        if ddp:
            dist.all_gather_object(rng, torch.get_rng_state())
        if not master:
            return
        state = {"config": asdict(cfg), "base": path, "step": step, "pos": pos, "history": history, "rng": rng,
                 "trainable": {names[id(p)]: p.detach().cpu() for p in trainable},
                 "drlora": drl.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save(state, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a kill leaves the old or the new file, never half
        drlora.save_adapter(model, os.path.join(cfg.out_dir, "adapter.safetensors"), dcfg)

    start, pos = 0, 0
    history = {"step": [], "loss": [], "lr": [], "eval": [], "events": []}
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = {k: (v, getattr(cfg, k)) for k, v in state["config"].items() if k not in RESUMABLE and getattr(cfg, k) != v}
        if diff:
            raise ValueError(f"--resume with settings that differ from {ckpt_path} (checkpoint, now): {diff}")
        params = {names[id(p)]: p for p in trainable}
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        drl.load_state_dict(state["drlora"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"][rank])
        start, pos, history = state["step"], state["pos"], state["history"]
        log(f"resumed from {ckpt_path} at step {start}")

    if start == 0 and master and cfg.eval_base:
        history["base"] = evaluation(0, examples=2)  # LoRA's B is zero: this is the base model
    # -------------------------------------------------------------------------
    # the loop
    t0, tokens_seen = time.time(), 0
    model.train()
    for t in range(start, cfg.steps):
        lr = get_lr(t, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            first = pos + (micro * world + rank) * cfg.batch_size
            x, y, mask = common.sft_batch(train_set, batch_indices(first, cfg.batch_size), cfg.block_size, tokenizer.pad_id)
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            if ddp:  # synchronise gradients only on the last micro-batch
                run.require_backward_grad_sync = micro == accum - 1
            with autocast:
                out = run(x, targets=y, attention_mask=mask)
            drl.observe(out.routers, mask)
            (out.loss / accum).backward()
            loss_sum += out.loss.detach() / accum
            tokens_seen += int(mask.sum())
        pos += cfg.batch_size * accum * world
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"step {t}: loss is {loss_sum.item()}; stopping. The last good checkpoint "
                                     f"({ckpt_path if os.path.exists(ckpt_path) else 'none yet'}) is kept; lower --lr")
        event = drl.step(t)  # statistics, router freeze, growth: after backward, before the update
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history["step"].append(t)
        history["loss"].append(loss_sum.item())
        history["lr"].append(lr)
        if event:
            history["events"].append({"step": t, "ranks": event["ranks"], "f": drl.f.tolist()})
            grown = [sum(g) for g in event["grown"]]
            log(f"growth event at step {t}: +{grown} ranks per layer, now {[sum(r) for r in event['ranks']]} "
                f"(target {model.cfg.n_experts * dcfg.r_target} each); layer 0 ranks {event['ranks'][0]}")
        if t % cfg.log_interval == 0 or t == cfg.steps - 1:
            dt = time.time() - t0
            log(f"step {t:5d}/{cfg.steps} | loss {loss_sum.item():.4f} | lr {lr:.2e} | "
                f"{tokens_seen * world / dt:,.0f} tok/s | ETA {dt / (t - start + 1) * (cfg.steps - t - 1):.0f}s")
        if master and t > 0 and t % cfg.eval_interval == 0 and t != cfg.steps - 1:
            history["eval"].append(evaluation(t))
        if (t + 1) % cfg.ckpt_interval == 0 or t == cfg.steps - 1:
            save_checkpoint(t + 1, pos, history)
        if t == cfg.exit_at_step:
            os._exit(3)
    # -------------------------------------------------------------------------
    # the end: replicas agree, final evaluation, plots, summary
    if ddp:  # every process must hold the same adapters, ranks and router
        check = torch.stack([sum(p.double().sum() for p in trainable), drl.ranks.sum().double()]).to(device)
        all_checks = [torch.zeros_like(check) for _ in range(world)]
        dist.all_gather(all_checks, check)
        if not all(torch.equal(c, check) for c in all_checks):
            raise RuntimeError(f"processes disagree after training: {[c.tolist() for c in all_checks]}")
        log(f"all {world} processes hold identical adapters, ranks and routers")
    result = {}
    if master:
        final = evaluation(cfg.steps, examples=3)
        history["final"] = final
        base = history.get("base", {})
        result = {"method": cfg.method, "base_accuracy": base.get("accuracy"), "accuracy": final["accuracy"],
                  "base_val_loss": base.get("val_loss"), "val_loss": final["val_loss"],
                  "active_lora_params": drl.active_lora_parameters(), "ranks": drl.ranks.tolist(),
                  "seconds": time.time() - t0}
        with open(os.path.join(cfg.out_dir, "result.json"), "w") as f:
            json.dump({"config": asdict(cfg), "result": result, "history": history, "drlora": drl.history}, f)
        if cfg.plots:
            import plots

            files = plots.save_all(cfg.out_dir, history, drl)
            log(f"plots: {', '.join(files)}")
        log("\n| | val loss | accuracy |\n|---|---|---|\n"
            f"| base model | {base.get('val_loss', float('nan')):.4f} | {base.get('accuracy', float('nan')):.3f} |\n"
            f"| {cfg.method} ({cfg.steps} steps) | {final['val_loss']:.4f} | {final['accuracy']:.3f} |\n"
            f"active LoRA parameters {drl.active_lora_parameters():,}; ranks per layer {[sum(r) for r in drl.ranks.tolist()]}; "
            f"fine-tuning {result['seconds']:.0f}s; adapter {cfg.out_dir}/adapter.safetensors")
        if cfg.export:  # last: merging removes the adapters
            import export as exporter

            exporter.export(model, path, cfg.export, overwrite=True)
            log(f"merged model written to {cfg.export}")
    if ddp:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: a clear message, no traceback
        sys.exit(f"error: {e}")
