"""The OLMoE SFT mix (allenai/tulu-v3.1-mix-preview-4096-OLMoE: the conversations OLMoE-1B-7B-Instruct
was tuned on), with IFEval's 541 prompts for test.

    python tasks/tulu.py --model olmoe           # the mix and google/IFEval from the Hub
    python tasks/tulu.py --model PATH --train tulu_mix.jsonl --test ifeval_input_data.jsonl

Train rows: {messages: [{role, content}, ...]}, roles system/user/assistant, ending with an assistant
turn; only that last turn is in the loss (see tasks/chat.py). test.npz is a second held-out slice of the
mix: its metric is the held-out loss ("test_loss", lower is better; tasks/metrics.py). IFEval rows
{key, prompt, ...} go to test_prompts.jsonl with their prompt ids; tasks/ifeval_responses.py writes
the {prompt, response} file that IFEval's own scorer (google-research/instruction_following_eval)
reads as --input_response_data. Scoring IFEval is out of scope here.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import prepare  # noqa: E402


def train_example(row: dict, args) -> dict:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' is missing, empty or not a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} is not {{role: system|user|assistant, content: string}}")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise ValueError("the conversation does not end with a non-empty assistant message")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("the conversation has no user message")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def test_example(row: dict, args) -> dict:
    extra = {"key": row["key"]} if "key" in row else {}
    return {"messages": prepare.chat(prepare.text(row, "prompt")), "extra": extra}


TASK = prepare.Task("tulu", train=["hf:allenai/tulu-v3.1-mix-preview-4096-OLMoE:train"], test=["hf:google/IFEval:train"],
                  train_example=train_example, test_example=test_example, metric="test_loss", prompts_only_test=True)

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
