"""Chat formats: how a conversation becomes (prompt ids, answer ids), with the loss on the answer only.

- A checkpoint whose tokenizer_config.json (or chat_template.jinja, where transformers 5 writes it)
  holds a `chat_template` is formatted by that template, rendered with jinja2 the way transformers
  renders it (sandboxed, trim_blocks, lstrip_blocks, loop controls, raise_exception). Examples:
  OLMoE-Instruct's tulu template `<|user|>\\n...\\n<|assistant|>\\n...<|endoftext|>`, Qwen's ChatML
  `<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>`.
  prompt = the template over every message but the last, with add_generation_prompt=True;
  answer = what the whole conversation adds after that prompt: the assistant's text and the
  template's end-of-turn marker. Whitespace the template writes after the end of turn is dropped,
  and the tokenizer's eos is appended unless the answer already ends in it (OLMoE: the marker IS eos;
  Qwen base: `<|im_end|>` then `<|endoftext|>`), so every answer ends in eos and generation stops there.
- A model without a template (the tiny byte model, base checkpoints) gets the plain format
  "Question: {user}\\nAnswer:" / " {assistant}" + eos, with common.encode_sample's leading eos.
  We never guess a template: `--chat_template` borrows one from another checkpoint, on purpose.
- Only the LAST assistant message is in the loss; earlier turns are context. (The SFT files hold one
  prompt/answer boundary per sample; multi-turn loss on every assistant turn would need a general mask.)
- Prompt and answer are tokenized separately, exactly as the prompt is tokenized alone at generation.
"""
import datetime
import hashlib
import json
import os
from pathlib import Path

from data import common


def read_template(path) -> tuple[str | None, dict]:
    """(chat template or None, special token strings) of a checkpoint folder, a tokenizer_config.json
    or a .jinja file. A template list ([{name, template}], older configs) gives its 'default' entry."""
    path = Path(path)
    if path.suffix == ".jinja":
        return path.read_text(), {}
    folder, config_file = (path, path / "tokenizer_config.json") if path.is_dir() else (path.parent, path)
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}.get("default")
    if (folder / "chat_template.jinja").exists():  # where newer transformers versions write it
        template = (folder / "chat_template.jinja").read_text()
    special = {}
    for key, value in config.items():  # bos_token, eos_token, ...: plain strings or {"content": ...}
        if key.endswith("_token") and isinstance(value, dict):
            value = value.get("content")
        if key.endswith("_token") and isinstance(value, str):
            special[key] = value
    return template, special


def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)  # no HTML escaping
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


class ChatFormat:
    """The way one model wants its conversations. `name` goes into manifest.json."""

    def __init__(self, tokenizer, template: str | None = None, special: dict | None = None):
        self.tokenizer, self.template, self.special = tokenizer, template, dict(special or {})
        self.name = "plain" if template is None else "chat_template sha256:" + hashlib.sha256(template.encode()).hexdigest()[:16]
        if template is not None:
            try:
                self._jinja = _compile(template)
            except ImportError as e:
                raise ImportError("rendering the checkpoint's chat template needs jinja2 (a transformers "
                                  "dependency): pip install jinja2") from e
            # what the template writes after an assistant turn: "<|endoftext|>\n" (OLMoE), "<|im_end|>\n" (Qwen)
            sentinel = "\x00ANSWER\x00"
            full = self.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}])
            after = full.split(sentinel)[-1]
            self._tail = after[len(after.rstrip()):]  # trailing whitespace to drop from answers

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """What the model sees before it answers the last user message (generation, IFEval)."""
        if self.template is None:
            return common.encode_prompt(self.tokenizer, _plain_prompt(messages))
        return self.tokenizer.encode(self.render(messages, add_generation_prompt=True))

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of a conversation that ends with an assistant message."""
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("a training conversation must end with an assistant message")
        if self.template is None:
            return common.encode_sample(self.tokenizer, _plain_prompt(messages[:-1]), " " + messages[-1]["content"])
        prompt = self.render(messages[:-1], add_generation_prompt=True)
        full = self.render(messages)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the conversation differently with and without its answer; "
                             "cannot tell prompt from answer")
        answer = full[len(prompt):]
        if self._tail and answer.endswith(self._tail):
            answer = answer[: -len(self._tail)]
        ids = self.tokenizer.encode(answer)
        if not ids or ids[-1] != self.tokenizer.eos_id:
            ids.append(self.tokenizer.eos_id)
        return self.tokenizer.encode(prompt), ids


def _plain_prompt(messages: list[dict]) -> str:
    """System text first, earlier turns as Question/Answer pairs, the last user message as the question."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        elif m["role"] == "user":
            parts.append(f"Question: {m['content']}\nAnswer:")
        else:
            parts.append(f" {m['content']}\n\n")
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user message")
    return "".join(parts)


def load_format(model: str, template_from: str | None = None):
    """(tokenizer, ChatFormat) of a checkpoint folder or known name (hf.find_checkpoint, no download,
    weights not needed), or 'tiny' (ByteTokenizer, plain). template_from: take the chat template from
    there instead."""
    import hf

    if model == "tiny":
        tokenizer, path = hf.ByteTokenizer(), None
    else:
        path = hf.find_checkpoint(model, download=False, weights=False)
        with open(os.path.join(path, "config.json")) as f:
            cfg = hf.config_from_hf(json.load(f), source=os.path.join(path, "config.json"))
        tokenizer = hf.load_tokenizer(path, cfg)
    template, special = read_template(path) if path else (None, {})
    if template_from:
        template, _ = read_template(template_from)
        if template is None:
            raise ValueError(f"--chat_template {template_from}: no chat template there")
    if template is not None and isinstance(tokenizer, hf.ByteTokenizer):
        raise ValueError("the byte tokenizer has no special tokens for a chat template: use the plain format")
    return tokenizer, ChatFormat(tokenizer, template, special)
