"""
The files: config.json to MoEConfig and back, strict checkpoint loading and saving, finding a named
model in the Hugging Face cache or on the Hub, DR-LoRA's adapter file, and the tokenizers: bytes for the
tiny model, else the checkpoint's tokenizer.json through `tokenizers` (tiktoken cannot express OLMoE's
NFC normaliser and added whitespace tokens).
"""
import contextlib
import glob
import hashlib
import json
import os
import re
import types
from dataclasses import asdict

import torch

from drlora import DRLoRAConfig, ExpertLoRA
from moe import MoEConfig, MoETransformer

# -----------------------------------------------------------------------------
# config.json <-> MoEConfig: each family's settings


class Fields(dict):
    """config.json's fields: one the family needs and the file lacks is an error naming the file, field and family."""

    def __init__(self, d: dict, source: str):
        super().__init__(d)
        self.source = source

    def __missing__(self, key):
        raise ValueError(f"{self.source} has no {key!r}, which model_type {self.get('model_type')!r} needs")


def config_from_hf(d: dict, source: str = "config.json") -> MoEConfig:
    """Read a transformers config.json (both the 4.x and 5.x spellings)."""
    d = Fields(d, source)
    mt = d.get("model_type")
    if mt not in ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "llama_moe"):
        raise ValueError(f"{source}: unknown model_type {mt!r}; moe.py supports olmoe, qwen2_moe, qwen3_moe, mixtral, "
                         f"llama_moe")
    rope = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
        raise ValueError(f"{source}: only plain RoPE is supported, got {rope or d.get('rope_scaling')}")
    n_head = d["num_attention_heads"]
    c = dict(model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], n_layer=d["num_hidden_layers"],
             n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head, head_dim=d.get("head_dim") or 0,
             rope_theta=float(theta), rms_eps=d.get("rms_norm_eps", 1e-5),
             max_seq_len=d.get("max_position_embeddings", 4096), tie_embeddings=d.get("tie_word_embeddings", False),
             pad_id=d.get("pad_token_id"), eos_id=d.get("eos_token_id"), tokenizer=d.get("drlora_tokenizer", "hf"),
             hf=dict(d))
    if isinstance(c["eos_id"], list):
        c["eos_id"] = c["eos_id"][0]
    if mt == "olmoe":
        c.update(n_experts=d["num_experts"], top_k=d["num_experts_per_tok"], intermediate_size=d["intermediate_size"],
                 norm_topk_prob=d.get("norm_topk_prob", False), qk_norm="full", qkv_bias=d.get("attention_bias", False),
                 o_bias=d.get("attention_bias", False), clip_qkv=d.get("clip_qkv"))
    elif mt in ("qwen2_moe", "qwen3_moe"):
        n, step, only = d["num_hidden_layers"], d.get("decoder_sparse_step", 1), d.get("mlp_only_layers") or []
        E = d.get("num_experts", d.get("num_local_experts"))  # transformers 5 writes num_local_experts
        dense = tuple(i for i in range(n) if i in only or E == 0 or (i + 1) % step != 0)
        c.update(n_experts=E, top_k=d["num_experts_per_tok"], intermediate_size=d["moe_intermediate_size"],
                 norm_topk_prob=d.get("norm_topk_prob", mt == "qwen3_moe"), dense_layers=dense,
                 dense_intermediate_size=d["intermediate_size"])
        if mt == "qwen2_moe":
            c.update(qk_norm="none", qkv_bias=d.get("qkv_bias", True),
                     shared_expert_size=d["shared_expert_intermediate_size"])
        else:
            bias = d.get("attention_bias", False)
            c.update(qk_norm="head", qkv_bias=bias, o_bias=bias)
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: sliding-window attention is not supported")
    elif mt == "mixtral":
        c.update(n_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"],
                 intermediate_size=d["intermediate_size"],
                 norm_topk_prob=True, qk_norm="none")
        if d.get("sliding_window"):
            raise ValueError(f"{source}: sliding-window attention is not supported")
    else:  # llama_moe
        c.update(_llama_moe(d, source))
    return MoEConfig(**c)


def _llama_moe(d: dict, source: str) -> dict:
    """LLaMA-MoE (remote code: pjlab-sys4nlp/llama-moe, modeling_llama_moe_hf.py, commit 3577be8): each
    layer's MLP split into equal experts, the top num_selects weighted by softmax(top-k logits) (or the raw
    logits) times score_scale_factor. Refuses, naming the field, the variants moe.py does not compute."""
    def refuse(key, why):
        raise ValueError(f"{source}: {key}={d.get(key)!r} is not supported for llama_moe: {why}")

    gate = str(d.get("gate_network", "mlp")).lower()  # upstream lower-cases it too
    for key, ok, why in (  # (field, supported?, what is supported); older configs name the gate and calculator
            ("gate_type", d.get("gate_type", "TopKBalancedNoisyGate") == "TopKBalancedNoisyGate",
             "only TopKBalancedNoisyGate, the published models' gate"),
            ("calculator_type", d.get("calculator_type", "UniversalCalculator") == "UniversalCalculator",
             "only UniversalCalculator (every token reaches its top-k experts, none dropped)"),
            ("gate_network", gate in ("mlp", "linear"), "only mlp (Linear -> tanh -> Linear) or linear"),
            ("multiply_gate_scores", d.get("multiply_gate_scores", True), "the gate scores must weight the outputs"),
            ("add_weight_norm", not d.get("add_weight_norm"), "no weight norm on the expert outputs"),
            ("hidden_act", d.get("hidden_act", "silu") == "silu", "the experts are SwiGLU (silu)"),
            ("attention_bias", not d.get("attention_bias"), "the published code builds q/k/v/o without biases"),
            ("rope_theta", float(d.get("rope_theta", 10000.0)) == 10000.0, "the published code always uses 10000")):
        if not ok:
            refuse(key, why)
    E, I, sizes = d["num_experts"], d["intermediate_size"], d.get("size_experts")
    if sizes and len({w for layer in sizes for w in layer}) != 1:
        refuse("size_experts", "experts of one width in every layer (moe.py stacks them)")
    if not sizes and I % E:
        refuse("intermediate_size", f"it must split into {E} experts of one width (num_experts)")
    width = sizes[0][0] if sizes else I // E
    scale = d.get("score_scale_factor", 1.0)
    scales = set(scale) if isinstance(scale, list) else {scale}  # upstream allows one per layer
    if len(scales) != 1:
        refuse("score_scale_factor", "one value for every layer")
    return dict(n_experts=E, top_k=d["num_selects"], intermediate_size=width, qk_norm="none", router=gate,
                router_softmax=bool(d.get("gate_use_softmax", True)), norm_topk_prob=True,  # softmax over the top-k
                expert_scale=float(scales.pop()), router_noise=bool(d.get("gate_add_noise", True)))

def config_to_hf(cfg: MoEConfig) -> dict:
    """config.json for export. A loaded checkpoint returns its own; the tiny model gets an OLMoE config."""
    if cfg.hf:
        return dict(cfg.hf)
    assert cfg.model_type == "olmoe" and not cfg.dense_layers and not cfg.shared_expert_size
    return dict(model_type="olmoe", architectures=["OlmoeForCausalLM"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                num_key_value_heads=cfg.n_kv_head, num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                intermediate_size=cfg.intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps, max_position_embeddings=cfg.max_seq_len,
                tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias, clip_qkv=cfg.clip_qkv,
                hidden_act="silu", pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id, bos_token_id=None,
                drlora_tokenizer=cfg.tokenizer, output_router_logits=False, router_aux_loss_coef=0.01)


# -----------------------------------------------------------------------------
# loading and saving Hugging Face checkpoints


def _hf_to_ours(key: str, cfg: MoEConfig):
    """Map one checkpoint key to [(our parameter name, expert index or None, rows slice or None)]."""
    k = key[len("model."):] if key.startswith("model.") else key
    k = k.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's original naming
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight", k)
    if m:  # the published per-expert layout
        proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(m[3], m[3])
        return [(f"layers.{m[1]}.mlp.experts.{proj}", int(m[2]), None)]
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.gate_up_proj", k)
    if m:  # transformers 5's fused layout: (E, 2I, H), gate rows first
        I = cfg.intermediate_size
        return [(f"layers.{m[1]}.mlp.experts.gate_proj", None, slice(0, I)),
                (f"layers.{m[1]}.mlp.experts.up_proj", None, slice(I, 2 * I))]
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.calculator\.experts\.weight_(gate|up|down)\.(\d+)", k)
    if m:  # LLaMA-MoE: one tensor per projection and expert, (I, H) or (H, I) as ours
        return [(f"layers.{m[1]}.mlp.experts.{m[2]}_proj", int(m[3]), None)]
    if k.endswith(".rotary_emb.inv_freq"):  # a buffer some checkpoints carry (LLaMA-MoE's): rope_theta's, not a weight
        return []
    k = k.replace(".mlp.gate.gate_network.", ".mlp.gate.")  # LLaMA-MoE's router: gate_network.{0,2}.weight or .weight
    k = k.replace(".mlp.gate.weight_noise.weight", ".mlp.gate_noise")  # its noise weights, kept for export
    return [(k, None, None)]


def _checkpoint_files(path: str) -> list[str]:
    """The weight files: safetensors if there are any, else pytorch_model*.bin (LLaMA-MoE publishes only those)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        single, index = os.path.join(path, single), os.path.join(path, index)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, s) for s in shards]
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not there: {missing}")
            return files
        if os.path.exists(single):
            return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                            f"pytorch_model.bin.index.json")


def _open_weights(file: str):
    """A weight file as a context manager holding keys() and get_slice(key), a handle that reads only what it is
    indexed with: safetensors, or a pytorch_model*.bin loaded weights_only (the pickle may build tensors, never
    run code) and mmap (tensors stay on disk until copied: each is its own handle)."""
    if not file.endswith(".bin"):
        from safetensors import safe_open

        return safe_open(file, framework="pt", device="cpu")
    sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError("not a state dict of tensors")
    return contextlib.nullcontext(types.SimpleNamespace(keys=sd.keys, get_slice=sd.__getitem__))


def read_config(path: str) -> MoEConfig:
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{config_file} does not exist: not a Hugging Face checkpoint folder")
    with open(config_file) as f:
        return config_from_hf(json.load(f), source=config_file)


def read_weights(path: str, files: list[str], cfg: MoEConfig, shapes: dict, copy):
    """Walk the checkpoint's tensors. For each that fills parameter `name` (whole, or its expert e; rows: its part
    of a fused tensor), call copy(name, e, rows, handle), where handle[...] reads only what it is indexed with.
    Strict, from the files' headers alone (so every process of a sharded load agrees): every tensor used, every
    name in shapes filled, shapes equal, else one error naming all."""
    filled = {name: torch.zeros(s[0] if len(s) == 3 else 1, dtype=torch.bool) for name, s in shapes.items()}
    unexpected, bad_shape = [], []
    for file in files:
        try:
            handle = _open_weights(file)
        except Exception as e:  # truncated, or not a safetensors / torch.save file
            raise ValueError(f"{file}: cannot read {'pytorch_model' if file.endswith('.bin') else 'safetensors'} "
                             f"file ({e})") from e
        with handle as weights:
            for key in weights.keys():
                targets = _hf_to_ours(key, cfg)
                if not targets:  # known and not needed
                    continue
                if any(name not in shapes or (e is not None and e >= shapes[name][0]) for name, e, _ in targets):
                    unexpected.append(key)  # an unknown name, or an expert beyond num_experts
                    continue
                try:
                    t = weights.get_slice(key)
                    shape = tuple(t.get_shape() if hasattr(t, "get_shape") else t.shape)
                    for name, e, rows in targets:
                        src = shape if rows is None else (shape[0], len(range(shape[1])[rows]), *shape[2:])
                        dst = tuple(shapes[name]) if e is None else tuple(shapes[name][1:])
                        if src != dst:
                            bad_shape.append(f"{key}: checkpoint {src} vs model {dst}")
                            continue
                        copy(name, e, rows, t)
                        filled[name][slice(None) if e is None else e] = True
                except Exception as e:
                    raise ValueError(f"{file}: cannot read tensor {key} ({e})") from e
    missing = [n + ("" if f.numel() == 1 else f" (experts {(~f).nonzero().flatten().tolist()})")
               for n, f in filled.items() if not f.all()]
    if cfg.tie_embeddings:
        missing = [m for m in missing if not m.startswith("lm_head")]
    if missing or unexpected or bad_shape:
        raise ValueError(f"checkpoint {path} does not match a {cfg.model_type} model:\n"
                         f"  missing: {missing}\n  unexpected: {unexpected}\n  wrong shape: {bad_shape}")


def from_pretrained(path: str, dtype=torch.float32, device="cpu") -> MoETransformer:
    """A checkpoint folder (config.json + safetensors or pytorch_model*.bin, single or sharded, per-expert
    or fused experts), shard by shard into dtype: peak host memory stays near one copy of the model.
    Strict: every tensor used, every parameter filled, shapes equal, else one error naming all."""
    cfg = read_config(path)
    files = _checkpoint_files(path)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to_empty(device=device).to(dtype)  # uninitialised storage, filled below
    params = dict(model.named_parameters())  # a tied lm_head shares the embedding's entry
    params.update(model.named_buffers())  # LLaMA-MoE's noise weights are a buffer: loaded and checked alike

    @torch.no_grad()
    def copy(name, e, rows, t):
        (params[name] if e is None else params[name][e]).copy_(t[:] if rows is None else t[:, rows])

    read_weights(path, files, cfg, {name: p.shape for name, p in params.items()}, copy)
    return model


def write_safetensors(tensors: dict, file: str, metadata: dict | None = None):
    """save_file, atomically, with the mode of an ordinary new file (0666 less the umask): safetensors
    >= 0.8 alone leaves 0600, readable by its writer only (safetensors issue #782)."""
    from safetensors.torch import save_file

    save_file(tensors, file + ".tmp", metadata=metadata)
    umask = os.umask(0)  # the only way to read the umask before Python 3.13: set it and put it back
    os.umask(umask)
    os.chmod(file + ".tmp", 0o666 & ~umask)
    os.replace(file + ".tmp", file)


def save_pretrained(model: MoETransformer, path: str, state_dict: dict | None = None):
    """Write config.json + model.safetensors: by default in the per-expert layout that transformers
    reads for OLMoE and Qwen (mlp.experts.E.gate_proj.weight, ...). tools/export.py passes the
    state_dict of another family's own layout (Mixtral's names, LLaMA-MoE's, the fused one)."""
    os.makedirs(path, exist_ok=True)
    sd = state_dict
    if sd is None:
        sd = {}
        for name, p in model.named_parameters():
            if model.cfg.tie_embeddings and name == "lm_head.weight":
                continue
            m = re.fullmatch(r"(layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)", name)
            if m:
                sd.update({f"model.{m[1]}.{e}.{m[2]}.weight": p[e] for e in range(p.shape[0])})
            else:
                sd[name if name.startswith("lm_head") else "model." + name] = p
    write_safetensors({k: v.detach().contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"),
                      metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(model.cfg), f, indent=2)


# -----------------------------------------------------------------------------
# DR-LoRA's adapter file: only the active slots, the ranks, the trained router, the settings, the base's identity


def base_identity(model) -> dict:
    """What an adapter must be applied to: the architecture, and a fingerprint of the frozen embedding,
    so that a same-shaped other model (another family, or another fine-tune of the same) is refused."""
    arch = {k: v for k, v in asdict(model.cfg).items() if k != "hf"}
    rows = model.embed_tokens.weight[:8].detach().to("cpu", torch.bfloat16)  # a checkpoint's bf16 bits
    return {"arch": json.loads(json.dumps(arch)),
            "embed_sha256": hashlib.sha256(rows.view(torch.int16).numpy()).hexdigest()}


def save_adapter(model, path: str, cfg: DRLoRAConfig):
    """safetensors with only the active slots: per layer and projection, the experts' A rows stacked
    (sum r, d_in) and B columns (d_out, sum r); plus the ranks, the router (trained after warm-up unless
    freeze_router: without it the base's router comes back), the settings and the base's identity."""
    tensors = {}
    for l, blk in enumerate(model.moe_layers()):
        lora = blk.experts.lora
        tensors[f"layers.{l}.ranks"] = lora.ranks.cpu()
        if not cfg.freeze_router:
            for name, t in blk.gate.state_dict().items():
                tensors[f"layers.{l}.router.{name}"] = t.cpu().contiguous()
        for p in cfg.targets:
            A, B = lora.A[p], lora.B[p]
            tensors[f"layers.{l}.{p}.A"] = torch.cat([A[e, :r] for e, r in enumerate(lora.r)]).detach().cpu()
            tensors[f"layers.{l}.{p}.B"] = torch.cat([B[e, :, :r] for e, r in enumerate(lora.r)], 1).detach().cpu()
    meta = {"drlora": json.dumps(asdict(cfg)), "base": json.dumps(base_identity(model))}
    write_safetensors(tensors, path, meta)


def load_adapter(model, path: str) -> DRLoRAConfig:
    """Attach the adapter saved by save_adapter to a fresh base model (inactive slots zero)."""
    from safetensors import safe_open

    try:
        f = safe_open(path, framework="pt")
    except Exception as e:  # not there, or not a safetensors file (a ckpt.pt, say)
        raise ValueError(f"{path}: cannot read it as a drlora adapter (safetensors): {e}") from e
    with f:
        meta = f.metadata() or {}
        if "drlora" not in meta or "base" not in meta:
            raise ValueError(f"{path}: not a drlora adapter (no 'drlora' settings and 'base' in its metadata)")
        saved, here = json.loads(meta["base"]), base_identity(model)
        if saved != here:
            diff = {k: (saved["arch"].get(k), v) for k, v in here["arch"].items() if saved["arch"].get(k) != v}
            what = f"settings that differ (adapter's base, this model): {diff}" if diff else \
                f"the same settings but other weights (embedding fingerprint {saved['embed_sha256'][:12]} " \
                f"vs {here['embed_sha256'][:12]})"
            raise ValueError(f"{path} was trained on another base model than this one: {what}")
        cfg = DRLoRAConfig(**json.loads(meta["drlora"]))
        for l, blk in enumerate(model.moe_layers()):
            lora = ExpertLoRA(blk.experts, cfg)
            lora.set_ranks(f.get_tensor(f"layers.{l}.ranks"))
            with torch.no_grad():
                if not cfg.freeze_router:
                    for name in blk.gate.state_dict():
                        blk.gate.get_parameter(name).copy_(f.get_tensor(f"layers.{l}.router.{name}"))
                for p in cfg.targets:
                    A, B = lora.A[p], lora.B[p]
                    A.zero_()
                    A_act, B_act = f.get_tensor(f"layers.{l}.{p}.A"), f.get_tensor(f"layers.{l}.{p}.B")
                    start = 0
                    for e, r in enumerate(lora.r):
                        A[e, :r] = A_act[start:start + r]
                        B[e, :, :r] = B_act[:, start:start + r]
                        start += r
            blk.experts.lora = lora.to(blk.experts.up_proj.device).train(blk.experts.training)  # follow model.eval()
    return cfg


# -----------------------------------------------------------------------------
# finding the weights of a named model


KNOWN_MODELS = {  # --model NAME -> Hugging Face repository
    "olmoe": "allenai/OLMoE-1B-7B-0924",
    "olmoe-instruct": "allenai/OLMoE-1B-7B-0924-Instruct",
    "qwen2_moe": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen3_moe": "Qwen/Qwen3-30B-A3B",
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "llama_moe": "llama-moe/LLaMA-MoE-v1-3_5B-2_8",
}


def find_checkpoint(name: str, download: bool = True, weights: bool = True) -> str:
    """A local folder; else a known name or repo id in the Hugging Face cache, with its weights (weights=False:
    config.json is enough); else a download. Else one message saying where it looked."""
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/"):  # a path, not "owner/name"
        raise FileNotFoundError(f"no such checkpoint folder: {name}")
    repo = KNOWN_MODELS.get(name, name)
    if "/" not in repo:
        raise ValueError(f"unknown model {name!r}: give a checkpoint folder, a Hugging Face repo id, "
                         f"or one of {sorted(KNOWN_MODELS)}")

    def has_weights(folder):  # the files from_pretrained reads: one file, or an index with all its shards
        try:
            return bool(_checkpoint_files(folder))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none, or an unreadable index
            return False

    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    snapshots = os.path.join(hub, "models--" + repo.replace("/", "--"), "snapshots")
    ref = os.path.join(hub, "models--" + repo.replace("/", "--"), "refs", "main")
    candidates = []
    if os.path.exists(ref):
        candidates.append(os.path.join(snapshots, open(ref).read().strip()))
    candidates += sorted(glob.glob(os.path.join(snapshots, "*")), key=os.path.getmtime, reverse=True)
    candidates = [c for c in candidates if os.path.exists(os.path.join(c, "config.json"))]
    for c in candidates:
        if not weights or has_weights(c):
            return c
    why = "downloads disabled"
    if download and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            from huggingface_hub import snapshot_download

            # every file hf.py and tasks/chat.py read: config.json, model.safetensors(.index.json) and its
            # shards, tokenizer.json, tokenizer_config.json, chat_template.jinja; tokenizer* also takes
            # tokenizer.model (sentencepiece models such as LLaMA-MoE ship it)
            patterns = ["*.json", "*.safetensors", "tokenizer*", "chat_template.jinja"]
            folder = snapshot_download(repo, allow_patterns=patterns)
            if weights and not has_weights(folder):  # no safetensors: the .bin files (asked apart, never both)
                folder = snapshot_download(repo, allow_patterns=["pytorch_model*.bin"])
            if not weights or has_weights(folder):
                return folder
            why = "the repo has neither model.safetensors nor pytorch_model.bin, single or sharded"
        except ImportError:
            why = "huggingface_hub is not installed"
        except Exception as e:  # offline, gated, not found
            reason = (str(e).strip().splitlines() or [""])[0]  # the first line, whole: later ones hold request ids
            why = f"download failed: {type(e).__name__}: {reason}"
    incomplete = (f" The cache holds {candidates[0]}, an incomplete download: config.json but no model.safetensors "
                  f"or pytorch_model.bin (nor an index with all its shards); finish it with `hf download {repo}`, "
                  f"which resumes." if candidates else "")
    raise FileNotFoundError(
        f"no weights for {name!r} ({repo}). Looked for: a folder named {name!r}; the Hugging Face cache {snapshots}; "
        f"a download ({why}).{incomplete} Get them with `hf download {repo}` on a machine with internet (then copy "
        f"~/.cache/huggingface or the folder here), or pass --model /path/to/checkpoint.")


# -----------------------------------------------------------------------------
# tokenizers


class ByteTokenizer:
    """The tiny embedded model's tokenizer: UTF-8 bytes are tokens 0..255, plus two specials.
    Downloads nothing and round-trips any text exactly."""
    eos_id = 256  # <|endoftext|>: ends a document or an answer (also used as BOS)
    bos_id = 256
    pad_id = 257  # <|pad|>: never in the loss, never attended to
    vocab_size = 258
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's own tokenizer.json through the `tokenizers` library (exact, with
    OLMoE's NFC normaliser and added whitespace tokens, which tiktoken cannot express)."""

    def __init__(self, path: str, cfg: MoEConfig):
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json")
        self.tok = Tokenizer.from_file(file)
        with open(file, "rb") as f:  # identity by content, not by path: token files record it
            self.name = "hf:" + hashlib.sha256(f.read()).hexdigest()[:16]
        self.eos_id = cfg.eos_id
        self.pad_id = cfg.pad_id if cfg.pad_id is not None else cfg.eos_id
        # the token this tokenizer puts before every text (LLaMA's and Mixtral's <s>), else None (OLMoE, Qwen)
        plain, full = self.tok.encode("a", add_special_tokens=False).ids, self.tok.encode("a").ids
        self.bos_id = full[0] if full[:1] != plain[:1] and full[1:1 + len(plain)] == plain else None
        self.vocab_size = self.tok.get_vocab_size()
        tc = os.path.join(path, "tokenizer_config.json")
        self.chat_template = json.load(open(tc)).get("chat_template") if os.path.exists(tc) else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str, cfg: MoEConfig):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        if os.path.exists(os.path.join(path, "tokenizer.model")):  # sentencepiece only, as LLaMA-MoE ships
            raise FileNotFoundError(f"{path}: no tokenizer.json, only a sentencepiece tokenizer.model; convert it once "
                                    f"with `python tools/convert_tokenizer.py {path}`")
        raise FileNotFoundError(f"{path}: no tokenizer.json (moe.py reads the checkpoint's own tokenizer)")
    return HFTokenizer(path, cfg)
