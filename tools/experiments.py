"""
Does DR-LoRA beat uniform LoRA at the same budget? The paper's comparison and ablations on
the embedded task, over several seeds, printed as a markdown table whatever it shows.

    python tools/experiments.py                  # 8 rows x 3 seeds, the default's recipe
    python tools/experiments.py --quick          # 8 rows x 1 seed, a sixth of the steps: checks the pipeline
    python tools/experiments.py --task sorting --rows main   # the second embedded task, without the ablations
    python tools/experiments.py --sweep          # uniform LoRA at ranks 4, 8, 16 on val: how the budget was picked

Runs are one-thread train.py processes, two at a time; a missing tiny base is pretrained first, with one thread
(RESULTS.md has the times). Rerunning skips the rows whose result.json exists.

Settings were fixed before any row was run (stated in the printed header): every row uses
the same base model, data, steps, batch, learning rate and schedule; only the method's
switches differ. The budget (r_target) was picked from a uniform-LoRA rank sweep on the
validation split, not from DR-LoRA's results; no setting was tuned on the test split.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)
import train  # noqa: E402
from data import common  # noqa: E402


ROWS = {  # name -> its train.py flags, on top of settings() (the base model is the eighth row)
    "LoRA r=r_target": ["--method", "lora", "--r_max", "{r_target}"],  # allocated at r_target, as a user would
    "LoRA r=r_max": ["--method", "lora", "--r_target", "{r_max}", "--r_max", "{r_max}"],
    "DR-LoRA": [],
    "DR-LoRA saliency=f": ["--saliency", "f"],
    "DR-LoRA saliency=g": ["--saliency", "g"],
    "DR-LoRA freeze_router": ["--freeze_router", "true"],
    "DR-LoRA allocation=global": ["--allocation", "global"],
}


MAIN = ["LoRA r=r_target", "LoRA r=r_max", "DR-LoRA"]
SWEEP = {f"LoRA r={r}": ["--method", "lora", "--r_target", str(r), "--r_max", str(r), "--eval_split", "val"]
         for r in (4, 8, 16)}


def settings(quick: bool) -> dict:
    """The embedded default's recipe (train.PRESETS["tiny"]); quick: a sixth of the steps, a fifth of the
    problems (too short to learn the task: it checks that every row runs and the table is made)."""
    tiny = train.PRESETS["tiny"]
    s = {k: tiny[k] for k in ("r_init", "r_target", "r_max", "dT", "steps", "batch_size", "lr", "eval_samples")}
    if quick:
        s.update(steps=s["steps"] // 6, dT=s["dT"] // 4, eval_samples=s["eval_samples"] // 5)
    return s


def row_argv(extra, s, seed, out, first) -> list[str]:
    """train.py's flags for one row: the shared settings s, then the row's own."""
    argv = ["--out_dir", out, "--seed", str(seed), "--log_interval", "1000", "--eval_base", str(first),
            "--eval_interval", "100000", "--ckpt_interval", "100000"]
    return argv + [f"--{k}={v}" for k, v in s.items()] + [a.format(**s) for a in extra]


def run_row(name, extra, s, seed, out_root, first):
    """Start one training run (a train.py process, one thread) unless its result already exists."""
    out = os.path.join(out_root, name.replace(" ", "_").replace("=", "-") + f"_seed{seed}")
    if os.path.exists(os.path.join(out, "result.json")):  # finished earlier: rerunning resumes the table
        return out, None
    argv = row_argv(extra, s, seed, out, first)
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "log.txt"), "w")
    # tiny models run faster on one thread each, two runs side by side on 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return out, subprocess.Popen([sys.executable, "train.py", *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def result_of(out):
    with open(os.path.join(out, "result.json")) as f:
        run = json.load(f)
    r = run["result"]
    # DR-LoRA allocates every slot up to r_max and trains the active ones; uniform LoRA needs only its rank
    # (train.py's lora method keeps r_max slots too, for one code path, but never touches the inactive ones)
    per_rank = r["active_lora_params"] / sum(map(sum, r["ranks"]))
    lora = run["config"]["lora"]
    slots = lora["r_max"] if lora["method"] == "drlora" else lora["r_target"]
    return {**r, "allocated_lora_params": round(per_rank * len(r["ranks"]) * len(r["ranks"][0]) * slots)}


def rank_vs_frequency(out):
    """Per layer, the Pearson correlation of a DR-LoRA run's final ranks with its routing frequency f
    (both in its result.json). Returns (correlations, ranks, f)."""
    r = result_of(out)
    ranks, f = torch.tensor(r["ranks"]).float(), torch.tensor(r["f"])
    return [torch.corrcoef(torch.stack([x, y]))[0, 1].item() for x, y in zip(ranks, f)], r["ranks"], f


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--out", default="out/experiments")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--sweep", action="store_true", help="uniform LoRA at ranks 4, 8, 16 on val (picks the budget)")
    p.add_argument("--task", default="arithmetic", help="arithmetic | sorting (the embedded tasks) | a task folder")
    p.add_argument("--rows", default="all", help="all | main (the two LoRA rows and DR-LoRA, no ablations)")
    a = p.parse_args()
    s = settings(a.quick)
    seeds = list(range(a.seeds or (1 if a.quick else 3)))
    s["task"] = a.task
    t0 = time.time()
    # made once, before any row, so that two runs never make the same file at once
    common.task_folder(a.task, make=True)
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", "from data import pretrain; pretrain.ensure_tiny_base()"],
                   env=one_thread, cwd=ROOT, check=True)
    print(f"[{time.time() - t0:.0f}s] tiny base ready")
    out_root = a.out + ("_quick" if a.quick else "") + ("_sweep" if a.sweep else "") + \
        ("" if a.task == "arithmetic" else "_" + os.path.basename(a.task.rstrip("/")))
    print(f"settings for every row: {s}; seeds {seeds}")
    rows = SWEEP if a.sweep else ROWS if a.rows == "all" else {k: ROWS[k] for k in MAIN}
    jobs = [(name, seed) for name in rows for seed in seeds]
    running, outs = [], {}
    while jobs or running:
        while jobs and len(running) < a.parallel:
            name, seed = jobs.pop(0)
            out, proc = run_row(name, rows[name], s, seed, out_root, first=not outs)
            outs[name, seed] = out
            if proc is not None:
                running.append((name, seed, proc))
        time.sleep(1)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            name, seed, proc = job
            if proc.returncode != 0:
                raise RuntimeError(f"{name} seed {seed} failed: see {outs[name, seed]}/log.txt")
            print(f"[{time.time() - t0:.0f}s] {name} seed {seed}: {result_of(outs[name, seed])['score']:.3f}", flush=True)
    results = {name: [result_of(outs[name, seed]) for seed in seeds] for name in rows}

    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    n = s["eval_samples"]

    def se(p):  # the standard error of one run's exact match over n problems
        return math.sqrt(p * (1 - p) / n)

    split = "validation" if a.sweep else "test"
    base = next(r for rs in results.values() for r in rs if r.get("base_score") is not None)
    lines = [f"{len(seeds)} seed(s) {seeds}, mean ± sd over seeds; exact match on {n} {split} problems, and the "
             f"standard error of one run's exact match, sqrt(p(1-p)/{n}); task {a.task}; settings {s}; "
             f"base sha256 {base['machine']['base_sha256'][:12]}", "",
             "| row | exact match | per seed | SE of one run | val loss | active LoRA params | allocated LoRA params |",
             "|---|---|---|---|---|---|---|",
             f"| base model (no fine-tuning) | {base['base_score']:.3f} | | {se(base['base_score']):.3f} | "
             f"{base['base_val_loss']:.3f} | 0 | 0 |"]
    for name, rs in results.items():
        scores = [r["score"] for r in rs]
        lines.append(f"| {name} | {ms(scores)} | {' / '.join(f'{x:.3f}' for x in scores)} | "
                     f"{se(statistics.mean(scores)):.3f} | {ms([r['val_loss'] for r in rs])} | "
                     f"{rs[0]['active_lora_params']:,} | {rs[0]['allocated_lora_params']:,} |")
    if "DR-LoRA" in results and "LoRA r=r_target" in results and len(seeds) > 1:
        d = [x["score"] - y["score"] for x, y in zip(results["DR-LoRA"], results["LoRA r=r_target"])]
        lines += ["", f"DR-LoRA minus LoRA r=r_target, same seed: {ms(d)} (standard error of the mean difference "
                      f"{statistics.stdev(d) / math.sqrt(len(d)):.3f})"]
    if "DR-LoRA" in results:  # did the experts that grew get the task's tokens? rank against routing frequency
        lines += ["", "Final rank against routing frequency f (Pearson, per layer), DR-LoRA:"]
        for seed in seeds:
            corr, ranks, f = rank_vs_frequency(outs["DR-LoRA", seed])
            lines.append(f"- seed {seed}: {' / '.join(f'{c:.2f}' for c in corr)} (mean {statistics.mean(corr):.2f}); "
                         f"ranks {ranks}")
        lines.append(f"- f of seed {seeds[-1]}, per layer: {[[round(v, 3) for v in row] for row in f.tolist()]}")
        other = os.path.join(a.out + ("_quick" if a.quick else ""), f"DR-LoRA_seed{seeds[-1]}")
        if a.task != "arithmetic" and os.path.exists(os.path.join(other, "result.json")):  # same base, other task
            _, ranks_a, f_a = rank_vs_frequency(other)
            tv = [0.5 * (x / x.sum() - y / y.sum()).abs().sum().item() for x, y in zip(f, f_a)]
            same = [torch.corrcoef(torch.tensor([x, y]).float())[0, 1].item() for x, y in zip(ranks, ranks_a)]
            lines.append(f"- against arithmetic (seed {seeds[-1]}, same base): total-variation distance of f_hat per "
                         f"layer {' / '.join(f'{v:.2f}' for v in tv)}; correlation of the two tasks' final ranks "
                         f"{' / '.join(f'{c:.2f}' for c in same)}; arithmetic's ranks {ranks_a}")
    lines.append(f"\n{len(outs)} runs, {time.time() - t0:.0f} s wall ({a.parallel} at a time, one thread each)")
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(out_root, "table.md"), "w") as fh:
        fh.write(table + "\n")


if __name__ == "__main__":
    main()
