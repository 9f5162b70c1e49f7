"""bench.py's GPU section (an OLMoE-1B-7B-shaped model in bf16) can only be timed on a GPU;
here the same code runs on a tiny shape on the CPU, so a first GPU run does not fail on a bug.
Nothing is timed against a target: bench.py prints figures, tests check that they come out."""
import math

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
