"""GSM8K: fine-tune on MetaMathQA (395K rewritten GSM8K and MATH problems), test on GSM8K's 1,319
test problems, 0-shot or 8-shot (the paper's: --shots 8).

    python tasks/gsm8k.py --model olmoe --shots 8  # hf:meta-math/MetaMathQA:train, hf:openai/gsm8k:main:test
    python tasks/gsm8k.py --model PATH --train MetaMathQA-395K.json --test gsm8k/test.jsonl

Rows: MetaMathQA {query, response} (responses end "The answer is: N") or GSM8K {question, answer}
(answers end "#### N"), on either side. One turn: user = the problem, assistant = the solution.
--shots K puts the first K of Wei et al.'s 8 chain-of-thought exemplars (the ones lm-eval's
gsm8k-cot uses) before each TEST problem, as earlier turns of the conversation (user = question,
assistant = worked answer ending "The answer is N."); training samples stay 0-shot.
A test row whose answer has no final number (common.extract_number) is malformed: it could never
count as solved. Metric: "gsm8k" (tasks/metrics.py), lm-eval's two answer filters, strict-match and
flexible-extract. Options: see tasks/prepare.py and --help.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import common  # noqa: E402
from tasks import prepare  # noqa: E402

# the GSM8K exemplars of Wei et al. (2022), "Chain-of-thought prompting", as lm-eval's gsm8k-cot.yaml holds them
EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]


def example(row: dict, args) -> dict:
    if "query" in row:
        question, solution = prepare.text(row, "query"), prepare.text(row, "response")
    else:
        question, solution = prepare.text(row, "question"), prepare.text(row, "answer")
    return {"messages": prepare.chat(question, solution)}


def test_example(row: dict, args) -> dict:
    ex = example(row, args)
    if common.extract_number(ex["messages"][-1]["content"]) is None:
        raise ValueError("the reference answer has no final number ('#### N' or 'The answer is N')")
    shots = [m for q, a in EXEMPLARS[:args.shots] for m in prepare.chat(q, a)]
    return {"messages": shots + ex["messages"]}


def shots(value: str) -> int:
    k = int(value)
    if not 0 <= k <= len(EXEMPLARS):
        raise argparse.ArgumentTypeError(f"--shots takes 0 to {len(EXEMPLARS)}, got {k}")
    return k


def add_args(p):
    p.add_argument("--shots", type=shots, default=0,
                   help="worked exemplars before each test problem: 0 (default) or up to 8, the paper's")


TASK = prepare.Task("gsm8k", train=["hf:meta-math/MetaMathQA:train"], test=["hf:openai/gsm8k:main:test"],
                    train_example=example, test_example=test_example, metric="gsm8k", add_args=add_args,
                    record=("shots",))

if __name__ == "__main__":
    prepare.cli(TASK, __doc__)
