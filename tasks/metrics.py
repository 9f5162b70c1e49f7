"""The real tasks' metrics, beyond evals.py's exact match. A prepared task's manifest.json names its
metric and this module as its "evaluator"; evals.evaluate_task imports the module by that name and
calls evaluate(), which returns {"metric": headline name, "score": its value, "higher_is_better",
...the other numbers}: train.py prints the first two and result.json keeps them all.

- gsm8k: greedy answers, cut where lm-eval's generation stops, read by lm-eval's gsm8k filters:
  strict-match (the number after '####', else after 'The answer is') and flexible-extract (the last
  number); headline "accuracy (K-shot, flexible-extract)", K from the manifest (tasks/gsm8k.py --shots).
- multiple_choice (MedMCQA, LEDGAR): the log-likelihood of each option's answer tokens after the
  prompt, batched; headline "accuracy (0-shot)" by the sum (the usual "acc"), and "accuracy_norm" by
  the mean per token ("acc_norm").
- humaneval: "pass@1" of greedy completions, by code_eval.py, which RUNS THE MODEL'S CODE.
- translation (WMT): greedy translations (up to the first line break) scored per language pair by
  sacrebleu's chrF and BLEU, and by COMET (Unbabel/wmt22-comet-da) where unbabel-comet is installed
  and its model loads (it downloads it on first use; offline a warning says so and chrF stands);
  headline "COMET (Unbabel/wmt22-comet-da)", else "chrF": the mean over the pairs.
- ifeval (the Tulu mix): greedy responses to IFEval's prompts, 0-shot, checked by lm-eval's ifeval
  task code (pip install "lm-eval[ifeval]"): headline "prompt-level strict accuracy", then the
  instruction-level and loose ones under lm-eval's names, and the mix's held-out loss. lm-eval's,
  not google's instruction_following_eval: the same checks (lm-eval's are a port of google's), but an
  installable package, and the paper scores IFEval through lm-eval.
- test_loss (the Tulu mix with --metric test_loss): mean cross-entropy per answer token of test.npz,
  through the model's own loss (evals.val_loss); lower is better.
- generate_responses: IFEval's {prompt, response} file (tasks/ifeval_responses.py writes it).
"""
import json
import os
import re
import warnings
from fractions import Fraction

import torch

import evals
from data import common
from tasks import prepare


def load_jsonl(path, required_keys=()) -> list[dict]:
    """A task's side file (test_choices.jsonl, ...): bad lines raise with the file and line number."""
    return list(prepare.read_jsonl(path, required_keys))


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


# --- GSM8K: lm-eval's gsm8k answer filters


GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")  # lm-eval gsm8k's `until`: where its generation stops
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval gsm8k's flexible-extract
IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")  # lm-eval gsm8k's exact_match regexes_to_ignore


def cut(text: str, stops=GSM8K_STOP) -> str:
    """The text before the first stop string: what lm-eval's generation, which stops there, returns."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def flexible_extract(text: str) -> str | None:
    """lm-eval's flexible-extract: the last match of its pattern (a run of 2+ of `$0-9.,`, else an
    integer), None where there is none."""
    found = FLEXIBLE.findall(text)
    return next(g for g in found[-1] if g).strip() if found else None


def as_number(answer: str) -> Fraction | str:
    """An extracted answer as lm-eval compares it (commas, '$', a trailing '.' removed, lower case),
    then as an exact Fraction where it reads as one: '18.00' equals '18', which lm-eval's string
    comparison does not count."""
    for pattern in IGNORED:
        answer = re.sub(pattern, "", answer)
    try:
        return Fraction(answer.lower())
    except (ValueError, ZeroDivisionError):
        return answer.lower()


def gsm8k_verdicts(output: str, reference: Fraction) -> tuple[bool, bool]:
    """(strict-match, flexible-extract) of one output, cut at lm-eval's stop strings. Strict: the
    number after the first '####', else after the last 'The answer is' (common.extract_number: the
    GSM8K format, and that of the 8-shot exemplars and MetaMathQA; lm-eval's gsm8k and gsm8k-cot
    strict-match read one each)."""
    text = cut(output)
    flexible = flexible_extract(text)
    return common.extract_number(text) == reference, flexible is not None and as_number(flexible) == reference


def gsm8k(model, tokenizer, dataset, n: int | None = None, max_new_tokens: int = 512, batch_size: int = 16,
          autocast=None, examples: int = 0) -> tuple[dict, list]:
    """Strict and flexible accuracy of greedy answers to the first n test prompts (with their
    exemplars, if the task was prepared with --shots). Returns ({"strict-match", "flexible-extract",
    "n"}, [(prompt, output, flexible ok)])."""
    n = len(dataset) if n is None else min(n, len(dataset))
    pairs = [evals.split_sample(*dataset[i]) for i in range(n)]
    outputs = evals.greedy(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, autocast)
    strict = flexible = 0
    shown = []
    for i, ((prompt, answer), output) in enumerate(zip(pairs, outputs)):
        reference = common.extract_number(tokenizer.decode(answer))
        if reference is None:
            raise ValueError(f"test sample {i}: its reference has no final number: remake the task's data")
        s, f = gsm8k_verdicts(output, reference)
        strict, flexible = strict + s, flexible + f
        if len(shown) < examples:
            shown.append((tokenizer.decode(prompt), output, f))
    return {"strict-match": strict / max(n, 1), "flexible-extract": flexible / max(n, 1), "n": n}, shown


# --- translation (WMT): sacrebleu's chrF and BLEU, COMET where it can be had


COMET_MODEL = "Unbabel/wmt22-comet-da"
_comet_models = {}  # name -> the loaded model, or the error that loading it raised (not retried each eval)


class CometUnavailable(RuntimeError):
    """COMET's model could not be loaded: the translation scores go on without it."""


def hypothesis(output: str, source: str) -> str:
    """The translation in a greedy output: stripped, and cut at its first line break where the source
    has none (lm-eval's WMT tasks stop generating at '\n'; a model may go on with another turn)."""
    text = output.strip()
    return text if "\n" in source else text.split("\n")[0].strip()


def chrf_bleu(rows: list[dict], hypotheses: list[str]) -> dict:
    """sacrebleu's corpus chrF and BLEU for each language pair of rows ({lp, src, ref}), BLEU with the
    target language's tokenizer (zh: 'zh'), and their means over the pairs."""
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError as e:
        raise ImportError("scoring translations needs sacrebleu: pip install sacrebleu") from e
    out, by_pair = {}, {}
    for row, hyp in zip(rows, hypotheses):
        by_pair.setdefault(row["lp"], []).append((hyp, row["ref"]))
    for lp, pairs in by_pair.items():
        hyps, refs = [h for h, _ in pairs], [[r for _, r in pairs]]
        out[f"chrF {lp}"] = CHRF().corpus_score(hyps, refs).score
        out[f"BLEU {lp}"] = BLEU(trg_lang=lp.split("-")[1]).corpus_score(hyps, refs).score
        out[f"n {lp}"] = len(pairs)
    for name in ("chrF", "BLEU"):
        out[name] = sum(out[f"{name} {lp}"] for lp in by_pair) / len(by_pair)
    return out


def comet_model(name: str = COMET_MODEL):
    """unbabel-comet's model, downloaded on first use and kept; raises ImportError or CometUnavailable."""
    if name not in _comet_models:
        try:
            from comet import download_model, load_from_checkpoint
        except ImportError as e:
            raise ImportError("COMET needs unbabel-comet: pip install unbabel-comet") from e
        try:
            _comet_models[name] = load_from_checkpoint(download_model(name))
        except Exception as e:  # offline, no disk, a changed hub: whatever it is, the other scores stand
            first = (str(e).strip().splitlines() or [""])[0][:300]
            _comet_models[name] = CometUnavailable(
                f"COMET's model {name} could not be loaded ({type(e).__name__}: {first}); it is downloaded on "
                f"first use, which needs the network")
    if isinstance(_comet_models[name], Exception):
        raise _comet_models[name]
    return _comet_models[name]


def comet_scores(rows: list[dict], hypotheses: list[str], batch_size: int = 16) -> dict:
    """COMET's mean segment score for each language pair and their mean over the pairs."""
    model = comet_model()
    samples = [{"src": r["src"], "mt": h, "ref": r["ref"]} for r, h in zip(rows, hypotheses)]
    scores = list(model.predict(samples, batch_size=batch_size, gpus=int(torch.cuda.is_available()),
                                progress_bar=False).scores)
    if len(scores) != len(rows):
        raise RuntimeError(f"COMET returned {len(scores)} scores for {len(rows)} translations")
    out, by_pair = {}, {}
    for r, x in zip(rows, scores):
        by_pair.setdefault(r["lp"], []).append(x)
    for lp, xs in by_pair.items():
        out[f"COMET {lp}"] = sum(xs) / len(xs)
    out["COMET"] = sum(out[f"COMET {lp}"] for lp in by_pair) / len(by_pair)
    return out


def translation(model, tokenizer, dataset, rows: list[dict], n: int | None = None, max_new_tokens: int = 512,
                batch_size: int = 16, autocast=None, examples: int = 0) -> tuple[dict, list]:
    """Greedy translations of the first n test samples (test_translations.jsonl, in test.npz's order)
    scored against their references: chrF, BLEU and, where it can be had, COMET, each per pair and
    as a mean over the pairs. Without COMET a warning says why, and so does "COMET_error".
    Returns (scores, [(source, translation, identical to the reference)])."""
    n = len(dataset) if n is None else min(n, len(dataset))
    if len(rows) != len(dataset):
        raise ValueError(f"{len(rows)} translations for {len(dataset)} test samples: remake the task's data")
    rows = rows[:n]
    prompts = [evals.split_sample(*dataset[i])[0] for i in range(n)]
    outputs = evals.greedy(model, tokenizer, prompts, max_new_tokens, batch_size, autocast)
    hyps = [hypothesis(o, r["src"]) for o, r in zip(outputs, rows)]
    scores = {**chrf_bleu(rows, hyps), "n": n}
    try:
        scores.update(comet_scores(rows, hyps))
    except (ImportError, CometUnavailable) as e:
        warnings.warn(f"WMT: no COMET score ({e}); the headline is chrF")
        scores["COMET_error"] = str(e)
    return scores, [(r["src"], h, h == r["ref"]) for r, h in zip(rows, hyps)][:examples]


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


IFEVAL_KEYS = ("prompt", "prompt_ids", "instruction_id_list", "kwargs")  # test_prompts.jsonl, by tasks/tulu.py
IFEVAL_SCORES = {"prompt_level_strict_acc": "prompt-level strict accuracy",  # lm-eval's names: ours
                 "inst_level_strict_acc": "instruction-level strict accuracy",
                 "prompt_level_loose_acc": "prompt-level loose accuracy",
                 "inst_level_loose_acc": "instruction-level loose accuracy"}


def ifeval_scorer():
    """lm-eval's ifeval task code (the module with process_results and agg_inst_level_acc)."""
    try:
        from lm_eval.tasks.ifeval import utils
    except ImportError as e:
        raise ImportError(f"scoring IFEval uses lm-eval's ifeval task code: pip install 'lm-eval[ifeval]' (or "
                          f"remake the Tulu task with --metric test_loss) ({type(e).__name__}: {e})") from e
    return utils


def ifeval_scores(rows: list[dict], responses: list[str]) -> tuple[dict, list[bool]]:
    """IFEval's four accuracies of responses to rows ({key, prompt, instruction_id_list, kwargs}),
    by lm-eval's process_results (each instruction checked strictly, then loosely: also with the
    first or last line or the '*'s removed) and its aggregation (prompt level: all of a prompt's
    instructions followed; instruction level: over every instruction of every prompt). Returns
    ({lm-eval's four names: accuracy}, [prompt-level strict, for each row])."""
    utils = ifeval_scorer()
    results = []
    for row, response in zip(rows, responses):
        doc = {"key": row.get("key"), "prompt": row["prompt"],
               "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]}
        try:
            results.append(utils.process_results(doc, [response]))
        except LookupError as e:  # nltk's data: lm-eval downloads it when first imported, if it can
            raise LookupError(f"IFEval prompt {row.get('key')} ({', '.join(row['instruction_id_list'])}) needs "
                              f"nltk data that is not on this machine: python -c \"import nltk; "
                              f"nltk.download('punkt_tab')\" (the network is needed once)") from e
    scores = {}
    for name in IFEVAL_SCORES:
        flags = [r[name] for r in results]
        scores[name] = (utils.agg_inst_level_acc(flags) if name.startswith("inst") else
                        sum(map(bool, flags)) / max(len(flags), 1))
    return scores, [bool(r["prompt_level_strict_acc"]) for r in results]


def ifeval(model, tokenizer, rows: list[dict], n: int | None = None, max_new_tokens: int = 1280,
           batch_size: int = 16, autocast=None, examples: int = 0) -> tuple[dict, list]:
    """Greedy responses to the first n IFEval prompts (test_prompts.jsonl), 0-shot, scored by
    ifeval_scores. Returns (scores, [(prompt, response, prompt-level strict)])."""
    ifeval_scorer()  # missing: say so before the generation, not after
    rows = rows[:len(rows) if n is None else n]
    prompts = [r["prompt_ids"] for r in rows]
    responses = evals.greedy(model, tokenizer, prompts, max_new_tokens, batch_size, autocast)
    scores, followed = ifeval_scores(rows, responses)
    return {**scores, "n": len(rows)}, list(zip([r["prompt"] for r in rows], responses, followed))[:examples]


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
        return {"metric": "accuracy (0-shot)", "score": r["accuracy"], "higher_is_better": True,
                "accuracy_norm": r["accuracy_norm"], "n": r["n"]}, []
    if metric == "gsm8k":
        r, shown = gsm8k(model, tokenizer, test_set, n, max_new_tokens, autocast=autocast, examples=examples)
        shots = test_set.manifest.get("shots", 0)
        return {"metric": f"accuracy ({shots}-shot, flexible-extract)", "score": r["flexible-extract"],
                "higher_is_better": True, **r}, shown
    if metric == "humaneval":
        problems = load_jsonl(os.path.join(folder, "test_problems.jsonl"))
        score, shown = humaneval(model, tokenizer, test_set, problems, n, max_new_tokens, autocast=autocast,
                                 examples=examples)
        return {"metric": "pass@1", "score": score, "higher_is_better": True}, shown
    if metric == "translation":
        rows = load_jsonl(os.path.join(folder, "test_translations.jsonl"), ("lp", "src", "ref"))
        r, shown = translation(model, tokenizer, test_set, rows, n, max_new_tokens, autocast=autocast,
                               examples=examples)
        name, headline = (f"COMET ({COMET_MODEL})", "COMET") if "COMET" in r else ("chrF", "chrF")
        return {"metric": name, "score": r[headline], "higher_is_better": True, **r}, shown
    if metric == "ifeval":
        path = os.path.join(folder, "test_prompts.jsonl")
        try:
            rows = load_jsonl(path, IFEVAL_KEYS)
        except ValueError as e:
            raise ValueError(f"{e}; remake it with `{common.maker(path)}`") from e
        r, shown = ifeval(model, tokenizer, rows, n, max_new_tokens, autocast=autocast, examples=examples)
        max_len = common.manifest_get(test_set.manifest, "max_len", folder)
        r["test_loss"] = held_out_loss(model, tokenizer, test_set, max_len, n, autocast)  # the mix's slice
        return {"metric": IFEVAL_SCORES["prompt_level_strict_acc"], "score": r["prompt_level_strict_acc"],
                "higher_is_better": True, **r}, shown
    if metric == "test_loss":
        max_len = common.manifest_get(test_set.manifest, "max_len", folder)
        return {"metric": "test_loss", "score": held_out_loss(model, tokenizer, test_set, max_len, n, autocast),
                "higher_is_better": False}, []
    raise ValueError(f"{os.path.join(folder, 'manifest.json')}: unknown metric {metric!r} (tasks.metrics knows "
                     f"gsm8k, multiple_choice, humaneval, translation, ifeval and test_loss)")
