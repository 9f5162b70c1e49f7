"""
Evaluation used by train.py: held-out loss over answer tokens, and GSM8K-style exact match
by batched greedy decoding through moe.py's KV cache. A sample of an SFT split is
prompt + answer (the loss mask marks the answer), so the same files serve both.
"""
import torch

from data import common
from data.arithmetic import extract_answer


def split_sample(ids, mask):
    """(prompt ids, answer ids) of one SFT sample: the answer starts at the first masked token."""
    start = int(mask.argmax())
    return ids[:start].tolist(), ids[start:].tolist()


@torch.no_grad()
def val_loss(model, dataset, block_size: int, pad_id: int, batch_size: int = 32, n: int | None = None, autocast=None):
    """Mean cross-entropy per answer token over the first n samples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = len(dataset) if n is None else min(n, len(dataset))
    for i in range(0, n, batch_size):
        x, y, mask = common.sft_batch(dataset, range(i, min(i + batch_size, n)), block_size, pad_id)
        x, y, mask = x.to(model.lm_head.weight.device), y.to(model.lm_head.weight.device), mask.to(model.lm_head.weight.device)
        with autocast or torch.autocast("cpu", enabled=False):
            logits = model(x, attention_mask=mask).logits
        k = (y != -100).sum().item()
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                                   reduction="sum").item()
        count += k
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, tokenizer, dataset, n: int | None = None, batch_size: int = 64, max_new_tokens: int = 24,
                autocast=None, examples: int = 0):
    """Greedy-decode each prompt, extract '#### N' (or 'The answer is N') from the output and from
    the reference answer, and count equal ones. Returns (accuracy, [(prompt, output, ok)] examples)."""
    was_training = model.training
    model.eval()
    n = len(dataset) if n is None else min(n, len(dataset))
    correct, shown = 0, []
    for i in range(0, n, batch_size):
        pairs = [split_sample(*dataset[j]) for j in range(i, min(i + batch_size, n))]
        with autocast or torch.autocast("cpu", enabled=False):
            outs = model.generate([p for p, _ in pairs], max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for (prompt, answer), out in zip(pairs, outs):
            text = tokenizer.decode(out)
            target = extract_answer(tokenizer.decode(answer))
            ok = target is not None and extract_answer(text) == target
            correct += ok
            if len(shown) < examples:
                shown.append((tokenizer.decode(prompt), text, ok))
    model.train(was_training)
    return correct / max(n, 1), shown
