"""
Hugging Face checkpoints and tokenizers for moe.py: config.json to MoEConfig and back, safetensors
loading (strict: every key named when something does not match) and saving, finding a named model
in the local cache or on the Hub, and the tokenizers. moe.py is the model; this file is its I/O.

Tokenizers: the tiny model's bytes (ByteTokenizer), or a checkpoint's own tokenizer.json through
the `tokenizers` library, which reproduces OLMoE's NFC normaliser and added whitespace tokens
exactly; tiktoken cannot express them.
"""
import glob
import hashlib
import json
import os
import re

import torch

from moe import MoEConfig, MoETransformer

# -----------------------------------------------------------------------------
# config.json <-> MoEConfig: each family's settings


def config_from_hf(d: dict, source: str = "config.json") -> MoEConfig:
    """Read a transformers config.json (both the 4.x and 5.x spellings)."""
    mt = d.get("model_type")
    if mt not in ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral"):
        raise ValueError(f"{source}: unknown model_type {mt!r}; moe.py supports olmoe, qwen2_moe, qwen3_moe, mixtral")
    rope = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
        raise ValueError(f"{source}: only plain RoPE is supported, got {rope or d.get('rope_scaling')}")
    n_head = d["num_attention_heads"]
    c = dict(model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], n_layer=d["num_hidden_layers"],
             n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head, head_dim=d.get("head_dim") or 0,
             rope_theta=float(theta), rms_eps=d.get("rms_norm_eps", 1e-5),
             max_seq_len=d.get("max_position_embeddings", 4096), tie_embeddings=d.get("tie_word_embeddings", False),
             pad_id=d.get("pad_token_id"), eos_id=d.get("eos_token_id"), tokenizer=d.get("drlora_tokenizer", "hf"), hf=d)
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
            c.update(qk_norm="none", qkv_bias=d.get("qkv_bias", True), shared_expert_size=d["shared_expert_intermediate_size"])
        else:
            bias = d.get("attention_bias", False)
            c.update(qk_norm="head", qkv_bias=bias, o_bias=bias)
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: sliding-window attention is not supported")
    else:  # mixtral
        c.update(n_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"], intermediate_size=d["intermediate_size"],
                 norm_topk_prob=True, qk_norm="none")
        if d.get("sliding_window"):
            raise ValueError(f"{source}: sliding-window attention is not supported")
    return MoEConfig(**c)

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
    return [(k, None, None)]


def _checkpoint_files(path: str) -> list[str]:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
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
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def from_pretrained(path: str, dtype=torch.float32, device="cpu") -> MoETransformer:
    """Load a Hugging Face checkpoint folder (config.json + safetensors, single or sharded,
    per-expert or fused expert keys). Shard by shard, straight into the requested dtype,
    so peak host memory stays near one copy of the model. Strict: every tensor consumed,
    every parameter filled, shapes equal, else one error naming all that is wrong."""
    from safetensors import safe_open

    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{config_file} does not exist: not a Hugging Face checkpoint folder")
    with open(config_file) as f:
        cfg = config_from_hf(json.load(f), source=config_file)
    files = _checkpoint_files(path)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to_empty(device=device).to(dtype)  # uninitialised storage, filled below
    params = dict(model.named_parameters())  # a tied lm_head shares the embedding's entry
    filled = {name: torch.zeros(p.shape[0] if p.dim() == 3 else 1, dtype=torch.bool) for name, p in params.items()}
    unexpected, bad_shape = [], []
    for file in files:
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # truncated or not a safetensors file
            raise ValueError(f"{file}: cannot read safetensors file ({e})") from e
        with handle:
            for key in handle.keys():
                targets = _hf_to_ours(key, cfg)
                if any(t[0] not in params for t in targets):
                    unexpected.append(key)
                    continue
                try:
                    t = handle.get_tensor(key)
                except Exception as e:
                    raise ValueError(f"{file}: cannot read tensor {key} ({e})") from e
                for name, e, rows in targets:
                    p = params[name]
                    src = t if rows is None else t[:, rows]
                    dst = p if e is None else p[e]
                    if src.shape != dst.shape:
                        bad_shape.append(f"{key}: checkpoint {tuple(src.shape)} vs model {tuple(dst.shape)}")
                        continue
                    with torch.no_grad():
                        dst.copy_(src.to(dtype))
                    filled[name][slice(None) if e is None else e] = True
                del t
    missing = [n + ("" if f.numel() == 1 else f" (experts {(~f).nonzero().flatten().tolist()})")
               for n, f in filled.items() if not f.all()]
    if cfg.tie_embeddings:
        missing = [m for m in missing if not m.startswith("lm_head")]
    if missing or unexpected or bad_shape:
        raise ValueError(f"checkpoint {path} does not match a {cfg.model_type} model:\n"
                         f"  missing: {missing}\n  unexpected: {unexpected}\n  wrong shape: {bad_shape}")
    return model


def save_pretrained(model: MoETransformer, path: str, fused: bool = False):
    """Write config.json + model.safetensors in the Hugging Face layout transformers loads:
    per-expert keys (the published layout) or, with fused=True, gate_up_proj/down_proj."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    sd = {}
    for name, p in model.named_parameters():
        if model.cfg.tie_embeddings and name == "lm_head.weight":
            continue
        key = name if name.startswith("lm_head") else "model." + name
        m = re.fullmatch(r"(layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)", name)
        if m and fused:
            if m[2] == "gate_proj":
                sd[f"model.{m[1]}.gate_up_proj"] = torch.cat([p, getattr(model.get_submodule(m[1]), "up_proj")], 1)
            elif m[2] == "down_proj":
                sd[f"model.{m[1]}.down_proj"] = p
        elif m:
            for e in range(p.shape[0]):
                sd[f"model.{m[1]}.{e}.{m[2]}.weight"] = p[e]
        else:
            sd[key] = p
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(model.cfg), f, indent=2)


# -----------------------------------------------------------------------------
# finding the weights of a named model


KNOWN_MODELS = {  # --model NAME -> Hugging Face repository
    "olmoe": "allenai/OLMoE-1B-7B-0924",
    "olmoe-instruct": "allenai/OLMoE-1B-7B-0924-Instruct",
    "qwen2_moe": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen3_moe": "Qwen/Qwen3-30B-A3B",
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
}


def find_checkpoint(name: str, download: bool = True) -> str:
    """A local folder; else a known name or repo id in the local Hugging Face cache; else a
    download through huggingface_hub. Raises one message saying where it looked."""
    if os.path.isdir(name):
        return name
    repo = KNOWN_MODELS.get(name, name)
    if "/" not in repo:
        raise ValueError(f"unknown model {name!r}: give a checkpoint folder, a Hugging Face repo id, or one of {sorted(KNOWN_MODELS)}")
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    snapshots = os.path.join(hub, "models--" + repo.replace("/", "--"), "snapshots")
    ref = os.path.join(hub, "models--" + repo.replace("/", "--"), "refs", "main")
    candidates = []
    if os.path.exists(ref):
        candidates.append(os.path.join(snapshots, open(ref).read().strip()))
    candidates += sorted(glob.glob(os.path.join(snapshots, "*")), key=os.path.getmtime, reverse=True)
    for c in candidates:
        if os.path.exists(os.path.join(c, "config.json")):
            return c
    why = "downloads disabled"
    if download and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        except ImportError:
            why = "huggingface_hub is not installed"
        except Exception as e:  # offline, gated, not found
            why = f"download failed: {type(e).__name__}: {str(e)[:200]}"
    raise FileNotFoundError(
        f"no weights for {name!r} ({repo}). Looked for: a folder named {name!r}; the Hugging Face cache {snapshots}; "
        f"a download ({why}). Get them with `hf download {repo}` on a machine with internet (then copy "
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
        raise FileNotFoundError(f"{path}: no tokenizer.json (moe.py reads the checkpoint's own tokenizer)")
    return HFTokenizer(path, cfg)
