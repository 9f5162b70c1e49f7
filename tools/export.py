"""
Export a DR-LoRA fine-tune as a plain Hugging Face checkpoint: every expert's active LoRA merged into
its weights (drlora.merge), so transformers, vLLM or anything else that reads the base model reads
the fine-tuned one, with no adapter code. (A PEFT adapter cannot express per-expert ranks on
transformers 5: see SPEC.md. The merged folder is the portable export; drlora.load_adapter applies
the small adapter file to the base again, for our own evaluation.)

    python export.py --base olmoe --adapter out/adapter.safetensors --out out/merged

The folder holds config.json and model.safetensors in the expert layout the base checkpoint used
(per-expert keys, or transformers 5's fused gate_up_proj), the tokenizer files copied from the base,
and generation_config.json with eos and pad ids. The command line merges in float32 (the base loaded
in fp32: about 4 bytes per parameter of host memory, 28 GB for OLMoE-1B-7B), then writes the base
checkpoint's dtype (--dtype to choose).
"""
import argparse
import json
import os
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


def source_is_fused(src_dir: str) -> bool:
    """Whether the checkpoint stores experts fused (transformers 5's gate_up_proj) or per expert."""
    index = os.path.join(src_dir, "model.safetensors.index.json")
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


def export(model, base_dir: str, out_dir: str, fused: bool | None = None, dtype: torch.dtype | None = None,
           overwrite: bool = False) -> str:
    """Merge the model's adapters INTO IT (they are removed) and write a Hugging Face folder, with the
    tokenizer files of base_dir, the checkpoint the model was loaded from.
    fused None: base_dir's expert layout; dtype None: the model's own.
    Refuses a folder that holds files unless overwrite (a stale shard index would win over ours)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty: choose a new folder (or overwrite=True / --overwrite)")
    drlora.merge(model)
    if dtype is not None:
        model.to(dtype)
    if fused is None:
        fused = source_is_fused(base_dir)
    for stale in ("model.safetensors.index.json",):  # sharded weights from an earlier export would be read first
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    hf.save_pretrained(model, out_dir, fused=fused)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base checkpoint: a folder or a name train.py knows (olmoe, ...)")
    p.add_argument("--adapter", required=True, help="adapter.safetensors written by train.py")
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--fused", choices=["auto", "true", "false"], default="auto",
                   help="expert layout: auto = the base checkpoint's; true = gate_up_proj; false = per expert")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="weights written (auto: the base's)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that holds files")
    args = p.parse_args(argv)
    path = hf.find_checkpoint(args.base)
    model = hf.from_pretrained(path, dtype=torch.float32)
    cfg = drlora.load_adapter(model, args.adapter)
    ranks = [blk.experts.lora.ranks.sum().item() for blk in model.moe_layers()]
    dtype = source_dtype(model.cfg) if args.dtype == "auto" else DTYPES[args.dtype]
    fused = source_is_fused(path) if args.fused == "auto" else args.fused == "true"
    export(model, path, args.out, fused=fused, dtype=dtype, overwrite=args.overwrite)
    print(f"merged {args.adapter} ({cfg.method}, targets {','.join(cfg.targets)}, ranks per layer {ranks}) into {path}; "
          f"wrote {args.out} ({'fused' if fused else 'per-expert'} experts, {str(dtype).removeprefix('torch.')})")
    return args.out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
