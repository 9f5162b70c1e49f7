"""bench.py's GPU section and tools/gpu_check.py (an OLMoE-1B-7B-shaped model in bf16) can only be
timed on a GPU; here the same code runs on a tiny shape on the CPU, so a first GPU run does not fail
on a bug. Nothing is timed against a target: the tests check that the figures come out, and count
operators (which need no timing)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tools import bench
import moe


def test_gpu_section_code_runs_on_a_tiny_shape():
    cfg = moe.MoEConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2, n_kv_head=2, n_experts=8, top_k=2,
                        intermediate_size=16, max_seq_len=64)
    model, drl, opt = bench.shaped_model(cfg, "cpu")
    assert model.lm_head.weight.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    assert drl.ranks.tolist()[0] == [32, 32, 16, 16, 8, 8, 8, 8]  # the "end" point: mean 16, 8..32
    loras = [blk.experts.lora for blk in model.moe_layers()]
    assert all(lora.B["down_proj"].abs().max() == 0 for lora in loras)
    for ckpt in (False, True):
        times, flops = bench.shaped_steps(model, drl, opt, seq=32, ckpt=ckpt, warmup=1, steps=2)
        assert len(times) == 2 and all(t > 0 for t in times)
    assert flops == bench.step_flops(cfg, 32, 32, 16.0, ("up_proj", "down_proj"))[1]
    for lora in loras:  # 6 AdamW steps moved the active slots of B, and only those
        B = lora.B["down_proj"].detach()
        assert math.isfinite(B.abs().sum().item()) and B.abs().sum() > 0
        assert all(B[e, :, r:].abs().sum() == 0 for e, r in enumerate(lora.r))


def test_grouped_path_takes_far_fewer_operators_per_moe_layer():
    """bench.py section 6, counted, not timed: OLMoE's 64 experts top-8 at narrow widths. Measured:
    3830 vs 388 operators per layer and step (9.9x; attention's included), 3614 vs 130 for the MoE
    block alone (27.8x)."""
    loop, grouped = bench.moe_layer_ops(False), bench.moe_layer_ops(True)
    phases = ["forward", "observe", "backward", "DR-LoRA step", "clip + AdamW"]
    assert list(loop) == list(grouped) == phases + ["MoE block alone"]
    total = {name: sum(sum(c[p].values()) for p in phases) for name, c in (("loop", loop), ("grouped", grouped))}
    assert total["loop"] >= 8 * total["grouped"], total
    alone = sum(loop["MoE block alone"].values()), sum(grouped["MoE block alone"].values())
    assert alone[0] >= 20 * alone[1], alone
    gmm = lambda c: sum(n for p in phases for op, n in c[p].items() if "grouped_mm" in op)  # noqa: E731
    assert gmm(loop) == 0 and gmm(grouped) == 18  # 3 + 2 x 2 forward; 3 input + 2 x 2 x 2 adapter gradients
    mm = lambda c: sum(n for p in phases for op, n in c[p].items() if op.startswith("aten.mm"))  # noqa: E731
    assert mm(loop) >= 64 * 7 * 2  # the loop: a matmul per expert and projection, forward and backward
    for p in ("observe", "DR-LoRA step", "clip + AdamW"):  # the statistics and the optimizer do not care
        assert loop[p] == grouped[p], p


def test_gpu_check_runs_on_a_tiny_shape_on_the_cpu(tmp_path):
    """tools/gpu_check.py end to end, as on a GPU but tiny: the step of ours and of transformers + PEFT
    on the same weights, operator counts, the grouped path asserted, and train.py killed and resumed
    bit for bit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)], cwd=root,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.load(open(out))
    assert r["failures"] == [] and r["device"] == "CPU" and (r["batch"], r["seq"]) == (2, 64)
    names = list(r["step"])
    assert len(names) == (3 if r["reference_skipped"] is None else 2)
    for name, targets in zip(names, (2, 3)):
        s = r["step"][name]
        assert s["grouped_mm_per_forward"] == 2 * (3 + 2 * targets)  # 2 MoE layers: experts and adapters grouped
        assert s["tokens_per_s"] > 0 and s["ops_per_step"] > s["computing_ops_per_step"] > 0
        assert s["peak_gib"] is None and s["cuda_kernels_per_step"] is None  # CUDA only
        projections = ("gate_proj", "up_proj", "down_proj")[-targets:]
        flops = bench.step_flops(moe.MoEConfig(**r["shape"]), 2 * 64, 64, 16.0, projections)
        assert s["step_tflop"] == pytest.approx(flops[1] / 1e12)  # both at mean rank 16
    if r["reference_skipped"] is None:  # peft is in requirements-test.txt: CI takes this branch
        assert "transformers + PEFT" in names[2] and r["step"][names[2]]["grouped_mm_per_step"] > 0
        assert r["parity"]["logits_rel_diff"] < 1e-2 and r["parity"]["moe_rel_diff"] < 1e-2
    else:
        assert "reference skipped: transformers/peft missing" in p.stdout
    res = r["resume"]
    assert res["deterministic_algorithms"] and res["resumed_vs_straight"]["exact"]
    assert res["events"] == [0, 5, 10, 15] and res["ranks_per_layer"] == [8 * 4, 8 * 4]  # E x r_target
    assert [run["rc"] for run in res["runs"].values()] == [0, -9, 0]  # the kill is a real SIGKILL
    assert "resumed vs straight: bit for bit" in p.stdout and "| ours DR-LoRA" in p.stdout


def test_gpu_check_fsdp_on_two_cpu_processes(tmp_path):
    """tools/gpu_check.py --fsdp under torchrun, on gloo at the tiny shape: the sharded run and process 0's
    one-process run on the same batches take the same growth decisions and losses, the gathered adapter
    holds the run's ranks, and the figures come out."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "fsdp.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "tools/gpu_check.py", "--fsdp", "--device", "cpu", "--tiny", "--out", str(out)], cwd=root,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.load(open(out))
    assert r["failures"] == [] and r["world"] == 2 and r["events"] == [0, 2, 4, 6]
    assert r["ranks_equal"] and r["adapter_ranks_equal"] and len(r["losses"]) == 8
    assert r["loss_max_abs_diff"] <= 1e-5
    assert r["peak_gib"] == [None, None] and r["worked_out_gib"]["total"] > r["worked_out_gib"]["base"] > 0
    assert "### 3. FSDP: tiny shape" in p.stdout and "| 2 |" in p.stdout
