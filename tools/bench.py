"""
How fast and how big DR-LoRA fine-tuning is on this machine, measured in one run and
printed as markdown tables.

    python tools/bench.py            # the full run (RESULTS.md says how long it takes)
    python tools/bench.py --quick    # fewer configurations, rounds and points
    pip install peft           # for the transformers + PEFT reference (skipped without it)

What is measured, on a tiny OLMoE (hidden 256, 4 layers, 4 heads, 16 experts top-4,
expert width 128, vocab 8192), batch 8 x 256 tokens, fp32, 2 threads:

1. Fine-tune step throughput (forward, backward, AdamW) of ours, DR-LoRA at three
   points of growth (every expert at 8; mixed, mean 12; mean 16 spread over 8..32)
   and uniform LoRA r=16, against transformers' OlmoeForCausalLM with PEFT LoRA r=16
   on its fused experts (`target_parameters`), built from the same weights.
   Interleaved: every round runs one step of every configuration, in a rotating order,
   on the same batches; figures are medians over the rounds after warm-up, with
   min..max, and "paired" ratios are medians of the per-round ratios.
2. DR-LoRA's own overhead against uniform LoRA at the same active ranks (16 each):
   end to end, and the statistics alone (observe + step, timed inside the step).
3. Scaling: forward and step time against the number of experts (top-k fixed) and
   against top-k (experts fixed), at fixed tokens.
4. Utilisation: model FLOP/s of the step (formula in step_flops) over this machine's
   fp32 matmul rate, measured by a 2048^3 matmul once per round of section 1.
5. On CUDA only: an OLMoE-1B-7B-shaped model, bf16 autocast, sequence 4096, with and
   without gradient checkpointing (MFU against 989 TFLOP/s bf16 dense, H100/H200).
6. Not timed: aten operators per MoE layer per fine-tune step (64 experts top-8, widths
   256/128), for the per-expert loop and the grouped path (`python tools/bench.py --ops` alone).
   Each operator is at least one kernel launch on a GPU, so this counts what a GPU step pays
   in launches and Python overhead, whatever this machine's speed.

Peak memory on CPU: each configuration runs in a fresh subprocess. After the imports
and one step of a tiny model of the same kind (lazy imports, first-use set-up, library
code paged in), we read the resident set (VmRSS), build the model, adapters and
optimizer, read it again, reset the kernel's high-water mark (/proc/self/clear_refs),
run 2 steps and read VmHWM. "total" = peak minus the first reading: frozen weights,
adapters, activations, gradients, AdamW state. Resident file pages count: transformers
memory-maps the safetensors file, so the reference's frozen weights are mostly file
pages, paged in by its first forward. glibc's malloc thresholds are fixed in the
subprocess (MALLOC_ENV) so that RSS follows the live tensors and repeats to within 1 MiB.

LoRA dropout is 0 everywhere: PEFT refuses dropout on fused experts, and both sides
must do the same math (DR-LoRA's default is 0.1).

The machine may be shared: the load average is printed at the start and the end. With
other processes on the cores, a 2-thread step waits for whichever thread was
descheduled, and steps come out 3x to 15x slower in bursts; interleaving keeps the
ratios fairer than the absolute figures, but only a quiet machine gives clean numbers.
"""
import argparse
import collections
import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import drlora  # noqa: E402
import hf  # noqa: E402
import moe  # noqa: E402

# -----------------------------------------------------------------------------
# the setting


def tiny_olmoe(n_experts: int = 16, top_k: int = 4) -> moe.MoEConfig:
    return moe.MoEConfig(model_type="olmoe", vocab_size=8192, hidden_size=256, n_layer=4, n_head=4, n_kv_head=4,
                         n_experts=n_experts, top_k=top_k, intermediate_size=128, max_seq_len=256)


BATCH, SEQ = 8, 256
N_BATCHES = 4  # distinct random batches, cycled; every configuration sees the same sequence
TOTAL_STEPS = 10_000  # for the growth schedule only: its events (every 200 steps) never fall in a timed step
LR = 1e-4
MATMUL_N = 2048  # the peak probe: one (n, n) @ (n, n) fp32 matmul


def drlora_config(**kw) -> drlora.DRLoRAConfig:
    # dropout 0: PEFT's fused-expert LoRA refuses dropout, and the comparison must do the same math
    return drlora.DRLoRAConfig(**{"r_init": 8, "r_target": 16, "r_max": 32, "dropout": 0.0, **kw})


def rank_pattern(kind: str, E: int, layer: int) -> list[int]:
    """Ranks of the E experts of one layer at a point of growth (rolled by layer, so that
    layers differ). "start": all 8; "mixed": half 8, half 16 (mean 12); "end": a quarter at
    32, a quarter at 16, half at 8 (mean 16, the per-layer budget); "flat16": all 16."""
    q = E // 4
    r = {"start": [8] * E, "mixed": [8] * (E // 2) + [16] * (E - E // 2),
         "end": [32] * q + [16] * q + [8] * (E - 2 * q), "flat16": [16] * E}[kind]
    s = (layer * 5) % E
    return r[s:] + r[:s]


# name -> (kind, settings). Ours: DRLoRAConfig overrides, a rank pattern, whether the
# DR-LoRA statistics run, [whether the loss is taken on full logits, as the reference's is,
# instead of moe.HeadLoss]. Reference: transformers' experts implementation.
CONFIGS = {
    "ours DR-LoRA, all r=8 (start)": ("ours", dict(), "start", True),
    "ours DR-LoRA, mixed (mean r=12)": ("ours", dict(), "mixed", True),
    "ours DR-LoRA, end (mean r=16, 8..32)": ("ours", dict(), "end", True),
    "ours DR-LoRA, all r=16": ("ours", dict(), "flat16", True),
    "ours LoRA r=16": ("ours", dict(method="lora", r_max=16), None, False),
    "ours LoRA r=16, loss on full logits": ("ours", dict(method="lora", r_max=16), None, False, True),
    "ours LoRA r=16, gate+up+down": ("ours", dict(method="lora", r_max=16, targets=("gate_proj", "up_proj", "down_proj")),
                                     None, False),
    "ref HF+PEFT r=16 (grouped_mm)": ("ref", "grouped_mm"),
    "ref HF+PEFT r=16 (eager)": ("ref", "eager"),
}
REF = "ref HF+PEFT r=16 (grouped_mm)"  # transformers' default experts implementation: the main reference
QUICK = ["ours DR-LoRA, all r=8 (start)", "ours DR-LoRA, all r=16", "ours LoRA r=16", REF]
PEFT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def batches(vocab: int, n: int = N_BATCHES, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g) for _ in range(n)]


# -----------------------------------------------------------------------------
# FLOPs


def step_flops(cfg: moe.MoEConfig, tokens: int, seq: int, r_mean: float, targets) -> tuple[float, float]:
    """Matmul FLOPs of one forward and of one fine-tuning step (forward + backward), for
    `tokens` = N tokens in sequences of `seq` = T, LoRA of mean rank r on `targets`. Per layer:

        proj   = 2 N H (nh + 2 nkv) hd + 2 N nh hd H     q, k, v, o projections (frozen)
        core   = 2 N T nh hd                             causal QK^T and AV (T/2 keys on average)
        router = 2 N H E                                 trained after warm-up
        expert = 2 N K 3 H I                             frozen, on the K routed copies
        lora   = 2 N K sum_p r (d_in + d_out)            trained
    and head = 2 N H vocab once.

        forward  = L (proj + core + router + expert + lora) + head
        backward = (L - 1) (proj + 2 core) + L (2 router + expert + 2 lora) + head

    Backward: a frozen matmul costs 1x its forward (input gradient only), a trained one 2x
    (input and weight gradients), attention's core 2x (dQ, dK, dV, dP); layer 0's attention
    has nothing to differentiate (its input is the frozen embedding). Approximate: layer 0's
    gate_proj input gradient is counted, though autograd skips it. Elementwise work (norms,
    softmax, SiLU, AdamW) is not counted, the usual convention. The LoRA term uses the mean
    rank, exact when routing is balanced."""
    N, T, L, H, E, K, I = tokens, seq, cfg.n_layer, cfg.hidden_size, cfg.n_experts, cfg.top_k, cfg.intermediate_size
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    proj = 2 * N * H * (nh + 2 * nkv) * hd + 2 * N * nh * hd * H
    core = 2 * N * T * nh * hd
    router = 2 * N * H * E
    expert = 2 * N * K * 3 * H * I
    dims = {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    lora = sum(2 * N * K * r_mean * sum(dims[p]) for p in targets)
    head = 2 * N * H * cfg.vocab_size
    fwd = L * (proj + core + router + expert + lora) + head
    bwd = (L - 1) * (proj + 2 * core) + L * (2 * router + expert + 2 * lora) + head
    return fwd, fwd + bwd


# -----------------------------------------------------------------------------
# the runners: one object per configuration, step() = one optimizer step


def full_logits_loss(logits, y):
    """Cross-entropy on materialised (B, T, vocab) logits: the reference's loss, and ours in the
    comparison row that takes it the same way (ours otherwise uses moe.HeadLoss)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


class Ours:
    def __init__(self, mcfg: moe.MoEConfig, overrides: dict, pattern: str | None, stats: bool, full_logits=False):
        self.model = moe.MoETransformer(mcfg)
        self.model.init_weights(seed=0)
        self.lcfg = drlora_config(**overrides)
        self.drl = drlora.DRLoRA(self.model, self.lcfg, total_steps=TOTAL_STEPS)
        if pattern:
            for l, blk in enumerate(self.model.moe_layers()):
                blk.experts.lora.set_ranks(torch.tensor(rank_pattern(pattern, mcfg.n_experts, l)))
        self.stats, self.full_logits = stats, full_logits
        self.opt = torch.optim.AdamW(self.drl.trainable_parameters(), lr=LR, weight_decay=0)
        self.t = self.drl.t_warm + 1  # past warm-up: the router trains, as for most of a run
        self.model.train()
        self.r_mean = self.drl.ranks.float().mean().item()
        self.targets = self.lcfg.targets

    def forward(self, x):
        with torch.no_grad():
            return self.model(x).logits

    def step(self, x, y):
        """One optimizer step; returns (seconds, of which DR-LoRA statistics)."""
        t0 = time.perf_counter()
        if self.full_logits:  # the reference's way: materialise (B, T, vocab) logits, then the loss
            out = self.model(x)
            out = out._replace(loss=full_logits_loss(out.logits, y))
        else:
            out = self.model(x, targets=y)
        s = 0.0
        if self.stats:
            s0 = time.perf_counter()
            self.drl.observe(out.routers)
            s += time.perf_counter() - s0
        out.loss.backward()
        if self.stats:
            s0 = time.perf_counter()
            event = self.drl.step(self.t)
            s += time.perf_counter() - s0
            assert event is None, "a growth event fell in a timed step"
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return time.perf_counter() - t0, s


class Reference:
    """transformers' OlmoeForCausalLM with PEFT LoRA r=16 on the fused experts. PEFT cannot
    target up_proj without gate_proj (they are one gate_up_proj tensor), so it adapts gate
    too. The router trains, as ours does after warm-up. Loss on full logits (full_logits_loss),
    the way a transformers user takes it."""

    def __init__(self, ckpt: str, impl: str):
        import transformers

        hf = transformers.OlmoeForCausalLM.from_pretrained(ckpt, dtype=torch.float32, experts_implementation=impl)
        self.model, self.opt = peft_lora(hf)
        self.r_mean, self.targets = 16.0, ("gate_proj", "up_proj", "down_proj")

    def logits(self, x):
        return self.model(input_ids=x, use_cache=False).logits

    def forward(self, x):
        with torch.no_grad():
            return self.logits(x)

    def step(self, x, y):
        t0 = time.perf_counter()
        full_logits_loss(self.logits(x), y).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, 0.0


def peft_lora(hf_model):
    """PEFT LoRA r=16 on a transformers OLMoE's fused experts, its routers trained: (PEFT model, AdamW)."""
    import peft

    pc = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[], target_parameters=PEFT_TARGETS)
    model = peft.get_peft_model(hf_model, pc)  # lora_alpha / r = 2 = our scale
    for layer in hf_model.model.layers:
        layer.mlp.gate.weight.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0)
    model.train()
    return model, opt


def build(name: str, ckpt: str | None):
    spec = CONFIGS[name]
    if spec[0] == "ours":
        return Ours(tiny_olmoe(), *spec[1:])
    return Reference(ckpt, spec[1])


def reference_available() -> str | None:
    """None if transformers and PEFT can build the reference, else why not."""
    try:
        import peft
        import transformers
    except ImportError as e:
        return f"{e.name} is not installed (pip install transformers peft)"
    try:
        with tempfile.TemporaryDirectory() as d:
            tiny = moe.MoETransformer(moe.MoEConfig(vocab_size=64, hidden_size=32, n_head=2, n_kv_head=2, n_layer=1,
                                                    intermediate_size=16, max_seq_len=16))
            tiny.init_weights(seed=0)
            hf.save_pretrained(tiny, d)
            Reference(d, "eager")
    except Exception as e:  # an older or newer PEFT that cannot adapt fused experts
        return (f"PEFT {peft.__version__} / transformers {transformers.__version__} cannot put LoRA on fused experts "
                f"with target_parameters={PEFT_TARGETS}: {type(e).__name__}: {e}")
    return None


# -----------------------------------------------------------------------------
# statistics and printing


def median(v):
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def spread(v, scale=1.0, fmt="{:.2f}"):
    return f"{fmt.format(median(v) * scale)} [{fmt.format(min(v) * scale)}..{fmt.format(max(v) * scale)}]"


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print()


def matmul_rate(a, b) -> float:
    """FLOP/s of one fp32 (n, k) @ (k, m) matmul."""
    t0 = time.perf_counter()
    a @ b
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------
# 1, 2, 4: interleaved throughput, overhead, utilisation


def section_throughput(names, ckpt, rounds: int, warmup: int):
    runners = {}
    for name in names:
        runners[name] = build(name, ckpt)
    data = batches(8192)
    probe = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    if REF in runners and "ours LoRA r=16" in runners:  # same weights, same function (untrained adapters add 0)
        x = data[0][:2, :-1]
        diff = (runners["ours LoRA r=16"].forward(x) - runners[REF].forward(x)).abs().max().item()
        print(f"same weights check: max |logits ours - transformers| = {diff:.2e} (fp32)\n")
    times = {n: [] for n in names}
    stats = {n: [] for n in names}
    peak = []
    order = list(names)
    for rnd in range(warmup + rounds):
        t_round = time.perf_counter()
        for name in order:
            b = data[rnd % N_BATCHES]
            dt, s = runners[name].step(b[:, :-1], b[:, 1:])
            if rnd >= warmup:
                times[name].append(dt)
                stats[name].append(s)
        rate = matmul_rate(*probe)
        if rnd >= warmup:
            peak.append(rate)
        order = order[1:] + order[:1]  # rotate: no configuration always runs first
        print(f"  round {rnd + 1}/{warmup + rounds}{' (warm-up)' if rnd < warmup else ''}: "
              f"{time.perf_counter() - t_round:.1f} s", flush=True)
    # a growth event: once every dT steps, timed once on a runner that has statistics
    grow_s = None
    if "ours DR-LoRA, all r=8 (start)" in runners:
        r = runners["ours DR-LoRA, all r=8 (start)"]
        t0 = time.perf_counter()
        r.drl.grow(r.t)
        grow_s = time.perf_counter() - t0
    return runners, times, stats, peak, grow_s


def report_throughput(runners, times, stats, peak, grow_s, memory):
    tokens = BATCH * SEQ
    peak_rate = median(peak)
    print(f"### 1. Fine-tune step, {BATCH} x {SEQ} tokens, fp32, {torch.get_num_threads()} threads\n")
    print(f"fp32 matmul rate of this machine ({MATMUL_N}^3, once per round): median "
          f"{spread(peak, 1e-9, '{:.1f}')} GFLOP/s; MFU below = model FLOP/s (step_flops) / the median.\n")
    ref = REF if REF in times else None
    eager = "ref HF+PEFT r=16 (eager)" if "ref HF+PEFT r=16 (eager)" in times else None
    rows = []
    for name in times:
        t = times[name]
        run = runners[name]
        _, flops = step_flops(tiny_olmoe(), tokens, SEQ, run.r_mean, run.targets)
        row = [name, ",".join(p.replace("_proj", "") for p in run.targets), f"{run.r_mean:.0f}",
               f"{tokens / median(t):.0f}", spread(t)]
        for base in (ref, eager):
            if base is None:
                continue
            paired = [tb / tc for tb, tc in zip(times[base], t)]
            row.append(f"{median(times[base]) / median(t):.2f}x; best {min(times[base]) / min(t):.2f}x; "
                       f"paired {spread(paired)}")
        row.append(f"{flops / median(t) / 1e9:.1f} GFLOP/s = {flops / median(t) / peak_rate:.1%}")
        rows.append(row)
    header = ["configuration", "LoRA on", "mean r", "tokens/s", "step s median [min..max]"]
    header += [f"speed vs {b}" for b in (ref, eager) if b] + ["model FLOP/s, MFU"]
    table(header, rows)
    print("Speed ratios: of the medians; \"best\" = of the fastest steps (least disturbed by other processes); "
          "\"paired\" = median [min..max] of the per-round ratios.\n")
    if memory:
        rows = []
        for name, m in memory.items():
            if "error" in m:
                rows.append([name, m["error"], "", "", ""])
                continue
            vs = f"{m['total'] / memory[ref]['total']:.2f}x" if ref in memory and "total" in memory[ref] else "n/a"
            rows.append([name] + [f"{m[k] / 2**20:.1f}" for k in ("built", "training", "total")] + [vs])
        print("Peak memory, a fresh subprocess per configuration (fixed malloc thresholds, see MALLOC_ENV): "
              "RSS after imports and a tiny warm-up -> after building model, adapters, optimizer "
              "(\"built\") -> high-water mark over 2 steps (\"training\" adds activations, gradients, AdamW "
              "state). Total = built + training.\n")
        table(["configuration", "built MiB", "training MiB", "total MiB", "total vs ref"], rows)
    if ref:
        full = "ours LoRA r=16, loss on full logits"  # a handicap for comparison, not a way to run ours
        slowest = max((n for n in times if n.startswith("ours") and n != full), key=lambda n: median(times[n]))
        print(f"Target ours >= 1.3x the reference's tokens/s: ours LoRA r=16 is "
              f"{median(times[ref]) / median(times['ours LoRA r=16']):.2f}x, the slowest of ours "
              f"({slowest}) {median(times[ref]) / median(times[slowest]):.2f}x"
              + (f"; with the loss on full logits as the reference takes it, {median(times[ref]) / median(times[full]):.2f}x"
                 if full in times else "") + ".\n")
    # 2. overhead
    a, b = "ours DR-LoRA, all r=16", "ours LoRA r=16"
    if a in times and b in times:
        print("### 2. DR-LoRA's overhead over uniform LoRA at the same active ranks (every expert at 16)\n")
        paired = [ta / tb - 1 for ta, tb in zip(times[a], times[b])]
        rows = [["step time, end to end", f"{median(times[a]) / median(times[b]) - 1:+.1%}",
                 f"best steps {min(times[a]) / min(times[b]) - 1:+.1%}; paired {spread(paired, 100, '{:+.1f}')} %",
                 "<= 3 %"]]
        for name in times:
            if runners[name].__class__ is Ours and runners[name].stats:
                frac = [s / (t - s) for s, t in zip(stats[name], times[name])]
                rows.append([f"statistics alone (observe + step), {name.replace('ours DR-LoRA, ', '')}",
                             f"{median(frac):+.1%}", f"{spread(stats[name], 1e3, '{:.1f}')} ms per step", "<= 3 %"])
        if grow_s is not None:
            rows.append(["one growth event (every dT=200 steps)", f"{grow_s / 200 / median(times[b]):+.2%} amortised",
                         f"{grow_s * 1e3:.1f} ms once", ""])
        if memory and "total" in memory.get(a, {}) and "total" in memory.get(b, {}):
            rows.append(["peak memory, total (r_max 32 slots against 16, statistics)",
                         f"{memory[a]['total'] / memory[b]['total'] - 1:+.1%}",
                         f"{memory[a]['total'] / 2**20:.1f} vs {memory[b]['total'] / 2**20:.1f} MiB", "<= 5 %"])
        table(["what", "overhead", "detail", "target"], rows)
        print("End to end includes what DR-LoRA's layout costs beyond the statistics: A and B allocated at r_max=32 "
              "(gradients and AdamW state over all 32 slots) against LoRA's 16. The statistics line isolates "
              "observe() + step(), timed inside each step.\n")


# -----------------------------------------------------------------------------
# memory: one fresh process per configuration


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def warm_up_libraries(name: str):
    """One step of a tiny model of the same kind before the first reading, so that lazy imports
    and first-use set-up are not counted (the first torch.optim step alone pulls in about 70 MiB)."""
    tiny = moe.MoEConfig(vocab_size=64, hidden_size=32, n_head=2, n_kv_head=2, n_layer=1, intermediate_size=16,
                         max_seq_len=16)
    spec = CONFIGS[name]
    with tempfile.TemporaryDirectory() as d:
        if spec[0] == "ours":
            run = Ours(tiny, spec[1], None, spec[3])
        else:
            m = moe.MoETransformer(tiny)
            m.init_weights(seed=0)
            hf.save_pretrained(m, d)
            run = Reference(d, spec[1])
        x = torch.randint(0, 64, (2, 9))
        run.step(x[:, :-1], x[:, 1:])


def memory_child(name: str, ckpt: str | None, steps: int = 2):
    """Runs in its own process; prints resident memory in bytes: built = after building model,
    adapters and optimizer; total = high-water mark over `steps` steps; both over the reading
    taken after imports and a warm-up step on a tiny model of the same kind."""
    warm_up_libraries(name)
    b = batches(8192, 1)[0]
    gc.collect()
    before = rss_bytes("VmRSS")
    run = build(name, ckpt)
    gc.collect()
    built = rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    for _ in range(steps):
        run.step(b[:, :-1], b[:, 1:])
    peak = rss_bytes("VmHWM")
    print(json.dumps({"built": built - before, "training": peak - built, "total": peak - before}))


# glibc's default mmap and trim thresholds adapt to the program, so the same run's peak RSS moves by
# +-25 MiB from one process to the next. Fixed small thresholds return every freed large block to the
# kernel at once: RSS then follows the live tensors, reproducible to well under 1 MiB.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measure_memory(names, ckpt, threads: int) -> dict:
    if not os.path.exists("/proc/self/clear_refs"):
        print("peak memory skipped: needs Linux /proc/self/clear_refs\n")
        return {}
    out = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--threads", str(threads)]
        if ckpt:
            cmd += ["--ckpt", ckpt]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
        if p.returncode:
            out[name] = {"error": f"subprocess failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
        else:
            out[name] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  memory: {name}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" if isinstance(v, int) else v
                                                for k, v in out[name].items()), flush=True)
    return out


# -----------------------------------------------------------------------------
# 3. scaling with experts and top-k


def section_scaling(experts, topks, rounds: int, warmup: int):
    points = [(E, 4) for E in experts] + [(16, K) for K in topks if K != 4 or 16 not in experts]
    runners = {p: Ours(tiny_olmoe(*p), {}, "flat16", True) for p in points}  # DR-LoRA, every expert at 16
    data = batches(8192)
    fwd = {p: [] for p in points}
    step = {p: [] for p in points}
    order = list(points)
    for rnd in range(warmup + rounds):
        b = data[rnd % N_BATCHES]
        for p in order:
            t0 = time.perf_counter()
            runners[p].forward(b[:, :-1])
            f = time.perf_counter() - t0
            s, _ = runners[p].step(b[:, :-1], b[:, 1:])
            if rnd >= warmup:
                fwd[p].append(f)
                step[p].append(s)
        order = order[1:] + order[:1]
        print(f"  scaling round {rnd + 1}/{warmup + rounds}{' (warm-up)' if rnd < warmup else ''}", flush=True)
    print(f"### 3. Scaling, {BATCH * SEQ} tokens, DR-LoRA with every expert at r=16 (forward: no_grad)\n")
    for label, pts, base in (("experts (top-4)", [p for p in points if p[1] == 4], (min(experts), 4)),
                             ("top-k (16 experts)", sorted(p for p in points if p[0] == 16), (16, min(topks)))):
        rows = []
        for p in pts:
            rows.append([p[0], p[1], spread(fwd[p], 1e3, "{:.0f}"),
                         f"{median(fwd[p]) / median(fwd[base]):.2f}x (best {min(fwd[p]) / min(fwd[base]):.2f}x)",
                         spread(step[p], 1e3, "{:.0f}"),
                         f"{median(step[p]) / median(step[base]):.2f}x (best {min(step[p]) / min(step[base]):.2f}x)"])
        print(f"Against {label}; ratios against E={base[0]}, K={base[1]}.\n")
        table(["experts", "top-k", "forward ms [min..max]", "forward ratio", "step ms [min..max]", "step ratio"], rows)
    E_lo, E_hi = (min(experts), 4), (max(experts), 4)
    r = median(fwd[E_hi]) / median(fwd[E_lo])
    print(f"Acceptance: forward time from {E_lo[0]} to {E_hi[0]} experts at top-4 = {r:.2f}x of the medians "
          f"({'within' if r <= 1.5 else 'NOT within'} 1.5x), {min(fwd[E_hi]) / min(fwd[E_lo]):.2f}x of the "
          f"fastest runs.\n")


# -----------------------------------------------------------------------------
# 5. GPU: an OLMoE-1B-7B-shaped model


def olmoe_1b_7b() -> moe.MoEConfig:
    """OLMoE-1B-7B's shape (allenai/OLMoE-1B-7B-0924's config.json), for random weights."""
    return moe.MoEConfig(model_type="olmoe", vocab_size=50304, hidden_size=2048, n_layer=16, n_head=16, n_kv_head=16,
                         n_experts=64, top_k=8, intermediate_size=1024, max_seq_len=4096)


def section_gpu(steps: int = 5, warmup: int = 2):
    print("### 5. GPU: OLMoE-1B-7B shape, random weights, bf16 autocast, batch 1 x 4096\n")
    if not torch.cuda.is_available():
        print("skipped: no CUDA device here (run `python tools/bench.py` on a CUDA machine for this section).\n")
        return
    model, drl, opt = shaped_model(olmoe_1b_7b(), "cuda")
    rows = []
    for ckpt in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            times, flops = shaped_steps(model, drl, opt, 4096, ckpt, warmup, steps)
        except torch.cuda.OutOfMemoryError as e:  # a smaller GPU than the H100/H200 this section is sized for
            rows.append([f"gradient checkpointing {'on' if ckpt else 'off'}", "out of memory", str(e)[:80], "", ""])
            opt.zero_grad(set_to_none=True)
            continue
        mem = torch.cuda.max_memory_allocated() / 2**30
        rows.append([f"gradient checkpointing {'on' if ckpt else 'off'}", f"{4096 / median(times):.0f}",
                     spread(times, 1e3, "{:.0f}"), f"{mem:.1f}", f"{flops / median(times) / 989e12:.1%}"])
    print(f"{torch.cuda.get_device_name()}; DR-LoRA end point (mean r=16); step FLOPs {flops / 1e12:.1f} T "
          f"(step_flops; recomputation with checkpointing is not counted).\n")
    table(["setting", "tokens/s", "step ms [min..max]", "peak GiB (allocated)", "MFU vs 989 TFLOP/s"], rows)


def shaped_model(cfg: moe.MoEConfig, device: str, lcfg: drlora.DRLoRAConfig | None = None, pattern="end"):
    """A model of cfg's shape with random bf16 weights drawn on device, then attach(): by default DR-LoRA
    r 8 -> 16 (r_max 32) at its "end" point of growth, and AdamW: what section 5 times (test_bench runs
    it tiny on the CPU; tools/gpu_check.py compares it with transformers + PEFT)."""
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no 28 GB fp32 copy on the way
    try:
        with torch.device(device):
            model = moe.MoETransformer(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # random weights, drawn on the device (init_weights draws on the CPU: slow at 7B)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return (model, *attach(model, lcfg or drlora.DRLoRAConfig(r_init=8, r_target=16, r_max=32), pattern))


def attach(model, lcfg: drlora.DRLoRAConfig, pattern: str | None = "end"):
    """Fresh adapters on every MoE layer (replacing any), ranks set to a point of growth (rank_pattern;
    None: every expert at r_init), and AdamW over them. Returns (DRLoRA, optimizer)."""
    drl = drlora.DRLoRA(model, lcfg, total_steps=TOTAL_STEPS)
    if pattern:
        device = model.lm_head.weight.device
        for l, blk in enumerate(model.moe_layers()):
            blk.experts.lora.set_ranks(torch.tensor(rank_pattern(pattern, model.cfg.n_experts, l), device=device))
    opt = torch.optim.AdamW(drl.trainable_parameters(), lr=LR, weight_decay=0)
    model.train()
    return drl, opt


def shaped_steps(model, drl, opt, seq: int, ckpt: bool, warmup: int, steps: int, batch: int = 1):
    """warmup + steps DR-LoRA steps on one random batch of batch x seq tokens, in bf16 autocast, with or
    without gradient checkpointing. Returns (seconds of the timed steps, model FLOPs per step)."""
    device = model.lm_head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = shaped_batch(model, batch, seq)
    model.gradient_checkpointing = ckpt
    t, times = drl.t_warm + 1, []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x[:, :-1], targets=x[:, 1:])
        drl.observe(out.routers)
        out.loss.backward()
        assert drl.step(t) is None, "a growth event fell in a timed step"
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t += 1
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    flops = step_flops(model.cfg, batch * seq, seq, drl.ranks.float().mean().item(), drl.cfg.targets)[1]
    return times, flops


def shaped_batch(model, batch: int, seq: int):
    """(batch, seq + 1) random token ids, drawn on the model's device (seed 0)."""
    device = model.lm_head.weight.device
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), device=device, generator=g)


# -----------------------------------------------------------------------------
# 6. operators per step: what a GPU pays in kernel launches, counted without timing anything


class OpCounter(TorchDispatchMode):
    """Counts the aten operators run inside it (forward, backward and optimizer alike): `ops` maps
    an operator's name (aten.mm.default, ...) to its calls. On a GPU each is one or more kernels."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def step_ops(model, drl, opt, x, y, t: int, autocast=None) -> dict:
    """The aten operators of one fine-tune step, in drlora.train_step's order, by phase:
    {phase: Counter(operator -> calls)}. t must not be a growth event."""
    phases = {}

    @contextlib.contextmanager
    def phase(name):
        with OpCounter() as c:
            yield
        phases[name] = c.ops

    with phase("forward"), autocast or contextlib.nullcontext():
        out = model(x, targets=y)
    with phase("observe"):
        drl.observe(out.routers)
    with phase("backward"):
        out.loss.backward()
    with phase("DR-LoRA step"):
        assert drl.step(t) is None, "a growth event fell in a counted step"
    with phase("clip + AdamW"):
        torch.nn.utils.clip_grad_norm_(drl.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return phases


OPS_E, OPS_K, OPS_BATCH, OPS_SEQ = 64, 8, 4, 256  # OLMoE's experts and top-k at the tiny widths


def moe_layer_ops(grouped: bool) -> dict:
    """aten operators per MoE layer of one DR-LoRA fine-tune step (ranks at the "end" point, 8..32),
    by phase: the step of a 2-block stack minus that of a 1-block one, so that what does not repeat
    per layer (embedding, head and loss, the optimizer's set-up) cancels. A block is attention + MoE:
    its attention's operators (the same on both paths) are in the figure. fp32, CPU."""
    steps = []
    for n_layer in (1, 2):
        run = Ours(dataclasses.replace(tiny_olmoe(OPS_E, OPS_K), n_layer=n_layer), {}, "end", True)
        run.model.set_grouped(grouped)
        b = torch.randint(0, 8192, (OPS_BATCH, OPS_SEQ + 1), generator=torch.Generator().manual_seed(0))
        steps.append(step_ops(run.model, run.drl, run.opt, b[:, :-1], b[:, 1:], run.t))
    # the MoE block alone (router, dispatch, experts, adapters, combine), forward and backward, on an
    # input that needs a gradient as every layer's but the first does
    x = torch.randn(OPS_BATCH, OPS_SEQ, run.model.cfg.hidden_size, requires_grad=True)
    with OpCounter() as alone:
        run.model.moe_layers()[0](x)[0].sum().backward()
    if grouped and not all(blk.experts.grouped for blk in run.model.moe_layers()):
        raise RuntimeError("the grouped path fell back to the loop (see the warning): its count would be the loop's")
    return {**{name: steps[1][name] - steps[0][name] for name in steps[1]}, "MoE block alone": alone.ops}


def kernel_ops(ops: collections.Counter) -> int:
    """Calls of operators that compute (views, which only re-describe a tensor, left out): on a GPU,
    each is at least one kernel launch."""
    return sum(n for name, n in ops.items() if not _op(name).is_view)


def _op(name: str):  # "aten.mm.default" -> torch.ops.aten.mm.default
    ns, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def section_ops():
    loop, grouped = moe_layer_ops(False), moe_layer_ops(True)
    print(f"### 6. aten operators per MoE layer per fine-tune step ({OPS_E} experts top-{OPS_K}, hidden 256, "
          f"expert width 128, batch {OPS_BATCH} x {OPS_SEQ}, fp32, DR-LoRA ranks 8..32 on up+down)\n")
    rows = []
    phases = [name for name in loop if name != "MoE block alone"]
    for name in phases + ["total", "MoE block alone"]:
        a, b = ([loop[name]], [grouped[name]]) if name != "total" else ([loop[p] for p in phases],
                                                                      [grouped[p] for p in phases])
        a_all, b_all = sum(sum(c.values()) for c in a), sum(sum(c.values()) for c in b)
        a_k, b_k = sum(kernel_ops(c) for c in a), sum(kernel_ops(c) for c in b)
        rows.append([name, a_all, b_all, f"{a_all / b_all:.1f}x", a_k, b_k, f"{a_k / b_k:.1f}x"])
    table(["phase", "loop: operators", "grouped", "loop / grouped", "loop: computing operators", "grouped",
           "loop / grouped"], rows)
    gmm = sum(n for p in phases for op, n in grouped[p].items() if "grouped_mm" in op)
    print(f"Per layer = the step of 2 blocks minus that of 1 (attention's operators included, alike on both "
          f"paths); the last row: the MoE block's forward and backward alone (moe.MoE on a (4, 256, 256) input "
          f"that needs a gradient, plus the sum taken as its loss). Counted with a TorchDispatchMode, not timed. "
          f"Computing operators leave out views (view, "
          f"transpose, detach, ...), which launch no kernel on a GPU. The grouped path runs {gmm} grouped_mm calls "
          f"per layer and step (3 expert projections and 2 per adapted one forward; their input and adapter "
          f"gradients backward).\n")
    return loop, grouped


# -----------------------------------------------------------------------------
# main


def main():
    ap = argparse.ArgumentParser(description="DR-LoRA speed and memory benchmark (see the docstring)")
    ap.add_argument("--quick", action="store_true", help="fewer configurations, rounds and scaling points")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds of section 1 (default 12, quick 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--no-reference", action="store_true", help="skip transformers + PEFT")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-scaling", action="store_true", help="skip section 3")
    ap.add_argument("--ops", action="store_true", help="only section 6 (operator counts; nothing timed)")
    ap.add_argument("--memory-child", default="", help=argparse.SUPPRESS)  # internal: one memory measurement
    ap.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args.ckpt or None)
    if args.ops:
        return section_ops()

    start = time.time()
    rounds = args.rounds or (3 if args.quick else 12)
    warmup = 1 if args.quick else 2
    load = os.getloadavg()[0]
    print(f"# drlora bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average at start {load:.1f}\n")
    if load + args.threads > os.cpu_count() + 0.5:
        print(f"warning: other processes keep the CPUs busy (load {load:.1f}). A {args.threads}-thread step then waits "
              f"for whichever of its threads was descheduled: we measured steps 3x to 15x slower, in bursts. Ratios "
              f"from interleaved rounds suffer less than absolute figures; for clean numbers run on a quiet machine "
              f"(or --threads 1 if only one core is free).\n")
    names = [n for n, s in CONFIGS.items() if s[0] == "ours" and (n in QUICK or not args.quick)]
    why = "--no-reference" if args.no_reference else reference_available()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if why:
            print(f"reference skipped: {why}\n")
        else:
            import peft
            import transformers

            ckpt = os.path.join(tmp, "tiny-olmoe")
            base = moe.MoETransformer(tiny_olmoe())
            base.init_weights(seed=0)  # the weights every "ours" runner draws
            hf.save_pretrained(base, ckpt)
            del base
            names += [n for n, s in CONFIGS.items() if s[0] == "ref" and (n in QUICK or not args.quick)]
            print(f"reference: transformers {transformers.__version__}, PEFT {peft.__version__}, "
                  f"LoraConfig(r=16, lora_alpha=32, target_parameters={PEFT_TARGETS})\n")
        print(f"section 1: {len(names)} configurations x ({warmup} warm-up + {rounds}) interleaved rounds", flush=True)
        runners, times, stats, peak, grow_s = section_throughput(names, ckpt, rounds, warmup)
        memory = {}
        if not args.no_memory:
            memory = measure_memory(names, ckpt, args.threads)
        print()
        report_throughput(runners, times, stats, peak, grow_s, memory)
        del runners
        gc.collect()
    if not args.no_scaling:
        experts, topks = ((8, 64), (1, 8)) if args.quick else ((8, 16, 32, 64), (1, 2, 4, 8))
        section_scaling(experts, topks, rounds=3 if args.quick else 5, warmup=1)
    section_gpu()
    section_ops()
    load = os.getloadavg()[0]
    print(f"total wall time {time.time() - start:.0f} s; load average at end {load:.1f}"
          + (f" (above {os.cpu_count()}: other processes shared the CPUs; absolute figures are pessimistic, "
             f"interleaved ratios less so)" if load > os.cpu_count() else ""))


if __name__ == "__main__":
    main()
