"""Tests of data/: formats round-trip exactly, batches are right by hand, errors name what is wrong."""
import json
import math
import re

import numpy as np
import pytest
import torch

import moe
from data import arithmetic, common, pretrain, sorting, stdlib, write
from tasks import prepare

EOS, PAD = 256, 257
# two hand-made samples: (prompt_ids, answer_ids), answers end in eos
SAMPLES = [([EOS, 10, 11], [20, 21, EOS]), ([EOS, 12], [22, EOS])]


def write_samples(folder, split="train", samples=SAMPLES):
    return write.write_sft(folder / f"{split}.npz", samples, tokenizer_name="byte", source="hand", seed=3)


# --- SFT sets

def test_write_load_sft_round_trip_is_exact(tmp_path):
    stats = write_samples(tmp_path)
    assert stats == {"samples": 2, "tokens": 10, "answer_tokens": 5, "longest": 6, "seed": 3}
    with np.load(tmp_path / "train.npz") as f:
        assert f["tokens"].dtype == np.uint32 and f["loss_mask"].dtype == np.uint8
        assert f["tokens"].tolist() == [EOS, 10, 11, 20, 21, EOS, EOS, 12, 22, EOS]
        assert f["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
        assert f["offsets"].tolist() == [0, 6, 10]
    ds = common.load_sft(tmp_path / "train.npz")
    assert len(ds) == 2
    ids, mask = ds[1]
    assert ids.dtype == np.int64 and ids.tolist() == [EOS, 12, 22, EOS]
    assert mask.tolist() == [False, False, True, True]
    assert ds[-2][0].tolist() == [EOS, 10, 11, 20, 21, EOS]
    with pytest.raises(IndexError):
        ds[2]
    assert ds.manifest == {"source": "hand", "tokenizer": "byte", "splits": {"train": stats}}


def test_manifest_keeps_every_split_and_drops_stale_ones(tmp_path):
    write_samples(tmp_path, "train")
    write_samples(tmp_path, "val", SAMPLES[:1])
    assert common.read_manifest(tmp_path)["splits"]["val"]["samples"] == 1
    assert set(common.read_manifest(tmp_path)["splits"]) == {"train", "val"}
    write.write_sft(tmp_path / "test.npz", SAMPLES, tokenizer_name="other", source="hand")
    assert set(common.read_manifest(tmp_path)["splits"]) == {"test"}  # another tokenizer: stale


def test_sft_batch_by_hand(tmp_path):
    write_samples(tmp_path)
    x, y, attention_mask = common.sft_batch(common.load_sft(tmp_path / "train.npz"), [0, 1], 16, PAD)
    # T = longest sample (6) - 1; y is x shifted by one, -100 on prompt targets and padding
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == attention_mask.shape == (2, 5)
    assert x.tolist() == [[EOS, 10, 11, 20, 21], [EOS, 12, 22, PAD, PAD]]
    assert y.tolist() == [[-100, -100, 20, 21, EOS], [-100, 22, EOS, -100, -100]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_sft_batch_truncates_with_one_warning(tmp_path):
    write_samples(tmp_path)
    ds = common.load_sft(tmp_path / "train.npz")
    with pytest.warns(UserWarning) as record:
        x, y, _ = common.sft_batch(ds, [0, 1], 3, PAD)
    assert len(record) == 1 and "truncated 1 of 2" in str(record[0].message)
    assert "lost" not in str(record[0].message)
    assert x.shape == (2, 3) and y.tolist() == [[-100, -100, 20], [-100, 22, EOS]]
    with pytest.warns(UserWarning) as record:
        x, y, _ = common.sft_batch(ds, [0, 1], 2, PAD)
    assert len(record) == 1
    assert "truncated 2 of 2" in str(record[0].message) and "1 of them lost every answer token" in str(record[0].message)
    assert y.tolist() == [[-100, -100], [-100, 22]]


def test_missing_files_name_the_path_and_the_script(tmp_path):
    path = tmp_path / "arithmetic" / "train.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + ".*python data/arithmetic.py"):
        common.load_sft(path)
    path = tmp_path / "stdlib" / "val.bin"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + ".*python data/stdlib.py"):
        stdlib.load_tokens(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "x.jsonl"))):
        prepare.read_jsonl(tmp_path / "x.jsonl")


def test_maker_names_the_recorded_command_else_a_sensible_script(tmp_path):
    folder = tmp_path / "some" / "path"  # train.py --task /some/path: no data/<name> script to name
    assert common.maker(folder / "train.npz") == (
        "the script that prepares it: python data/arithmetic.py or python data/sorting.py for a generated task; "
        f"python tasks/TASK.py --model MODEL --out {folder} for a real one (TASK: gsm8k, humaneval, medmcqa, wmt, "
        "ledgar or tulu)")
    write_samples(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    stale = {**manifest, "made_by": "python tasks/wmt.py --model olmoe", "splits": {"train": {"samples": 5}}}
    (folder / "manifest.json").write_text(json.dumps(stale))
    assert common.maker(folder / "train.npz") == "python tasks/wmt.py --model olmoe"
    with pytest.raises(ValueError, match=r"stale; remake it with `python tasks/wmt\.py --model olmoe`"):
        common.load_sft(folder / "train.npz")
    gsm8k = tmp_path / "gsm8k"  # a real task's folder made with --out, before made_by was recorded
    write_samples(gsm8k)
    (gsm8k / "manifest.json").write_text(json.dumps({**manifest, "model": "olmoe"}))
    assert common.maker(gsm8k / "x") == f"python tasks/gsm8k.py --model olmoe --out {gsm8k}"
    (tmp_path / "ledgar").mkdir()
    (tmp_path / "ledgar" / "manifest.json").write_text("[not an object]")
    assert common.maker(tmp_path / "ledgar" / "x") == f"python tasks/ledgar.py --model MODEL --out {tmp_path}/ledgar"
    assert common.maker(common.DATA_DIR / "medmcqa" / "x").startswith("python tasks/medmcqa.py --model ")
    assert common.maker(tmp_path / "arithmetic" / "x") == "python data/arithmetic.py"


def test_corrupt_npz_and_manifest_name_the_file_and_key(tmp_path):
    write_samples(tmp_path)
    good = (tmp_path / "train.npz").read_bytes()
    (tmp_path / "train.npz").write_bytes(good[: len(good) // 2])  # cut off in the middle
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train.npz")) + ".*not a readable"):
        common.load_sft(tmp_path / "train.npz")
    np.savez(tmp_path / "train.npz", tokens=np.arange(4, dtype=np.uint32), offsets=np.array([0, 4]))
    with pytest.raises(ValueError, match="train.npz: key 'loss_mask'"):
        common.load_sft(tmp_path / "train.npz")
    np.savez(tmp_path / "train.npz", tokens=np.arange(4, dtype=np.uint32), offsets=np.array([0, 3]),
             loss_mask=np.ones(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="key 'offsets'"):
        common.load_sft(tmp_path / "train.npz")
    np.savez(tmp_path / "train.npz", tokens=np.arange(4, dtype=np.uint32), offsets=np.array([0, 1, 4]),
             loss_mask=np.ones(4, dtype=np.uint8))  # a one-token sample has no target
    with pytest.raises(ValueError, match="key 'offsets'"):
        common.load_sft(tmp_path / "train.npz")
    write_samples(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        common.load_sft(tmp_path / "train.npz")
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {}}))
    with pytest.raises(ValueError, match="manifest.json has no key 'splits.train.samples'"):
        common.load_sft(tmp_path / "train.npz")


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty dataset"):
        write_samples(tmp_path, samples=[])
    with pytest.raises(ValueError, match="no answer token"):
        write_samples(tmp_path, samples=[([EOS, 1], [])])
    np.savez(tmp_path / "train.npz", tokens=np.zeros(0, np.uint32), loss_mask=np.zeros(0, np.uint8),
             offsets=np.array([0]))
    with pytest.raises(ValueError, match="holds no samples"):
        common.load_sft(tmp_path / "train.npz")


# --- JSON lines

def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_text('{"q": 1, "a": 2}\n\n{"q": 3\n{"q": 4}\n[1, 2]\n{"q": 5, "a": 6}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3")):
        list(prepare.read_jsonl(path, ["q", "a"]))
    with pytest.warns(UserWarning, match="skipped 3 malformed line"):
        rows = list(prepare.read_jsonl(path, ["q", "a"], skip_bad=True))
    assert rows == [{"q": 1, "a": 2}, {"q": 5, "a": 6}]
    path.write_text('{"q": 1, "a": 2}\n{"q": 4}\n')
    with pytest.raises(ValueError, match=r"line 2: missing key\(s\) \['a'\]"):
        list(prepare.read_jsonl(path, ["q", "a"]))


# --- pretraining corpus

def make_fake_stdlib(root):
    files = {"a.py": "x = 1\n", "b/c.py": "def f():\n    return 2\n", "d.py": "s = 'é'\n",
             "z.py": '"""Add two numbers."""\n# plain English comment here\nprint(1 + 2)  # sum\n',
             "site-packages/pkg.py": "junk = 1\n", "test/t.py": "junk = 2\n", "tests/u.py": "junk = 3\n",
             "b/tests/v.py": "junk = 4\n", "__pycache__/w.py": "junk = 5\n", "e.txt": "not python\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return files


def test_stdlib_excludes_and_sorts(tmp_path):
    make_fake_stdlib(tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in stdlib.list_files(tmp_path)]
    assert names == ["a.py", "b/c.py", "d.py", "z.py"]


def test_stdlib_prepare_counts_and_split(tmp_path):
    files = make_fake_stdlib(tmp_path / "lib")
    m = stdlib.prepare(tmp_path / "out", root=tmp_path / "lib", val_every=2)  # val: b/c.py, z.py
    nbytes = {k: len(v.encode()) for k, v in files.items()}
    assert nbytes["d.py"] == 9  # é is two bytes
    assert m["files"] == 4 and m["bytes"] == 6 + 22 + 9 + nbytes["z.py"] and m["dtype"] == "uint16"
    assert m["splits"]["train"] == {"files": 2, "bytes": 15, "tokens": 15 + 2}  # + one eos per file
    assert m["splits"]["val"]["tokens"] == 22 + nbytes["z.py"] + 2
    val = stdlib.load_tokens(tmp_path / "out" / "val.bin")
    assert val.tolist() == [EOS] + list(files["b/c.py"].encode()) + [EOS] + list(files["z.py"].encode())
    train = stdlib.load_tokens(tmp_path / "out" / "train.bin")
    assert train.tolist() == [EOS] + list(b"x = 1\n") + [EOS] + list("s = 'é'\n".encode())
    m2 = stdlib.prepare(tmp_path / "out2", root=tmp_path / "lib", val_every=2)
    assert m2["sha256"] == m["sha256"]
    (tmp_path / "lib" / "a.py").write_text("x = 2\n")
    assert stdlib.prepare(tmp_path / "out2", root=tmp_path / "lib", val_every=2)["sha256"] != m["sha256"]


def test_load_tokens_detects_truncation_and_get_batch_shifts(tmp_path):
    make_fake_stdlib(tmp_path / "lib")
    stdlib.prepare(tmp_path / "out", root=tmp_path / "lib", val_every=2)
    data = stdlib.load_tokens(tmp_path / "out" / "val.bin")
    x, y = stdlib.get_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    whole = data.tolist()
    for row in x.tolist() + y.tolist():
        assert any(whole[i:i + 8] == row for i in range(len(whole) - 7))
    with pytest.raises(ValueError, match="too few"):
        stdlib.get_batch(data, 1, len(data))
    path = tmp_path / "out" / "val.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated or stale"):
        stdlib.load_tokens(path)


def test_token_dtype_and_range():
    assert stdlib.token_dtype(258) == np.uint16 and stdlib.token_dtype(70_000) == np.uint32
    with pytest.raises(ValueError, match="do not fit uint16"):
        stdlib.write_tokens("/nonexistent/x.bin", np.array([70_000]), np.dtype(np.uint16))


def test_split_kinds_by_hand():
    source = ('"""Module doc."""\nimport os  # why\n# A comment line.\n# ----\n'
              'def f():\n    """Doc of f.\n\n    >>> f()\n    """\n    return 1\n')
    code, prose = stdlib.split_kinds(source)
    assert code == "import os\ndef f():\n    return 1"
    assert prose == "Module doc.\nDoc of f.\nwhy\nA comment line."


def test_kind_samples_come_from_val_files(tmp_path):
    make_fake_stdlib(tmp_path)
    out = stdlib.kind_samples(n=5, length=10, seed=0, root=tmp_path, val_every=2)
    code, prose = stdlib.split_kinds((tmp_path / "z.py").read_text())
    codes = code + "\n" + stdlib.split_kinds((tmp_path / "b/c.py").read_text())[0]
    assert len(out["code"]) == len(out["prose"]) == 5
    assert all(len(s) == 10 and s in codes for s in out["code"])
    assert all(len(s) == 10 and s in prose for s in out["prose"])  # c.py has no prose of 10
    assert stdlib.kind_samples(n=5, length=10, seed=0, root=tmp_path, val_every=2) == out


def test_copy_loss_scores_the_second_showing_only_where_copying_predicts_it():
    class Copier(torch.nn.Module):  # predicts each byte of the second showing from the first, else uniform
        def forward(self, ids):
            logits = torch.zeros(*ids.shape, 300)
            for t in range(length, 2 * length - 1):  # logits at t predict byte t + 1
                logits[torch.arange(len(ids)), t, ids[:, t + 1 - length]] = 100.0
            return moe.Output(loss=None, logits=logits, routers=[])

    length = 20
    out = pretrain.copy_loss(Copier(), n=3, length=length)
    assert out["first"] == pytest.approx(math.log(300), abs=1e-5)  # nothing predicts a random string
    assert out["second"] < 1e-6  # byte `length` (the second showing's first) is not copyable: left out

# --- arithmetic

def test_arithmetic_is_deterministic():
    assert arithmetic.generate(200, seed=5, split="train") == arithmetic.generate(200, seed=5, split="train")
    assert arithmetic.generate(200, seed=5, split="train") != arithmetic.generate(200, seed=6, split="train")


def test_arithmetic_splits_are_disjoint_and_distinct():
    prompts = {s: [r["prompt"] for r in arithmetic.generate(n, 0, s)]
               for s, n in [("train", 5000), ("val", 500), ("test", 500)]}
    for s, p in prompts.items():
        assert len(set(p)) == len(p), s
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["train"]) & set(prompts["val"])
    assert not set(prompts["val"]) & set(prompts["test"])


def test_arithmetic_answers_are_right():
    ops = {"+": 0, "-": 0, "*": 0}
    for row in arithmetic.generate(2000, seed=1, split="train"):
        q = row["prompt"]
        assert q.startswith("Question: ") and q.endswith("?\nAnswer:")
        a, b = map(int, re.findall(r"\d+", q))  # the two operands, in order
        op = "-" if ("gives away" in q or "loses" in q) else "*" if ("boxes" in q or "bags" in q) else "+"
        c = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert 1 <= a <= 9 and 1 <= b <= 9 and c >= 0
        assert row["answer"] == f" {a} {op} {b} = {c}\n#### {c}" and row["target"] == c
        assert arithmetic.extract_answer(row["answer"]) == c
        ops[op] += 1
    assert min(ops.values()) > 500  # all three operations are there


def test_extract_answer_by_hand():
    ex = arithmetic.extract_answer
    assert ex(" 3 + 9 = 12\n#### 12") == 12
    assert ex("#### 12\n#### 13 junk") == 12
    assert ex("so The answer is 3. The answer is 7.") == 7
    assert ex("the answer is -4") == -4 and ex("#### -3") == -3
    assert ex("#### 1,234") == 1234 and ex("#### 8.0") == 8 and ex("#### 7.5") is None
    assert ex("junk 5 + 6") is None and ex("") is None


def test_arithmetic_prepare_writes_loadable_splits(tmp_path):
    m = arithmetic.prepare(tmp_path, sizes={"train": 50, "test": 10})
    assert m["splits"]["train"]["samples"] == 50 and m["splits"]["test"]["seed"] == 1
    # what scores it, recorded, never guessed from the folder's name: exact match, answers read by data.arithmetic
    assert (m["metric"], m["evaluator"]) == ("exact_match", "data.arithmetic") == (
        common.read_manifest(tmp_path)["metric"], common.read_manifest(tmp_path)["evaluator"])
    ds = common.load_sft(tmp_path / "test.npz")
    row = arithmetic.generate(10, 1, "test")[0]
    ids, mask = ds[0]
    n_prompt = 1 + len(row["prompt"])  # eos + one byte per ASCII character
    assert ids.tolist() == [EOS] + list(row["prompt"].encode()) + list(row["answer"].encode()) + [EOS]
    assert mask.tolist() == [False] * n_prompt + [True] * (len(ids) - n_prompt)


# --- sorting

def test_sorting_task():
    rows = sorting.generate(300, 0, "train")
    assert rows == sorting.generate(300, 0, "train")
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in sorting.generate(100, 0, "test")}
    for r in rows:
        letters = r["prompt"].removeprefix("Sort: ").removesuffix("\nAnswer:").split()
        assert 3 <= len(letters) <= 6 and r["answer"] == " " + " ".join(sorted(letters)) == " " + r["target"]
        assert sorting.extract_answer(r["prompt"] + r["answer"]) == r["target"]
    assert sorting.extract_answer(" a b c\nSort: x") == "a b c" and sorting.extract_answer("  \n") is None
