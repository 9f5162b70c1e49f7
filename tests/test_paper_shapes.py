"""DR-LoRA at the shapes of the paper's models: OLMoE (64 experts, top-8), Qwen1.5-MoE (60, top-4, a shared
expert), LLaMA-MoE-3.5B 4/16 (16, top-4, an MLP router, score_scale_factor) and Mixtral (8, top-2). Each
model comes from a config.json shaped as its family publishes it (the routing fields as published; widths,
layers and vocabulary tiny) through hf.config_from_hf, with the paper's settings: r 8 -> 16, r_max 32,
dT 200, p_grow 0.1, 3,750 steps. Every expected number is worked out by hand in a comment next to its
assertion; none is copied from the code's output.

The paper's schedule, the same for every family (T = 3750, dT = 200):
    t_warm = floor(0.03 * 3750) = floor(112.5) = 112
    events 112 + 200 k while <= 3750 - 200 = 3550: k <= (3550 - 112) / 200 = 17.19, k = 0 .. 17:
           18 events, the last at 112 + 200 * 17 = 3512
    cap = max(1, floor((32 - 8) * 0.1)) = floor(2.4) = 2
    Q   = ceil(N * (16 - 8) / 18), never more than the layer still lacks:
        N 64 (OLMoE):     ceil(512 / 18) = ceil(28.44) = 29 = 14 * 2 + 1  <= 64 * 2 = 128
        N 60 (Qwen1.5):   ceil(480 / 18) = ceil(26.67) = 27 = 13 * 2 + 1  <= 60 * 2 = 120
        N 16 (LLaMA-MoE): ceil(128 / 18) = ceil(7.11)  = 8  =  4 * 2      <= 16 * 2 = 32
        N  8 (Mixtral):   ceil(64 / 18)  = ceil(3.56)  = 4  =  2 * 2      <=  8 * 2 = 16
    Q <= N * cap everywhere: no event can grow every expert, so saliency decides who grows.
    At 64 and 60 experts 17 full quotas (493, 459) leave 512 - 493 = 19 and 480 - 459 = 21 to the last event.
    At 16 and 8 experts the ceil overshoots (18 * 8 = 144 > 128, 18 * 4 = 72 > 64): the layer is at its
    target after 128 / 8 = 64 / 4 = 16 events, and the last two (3312, 3512) have nothing to give. At 8
    experts only 2 of the 8 grow per event (Q / cap = 4 / 2), and an expert that keeps winning fills r_max
    in (32 - 8) / 2 = 12 events.
"""
import pytest
import torch

import drlora
import hf
import moe

T = 3750
PAPER = dict(r_init=8, r_target=16, r_max=32, dT=200, p_grow=0.1)
EVENTS = [112 + 200 * k for k in range(18)]  # worked out in the module docstring
H = 16  # hidden size of every tiny model

# -----------------------------------------------------------------------------
# the four families as their published config.json spells them; tiny widths and vocabulary, 2 layers

OLMOE = dict(  # allenai/OLMoE-1B-7B-0924: hidden 2048, intermediate 1024, 16 layers, 16 heads
    model_type="olmoe", architectures=["OlmoeForCausalLM"], vocab_size=64, hidden_size=H,
    intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, num_experts=64,
    num_experts_per_tok=8, norm_topk_prob=False, rope_theta=10000.0, rms_norm_eps=1e-05,
    max_position_embeddings=4096, clip_qkv=None, attention_bias=False, hidden_act="silu",
    tie_word_embeddings=False, pad_token_id=1, eos_token_id=2, output_router_logits=False,
    router_aux_loss_coef=0.01)
QWEN2_MOE = dict(  # Qwen/Qwen1.5-MoE-A2.7B: hidden 2048, moe_intermediate 1408, shared 5632 = 4 x 1408
    model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], vocab_size=64, hidden_size=H,
    intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=32, num_experts=60,
    num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, rope_theta=1000000.0,
    rms_norm_eps=1e-06, max_position_embeddings=8192, use_sliding_window=False, sliding_window=32768,
    max_window_layers=21, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    output_router_logits=False, router_aux_loss_coef=0.001)
LLAMA_MOE = dict(  # llama-moe/LLaMA-MoE-v1-3_5B-4_16: hidden 4096, intermediate 11008 = 16 experts x 688
    model_type="llama_moe", architectures=["LlamaMoEForCausalLM"], vocab_size=64, hidden_size=H,
    intermediate_size=64, size_experts=[[4] * 16] * 2, num_experts=16, num_selects=4,
    gate_type="TopKBalancedNoisyGate", gate_network="mlp", gate_use_softmax=True, gate_use_balance=True,
    gate_balance_loss_weight=0.01, gate_add_noise=True, gate_noise_epsilon=0.01,
    calculator_type="UniversalCalculator", multiply_gate_scores=True,
    score_scale_factor=4.0,  # E / k = 16 / 4, as the 2/8 model's 4.0 = 8 / 2 (its pretraining: "Scale4.0")
    add_weight_norm=False, drop_tokens=True, dropped_padding="zero", capacity_factor=1.25,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, rope_theta=10000.0,
    rms_norm_eps=1e-05, rope_scaling=None, max_position_embeddings=4096, hidden_act="silu",
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_bias=False)
MIXTRAL = dict(  # mistralai/Mixtral-8x7B-v0.1: hidden 4096, intermediate 14336, 32 heads / 8 kv heads
    model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=64, hidden_size=H,
    intermediate_size=8, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, rope_theta=1000000.0, rms_norm_eps=1e-05,
    max_position_embeddings=32768, sliding_window=None, hidden_act="silu", tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, output_router_logits=False, router_aux_loss_coef=0.02)

# family: (config.json, experts N, top-k K, quota Q from the module docstring)
FAMILIES = {"olmoe": (OLMOE, 64, 8, 29), "qwen2_moe": (QWEN2_MOE, 60, 4, 27),
            "llama_moe": (LLAMA_MOE, 16, 4, 8), "mixtral": (MIXTRAL, 8, 2, 4)}

# -----------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: a second intra-op thread only adds overhead."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(family, seed=0):
    """The family's tiny model through the real config path, and DR-LoRA on it at the paper's settings."""
    cfg = hf.config_from_hf(FAMILIES[family][0], source=f"{family} config.json")
    m = moe.MoETransformer(cfg)
    m.init_weights(seed=seed)
    return m, drlora.DRLoRA(m, drlora.DRLoRAConfig(**PAPER), total_steps=T)


def set_g(d, l, e, value):
    """Every projection's per-slot importance of expert e in layer l: `value` on its active slots."""
    for p in d.cfg.targets:
        d.g[p][l, e, :d.ranks[l, e]] = value


def batch(vocab=64):
    """2 sequences of 4 tokens; the first token of the second is left padding: 7 real tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, vocab, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1, 0] = 0
    x[mask == 0] = 0
    return x, mask


def published_gate(family, logits, K):
    """(weights, ids) from the router logits as each family's published code computes them, in plain torch."""
    if family == "llama_moe":  # TopKBalancedNoisyGate: the top-k logits, then a softmax over those k alone
        top, ids = logits.topk(K, dim=-1)
        return torch.softmax(top, dim=-1), ids
    w, ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)  # softmax over all experts, then the top-k
    if family == "mixtral":  # routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        w = w / w.sum(-1, keepdim=True)
    return w, ids  # OLMoE and Qwen1.5 (norm_topk_prob false): the top-k probabilities as they are


# -----------------------------------------------------------------------------
# the schedule


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_over_the_papers_3750_steps(family):
    _, N, K, Q = FAMILIES[family]
    m, d = build(family)
    assert (m.cfg.n_experts, m.cfg.top_k) == (N, K)  # the published expert count and top-k came through
    assert len(m.moe_layers()) == 2 and d.f.shape == (2, N)
    # the module docstring: t_warm 112, 18 events 112 .. 3512, Q per family, cap 2
    assert (d.t_warm, d.events, d.quota, d.cap) == (112, EVENTS, Q, 2)
    assert d.events[-1] == 3512 and len(d.events) == 18
    assert Q <= N * d.cap  # saliency decides: no event can grow every expert
    assert 18 * min(Q, N * 2) >= N * (16 - 8)  # the target is reachable, so the settings are not refused


# -----------------------------------------------------------------------------
# f after one step, by hand


@pytest.mark.parametrize("family", FAMILIES)
def test_f_after_one_step_is_the_published_gate_weight_per_real_token(family):
    _, N, K, _ = FAMILIES[family]
    m, d = build(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # routers redrawn N(0, 1): logits of std about sqrt(16) = 4, clear top-k choices
        for blk in m.moe_layers():
            for p in blk.gate.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    routers = [[p.detach().clone() for p in blk.gate.parameters()] for blk in m.moe_layers()]
    inputs = []  # what reaches each MoE block: the post-attention norm's output, (B, T, H)
    hooks = [blk.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().reshape(-1, H)))
             for blk in m.moe_layers()]
    x, mask = batch()
    with torch.no_grad():
        out = m(x, attention_mask=mask)
    for h in hooks:
        h.remove()
    d.observe(out.routers, mask)
    d.update_statistics()

    valid = mask.reshape(-1).bool().tolist()  # 7 real tokens; token 4 (row 1, position 0) is padding
    assert sum(valid) == 7 and not valid[4]
    for l, (h, W) in enumerate(zip(inputs, routers)):
        if family == "llama_moe":  # gate_network "mlp": Linear(H, E) -> tanh -> Linear(E, E), no biases
            logits = torch.tanh(h @ W[0].T) @ W[1].T
        else:
            logits = h @ W[0].T
        torch.testing.assert_close(logits, out.routers[l].logits)  # the hook saw the router's real input
        # k-th and (k+1)-th logits more than 1e-3 apart on every real token: no rounding can flip the choice
        top = logits.topk(K + 1, dim=-1).values
        assert ((top[:, K - 1] - top[:, K])[valid] > 1e-3).all()
        w, ids = published_gate(family, logits, K)
        assert torch.equal(ids[valid].sort(-1).values, out.routers[l].ids[valid].sort(-1).values)
        # f = beta * 0 + (1 - beta) * (sum over the real tokens of the weight expert i received) / 7
        gate_sum = torch.zeros(N)
        for n in range(8):
            if valid[n]:
                for k in range(K):
                    gate_sum[ids[n, k]] += w[n, k]
        # rtol 1e-5: the same formulas in another float32 order (a softmax over all renormalised, or one over
        # the top-k alone) differ by a few ulps (1e-7). Counting the padding token divides by 8, not 7 (12 %);
        # renormalising where the family does not moves f by 1 - (top-k mass) >= 2e-3, checked below.
        torch.testing.assert_close(d.f[l], 0.1 * gate_sum / 7, rtol=1e-5, atol=1e-9)
        mass = w.sum(-1)[valid]  # the gate weight each real token hands out in total
        if family in ("mixtral", "llama_moe"):
            # Renormalised: every real token hands out exactly 1, so the layer's f sums to 0.1 * 7 / 7 = 0.1.
            # LLaMA-MoE mixes expert i by score_i * score_scale_factor (4.0, cfg.expert_scale), yet f holds
            # score_i: RouterOut.weights, which drlora.observe receives, is the softmax over the top-k logits,
            # and MoE.forward multiplies by expert_scale only where it mixes. SPEC section 3 asks for the
            # gate weight that mixed the expert's output; the factor is one constant for every expert of every
            # layer (hf.py refuses per-layer values), so it is no part of any expert's share of the mixing:
            # f_hat, S and every growth decision are the same with it or without it, and without it f stays a
            # frequency (sum 0.1 after one step, as Mixtral's; with it, 0.4).
            assert m.cfg.expert_scale == (4.0 if family == "llama_moe" else 1.0)
            torch.testing.assert_close(mass, torch.ones(7))
            torch.testing.assert_close(d.f[l].sum(), torch.tensor(0.1))
        else:
            # Not renormalised (norm_topk_prob false): a token hands out only its top-k probability mass, the
            # skipped 64 - 8 or 60 - 4 experts keep the rest; far enough below 1 that renormalising shows.
            # Qwen1.5's shared expert is no column of f: its 60 columns and the hand sum over the routed
            # experts alone are all of f.
            assert (mass < 1 - 2e-3).all()
            assert d.f[l].sum() < 0.1 * (1 - 2e-3)


def test_qwen_shared_expert_gets_no_lora_no_gradient_and_no_statistics():
    m, d = build("qwen2_moe")
    blocks = m.moe_layers()
    assert len(blocks) == 2  # decoder_sparse_step 1, mlp_only_layers []: both layers are MoE
    shared = [p for blk in blocks for mod in (blk.shared_expert, blk.shared_expert_gate)
              for p in mod.parameters()]
    # per layer: gate_proj and up_proj (32, 16), down_proj (16, 32), shared_expert_gate (1, 16)
    assert sum(p.numel() for p in shared) == 2 * (32 * 16 * 3 + 16)
    assert not any(p.requires_grad for p in shared)
    assert not any(isinstance(mod, drlora.ExpertLoRA) for blk in blocks
                   for mod in blk.shared_expert.modules())
    trainable = {id(p) for p in d.trainable_parameters()}
    assert not any(id(p) in trainable for p in shared)
    # LoRA on the 60 routed experts only, at r_max 32 slots: up A (60, 32, 16) + B (60, 8, 32) = 30720 +
    # 15360, down A (60, 32, 8) + B (60, 16, 32) = 15360 + 30720: 92160 per layer. LoRA on the shared expert's
    # up_proj alone would add 32 x (16 + 32) = 1536.
    assert sum(p.numel() for p in d.lora_parameters()) == 2 * 92160
    assert sum(p.numel() for p in d.router_parameters()) == 2 * 60 * 16  # the router: Linear(16, 60), no bias
    # statistics for the 60 routed experts: f (L, 60), g (L, 60, r_max), ranks (L, 60)
    assert d.f.shape == (2, 60) and d.ranks.shape == (2, 60)
    assert all(v.shape == (2, 60, 32) for v in d.g.values())

    # one real step after warm-up: LoRA B trains off zero, the shared expert gets no gradient and stays
    before = [p.detach().clone() for p in shared]
    x, mask = batch()
    y = torch.full_like(x, moe.IGNORE_INDEX)
    y[:, :-1] = x[:, 1:]
    y[mask == 0] = moe.IGNORE_INDEX
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0)
    drlora.train_step(m, d, opt, [(x, y, mask)], t=200)
    assert sum(blk.experts.lora.B["up_proj"].abs().sum() for blk in blocks) > 0
    assert all(p.grad is None for p in shared)
    assert all(torch.equal(p, q) for p, q in zip(shared, before))

    # The shared expert's output does not enter f: with it silenced (down_proj 0) or loud (down_proj N(0, 1)),
    # layer 0's f is bit-identical. Layer 1's f moves by far more than rounding, because the shared expert of
    # layer 0 is part of layer 1's input: the change is real.
    f = []
    for loud in (False, True):
        m2, d2 = build("qwen2_moe")
        with torch.no_grad():
            for blk in m2.moe_layers():
                W = blk.shared_expert.down_proj.weight
                W.copy_(torch.randn(W.shape, generator=torch.Generator().manual_seed(2)) if loud else 0 * W)
            out = m2(x, attention_mask=mask)
        d2.observe(out.routers, mask)
        d2.update_statistics()
        f.append(d2.f.clone())
    assert torch.equal(f[0][0], f[1][0])
    assert (f[0][1] - f[1][1]).abs().max() > 0.1 * f[0][1].abs().max()


# -----------------------------------------------------------------------------
# one growth event by hand


# Layer 0 (f = 1 and g = 1 at r = 8 unless said), ordered by f*g / (r + 1)^1.2:
#   e0: f 2, g 0.2, r 8   0.4 / 9^1.2  = 0.4 / 13.967 = 0.0286   (9^1.2 = exp(1.2 * 2.1972) = 13.967)
#   e1: g 8, r 32 (full)  8   / 33^1.2 = 8 / 66.40    = 0.1205   (33^1.2 = exp(1.2 * 3.4965) = 66.40)
#   e2: g 8, r 31         8   / 32^1.2 = 8 / 64       = 0.125    (32^1.2 = 2^6)
#   e3: g 2.5, r 20       2.5 / 21^1.2 = 2.5 / 38.61  = 0.0648   (21^1.2 = exp(1.2 * 3.0445) = 38.61)
#   e4 ..: all equal      1   / 9^1.2  = 1 / 13.967   = 0.0716
# f_hat and g_hat divide every expert of the layer alike, so S keeps this order: e2 > e1 > e4 = e5 = ...
# (ties: lower index first) > e3 > e0. e2 gets min(cap 2, 32 - 31, Q) = 1; e1 is full: 0; the other Q - 1
# go 2 at a time to e4, e5, ...; e3 (f*g 2.5 > 1) loses to the rank penalty, e0 (f 2) to its small g.
# Layer 1: f = g = 1 and r = 8 everywhere: bit-equal scores, lower index first, Q spread 2 at a time from e0.
GROWN_AT_FIRST_EVENT = {  # family: ({expert: growth} in layer 0, {expert: growth} in layer 1)
    # Q 29: e2 +1, then 28 = 14 x 2: e4 .. e17;  layer 1: 29 = 14 x 2 + 1: e0 .. e13 +2, e14 +1
    "olmoe": ({2: 1, **{e: 2 for e in range(4, 18)}}, {**{e: 2 for e in range(14)}, 14: 1}),
    # Q 27: e2 +1, then 26 = 13 x 2: e4 .. e16;  layer 1: 27 = 13 x 2 + 1: e0 .. e12 +2, e13 +1
    "qwen2_moe": ({2: 1, **{e: 2 for e in range(4, 17)}}, {**{e: 2 for e in range(13)}, 13: 1}),
    # Q 8: e2 +1, then 7 = 3 x 2 + 1: e4, e5, e6 +2, e7 +1;  layer 1: 8 = 4 x 2: e0 .. e3
    "llama_moe": ({2: 1, 4: 2, 5: 2, 6: 2, 7: 1}, {e: 2 for e in range(4)}),
    # layer 0 holds 32 + 31 + 20 + 5 x 8 = 123 of 8 x 16 = 128: quota min(4, 5) = 4: e2 +1, e4 +2, e5 +1;
    # layer 1: 4 = 2 x 2: e0, e1
    "mixtral": ({2: 1, 4: 2, 5: 1}, {0: 2, 1: 2}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_one_growth_event_by_hand(family):
    _, N, _, Q = FAMILIES[family]
    m, d = build(family)
    m.moe_layers()[0].experts.lora.set_ranks(torch.tensor([8, 32, 31, 20] + [8] * (N - 4)))
    d.f[:] = 1.0
    d.f[0, 0] = 2.0
    for e, v in enumerate([0.2, 8.0, 8.0, 2.5] + [1.0] * (N - 4)):
        set_g(d, 0, e, v)
    for e in range(N):
        set_g(d, 1, e, 1.0)
    # S = f_hat * g_hat / (r + 1)^1.2; sum f = 2 + (N - 1) = N + 1;
    # sum g = 0.2 + 8 + 8 + 2.5 + (N - 4) = N + 14.7
    S = d.saliency()
    fs, gs = N + 1, N + 14.7
    hand = [2 / fs * 0.2 / gs / 9 ** 1.2, 1 / fs * 8 / gs / 33 ** 1.2, 1 / fs * 8 / gs / 64,
            1 / fs * 2.5 / gs / 21 ** 1.2, 1 / fs * 1 / gs / 9 ** 1.2]
    torch.testing.assert_close(S[0, :5], torch.tensor(hand))
    assert len(set(S[0, 4:].tolist())) == 1 and len(set(S[1].tolist())) == 1  # ties are bit-equal
    ranks = d.ranks.clone()
    event = d.grow(EVENTS[0])  # t = 112, the first event: quota Q, cap 2
    want = [[grown.get(e, 0) for e in range(N)] for grown in GROWN_AT_FIRST_EVENT[family]]
    assert (d.ranks - ranks).tolist() == want and event["grown"] == want
    assert [sum(w) for w in want] == [Q, Q]  # each layer spends its whole quota (the sums in the table)
    assert d.ranks.max() == 32  # e1 stayed at r_max, e2 reached it


# -----------------------------------------------------------------------------
# the final budget over all 18 events


# Layer 0, a fixed order: f = 1, g_i = (N - i) * (r_i + 1)^1.2 at every event, so the rank penalty cancels and
# S_i is proportional to N - i: e0 > e1 > ... at every event (neighbours differ by >= 1/64, far above float32
# rounding). Each event gives +2 from e0 down, skipping experts full at 32, and +1 to the next if Q is odd.
#   N 64, Q 29 = 14 x 2 + 1: events 1-12: e0 .. e13 +2, e14 +1 -> e0 .. e13 at 8 + 24 = 32 (full), e14 at 20;
#     events 13-17: e14 .. e27 +2, e28 +1 -> e14 at 30, e15 .. e27 at 18, e28 at 13; 17 x 29 = 493 spent,
#     19 left; event 18 (quota min(29, 19) = 19, cap 2): e14 +2 -> 32, e15 .. e22 +2 (16) -> 20, e23 +1.
#     Final: e0 .. e14 32, e15 .. e22 20, e23 19, e24 .. e27 18, e28 13, e29 .. e63 8:
#     15 x 32 + 8 x 20 + 19 + 4 x 18 + 13 + 35 x 8 = 480 + 160 + 19 + 72 + 13 + 280 = 1024 = 64 x 16.
#   N 60, Q 27 = 13 x 2 + 1: events 1-12: e0 .. e12 +2, e13 +1 -> e0 .. e12 at 32, e13 at 20;
#     events 13-17: e13 .. e25 +2, e26 +1 -> e13 at 30, e14 .. e25 at 18, e26 at 13; 17 x 27 = 459 spent,
#     21 left; event 18 (quota 21, cap 2): e13 +2 -> 32, e14 .. e22 +2 (18) -> 20, e23 +1 -> 19.
#     Final: 14 x 32 + 9 x 20 + 19 + 2 x 18 + 13 + 33 x 8 = 448 + 180 + 19 + 36 + 13 + 264 = 960 = 60 x 16.
#   N 16, Q 8 = 4 x 2: events 1-12: e0 .. e3 +2 -> 32; events 13-16: e4 .. e7 +2 -> 16; 16 x 8 = 128 spent,
#     the target; events 17, 18 give 0. Final 4 x 32 + 4 x 16 + 8 x 8 = 256 = 16 x 16.
#   N 8, Q 4 = 2 x 2: events 1-12: e0, e1 +2 -> 32; events 13-16: e2, e3 +2 -> 16; events 17, 18 give 0.
#     Final 2 x 32 + 2 x 16 + 4 x 8 = 128 = 8 x 16.
# With the cap lifted to r_max at the last event, at 64 experts e14 would get +2, e15 +14 (18 -> 32) and e16
# the last 3; at 60 experts e13 +2, e14 +14, e15 +5.
#
# Layer 1, equal statistics: f = g = 1 at every event, S_i = c / (r_i + 1)^1.2: the lowest rank first, ties to
# the lower index, so the order changes as ranks grow. If every rank is m, m + 1 or m + 2 before an event, it
# still is after: the event grows every m (by 1 or 2) before any m + 1, and every m + 1 before any m + 2, so
# once it reaches the m + 1's no m is left and nothing passes m + 3 (the same one step up for the m + 2's).
# Ranks start equal, so no expert is ever more than 2 above the lowest: none reaches 32 (that would need every
# rank >= 30, past the budget of N x 16), every event spends min(Q, what is left) -- layer 0's per-event sums
# -- and the layer ends with ranks within 2 of each other. At 16 and 8 experts each run of N / (Q / 2) = 4
# events gives every expert +2 in turn (the 4 or 2 lowest, by index): after 16 events all have +8: all at 16.
FINAL = {  # family: (per-event sum in both layers, layer 0's final ranks)
    "olmoe": ([29] * 17 + [19], [32] * 15 + [20] * 8 + [19] + [18] * 4 + [13] + [8] * 35),
    "qwen2_moe": ([27] * 17 + [21], [32] * 14 + [20] * 9 + [19] + [18] * 2 + [13] + [8] * 33),
    "llama_moe": ([8] * 16 + [0, 0], [32] * 4 + [16] * 4 + [8] * 8),
    "mixtral": ([4] * 16 + [0, 0], [32] * 2 + [16] * 2 + [8] * 4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_final_budget_with_the_cap_at_every_event(family):
    _, N, _, _ = FAMILIES[family]
    m, d = build(family)
    sums, largest, spread = [], [], []
    for t in EVENTS:
        ranks = d.ranks.clone()
        d.f[:] = 1.0
        for e in range(N):
            set_g(d, 0, e, (N - e) * (int(ranks[0, e]) + 1) ** 1.2)
            set_g(d, 1, e, 1.0)
        d.grow(t)
        grown = d.ranks - ranks
        assert (grown >= 0).all()
        sums.append(grown.sum(-1).tolist())
        largest.append(int(grown.max()))
        spread.append(int(d.ranks[1].max() - d.ranks[1].min()))
    per_event, layer0 = FINAL[family]
    assert d.ranks.sum(-1).tolist() == [N * 16, N * 16]  # every layer at N * r_target exactly
    assert d.ranks.max() <= 32 and d.ranks.min() >= 8
    # the paper's per-expert cap at every event, the last included: no expert grows by more than 2 at once
    assert max(largest) <= 2, f"largest growth of one expert, per event: {largest}"
    assert max(spread) <= 2, f"layer 1 (equal statistics), largest minus smallest rank per event: {spread}"
    assert sums == [[s, s] for s in per_event]
    assert d.ranks[0].tolist() == layer0
    if N <= 16:
        assert d.ranks[1].tolist() == [16] * N  # equal statistics end at uniform LoRA
