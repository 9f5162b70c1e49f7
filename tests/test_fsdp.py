"""FSDP in real processes: torchrun, gloo, a tiny MoE (6 experts) written by hf.save_pretrained and an
arithmetic task. The training runs are train.py itself (--fsdp under torchrun; the same settings on one
process without it, the reference every sharded run is held to; kills by tools/kill_at.py, a real SIGKILL
as a step starts). The driver below (`python tests/test_fsdp.py '<json>'` under torchrun) checks what
train.py does not show: the rows each process reads, strictness, a bf16 base, the gradient-sync switch,
the replica check, the bytes each process holds.

Tolerances: a sharded step computes each micro-batch as one process does, on the same gathered weights,
but sums its gradients over processes by reduce-scatter and its routing sums by all-reduce, in another
order than one process accumulating its micro-batches; FSDP's clip norm combines per-shard norms. So
sharded vs one process agree to TOL, growth events and ranks exactly. Measured here: on 2 processes the
adapters, losses, AdamW moments and g came out bit-equal (a sum of two terms halved is exact), f to 5e-8;
on 4, 2.5e-7 relative and losses to 5e-7. A sharded run killed and resumed on the same process count
repeats the same sums: bit for bit."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import drlora  # noqa: E402
import fsdp  # noqa: E402
import hf  # noqa: E402
import moe  # noqa: E402
import train  # noqa: E402
from data import arithmetic  # noqa: E402

STEPS = 12  # checkpoints after steps 4, 8, 12; killed as step 6 starts, a run leaves step 4's
# warm-up ends at 6 (events 6, 9): the step-4 checkpoint holds no AdamW state for the still frozen router
LORA = dict(r_init=1, r_target=2, r_max=4, dT=3, warmup_frac=0.5, dropout=0.0)
TOL = dict(loss=1e-5, rel=1e-5)  # sharded vs one process: largest loss difference, relative norm of tensors


def base_model(n_experts=6):
    tok = hf.ByteTokenizer()  # train.py's runs read the arithmetic task in bytes
    cfg = moe.MoEConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layer=2, n_head=2, n_kv_head=2,
                        n_experts=n_experts, top_k=2, intermediate_size=32, max_seq_len=160, pad_id=tok.pad_id,
                        eos_id=tok.eos_id, tokenizer="byte")
    model = moe.MoETransformer(cfg)
    model.init_weights(seed=0)
    return model


def batch(t: int, index: int, B=2, T=16):
    """Micro-batch `index` of step t: random tokens, next-token targets, row 0 left-padded by 3."""
    g = torch.Generator().manual_seed(1000 * t + index)
    x = torch.randint(0, 258, (B, T), generator=g)
    y = torch.cat([x[:, 1:], torch.full((B, 1), moe.IGNORE_INDEX)], 1)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3], y[0, :3] = 0, moe.IGNORE_INDEX
    return x, y, mask


# -----------------------------------------------------------------------------
# the loading worker: shards, reads, strictness, a bf16 base, the gradient-sync switch


def load_worker(a: dict, mesh):
    rank, world = dist.get_rank(), dist.get_world_size()
    lcfg, report = drlora.DRLoRAConfig(**LORA), {}
    ref = hf.from_pretrained(a["base"])
    for layout in ("per_expert", "fused"):
        model, drl = fsdp.from_pretrained(os.path.join(a["dir"], layout), mesh, lcfg, STEPS, seed=1337)
        base = {n: p for n, p in model.named_parameters() if ".lora." not in n}
        full = dict(ref.named_parameters())
        local = {n: p.to_local() for n, p in base.items()}
        report[layout] = {
            "same": all(torch.equal(local[n], full[n][slice(*fsdp.rows(p))]) for n, p in base.items()),
            "rows": {n: list(fsdp.rows(p)) for n, p in base.items()},
            "local_elements": sum(t.numel() for t in local.values()),
            "read": fsdp.load_shards(model, os.path.join(a["dir"], layout))}
    report["all_elements"] = sum(p.numel() for p in ref.parameters())
    try:
        fsdp.from_pretrained(os.path.join(a["dir"], "missing"), mesh, lcfg, STEPS, seed=1337)
    except ValueError as e:
        report["missing_error"] = str(e)
    # a bf16 base under fp32 trainables, with gradient checkpointing: the same steps as on one process
    path = os.path.join(a["dir"], "per_expert")
    model, drl = fsdp.from_pretrained(path, mesh, lcfg, STEPS, 1337, torch.bfloat16)
    report["dtypes"] = sorted({f"{'lora' if '.lora.' in n else 'router' if '.mlp.gate.' in n else 'base'} "
                               f"{str(p.dtype)[6:]}" for n, p in model.named_parameters()})
    model.gradient_checkpointing = True
    one = hf.from_pretrained(path, dtype=torch.bfloat16)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)  # as train.py over a bf16 base
    torch.manual_seed(1337)
    one_drl = drlora.DRLoRA(one, lcfg, STEPS)
    opts = [torch.optim.AdamW(d.trainable_parameters(), lr=1e-2) for d in (drl, one_drl)]
    calls, switch = [], model.set_requires_gradient_sync
    model.set_requires_gradient_sync = lambda sync, **kw: (calls.append(sync), switch(sync, **kw))
    report["bf16_losses"] = [[], []]
    for t in range(2):
        micro = [batch(t, m * world + rank) for m in range(2)]
        loss = drlora.train_step(model, drl, opts[0], micro, t, grad_clip=1.0, autocast=bf16)[0]
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        report["bf16_losses"][0].append(loss.item())
        every = [batch(t, i) for m in range(2) for i in range(world * m, world * (m + 1))]
        report["bf16_losses"][1].append(drlora.train_step(one, one_drl, opts[1], every, t, 1.0, bf16)[0].item())
    report["sync_calls"] = calls
    # FSDP's switch: without sync a backward leaves the sharded gradients unset (no reduce-scatter)
    x, y, mask = batch(0, rank)
    switch(False)
    with bf16:
        model(x, targets=y, attention_mask=mask).loss.backward()
    report["grads_after_unsynced_backward"] = sum(p.grad is not None for p in drl.trainable_parameters())
    switch(True)
    with bf16:
        model(x, targets=y, attention_mask=mask).loss.backward()
    report["grads_after_synced_backward"] = sum(p.grad is not None for p in drl.trainable_parameters())
    # the end-of-run check catches a process whose ranks differ
    if rank == 1:
        drl.blocks[0].experts.lora.set_ranks(drl.blocks[0].experts.lora.ranks + 1)
    try:
        train.check_replicas(drl, world, print)
    except RuntimeError as e:
        report["replicas_error"] = str(e)[:60]
    torch.save(report, os.path.join(a["dir"], f"report{rank}.pt"))


def held_worker(a: dict, mesh):
    """The bytes this process holds of the sharded model, for the memory test."""
    model, _ = fsdp.from_pretrained(a["base"], mesh, drlora.DRLoRAConfig(**LORA), STEPS, seed=1337)
    torch.save(fsdp.held(model), os.path.join(a["dir"], f"held{dist.get_world_size()}_{dist.get_rank()}.pt"))


if __name__ == "__main__":  # a list of jobs for these processes, one after the other
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = dist.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),))
    for job in json.loads(sys.argv[1]):
        {"load": load_worker, "held": held_worker}[job["mode"]](job, mesh)
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the tests: every run at once (three launches of torchrun), then what each test asserts on them


def launch(cmd: list, nproc: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """A script on nproc processes (torchrun, gloo), or on this one (nproc 0). A hang fails after timeout s."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc \
        else [sys.executable]
    p = subprocess.Popen(run + [str(c) for c in cmd], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        out, err = p.communicate(timeout=60)
        pytest.fail(f"{cmd[:2]} on {nproc} processes still running after {timeout} s: {out[-1000:]} {err[-2000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    model = base_model()
    hf.save_pretrained(model, tmp / "base")
    arithmetic.prepare(out_dir=tmp / "task", sizes={"train": 200, "val": 8, "test": 8}, seed=0)
    from safetensors.torch import load_file, save_file
    from tools import export
    shutil.copytree(tmp / "base", tmp / "per_expert")
    export.save_in_layout(model, tmp / "fused", fused=True)
    shutil.copytree(tmp / "base", tmp / "missing")
    sd = load_file(tmp / "missing" / "model.safetensors")
    del sd["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(sd, tmp / "missing" / "model.safetensors")

    def train_py(name, nproc, *extra, accum=2, kill=None, resume_from=None):
        """train.py in tmp/name: on nproc processes with --fsdp, or on one without; killed as step `kill` starts."""
        (tmp / name).mkdir(exist_ok=True)
        if resume_from:
            shutil.copy(resume_from, tmp / name / "ckpt.pt")
        argv = ["--model", tmp / "base", "--preset", "tiny", "--task", tmp / "task", "--out_dir", tmp / name,
                "--steps", STEPS, "--batch_size", 2, "--grad_accum", accum, "--block_size", 160, "--ckpt_interval", 4,
                "--eval_base", "false", "--eval_samples", 2, "--max_new_tokens", 2, "--log_interval", 100,
                *[f"--{k}={v}" for k, v in LORA.items()], *(["--fsdp"] if nproc else []),
                *(["--resume"] if resume_from else []), *extra]
        p = launch((["tools/kill_at.py", kill] if kill else ["train.py"]) + argv, nproc)
        if kill:  # SIGKILL: -9 from one process, torchrun's failure from several
            assert p.returncode == (1 if nproc else -9), p.stderr[-3000:]
            shutil.copy(tmp / name / "ckpt.pt", tmp / f"{name}_step4.pt")
        else:
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
        return torch.load(tmp / name / "ckpt.pt", weights_only=False)

    ck = {"one": train_py("one", 0), "one4": train_py("one4", 0, accum=4),
          "two": train_py("two", 2, "--grad_ckpt", "true")}
    train_py("one_k", 0, kill=6)  # step-4 checkpoints of one process
    train_py("one4_k", 0, accum=4, kill=6)
    ck["killed"] = train_py("killed", 2, "--grad_ckpt", "true", kill=6)
    ck["resumed"] = train_py("killed", 2, "--grad_ckpt", "true", resume_from=tmp / "killed_step4.pt")
    ck["1to2"] = train_py("1to2", 2, resume_from=tmp / "one_k_step4.pt")
    ck["2to1"] = train_py("2to1", 0, resume_from=tmp / "killed_step4.pt")
    ck["four"] = train_py("four", 4, accum=4)
    ck["1to4"] = train_py("1to4", 4, accum=4, resume_from=tmp / "one4_k_step4.pt")
    job = {"base": str(tmp / "base"), "dir": str(tmp)}
    for nproc, jobs in ((2, [{"mode": "load", **job}, {"mode": "held", **job}]), (4, [{"mode": "held", **job}])):
        p = launch([os.path.abspath(__file__), json.dumps(jobs)], nproc)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return tmp, ck


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def assert_close_runs(a, b, exact=False):
    """a and b end alike: the same growth events and ranks; losses, trainables, AdamW state, f and g within
    TOL, or bit for bit."""
    la, lb = a["history"]["loss"], b["history"]["loss"]
    assert a["step"] == b["step"] == STEPS and len(la) == len(lb) == STEPS
    assert [(e["step"], e["ranks"]) for e in a["drlora"]["history"]] == \
        [(e["step"], e["ranks"]) for e in b["drlora"]["history"]]
    assert torch.equal(a["drlora"]["ranks"], b["drlora"]["ranks"])
    assert max(abs(x - y) for x, y in zip(la, lb)) <= (0 if exact else TOL["loss"])
    assert sorted(a["trainable"]) == sorted(b["trainable"])  # by name: the order of a dict is no layout
    pairs = [(a["trainable"][n], b["trainable"][n]) for n in a["trainable"]]
    da, db = a["drlora"], b["drlora"]
    pairs += [(da["f"], db["f"])] + [(da["g"][p], db["g"][p]) for p in da["g"]]
    sa, sb = a["optimizer"], b["optimizer"]  # the positional layout of optimizer.state_dict()
    assert sorted(sa["state"]) == sorted(sb["state"])  # torch.distributed.checkpoint turns betas into a list:
    assert json.dumps(sa["param_groups"]) == json.dumps(sb["param_groups"])  # the same numbers
    assert all(torch.equal(sa["state"][i]["step"], sb["state"][i]["step"]) for i in sa["state"])
    pairs += [(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in ("exp_avg", "exp_avg_sq")]
    for x, y in pairs:
        assert x.shape == y.shape, (x.shape, y.shape)
        assert torch.equal(x, y) if exact else rel(x, y) <= TOL["rel"], (x.shape, rel(x, y))


def test_two_processes_match_one(runs):
    tmp, ck = runs
    one, two = ck["one"], ck["two"]
    assert len(one["rng"]) == 1 and len(two["rng"]) == 2 and two["config"]["fsdp"] and not one["config"]["fsdp"]
    ranks = one["drlora"]["ranks"]
    assert [e["step"] for e in one["drlora"]["history"]] == [6, 9] and ranks.sum(-1).tolist() == [12, 12]
    assert len(set(ranks.flatten().tolist())) > 1  # the decisions discriminated
    assert_close_runs(two, one)
    from safetensors.torch import load_file
    a, b = load_file(tmp / "one" / "adapter.safetensors"), load_file(tmp / "two" / "adapter.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * (1 + 1 + 2 * 2)  # a layer's ranks, router, A, B of 2 targets
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]) if "ranks" in k else rel(b[k], a[k]) <= TOL["rel"], k


def test_killed_and_resumed_on_two_processes_ends_bit_for_bit(runs):
    _, ck = runs
    killed = ck["killed"]  # SIGKILLed as step 6 started, past the step-4 checkpoint
    assert killed["step"] == 4 and len(killed["history"]["loss"]) == 4 and len(killed["rng"]) == 2
    router = [i for i, n in enumerate(killed["trainable"]) if ".mlp.gate." in n]
    assert router and not set(router) & set(killed["optimizer"]["state"])  # frozen so far: no AdamW state
    assert_close_runs(ck["resumed"], ck["two"], exact=True)


def test_checkpoints_resume_across_process_counts(runs):
    _, ck = runs
    for name, world in (("2to1", 1), ("1to2", 2)):
        assert len(ck[name]["rng"]) == world
        assert_close_runs(ck[name], ck["one"])


def test_six_experts_on_four_processes(runs):
    """FSDP pads 6 experts over 4 processes as 2, 2, 2, 0: the gathered g still has exactly 6 rows, equal to
    one process's, and so are the decisions; a one-process checkpoint resumes there too."""
    _, ck = runs
    for name in ("four", "1to4"):
        four = ck[name]
        assert len(four["rng"]) == 4
        assert four["drlora"]["f"].shape == (2, 6)
        assert all(g.shape == (2, 6, 4) for g in four["drlora"]["g"].values())
        assert four["drlora"]["g"]["up_proj"].abs().sum() > 0  # steps 9..11 since the last reset
        assert_close_runs(four, ck["one4"])


def test_loading_reads_each_process_its_shards(runs):
    """From real safetensors files (per-expert and fused layouts): every process holds exactly its rows of
    hf.from_pretrained's weights and read no others; a missing expert is named on every process; a bf16 base
    under fp32 trainables trains as on one process; the gradient-sync switch; the replica check."""
    tmp, _ = runs
    reports = [torch.load(tmp / f"report{r}.pt", weights_only=False) for r in range(2)]
    total = reports[0]["all_elements"]
    for rank, rep in enumerate(reports):
        for layout in ("per_expert", "fused"):
            got = rep[layout]
            assert got["same"], (rank, layout)
            assert got["rows"]["layers.0.mlp.experts.up_proj"] == [3 * rank, 3 * rank + 3]
            assert got["rows"]["embed_tokens.weight"] == [129 * rank, 129 * rank + 129]
            assert got["read"] == 4 * got["local_elements"]  # fp32 files: exactly its own rows
        assert rep["per_expert"]["local_elements"] < 0.51 * total
        assert "missing: ['layers.1.mlp.experts.up_proj (experts [5])']" in rep["missing_error"]
        assert rep["dtypes"] == ["base bfloat16", "lora float32", "router float32"]
        assert rep["bf16_losses"][0] == pytest.approx(rep["bf16_losses"][1], abs=1e-6)
        assert rep["sync_calls"] == [False, True, False, True]  # 2 micro-batches per step, 2 steps
        assert rep["grads_after_unsynced_backward"] == 0 and rep["grads_after_synced_backward"] == 10
        assert rep["replicas_error"].startswith("processes disagree after training")
    assert sum(r["per_expert"]["local_elements"] for r in reports) == total


def test_memory_worked_out_is_what_process_0_holds(runs):
    """fsdp.memory's shards (padded as FSDP pads: 6 experts on 4 processes take 2 rows each) are the bytes
    process 0 holds, and the tables print."""
    tmp, _ = runs
    cfg, lcfg = base_model().cfg, drlora.DRLoRAConfig(**LORA)
    for name, world in (("two", 2), ("four", 4)):
        mem = fsdp.memory(cfg, lcfg, world, dtype=torch.float32)
        assert {k: mem[k] for k in ("base", "trainable")} == torch.load(tmp / f"held{world}_0.pt"), name
        assert mem["adamw"] == 2 * mem["trainable"] and mem["total"] > mem["base"] + 4 * mem["trainable"]
    table = fsdp.plan()
    assert table.count("| Qwen3-30B-A3B |") == table.count("| Mixtral-8x7B |") == 3 and "not measured" in table
