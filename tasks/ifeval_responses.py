"""IFEval responses: greedy answers of a base model (and optionally its DR-LoRA adapter) to the IFEval
prompts that tasks/tulu.py wrote to data/tulu/test_prompts.jsonl, saved as the {prompt, response}
JSON lines that IFEval's own scorer reads (google-research/instruction_following_eval, its
--input_response_data), then scored by lm-eval's ifeval checks where lm-eval is installed
(tasks/metrics.py's ifeval_scores, as train.py scores the task).

    python tasks/tulu.py --model olmoe                                   # makes data/tulu/
    python tasks/ifeval_responses.py --model olmoe --adapter out/adapter.safetensors --out responses.jsonl

The prompts were tokenized for one model: --model must use the same tokenizer (checked against
manifest.json). Generation stops at the model's eos or after --max_new_tokens.
"""
import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import hf  # noqa: E402
from data import common, pretrain  # noqa: E402
from tasks import metrics  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, a name train.py knows (olmoe, ...), or 'tiny'")
    p.add_argument("--adapter", help="a DR-LoRA adapter (train.py's adapter.safetensors) to apply to the model")
    p.add_argument("--data", default=str(common.DATA_DIR / "tulu"), help="the folder tasks/tulu.py wrote (default data/tulu)")
    p.add_argument("--out", required=True, help="the JSON lines file to write")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (cuda if there is one) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    prompts = Path(args.data) / "test_prompts.jsonl"
    if not prompts.exists():
        hint = common.maker(prompts)  # the folder's own command, if it is a tulu folder
        hint = hint if hint.startswith("python tasks/tulu.py") else "python tasks/tulu.py --model MODEL"
        raise FileNotFoundError(f"{prompts} not found; the IFEval prompts are written by `{hint}`")
    manifest = common.read_manifest(args.data)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model == "tiny":
        path = pretrain.BASE_DIR
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no tiny base model at {path}: make it with `python data/pretrain.py`")
    else:
        path = hf.find_checkpoint(args.model)
    model = hf.from_pretrained(path, dtype=dtype, device=device)
    tokenizer = hf.load_tokenizer(path, model.cfg)
    made_with = manifest.get("tokenizer")
    if made_with != tokenizer.name:
        raise ValueError(f"{Path(args.data) / 'manifest.json'}: the prompts were tokenized by {made_with!r}, the model "
                         f"{path} uses {tokenizer.name!r}; remake them for this model (`{common.maker(prompts)}`, "
                         f"with --model {args.model})")
    if args.adapter:
        if not os.path.exists(args.adapter):
            raise FileNotFoundError(f"--adapter {args.adapter} not found")
        hf.load_adapter(model, args.adapter)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    t0 = time.time()
    n = metrics.generate_responses(model, tokenizer, prompts, args.out, args.max_new_tokens, args.batch_size, autocast)
    print(f"{n} responses of {path}{' + ' + args.adapter if args.adapter else ''} -> {args.out} "
          f"({time.time() - t0:.0f} s)")
    try:
        rows = metrics.load_jsonl(prompts, metrics.IFEVAL_KEYS)
        scores, _ = metrics.ifeval_scores(rows, [r["response"] for r in metrics.load_jsonl(args.out)])
        print("; ".join(f"{metrics.IFEVAL_SCORES[k]} {v:.4f}" for k, v in scores.items()))
    except ImportError as e:
        print(f"not scored: {e}")
    return n


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as e:  # bad input: a clear message, no traceback
        sys.exit(f"error: {e}")
