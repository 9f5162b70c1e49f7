"""
A self-contained Mixture-of-Experts transformer that computes what transformers computes for
published checkpoints (to 1e-4 in fp32: tests/test_moe.py; hf.py loads and saves them). Read top
to bottom: norm, rotary, attention, experts, router and MoE block, loss, block, config, model.

Families (config.json's model_type; their differences are the MoEConfig fields, set in hf.py):
- olmoe      QK-norm over the whole q/k projection, softmax router, top-k not renormalised.
- qwen2_moe  q/k/v bias, a shared expert scaled by sigmoid(shared_expert_gate(x)), dense layers.
- qwen3_moe  QK-norm per head, top-k renormalised, grouped-query attention.
- mixtral    grouped-query attention, top-k renormalised.
- llama_moe  LLaMA-2 with its MLPs split into experts: an MLP router (Linear -> tanh -> Linear),
             softmax over the top-k logits (or the raw logits), outputs scaled by a constant.

Choices:
- Experts are stacked, one (E, out, in) tensor per projection, so that DR-LoRA can address
  "expert e, projection p". Dispatch sorts the (token, slot) copies by expert; one grouped matmul
  (F.grouped_mm) runs every expert on its slice, or, as the readable reference with the same
  numbers, a loop over experts. Cost grows with tokens x top-k, not tokens x experts.
- Every forward returns the routers' logits, top-k ids and weights (Output.routers).
- Experts have one hook, `Experts.lora`: given a projection's input rows and how they split over
  experts, it returns what the adapter adds (drlora.py owns adapters).
- Given targets, forward returns the loss and no logits (HeadLoss never holds (N, vocab) logits).

Shapes: B batch, T time, H hidden, N = B*T tokens, E experts, K top-k,
I expert width, nh/nkv heads, hd head dim, S keys (past + T).
"""
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value are not in the loss (prompt tokens, padding)

# -----------------------------------------------------------------------------
# primitives


class RMSNorm(nn.Module):
    """Computed in fp32 and cast back before the weight multiply (as OLMoE/Qwen do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary(pos, head_dim: int, theta: float, dtype):
    """cos, sin of shape (B, T, hd) for integer positions (B, T); rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim))
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x, cos, sin):  # x (B, nh, T, hd), cos/sin (B, T, hd)
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Pre-allocated keys and values for generation. All rows share one write position;
    rows of different prompt lengths are left-padded and masked."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, dtype, device):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.pos = 0  # how many positions are filled; the model advances it after each forward

    def update(self, layer: int, k, v):  # k, v (B, nkv, T, hd) -> all keys so far (B, nkv, S, hd)
        T = k.shape[2]
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        return self.k[layer][:, :, : self.pos + T], self.v[layer][:, :, : self.pos + T]


# -----------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    def __init__(self, cfg: "MoEConfig", layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        nh, nkv, hd, H = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(H, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, H, bias=cfg.o_bias)
        if cfg.qk_norm == "full":  # OLMoE: one norm over the whole projection, before the head split
            self.q_norm, self.k_norm = RMSNorm(nh * hd, cfg.rms_eps), RMSNorm(nkv * hd, cfg.rms_eps)
        elif cfg.qk_norm == "head":  # Qwen3-MoE: per head, over hd
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_eps), RMSNorm(hd, cfg.rms_eps)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, cfg.n_head, cfg.head_dim)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, nh, T, hd)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        gqa = cfg.n_head != cfg.n_kv_head
        if mask is None:  # plain causal attention, no padding, no cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


# -----------------------------------------------------------------------------
# experts, router, MoE block


class MLP(nn.Module):
    """A dense SwiGLU MLP: Qwen's shared expert and its dense (mlp_only) layers."""

    def __init__(self, H: int, I: int):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Groups(NamedTuple):
    """How the rows of a sorted (N*K, .) tensor split over experts: rows of expert 0 first, then 1, ..."""
    ids: torch.Tensor  # (N*K,) the expert of each row, ascending
    counts: list[int] | None  # rows per expert, for the loop (None on the grouped path: no device sync)
    offs: torch.Tensor | None  # (E,) int32 cumulative counts, for grouped_mm (None on the loop path)


def expert_matmul(x, W, groups: Groups):
    """Each row of x times the weight of its expert: x (n, in), W (E, out, in) -> (n, out).
    grouped_mm does every expert in one call; the loop (one F.linear per expert) is the
    readable reference and gives the same numbers."""
    if groups.offs is not None:
        return F.grouped_mm(x, W.transpose(-2, -1).to(x.dtype), offs=groups.offs)
    Ws = W.unbind(0)  # one autograd node; W[e] per expert would write a full-size zero gradient each
    return torch.cat([F.linear(xe, Ws[e]) for e, xe in enumerate(x.split(groups.counts)) if len(xe)])


class Experts(nn.Module):
    """E SwiGLU experts, each projection stacked over experts: gate/up (E, I, H), down (E, H, I)."""

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, E: int, H: int, I: int):
        super().__init__()
        self.grouped = hasattr(F, "grouped_mm")  # all experts in one call; False: the per-expert loop
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        # The adapter hook: a module called as lora(name, x, groups) that returns what it adds to
        # projection `name` (drlora.ExpertLoRA). moe.py knows nothing else about adapters.
        self.lora = None

    def proj(self, name: str, x, groups: Groups):
        y = expert_matmul(x, getattr(self, name), groups)
        if self.lora is not None and name in self.lora.targets:
            y = y + self.lora(name, x, groups)
        return y

    def forward(self, x, ids):
        """x (N*K, H): token copies sorted by expert; ids (N*K,) their experts, ascending."""
        counts = torch.bincount(ids, minlength=self.up_proj.shape[0])
        if self.grouped and aligned(x, *self.up_proj.shape[1:]):
            try:
                return self.swiglu(x, Groups(ids, None, counts.cumsum(0).to(torch.int32)))
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError) as e:  # a dtype or device grouped_mm does not support
                self.grouped = False  # every layer meets the same error once; Python shows the warning once
                warnings.warn(f"moe: grouped_mm failed ({str(e).splitlines()[0]}); experts run as a loop from now on")
        return self.swiglu(x, Groups(ids, counts.tolist(), None))

    def swiglu(self, x, groups: Groups):
        h = F.silu(self.proj("gate_proj", x, groups)) * self.proj("up_proj", x, groups)  # (N*K, I)
        return self.proj("down_proj", h, groups)  # (N*K, H)


def align(width: int, x) -> int:
    """width rounded up to a multiple of 16 bytes of x's elements: grouped_mm's rows start 16-byte aligned."""
    m = 16 // x.element_size()
    return -(-width // m) * m


def aligned(x, *widths) -> bool:
    """Whether rows of these widths (in x's dtype) all start on a 16-byte boundary, as grouped_mm needs."""
    return all(w == align(w, x) for w in widths)


class RouterOut(NamedTuple):
    logits: torch.Tensor  # (N, E) router logits
    ids: torch.Tensor  # (N, K) the experts each token went to
    weights: torch.Tensor  # (N, K) the gate weights that mixed their outputs (before expert_scale, one constant)


def router(cfg: "MoEConfig") -> nn.Module:
    """The router, (N, H) -> (N, E) logits: one Linear, or LLaMA-MoE's two-layer gate network."""
    H, E = cfg.hidden_size, cfg.n_experts
    if cfg.router == "mlp":  # widths and no biases as LLaMA-MoE's TopKBalancedNoisyGate(gate_network="mlp")
        return nn.Sequential(nn.Linear(H, E, bias=False), nn.Tanh(), nn.Linear(E, E, bias=False))
    return nn.Linear(H, E, bias=False)


class MoE(nn.Module):
    def __init__(self, cfg: "MoEConfig"):
        super().__init__()
        self.cfg = cfg
        self.gate = router(cfg)  # a module: train and save it through .parameters() / .state_dict()
        if cfg.router_noise:  # LLaMA-MoE's noisy-top-k weights: carried to the export, never used (no noise here)
            self.register_buffer("gate_noise", torch.zeros(cfg.n_experts, cfg.hidden_size))
        self.experts = Experts(cfg.n_experts, cfg.hidden_size, cfg.intermediate_size)
        if cfg.shared_expert_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x):
        B, T, H = x.shape
        K = self.cfg.top_k
        x = x.reshape(B * T, H)  # (N, H)
        logits = self.gate(x.to(next(self.gate.parameters()).dtype))  # (N, E); the router may be fp32 in training
        if self.cfg.router_softmax:
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # softmax over all experts, then top-k
            weights, ids = probs.topk(K, dim=-1)  # (N, K)
            if self.cfg.norm_topk_prob:  # = a softmax over the top-k logits alone
                weights = weights / weights.sum(dim=-1, keepdim=True)
        else:  # the top-k logits themselves weight the experts
            weights, ids = logits.topk(K, dim=-1)
        weights = weights.to(x.dtype)
        # dispatch: sort the N*K (token, slot) copies by expert, run each expert on its slice
        flat_ids = ids.view(-1)  # (N*K,)
        order = flat_ids.argsort(stable=True)  # copies of expert 0 first, then expert 1, ...
        token = order // K  # the token each sorted copy came from
        # index_select rather than x[token]: the same gather, but its backward is a plain index_add
        y = self.experts(x.index_select(0, token), flat_ids[order])  # (N*K, H)
        w = weights.view(-1)[order, None]  # (N*K, 1)
        y = y * (w if self.cfg.expert_scale == 1.0 else w * self.cfg.expert_scale)
        out = torch.zeros_like(x).index_add_(0, token, y)  # combine: sum of the K weighted outputs
        if self.cfg.shared_expert_size:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(B, T, H), RouterOut(logits, ids, weights)


class HeadLoss(torch.autograd.Function):
    """F.cross_entropy(h @ W.T, targets) without the (N, vocab) logits, which with their softmax and
    gradient dominate a fine-tune step's memory at a large vocabulary: ROWS rows at a time, the
    forward takes the loss and, while the chunk's softmax is at hand, dL/dh and dL/dW; backward scales them."""

    @staticmethod
    def forward(ctx, h, W, targets, grad: bool):  # h (N, H), W (vocab, H), targets (N,)
        want_h, want_W = (grad and need for need in ctx.needs_input_grad[:2])
        n = (targets != IGNORE_INDEX).sum().clamp(min=1)  # mean over the targets that count, 0 if none
        rows = HeadLoss.ROWS
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if want_h else None  # every chunk writes its rows
        dW = torch.zeros_like(W, dtype=torch.float32) if want_W else None
        for s in range(0, h.shape[0], rows):
            hc, tc = h[s:s + rows], targets[s:s + rows]
            keep = tc != IGNORE_INDEX  # (no skipping of chunks without targets: that test would sync a GPU)
            logits = (hc @ W.t()).float()  # (rows, vocab)
            t = tc.clamp(min=0)[:, None]
            target_logit = logits.gather(1, t)[:, 0]
            top = logits.amax(dim=-1)
            p = logits.sub_(top[:, None]).exp_()  # in place: one (rows, vocab) buffer per chunk
            z = p.sum(dim=-1)
            loss += ((top + z.log() - target_logit) * keep).sum()  # logsumexp - target logit
            if want_h or want_W:  # dL/dlogits = (softmax - onehot(target)) / n on kept rows, 0 elsewhere
                w = keep / n
                g = p.mul_((w / z)[:, None]).scatter_add_(1, t, -w[:, None]).to(h.dtype)
                if want_h:
                    dh[s:s + rows] = g @ W
                if want_W:
                    dW += g.t().float() @ hc.float()
        ctx.save_for_backward(dh, dW)
        ctx.W_dtype = W.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dW = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype) if dh is not None else None
        dW = (dW * grad_loss).to(ctx.W_dtype) if dW is not None else None
        return dh, dW, None, None

    ROWS = 256  # rows per chunk: 49.1 MiB of fp32 logits at OLMoE's vocab (256 x 50304 x 4 bytes)


# -----------------------------------------------------------------------------
# block, config, model


class Block(nn.Module):
    def __init__(self, cfg: "MoEConfig", layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.is_moe = layer not in cfg.dense_layers
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.dense_intermediate_size)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, router = self.mlp(h)
        else:
            h, router = self.mlp(h), None
        return x + h, router


@dataclass
class MoEConfig:
    model_type: str = "olmoe"
    vocab_size: int = 258
    hidden_size: int = 128  # H
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # < n_head: grouped-query attention
    head_dim: int = 0  # 0: hidden_size // n_head
    n_experts: int = 8  # E routed experts per MoE layer
    top_k: int = 2  # K: the model's own top-k is used everywhere, never a default
    intermediate_size: int = 256  # I: width of one routed expert
    norm_topk_prob: bool = False  # renormalise the top-k weights to sum to 1 (Qwen3, Mixtral, LLaMA-MoE)
    router: str = "linear"  # "linear": Linear(H, E) | "mlp": Linear(H, E) -> tanh -> Linear(E, E) (LLaMA-MoE)
    router_softmax: bool = True  # False: the raw top-k logits weight the experts (LLaMA-MoE gate_use_softmax=false)
    expert_scale: float = 1.0  # multiplies every expert's weighted output (LLaMA-MoE score_scale_factor: 4.0 in 2/8)
    router_noise: bool = False  # hold LLaMA-MoE's noise weights for export; routing here is never noisy
    shared_expert_size: int = 0  # Qwen2-MoE's shared expert width; 0 = none
    dense_layers: tuple = ()  # layers with a dense MLP instead of MoE (Qwen's mlp_only_layers)
    dense_intermediate_size: int = 0
    qk_norm: str = "full"  # "full" (OLMoE) | "head" (Qwen3-MoE) | "none"
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    pad_id: int | None = None
    eos_id: int | None = None
    tokenizer: str = "hf"  # "hf": the checkpoint's tokenizer.json; "byte": ByteTokenizer
    hf: dict = field(default_factory=dict, repr=False)  # the source config.json, kept for export

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.n_head
        self.dense_layers = tuple(self.dense_layers)


class Output(NamedTuple):
    logits: torch.Tensor | None  # (B, T, vocab); None when targets are given (see HeadLoss)
    loss: torch.Tensor | None  # mean cross-entropy over targets != IGNORE_INDEX
    routers: list  # one RouterOut per MoE layer, in layer order


class MoETransformer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False

    def moe_layers(self) -> list[MoE]:
        """The MoE blocks, in the order of Output.routers."""
        return [b.mlp for b in self.layers if b.is_moe]

    def set_grouped(self, on: bool):
        """Every expert of this model in one grouped_mm per projection (on) or the per-expert loop (off):
        the same numbers, another speed. torch.compile traces grouped_mm for bf16 only."""
        for blk in self.moe_layers():
            blk.experts.grouped = on

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init for pretraining from scratch (normal(0, std), norms 1, biases 0)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, idx, targets=None, attention_mask=None, cache: KVCache | None = None) -> Output:
        """idx (B, T) token ids; attention_mask (B, S) 1 = real token, covering the cached past
        and idx (as in transformers); targets (B, T) with IGNORE_INDEX where not in the loss."""
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        S = past + T
        if attention_mask is None:
            pos = torch.arange(past, S, device=idx.device).expand(B, T)
            mask = None
            if cache is not None:
                mask = torch.ones(B, 1, T, S, dtype=torch.bool, device=idx.device).tril(diagonal=past)
        else:
            assert attention_mask.shape == (B, S), f"attention_mask {tuple(attention_mask.shape)} != {(B, S)}"
            valid = attention_mask.bool()
            pos = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # left padding shifts positions
            q_at = torch.arange(past, S, device=idx.device)[:, None]  # (T, 1) absolute query positions
            k_at = torch.arange(S, device=idx.device)[None, :]  # (1, S)
            # causal, no padded keys; every query sees itself, so padded rows never become NaN
            mask = ((k_at <= q_at) & valid[:, None, :]) | (k_at == q_at)  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)
        x = self.embed_tokens(idx)
        cos, sin = rotary(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        routers = []
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x, r = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x, r = block(x, cos, sin, mask, cache)
            if r is not None:
                routers.append(r)
        if cache is not None:
            cache.pos = S
        x = self.norm(x)
        if targets is None:
            return Output(self.lm_head(x), None, routers)
        # with targets, the loss is computed chunk by chunk and the logits are never materialised
        loss = HeadLoss.apply(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), torch.is_grad_enabled())
        return Output(None, loss, routers)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
                 pad_id: int = 0) -> list[list[int]]:
        """Batched greedy decoding (every metric here scores greedy outputs) with a KV cache. Prompts of
        different lengths are left-padded. Returns the new tokens of each prompt, cut before eos."""
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p): P] = 1
        mask[:, P:] = 1
        cfg = self.cfg
        dtype = self.lm_head.weight.dtype
        cache = KVCache(cfg.n_layer, B, cfg.n_kv_head, P + max_new_tokens, cfg.head_dim, dtype, device)
        out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n = 0
        logits = self(idx, attention_mask=mask[:, :P], cache=cache).logits[:, -1]
        for n in range(1, max_new_tokens + 1):
            nxt = logits.argmax(-1)
            out[:, n - 1] = nxt
            if eos_id is not None:
                done |= nxt == eos_id
            if done.all() or n == max_new_tokens:
                break
            logits = self(nxt[:, None], attention_mask=mask[:, : P + n], cache=cache).logits[:, -1]
        result = []
        for row in out[:, :n].tolist():
            result.append(row[: row.index(eos_id)] if eos_id in row else row)
        return result
