"""drlora.py against SPEC.md. Every expected number is worked out here, by hand,
in a comment next to the assertion; none is copied from the code's output. Tiny models on
the CPU; two real processes on gloo for the data-parallel test."""
import io
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import drlora
import hf
import moe

# -----------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: a second intra-op thread only adds overhead."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(n_layer=2, n_experts=8, top_k=2, hidden_size=32, intermediate_size=16, seed=0):
    cfg = moe.MoEConfig(n_layer=n_layer, n_experts=n_experts, top_k=top_k, hidden_size=hidden_size, n_head=2,
                        n_kv_head=2, intermediate_size=intermediate_size, vocab_size=258)
    m = moe.MoETransformer(cfg)
    m.init_weights(seed=seed)
    return m


def batch(seed, B=2, T=8):
    """Random bytes; the last row left-padded by 3 tokens (pad 257, not attended, not in the loss)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, :3] = 0
    x[mask == 0] = 257
    y = torch.full_like(x, moe.IGNORE_INDEX)
    y[:, :-1] = x[:, 1:]
    y[mask == 0] = moe.IGNORE_INDEX
    return x, y, mask


def train(m, d, opt, steps, data_seed=0, on_backward=None, on_event=None, on_step=None):
    """Steps of drlora.train_step; hooks see the state after backward (just before d.step), right after
    a growth event (before opt.step()) and after opt.step()."""
    step, events = d.step, []

    def hooked(t):
        if on_backward:
            on_backward(t)
        event = step(t)
        if event and on_event:
            on_event(t)
        return event

    d.step = hooked
    for t in steps:
        _, event = drlora.train_step(m, d, opt, [batch(data_seed + t)], t)
        events += [event] if event else []
        if on_step:
            on_step(t)
    d.step = step
    return events


def router(ids, weights, E):
    ids = torch.tensor(ids)
    return moe.RouterOut(torch.zeros(ids.shape[0], E), ids, torch.tensor(weights))


def set_g(d, l, e, value):
    """Every projection's per-slot importance of expert e in layer l: `value` on its active slots."""
    for p in d.cfg.targets:
        d.g[p][l, e, :d.ranks[l, e]] = value


# -----------------------------------------------------------------------------
# rank importance g


def test_rank_importance_product_of_l1_norms_and_ema():
    # 1 layer, 3 experts, H=4, I=2: up_proj A (3, r_max, 4), B (3, 2, r_max); down_proj A (3, r_max, 2), B (3, 4, r_max)
    m = tiny(n_layer=1, n_experts=3, hidden_size=4, intermediate_size=2)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=3, dT=10), total_steps=100)
    lora = m.moe_layers()[0].experts.lora
    Au, Bu, Ad, Bd = lora.A["up_proj"], lora.B["up_proj"], lora.A["down_proj"], lora.B["down_proj"]
    with torch.no_grad():
        for P in (Au, Bu, Ad, Bd):
            P.zero_()
            P.grad = torch.zeros_like(P)
        # expert 1, slot 0, up_proj
        Au[1, 0] = torch.tensor([1.0, -2.0, 0.0, 0.5])
        Au.grad[1, 0] = torch.tensor([3.0, 1.0, 7.0, -2.0])  # |grad*A|_1 = |3| + |-2| + |0| + |-1| = 6
        Bu[1, :, 0] = torch.tensor([2.0, -1.0])
        Bu.grad[1, :, 0] = torch.tensor([0.5, 4.0])  # |grad*B|_1 = |1| + |-4| = 5     -> s = 6 * 5 = 30
        # expert 1, slot 0, down_proj
        Ad[1, 0] = torch.tensor([1.0, 1.0])
        Ad.grad[1, 0] = torch.tensor([2.0, 3.0])  # 2 + 3 = 5
        Bd[1, :, 0] = torch.tensor([1.0, 0.0, 0.0, -1.0])
        Bd.grad[1, :, 0] = torch.tensor([2.0, 9.0, 9.0, 0.0])  # |2| + 0 + 0 + 0 = 2  -> s = 5 * 2 = 10
        # expert 2, slot 0, up_proj: A-term nonzero but B-term zero -> s = 0 (a product, not the official sum)
        Au[2, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])
        Au.grad[2, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # 4
        Bu.grad[2, :, 0] = torch.tensor([5.0, 5.0])  # B = 0 -> 0  -> s = 4 * 0 = 0
    d.update_statistics()
    g1_up = torch.zeros(1, 3, 3)
    g1_up[0, 1, 0] = 0.1 * 30  # (1 - beta) * s = 3
    g1_down = torch.zeros(1, 3, 3)
    g1_down[0, 1, 0] = 0.1 * 10  # 1
    torch.testing.assert_close(d.g["up_proj"], g1_up)
    torch.testing.assert_close(d.g["down_proj"], g1_down)

    with torch.no_grad():
        Au.grad[1, 0] *= 2  # A-term 12 -> s2 = 12 * 5 = 60; down_proj unchanged: s2 = 10
    d.update_statistics()
    # up: 0.9 * 3 + 0.1 * 60 = 2.7 + 6 = 8.7;  down: 0.9 * 1 + 0.1 * 10 = 1.9
    assert d.g["up_proj"][0, 1, 0].item() == pytest.approx(0.9 * 0.1 * 30 + 0.1 * 60, rel=1e-6)
    assert d.g["down_proj"][0, 1, 0].item() == pytest.approx(0.9 * 0.1 * 10 + 0.1 * 10, rel=1e-6)
    assert d.g["up_proj"][0, 2].abs().sum() == 0 and d.g["up_proj"][0, 0].abs().sum() == 0
    # expert 1 has rank 1: its importance = mean over projections of slot 0 = (8.7 + 1.9) / 2 = 5.3
    assert d.expert_importance()[0, 1].item() == pytest.approx(5.3, rel=1e-6)

    # a missing gradient (DDP: no token reached the adapter) counts as zero: g only decays
    Au.grad = None
    d.update_statistics()
    assert d.g["up_proj"][0, 1, 0].item() == pytest.approx(0.9 * 8.7, rel=1e-6)  # 7.83


def test_expert_importance_mean_over_active_slots_then_projections():
    m = tiny(n_layer=1, n_experts=3, hidden_size=4, intermediate_size=2)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=4, dT=10), total_steps=100)
    m.moe_layers()[0].experts.lora.set_ranks(torch.tensor([2, 3, 1]))
    up, down = d.g["up_proj"][0], d.g["down_proj"][0]
    up[0] = torch.tensor([1.0, 3.0, 1e6, 1e6])  # expert 0, rank 2: slots 2, 3 inactive, huge, must not count
    down[0] = torch.tensor([6.0, 0.0, 1e6, 0.0])
    up[1] = torch.tensor([3.0, 3.0, 6.0, 1e6])  # expert 1, rank 3
    down[1] = torch.tensor([0.0, 0.0, 0.0, 1e6])
    up[2] = torch.tensor([5.0, 1e6, 1e6, 1e6])  # expert 2, rank 1
    down[2] = torch.tensor([1.0, 1e6, 1e6, 1e6])
    # expert 0: up (1 + 3) / 2 = 2, down (6 + 0) / 2 = 3 -> (2 + 3) / 2 = 2.5
    # expert 1: up (3 + 3 + 6) / 3 = 4, down 0 -> (4 + 0) / 2 = 2
    # expert 2: up 5, down 1 -> 3
    torch.testing.assert_close(d.expert_importance(), torch.tensor([[2.5, 2.0, 3.0]]))


# -----------------------------------------------------------------------------
# routing frequency f


def test_routing_frequency_weights_counts_padding_and_ema():
    m = tiny(n_layer=2, n_experts=3)
    cfg = drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=3, dT=10)
    d = drlora.DRLoRA(m, cfg, total_steps=100)
    # 4 tokens (batch 2 x 2), 3 experts, top-2; token 2 (row 1, first position) is padding
    mask = torch.tensor([[1, 1], [0, 1]])
    ids0 = [[0, 1], [1, 2], [0, 1], [2, 1]]
    w0 = [[0.5, 0.25], [0.5, 0.25], [0.9, 0.05], [0.75, 0.125]]
    ids1 = [[2, 0], [2, 0], [1, 2], [2, 0]]  # layer 1
    w1 = [[0.5, 0.5], [0.5, 0.25], [0.5, 0.5], [0.25, 0.25]]
    d.observe([router(ids0, w0, 3), router(ids1, w1, 3)], mask)
    d.update_statistics()
    # layer 0, valid tokens 0, 1, 3:  e0: 0.5;  e1: 0.25 + 0.5 + 0.125 = 0.875;  e2: 0.25 + 0.75 = 1.0;  / 3 tokens
    # layer 1, valid tokens 0, 1, 3:  e0: 0.5 + 0.25 + 0.25 = 1.0;  e1: 0;  e2: 0.5 + 0.5 + 0.25 = 1.25;  / 3
    w_step1 = torch.tensor([[0.5, 0.875, 1.0], [1.0, 0.0, 1.25]]) / 3
    torch.testing.assert_close(d.f, 0.1 * w_step1)

    # step 2: two micro-batches of 1 and 3 tokens, no mask: sums and token counts add up (4 tokens)
    d.observe([router([[1, 0]], [[0.5, 0.5]], 3), router([[0, 1]], [[1.0, 0.0]], 3)])
    d.observe([router([[0, 2]] * 3, [[0.5, 0.25]] * 3, 3), router([[2, 1]] * 3, [[0.25, 0.25]] * 3, 3)])
    # layer 0: e0: 0.5 + 3 * 0.5 = 2.0;  e1: 0.5;  e2: 3 * 0.25 = 0.75;  / 4
    # layer 1: e0: 1.0;  e1: 0 + 3 * 0.25 = 0.75;  e2: 3 * 0.25 = 0.75;  / 4
    w_step2 = torch.tensor([[2.0, 0.5, 0.75], [1.0, 0.75, 0.75]]) / 4
    d.update_statistics()
    f2 = 0.9 * 0.1 * w_step1 + 0.1 * w_step2
    torch.testing.assert_close(d.f, f2)

    # f is never reset: a growth event zeroes g and keeps f; the next step (no routing) only decays it
    set_g(d, 0, 1, 1.0)
    d.grow(d.events[0])
    assert torch.equal(d.f, f2)
    assert all(v.abs().sum() == 0 for v in d.g.values())
    d.step(d.events[0] + 1)  # no observe: this step's routing is 0
    torch.testing.assert_close(d.f, 0.9 * f2)

    # freq='count': hard top-k counts over the same valid tokens (0, 1, 3)
    dc = drlora.DRLoRA(tiny(n_layer=2, n_experts=3), drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=3, dT=10, freq="count"),
                       total_steps=100)
    dc.observe([router(ids0, w0, 3), router(ids1, w1, 3)], mask)
    dc.update_statistics()
    # layer 0: e0 in token 0 -> 1;  e1 in 0, 1, 3 -> 3;  e2 in 1, 3 -> 2   (padding token 2 would add e0, e1)
    # layer 1: e0 in 0, 1, 3 -> 3;  e1 -> 0;  e2 in 0, 1, 3 -> 3
    torch.testing.assert_close(dc.f, 0.1 * torch.tensor([[1.0, 3.0, 2.0], [3.0, 0.0, 3.0]]) / 3)


# -----------------------------------------------------------------------------
# saliency and allocation


def test_saliency_rank_penalty_beats_larger_fg():
    m = tiny(n_layer=1, n_experts=3)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=2, r_target=5, r_max=8, dT=10), total_steps=100)
    m.moe_layers()[0].experts.lora.set_ranks(torch.tensor([8, 2, 2]))
    d.f[0] = torch.tensor([0.5, 0.3, 0.2])  # sums to 1: f_hat = f
    set_g(d, 0, 0, 0.4)  # g sums to 0.4 + 0.5 + 0.1 = 1: g_hat = g
    set_g(d, 0, 1, 0.5)
    set_g(d, 0, 2, 0.1)
    # f*g: e0 0.2 (largest), e1 0.15, e2 0.02
    # (8+1)^1.2 = exp(1.2 ln 9) = exp(1.2 * 2.19722) = exp(2.63667) = 13.967
    # (2+1)^1.2 = exp(1.2 ln 3) = exp(1.2 * 1.09861) = exp(1.31834) = 3.7372
    # S: e0 0.2 / 13.967 = 0.014319;  e1 0.15 / 3.7372 = 0.040137;  e2 0.02 / 3.7372 = 0.005352
    S = d.saliency()[0]
    torch.testing.assert_close(S, torch.tensor([0.2 / 9 ** 1.2, 0.15 / 3 ** 1.2, 0.02 / 3 ** 1.2]))
    assert S[0].item() == pytest.approx(0.014319, abs=2e-6) and S[1].item() == pytest.approx(0.040137, abs=2e-6)
    assert S[1] > S[0] > S[2]  # expert 1 beats expert 0 despite its smaller f*g
    # the event gives expert 1 the first pick. T 100, dT 10: t_warm 3, events 3, 13, ..., 83 (9);
    # quota ceil(3 * (5 - 2) / 9) = 1 (the layer holds 12 of 15), cap max(1, floor(6 * 0.1)) = 1
    assert (d.quota, d.cap) == (1, 1)
    assert d.grow(d.events[0])["ranks"] == [[8, 3, 2]]


def test_allocate_by_hand():
    # quota 5, cap 2, r_max 8. Order by S: e1 (0.5), e3 (0.5, tie: after e1), e0 (0.3), e2 (0.1), e4 (0.0)
    # e1: min(2, 8-2, 5) = 2 -> 4, left 3;  e3: min(2, 8-7, 3) = 1 -> 8 (full), left 2;  e0: min(2, 6, 2) = 2 -> 4, left 0
    S, ranks = torch.tensor([0.3, 0.5, 0.1, 0.5, 0.0]), torch.tensor([2, 2, 2, 7, 2])
    assert drlora.allocate(S, ranks, 5, 2, 8).tolist() == [4, 4, 2, 8, 2]
    assert ranks.tolist() == [2, 2, 2, 7, 2]  # input untouched
    # ties: lower index first. quota 3, cap 2: e1 gets 2, e2 the last 1, e3 nothing
    assert drlora.allocate(torch.tensor([0.2, 0.7, 0.7, 0.7]), torch.ones(4, dtype=torch.long), 3, 2, 4).tolist() == [1, 3, 2, 1]
    # cap: a big quota still gives each expert at most cap = 2
    assert drlora.allocate(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3, dtype=torch.long), 100, 2, 8).tolist() == [3, 3, 3]
    # experts full: e0 gets 8 - 7 = 1, e1 is at r_max; 4 of the quota of 5 stay unspent, nothing above r_max
    assert drlora.allocate(torch.tensor([0.9, 0.8]), torch.tensor([7, 8]), 5, 2, 8).tolist() == [8, 8]


def test_grow_event_through_step_with_hand_statistics():
    # 1 layer, 4 experts, r 1 -> 2, r_max 5, p_grow 0.25, T 100, dT 40:
    # t_warm = floor(0.03 * 100) = 3; events 3, 43 (83 > 100 - 40 = 60); Q = ceil(4 * (2-1) / 2) = 2;
    # cap = max(1, floor((5 - 1) * 0.25)) = 1
    m = tiny(n_layer=1, n_experts=4)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=5, dT=40, p_grow=0.25), total_steps=100)
    assert (d.t_warm, d.events, d.quota, d.cap) == (3, [3, 43], 2, 1)
    lora = m.moe_layers()[0].experts.lora
    # routing: each expert gets weight 0.5 from one of the 2 tokens: f = 0.1 * 0.5 / 2 = 0.025 each
    d.observe([router([[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]], 4)])
    # gradients by hand, up_proj slot 0 only: expert 3 s = 4 * 3 = 12, expert 1 s = 1 * 2 = 2
    with torch.no_grad():
        for P in (lora.A["up_proj"], lora.B["up_proj"], lora.A["down_proj"], lora.B["down_proj"]):
            P.zero_()
            P.grad = torch.zeros_like(P)
        lora.A["up_proj"][3, 0, 0], lora.A["up_proj"].grad[3, 0, 0] = 2.0, 2.0  # 4
        lora.B["up_proj"][3, 0, 0], lora.B["up_proj"].grad[3, 0, 0] = 1.0, 3.0  # 3
        lora.A["up_proj"][1, 0, 0], lora.A["up_proj"].grad[1, 0, 0] = 1.0, 1.0  # 1
        lora.B["up_proj"][1, 0, 0], lora.B["up_proj"].grad[1, 0, 0] = 1.0, 2.0  # 2
    event = d.step(3)  # step 3's statistics count in step 3's event
    # g per expert: (0.1 * s + 0) / 2 projections: e3 0.6, e1 0.1, e0 = e2 = 0. g_hat: 6/7, 1/7, 0, 0; f_hat 1/4 each
    # S = f_hat * g_hat / 2^1.2: e3 > e1 > e0 = e2 = 0 -> the quota of 2 at cap 1: e3 +1, then e1 +1
    torch.testing.assert_close(torch.tensor(event["saliency"][0]),
                               torch.tensor([0.0, 0.25 / 7, 0.0, 0.25 * 6 / 7]) / 2 ** 1.2)
    assert event["ranks"] == [[1, 2, 1, 2]] and event["grown"] == [[0, 1, 0, 1]]
    assert lora.r == [1, 2, 1, 2]  # the python mirror used by the forward follows
    assert all(v.abs().sum() == 0 for v in d.g.values())  # g reset
    torch.testing.assert_close(d.f, torch.full((1, 4), 0.025))  # f kept
    # the last event, no new statistics: S = 0 everywhere, ties -> lower index first; it lacks 4 * 2 - 6 = 2,
    # given like any event's quota at cap 1: e0 +1, e1 +1 (to 3). (A cap lifted to r_max would give e0 +2.)
    for P in (lora.A["up_proj"], lora.B["up_proj"]):
        P.grad = None
    assert d.step(43)["ranks"] == [[2, 3, 1, 2]]
    assert d.ranks.sum() == 4 * 2  # N * r_target


def test_grow_quota_never_overshoots_target():
    m = tiny(n_layer=2, n_experts=4)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=5, dT=40, p_grow=0.5), total_steps=100)
    m.moe_layers()[1].experts.lora.set_ranks(torch.tensor([2, 2, 2, 1]))  # 7: one short of 4 * 2 = 8
    d.f.fill_(1.0)
    for l in range(2):
        set_g(d, l, 3, 1.0)  # expert 3 most salient in both layers
    # layer 0: quota min(2, 8 - 4) = 2 -> e3 +2;  layer 1: quota min(2, 8 - 7) = 1 -> e3 +1
    assert d.grow(3)["ranks"] == [[1, 1, 1, 3], [2, 2, 2, 2]]


def test_saliency_ablations_and_global_allocation():
    # 3 experts, r 1 -> 2, r_max 4, T 100, dT 30: t_warm 3, events 3, 33, 63; Q = ceil(3 / 3) = 1; cap = max(1, 0) = 1
    def make(**kw):
        d = drlora.DRLoRA(tiny(n_layer=2, n_experts=3), drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=4, dT=30, **kw), 100)
        assert (d.events, d.quota, d.cap) == ([3, 33, 63], 1, 1)
        return d

    def hand(d):
        d.f[0] = torch.tensor([0.6, 0.3, 0.1])
        d.f[1] = torch.tensor([0.6, 0.3, 0.1])
        for e, v in enumerate([0.1, 0.3, 0.6]):
            set_g(d, 0, e, v)
            set_g(d, 1, e, v)
        return d

    # f*g = 0.06, 0.09, 0.06 -> e1; f alone -> e0; g alone -> e2 (equal ranks: the penalty does not reorder)
    assert hand(make(saliency="fg")).grow(3)["ranks"] == [[1, 2, 1], [1, 2, 1]]
    assert hand(make(saliency="f")).grow(3)["ranks"] == [[2, 1, 1], [2, 1, 1]]
    assert hand(make(saliency="g")).grow(3)["ranks"] == [[1, 1, 2], [1, 1, 2]]

    def two_layers(d):
        d.f[0], d.f[1] = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([1.0, 1.0, 1.0])
        for e, v in enumerate([0.5, 0.5, 0.0]):
            set_g(d, 0, e, v)
        for e in range(3):
            set_g(d, 1, e, 1.0)
        return d

    # f_hat * g_hat: layer 0 0.25, 0.25, 0; layer 1 1/9 each. Per layer: Q = 1 each, the first (ties) of each layer.
    # Global: one pool of 2 * 1 = 2 ranks, compared across layers: both go to layer 0's e0 and e1.
    assert two_layers(make(allocation="layer")).grow(3)["ranks"] == [[2, 1, 1], [2, 1, 1]]
    assert two_layers(make(allocation="global")).grow(3)["ranks"] == [[2, 2, 1], [1, 1, 1]]


# -----------------------------------------------------------------------------
# schedule


def test_schedule_paper_setting():
    cfg = drlora.DRLoRAConfig(r_init=8, r_target=16, r_max=32, dT=200)
    t_warm, events, Q, cap = drlora.schedule(cfg, 3750, 64)
    assert t_warm == 112  # floor(0.03 * 3750) = floor(112.5)
    # 112 + 200 k <= 3750 - 200 = 3550  ->  k <= 17.19  ->  k = 0 .. 17: 18 events, the last 112 + 3400 = 3512
    assert events == [112 + 200 * k for k in range(18)] and events[-1] == 3512 and len(events) == 18
    assert Q == 29  # ceil(64 * (16 - 8) / 18) = ceil(512 / 18) = ceil(28.44)
    assert cap == 2  # max(1, floor((32 - 8) * 0.1)) = floor(2.4)
    # the last event may sit exactly on T - dT: T 206, dT 50: t_warm = floor(6.18) = 6; 6, 56, 106, 156 <= 206 - 50 = 156;
    # Q = ceil(4 * (2 - 1) / 4) = 1; cap = max(1, floor(3 * 0.1)) = 1
    assert drlora.schedule(drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=4, dT=50), 206, 4) == (6, [6, 56, 106, 156], 1, 1)
    # uniform LoRA and r_init == r_target: no events
    assert drlora.schedule(drlora.DRLoRAConfig(method="lora", r_target=16), 3750, 64)[1:] == ([], 0, 0)


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"need 1 <= r_init <= r_target <= r_max, got 5, 4, 32"):
        drlora.DRLoRAConfig(r_init=5, r_target=4)
    with pytest.raises(ValueError, match=r"need 1 <= r_init <= r_target <= r_max, got 8, 40, 32"):
        drlora.DRLoRAConfig(r_init=8, r_target=40, r_max=32)
    # T = 100, dT = 200: t_warm = 3, the first event would need 3 <= 100 - 200
    with pytest.raises(ValueError, match=r"no growth event fits: 100 steps, warm-up ends at 3, dT=200"):
        drlora.schedule(drlora.DRLoRAConfig(r_init=8, r_target=16, r_max=32, dT=200), 100, 64)
    # 1 event (T 300: t_warm 9, events 9 only), cap floor(24 * 0.1) = 2: at most 64 * 2 = 128 < 512 ranks
    with pytest.raises(ValueError, match=r"growth cannot reach r_target: 1 events x at most 128 ranks < 512"):
        drlora.schedule(drlora.DRLoRAConfig(r_init=8, r_target=16, r_max=32, dT=200), 300, 64)
    with pytest.raises(ValueError, match=r"--saliency must be one of fg, f, g, got 'fgh'"):
        drlora.DRLoRAConfig(saliency="fgh")


def test_actual_run_reaches_target_exactly():
    m = tiny()
    cfg = drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=5)
    d = drlora.DRLoRA(m, cfg, total_steps=40)
    # t_warm = floor(0.03 * 40) = floor(1.2) = 1; events 1, 6, ..., 31 (1 + 5k <= 35): 7 events;
    # Q = ceil(8 * (4 - 2) / 7) = ceil(2.29) = 3; cap = max(1, floor(6 * 0.1)) = max(1, 0) = 1
    assert (d.t_warm, d.events, d.quota, d.cap) == (1, [1, 6, 11, 16, 21, 26, 31], 3, 1)
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0)
    events = train(m, d, opt, range(40))
    assert [e["step"] for e in events] == d.events
    # per layer: +3, +3, +3, +3, +3 (15), then min(3, 16 - 15) = +1, then 0
    assert [[sum(g) for g in e["grown"]] for e in events] == [[3, 3]] * 5 + [[1, 1], [0, 0]]
    assert all(max(g) <= 1 for e in events for g in e["grown"])  # cap 1
    assert d.ranks.sum(-1).tolist() == [8 * 4, 8 * 4]  # every layer: N * r_target = 32
    assert d.ranks.max() <= 8 and d.ranks.min() >= 2


# -----------------------------------------------------------------------------
# growth changes nothing at the moment of growth; inactive slots are really inactive


def test_init_A_kaiming_B_zero():
    m = tiny()
    drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=5), total_steps=40)
    lora = m.moe_layers()[0].experts.lora
    for p, d_in in (("up_proj", 32), ("down_proj", 16)):
        A, B = lora.A[p], lora.B[p]
        assert B.abs().sum() == 0
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)): gain sqrt(2 / 6), bound = sqrt(3) gain / sqrt(d_in)
        assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
        assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # U(-b, b) has std b / sqrt(3)


def test_growth_keeps_output_and_inactive_slots_untouched():
    torch.manual_seed(0)
    m = tiny()
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=5), total_steps=40)
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0)
    loras = [blk.experts.lora for blk in m.moe_layers()]
    init = [{n: P.detach().clone() for n, P in lora.named_parameters()} for lora in loras]
    x_eval, _, mask_eval = batch(999)
    with torch.no_grad():
        base = tiny()(x_eval, attention_mask=mask_eval).logits  # no adapter
    checked = {"grads": 0, "events": 0, "grew": 0}
    seen = {}

    def logits():
        m.eval()
        with torch.no_grad():
            out = m(x_eval, attention_mask=mask_eval).logits
        m.train()
        return out

    def on_backward(t):  # after backward, with the ranks the forward used
        for lora in loras:
            for n, P in lora.named_parameters():
                for e, r in enumerate(lora.r):
                    inactive = P.grad[e, r:] if n.startswith("A.") else P.grad[e, :, r:]
                    assert inactive.numel() > 0 and (inactive == 0).all(), (t, n, e)
                    checked["grads"] += 1
        if t in d.events:  # the event runs inside step(t): logits just before it
            seen["before"], seen["ranks"] = logits(), d.ranks.clone()

    def on_event(t):  # right after the event, before opt.step(): new slots (A random, B = 0) change nothing
        checked["grew"] += int((d.ranks > seen["ranks"]).any())
        assert sum(lora.B["up_proj"].abs().sum() for lora in loras) > 0  # trained, so the check means something
        for l, (lora, P0) in enumerate(zip(loras, init)):
            for e, (old, new) in enumerate(zip(seen["ranks"][l].tolist(), lora.r)):
                assert torch.equal(lora.A["up_proj"][e, old:new], P0["A.up_proj"][e, old:new])  # the init's random rows
                assert (lora.B["up_proj"][e, :, old:new] == 0).all()
        after = logits()
        # Not bit-identical: the slice A[:r] grows by a row, so the matmul sums r + 1 terms (the new one exactly
        # 0) and may group the old ones differently; that moves logits by ~1e-8. A real bug (new B columns not
        # zero, the scale tied to the active rank) moves them by about the adapter's own effect, >= 1e-3 here.
        torch.testing.assert_close(after, seen["before"], rtol=0, atol=1e-6)
        assert (seen["before"] - base).abs().max() > 1e-3
        checked["events"] += 1

    def on_step(t):  # after opt.step(): slots inactive now were inactive always: bit-identical to their init
        for lora, P0 in zip(loras, init):
            for n, P in lora.named_parameters():
                for e, r in enumerate(lora.r):
                    now, then = (P[e, r:], P0[n][e, r:]) if n.startswith("A.") else (P[e, :, r:], P0[n][e, :, r:])
                    assert torch.equal(now, then), (t, n, e)

    train(m, d, opt, range(40), on_backward=on_backward, on_event=on_event, on_step=on_step)
    assert checked["events"] == 7 and checked["grads"] > 0
    assert checked["grew"] == 6  # the 7th event finds every layer at its target (see the actual-run test)


def test_dropout_on_lora_path_only():
    torch.manual_seed(0)
    m = tiny()
    drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=5, dropout=0.5), total_steps=40)
    x, _, mask = batch(5)
    with torch.no_grad():
        base = tiny()(x, attention_mask=mask).logits
        assert torch.equal(m(x, attention_mask=mask).logits, base)  # training mode, B = 0: W x is never dropped
        for blk in m.moe_layers():
            blk.experts.lora.B["up_proj"].normal_()
        one, two = m(x, attention_mask=mask).logits, m(x, attention_mask=mask).logits
        assert not torch.equal(one, two)  # training: a new dropout mask on the LoRA path each time
        m.eval()
        three, four = m(x, attention_mask=mask).logits, m(x, attention_mask=mask).logits
        assert torch.equal(three, four) and not torch.equal(three, base)


# -----------------------------------------------------------------------------
# uniform LoRA equals a naive per-expert LoRA written out


def test_lora_method_matches_naive_per_expert_lora():
    torch.manual_seed(0)
    m = tiny(n_layer=1, n_experts=4, hidden_size=8, intermediate_size=6)
    cfg = drlora.DRLoRAConfig(method="lora", r_target=3, r_max=5, dropout=0.0)
    d = drlora.DRLoRA(m, cfg, total_steps=50)
    assert d.events == [] and d.ranks.tolist() == [[3, 3, 3, 3]]
    blk = m.moe_layers()[0]
    lora = blk.experts.lora
    with torch.no_grad():
        for P in lora.parameters():
            P.copy_(torch.randn_like(P) * 0.3)  # B != 0, so A gets a gradient too
    x = torch.randn(1, 5, 8)
    c = torch.randn(1, 5, 8)
    x1 = x.clone().requires_grad_()
    out, _ = blk(x1)
    (out * c).sum().backward()

    # naive: per token, per chosen expert, y = W x + s * B[:, :3] @ (A[:3] @ x) on up_proj and down_proj
    s, r = 2.0, 3
    leaf = {n: P.detach().clone().requires_grad_() for n, P in lora.named_parameters()}
    Wr = blk.gate.weight.detach().clone().requires_grad_()
    Wg, Wu, Wd = blk.experts.gate_proj, blk.experts.up_proj, blk.experts.down_proj
    x2 = x.clone().requires_grad_()
    rows = []
    for n in range(5):
        xn = x2[0, n]
        probs = torch.softmax(Wr @ xn, -1)
        w, ids = probs.topk(2)  # OLMoE: no renormalisation
        acc = torch.zeros(8)
        for k in range(2):
            e = int(ids[k])
            u = Wu[e] @ xn + s * leaf["B.up_proj"][e][:, :r] @ (leaf["A.up_proj"][e][:r] @ xn)
            h = F.silu(Wg[e] @ xn) * u
            y = Wd[e] @ h + s * leaf["B.down_proj"][e][:, :r] @ (leaf["A.down_proj"][e][:r] @ h)
            acc = acc + w[k] * y
        rows.append(acc)
    naive = torch.stack(rows)[None]
    (naive * c).sum().backward()

    torch.testing.assert_close(out, naive, rtol=0, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(blk.gate.weight.grad, Wr.grad, rtol=0, atol=1e-6)
    for n, P in lora.named_parameters():
        torch.testing.assert_close(P.grad, leaf[n].grad, rtol=0, atol=1e-6)
        assert P.grad.abs().sum() > 0, n


# -----------------------------------------------------------------------------
# the router


def test_router_frozen_in_warmup_then_trained():
    m = tiny()
    # T 100: t_warm = floor(3.0) = 3; dT 20: events 3, 23, 43, 63; Q = ceil(16 / 4) = 4, cap 1
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=20), total_steps=100)
    gates = [blk.gate.weight for blk in m.moe_layers()]
    assert d.t_warm == 3
    assert all(any(w is p for p in d.trainable_parameters()) for w in gates)  # in the optimizer from the start
    # weight decay > 0: a zero gradient would still move the router; only "no gradient" keeps it still
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    history = [torch.stack([w.detach().clone() for w in gates])]
    train(m, d, opt, range(6), on_step=lambda t: history.append(torch.stack([w.detach().clone() for w in gates])))
    # history[t + 1] is after step t: steps 0, 1, 2 are warm-up, step 3 (= t_warm) is the first to train it
    assert torch.equal(history[0], history[1]) and torch.equal(history[0], history[3])
    for t in (3, 4, 5):
        assert all(not torch.equal(history[t][l], history[t + 1][l]) for l in range(2)), t

    m = tiny()
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=20, freeze_router=True), total_steps=100)
    gates = [blk.gate.weight for blk in m.moe_layers()]
    before = torch.stack([w.detach().clone() for w in gates])
    assert d.router_parameters() == [] and not any(w.requires_grad for w in gates)
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    train(m, d, opt, range(6))
    assert torch.equal(before, torch.stack([w.detach() for w in gates]))


# -----------------------------------------------------------------------------
# merge and the adapter file


def test_merge_and_adapter_round_trip(tmp_path):
    torch.manual_seed(0)
    m = tiny()
    cfg = drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=5)
    d = drlora.DRLoRA(m, cfg, total_steps=40)
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0)
    train(m, d, opt, range(12))  # events at 1, 6, 11: ranks now uneven, B != 0
    ranks = d.ranks.clone()
    assert len(set(ranks.flatten().tolist())) > 1
    m.eval()
    x, _, mask = batch(999)
    with torch.no_grad():
        unmerged = m(x, attention_mask=mask).logits

    path = str(tmp_path / "adapter.safetensors")
    hf.save_adapter(m, path, cfg)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        for l in range(2):
            total = int(ranks[l].sum())  # only active slots: sum of the layer's ranks
            assert torch.equal(f.get_tensor(f"layers.{l}.ranks"), ranks[l])
            assert tuple(f.get_tensor(f"layers.{l}.up_proj.A").shape) == (total, 32)  # (sum r, H)
            assert tuple(f.get_tensor(f"layers.{l}.up_proj.B").shape) == (16, total)  # (I, sum r)
            assert tuple(f.get_tensor(f"layers.{l}.down_proj.A").shape) == (total, 16)
            assert tuple(f.get_tensor(f"layers.{l}.down_proj.B").shape) == (32, total)
            # the router trained after warm-up (t_warm 1) is part of the fine-tune: without it the base's comes back
            assert torch.equal(f.get_tensor(f"layers.{l}.router.weight"), m.moe_layers()[l].gate.weight)
            assert not torch.equal(f.get_tensor(f"layers.{l}.router.weight"), tiny().moe_layers()[l].gate.weight)
    assert keys == {f"layers.{l}.{k}" for l in range(2) for k in
                    ("ranks", "router.weight", "up_proj.A", "up_proj.B", "down_proj.A", "down_proj.B")}

    fresh = tiny()  # the same base model, no adapter
    fresh.eval()
    loaded_cfg = hf.load_adapter(fresh, path)
    assert loaded_cfg == cfg
    assert torch.equal(torch.stack([blk.experts.lora.ranks for blk in fresh.moe_layers()]), ranks)
    with torch.no_grad():
        assert torch.equal(fresh(x, attention_mask=mask).logits, unmerged)

    drlora.merge(m)
    assert all(blk.experts.lora is None for blk in m.moe_layers())
    with torch.no_grad():
        merged = m(x, attention_mask=mask).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    assert not torch.equal(merged, tiny()(x, attention_mask=mask).logits)  # the merge did change the base


# -----------------------------------------------------------------------------
# state


def _run(steps, state=None, seed=0):
    """A fresh model + DR-LoRA + AdamW (LoRA init from `seed`), optionally restored, trained on `steps`."""
    torch.manual_seed(seed)
    m = tiny(n_layer=2, n_experts=4)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=3, r_max=4, dT=3, dropout=0.0), total_steps=20)
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0)
    if state is not None:
        state = torch.load(io.BytesIO(state), weights_only=False)
        m.load_state_dict(state["model"])
        d.load_state_dict(state["drlora"])
        opt.load_state_dict(state["opt"])
    train(m, d, opt, steps)
    return m, d, opt


def test_state_dict_resume_equals_straight_run():
    # T 20, dT 3: t_warm 0; events 0, 3, ..., 15 (6); Q = ceil(4 * 2 / 6) = 2; cap 1
    _, straight, _ = _run(range(20))
    m, d, opt = _run(range(11))  # stop mid-interval (last event at 9): g holds step 10's statistics
    assert all(v.abs().sum() > 0 for v in d.g.values())
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "drlora": d.state_dict(), "opt": opt.state_dict()}, buf)
    _, resumed, _ = _run(range(11, 20), state=buf.getvalue(), seed=1)  # other LoRA init: the state must overwrite it
    assert torch.equal(resumed.ranks, straight.ranks)
    assert resumed.ranks.sum(-1).tolist() == [12, 12]  # 4 * 3
    assert torch.equal(resumed.f, straight.f)
    for p in straight.g:
        assert torch.equal(resumed.g[p], straight.g[p])
    assert resumed.history == straight.history

    other = drlora.DRLoRA(tiny(n_layer=2, n_experts=4), drlora.DRLoRAConfig(r_init=1, r_target=3, r_max=5, dT=3, dropout=0.0), 20)
    with pytest.raises(ValueError, match=r"DR-LoRA settings differ.*'r_max': \(4, 5\)"):
        other.load_state_dict(d.state_dict())
    longer = drlora.DRLoRA(tiny(n_layer=2, n_experts=4), drlora.DRLoRAConfig(r_init=1, r_target=3, r_max=4, dT=3, dropout=0.0), 21)
    with pytest.raises(ValueError, match=r"total_steps differ: checkpoint 20, now 21"):
        longer.load_state_dict(d.state_dict())


# -----------------------------------------------------------------------------
# two processes on gloo


DDP_STEPS = 16


def _ddp_worker(rank, world, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # a different LoRA init per process: DDP must broadcast rank 0's
        m = tiny(n_layer=2, n_experts=8)
        # T 16, dT 3: t_warm 0; events 0, 3, 6, 9, 12 (5); Q = ceil(8 * 2 / 5) = 4; cap max(1, floor(6 * 0.1)) = 1
        d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=2, r_target=4, r_max=8, dT=3), total_steps=DDP_STEPS)
        # no find_unused_parameters: each projection's A and B are one tensor per layer, so an expert that
        # gets no token still gets a (zero) gradient through unbind(); the router always gets one
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0)
        local, empty, observe = [], [0], d.observe

        def observed(routers, mask):  # this process's own routing, before the all-reduce
            observe(routers, mask)
            local.append(d._weight_sum.clone())
            empty[0] += sum(int((torch.bincount(r.ids.flatten(), minlength=8) == 0).any()) for r in routers)

        d.observe = observed
        for t in range(DDP_STEPS):
            # different data on each process, 5 real tokens each
            drlora.train_step(ddp, d, opt, [batch(1000 * (rank + 1) + t, B=2, T=4)], t)
        # DDP broadcasts buffers (the ranks) from process 0 at every forward, which would hide a divergence
        # there; the python mirror lora.r, which the forward slices with, is never broadcast: compare it too
        torch.save({"ranks": d.ranks, "mirror": [blk.experts.lora.r for blk in m.moe_layers()], "f": d.f, "g": d.g, "history": d.history, "local": torch.stack(local),
                    "empty": empty[0], "x": batch(1000 * (rank + 1), B=2, T=4)[0],
                    "params": {n: p.detach() for n, p in m.named_parameters()
                               if "lora" in n or n.endswith("gate.weight")}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown, where a DDP process on gloo sometimes aborts ("terminate called
    # without an active exception") after its work is done and saved: torch's, not this code's (a bare nn.Linear
    # under DDP does it too, with mp.spawn and with torchrun; the per-expert loop as often as grouped_mm).
    os._exit(0)


def test_ddp_two_processes_agree(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert not torch.equal(a["x"], b["x"])  # different data ...
    assert not torch.equal(a["local"], b["local"])  # ... so different local routing statistics
    assert a["empty"] + b["empty"] > 0  # some expert got no token on some step: DDP coped without find_unused
    assert len(a["history"]) == 5 and a["history"] == b["history"]
    assert torch.equal(a["ranks"], b["ranks"]) and a["ranks"].sum(-1).tolist() == [32, 32]
    assert a["mirror"] == b["mirror"] == a["ranks"].tolist()
    assert len(set(a["ranks"].flatten().tolist())) > 1  # the decision actually discriminated
    assert torch.equal(a["f"], b["f"])
    assert all(torch.equal(a["g"][p], b["g"][p]) for p in a["g"])
    assert a["params"].keys() == b["params"].keys() and len(a["params"]) == 2 * (4 + 1)
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n


# -----------------------------------------------------------------------------
# edges: ties, the last event, the step's order


def test_equal_experts_tie_to_the_lower_index_whatever_their_number():
    # 2 layers of 20 experts (past 16, where an unstable sort still happens to keep the order), layer 1 fully tied
    m = tiny(n_layer=2, n_experts=20)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=4, dT=25, p_grow=0.34), total_steps=100)
    # t_warm 3, events [3, 28, 53]: Q = ceil(20 / 3) = 7, cap = max(1, floor(3 * 0.34)) = 1
    assert (d.events, d.quota, d.cap) == ([3, 28, 53], 7, 1)
    d.f[:] = 0.05
    d.f[0, 19] = 0.5  # layer 0 is not tied: expert 19 first
    for p in d.cfg.targets:
        d.g[p][:] = 1.0
    S = d.saliency()
    assert len(set(S[1].tolist())) == 1  # bit-equal scores for equal inputs
    event = d.grow(3)
    assert event["grown"][1] == [1] * 7 + [0] * 13  # experts 0..6, lower index first
    assert event["grown"][0] == [1] * 6 + [0] * 13 + [1]  # 19, then 0..5


def test_the_last_event_passes_the_cap_so_every_layer_ends_at_its_target():
    # N=3, ranks 1 -> 5, r_max 6, T=200, dT=30: t_warm 6, events 6, 36, ..., 156 (6), Q = ceil(12 / 6) = 2,
    # cap = max(1, floor(5 * 0.1)) = 1. Experts 0 and 1 always most salient: they fill to 6 and expert 2
    # gets only what is left of each quota; without the last event's exception the layer ends at 6 + 6 + 2 = 14.
    m = tiny(n_layer=1, n_experts=3)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=5, r_max=6, dT=30), total_steps=200)
    assert (d.events, d.quota, d.cap) == ([6, 36, 66, 96, 126, 156], 2, 1)
    d.f[0] = torch.tensor([0.6, 0.5, 0.0001])
    for t in d.events:
        for p in d.cfg.targets:
            d.g[p][:] = 1.0
        d.grow(t)
    # events 1-5: Q = 2, cap 1: experts 0 and 1 get +1 each until both are at 6, expert 2 stays at 1: [6, 6, 1] = 13;
    # the last event lacks 15 - 13 = 2: at the cap expert 2 takes 1 (0 and 1 are full), then past it the last 1
    assert d.ranks.tolist() == [[6, 6, 3]] and sum(d.ranks[0].tolist()) == 3 * 5
    assert [e["grown"][0] for e in d.history] == [[1, 1, 0]] * 5 + [[0, 0, 2]]


def test_the_last_event_keeps_the_cap_for_every_expert_with_room_under_it():
    # N=4, r 1 -> 4, r_max 8, T=100, dT=30: t_warm 3, events 3, 33, 63; cap = max(1, floor(7 * 0.1)) = 1
    m = tiny(n_layer=1, n_experts=4)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=4, r_max=8, dT=30), total_steps=100)
    assert (d.events, d.cap) == ([3, 33, 63], 1)
    # before the last event: expert 0 full at r_max, the others at r_init: 8 + 1 + 1 + 1 = 11 of 16, 5 lacking
    m.moe_layers()[0].experts.lora.set_ranks(torch.tensor([8, 1, 1, 1]))
    d.f[0] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    set_g(d, 0, 0, 1.0), set_g(d, 0, 1, 1.0), set_g(d, 0, 2, 1.0), set_g(d, 0, 3, 1.0)  # S order: e0, e1, e2, e3
    # at the cap: e0 full (+0), e1 +1, e2 +1, e3 +1 -> [8, 2, 2, 2], 2 still lacking, which only then go
    # past the cap, by saliency: e1 min(8, 8 - 2, 2) = +2 -> [8, 4, 2, 2]. Every expert with room under the
    # cap got it first: a cap lifted at once would have given e1 all 5 ([8, 6, 1, 1]).
    assert d.grow(63)["grown"] == [[0, 3, 1, 1]]
    assert d.ranks.tolist() == [[8, 4, 2, 2]]


def test_the_paper_schedule_at_64_and_60_experts_never_passes_the_cap():
    # The paper's settings: r 8 -> 16, r_max 32, dT 200, p_grow 0.1, T 3,750: t_warm = floor(112.5) = 112,
    # events 112 + 200 k for k = 0 .. 17 (18), cap = max(1, floor(24 * 0.1)) = 2.
    # 64 experts (OLMoE): need 64 * 8 = 512, Q = ceil(512 / 18) = 29: 17 events give 29 (493), the last 512 - 493 = 19.
    # 60 experts (Qwen1.5-MoE): need 480, Q = ceil(480 / 18) = ceil(26.67) = 27: 17 x 27 = 459, the last 21.
    # Q < N * cap (29 < 128, 27 < 120): saliency decides who grows. Fixed statistics, g equal for every expert,
    # f strictly falling with the index in layer 0 and rising in layer 1: S = f_hat / (r + 1)^1.2, so the
    # most frequent experts grow first until the rank penalty lets the next ones pass them.
    for E, K, Q, last in ((64, 8, 29, 19), (60, 4, 27, 21)):
        m = tiny(n_layer=2, n_experts=E, top_k=K, hidden_size=8, intermediate_size=8)
        d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=8, r_target=16, r_max=32, dT=200), total_steps=3750)
        assert (d.t_warm, d.events, d.quota, d.cap) == (112, [112 + 200 * k for k in range(18)], Q, 2)
        d.f[0] = torch.linspace(1.0, 0.5, E)  # strictly falling: expert 0 first
        d.f[1] = torch.linspace(0.5, 1.0, E)  # strictly rising: expert E - 1 first
        for t in d.events:
            for p in d.cfg.targets:
                d.g[p][:] = 1.0
            d.grow(t)
        given = [[sum(g) for g in e["grown"]] for e in d.history]
        assert given == [[Q, Q]] * 17 + [[last, last]]
        assert max(max(g) for e in d.history for g in e["grown"]) == 2  # the cap, in every event, the last too
        assert d.ranks.sum(-1).tolist() == [E * 16, E * 16] and d.ranks.max() <= 32


class Recorder:
    """Wraps what a step calls and logs the order, with the statistics each call saw."""

    def __init__(self, d, opt):
        self.log, self.d, self.opt = [], d, opt
        for obj, name in ((d, "observe"), (d, "step"), (opt, "step"), (opt, "zero_grad")):
            self.wrap(obj, name)

    def wrap(self, obj, name):
        fn = getattr(obj, name)

        def call(*a, **kw):
            if obj is self.d and name == "step":  # what drl.step sees: gradients present, tokens of every micro-batch
                grads = [p.grad for p in self.d.lora_parameters()]
                self.log.append(("drl.step", all(g is not None for g in grads), float(self.d._tokens.sum())))
            else:
                self.log.append(((("drl." if obj is self.d else "opt.") + name),))
            return fn(*a, **kw)

        setattr(obj, name, call)


def test_one_step_observes_every_micro_batch_then_steps_drlora_before_the_update():
    torch.manual_seed(0)
    m = tiny()
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=3, dT=10), total_steps=100)  # t_warm 3
    with torch.no_grad():
        for lora in (blk.experts.lora for blk in m.moe_layers()):
            for B in lora.B.values():
                B.copy_(torch.randn_like(B))  # B != 0, so both factors of g are nonzero
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2)
    routers = [blk.gate.weight.detach().clone() for blk in m.moe_layers()]
    rec = Recorder(d, opt)
    drlora.train_step(m, d, opt, [batch(1), batch(2)], t=0)
    assert [e[0] for e in rec.log] == ["drl.observe", "drl.observe", "drl.step", "opt.step", "opt.zero_grad"]
    # drl.step saw the gradients and both micro-batches: (8 + 5) real tokens each, 2 layers -> 2 * 2 * 13 = 52
    assert rec.log[2][1:] == (True, 52.0)
    assert all(v.sum() > 0 for v in d.g.values())  # g from this step's gradients, not from zeroed ones
    # step 0 is in the warm-up: the router's gradient was dropped before the update
    assert all(torch.equal(blk.gate.weight, w) for blk, w in zip(m.moe_layers(), routers))
    assert all(p.grad is None for p in d.trainable_parameters())  # zeroed at the end


def test_router_trains_in_fp32_over_a_bf16_base():
    # lr 2e-5 on weights of about 0.02: each update is under half a bf16 ulp (2^-14 ~ 6e-5 at 0.02), so a bf16
    # router would hardly move. Kept in fp32, it takes AdamW's fp32 update: the first step from fresh moments
    # moves each entry by exactly -lr * g / (|g| + eps).
    torch.manual_seed(0)
    m = tiny().to(torch.bfloat16)
    d = drlora.DRLoRA(m, drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=4, dT=10, dropout=0.0), total_steps=100)
    with torch.no_grad():
        for lora in (blk.experts.lora for blk in m.moe_layers()):
            for B in lora.B.values():
                B.copy_(torch.randn(B.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    routers = [blk.gate.weight for blk in m.moe_layers()]
    start = [w.detach().clone() for w in routers]
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=2e-5, weight_decay=0.0, eps=1e-8)
    grads, step = [], d.step
    d.step = lambda t: (grads.extend(w.grad.clone() for w in routers), step(t))[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        drlora.train_step(m, d, opt, [batch(3), batch(4)], t=3)  # t_warm 3: the router's first trained step
    assert all(w.dtype == torch.float32 and g.dtype == torch.float32 for w, g in zip(routers, grads))
    for w, w0, g in zip(routers, start, grads):
        assert (w != w0).all()  # every entry moved
        torch.testing.assert_close(w - w0, -2e-5 * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-10)


def test_an_adapter_refuses_another_base(tmp_path):
    m = tiny(seed=0)
    cfg = drlora.DRLoRAConfig(r_init=1, r_target=2, r_max=4, dT=10)
    drlora.DRLoRA(m, cfg, total_steps=100)
    path = str(tmp_path / "a.safetensors")
    hf.save_adapter(m, path, cfg)
    with pytest.raises(ValueError, match="other weights"):  # same shapes, another pretrained model
        hf.load_adapter(tiny(seed=1), path)
    with pytest.raises(ValueError, match=r"'n_experts': \(8, 4\)"):  # other shapes: named, no raw traceback
        hf.load_adapter(tiny(n_experts=4), path)
    torch.save({"x": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt: cannot read it as a drlora adapter"):
        hf.load_adapter(tiny(), str(tmp_path / "ckpt.pt"))
    hf.load_adapter(tiny(seed=0), path)  # its own base
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    u = os.umask(0)
    os.umask(u)
    return u
