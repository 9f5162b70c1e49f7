"""Score a saved adapter (train.py's adapter.safetensors, which carries its DR-LoRA settings and ranks) on
its base model: the held-out loss and the task's metric, as train.py's evaluations print them.

    python tools/evaluate.py --adapter out/adapter.safetensors                 # the embedded run's adapter
    python tools/evaluate.py --model olmoe --task gsm8k --adapter runs/gsm8k/adapter.safetensors
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evals  # noqa: E402
import hf  # noqa: E402
from data import common  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter.safetensors written by train.py")
    p.add_argument("--model", default="tiny", help="the base it was trained on: tiny | a known name | a folder")
    p.add_argument("--task", default="arithmetic", help="data/<task>/ or a prepared folder")
    p.add_argument("--split", default="test", choices=("val", "test"), help="the split the metric reads")
    p.add_argument("--n", type=int, default=500, help="samples for the loss and for the metric")
    p.add_argument("--block_size", type=int, default=2048, help="longest sample in tokens")
    p.add_argument("--max_new_tokens", type=int, default=512, help="generation length for the metric")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.model == "tiny":
        from data import pretrain

        path = pretrain.BASE_DIR
    else:
        path = hf.find_checkpoint(args.model)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = hf.from_pretrained(path, dtype=dtype, device=args.device)
    tokenizer = hf.load_tokenizer(path, model.cfg)
    hf.load_adapter(model, args.adapter)
    task = common.load_task(common.task_folder(args.task), tokenizer, args.split)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    return evals.evaluate(f"adapter {args.adapter}", model, tokenizer, task, args.n, args.block_size,
                          args.max_new_tokens, autocast, examples=3)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        raise SystemExit(f"error: {e}")
