"""train.py end to end on a tiny random base model and a small generated task: exact resume
after a kill, two real processes on gloo through torchrun (an evaluation on process 0 while the
other waits, a resume under another process count either way), and a clear error for each kind
of bad input."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import drlora
import hf

import moe
import train
from data import arithmetic, common
from tools import evaluate, plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    tok = hf.ByteTokenizer()
    cfg = moe.MoEConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layer=2, n_head=2, n_kv_head=2, n_experts=4, top_k=2,
                        intermediate_size=32, max_seq_len=96, pad_id=tok.pad_id, eos_id=tok.eos_id, tokenizer="byte")
    model = moe.MoETransformer(cfg)
    model.init_weights(seed=0)
    hf.save_pretrained(model, tmp / "base")
    arithmetic.prepare(out_dir=tmp / "task", sizes={"train": 200, "val": 16, "test": 16}, seed=0)
    return tmp


def args(setup, out, *extra):
    return ["--model", str(setup / "base"), "--preset", "tiny", "--task", str(setup / "task"), "--out_dir", str(out),
            "--steps", "12", "--batch_size", "4", "--r_init", "1", "--r_target", "2", "--r_max", "4", "--dT", "3",
            "--eval_samples", "4", "--eval_interval", "1000", "--max_new_tokens", "3",
            "--log_interval", "100", "--ckpt_interval", "6", *extra]


def run(argv, **kw):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def killed(step, argv, **kw):
    """train.py killed (SIGKILL) as step `step` starts, right after step - 1 and what it wrote."""
    return subprocess.run([sys.executable, "tools/kill_at.py", str(step), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


def test_resume_after_kill_is_exact(setup, tmp_path):
    straight = run(args(setup, tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    kill = killed(6, args(setup, tmp_path / "b"))  # dies right after step 5 and its checkpoint (at 6)
    assert kill.returncode == -9, kill.stderr
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 6
    resumed = run(args(setup, tmp_path / "b", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 12
    assert a["trainable"].keys() == b["trainable"].keys()
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    assert torch.equal(a["drlora"]["ranks"], b["drlora"]["ranks"])
    assert torch.equal(a["drlora"]["f"], b["drlora"]["f"])
    assert a["history"]["loss"] == b["history"]["loss"]
    assert a["drlora"]["ranks"].sum(-1).tolist() == [4 * 2, 4 * 2]  # N x r_target per layer


def test_two_processes_on_gloo_through_torchrun(setup, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *args(setup, tmp_path, "--grad_accum", "2")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "all 2 processes hold identical adapters, ranks, routers, f and g" in p.stdout
    assert "4 samples x 1 micro-batches x 2 processes" in p.stdout
    ranks = torch.load(tmp_path / "ckpt.pt", weights_only=False)["drlora"]["ranks"]
    assert ranks.sum(-1).tolist() == [8, 8]


def torchrun(argv, nproc=2, timeout=180, script=("train.py",)):
    """train.py (or another script) on nproc processes (gloo on the CPU). A hang (a process left waiting for
    another) fails the test after timeout seconds; torchrun, stopped by SIGTERM, ends its workers (each in a
    session of its own, out of reach of a kill of torchrun's process group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *script,
           *argv]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        out, err = p.communicate(timeout=60)
        pytest.fail(f"train.py on {nproc} processes still running after {timeout} s: {out[-1000:]} {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


MASKS = ("--grad_accum", "2", "--dropout", "0.1")  # 2 micro-batches: 2 on one process, 1 each on two; real masks


def test_one_process_run_resumed_by_two_with_an_evaluation_midway(setup, tmp_path):
    """Killed on one process, resumed by torchrun on two (gloo), with process 0 evaluating at step 8 while
    the other waits for it: the run completes, draws dropout masks afresh for each process, and ends with
    identical replicas."""
    kill = killed(6, args(setup, tmp_path, *MASKS), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert kill.returncode == -9, kill.stderr
    rng = torch.load(tmp_path / "ckpt.pt", weights_only=False)["rng"]
    assert isinstance(rng, list) and len(rng) == 1 and rng[0].keys() == {"cpu", "cuda"} and rng[0]["cuda"] is None
    assert rng[0]["cpu"].dtype == torch.uint8 and torch.equal(rng[0]["cpu"], rng[0]["cpu"].clone())
    p = torchrun(args(setup, tmp_path, *MASKS, "--resume", "--eval_interval", "8"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "resuming 1 processes' run with 2: dropout masks are drawn afresh" in p.stdout
    assert "resumed from" in p.stdout and "eval step 8: val loss" in p.stdout
    assert "all 2 processes hold identical adapters, ranks, routers, f and g" in p.stdout
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["step"] == 12 and ck["drlora"]["ranks"].sum(-1).tolist() == [8, 8]
    assert [e["step"] for e in ck["history"]["eval"]] == [8] and len(ck["history"]["loss"]) == 12
    assert len(ck["rng"]) == 2 and all(r["cuda"] is None for r in ck["rng"])
    assert not torch.equal(ck["rng"][0]["cpu"], ck["rng"][1]["cpu"])  # each process its own masks


def test_two_process_checkpoint_resumed_by_one(setup, tmp_path):
    """Two processes (gloo) evaluate at step 4 and are killed as step 8 starts, past the checkpoint of step 6
    (the other process would wait for process 0's writing at step 6's first collective anyway); one
    process resumes and completes the run."""
    p = torchrun(args(setup, tmp_path, *MASKS, "--eval_interval", "4"), script=("tools/kill_at.py", "8"))
    assert p.returncode != 0 and "eval step 4: val loss" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["step"] == 6 and [e["step"] for e in ck["history"]["eval"]] == [4]
    rng = ck["rng"]  # one dict per process: its CPU generator, no CUDA on the CPU
    assert isinstance(rng, list) and len(rng) == 2 and all(r.keys() == {"cpu", "cuda"} for r in rng)
    assert all(r["cuda"] is None and r["cpu"].dtype == torch.uint8 for r in rng)
    assert not torch.equal(rng[0]["cpu"], rng[1]["cpu"])  # each process draws its own dropout masks
    resumed = run(args(setup, tmp_path, *MASKS, "--resume"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming 2 processes' run with 1: dropout masks are drawn afresh" in resumed.stdout
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["step"] == 12 and len(ck["rng"]) == 1 and ck["drlora"]["ranks"].sum(-1).tolist() == [8, 8]
    assert len(ck["history"]["loss"]) == 12 and len(ck["history"]["events"]) == 4  # events 0, 3, 6, 9


def test_writes_result_plots_and_adapter(setup, tmp_path):
    result = train.main(args(setup, tmp_path))
    assert result["method"] == "drlora" and len(result["ranks"]) == 2
    assert plots.save_plots(str(tmp_path)) == [str(tmp_path / f) for f in ("loss.png", "ranks_over_time.png", "f_g.png")]
    for f in ("loss.png", "ranks_over_time.png", "f_g.png", "adapter.safetensors", "result.json", "ckpt.pt"):
        assert os.path.getsize(tmp_path / f) > 0, f
    saved = json.load(open(tmp_path / "result.json"))
    # the run's final f and g, for the figures: f sums to each layer's mean weight per token (top-2, unnormalised)
    f, g = torch.tensor(saved["result"]["f"]), torch.tensor(saved["result"]["g"])
    assert f.shape == g.shape == (2, 4) and (f > 0).all() and (g >= 0).all() and (f.sum(-1) < 1).all()
    assert len(saved["history"]["loss"]) == 12 and len(saved["history"]["events"]) == 4  # t_warm 0, events 0, 3, 6, 9
    # what the result depends on beyond the settings: the machine, and the base's own bytes
    base = hashlib.sha256((setup / "base" / "model.safetensors").read_bytes()).hexdigest()
    assert saved["result"]["machine"] == {**saved["result"]["machine"], "threads": torch.get_num_threads(),
                                          "torch": torch.__version__, "device": "cpu", "base_sha256": base}
    assert saved["result"]["machine"]["cpu"]
    # tools/evaluate.py: the saved adapter on a fresh base evaluates exactly as the trained model did
    again = evaluate.main(["--model", str(setup / "base"), "--task", str(setup / "task"), "--adapter",
                        str(tmp_path / "adapter.safetensors"), "--n", "4", "--max_new_tokens", "3"])
    final = saved["history"]["final"]
    assert abs(final["val_loss"] - saved["history"]["base"]["val_loss"]) > 1e-3  # the adapter changes the model
    assert abs(again["val_loss"] - final["val_loss"]) <= 1e-6 and again["score"] == final["score"]


def test_lora_init_does_not_depend_on_what_ran_before(setup, tmp_path, monkeypatch):
    """train.py seeds right before DR-LoRA's init: random numbers drawn while the base is
    made or loaded (the tiny base is pretrained inside the first run) change nothing."""
    plain = train.main(args(setup, tmp_path / "plain", "--steps", "6"))
    load = hf.from_pretrained

    def load_and_draw(*a, **kw):  # as pretraining the tiny base would: it draws from the global generator
        torch.rand(1000)
        return load(*a, **kw)

    monkeypatch.setattr(hf, "from_pretrained", load_and_draw)
    drawn = train.main(args(setup, tmp_path / "drawn", "--steps", "6"))
    a = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=False)["trainable"]
    b = torch.load(tmp_path / "drawn" / "ckpt.pt", weights_only=False)["trainable"]
    assert all(torch.equal(a[k], b[k]) for k in a) and plain["val_loss"] == drawn["val_loss"]


def test_lora_method_has_no_events(setup, tmp_path):
    result = train.main(args(setup, tmp_path, "--method", "lora"))
    assert result["ranks"] == [[2] * 4, [2] * 4]


def test_embedded_task_is_made_on_first_use_only(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DATA_DIR", tmp_path)
    folder = common.task_folder("sorting", make=True)
    assert folder == tmp_path / "sorting"
    assert [len(common.load_sft(tmp_path / "sorting" / f"{s}.npz")) for s in ("train", "val", "test")] == [20_000, 500, 500]
    made = os.path.getmtime(tmp_path / "sorting" / "train.npz")
    assert common.task_folder("sorting", make=True) == folder
    assert os.path.getmtime(tmp_path / "sorting" / "train.npz") == made  # not made twice
    assert common.task_folder("gsm8k", make=True) == tmp_path / "gsm8k" and not os.path.exists(tmp_path / "gsm8k")


# --- bad input: a clear error naming what is wrong -----------------------------------------


def test_unknown_model_name(setup, tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        train.main(args(setup, tmp_path) + ["--model", "gpt-9"])


def test_partial_checkpoint(setup, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file

    shutil.copytree(setup / "base", tmp_path / "base")
    sd = load_file(tmp_path / "base" / "model.safetensors")
    del sd["model.layers.1.mlp.gate.weight"]
    save_file(sd, tmp_path / "base" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: \['layers.1.mlp.gate.weight'\]"):
        train.main(args(setup, tmp_path) + ["--model", str(tmp_path / "base")])


def test_missing_and_malformed_data(setup, tmp_path):
    import shutil

    shutil.copytree(setup / "task", tmp_path / "task")
    os.remove(tmp_path / "task" / "val.npz")
    with pytest.raises(FileNotFoundError, match="val.npz"):
        train.main(args(setup, tmp_path) + ["--task", str(tmp_path / "task")])
    (tmp_path / "task" / "val.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="val.npz is not a readable .npz"):
        train.main(args(setup, tmp_path) + ["--task", str(tmp_path / "task")])


def test_data_made_with_another_tokenizer(setup, tmp_path):
    import shutil

    shutil.copytree(setup / "task", tmp_path / "task")
    m = json.load(open(tmp_path / "task" / "manifest.json"))
    m["tokenizer"] = "allenai/OLMoE-1B-7B-0924"
    json.dump(m, open(tmp_path / "task" / "manifest.json", "w"))
    with pytest.raises(ValueError, match="tokenized by 'allenai/OLMoE-1B-7B-0924', the model uses 'byte'"):
        train.main(args(setup, tmp_path) + ["--task", str(tmp_path / "task")])


def test_samples_longer_than_positions_are_truncated_with_a_warning(setup, tmp_path, capsys):
    with pytest.warns(UserWarning, match="truncated"):
        result = train.main(args(setup, tmp_path, "--block_size", "4000", "--steps", "2", "--dT", "1") + [])
    assert "block_size 4000 > the model's 96 positions: using 96" in capsys.readouterr().out
    assert len(result["ranks"]) == 2


@pytest.mark.parametrize("bad, message", [
    (["--r_init", "3"], "need 1 <= r_init <= r_target <= r_max, got 3, 2, 4"),
    (["--r_max", "1"], "need 1 <= r_init <= r_target <= r_max, got 1, 2, 1"),
    (["--dT", "50"], "no growth event fits: 12 steps"),
    (["--saliency", "fgh"], r"--saliency must be one of fg, f, g, got 'fgh'"),
    (["--grad_accum", "3"], None),  # fine on one process: a control for the parametrisation
])
def test_impossible_drlora_settings(setup, tmp_path, bad, message):
    if message is None:
        train.main(args(setup, tmp_path, "--steps", "3", "--dT", "1") + bad)
        return
    with pytest.raises(ValueError, match=message):
        train.main(args(setup, tmp_path) + bad)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    good = killed(6, args(setup, tmp_path, "--steps", "12", "--ckpt_interval", "6"))
    assert good.returncode == -9
    before = (tmp_path / "ckpt.pt").read_bytes()
    bad = run(args(setup, tmp_path, "--resume", "--lr", "1e30", "--grad_clip", "0"))
    assert bad.returncode == 1
    assert "error: --resume with settings that differ" in bad.stderr  # lr is a setting: refused first
    # now a fresh run that blows up: NaN/inf loss is reported, the file on disk is untouched
    bad = run(args(setup, tmp_path / "x", "--lr", "1e30", "--grad_clip", "0", "--ckpt_interval", "100"))
    assert bad.returncode == 1 and "loss is" in bad.stderr and "stopping" in bad.stderr
    assert not (tmp_path / "x" / "ckpt.pt").exists()
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_resume_with_different_settings_is_refused(setup, tmp_path):
    assert killed(6, args(setup, tmp_path)).returncode == -9
    with pytest.raises(ValueError, match=r"'r_target': \(2, 3\)"):
        train.main(args(setup, tmp_path, "--resume", "--r_target", "3"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train.main(args(setup, tmp_path / "empty", "--resume"))


def test_unknown_flag_is_refused(setup, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--learning_rate", "1"])
    assert train.parse_args(["--model", "olmoe"]).lr == 2e-5  # the paper's settings for a real model
    assert train.parse_args(["--model", "olmoe", "--lr", "1e-4"]).lr == 1e-4
    assert train.parse_args([]).steps == 1500  # the tiny preset for the embedded model


def test_lr_schedule():
    t_warm = drlora.schedule(drlora.DRLoRAConfig(method="lora"), 100, 8)[0]
    assert t_warm == 3  # floor(0.03 * 100): the warm-up ends where DR-LoRA's growth starts
    assert [train.get_lr(t, 1.0, t_warm, 100) for t in (0, 1, 2)] == [1 / 3, 2 / 3, 1.0]
    assert train.get_lr(3, 1.0, t_warm, 100) == 1.0 and train.get_lr(99, 1.0, t_warm, 100) == pytest.approx(1 / 97)


def test_compile_trains_through_growth_events(setup, tmp_path):
    """torch.compile on the CPU (fp32): the experts fall back to the loop, which dynamo traces; each growth
    event changes the ranks and recompiles. Same losses as without compile, to float rounding."""
    plain = train.main(args(setup, tmp_path / "plain", "--steps", "6", "--dT", "2", "--eval_base", "false"))
    compiled = train.main(args(setup, tmp_path / "compiled", "--steps", "6", "--dT", "2", "--eval_base", "false",
                               "--compile", "true"))
    assert compiled["ranks"] == plain["ranks"] and sum(map(sum, compiled["ranks"])) == 2 * 4 * 2
    history = [json.load(open(tmp_path / d / "result.json"))["history"]["loss"] for d in ("plain", "compiled")]
    assert max(abs(a - b) for a, b in zip(*history)) < 1e-4
