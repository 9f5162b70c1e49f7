"""The OLMoE SFT mix (allenai/tulu-v3.1-mix-preview-4096-OLMoE: the conversations OLMoE-1B-7B-Instruct
was tuned on), tested on IFEval's 541 prompts, 0-shot.

    python tasks/tulu.py --model olmoe           # the mix and google/IFEval from the Hub
    python tasks/tulu.py --model PATH --train tulu_mix.jsonl --test ifeval_input_data.jsonl

Train rows: {messages: [{role, content}, ...]}, roles system/user/assistant, ending with an assistant
turn; only that last turn is in the loss (see tasks/chat.py). IFEval rows {key, prompt,
instruction_id_list, kwargs} go to test_prompts.jsonl with their prompt ids. Metric "ifeval"
(tasks/metrics.py): greedy responses to those prompts, checked by lm-eval's ifeval task code (pip install
"lm-eval[ifeval]"); headline "prompt-level strict accuracy". test.npz is a second held-out slice of the
mix, whose loss is reported beside it ("test_loss"); --metric test_loss makes that the headline, for
machines without lm-eval. lm-eval generates up to 1280 tokens: train.py --max_new_tokens 1280 does too.
tasks/ifeval_responses.py writes the responses of a saved adapter to a file.
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
    """An IFEval prompt with what its checks need: the instruction ids and one kwargs dict for each."""
    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise ValueError("'instruction_id_list' is missing, empty or not a list of instruction ids")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"'kwargs' is not a list of {len(ids)} objects, one for each instruction")
    extra = {"key": row.get("key"), "instruction_id_list": ids, "kwargs": kwargs}
    return {"messages": prepare.chat(prepare.text(row, "prompt")), "extra": extra}


def add_args(p):
    p.add_argument("--metric", choices=["ifeval", "test_loss"], default="ifeval",
                   help="ifeval (default; lm-eval scores it) or test_loss, the held-out loss of the mix")


TASK = prepare.Task("tulu", train=["hf:allenai/tulu-v3.1-mix-preview-4096-OLMoE:train"], test=["hf:google/IFEval:train"],
                    train_example=train_example, test_example=test_example, metric="ifeval",
                    prompts_only_test=True, add_args=add_args)

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
