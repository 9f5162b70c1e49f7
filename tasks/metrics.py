"""The real tasks' metrics, beyond evals.py's exact match. A prepared task's manifest.json names its
metric and this module as its "evaluator"; evals.evaluate_task imports the module by that name and
calls evaluate(), so the core never imports the harness.

- multiple_choice (MedMCQA, LEDGAR): the log-likelihood of each option's answer tokens after the
  prompt, batched; accuracy by the sum (the usual "acc") and by the mean per token ("acc_norm").
- humaneval: pass@1 of greedy completions, by code_eval.py, which RUNS THE MODEL'S CODE.
- test_loss (WMT, the Tulu mix): mean cross-entropy per answer token of test.npz, through the
  model's own loss (evals.val_loss); lower is better. No BLEU: that would need sacrebleu.
- generate_responses: IFEval's {prompt, response} file, to score with IFEval's own code
  (tasks/ifeval_responses.py writes it).
"""
import json
import os

import torch

import evals
from data import common
from tasks import prepare


def load_jsonl(path) -> list[dict]:
    """A task's side file (test_choices.jsonl, ...): bad lines raise with the file and line number."""
    return list(prepare.read_jsonl(path))


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


def multiple_choice(model, dataset, choices: list[dict], n: int | None = None, batch_size: int = 16,
                    autocast=None) -> dict:
    """Accuracy over the first n test samples; choices[i] = {"choices": [answer ids, ...], "label": k}
    (test_choices.jsonl). Ties go to the lower option."""
    n = len(dataset) if n is None else min(n, len(dataset))
    if len(choices) != len(dataset):
        raise ValueError(f"{len(choices)} choice sets for {len(dataset)} test samples: remake the task's data")
    prompts = []
    for i in range(n):
        prompt, answer = evals.split_sample(*dataset[i])
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
    prompts = [evals.split_sample(*dataset[i])[0] for i in range(n)]
    completions = evals.greedy(model, tokenizer, prompts, max_new_tokens, batch_size, autocast)
    results = code_eval.check(problems[:n], completions, timeout)
    shown = [(p["task_id"], c, r == "passed") for p, c, r in zip(problems, completions, results)][:examples]
    return sum(r == "passed" for r in results) / max(n, 1), shown


def generate_responses(model, tokenizer, prompts_file, out_file, max_new_tokens: int = 1024, batch_size: int = 16,
                       autocast=None) -> int:
    """Greedy responses to test_prompts.jsonl (IFEval), written as the {prompt, response} lines that
    IFEval's scorer reads (--input_response_data). Returns how many."""
    rows = list(prepare.read_jsonl(prompts_file, ("prompt", "prompt_ids")))
    texts = evals.greedy(model, tokenizer, [r["prompt_ids"] for r in rows], max_new_tokens, batch_size, autocast)
    tmp = str(out_file) + ".tmp"
    with open(tmp, "w") as f:
        for r, t in zip(rows, texts):
            f.write(json.dumps({"prompt": r["prompt"], "response": t}, ensure_ascii=False) + "\n")
    os.replace(tmp, out_file)  # a killed run leaves no half file for the scorer
    return len(rows)


# --- held-out loss


def held_out_loss(model, tokenizer, dataset, max_len: int, n: int | None = None, autocast=None) -> float:
    """Mean cross-entropy per answer token of the first n test samples, cut at the block the task
    was prepared for (--max_len, train.py's block_size) and at the model's positions."""
    return evals.val_loss(model, dataset, min(max_len, model.cfg.max_seq_len), tokenizer.pad_id, n=n, autocast=autocast)


# --- what evals.evaluate_task calls


def evaluate(metric: str, model, tokenizer, folder, test_set, n: int | None = None, max_new_tokens: int = 24,
             autocast=None, examples: int = 0) -> tuple[dict, list]:
    """({"metric": name, "score": headline number, "higher_is_better": bool, ...details}, [(prompt or
    task id, output, ok)]) for the metric a prepared task's manifest names."""
    if metric == "multiple_choice":
        choices = load_jsonl(os.path.join(folder, "test_choices.jsonl"))
        r = multiple_choice(model, test_set, choices, n, autocast=autocast)
        return {"metric": "accuracy", "score": r["accuracy"], "higher_is_better": True,
                "accuracy_norm": r["accuracy_norm"]}, []
    if metric == "humaneval":
        problems = load_jsonl(os.path.join(folder, "test_problems.jsonl"))
        score, shown = humaneval(model, tokenizer, test_set, problems, n, max_new_tokens, autocast=autocast,
                                 examples=examples)
        return {"metric": "pass@1", "score": score, "higher_is_better": True}, shown
    if metric == "test_loss":
        max_len = common.manifest_get(test_set.manifest, "max_len", folder)
        return {"metric": "test_loss", "score": held_out_loss(model, tokenizer, test_set, max_len, n, autocast),
                "higher_is_better": False}, []
    raise ValueError(f"{os.path.join(folder, 'manifest.json')}: unknown metric {metric!r} (tasks.metrics knows "
                     f"multiple_choice, humaneval and test_loss)")
