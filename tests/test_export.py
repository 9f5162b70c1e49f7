"""export.py: a tiny MoE made by transformers (every supported family), loaded by moe.py, given a
DR-LoRA adapter with uneven ranks and nonzero B, then merged and written as a Hugging Face folder:
transformers' own model loads that folder with no missing or unexpected key and computes the logits
ours computes with the adapter (fp32, 1e-4), in the expert layout the base used. The adapter file
alone, applied to the base again, gives identical logits. Files are written 0666 less the umask."""
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

import drlora
from tools import export
import hf

transformers = pytest.importorskip("transformers")


def make_base(path, model_type: str, fused: bool) -> str:
    """A tiny random transformers checkpoint plus tokenizer files and a generation config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    common = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    if model_type == "olmoe":
        ref = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                                                    intermediate_size=16))
    elif model_type == "qwen2_moe":  # a shared expert, and layer 1 dense
        ref = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, intermediate_size=40, mlp_only_layers=[1]))
    elif model_type == "qwen3_moe":  # QK-norm per head, top-k renormalised
        ref = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=40,
            norm_topk_prob=True))
    else:  # mixtral: w1/w2/w3 under block_sparse_moe in its published layout
        ref = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, sliding_window=None))
    with torch.no_grad():  # transformers inits norms to 1 and some weights to 0: perturb everything
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(path, save_original_format=not fused)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(48)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "w1", "pad_token": "w0", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return str(path)


def with_adapter(model, seed: int = 1):
    """DR-LoRA on every MoE layer, as after growth: ranks 1..r_max per expert, B random in every slot
    (so an inactive slot that leaked into the merge would show), dropout off."""
    cfg = drlora.DRLoRAConfig(method="lora", r_target=4, r_max=6, dropout=0.0,
                              targets=("gate_proj", "up_proj", "down_proj"))
    drlora.DRLoRA(model, cfg, total_steps=10)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.moe_layers():
            lora = blk.experts.lora
            lora.set_ranks(torch.randint(1, cfg.r_max + 1, lora.ranks.shape, generator=g))
            for p in cfg.targets:
                lora.B[p].copy_(torch.randn(lora.B[p].shape, generator=g) * 0.2)
    return model.eval(), cfg


def batch():
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(2, 48, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return idx, mask


def logits(model, idx, mask):
    with torch.no_grad():
        return model(idx, attention_mask=mask).logits


def load_in_transformers(path):
    """transformers' model of the folder, after checking that it read every tensor and filled every weight."""
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return ref.eval()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("model_type, fused", [("olmoe", False), ("olmoe", True), ("qwen2_moe", False),
                                               ("qwen2_moe", True), ("qwen3_moe", False), ("qwen3_moe", True),
                                               ("mixtral", False), ("mixtral", True)])
def test_merged_export_loads_in_transformers_with_our_adapted_logits(tmp_path, model_type, fused):
    base = make_base(tmp_path / "base", model_type, fused)
    model, cfg = with_adapter(hf.from_pretrained(base))
    idx, mask = batch()
    ours = logits(model, idx, mask)
    base_logits = logits(hf.from_pretrained(base), idx, mask)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter does something worth exporting
    hf.save_adapter(model, str(tmp_path / "adapter.safetensors"), cfg)

    out = export.export(model, base, str(tmp_path / "merged"))
    ref = load_in_transformers(out)
    real = mask.bool()
    assert (ref(input_ids=idx, attention_mask=mask).logits.detach() - ours)[real].abs().max() <= 1e-4
    assert export.source_is_fused(out) == fused  # the layout the base used
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f, \
            safe_open(os.path.join(base, "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())  # the names transformers itself wrote (Mixtral: block_sparse_moe...w1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(base, name), "rb").read()
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == 1 and gen["pad_token_id"] == 0
    assert all(blk.experts.lora is None for blk in model.moe_layers())  # merged and removed


def test_adapter_file_reapplied_to_the_base_gives_identical_logits(tmp_path):
    base = make_base(tmp_path / "base", "olmoe", fused=False)
    model, cfg = with_adapter(hf.from_pretrained(base))
    hf.save_adapter(model, str(tmp_path / "adapter.safetensors"), cfg)
    again = hf.from_pretrained(base)
    assert hf.load_adapter(again, str(tmp_path / "adapter.safetensors")) == cfg
    idx, mask = batch()
    assert torch.equal(logits(again.eval(), idx, mask), logits(model, idx, mask))


def test_command_line_export_and_its_refusals(tmp_path, capsys):
    base = make_base(tmp_path / "base", "olmoe", fused=True)
    model, cfg = with_adapter(hf.from_pretrained(base))
    idx, mask = batch()
    ours = logits(model, idx, mask)
    adapter = str(tmp_path / "adapter.safetensors")
    hf.save_adapter(model, adapter, cfg)
    out = export.main(["--base", base, "--adapter", adapter, "--out", str(tmp_path / "merged")])
    assert "fused experts, float32" in capsys.readouterr().out
    ref = load_in_transformers(out)
    assert (ref(input_ids=idx, attention_mask=mask).logits.detach() - ours)[mask.bool()].abs().max() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w5 w7")["input_ids"] == [5, 7]
    with pytest.raises(FileExistsError, match="not empty"):
        export.main(["--base", base, "--adapter", adapter, "--out", out])
    assert export.main(["--base", base, "--adapter", adapter, "--out", out, "--overwrite"]) == out
    # bf16 on request: written in bf16, and config.json says so
    out16 = export.main(["--base", base, "--adapter", adapter, "--out", str(tmp_path / "m16"), "--dtype", "bfloat16",
                         "--fused", "false"])
    assert json.load(open(os.path.join(out16, "config.json")))["dtype"] == "bfloat16"
    assert not export.source_is_fused(out16)
    m16 = hf.from_pretrained(out16, dtype=torch.bfloat16)
    assert m16.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_mode_of_ordinary_files(tmp_path, umask):
    """0666 less the umask, as open() gives config.json: not the 0600 of safetensors' temporary file."""
    base = make_base(tmp_path / "base", "olmoe", fused=False)
    model, cfg = with_adapter(hf.from_pretrained(base))
    old = os.umask(umask)
    try:
        out = export.export(model, base, str(tmp_path / "merged"))
    finally:
        os.umask(old)
    files = os.listdir(out)
    assert "model.safetensors" in files and not [f for f in files if f.endswith(".tmp")]
    assert {f: mode(os.path.join(out, f)) for f in files} == {f: 0o666 & ~umask for f in files}
