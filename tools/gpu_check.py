"""
The real GPU path, measured by one command as soon as a GPU is lent, and the same code at a tiny shape
on the CPU (tests/test_bench.py runs it), so that a first GPU run does not fail on a bug.

    python tools/gpu_check.py --out gpu.json          # CUDA, OLMoE-1B-7B shape: a few minutes on one H200
    python tools/gpu_check.py --device cpu --tiny     # the same code at a tiny shape, on the CPU
    torchrun --nproc_per_node 8 tools/gpu_check.py --fsdp --out fsdp.json          # section 3 alone, 8 GPUs
    torchrun --nproc_per_node 2 tools/gpu_check.py --fsdp --device cpu --tiny      # the same on gloo

Nothing is downloaded. Without transformers or PEFT the reference is skipped, with a message.

1. Fine-tune steps of an OLMoE-1B-7B-shaped model (bench.olmoe_1b_7b: hidden 2048, 16 layers, 64 experts
   top-8, expert width 1024, vocab 50304) with random bf16 weights, on the paper's micro-batch per device
   (4 x 2048 tokens), bf16 autocast, gradient checkpointing. Three configurations on the same weights:
   ours DR-LoRA at its end point of growth (mean r 16 over 8..32, up + down), ours uniform LoRA r=16 on
   gate + up + down (the reference's math), and transformers' OlmoeForCausalLM (grouped_mm experts) with
   PEFT LoRA r=16 on its fused experts (bench.peft_lora). LoRA dropout 0: PEFT refuses it on fused experts.
   For each: tokens/s, peak memory (torch.cuda.max_memory_allocated), MFU (model FLOPs of bench.step_flops,
   recomputation not counted) over H200_BF16 and over the bf16 matmul rate measured here, aten operators per
   step (bench.step_ops) and, on CUDA, kernels per step (torch.profiler). Checks: our logits and MoE blocks
   match the reference's (same_function), and ours ran the grouped path (every layer's experts.grouped still True,
   F.grouped_mm 3 + 2 x adapted projections times per MoE layer in each forward), not a silent fallback to
   the per-expert loop.
2. train.py: 20 DR-LoRA steps on a small OLMoE-shaped checkpoint and an arithmetic task written here (LoRA
   dropout 0.1, gradient checkpointing, 2 micro-batches a step, growth events at steps 0, 5, 10 and 15),
   once straight through and once killed after step 9 (tools/kill_at.py; checkpoint at 10) and resumed. Both
   must end with the same adapter, ranks, routing statistics and losses, bit for bit: train.py runs under
   torch.use_deterministic_algorithms(True) (with CUBLAS_WORKSPACE_CONFIG), where index_add_ and the other
   atomic sums take deterministic kernels. Should an operator have none there, the runs go again without it
   and a second straight run measures how far two runs drift apart by atomic sums alone; the resumed run
   must then stay within 4x that drift + RESUME_FLOOR. Resume bugs are small at this scale: with the optimizer
   state or the CPU random state not restored, the --tiny run's adapter moved by 1.0 % and 0.2 % (relative
   norm) and its losses by 3e-4 and 2e-4, so only the bit-for-bit comparison catches every one of them; the
   tolerance can miss a bug no larger than the drift of atomic sums.

3. --fsdp, under torchrun (nccl; gloo on the CPU), instead of 1 and 2: fsdp.py shards a random checkpoint of
   OLMoE-1B-7B's shape cut to FSDP_LAYERS layers over the processes (bf16 base, fp32 LoRA and router), each
   process reading its rows from the file; FSDP_STEPS DR-LoRA steps (r 8 -> 16, max 32, growth at 0, 2, 4, 6;
   2 micro-batches of 4 x 2048 tokens per process, bf16 autocast, gradient checkpointing), the checkpoint and
   adapter gathered to process 0, the replica check; then process 0 alone runs the same steps on the same
   batches without FSDP. Growth events and ranks must be equal; losses within FSDP_LOSS_TOL (bf16 sums in
   another order). Prints per-process peak memory (torch.cuda.max_memory_allocated) beside fsdp.memory's
   worked-out figure (which leaves out activations), load time, step time and tokens/s.

Prints markdown tables; --out writes every figure as JSON. Exits 1, after everything has run, if a check failed.
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)

import hf  # noqa: E402
import drlora  # noqa: E402
import moe  # noqa: E402
from data import arithmetic  # noqa: E402
from tools import bench, export  # noqa: E402

H200_BF16 = 790e12  # dense bf16 FLOP/s of an H200 on an 8192^3 matmul (its spec sheet's 989 is not reached)
RESUME_STEPS, KILL_AFTER, DT = 20, 9, 5  # events at 0, 5, 10, 15; the kill leaves the checkpoint of step 10
RESUME_FLOOR = 1e-5  # resumed vs straight, without deterministic kernels: relative adapter norm and loss
FSDP_STEPS, FSDP_LAYERS = 8, 4
FSDP_LOSS_TOL = {"cuda": 2e-2, "cpu": 1e-5}  # sharded vs one process, largest loss difference (bf16 on CUDA)


def tiny_shape() -> moe.MoEConfig:
    return moe.MoEConfig(model_type="olmoe", vocab_size=512, hidden_size=64, n_layer=2, n_head=4, n_kv_head=4,
                         n_experts=16, top_k=4, intermediate_size=32, max_seq_len=128)


def ours_configs() -> dict:
    """name -> (DRLoRAConfig, point of growth for bench.rank_pattern)."""
    return {"ours DR-LoRA, end of growth (r 8..32, mean 16), up+down":
            (drlora.DRLoRAConfig(r_init=8, r_target=16, r_max=32, dropout=0.0), "end"),
            "ours LoRA r=16, gate+up+down": (drlora.DRLoRAConfig(method="lora", r_target=16, r_max=16, dropout=0.0,
                                                                targets=("gate_proj", "up_proj", "down_proj")), None)}


REFERENCE = "transformers + PEFT LoRA r=16, gate_up+down"

# -----------------------------------------------------------------------------
# measuring one configuration


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def counted_step(step, device: str):
    """Runs step() (which returns bench.step_ops's phases) once more, under torch.profiler on CUDA.
    Returns (phases, CUDA kernels and copies launched or None, why not)."""
    if device != "cuda":
        return step(), None, "CPU"
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            phases = step()
            torch.cuda.synchronize()
        return phases, sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), ""
    except Exception as e:  # the profiler is a diagnostic: the figures without it still count
        return step(), None, f"profiler failed: {type(e).__name__}: {e}"


def figures(times, flops, tokens, peak, phases, kernels, why, rate) -> dict:
    med = bench.median(times)
    ops = {name: dict(c) for name, c in phases.items()}
    return {"tokens_per_s": tokens / med, "step_s": {"median": med, "min": min(times), "max": max(times)},
            "peak_gib": peak, "step_tflop": flops / 1e12, "mfu_vs_h200_bf16": flops / med / H200_BF16,
            "mfu_vs_measured_matmul": flops / med / rate if rate else None,
            "ops_per_step": sum(sum(c.values()) for c in phases.values()),
            "computing_ops_per_step": sum(bench.kernel_ops(c) for c in phases.values()),
            "ops_by_phase": {name: sum(c.values()) for name, c in phases.items()},
            "grouped_mm_per_step": sum(n for c in phases.values() for op, n in c.items() if "grouped_mm" in op),
            "cuda_kernels_per_step": kernels, "cuda_kernels_note": why, "ops": ops}


def matmul_rate(device: str) -> float:
    """bf16 FLOP/s of one (n, n) @ (n, n) matmul: the mean of 10 after 3 warm-ups."""
    n = 8192 if device == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for i in range(13):
        if i == 3:
            sync(device)
            t0 = time.perf_counter()
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------
# the reference: transformers + PEFT on our weights


def reference_missing() -> str | None:
    """None if transformers and PEFT import, else why not (missing, or a dependency's version refused)."""
    try:
        importlib.import_module("peft")
        importlib.import_module("transformers")
    except Exception as e:
        return f"{e.name} is not installed" if isinstance(e, ModuleNotFoundError) else f"{type(e).__name__}: {e}"
    return None


def reference_model(model):
    """transformers' OlmoeForCausalLM (grouped_mm experts, gradient checkpointing) holding our model's
    base weights (its adapters must be detached), in transformers 5's fused layout (export.layout_state_dict),
    copied on the device rather than through a 14 GB file."""
    import transformers

    config = transformers.OlmoeConfig.from_dict(hf.config_to_hf(model.cfg))
    with torch.device(model.lm_head.weight.device):
        ref = transformers.OlmoeForCausalLM._from_config(config, dtype=torch.bfloat16,
                                                         experts_implementation="grouped_mm")
    ref.load_state_dict(export.layout_state_dict(model, fused=True), strict=True)  # every tensor, by name
    ref.config.use_cache = False
    if hasattr(ref, "activation_checkpointing_enable"):  # the name since transformers 5.2x; the old one warns
        ref.activation_checkpointing_enable({"use_reentrant": False})
    else:
        ref.gradient_checkpointing_enable({"use_reentrant": False})
    return ref


@torch.no_grad()
def same_function(model, ref, peft_model, x, autocast) -> dict:
    """Ours and the reference (untrained LoRA adds exactly 0 on both sides) on the tokens x (1, T + 1):
    the logits, and each MoE block alone on the same random unit-scale input. The blocks are checked
    alone because with random 0.02-scale weights the experts move the logits little: at the tiny shape,
    gate and up swapped in the reference change its logits by 0.6 % but its MoE blocks' outputs by 20 %."""
    with autocast:
        a = model(x[:, :-1]).logits.float()
        b = peft_model(input_ids=x[:, :-1], use_cache=False).logits.float()
        g = torch.Generator(device=x.device).manual_seed(1)
        h = torch.randn(1, x.shape[1] - 1, model.cfg.hidden_size, device=x.device, generator=g).to(torch.bfloat16)
        moe_rel = 0.0
        for blk, layer in zip(model.moe_layers(), ref.model.layers):
            y0, y1 = blk(h)[0].float(), layer.mlp(h)
            y1 = (y1[0] if isinstance(y1, tuple) else y1).float()  # some versions also return router logits
            moe_rel = max(moe_rel, ((y0 - y1).norm() / y0.norm()).item())
    return {"tokens": x.shape[1] - 1, "logits_rel_diff": ((a - b).norm() / a.norm()).item(), "moe_rel_diff": moe_rel,
            "loss_ours": bench.full_logits_loss(a, x[:, 1:]).item(),
            "loss_reference": bench.full_logits_loss(b, x[:, 1:]).item()}


def reference_ops(peft_model, opt, x, autocast) -> dict:
    """bench.step_ops's phases for the reference's step (its loss on full logits, as bench.Reference)."""
    phases = {}

    @contextlib.contextmanager
    def phase(name):
        with bench.OpCounter() as c:
            yield
        phases[name] = c.ops

    with phase("forward"), autocast:
        loss = bench.full_logits_loss(peft_model(input_ids=x[:, :-1], use_cache=False).logits, x[:, 1:])
    with phase("backward"):
        loss.backward()
    with phase("clip + AdamW"):
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return phases


def reference_steps(peft_model, opt, x, autocast, warmup: int, steps: int, device: str) -> list:
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = bench.full_logits_loss(peft_model(input_ids=x[:, :-1], use_cache=False).logits, x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


# -----------------------------------------------------------------------------
# 1. the step: ours against the reference


def section_step(cfg, batch: int, seq: int, device: str, warmup: int, steps: int, reference: bool, rate, failures):
    tokens, out = batch * seq, {}
    autocast = torch.autocast(device, dtype=torch.bfloat16)
    configs = ours_configs()
    model, drl, opt = bench.shaped_model(cfg, device, *next(iter(configs.values())))
    L = len(model.moe_layers())
    routers = [{k: v.clone() for k, v in blk.gate.state_dict().items()} for blk in model.moe_layers()]
    x = bench.shaped_batch(model, batch, seq)
    for i, (name, (lcfg, pattern)) in enumerate(configs.items()):
        if i:  # the next adapters on the same base, the routers as they were drawn
            drl = opt = None
            gc.collect()
            for blk, sd in zip(model.moe_layers(), routers):
                blk.gate.load_state_dict(sd)
            drl, opt = bench.attach(model, lcfg, pattern)
        print(f"  {name}: {warmup} + {steps} steps", flush=True)
        try:
            reset_peak(device)
            times, flops = bench.shaped_steps(model, drl, opt, seq, True, warmup, steps, batch)
            peak = peak_gib(device)
            phases, kernels, why = counted_step(functools.partial(  # not kept: it would hold our model
                bench.step_ops, model, drl, opt, x[:, :-1], x[:, 1:], drl.t_warm + 1, autocast), device)
        except Exception as e:  # out of memory, or a kernel this GPU lacks: the other figures still come
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            failures.append(f"{name}: {out[name]['error']}")
            continue
        out[name] = figures(times, flops, tokens, peak, phases, kernels, why, rate)
        gmm, want = sum(n for op, n in phases["forward"].items() if "grouped_mm" in op), L * (3 + 2 * len(lcfg.targets))
        out[name]["grouped_mm_per_forward"] = gmm
        grouped = all(blk.experts.grouped for blk in model.moe_layers())
        if not grouped or gmm != want:
            failures.append(f"{name}: the grouped path did not run (experts.grouped {grouped}, "
                            f"{gmm} grouped_mm calls in a forward, expected {want})")
    if not reference:
        return out, None
    for blk, sd in zip(model.moe_layers(), routers):  # back to the base: no adapters, the routers as drawn
        blk.experts.lora = None
        blk.gate.load_state_dict(sd)
    drl = opt = None
    print(f"  {REFERENCE}: building it from our weights", flush=True)
    try:  # another transformers or PEFT than requirements-test.txt's may not build it: ours' figures stand
        ref = reference_model(model)
        peft_model, opt = bench.peft_lora(ref)
        parity = same_function(model, ref, peft_model, x[:1, : min(seq, 256) + 1], autocast)
    except Exception as e:
        out[REFERENCE] = {"error": f"not built: {type(e).__name__}: {str(e)[:300]}"}
        print(f"reference skipped: {out[REFERENCE]['error']}", flush=True)
        return out, None
    if not (parity["logits_rel_diff"] < 0.05 and parity["moe_rel_diff"] < 0.1):
        failures.append(f"the reference computes another function than ours: {parity}")
    del model  # only the reference's weights stay for its peak memory
    print(f"  {REFERENCE}: {warmup} + {steps} steps", flush=True)
    try:
        reset_peak(device)
        times = reference_steps(peft_model, opt, x, autocast, warmup, steps, device)
        peak = peak_gib(device)
        phases, kernels, why = counted_step(functools.partial(reference_ops, peft_model, opt, x, autocast), device)
        flops = bench.step_flops(cfg, tokens, seq, 16.0, ("gate_proj", "up_proj", "down_proj"))[1]
        out[REFERENCE] = figures(times, flops, tokens, peak, phases, kernels, why, rate)
    except Exception as e:  # out of memory, say: a finding about the reference, not a failure of ours
        out[REFERENCE] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out, parity


def print_step(out: dict, parity, rate, device: str):
    rows = []
    for name, r in out.items():
        if "error" in r:
            rows.append([name, r["error"]] + [""] * 8)
            continue
        s = r["step_s"]
        ms = f"{s['median'] * 1e3:.0f} [{s['min'] * 1e3:.0f}..{s['max'] * 1e3:.0f}]"
        rows.append([name, f"{r['tokens_per_s']:,.0f}", ms,
                     "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                     f"{r['mfu_vs_h200_bf16']:.1%}" if device == "cuda" else "n/a",
                     f"{r['mfu_vs_measured_matmul']:.1%}", f"{r['ops_per_step']:,} ({r['computing_ops_per_step']:,})",
                     r["grouped_mm_per_step"], "n/a" if r["cuda_kernels_per_step"] is None else
                     f"{r['cuda_kernels_per_step']:,}", f"{r['step_tflop']:.2f}"])
    bench.table(["configuration", "tokens/s", "step ms median [min..max]", "peak GiB (allocated)",
                 f"MFU vs {H200_BF16 / 1e12:.0f} TFLOP/s", f"MFU vs measured {rate / 1e12:.3g} TFLOP/s",
                 "aten ops per step (computing)", "grouped_mm per step", "CUDA kernels per step", "TFLOP per step"],
                rows)
    print(f"MFU: model FLOPs per step (bench.step_flops; the recomputation of gradient checkpointing not counted) "
          f"per second, over {H200_BF16 / 1e12:.0f} TFLOP/s (assumed: the dense bf16 rate an H200 reaches on an "
          f"8192^3 matmul) and over the bf16 matmul rate measured here. Operators: aten operators dispatched in one "
          f"step (forward, backward with recomputation, DR-LoRA statistics, clip, AdamW); computing = views left "
          f"out. CUDA kernels: kernels, copies and memsets torch.profiler saw in that step.\n")
    if parity:
        print(f"Same weights, same function: ours and the reference on {parity['tokens']} tokens: logits differ by "
              f"{parity['logits_rel_diff']:.2e} (relative norm, bf16), the MoE blocks alone by at most "
              f"{parity['moe_rel_diff']:.2e}; loss {parity['loss_ours']:.4f} vs {parity['loss_reference']:.4f}.\n")


# -----------------------------------------------------------------------------
# 2. train.py: growth, a kill and a resume


DETERMINISTIC = ("import runpy, sys, torch; torch.use_deterministic_algorithms(True); sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")  # then the script and its flags


def small_checkpoint(folder: str, tiny: bool) -> tuple[str, str]:
    """An OLMoE-shaped base (random weights, byte tokenizer) and an arithmetic task in folder."""
    tok = hf.ByteTokenizer()
    size = dict(hidden_size=32, n_layer=2, n_head=2, n_kv_head=2, n_experts=8, top_k=2, intermediate_size=16) if tiny \
        else dict(hidden_size=256, n_layer=4, n_head=4, n_kv_head=4, n_experts=64, top_k=8, intermediate_size=128)
    cfg = moe.MoEConfig(model_type="olmoe", vocab_size=tok.vocab_size, max_seq_len=128, pad_id=tok.pad_id,
                        eos_id=tok.eos_id, tokenizer="byte", **size)
    model = moe.MoETransformer(cfg)
    model.init_weights(seed=0)
    base, task = os.path.join(folder, "base"), os.path.join(folder, "task")
    hf.save_pretrained(model, base)
    arithmetic.prepare(out_dir=task, sizes={"train": 400, "val": 16, "test": 16}, seed=0)
    return base, task


def train(base, task, out, device, deterministic: bool, *extra, kill_at=None) -> subprocess.CompletedProcess:
    argv = ["--model", base, "--preset", "tiny", "--task", task, "--out_dir", out, "--device", device,
            "--steps", str(RESUME_STEPS), "--batch_size", "8", "--grad_accum", "2", "--block_size", "128",
            "--r_init", "2", "--r_target", "4", "--r_max", "8", "--dT", str(DT), "--dropout", "0.1",
            "--grad_ckpt", "true", "--eval_base", "false", "--eval_interval", "1000", "--eval_samples", "4",
            "--max_new_tokens", "3", "--log_interval", "5", "--ckpt_interval", "10", *extra]
    script = ["train.py"] if kill_at is None else ["tools/kill_at.py", str(kill_at)]  # SIGKILL as step kill_at starts
    cmd = [sys.executable, *(["-c", DETERMINISTIC] if deterministic else []), *script, *argv]
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS's deterministic workspace
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def final_state(out: str) -> dict:
    from safetensors.torch import load_file

    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)
    return {"step": ck["step"], "trainable": ck["trainable"], "ranks": ck["drlora"]["ranks"], "f": ck["drlora"]["f"],
            "g": ck["drlora"]["g"], "loss": ck["history"]["loss"],
            "events": [e["step"] for e in ck["history"]["events"]],
            "adapter": load_file(os.path.join(out, "adapter.safetensors"))}


def compare(a: dict, b: dict) -> dict:
    """exact: every tensor and loss equal bit for bit; else how far apart (relative norm over all
    trainable tensors, largest loss difference)."""
    same = lambda x, y: x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)  # noqa: E731
    exact = (same(a["trainable"], b["trainable"]) and same(a["adapter"], b["adapter"]) and same(a["g"], b["g"])
             and torch.equal(a["ranks"], b["ranks"]) and torch.equal(a["f"], b["f"]) and a["loss"] == b["loss"])
    num = sum((a["trainable"][k].double() - b["trainable"][k].double()).pow(2).sum() for k in a["trainable"])
    den = sum(a["trainable"][k].double().pow(2).sum() for k in a["trainable"])
    return {"exact": exact, "ranks_equal": torch.equal(a["ranks"], b["ranks"]),
            "adapter_rel_diff": (num / den).sqrt().item(),
            "loss_max_abs_diff": max(abs(x - y) for x, y in zip(a["loss"], b["loss"]))}


def section_resume(device: str, tiny: bool, failures: list) -> dict:
    report = {"steps": RESUME_STEPS, "killed_after": KILL_AFTER, "dT": DT}
    with tempfile.TemporaryDirectory() as tmp:
        base, task = small_checkpoint(tmp, tiny)
        runs = {}

        def go(name, out, *extra, rc=0, deterministic=True, kill_at=None):
            t0 = time.time()
            p = train(base, task, os.path.join(tmp, out), device, deterministic, *extra, kill_at=kill_at)
            runs[name] = {"rc": p.returncode, "seconds": round(time.time() - t0, 1)}
            if p.returncode != rc:
                runs[name]["stderr"] = p.stderr[-3000:]
            if "grouped_mm failed" in p.stderr:
                failures.append(f"train.py {name}: the grouped path fell back to the loop: "
                                f"{p.stderr.split('grouped_mm failed')[1].splitlines()[0]}")
            print(f"  train.py {name}: exit {p.returncode} in {runs[name]['seconds']} s", flush=True)
            return p

        deterministic = True
        p = go("straight", "a")
        if p.returncode and "deterministic" in p.stderr:  # an operator without a deterministic kernel here
            report["no_deterministic_kernel"] = p.stderr.strip().splitlines()[-1][:300]
            deterministic = False
            p = go("straight", "a", deterministic=False)
        report["deterministic_algorithms"] = deterministic
        go("killed", "b", rc=-9, deterministic=deterministic, kill_at=KILL_AFTER + 1)
        resumed = go("resumed", "b", "--resume", deterministic=deterministic)
        report["runs"] = runs
        bad = [f"{n} exit {r['rc']}: {r.get('stderr', '')[-600:]}" for n, r in runs.items() if "stderr" in r]
        if bad or "resumed from" not in resumed.stdout:
            failures.append("train.py: " + ("; ".join(bad) or "the resumed run did not say 'resumed from'"))
            return report
        a, b = final_state(os.path.join(tmp, "a")), final_state(os.path.join(tmp, "b"))
        report["events"], report["ranks_per_layer"] = a["events"], a["ranks"].sum(-1).tolist()
        report["final_loss"] = a["loss"][-1]
        report["resumed_vs_straight"] = d = compare(a, b)
        want = list(range(0, RESUME_STEPS - DT + 1, DT))
        if a["events"] != want or b["events"] != want:
            failures.append(f"train.py: growth events at {a['events']} and {b['events']}, expected {want}")
        if not d["exact"]:
            go("straight again", "a2", deterministic=deterministic)
            noise = compare(a, final_state(os.path.join(tmp, "a2")))
            report["straight_vs_straight"] = noise
            tol = {k: 4 * noise[k] + RESUME_FLOOR for k in ("adapter_rel_diff", "loss_max_abs_diff")}
            report["tolerance"] = tol
            if noise["exact"]:
                failures.append(f"train.py: two straight runs agree bit for bit but the resumed one differs: {d}")
            elif any(d[k] > tol[k] for k in tol):
                failures.append(f"train.py: the resumed run is further from the straight one ({d}) than "
                                f"4x two straight runs' drift + {RESUME_FLOOR} ({tol})")
    return report


def print_resume(r: dict):
    if "resumed_vs_straight" not in r:
        print(f"train.py runs: {r.get('runs')}\n")
        return
    d = r["resumed_vs_straight"]
    rows = [[name, run["rc"], run["seconds"]] for name, run in r["runs"].items()]
    bench.table(["train.py run", "exit code", "seconds"], rows)
    how = ("bit for bit" if d["exact"] else
           f"NOT bit for bit: adapter {d['adapter_rel_diff']:.2e} (relative), losses {d['loss_max_abs_diff']:.2e}; "
           f"two straight runs: {r['straight_vs_straight']['adapter_rel_diff']:.2e}, "
           f"{r['straight_vs_straight']['loss_max_abs_diff']:.2e}")
    print(f"{r['steps']} steps, growth events at {r['events']}, killed after step {r['killed_after']} and resumed "
          f"(deterministic algorithms: {r['deterministic_algorithms']}): ranks per layer {r['ranks_per_layer']}, "
          f"final loss {r['final_loss']:.4f}; resumed vs straight: {how}.\n")


# -----------------------------------------------------------------------------
# 3. FSDP: a model sharded over the processes of a torchrun


def section_fsdp(device: str, tiny: bool, failures: list) -> dict | None:
    """See the docstring's item 3. Returns the report on process 0, None on the others."""
    import fsdp
    import train

    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    mesh = dist.device_mesh.init_device_mesh(device, (world,))
    cfg = tiny_shape() if tiny else dataclasses.replace(bench.olmoe_1b_7b(), n_layer=FSDP_LAYERS)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    lcfg = drlora.DRLoRAConfig(r_init=8, r_target=16, r_max=32, dT=2, dropout=0.0)
    batch, seq = (2, 64) if tiny else (4, 2048)

    def micro(t, i):  # micro-batch i of step t, the same on every process count
        g = torch.Generator().manual_seed(1000 * t + i)
        x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
        return x[:, :-1], x[:, 1:], None

    folder = [tempfile.mkdtemp(prefix="fsdp_check_") if rank == 0 else None]
    dist.broadcast_object_list(folder)  # one machine: every process reads the file process 0 writes
    base, adapter = os.path.join(folder[0], "base"), os.path.join(folder[0], "adapter.safetensors")
    if rank == 0:
        model = moe.MoETransformer(cfg)
        model.init_weights(seed=0)
        hf.save_pretrained(model.to(dtype), base)
        del model
    dist.barrier()
    t0 = time.time()
    model, drl = fsdp.from_pretrained(base, mesh, lcfg, FSDP_STEPS, seed=0, dtype=dtype)
    load_s = time.time() - t0
    model.gradient_checkpointing = True
    opt = torch.optim.AdamW(drl.trainable_parameters(), lr=1e-4, weight_decay=0.0)
    reset_peak(device)
    times, losses = [], []
    for t in range(FSDP_STEPS):
        mb = [micro(t, m * world + rank) for m in range(2)]
        sync(device)
        t0 = time.perf_counter()
        loss = drlora.train_step(model, drl, opt, mb, t, 1.0, autocast)[0]
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = peak_gib(device)
    trainable, _ = fsdp.gather(model, opt)
    fsdp.save_adapter(model, drl, trainable, adapter)
    train.check_replicas(drl, world, print)
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    sharded = {"losses": losses, "events": [e["step"] for e in drl.history], "ranks": drl.ranks.tolist()}
    del model, drl, opt, trainable
    dist.destroy_process_group()
    if rank:
        return None
    print(f"  FSDP on {world} processes: loaded in {load_s:.1f} s, {FSDP_STEPS} steps; now one process", flush=True)
    reset_peak(device)
    one = hf.from_pretrained(base, dtype=dtype, device=device)
    one.gradient_checkpointing = True
    torch.manual_seed(0)
    d1 = drlora.DRLoRA(one, lcfg, FSDP_STEPS)
    opt1 = torch.optim.AdamW(d1.trainable_parameters(), lr=1e-4, weight_decay=0.0)
    alone = [drlora.train_step(one, d1, opt1, [micro(t, i) for i in range(2 * world)], t, 1.0, autocast)[0].item()
             for t in range(FSDP_STEPS)]
    from safetensors import safe_open
    with safe_open(adapter, framework="pt") as f:
        written = [f.get_tensor(f"layers.{l}.ranks").tolist() for l in range(len(d1.blocks))]
    diff = max(abs(a - b) for a, b in zip(sharded["losses"], alone))
    worked = fsdp.memory(cfg, lcfg, world, dtype)
    report = {"world": world, "shape": {k: v for k, v in vars(cfg).items() if k != "hf"}, "tokens_per_step":
              2 * world * batch * seq, "load_s": load_s, "step_s": bench.median(times[1:] or times),
              "peak_gib": peaks, "worked_out_gib": {k: v / 2**30 for k, v in worked.items()},
              "losses": sharded["losses"], "losses_one_process": alone, "loss_max_abs_diff": diff,
              "events": sharded["events"], "ranks_equal": sharded["ranks"] == d1.ranks.tolist(),
              "adapter_ranks_equal": written == d1.ranks.tolist()}
    if sharded["events"] != [e["step"] for e in d1.history] or not report["ranks_equal"]:
        failures.append(f"FSDP: growth differs from one process: events {sharded['events']} vs "
                        f"{[e['step'] for e in d1.history]}, ranks {sharded['ranks']} vs {d1.ranks.tolist()}")
    if not report["adapter_ranks_equal"]:
        failures.append(f"FSDP: the gathered adapter's ranks {written} are not the run's")
    if not diff <= FSDP_LOSS_TOL[device]:
        failures.append(f"FSDP: losses differ from one process's by {diff:.3g} > {FSDP_LOSS_TOL[device]}")
    shutil.rmtree(folder[0], ignore_errors=True)
    return report


def print_fsdp(r: dict, device: str):
    w = r["worked_out_gib"]
    bench.table(["processes", "load s", "step s (median)", "tokens/s", "peak GiB per process (measured)",
                 "worked out, no activations", "loss diff vs one process", "growth events"],
                [[r["world"], f"{r['load_s']:.1f}", f"{r['step_s']:.3f}", f"{r['tokens_per_step'] / r['step_s']:,.0f}",
                  "n/a" if r["peak_gib"][0] is None else " / ".join(f"{p:.3g}" for p in r["peak_gib"]),
                  f"{w['total']:.3g} (base {w['base']:.3g}, trainable {w['trainable']:.3g}, "
                  f"block {w['block_gathered']:.3g})",
                  f"{r['loss_max_abs_diff']:.2e}", r["events"]]])


# -----------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the real GPU path, measured in one command (see the docstring)")
    ap.add_argument("--device", default="auto", help="auto (cuda if there is one) | cuda | cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (2 x 64 tokens): the code path in seconds")
    ap.add_argument("--out", default="", help="write the figures here as JSON")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per configuration (default 5; tiny 2)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 2; tiny 1)")
    ap.add_argument("--no-reference", action="store_true", help="skip transformers + PEFT")
    ap.add_argument("--no-train", action="store_true", help="skip the train.py runs")
    ap.add_argument("--fsdp", action="store_true", help="section 3 alone, under torchrun: FSDP over its processes")
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    if args.fsdp:
        return main_fsdp(args, device)
    cfg, batch, seq = (tiny_shape(), 2, 64) if args.tiny else (bench.olmoe_1b_7b(), 4, 2048)
    steps, warmup = args.steps or (2 if args.tiny else 5), args.warmup or (1 if args.tiny else 2)
    start, failures = time.time(), []
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    has = hasattr(torch.nn.functional, "grouped_mm")
    print(f"# drlora gpu_check: {name}, torch {torch.__version__}, F.grouped_mm {'present' if has else 'MISSING'}\n")
    if not has:
        failures.append(f"torch {torch.__version__} has no F.grouped_mm: the experts run as the per-expert loop")
    report = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "batch": batch, "seq": seq,
              "shape": {k: v for k, v in vars(cfg).items() if k != "hf"}, "h200_bf16_assumed": H200_BF16}
    why = "--no-reference" if args.no_reference else reference_missing()
    if why:
        print(f"reference skipped: transformers/peft missing ({why})\n" if not args.no_reference
              else "reference skipped: --no-reference\n")
    else:
        import peft
        import transformers

        report["reference_versions"] = {"transformers": transformers.__version__, "peft": peft.__version__}
    report["reference_skipped"] = why
    rate = report["matmul_bf16_flops"] = matmul_rate(device)
    print(f"section 1: {batch} x {seq} tokens, bf16, gradient checkpointing", flush=True)
    report["step"], report["parity"] = {}, None
    try:
        report["step"], report["parity"] = section_step(cfg, batch, seq, device, warmup, steps, not why, rate, failures)
    except Exception:  # section 2 and the JSON still come
        failures.append(f"section 1 crashed: {traceback.format_exc()[-2000:]}")
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if not args.no_train:
        print("section 2: train.py, growth, kill, resume", flush=True)
        try:
            report["resume"] = section_resume(device, args.tiny, failures)
        except Exception:
            failures.append(f"section 2 crashed: {traceback.format_exc()[-2000:]}")
    report["failures"], report["seconds"] = failures, round(time.time() - start, 1)
    print(f"\n### 1. Fine-tune step, {'tiny shape' if args.tiny else 'OLMoE-1B-7B shape'}, random bf16 weights, "
          f"{batch} x {seq} tokens, bf16 autocast, gradient checkpointing, {device}\n")
    print_step(report["step"], report["parity"], rate, device)
    if report.get("resume"):
        print("### 2. train.py: DR-LoRA with growth, killed and resumed\n")
        print_resume(report["resume"])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"total {report['seconds']:.0f} s" + (f"; figures in {args.out}" if args.out else ""))
    for msg in failures:
        print(f"FAILED: {msg}")
    return 1 if failures else 0



def main_fsdp(args, device: str) -> int:
    if "WORLD_SIZE" not in os.environ:
        sys.exit("error: --fsdp runs under torchrun: torchrun --nproc_per_node N tools/gpu_check.py --fsdp")
    start, failures = time.time(), []
    r = section_fsdp(device, args.tiny, failures)
    if r is None:  # process 0 reports
        return 0
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n### 3. FSDP: {'tiny shape' if args.tiny else f'OLMoE-1B-7B shape, {FSDP_LAYERS} layers'}, random "
          f"weights, {r['world']} x {name}, torch {torch.__version__}\n")
    print_fsdp(r, device)
    r.update(device=name, torch=torch.__version__, failures=failures, seconds=round(time.time() - start, 1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
    for msg in failures:
        print(f"FAILED: {msg}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
