"""Every bad input, as a new user meets it on the command line: the program exits with 1 and prints one
line, starting with 'error:', that names the flag, file or field at fault and its value, and no traceback.
Each row runs the real script in a subprocess, on a tiny random base and a generated task."""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import hf
import moe
from data import arithmetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    tok = hf.ByteTokenizer()
    cfg = moe.MoEConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layer=2, n_head=2, n_kv_head=2, n_experts=4,
                        top_k=2, intermediate_size=32, max_seq_len=96, pad_id=tok.pad_id, eos_id=tok.eos_id,
                        tokenizer="byte")
    model = moe.MoETransformer(cfg)
    model.init_weights(seed=0)
    hf.save_pretrained(model, tmp / "base")
    arithmetic.prepare(out_dir=tmp / "task", sizes={"train": 64, "val": 8, "test": 8}, seed=0)
    # a config.json without the field every family needs
    shutil.copytree(tmp / "base", tmp / "no_hidden")
    config = json.loads((tmp / "base" / "config.json").read_text())
    del config["hidden_size"]
    (tmp / "no_hidden" / "config.json").write_text(json.dumps(config))
    # a task folder whose manifest.json is broken, and one named like no script
    shutil.copytree(tmp / "task", tmp / "broken")
    (tmp / "broken" / "manifest.json").write_text("{not json")
    # a checkpoint cut short, as a full disk leaves it
    (tmp / "cut").mkdir()
    (tmp / "cut" / "ckpt.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    return tmp


def cli(script, *argv):
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train(setup, *extra):
    return cli("train.py", "--model", setup / "base", "--task", setup / "task", "--out_dir", setup / "out",
               "--steps", "20", "--dT", "5", "--r_init", "2", "--r_target", "4", "--r_max", "8", *extra)


# (flags, the line's text after "error: "): the settings, checked where they are declared, before any loading
SETTINGS = [
    (["--grad_accum", "0"], "--grad_accum must be at least 1, got 0"),
    (["--block_size", "0"], "--block_size must be at least 1, got 0"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--eval_interval", "0"], "--eval_interval must be at least 1, got 0"),
    (["--dtype", "float16"], "--dtype must be one of auto, float32, bfloat16, got 'float16'"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["--eval_split", "train"], "--eval_split must be one of val, test, got 'train'"),
    (["--lr", "nan"], "--lr must be positive and finite, got nan"),
    (["--lr=-1e-4"], "--lr must be positive and finite, got -0.0001"),
    (["--grad_clip", "-1"], "--grad_clip must be >= 0 and finite, got -1.0"),
    (["--dT", "-1"], "--dT must be at least 1, got -1"),
    (["--p_grow", "0"], "--p_grow must be in (0, 1], got 0.0"),
    (["--beta", "1"], "--beta must be in [0, 1), got 1.0"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--gamma", "inf"], "--gamma must be >= 0 and finite, got inf"),
    (["--method", "dora"], "--method must be one of drlora, lora, got 'dora'"),
    (["--targets", "q_proj"], "--targets must be among gate_proj, up_proj, down_proj, got ('q_proj',)"),
    (["--r_init", "0"], "need 1 <= r_init <= r_target <= r_max, got 0, 4, 8"),
    (["--preset", "huge"], "--preset must be one of auto, paper, tiny, got 'huge'"),
]


def one_error_line(p) -> str:
    """The single line a bad input must print; the test fails with what was printed otherwise."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (p.args, p.stderr[-3000:])
    assert "Traceback" not in p.stdout + p.stderr
    return lines[0].removeprefix("error: ")


def test_a_bad_setting_is_one_line_naming_the_flag_and_value(setup):
    with ThreadPoolExecutor(4) as pool:  # independent processes, mostly starting Python: side by side
        runs = list(pool.map(lambda flags: train(setup, *flags), [flags for flags, _ in SETTINGS]))
    for (flags, message), p in zip(SETTINGS, runs):
        assert one_error_line(p) == message, flags


def test_bad_files_are_one_line_naming_the_file(setup):
    # a config.json without a field its family needs: the file, the field, the model_type
    line = one_error_line(train(setup, "--model", setup / "no_hidden"))
    assert line == f"{setup / 'no_hidden' / 'config.json'} has no 'hidden_size', which model_type 'olmoe' needs"
    # a model that looks like a path is a folder or nothing: no hub lookup, no download
    assert one_error_line(train(setup, "--model", "/nonexistent")) == "no such checkpoint folder: /nonexistent"
    # a task folder that is not there, and one whose manifest.json is broken: the real scripts, no placeholder
    line = one_error_line(train(setup, "--task", "/nonexistent"))
    assert line.startswith("--task /nonexistent: no such folder; a task folder is made by the script that prepares "
                           "it: python data/arithmetic.py or python data/sorting.py for a generated task; python "
                           "tasks/TASK.py --model MODEL --out /nonexistent for a real one (TASK: gsm8k, ")
    line = one_error_line(train(setup, "--task", setup / "broken"))
    assert line.startswith(f"{setup / 'broken' / 'manifest.json'} is not valid JSON") and "python tasks/TASK.py" in line
    # a truncated ckpt.pt: named, with what to do
    line = one_error_line(train(setup, "--out_dir", setup / "cut", "--resume"))
    assert line.startswith(f"--resume: {setup / 'cut' / 'ckpt.pt'} cannot be read as a drlora checkpoint (")
    assert line.endswith("); start over without --resume, or point --out_dir elsewhere")


def test_the_task_scripts_and_the_export_say_one_line_too(setup):
    gsm8k = ("tasks/gsm8k.py", "--model", "tiny", "--out", setup / "gsm8k", "--train", setup / "none.jsonl")
    assert one_error_line(cli(*gsm8k, "--val_size", "0")) == "--val_size must be at least 1 (train.py reads val.npz), got 0"
    assert one_error_line(cli(*gsm8k, "--max_len", "0")) == "--max_len must be at least 1, got 0"
    assert one_error_line(cli(*gsm8k, "--max_train", "-5")) == "--max_train must be at least 0, got -5"
    assert one_error_line(cli(*gsm8k, "--test", setup / "none.jsonl")) == f"{setup / 'none.jsonl'} not found"
    export = ("tools/export.py", "--base", setup / "base", "--out", setup / "merged")
    line = one_error_line(cli(*export, "--adapter", setup / "task" / "train.npz"))
    assert line.startswith(f"{setup / 'task' / 'train.npz'}: cannot read it as a drlora adapter (safetensors)")
    assert one_error_line(cli("tools/export.py", "--base", "./no/such/base", "--adapter", "a.safetensors", "--out",
                              setup / "m2")) == "no such checkpoint folder: ./no/such/base"
