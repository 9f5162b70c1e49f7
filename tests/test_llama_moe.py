"""LLaMA-MoE (model_type llama_moe, remote code that transformers does not have): tiny checkpoints written by
the published modeling code (pjlab-sys4nlp/llama-moe @3577be8; how: fixtures/llama_moe/README.md) load through
hf.from_pretrained with that code's logits (fp32, 1e-4) and its top-k experts on every real token and layer,
from .bin (sharded or not) and safetensors alike; variants moe.py does not compute are refused by name;
save_pretrained writes the published layout back; DR-LoRA trains the experts' up/down and the router module.
The sentencepiece tokenizer, converted once by tools/convert_tokenizer.py, encodes as sentencepiece does."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import drlora
import hf
from tools import export

FIX = Path(__file__).parent / "fixtures" / "llama_moe"
NAMES = ["2_8", "4_16", "2_8_logits", "4_16_linear"]  # the table in fixtures/llama_moe/README.md


def run(model, exp):
    with torch.no_grad():
        return model(exp["input_ids"], attention_mask=exp["attention_mask"])


def logit_error(model, exp) -> float:
    valid = exp["attention_mask"].bool()  # padded positions are not compared
    return (run(model, exp).logits - exp["logits"])[valid].abs().max().item()


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_published_code(name):
    model = hf.from_pretrained(str(FIX / name)).eval()
    exp = load_file(FIX / name / "expected.safetensors")
    out = run(model, exp)
    valid = exp["attention_mask"].bool()
    B, T = valid.shape
    assert (out.logits - exp["logits"])[valid].abs().max().item() < 1e-4
    assert len(out.routers) == 2
    for layer, r in enumerate(out.routers):
        ids, weights = r.ids.view(B, T, -1), r.weights.view(B, T, -1)
        assert torch.equal(ids.sort(-1).values[valid], exp["top_ids"][layer].sort(-1).values[valid])
        torch.testing.assert_close(weights[valid], exp["scores"][layer][valid], rtol=0, atol=1e-5)  # descending both


def test_config_mapping():
    cfg = hf.from_pretrained(str(FIX / "2_8")).cfg  # the published 2/8 model's settings
    assert (cfg.n_experts, cfg.top_k, cfg.intermediate_size, cfg.router, cfg.router_softmax, cfg.norm_topk_prob,
            cfg.expert_scale, cfg.router_noise, cfg.qk_norm) == (8, 2, 8, "mlp", True, True, 4.0, True, "none")
    cfg = hf.from_pretrained(str(FIX / "4_16_linear")).cfg
    assert (cfg.n_experts, cfg.top_k, cfg.intermediate_size, cfg.router, cfg.router_softmax, cfg.expert_scale) == \
        (16, 4, 4, "linear", False, 2.0)
    assert hf.KNOWN_MODELS["llama_moe"] == "llama-moe/LLaMA-MoE-v1-3_5B-2_8"


@pytest.mark.parametrize("name, field, wrong", [("2_8", "expert_scale", 1.0), ("4_16", "router_softmax", False),
                                                ("2_8_logits", "router_softmax", True),
                                                ("4_16_linear", "expert_scale", 1.0)])
def test_fixtures_see_each_setting(name, field, wrong):
    """Each setting the fixtures vary moves the logits far past the tolerance: parity is not by luck."""
    model = hf.from_pretrained(str(FIX / name)).eval()
    setattr(model.cfg, field, wrong)
    assert logit_error(model, load_file(FIX / name / "expected.safetensors")) > 1e-2


@pytest.mark.parametrize("key, value, match", [
    ("gate_network", "conv", "gate_network='conv'"),
    ("calculator_type", "SwitchDropTokenCalculator", "calculator_type='SwitchDropTokenCalculator'"),
    ("gate_type", "SwitchBalancedGate", "gate_type='SwitchBalancedGate'"),
    ("size_experts", [[8] * 7 + [9], [8] * 8], "size_experts="),
    ("score_scale_factor", [4.0, 2.0], r"score_scale_factor=\[4.0, 2.0\]"),
    ("multiply_gate_scores", False, "multiply_gate_scores=False"),
    ("add_weight_norm", True, "add_weight_norm=True"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("rope_theta", 500000.0, "rope_theta=500000.0"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "only plain RoPE"),
])
def test_unsupported_variants_are_refused(key, value, match):
    d = json.loads((FIX / "2_8" / "config.json").read_text())
    hf.config_from_hf(d)  # as published: accepted
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf({**d, key: value}, source="x/config.json")


def test_uneven_split_is_refused():
    d = json.loads((FIX / "4_16" / "config.json").read_text())
    with pytest.raises(ValueError, match="intermediate_size=65"):
        hf.config_from_hf({**d, "intermediate_size": 65})


def bin_keys(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_bin_loading_is_strict(tmp_path):
    src = FIX / "4_16_linear"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    sd = bin_keys(src / "pytorch_model.bin")
    del sd["model.layers.1.mlp.gate.weight_noise.weight"]
    sd["model.layers.0.mlp.calculator.experts.weight_up.16"] = torch.zeros(4, 64)  # an expert too many
    sd["model.layers.0.mlp.calculator.experts.weight_down.3"] = torch.zeros(64, 5)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        hf.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "missing: ['layers.0.mlp.experts.down_proj (experts [3])', 'layers.1.mlp.gate_noise']" in msg
    assert "unexpected: ['model.layers.0.mlp.calculator.experts.weight_up.16']" in msg
    assert "weight_down.3: checkpoint (64, 5) vs model (64, 4)" in msg
    (tmp_path / "pytorch_model.bin").write_bytes((src / "pytorch_model.bin").read_bytes()[:5000])  # truncated
    with pytest.raises(ValueError, match="cannot read pytorch_model file"):
        hf.from_pretrained(str(tmp_path))
    torch.save({"step": 3}, tmp_path / "pytorch_model.bin")  # not tensors
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        hf.from_pretrained(str(tmp_path))


def test_bin_shard_index_must_be_complete(tmp_path):
    for f in os.listdir(FIX / "2_8"):
        if f != "pytorch_model-00002-of-00002.bin":
            shutil.copy(FIX / "2_8" / f, tmp_path / f)
    with pytest.raises(FileNotFoundError, match="names shards that are not there"):
        hf.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["2_8", "4_16_linear"])
def test_export_writes_the_published_layout(tmp_path, name):
    """Every tensor the published code holds, under its names, with the same values, and config.json kept.
    (The published code itself loads these exports with no missing or unexpected key and equal logits:
    checked once outside the repo, see fixtures/llama_moe/README.md.)"""
    model = hf.from_pretrained(str(FIX / name))
    export.save_in_layout(model, str(tmp_path))
    src = FIX / name
    ref = {}
    for f in sorted(src.glob("*.bin")):
        ref.update(bin_keys(f))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(ours) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0, msg=k)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    again = hf.from_pretrained(str(tmp_path)).eval()
    exp = load_file(src / "expected.safetensors")
    assert torch.equal(run(again, exp).logits, run(model.eval(), exp).logits)
    with pytest.raises(ValueError, match="no fused layout"):
        export.save_in_layout(model, str(tmp_path / "fused"), fused=True)


@pytest.mark.parametrize("name", ["2_8", "4_16_linear"])
def test_drlora_trains_experts_and_router_module(name):
    model = hf.from_pretrained(str(FIX / name))
    exp = load_file(FIX / name / "expected.safetensors")
    freq = "weight" if model.cfg.router_softmax else "count"  # raw-logit weights are no frequency: refused
    if freq == "count":
        with pytest.raises(ValueError, match="use freq='count'"):
            drlora.DRLoRA(model, drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=2), total_steps=10)
    drl = drlora.DRLoRA(model, drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=2, freq=freq), total_steps=10)
    model.train()
    ids, mask = exp["input_ids"], exp["attention_mask"]
    targets = torch.where(mask.bool(), ids, -100)
    out = model(ids, targets=targets, attention_mask=mask)
    out.loss.backward()
    E, H, I = model.cfg.n_experts, model.cfg.hidden_size, model.cfg.intermediate_size
    routers = drl.router_parameters()
    assert len(routers) == 2 * (2 if model.cfg.router == "mlp" else 1)  # Linear -> tanh -> Linear, or one Linear
    for blk in model.moe_layers():
        lora = blk.experts.lora
        assert tuple(lora.A["up_proj"].shape) == (E, 8, H) and tuple(lora.B["up_proj"].shape) == (E, I, 8)
        assert tuple(lora.A["down_proj"].shape) == (E, 8, I) and tuple(lora.B["down_proj"].shape) == (E, H, 8)
        assert "gate_proj" not in lora.A
        for p in ("up_proj", "down_proj"):  # B starts at zero, so B alone has a gradient at the first step
            assert lora.B[p].grad.abs().sum() > 0
        for p in blk.gate.parameters():
            assert p.requires_grad and p.dtype == torch.float32 and p.grad.abs().sum() > 0
        assert not blk.experts.up_proj.requires_grad and blk.experts.up_proj.grad is None
        if model.cfg.router_noise:  # carried for export, never trained
            assert not blk.gate_noise.requires_grad and all(p is not blk.gate_noise for p in routers)


# -----------------------------------------------------------------------------
# tokenizer: LLaMA's sentencepiece model, converted once to tokenizer.json

TOK = FIX / "tokenizer"


def cases():
    return json.loads((TOK / "expected.json").read_text(encoding="utf-8"))


def test_converted_tokenizer_encodes_as_sentencepiece():
    cfg = hf.config_from_hf(json.loads((FIX / "2_8" / "config.json").read_text()))
    tok = hf.load_tokenizer(str(TOK), cfg)
    exp = cases()
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, exp["vocab_size"])
    for c in exp["cases"]:
        assert tok.encode(c["text"]) == c["ids"], c["text"]
        assert tok.decode(c["ids"]) == c["text"]


def test_bos_is_what_the_tokenizer_puts_first(tmp_path):
    """bos_id: the token the tokenizer's own template puts before a text (LLaMA's <s>), None without one."""
    from tokenizers import Tokenizer

    cfg = hf.config_from_hf(json.loads((FIX / "2_8" / "config.json").read_text()))
    tok = Tokenizer.from_file(str(TOK / "tokenizer.json"))
    tok.post_processor = None  # as OLMoE's and Qwen's tokenizers: nothing added
    tok.save(str(tmp_path / "tokenizer.json"))
    assert hf.load_tokenizer(str(TOK), cfg).bos_id == 1
    assert hf.load_tokenizer(str(tmp_path), cfg).bos_id is None


def test_sentencepiece_only_folder_says_how_to_convert(tmp_path):
    shutil.copy(TOK / "tokenizer.model", tmp_path / "tokenizer.model")
    cfg = hf.config_from_hf(json.loads((FIX / "2_8" / "config.json").read_text()))
    with pytest.raises(FileNotFoundError, match="tools/convert_tokenizer.py"):
        hf.load_tokenizer(str(tmp_path), cfg)


def test_convert_tokenizer_tool(tmp_path):
    pytest.importorskip("sentencepiece")  # the tool's own needs, not drlora's
    pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    from tools import convert_tokenizer

    shutil.copy(TOK / "tokenizer.model", tmp_path / "tokenizer.model")
    convert_tokenizer.convert(str(tmp_path))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for c in cases()["cases"]:
        assert tok.encode(c["text"], add_special_tokens=False).ids == c["ids"]
    assert tok.encode("Answer", add_special_tokens=True).ids[0] == 1  # <s> first, as LLaMA


def test_the_whole_path_prepare_train_resume_export(tmp_path):
    """A LLaMA-MoE checkpoint with its own (sentencepiece-converted) tokenizer: the task tokenized with it (<s>
    first), train.py with DR-LoRA, a kill and a resume that end where an uninterrupted run ends, and the merged
    export in the family's own layout loading back with the adapted model's logits."""
    import subprocess
    import sys

    import moe
    from data import arithmetic

    d = json.loads((FIX / "2_8" / "config.json").read_text())
    d.update(vocab_size=400, max_position_embeddings=256)  # the fixture tokenizer's vocabulary; whole samples
    model = moe.MoETransformer(hf.config_from_hf(d))
    model.init_weights(seed=0)
    base = tmp_path / "base"
    export.save_in_layout(model, str(base))
    shutil.copy(FIX / "tokenizer" / "tokenizer.json", base)
    tok = hf.load_tokenizer(str(base), model.cfg)
    arithmetic.prepare(out_dir=tmp_path / "task", sizes={"train": 64, "val": 8, "test": 8}, seed=0, tokenizer=tok)
    assert arithmetic.common.encode_prompt(tok, "Question:")[0] == 1  # LLaMA's <s>, not eos

    def argv(out, *extra):
        return ["--model", str(base), "--preset", "tiny", "--task", str(tmp_path / "task"), "--out_dir", str(out),
                "--steps", "8", "--batch_size", "4", "--r_init", "1", "--r_target", "2", "--r_max", "4", "--dT", "2",
                "--eval_samples", "4", "--max_new_tokens", "4", "--ckpt_interval", "4",
                "--eval_base", "false", "--log_interval", "100", *extra]

    root = Path(__file__).resolve().parents[1]
    run = lambda a: subprocess.run([sys.executable, "train.py", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                   timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    straight = run(argv(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    killed = subprocess.run([sys.executable, "tools/kill_at.py", "6", *argv(tmp_path / "b")], cwd=root,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr
    resumed = run(argv(tmp_path / "b", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = (json.loads((tmp_path / x / "result.json").read_text())["result"] for x in "ab")
    assert a["ranks"] == b["ranks"] and sum(map(sum, a["ranks"])) == 2 * 8 * 2 and a["val_loss"] == b["val_loss"]
    history = json.loads((tmp_path / "a" / "result.json").read_text())["history"]["loss"]
    assert history[0] > 1.0 and history[-1] < history[0]  # answer tokens are in the loss, and it falls
    # merge and export in LLaMA-MoE's own layout; it loads back with the adapted model's logits
    tuned = hf.from_pretrained(str(base))
    hf.load_adapter(tuned, str(tmp_path / "a" / "adapter.safetensors"))
    ids = torch.tensor([arithmetic.common.encode_prompt(tok, "Question: Mia has 3 apples.")])
    with torch.no_grad():
        want = tuned.eval()(ids).logits
        export.export(tuned, str(base), str(tmp_path / "merged"))
        got = hf.from_pretrained(str(tmp_path / "merged")).eval()(ids).logits
    assert (got - want).abs().max() < 1e-4
