"""
DR-LoRA: Dynamic Rank LoRA for Mixture-of-Experts fine-tuning (arXiv 2601.04823),
exactly as SPEC.md specifies. Everything about growing ranks lives here.

    expert i, projection p (up_proj, down_proj):

        x ──► W_p (frozen) ─────────────────────────────┐
        │                                               (+)──► y
        └─► dropout ─► A_p[i][:r_i] ─► B_p[i][:, :r_i] ─► × s
                       (r_i, d_in)     (d_out, r_i)

    A and B are allocated at r_max; only the first r_i slots (the active prefix) take part
    (sliced in the per-expert loop, masked in the grouped matmul), so inactive slots add
    exactly zero and get exactly zero gradient.

Every dT optimizer steps after warm-up, per layer, the experts with the highest
saliency  S = f_hat * g_hat / (r + 1)^gamma  get more active rank, until every layer
holds N * r_target ranks (what uniform LoRA of rank r_target holds):
- f: routing frequency, an EMA of the gate weight each expert received per token;
- g: rank importance, an EMA of |dL/dA * A|_1 * |dL/dB * B|_1 per slot, averaged over
  the expert's active slots and its projections; reset after each growth event.
"""
import contextlib
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import moe


def check(ok, flag: str, value, what: str):
    """One setting's range or choices: the error names the flag and the value."""
    if not ok:
        raise ValueError(f"--{flag} must be {what}, got {value!r}")


@dataclass
class DRLoRAConfig:
    method: str = "drlora"  # "drlora" | "lora" (uniform LoRA at r_target, no growth: the baseline)
    r_init: int = 8  # every expert's active rank at the start
    r_target: int = 16  # per-layer budget: N * r_target active expert-ranks at the end
    r_max: int = 32  # slots allocated per expert
    dT: int = 200  # optimizer steps between growth events
    p_grow: float = 0.1  # per-event cap per expert: max(1, floor((r_max - r_init) * p_grow))
    beta: float = 0.9  # EMA factor of f and g
    gamma: float = 1.2  # rank penalty exponent
    scale: float = 2.0  # s: constant, never alpha / active rank, so growth never rescales trained slots
    dropout: float = 0.1  # on the LoRA path only
    targets: tuple = ("up_proj", "down_proj")  # adapted expert projections ("gate_proj" optional)
    saliency: str = "fg"  # "fg" | "f" | "g": the paper's component ablation
    freq: str = "weight"  # "weight": gate weights (the paper) | "count": hard top-k counts (official code)
    freeze_router: bool = False  # True: the router never trains (ablation); else frozen only in warm-up
    allocation: str = "layer"  # "layer": per-layer quota | "global": one pool for all layers (ablation)
    warmup_frac: float = 0.03  # growth starts when the learning-rate warm-up ends

    def __post_init__(self):  # each setting's range or choices, checked before anything is loaded
        self.targets = tuple(self.targets)
        if self.method == "lora":
            self.r_init = self.r_target
        for name, allowed in (("method", ("drlora", "lora")), ("saliency", ("fg", "f", "g")),
                              ("freq", ("weight", "count")), ("allocation", ("layer", "global"))):
            check(getattr(self, name) in allowed, name, getattr(self, name), f"one of {', '.join(allowed)}")
        if not 1 <= self.r_init <= self.r_target <= self.r_max:
            raise ValueError(f"need 1 <= r_init <= r_target <= r_max, got {self.r_init}, {self.r_target}, {self.r_max}")
        check(self.targets and set(self.targets) <= {"gate_proj", "up_proj", "down_proj"}, "targets", self.targets,
              "among gate_proj, up_proj, down_proj")
        check(self.dT >= 1, "dT", self.dT, "at least 1")
        check(0 < self.p_grow <= 1, "p_grow", self.p_grow, "in (0, 1]")
        for name in ("beta", "dropout", "warmup_frac"):
            check(0 <= getattr(self, name) < 1, name, getattr(self, name), "in [0, 1)")
        check(0 <= self.gamma < math.inf, "gamma", self.gamma, ">= 0 and finite")
        check(0 < self.scale < math.inf, "scale", self.scale, "positive and finite")


def _plain(cfg: DRLoRAConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples become lists, as after a save and load


# -----------------------------------------------------------------------------
# the schedule: a small pure function of the step count


def schedule(cfg: DRLoRAConfig, total_steps: int, n_experts: int):
    """(t_warm, event steps, per-event quota Q, per-expert cap) for steps t = 0 .. T-1."""
    t_warm = math.floor(cfg.warmup_frac * total_steps)
    if cfg.method == "lora" or cfg.r_init == cfg.r_target:
        return t_warm, [], 0, 0
    events = list(range(t_warm, total_steps - cfg.dT + 1, cfg.dT))  # t_warm + k dT while t <= T - dT
    need = n_experts * (cfg.r_target - cfg.r_init)  # ranks each layer must gain
    cap = max(1, math.floor((cfg.r_max - cfg.r_init) * cfg.p_grow))
    if not events:
        raise ValueError(f"no growth event fits: {total_steps} steps, warm-up ends at {t_warm}, dT={cfg.dT} "
                         f"(need total_steps >= t_warm + dT); lower dT or train longer")
    Q = math.ceil(need / len(events))
    if len(events) * min(Q, n_experts * cap) < need:
        raise ValueError(f"growth cannot reach r_target: {len(events)} events x at most {min(Q, n_experts * cap)} "
                         f"ranks < {need} needed per layer; raise p_grow or use more events (smaller dT)")
    return t_warm, events, Q, cap


def allocate(S, ranks, quota: int, cap: int, r_max: int):
    """One growth event for one pool of experts: visit experts by saliency, highest first
    (ties: lower index first), give each min(cap, r_max - r, what is left). Returns new ranks."""
    ranks = ranks.clone()
    left = quota
    for i in torch.argsort(-S, stable=True).tolist():
        if left == 0:
            break
        n = min(cap, r_max - int(ranks[i]), left)
        ranks[i] += n
        left -= n
    return ranks


# -----------------------------------------------------------------------------
# the expert LoRA layer


class ExpertLoRA(nn.Module):
    """LoRA for the E experts of one MoE layer: A[p] (E, r_max, d_in), B[p] (E, d_out, r_max) for each
    adapted projection p. moe.Experts calls it with a projection's input rows, sorted by expert."""

    def __init__(self, experts, cfg: DRLoRAConfig):
        super().__init__()
        self.cfg, self.targets = cfg, cfg.targets
        E, device = experts.up_proj.shape[0], experts.up_proj.device
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for p in cfg.targets:
            d_out, d_in = getattr(experts, p).shape[1:]
            bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) of an (r, d_in) nn.Linear weight
            self.A[p] = nn.Parameter(torch.empty(E, cfg.r_max, d_in, device=device).uniform_(-bound, bound))
            self.B[p] = nn.Parameter(torch.zeros(E, d_out, cfg.r_max, device=device))
        self.register_buffer("ranks", torch.full((E,), cfg.r_init, dtype=torch.long, device=device))
        self.r = self.ranks.tolist()  # the same ranks as python ints: slicing by them needs no device sync
        self.drop = nn.Dropout(cfg.dropout)

    def set_ranks(self, ranks):
        self.ranks.copy_(ranks)
        self.r = self.ranks.tolist()

    def forward(self, p: str, x, groups):
        """s * B[e][:, :r_e] @ A[e][:r_e] @ dropout(x) for each row x of expert e: (n, d_in) -> (n, d_out)."""
        A, B, x = self.A[p], self.B[p], self.drop(x)
        R = min(moe.align(max(self.r), x), self.cfg.r_max)  # the largest rank, rounded up for grouped_mm
        if groups.offs is not None and moe.aligned(x, R, self.cfg.r_max):  # r_max: the row stride of B
            # grouped: every expert at rank R, the slots past each row's expert's own rank multiplied by zero,
            # so that they add exactly zero and get exactly zero gradient
            h = F.grouped_mm(x, A[:, :R].transpose(-2, -1).to(x.dtype), offs=groups.offs)  # (n, R)
            h = h * (torch.arange(R, device=x.device) < self.ranks[groups.ids, None])
            return self.cfg.scale * F.grouped_mm(h, B[:, :, :R].transpose(-2, -1).to(x.dtype), offs=groups.offs)
        # the loop: each expert computes only its active prefix of slots
        counts = groups.counts or torch.bincount(groups.ids, minlength=len(self.r)).tolist()
        As, Bs = A.unbind(0), B.unbind(0)  # one autograd node each, as in moe.expert_matmul
        ys = [F.linear(F.linear(xe, As[e][:r]), Bs[e][:, :r])
              for e, (xe, r) in enumerate(zip(x.split(counts), self.r)) if len(xe)]
        return self.cfg.scale * torch.cat(ys)

    @torch.no_grad()
    def merge_into(self, experts):
        """W_p[e] += s * B[e][:, :r] @ A[e][:r], in W's dtype."""
        for p in self.cfg.targets:
            W, A, B = getattr(experts, p), self.A[p], self.B[p]
            for e, r in enumerate(self.r):
                W[e] += (self.cfg.scale * B[e][:, :r].float() @ A[e][:r].float()).to(W.dtype)


# -----------------------------------------------------------------------------
# the controller: injection, statistics, growth, state


class DRLoRA:
    """Adds ExpertLoRA to every MoE layer of a moe.MoETransformer, freezes the rest, keeps
    f and g, and grows ranks. Per optimizer step t (train_step below):

        for each micro-batch: out = model(...); drl.observe(out.routers, attention_mask); backward
        event = drl.step(t)      # after backward, before optimizer.step()
        optimizer.step()
    """

    def __init__(self, model, cfg: DRLoRAConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.blocks = model.moe_layers()
        L, E = len(self.blocks), model.cfg.n_experts
        self.t_warm, self.events, self.quota, self.cap = schedule(cfg, total_steps, E)
        if cfg.freq == "weight" and not model.cfg.router_softmax:
            raise ValueError("freq='weight' needs gate weights that are probabilities; this model weights experts "
                             "by raw router logits (router_softmax False): use freq='count'")
        for p in model.parameters():
            p.requires_grad_(False)
        for blk in self.blocks:
            blk.experts.lora = ExpertLoRA(blk.experts, cfg)
        # The router is trained after warm-up: it needs a gradient (and a place in the optimizer)
        # from the start; step() drops its gradient while it is frozen. It is kept in fp32 even over
        # a bf16 base: an update of lr 2e-5 is under half a bf16 ulp of a weight of 0.02.
        for blk in self.blocks:
            if not cfg.freeze_router:
                blk.gate.float().requires_grad_(True)
        device = self.blocks[0].experts.up_proj.device
        self.f = torch.zeros(L, E, device=device)  # routing frequency EMA, never reset
        self.g = {p: torch.zeros(L, E, cfg.r_max, device=device) for p in cfg.targets}  # per-slot importance EMA
        self._weight_sum = torch.zeros(L, E, device=device)  # this step's routing, summed over micro-batches
        self._tokens = torch.zeros(L, device=device)
        self.history = []  # one dict per growth event

    # -- what to train -------------------------------------------------------
    def lora_parameters(self):
        return [p for blk in self.blocks for p in blk.experts.lora.parameters()]

    def router_parameters(self):
        return [p for blk in self.blocks for p in blk.gate.parameters() if p.requires_grad]

    def trainable_parameters(self):
        return self.lora_parameters() + self.router_parameters()

    @property
    def ranks(self):  # (L, E)
        return torch.stack([blk.experts.lora.ranks for blk in self.blocks])

    def active_lora_parameters(self) -> int:
        """LoRA parameters in active slots: sum over layers, experts, projections of r * (d_in + d_out)."""
        n = 0
        for blk in self.blocks:
            for p in self.cfg.targets:
                d_out, d_in = getattr(blk.experts, p).shape[1:]
                n += int(blk.experts.lora.ranks.sum()) * (d_in + d_out)
        return n

    # -- statistics ----------------------------------------------------------
    @torch.no_grad()
    def observe(self, routers, attention_mask=None):
        """Accumulate one micro-batch's routing: the gate weight each expert received, over
        non-padding tokens (or hard counts with freq='count')."""
        valid = None if attention_mask is None else attention_mask.reshape(-1).bool()
        for l, r in enumerate(routers):
            ids, w = r.ids, r.weights.float()
            if self.cfg.freq == "count":
                w = torch.ones_like(w)
            if valid is not None:
                ids, w = ids[valid], w[valid]
            self._weight_sum[l].index_add_(0, ids.reshape(-1), w.reshape(-1))
            self._tokens[l] += ids.shape[0]

    @torch.no_grad()
    def update_statistics(self):
        """f from this step's routing (all-reduced over processes first, so every process
        agrees), g from the accumulated gradients (already averaged by DDP)."""
        stats = torch.cat([self._weight_sum.flatten(), self._tokens])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        L, E = self.f.shape
        weight_sum, tokens = stats[: L * E].view(L, E), stats[L * E:]
        b = self.cfg.beta
        self.f.mul_(b).add_((1 - b) * weight_sum / tokens.clamp(min=1)[:, None])
        for l, blk in enumerate(self.blocks):
            lora = blk.experts.lora
            for p in self.cfg.targets:
                A, B = lora.A[p], lora.B[p]
                if A.grad is None or B.grad is None:  # no token reached the layer's adapters: importance 0
                    s = torch.zeros_like(self.g[p][l])
                else:
                    s = (A.grad * A).abs().sum(-1) * (B.grad * B).abs().sum(-2)  # (E, r_max)
                    if hasattr(s, "full_tensor"):  # FSDP: this process's experts only; every process needs all E
                        s = s.full_tensor()
                self.g[p][l].mul_(b).add_((1 - b) * s.float())
        self._weight_sum.zero_()
        self._tokens.zero_()

    def expert_importance(self):
        """g per expert (L, E): mean over projections of the mean over active slots."""
        ranks = self.ranks
        active = torch.arange(self.cfg.r_max, device=ranks.device) < ranks[..., None]  # (L, E, r_max)
        per_proj = [(self.g[p] * active).sum(-1) / ranks.clamp(min=1) for p in self.cfg.targets]
        return torch.stack(per_proj).mean(0)

    def saliency(self):
        """S = f_hat * g_hat / (r + 1)^gamma, f_hat and g_hat normalised over each layer's experts."""
        eps = 1e-12
        f_hat = self.f / (self.f.sum(-1, keepdim=True) + eps)
        g = self.expert_importance()
        g_hat = g / (g.sum(-1, keepdim=True) + eps)
        score = {"fg": f_hat * g_hat, "f": f_hat, "g": g_hat}[self.cfg.saliency]
        # (r + 1)^gamma from a table of python floats: a vectorised pow can differ by an ulp between
        # positions of one tensor, and equal experts must get bit-equal scores (ties go to the lower index)
        penalty = torch.tensor([(r + 1) ** self.cfg.gamma for r in range(self.cfg.r_max + 1)], device=self.f.device)
        return score / penalty[self.ranks]

    # -- the step ------------------------------------------------------------
    def step(self, t: int):
        """After step t's backward, before optimizer.step(). Returns the growth event or None."""
        if t < self.t_warm:  # the router is frozen during warm-up: no gradient, no update
            for p in self.router_parameters():
                p.grad = None
        self.update_statistics()
        if t not in self.events:
            return None
        return self.grow(t)

    @torch.no_grad()
    def grow(self, t: int):
        cfg, S, ranks = self.cfg, self.saliency(), self.ranks
        L, E = ranks.shape
        last = t == self.events[-1]

        def grow_pool(S, ranks, target, quota):  # one pool of experts: a layer, or all layers with "global"
            left = target - int(ranks.sum())
            # The last event gives all the pool still lacks (that is min(quota, left) unless experts full
            # at r_max left earlier events short), at the cap like any other event; only what the cap
            # cannot place then goes past it, still by saliency, so that no pool ever ends short.
            new = allocate(S, ranks, left if last else min(quota, left), self.cap, cfg.r_max)
            if last:
                new = allocate(S, new, target - int(new.sum()), cfg.r_max, cfg.r_max)
            return new

        if cfg.allocation == "layer":
            new = torch.stack([grow_pool(S[l], ranks[l], E * cfg.r_target, self.quota) for l in range(L)])
        else:  # one pool: the quotas and targets of all layers together, experts compared across layers
            new = grow_pool(S.flatten(), ranks.flatten(), L * E * cfg.r_target, L * self.quota).view(L, E)
        for l, blk in enumerate(self.blocks):
            blk.experts.lora.set_ranks(new[l])
        for p in cfg.targets:  # g restarts after every event; f is kept
            self.g[p].zero_()
        event = {"step": t, "grown": (new - ranks).tolist(), "ranks": new.tolist(), "saliency": S.tolist()}
        self.history.append(event)
        return event

    # -- state ---------------------------------------------------------------
    def state_dict(self):
        return {"config": _plain(self.cfg), "total_steps": self.total_steps, "ranks": self.ranks.cpu(),
                "f": self.f.cpu(), "g": {p: v.cpu() for p, v in self.g.items()}, "history": self.history}

    def load_state_dict(self, sd):
        mine = _plain(self.cfg)
        if sd["config"] != mine:
            diff = {k: (sd["config"].get(k), v) for k, v in mine.items() if sd["config"].get(k) != v}
            raise ValueError(f"DR-LoRA settings differ from the checkpoint's (checkpoint, now): {diff}")
        if sd["total_steps"] != self.total_steps:
            raise ValueError(f"total_steps differ: checkpoint {sd['total_steps']}, now {self.total_steps}")
        for l, blk in enumerate(self.blocks):
            blk.experts.lora.set_ranks(sd["ranks"][l].to(blk.experts.lora.ranks.device))
        self.f.copy_(sd["f"])
        for p in self.cfg.targets:
            self.g[p].copy_(sd["g"][p])
        self.history = list(sd["history"])


# -----------------------------------------------------------------------------
# one optimizer step: the order DR-LoRA needs, written once for train.py, the notebook and the tests


def train_step(model, drl: DRLoRA, optimizer, micro_batches, t: int, grad_clip: float = 0.0, autocast=None):
    """Optimizer step t over micro_batches [(x, targets, attention_mask), ...]:

        for each micro-batch: forward, drl.observe(routing), backward(loss / n)
        drl.step(t)        statistics from this step's gradients, router freeze, growth
        clip, optimizer.step(), zero_grad

    model may be wrapped in DistributedDataParallel: gradients are then synchronised on the last
    micro-batch only. Returns (mean loss of this process's micro-batches, growth event or None)."""
    n, loss = len(micro_batches), 0.0
    for i, (x, y, mask) in enumerate(micro_batches):
        if hasattr(model, "require_backward_grad_sync"):  # DDP: the all-reduce runs in the last backward
            model.require_backward_grad_sync = i == n - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: the reduce-scatter too
            model.set_requires_gradient_sync(i == n - 1)
        with autocast or contextlib.nullcontext():
            out = model(x, targets=y, attention_mask=mask)
        drl.observe(out.routers, mask)
        (out.loss / n).backward()
        loss = loss + out.loss.detach() / n
    event = drl.step(t)
    # the norm of the synchronised gradients is the same on every process, so all of them stop together
    norm = torch.nn.utils.clip_grad_norm_(drl.trainable_parameters(), grad_clip if grad_clip > 0 else math.inf)
    if not torch.isfinite(norm):
        raise FloatingPointError(f"step {t}: loss is {float(loss):.4g}, gradient norm {norm.item()}; stopping "
                                 "before the update (the last checkpoint on disk is kept); lower --lr")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, event


# -----------------------------------------------------------------------------
# merge: the adapters folded into the weights (hf.save_adapter / load_adapter keep them apart)


def merge(model):
    """Fold every expert's active LoRA into its weights and remove the adapters."""
    for blk in model.moe_layers():
        if hasattr(blk.experts.up_proj, "full_tensor"):  # FSDP: W[e] would be a gathered copy, the merge lost
            raise ValueError("merge a sharded model from its adapter file (tools/export.py), not in place")
        if blk.experts.lora is not None:
            blk.experts.lora.merge_into(blk.experts)
            blk.experts.lora = None
    return model
