"""
Export a DR-LoRA fine-tune for use outside drlora, in one of two forms:

  --out DIR   a plain Hugging Face checkpoint: every expert's active LoRA merged into its weights
              (drlora.merge), so transformers, vLLM or anything that reads the base reads the fine-tune.
  --peft DIR  a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for the base as
              transformers 5 holds it, experts fused: PeftModel.from_pretrained(base, DIR). Many task
              adapters can then share one base in memory. Written with safetensors and json alone.

    python tools/export.py --base olmoe --adapter out/adapter.safetensors --out out/merged
    python tools/export.py --base olmoe --adapter out/adapter.safetensors --peft out/peft [--vllm]

Merged: config.json and model.safetensors in the expert layout the base checkpoint used (per-expert
keys, or transformers 5's fused gate_up_proj), the tokenizer files copied from the base, and
generation_config.json with eos and pad ids. Merged in float32 (the base loaded in fp32: about 4 bytes
per parameter of host memory, 28 GB for OLMoE-1B-7B), then written in the base checkpoint's dtype
(--dtype to choose).

PEFT: PEFT has one rank r for every expert, so each expert's active slots are padded with zeros up to
the largest active rank in the model (the function is unchanged; the file is larger than the active
adapter, and the command prints both sizes). A trained router travels as PEFT's modules_to_save,
which vLLM refuses: --vllm insists on a run trained with freeze_router (or use the merged export).
"""
import argparse
import json
import os
import re
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import drlora  # noqa: E402
import hf  # noqa: E402
import moe  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Mixtral's published expert names


def layout_state_dict(model, fused: bool = False) -> dict:
    """The model's tensors under the names its family's published code reads: per-expert keys (Mixtral's
    block_sparse_moe.experts.E.w1/w2/w3, LLaMA-MoE's mlp.calculator.experts.weight_up.E and gate_network,
    the others' mlp.experts.E.gate_proj/...) or, with fused=True, transformers 5's mlp.experts.gate_up_proj
    (gate rows first) and down_proj, for every family but llama_moe, whose code reads only its own names."""
    mixtral, llama = model.cfg.model_type == "mixtral", model.cfg.model_type == "llama_moe"
    if llama and fused:
        raise ValueError("llama_moe has no fused layout: its published modeling code reads one tensor per expert")
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
        elif m and mixtral:
            for e in range(p.shape[0]):
                sd[f"model.{m[1]}.{e}.{MIXTRAL_NAMES[m[2]]}.weight".replace(".mlp.", ".block_sparse_moe.")] = p[e]
        elif m and llama:  # mlp.calculator.experts.weight_{gate,up,down}.E
            for e in range(p.shape[0]):
                sd[f"model.{m[1].replace('.experts', '.calculator.experts')}.weight_{m[2][:-len('_proj')]}.{e}"] = p[e]
        elif llama and ".mlp.gate." in key:  # the router: mlp.gate.gate_network.{0,2}.weight (mlp) or .weight
            sd[key.replace(".mlp.gate.", ".mlp.gate.gate_network.")] = p
        elif m:
            for e in range(p.shape[0]):
                sd[f"model.{m[1]}.{e}.{m[2]}.weight"] = p[e]
        elif mixtral and not fused:  # the router: block_sparse_moe.gate, beside its experts
            sd[key.replace(".mlp.", ".block_sparse_moe.")] = p
        else:
            sd[key] = p
    if llama:  # the rest of what its code holds: each layer's rotary buffer and, if it has them, noise weights
        hd = model.cfg.head_dim
        inv_freq = 1.0 / (model.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        for l, block in enumerate(model.layers):
            sd[f"model.layers.{l}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()  # safetensors refuses shared
            if model.cfg.router_noise:
                sd[f"model.layers.{l}.mlp.gate.weight_noise.weight"] = block.mlp.gate_noise
    return sd


def save_in_layout(model, path: str, fused: bool = False):
    """hf.save_pretrained in the family's own layout: what its published code and transformers read."""
    hf.save_pretrained(model, path, layout_state_dict(model, fused))


def source_is_fused(src_dir: str) -> bool:
    """Whether the checkpoint stores experts fused (transformers 5's gate_up_proj) or per expert."""
    index = os.path.join(src_dir, "model.safetensors.index.json")
    if not os.path.exists(index) and not os.path.exists(os.path.join(src_dir, "model.safetensors")):
        return False  # .bin checkpoints (LLaMA-MoE) store experts one by one
    if os.path.exists(index):
        with open(index) as f:
            keys = json.load(f)["weight_map"]
    else:
        from safetensors import safe_open

        with safe_open(os.path.join(src_dir, "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
    return any(k.endswith("experts.gate_up_proj") for k in keys)


def source_dtype(cfg: moe.MoEConfig) -> torch.dtype:
    """The dtype config.json names (transformers 5 writes 'dtype', 4.x 'torch_dtype'); float32 if none."""
    name = cfg.hf.get("dtype") or cfg.hf.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"config.json names dtype {name!r}; pass one of {sorted(DTYPES)}")
    return DTYPES[name]


def refuse_nonempty(out_dir: str, overwrite: bool):
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty: choose a new folder (or overwrite=True / --overwrite)")


def export(model, base_dir: str, out_dir: str, fused: bool | None = None, dtype: torch.dtype | None = None,
           overwrite: bool = False) -> str:
    """Merge the model's adapters INTO IT (they are removed) and write a Hugging Face folder, with the
    tokenizer files of base_dir, the checkpoint the model was loaded from.
    fused None: base_dir's expert layout; dtype None: the model's own.
    Refuses a folder that holds files unless overwrite (a stale shard index would win over ours)."""
    refuse_nonempty(out_dir, overwrite)
    drlora.merge(model)
    if dtype is not None:
        model.to(dtype)
    if fused is None:
        fused = source_is_fused(base_dir)
    for stale in ("model.safetensors.index.json",):  # sharded weights from an earlier export would be read first
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    save_in_layout(model, out_dir, fused)
    # config.json: say which dtype the weights are in (transformers loads dtype="auto" by it)
    config_file = os.path.join(out_dir, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    written = str(model.lm_head.weight.dtype).removeprefix("torch.")
    config.update({k: written for k in ("dtype", "torch_dtype") if k in config} or {"dtype": written})
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)
    copied = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(base_dir, name))]
    for name in copied:
        shutil.copyfile(os.path.join(base_dir, name), os.path.join(out_dir, name))
    # generation_config.json: the base's, with eos and pad filled in where it has none
    gen_file = os.path.join(base_dir, "generation_config.json")
    gen = json.load(open(gen_file)) if os.path.exists(gen_file) else {}
    gen.setdefault("eos_token_id", model.cfg.eos_id)
    gen.setdefault("pad_token_id", model.cfg.pad_id if model.cfg.pad_id is not None else model.cfg.eos_id)
    if config.get("bos_token_id") is not None:
        gen.setdefault("bos_token_id", config["bos_token_id"])
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    return out_dir


# -----------------------------------------------------------------------------
# the PEFT adapter
#
# PEFT 0.21 adapts a fused expert parameter W (E, out, in) named in `target_parameters` with one
# lora.ParamWrapper: lora_A.weight (E*r, in), lora_B.weight (out, E*r), and adds to W
#     scaling * einsum("o r e, e r i -> e o i", lora_B.reshape(out, r, E), lora_A.reshape(E, r, in))
# (ParamWrapper.get_delta_weight), scaling = lora_alpha / r (use_rslora False). So in lora_A the expert
# is the SLOWEST index (row e*r + j is slot j of expert e), in lora_B the FASTEST (column j*E + e).
# transformers 5 holds experts.gate_up_proj (E, 2I, H), gate rows first, and experts.down_proj (E, H, I).

PEFT_FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")  # built into transformers 5, experts fused


def padded_factors(lora, p: str, R: int):
    """Projection p's A (E, R, d_in) and B (E, d_out, R): expert e's active slots [0, r_e), exact zeros after."""
    keep = torch.arange(R, device=lora.ranks.device) < lora.ranks[:, None]  # (E, R)
    A, B = lora.A[p].detach()[:, :R], lora.B[p].detach()[:, :, :R]
    return torch.where(keep[:, :, None], A, 0), torch.where(keep[:, None, :], B, 0)


def peft_factors(lora, r: int, b_scale: float = 1.0) -> dict:
    """{transformers 5 parameter: (lora_A (E*r, in), lora_B (out, E*r))} for one MoE layer, every expert
    padded to rank r. gate_up_proj carries the adapted halves (gate_proj, up_proj) side by side, half k
    in slots [k*R, (k+1)*R) and in its own rows of B; a half that is not adapted keeps zeros in B."""
    E, R = len(lora.r), max(lora.r)
    out = {}
    halves = [p for p in ("gate_proj", "up_proj") if p in lora.cfg.targets]
    if halves:
        I, H = lora.B[halves[0]].shape[1], lora.A[halves[0]].shape[2]
        A = lora.A[halves[0]].new_zeros(E, r, H)
        B = lora.B[halves[0]].new_zeros(E, 2 * I, r)
        for k, p in enumerate(halves):
            a, b = padded_factors(lora, p, R)
            rows = slice(0, I) if p == "gate_proj" else slice(I, 2 * I)
            A[:, k * R:(k + 1) * R] = a
            B[:, rows, k * R:(k + 1) * R] = b * b_scale
        out["gate_up_proj"] = A, B
    if "down_proj" in lora.cfg.targets:
        a, b = padded_factors(lora, "down_proj", R)
        A, B = a.new_zeros(E, r, a.shape[2]), b.new_zeros(E, b.shape[1], r)
        A[:, :R], B[:, :, :R] = a, b * b_scale
        out["down_proj"] = A, B
    # A (E, r, in) -> (E*r, in): expert slowest; B (E, out, r) -> (out, r, E) -> (out, r*E): expert fastest
    return {name: (A.reshape(E * r, -1), B.permute(1, 2, 0).reshape(B.shape[1], r * E))
            for name, (A, B) in out.items()}


def export_peft(model, base_dir: str, out_dir: str, vllm: bool = False, overwrite: bool = False,
                base_name: str | None = None, dtype: torch.dtype | None = None) -> dict:
    """Write the model's DR-LoRA adapters as a PEFT LoRA folder for base_dir's checkpoint as transformers 5
    loads it (experts fused); the model is left as it is. One rank r for all: the largest active rank
    (twice that when gate_proj and up_proj are both adapted: they share gate_up_proj), every expert
    padded with zeros. lora_alpha = s * r, so PEFT's scaling alpha / r is drlora's constant s exactly
    (else alpha = r and s is folded into lora_B). A trained router (freeze_router False) is saved as
    modules_to_save "mlp.gate"; vllm=True refuses it, as vLLM does. LoRA dropout is not exported
    (PEFT's ParamWrapper has none). base_name: the base as adapter_config.json names it (default base_dir);
    dtype None: the adapter's own.
    Returns the rank, alpha and sizes: padded parameters and bytes against the active ones."""
    refuse_nonempty(out_dir, overwrite)
    if model.cfg.model_type not in PEFT_FAMILIES:
        raise ValueError(f"a PEFT adapter names the parameters of transformers' own model, which has no "
                         f"{model.cfg.model_type!r} (only {', '.join(PEFT_FAMILIES)}): export a merged copy (--out)")
    moe_layers = [(i, b.mlp) for i, b in enumerate(model.layers) if b.is_moe]
    if not moe_layers or any(blk.experts.lora is None for _, blk in moe_layers):
        raise ValueError("the model has no DR-LoRA adapters to export (hf.load_adapter first)")
    cfg = moe_layers[0][1].experts.lora.cfg
    router = not cfg.freeze_router
    if vllm and router:
        raise ValueError("this run trained the router (freeze_router False), which a PEFT adapter can only carry "
                         "as modules_to_save, and vLLM refuses adapters with modules_to_save ('vLLM only supports "
                         "modules_to_save being None'). To serve with vLLM, train with freeze_router=True, or export "
                         "a merged copy (--out) and serve that; without --vllm the PEFT export keeps the router.")
    halves = [p for p in ("gate_proj", "up_proj") if p in cfg.targets]
    params = (["gate_up_proj"] if halves else []) + (["down_proj"] if "down_proj" in cfg.targets else [])
    R = max(max(blk.experts.lora.r) for _, blk in moe_layers)
    r = R * max(len(halves), 1)
    alpha = cfg.scale * r
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    fold = alpha / r != cfg.scale  # PEFT computes lora_alpha / r: use it only where it gives s exactly
    if fold:
        alpha = r
    # PEFT (BaseTuner._inject_parameters) wraps the experts module's parameters in the order they were
    # registered (gate_up_proj, then down_proj), each new ParamWrapper around the last: the first one's
    # LoRA sits one `base_layer.` deeper in the saved keys.
    nest = {name: "base_layer." * (len(params) - 1 - k) for k, name in enumerate(params)}
    tensors, active, router_numel = {}, 0, 0
    for i, blk in moe_layers:
        lora = blk.experts.lora
        prefix = f"base_model.model.model.layers.{i}.mlp."
        for name, (A, B) in peft_factors(lora, r, cfg.scale if fold else 1.0).items():
            tensors[f"{prefix}experts.{nest[name]}lora_A.weight"] = A.to("cpu", dtype or A.dtype).contiguous()
            tensors[f"{prefix}experts.{nest[name]}lora_B.weight"] = B.to("cpu", dtype or B.dtype).contiguous()
        for p in cfg.targets:
            d_out, d_in = lora.B[p].shape[1], lora.A[p].shape[2]
            active += int(lora.ranks.sum()) * (d_in + d_out)
        if router:  # PEFT saves a modules_to_save copy under the module's own name
            for k, v in blk.gate.state_dict().items():
                tensors[f"{prefix}gate.{k}"] = v.detach().to("cpu", dtype or v.dtype).contiguous()
                router_numel += v.numel()
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_name or base_dir,
                  r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=False, use_dora=False, bias="none",
                  fan_in_fan_out=False, init_lora_weights=True, inference_mode=True, target_modules=[],
                  target_parameters=[f"mlp.experts.{name}" for name in params],
                  modules_to_save=["mlp.gate"] if router else None, rank_pattern={}, alpha_pattern={})
    os.makedirs(out_dir, exist_ok=True)
    hf.write_safetensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    itemsize = next(iter(tensors.values())).element_size()
    padded = sum(t.numel() for k, t in tensors.items() if ".lora_" in k)
    return dict(path=out_dir, r=r, lora_alpha=alpha, scale_folded_into_B=fold,
                target_parameters=config["target_parameters"], modules_to_save=config["modules_to_save"],
                params=padded, bytes=padded * itemsize,
                active_params=active, active_bytes=active * itemsize, router_params=router_numel)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base checkpoint: a folder or a name train.py knows (olmoe, ...)")
    p.add_argument("--adapter", required=True, help="adapter.safetensors written by train.py")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="merged Hugging Face folder to write (new or empty)")
    what.add_argument("--peft", help="PEFT adapter folder to write (new or empty)")
    p.add_argument("--vllm", action="store_true", help="with --peft: no modules_to_save (refuses a trained router)")
    p.add_argument("--fused", choices=["auto", "true", "false"], default="auto",
                   help="merged expert layout: auto = the base checkpoint's; true = gate_up_proj; false = per expert")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="weights written (auto: the base's)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that holds files")
    args = p.parse_args(argv)
    if args.vllm and not args.peft:
        p.error("--vllm goes with --peft (a merged --out folder is served by vLLM as it is)")
    refuse_nonempty(args.out or args.peft, args.overwrite)  # before the minutes a large base takes to load
    path = hf.find_checkpoint(args.base)
    model = hf.from_pretrained(path, dtype=torch.float32)
    cfg = hf.load_adapter(model, args.adapter)
    ranks = [blk.experts.lora.ranks.sum().item() for blk in model.moe_layers()]
    dtype = source_dtype(model.cfg) if args.dtype == "auto" else DTYPES[args.dtype]
    about = f"{args.adapter} ({cfg.method}, targets {','.join(cfg.targets)}, ranks per layer {ranks})"
    if args.peft:
        # what adapter_config.json names as its base: the folder given, or the repo id rather than a cache path
        name = os.path.abspath(path) if os.path.isdir(args.base) else hf.KNOWN_MODELS.get(args.base, args.base)
        info = export_peft(model, path, args.peft, vllm=args.vllm, overwrite=args.overwrite, base_name=name,
                           dtype=dtype)
        mib = 2 ** 20
        print(f"wrote {args.peft}: PEFT LoRA of {about} for {name}, r={info['r']} lora_alpha={info['lora_alpha']}"
              f"{' (scale folded into lora_B)' if info['scale_folded_into_B'] else ''}, "
              f"{str(dtype).removeprefix('torch.')}; modules_to_save {info['modules_to_save']}\n"
              f"  LoRA parameters padded to r: {info['params']:,} ({info['bytes'] / mib:.1f} MiB), active: "
              f"{info['active_params']:,} ({info['active_bytes'] / mib:.1f} MiB); router {info['router_params']:,}\n"
              f"  load with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({name!r}), {args.peft!r}) "
              f"(pip install peft)")
        return args.peft
    fused = source_is_fused(path) if args.fused == "auto" else args.fused == "true"
    export(model, path, args.out, fused=fused, dtype=dtype, overwrite=args.overwrite)
    print(f"merged {about} into {path}; "
          f"wrote {args.out} ({'fused' if fused else 'per-expert'} experts, {str(dtype).removeprefix('torch.')})")
    return args.out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
