"""moe.py against transformers: tiny random models of every supported model_type, written
to a temporary folder in both checkpoint layouts, loaded by moe.py and compared in fp32.
Also: KV-cache generation, and one clear error for each kind of broken checkpoint."""
import json
import os

import warnings

import pytest

import torch
import torch.nn.functional as F

import hf

import moe
from tools import export

transformers = pytest.importorskip("transformers")

VOCAB = 96


def hf_tiny(model_type: str, seed: int = 0):
    """A tiny random model built by transformers' own classes (several layers, 8 experts, top-k >= 2)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    if model_type == "olmoe":
        cfg = transformers.OlmoeConfig(**common, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                                       intermediate_size=32, clip_qkv=None)
        cls = transformers.OlmoeForCausalLM
    elif model_type == "qwen2_moe":  # shared expert, dense layer 1 via mlp_only_layers
        cfg = transformers.Qwen2MoeConfig(**common, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
                                          moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                          intermediate_size=80, mlp_only_layers=[1], decoder_sparse_step=1)
        cls = transformers.Qwen2MoeForCausalLM
    elif model_type == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=24, num_experts=8,
                                          num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=80,
                                          norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                         intermediate_size=32, sliding_window=None)
        cls = transformers.MixtralForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():  # transformers inits norms to 1 and some weights to 0: perturb everything
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch_with_padding():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(2, VOCAB, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    idx[mask == 0] = 0
    return idx, mask


def hf_router_ids(ref, idx, mask):
    """Top-k expert ids per MoE layer from transformers' own router modules (forward hooks)."""
    ids = []
    hooks = [m.register_forward_hook(lambda m, i, o: ids.append(o[2])) for n, m in ref.named_modules()
             if n.endswith("mlp.gate") and hasattr(m, "top_k")]
    with torch.no_grad():
        logits = ref(input_ids=idx, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    return logits, ids


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("fused", [False, True])
def test_logits_and_routing_match_transformers(tmp_path, model_type, fused):
    ref = hf_tiny(model_type)
    ref.save_pretrained(tmp_path, save_original_format=not fused)
    keys = json.dumps(sorted(__import__("safetensors").safe_open(str(tmp_path / "model.safetensors"), "pt").keys()))
    assert ("gate_up_proj" in keys) == fused  # the layout we meant to test is the one on disk
    ours = hf.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    idx, mask = batch_with_padding()
    ref_logits, ref_ids = hf_router_ids(ref, idx, mask)
    with torch.no_grad():
        out = ours(idx, attention_mask=mask)
    real = mask.bool()
    assert (out.logits - ref_logits)[real].abs().max().item() <= 1e-4
    assert len(out.routers) == len(ref_ids) == len(ours.moe_layers())
    for r, ref in zip(out.routers, ref_ids):
        ours_ids = r.ids.view(3, 11, -1)[real].sort(-1).values
        assert torch.equal(ours_ids, ref.view(3, 11, -1)[real].sort(-1).values)
    if model_type == "qwen2_moe":
        assert len(out.routers) == 2  # layer 1 is dense


def test_head_loss_matches_cross_entropy(monkeypatch):
    """HeadLoss (chunked head + loss, gradients worked out in the forward) against
    F.cross_entropy on full logits: value and both gradients, with ignored targets, a chunk
    with no target at all, a short last chunk, and a loss scaled before backward."""
    monkeypatch.setattr(moe.HeadLoss, "ROWS", 4)  # 13 rows: chunks of 4, 4, 4, 1
    torch.manual_seed(0)
    h = torch.randn(13, 16, requires_grad=True)
    W = torch.randn(VOCAB, 16, requires_grad=True)
    t = torch.randint(0, VOCAB, (13,))
    t[[0, 4, 5, 6, 7, 10]] = moe.IGNORE_INDEX  # rows 4..7 are a whole chunk without targets
    ref = F.cross_entropy(h @ W.t(), t, ignore_index=moe.IGNORE_INDEX)
    ref_dh, ref_dW = torch.autograd.grad(3 * ref, (h, W))
    ours = moe.HeadLoss.apply(h, W, t, True)
    dh, dW = torch.autograd.grad(3 * ours, (h, W))
    assert abs(ours.item() - ref.item()) <= 1e-6 * ref.item()
    assert (dh - ref_dh).abs().max() <= 1e-6 and (dW - ref_dW).abs().max() <= 1e-6
    assert dh[4:8].abs().max() == 0  # rows without a target get no gradient
    none = torch.full_like(t, moe.IGNORE_INDEX)  # nothing to predict: loss 0, not NaN
    loss = moe.HeadLoss.apply(h, W, none, True)
    assert loss.item() == 0 and torch.autograd.grad(loss, h)[0].abs().max() == 0


def test_model_loss_is_cross_entropy_of_its_logits(tmp_path):
    """With targets, forward returns the loss of the logits it would return without them
    (which it no longer materialises), and the same gradients, with or without grad mode."""
    hf_tiny("olmoe").save_pretrained(tmp_path)
    model = hf.from_pretrained(str(tmp_path)).train()
    idx, mask = batch_with_padding()
    y = idx.roll(-1, 1).masked_fill(mask == 0, moe.IGNORE_INDEX)
    y[:, :4] = moe.IGNORE_INDEX  # a prompt
    logits = model(idx, attention_mask=mask).logits
    ref = F.cross_entropy(logits.view(-1, VOCAB), y.view(-1), ignore_index=moe.IGNORE_INDEX)
    params = [model.lm_head.weight, model.layers[1].mlp.experts.down_proj]
    ref_grads = torch.autograd.grad(ref, params)
    out = model(idx, targets=y, attention_mask=mask)
    assert out.logits is None
    assert abs(out.loss.item() - ref.item()) <= 1e-5
    for g, r in zip(torch.autograd.grad(out.loss, params), ref_grads):
        assert (g - r).abs().max() <= 1e-6 * max(1.0, r.abs().max().item())
    with torch.no_grad():
        assert abs(model(idx, targets=y, attention_mask=mask).loss.item() - ref.item()) <= 1e-5


def test_generate_with_cache_matches_full_recompute(tmp_path):
    ref = hf_tiny("olmoe", seed=3)
    ref.save_pretrained(tmp_path)
    model = hf.from_pretrained(str(tmp_path)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    got = model.generate(prompts, max_new_tokens=8, pad_id=0)
    for p, g in zip(prompts, got):  # greedy, one prompt at a time, whole prefix every token
        seq = list(p)
        for _ in range(8):
            with torch.no_grad():
                seq.append(model(torch.tensor([seq])).logits[0, -1].argmax().item())
        assert g == seq[len(p):]
    # and transformers' own greedy decoding agrees on the first prompt
    ref = ref.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ref[0, 5:].tolist() == got[0]


def test_generate_stops_at_eos(tmp_path):
    ref = hf_tiny("olmoe", seed=4)
    ref.save_pretrained(tmp_path)
    model = hf.from_pretrained(str(tmp_path)).eval()
    greedy = model.generate([[5, 6, 7]], max_new_tokens=6, pad_id=0)[0]
    eos = greedy[2]  # pretend the third greedy token is eos: output must stop before it
    assert model.generate([[5, 6, 7]], max_new_tokens=6, pad_id=0, eos_id=eos)[0] == greedy[: greedy.index(eos)]


def test_save_pretrained_round_trip_and_transformers_loads_it(tmp_path):
    cfg = moe.MoEConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, n_kv_head=4, n_experts=8, top_k=2,
                        intermediate_size=32, pad_id=0, eos_id=1)
    model = moe.MoETransformer(cfg)
    model.init_weights(seed=0)
    idx, mask = batch_with_padding()
    for fused in (False, True):
        export.save_in_layout(model, tmp_path / str(fused), fused=fused)
        again = hf.from_pretrained(str(tmp_path / str(fused)))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "False").eval()
    with torch.no_grad():
        diff = (ref(input_ids=idx, attention_mask=mask).logits - model(idx, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max().item() <= 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    ref = hf_tiny("olmoe")
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = hf.from_pretrained(str(tmp_path))
    idx, mask = batch_with_padding()
    with torch.no_grad():
        diff = (model(idx, attention_mask=mask).logits - ref(input_ids=idx, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max().item() <= 1e-4


# --- broken checkpoints: each gives one error that names the problem ---------------------


@pytest.fixture
def saved(tmp_path):
    hf_tiny("olmoe").save_pretrained(tmp_path)
    return tmp_path


def rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors")


def test_missing_tensor_is_named(saved):
    rewrite(saved, lambda sd: sd.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing: \['layers.1.mlp.experts.up_proj \(experts \[5\]\)'\]"):
        hf.from_pretrained(str(saved))


def test_extra_tensor_is_named(saved):
    rewrite(saved, lambda sd: sd.update({"model.layers.0.mlp.surprise": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected: \['model.layers.0.mlp.surprise'\]"):
        hf.from_pretrained(str(saved))


def test_wrong_shape_is_named(saved):
    rewrite(saved, lambda sd: sd.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint \(63,\) vs model \(64,\)"):
        hf.from_pretrained(str(saved))


def test_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: unknown model_type 'llama'"):
        hf.from_pretrained(str(saved))


def test_missing_config(saved):
    os.remove(saved / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        hf.from_pretrained(str(saved))


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read"):
        hf.from_pretrained(str(saved))


def test_find_checkpoint_looks_in_the_hf_cache_then_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(FileNotFoundError, match="allenai/OLMoE-1B-7B-0924.*hub/models--allenai--OLMoE-1B-7B-0924"):
        hf.find_checkpoint("olmoe", download=False)
    snap = tmp_path / "hf" / "hub" / "models--allenai--OLMoE-1B-7B-0924" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_text("")
    assert hf.find_checkpoint("olmoe", download=False) == str(snap)
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        hf.find_checkpoint("gpt5")


def test_tokenizer_json_is_used(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"hello": 2, "world": 3, "[UNK]": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = hf.load_tokenizer(str(tmp_path), moe.MoEConfig(pad_id=0, eos_id=1))
    assert t.encode("hello world") == [2, 3] and t.decode([2, 3]) == "hello world" and t.pad_id == 0
    assert isinstance(hf.load_tokenizer(str(tmp_path), moe.MoEConfig(tokenizer="byte")), hf.ByteTokenizer)


# -----------------------------------------------------------------------------
# the grouped expert compute against the per-expert loop


def test_grouped_experts_equal_the_loop_forward_gradients_and_growth():
    import drlora

    def run(grouped):
        torch.manual_seed(0)
        cfg = moe.MoEConfig(n_layer=2, n_experts=6, top_k=2, hidden_size=32, n_head=2, n_kv_head=2,
                            intermediate_size=16, vocab_size=258)
        m = moe.MoETransformer(cfg)
        m.init_weights(seed=0)
        m.set_grouped(grouped)
        d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=3, r_max=8, dT=2, dropout=0.0), total_steps=10)
        for l, blk in enumerate(m.moe_layers()):
            blk.experts.lora.set_ranks(torch.tensor([1, 5, 2, 6, 3, 1]) if l == 0 else torch.tensor([2] * 6))
            with torch.no_grad():
                for P in blk.experts.lora.parameters():
                    P.copy_(torch.randn_like(P) * 0.3)
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
        x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
        y = torch.roll(x, -1, 1)
        out = m(x, targets=y)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        opt.zero_grad()
        for t in range(4):  # events at 0 and 2 (t_warm 0): growth follows the same statistics
            drlora.train_step(m, d, opt, [(x, y, None)], t)
        return out.loss.detach(), m(x).logits.detach(), grads, d.ranks.clone()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback to the loop would make this test compare the loop with itself
        (l1, z1, g1, r1), (l0, z0, g0, r0) = run(True), run(False)
    assert abs(l1 - l0) < 1e-6 and (z1 - z0).abs().max() < 1e-5
    assert g1.keys() == g0.keys() and all((g1[n] - g0[n]).abs().max() < 1e-5 for n in g1)
    assert torch.equal(r1, r0) and not torch.equal(r1[1], torch.tensor([2] * 6))  # layer 1 grew, alike
    A = g1["layers.0.mlp.experts.lora.A.up_proj"]  # grouped: slots past each expert's rank get exactly zero
    for e, r in enumerate([1, 5, 2, 6, 3, 1]):
        assert (A[e, r:] == 0).all() and A[e, :r].abs().sum() > 0


def test_experts_take_one_grouped_call_per_projection():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    experts = moe.Experts(16, 32, 16)
    torch.nn.init.normal_(experts.up_proj), torch.nn.init.normal_(experts.gate_proj), torch.nn.init.normal_(experts.down_proj)
    ids = torch.arange(16).repeat_interleave(4)
    x = torch.randn(64, 32)
    counts = {}
    for grouped in (True, False):
        experts.grouped = grouped
        with Count() as c:
            experts(x, ids)
        counts[grouped] = c.ops
    assert sum("grouped_mm" in o for o in counts[True]) == 3 and sum("mm" in o for o in counts[True]) == 3
    assert sum(o.startswith("aten.mm") for o in counts[False]) == 3 * 16  # the loop: one matmul per expert
