"""export.py --peft against PEFT itself: a DR-LoRA fine-tune of a tiny transformers MoE, with ranks that
differ between experts and random values in every slot of A and B (inactive ones too) and in the router,
written as a PEFT adapter and loaded by PeftModel.from_pretrained on transformers' own base model. Its
logits equal ours (fp32, 1e-5); the file holds exactly the tensors PEFT saves for that config; padded
slots are exact zeros; vLLM's rule (no modules_to_save) is kept on request."""
import json
import os

import pytest
import torch
import transformers
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

import drlora
import hf
from test_export import batch, make_base, mode
from tools import export

RANKS = torch.tensor([[2, 5, 2, 4], [4, 2, 3, 2]])  # per MoE layer: at r_init (2), at r_max (5), between; layer
# 1 tops out below the model's largest rank, so it is padded further than its own largest


def fine_tuned(base, freeze_router=False, targets=("up_proj", "down_proj"), scale=2.0):
    """The base with DR-LoRA as after training: uneven ranks, nonzero A and B, a router moved off the base's."""
    model = hf.from_pretrained(base)
    cfg = drlora.DRLoRAConfig(r_init=2, r_target=3, r_max=5, dT=2, dropout=0.0, freeze_router=freeze_router,
                              targets=targets, scale=scale)
    drl = drlora.DRLoRA(model, cfg, total_steps=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l, blk in enumerate(model.moe_layers()):
            lora = blk.experts.lora
            lora.set_ranks(RANKS[l])
            for p in targets:  # every slot: one that leaked past an expert's rank would show in the logits
                lora.A[p].copy_(torch.randn(lora.A[p].shape, generator=g) * 0.3)
                lora.B[p].copy_(torch.randn(lora.B[p].shape, generator=g) * 0.3)
            if not freeze_router:
                blk.gate.weight.add_(torch.randn(blk.gate.weight.shape, generator=g) * 0.5)
    return model.eval(), drl


def tensors(out) -> dict:
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def check_against_peft(model, base, out):
    """PEFT's model of base + out computes our logits, and PEFT would save exactly the tensors we wrote."""
    idx, mask = batch()
    real = mask.bool()
    plain = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(idx, attention_mask=mask).logits
        assert (plain(input_ids=idx, attention_mask=mask).logits - ours)[real].abs().max() > 0.1  # a visible change
        ref = PeftModel.from_pretrained(plain, out).eval()
        assert (ref(input_ids=idx, attention_mask=mask).logits - ours)[real].abs().max() <= 1e-5
    saved = get_peft_model_state_dict(ref, save_embedding_layers=False)
    assert {k: v.shape for k, v in tensors(out).items()} == {k: v.shape for k, v in saved.items()}


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral"])
def test_peft_adapter_with_trained_router_reproduces_the_run(tmp_path, model_type):
    base = make_base(tmp_path / "base", model_type, fused=False)
    model, drl = fine_tuned(base)
    out = str(tmp_path / "peft")
    info = export.export_peft(model, base, out)
    check_against_peft(model, base, out)

    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["r"] == 5 and config["lora_alpha"] == 10 and config["lora_alpha"] / config["r"] == 2.0
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["modules_to_save"] == ["mlp.gate"] and not info["scale_folded_into_B"]
    # the layout, read back by hand: lora_A (E*r, in) expert slowest, lora_B (out, E*r) expert fastest,
    # gate_up_proj's gate rows (the first I) zero, every slot at or past an expert's rank exactly zero
    t = tensors(out)
    layers = [i for i, b in enumerate(model.layers) if b.is_moe]
    E, r, H, I = 4, 5, 32, 16
    for i, blk in zip(layers, model.moe_layers()):
        lora, key = blk.experts.lora, f"base_model.model.model.layers.{i}.mlp."
        assert torch.equal(t[key + "gate.weight"], blk.gate.weight)
        for name, p, rows in (("base_layer.", "up_proj", slice(I, 2 * I)), ("", "down_proj", slice(None))):
            A = t[f"{key}experts.{name}lora_A.weight"].view(E, r, -1)
            B = t[f"{key}experts.{name}lora_B.weight"].view(-1, r, E)
            for e, re in enumerate(lora.r):
                assert torch.equal(A[e, :re], lora.A[p][e, :re]) and not A[e, re:].any()
                assert torch.equal(B[rows, :re, e], lora.B[p][e, :, :re]) and not B[:, re:, e].any()
            if p == "up_proj":
                assert not B[:I].any()
    n_moe = len(layers)
    assert info["params"] == n_moe * E * r * (H + 2 * I + I + H) and info["bytes"] == 4 * info["params"]
    assert info["active_params"] == drl.active_lora_parameters() < info["params"]
    assert info["router_params"] == n_moe * E * H


def test_frozen_router_run_exports_without_modules_to_save_and_vllm_accepts_it(tmp_path):
    base = make_base(tmp_path / "base", "qwen2_moe", fused=True)
    model, _ = fine_tuned(base, freeze_router=True)
    for vllm in (False, True):
        out = str(tmp_path / f"peft{vllm}")
        info = export.export_peft(model, base, out, vllm=vllm)
        assert info["modules_to_save"] is None and info["router_params"] == 0
        assert json.load(open(os.path.join(out, "adapter_config.json")))["modules_to_save"] is None
        assert not [k for k in tensors(out) if "lora_" not in k]
        check_against_peft(model, base, out)
    assert open(os.path.join(tmp_path, "peftFalse", "adapter_model.safetensors"), "rb").read() == \
        open(os.path.join(tmp_path, "peftTrue", "adapter_model.safetensors"), "rb").read()


def test_vllm_refuses_a_trained_router(tmp_path):
    base = make_base(tmp_path / "base", "olmoe", fused=False)
    model, _ = fine_tuned(base)
    with pytest.raises(ValueError, match=r"vLLM refuses adapters with modules_to_save.*freeze_router=True.*merged"):
        export.export_peft(model, base, str(tmp_path / "peft"), vllm=True)
    assert not os.path.exists(tmp_path / "peft")


def test_gate_proj_adapted_too_fills_the_gate_half_at_twice_the_rank(tmp_path):
    base = make_base(tmp_path / "base", "olmoe", fused=False)
    model, _ = fine_tuned(base, targets=("gate_proj", "up_proj", "down_proj"))
    out = str(tmp_path / "peft")
    info = export.export_peft(model, base, out)
    assert info["r"] == 10 and info["lora_alpha"] == 20  # gate and up: one LoRA on gate_up_proj, 5 slots each
    check_against_peft(model, base, out)


def test_scale_is_folded_into_B_when_alpha_over_r_cannot_give_it_exactly(tmp_path):
    base = make_base(tmp_path / "base", "olmoe", fused=False)
    model, _ = fine_tuned(base, scale=0.11)
    assert (0.11 * 5) / 5 != 0.11  # PEFT's lora_alpha / r would miss s by a rounding
    out = str(tmp_path / "peft")
    info = export.export_peft(model, base, out)
    assert info["scale_folded_into_B"] and info["lora_alpha"] == info["r"] == 5
    check_against_peft(model, base, out)


def test_command_line_peft_export(tmp_path, capsys):
    base = make_base(tmp_path / "base", "olmoe", fused=True)
    model, _ = fine_tuned(base)
    adapter = str(tmp_path / "adapter.safetensors")
    hf.save_adapter(model, adapter, model.moe_layers()[0].experts.lora.cfg)
    out = str(tmp_path / "peft")
    old = os.umask(0o022)
    try:
        assert export.main(["--base", base, "--adapter", adapter, "--peft", out]) == out
    finally:
        os.umask(old)
    printed = capsys.readouterr().out
    assert "r=5 lora_alpha=10" in printed and "padded to r: 4,480 (0.0 MiB), active: 2,304" in printed
    assert {f: mode(os.path.join(out, f)) for f in os.listdir(out)} == \
        {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == base
    check_against_peft(model, base, out)
    with pytest.raises(FileExistsError, match="not empty"):
        export.main(["--base", base, "--adapter", adapter, "--peft", out])
    with pytest.raises(ValueError, match="modules_to_save"):
        export.main(["--base", base, "--adapter", adapter, "--peft", out, "--overwrite", "--vllm"])
    assert export.main(["--base", base, "--adapter", adapter, "--peft", out, "--overwrite"]) == out
    with pytest.raises(SystemExit):  # --vllm means nothing for a merged folder
        export.main(["--base", base, "--adapter", adapter, "--out", str(tmp_path / "m"), "--vllm"])


def test_a_family_transformers_lacks_is_refused(tmp_path):
    base = make_base(tmp_path / "base", "olmoe", fused=False)
    model, _ = fine_tuned(base)
    model.cfg.model_type = "llama_moe"  # read with its own remote code: transformers has no class to name
    with pytest.raises(ValueError, match="no 'llama_moe'.*merged copy"):
        export.export_peft(model, base, str(tmp_path / "peft"))
