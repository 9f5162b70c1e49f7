"""
Evaluation used by train.py. A sample of an SFT split is prompt + answer (the loss mask marks the
answer), so the same files serve the loss and the prompts; a prepared task's manifest names its
metric and evaluate_task() computes it:

- val_loss: mean cross-entropy per answer token.
- exact_match (GSM8K, arithmetic): greedy decoding through moe.py's KV cache, then the final number
  of output and reference (extract_number: the first '#### N', else the last 'The answer is N';
  "1,234", "-3", "$18.50", "7.0" read as exact rationals) compared for equality.
- multiple_choice (MedMCQA, LEDGAR): the log-likelihood of each option's answer tokens after the
  prompt, batched; accuracy by the sum (the usual "acc") and by the mean per token ("acc_norm").
- humaneval: pass@1 of greedy completions, by code_eval.py, which RUNS THE MODEL'S CODE.
- generate_responses: IFEval's {prompt, response} file, to score with IFEval's own code.
"""
import json
import os

import torch

from data import common, sorting

# --- answers


extract_number = common.extract_number  # the final number of a GSM8K-style answer (data/common.py)


def split_sample(ids, mask):
    """(prompt ids, answer ids) of one SFT sample: the answer starts at the first masked token."""
    start = int(mask.argmax())
    return ids[:start].tolist(), ids[start:].tolist()


# --- loss


@torch.no_grad()
def val_loss(model, dataset, block_size: int, pad_id: int, batch_size: int = 32, n: int | None = None, autocast=None):
    """Mean cross-entropy per answer token over the first n samples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = len(dataset) if n is None else min(n, len(dataset))
    device = model.lm_head.weight.device
    for i in range(0, n, batch_size):
        x, y, mask = common.sft_batch(dataset, range(i, min(i + batch_size, n)), block_size, pad_id)
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast or torch.autocast("cpu", enabled=False):
            loss = model(x, targets=y, attention_mask=mask).loss  # mean over this batch's answer tokens
        k = (y != common.IGNORE_INDEX).sum().item()
        total += loss.item() * k
        count += k
    model.train(was_training)
    return total / max(count, 1)


# --- generation


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64, autocast=None) -> list[str]:
    """Decoded greedy continuations of token prompts, stopped at eos."""
    was_training = model.training
    model.eval()
    texts = []
    for i in range(0, len(prompts), batch_size):
        with autocast or torch.autocast("cpu", enabled=False):
            outs = model.generate(prompts[i:i + batch_size], max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        texts += [tokenizer.decode(o) for o in outs]
    model.train(was_training)
    return texts


def exact_match(model, tokenizer, dataset, n: int | None = None, batch_size: int = 64, max_new_tokens: int = 24,
                autocast=None, examples: int = 0, extract=extract_number):
    """Greedy-decode each prompt, extract the final answer from the output and from the reference
    answer, count equal ones. Returns (accuracy, [(prompt, output, ok)] examples)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    pairs = [split_sample(*dataset[j]) for j in range(n)]
    outs = greedy(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, autocast)
    correct, shown = 0, []
    for (prompt, answer), text in zip(pairs, outs):
        target = extract(tokenizer.decode(answer))
        ok = target is not None and extract(text) == target
        correct += ok
        if len(shown) < examples:
            shown.append((tokenizer.decode(prompt), text, ok))
    return correct / max(n, 1), shown


# --- multiple choice


@torch.no_grad()
def option_logprobs(model, prompts: list[list[int]], options: list[list[list[int]]], batch_size: int = 16,
                    autocast=None) -> list[list[tuple[float, int]]]:
    """(sum of log p(option token | everything before it), number of option tokens) for every option
    of every prompt. One right-padded row per (prompt, option); a row longer than the model's
    positions loses the start of its prompt, never its option."""
    was_training = model.training
    model.eval()
    device, limit = model.lm_head.weight.device, model.cfg.max_seq_len
    rows = [(i, j) for i, opts in enumerate(options) for j in range(len(opts))]
    out = [[None] * len(opts) for opts in options]
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        seqs = [(prompts[i] + options[i][j])[-limit - 1:] for i, j in chunk]
        T = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), common.IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, ((i, j), s) in enumerate(zip(chunk, seqs)):
            n_opt = len(options[i][j])
            x[b, :len(s) - 1] = torch.tensor(s[:-1])
            mask[b, :len(s) - 1] = 1
            y[b, len(s) - 1 - n_opt:len(s) - 1] = torch.tensor(s[-n_opt:])  # targets: the option's tokens only
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast or torch.autocast("cpu", enabled=False):
            logits = model(x, attention_mask=mask).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]  # (B, T)
        sums, counts = (logp * (y != common.IGNORE_INDEX)).sum(1).tolist(), (y != common.IGNORE_INDEX).sum(1).tolist()
        for (i, j), s, c in zip(chunk, sums, counts):
            out[i][j] = (s, c)
    model.train(was_training)
    return out


def load_jsonl(path) -> list[dict]:
    """A task's side file (test_choices.jsonl, ...): bad lines raise with the file and line number."""
    return list(common.read_jsonl(path))


def multiple_choice(model, dataset, choices: list[dict], n: int | None = None, batch_size: int = 16, autocast=None) -> dict:
    """Accuracy over the first n test samples; choices[i] = {"choices": [answer ids, ...], "label": k}
    (test_choices.jsonl). Ties go to the lower option."""
    n = len(dataset) if n is None else min(n, len(dataset))
    if len(choices) != len(dataset):
        raise ValueError(f"{len(choices)} choice sets for {len(dataset)} test samples: remake the task's data")
    prompts = []
    for i in range(n):
        prompt, answer = split_sample(*dataset[i])
        if choices[i]["choices"][choices[i]["label"]] != answer:
            raise ValueError(f"test sample {i}: its answer is not its labelled choice: remake the task's data")
        prompts.append(prompt)
    scores = option_logprobs(model, prompts, [c["choices"] for c in choices[:n]], batch_size, autocast)
    best = lambda values: max(range(len(values)), key=lambda j: (values[j], -j))  # noqa: E731
    acc = sum(best([s for s, _ in sc]) == c["label"] for sc, c in zip(scores, choices))
    acc_norm = sum(best([s / t for s, t in sc]) == c["label"] for sc, c in zip(scores, choices))
    return {"accuracy": acc / max(n, 1), "accuracy_norm": acc_norm / max(n, 1), "n": n}


# --- HumanEval and IFEval


def humaneval(model, tokenizer, dataset, problems: list[dict], n: int | None = None, max_new_tokens: int = 512,
              batch_size: int = 16, autocast=None, timeout: float = 10.0, examples: int = 0):
    """pass@1 of greedy completions of the first n problems (test_problems.jsonl, in test.npz's order).
    RUNS MODEL-WRITTEN CODE: see code_eval.py. Returns (pass@1, [(task_id, completion, passed)])."""
    from tasks import code_eval

    n = len(dataset) if n is None else min(n, len(dataset))
    if len(problems) != len(dataset):
        raise ValueError(f"{len(problems)} problems for {len(dataset)} test samples: remake the task's data")
    prompts = [split_sample(*dataset[i])[0] for i in range(n)]
    completions = greedy(model, tokenizer, prompts, max_new_tokens, batch_size, autocast)
    results = code_eval.check(problems[:n], completions, timeout)
    shown = [(p["task_id"], c, r == "passed") for p, c, r in zip(problems, completions, results)][:examples]
    return sum(r == "passed" for r in results) / max(n, 1), shown


def generate_responses(model, tokenizer, prompts_file, out_file, max_new_tokens: int = 1024, batch_size: int = 16,
                       autocast=None) -> int:
    """Greedy responses to test_prompts.jsonl (IFEval), written as the {prompt, response} lines that
    IFEval's scorer reads (--input_response_data). Returns how many."""
    rows = load_jsonl(prompts_file)
    texts = greedy(model, tokenizer, [r["prompt_ids"] for r in rows], max_new_tokens, batch_size, autocast)
    with open(out_file, "w") as f:
        for r, t in zip(rows, texts):
            f.write(json.dumps({"prompt": r["prompt"], "response": t}, ensure_ascii=False) + "\n")
    return len(rows)


# --- the task's own metric


EXTRACTORS = {"sorting": sorting.extract_answer}  # generated tasks whose answers are not numbers


def evaluate_task(model, tokenizer, folder, test_set, n: int | None = None, max_new_tokens: int = 24, autocast=None,
                  examples: int = 0) -> tuple[dict, list]:
    """The metric the task's manifest names (exact match when it names none, as the generated tasks):
    ({"metric": name, "score": headline number or nan, ...details}, [(prompt or task id, output, ok)])."""
    metric = test_set.manifest.get("metric", "exact_match")
    if metric == "exact_match":
        extract = EXTRACTORS.get(os.path.basename(os.path.normpath(folder)), extract_number)
        acc, shown = exact_match(model, tokenizer, test_set, n, max_new_tokens=max_new_tokens, autocast=autocast,
                                 examples=examples, extract=extract)
        return {"metric": "accuracy", "score": acc}, shown
    if metric == "multiple_choice":
        r = multiple_choice(model, test_set, load_jsonl(os.path.join(folder, "test_choices.jsonl")), n, autocast=autocast)
        return {"metric": "accuracy", "score": r["accuracy"], "accuracy_norm": r["accuracy_norm"]}, []
    if metric == "humaneval":
        problems = load_jsonl(os.path.join(folder, "test_problems.jsonl"))
        score, shown = humaneval(model, tokenizer, test_set, problems, n, max_new_tokens, autocast=autocast, examples=examples)
        return {"metric": "pass@1", "score": score}, shown
    if metric == "none":
        return {"metric": "none", "score": float("nan")}, []
    raise ValueError(f"{folder}/manifest.json: unknown metric {metric!r}")
