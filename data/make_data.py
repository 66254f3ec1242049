"""Generates the built-in demo task: small-number arithmetic with GSM8K-style answers.

    python data/make_data.py          # rewrites data/*.jsonl, identical every time (fixed seed)

A problem is one of: two-digit addition, three-digit addition, two-digit subtraction (possibly
negative), and one-digit times two-digit multiplication. The answer restates the problem and ends
GSM8K-style ("#### 81"), so the gsm8k verifier scores it. The mix is wide enough that a tiny model
trained briefly with SFT gets some but not all of them right, which leaves room for DPO and RL.

Files (every test problem is held out of every training file):
    sft_train.jsonl  messages; about 10% two-turn conversations   (sft.py --dataset)
    sft_eval.jsonl   messages                                       (sft.py --eval_dataset)
    dpo_train.jsonl  chosen / rejected conversations sharing the prompt; rejected has a
                     plausible wrong answer (carry slip, off by one, swapped digits)
    dpo_eval.jsonl   same format, held-out prompts
    rl_train.jsonl   messages (the prompt) + ground_truth + dataset="gsm8k"
    test.jsonl       held-out problems in the RL format: the accuracy benchmark
"""

import json
import os
import random

SEED = 1234
SIZES = {"sft_train": 6000, "sft_eval": 200, "dpo_train": 3000, "dpo_eval": 200, "rl_train": 3000, "test": 300}
OUT = os.path.dirname(os.path.abspath(__file__))


def sample_problem(rng):
    kind = rng.choices(["add2", "add3", "sub2", "mul"], weights=[3, 2, 3, 2])[0]
    if kind == "add2":
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), "+"
    elif kind == "add3":
        a, b, op = rng.randint(100, 999), rng.randint(100, 999), "+"
    elif kind == "sub2":
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), "-"
    else:
        a, b, op = rng.randint(2, 9), rng.randint(10, 99), "*"
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b}", answer


def prompt_text(expr):
    return f"What is {expr}?"


def answer_text(expr, answer):
    return f"{expr} = {answer}\n#### {answer}"


def wrong_answer(rng, answer):
    """A mistake a model plausibly makes: a carry slip, off by one, or two digits swapped."""
    while True:
        kind = rng.choice(["carry", "one", "swap"])
        if kind == "carry":
            wrong = answer + rng.choice([-10, 10, -100, 100])
        elif kind == "one":
            wrong = answer + rng.choice([-1, 1])
        else:
            digits = list(str(abs(answer)))
            if len(digits) < 2:
                continue
            i = rng.randrange(len(digits) - 1)
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
            wrong = int("".join(digits)) * (1 if answer >= 0 else -1)
        if wrong != answer:
            return wrong


def conversation(expr, answer):
    return [{"role": "user", "content": prompt_text(expr)}, {"role": "assistant", "content": answer_text(expr, answer)}]


def main():
    rng = random.Random(SEED)
    test, seen = [], set()
    while len(test) < SIZES["test"]:
        expr, answer = sample_problem(rng)
        if expr not in seen:
            seen.add(expr)
            test.append((expr, answer))

    def fresh():
        while True:
            expr, answer = sample_problem(rng)
            if expr not in seen:
                return expr, answer

    rows = {name: [] for name in SIZES}
    for name in ("sft_train", "sft_eval"):
        for _ in range(SIZES[name]):
            messages = conversation(*fresh())
            if name == "sft_train" and rng.random() < 0.1:
                messages += conversation(*fresh())
            rows[name].append({"messages": messages})
    for name in ("dpo_train", "dpo_eval"):
        for _ in range(SIZES[name]):
            expr, answer = fresh()
            prompt = [{"role": "user", "content": prompt_text(expr)}]
            rows[name].append({
                "chosen": prompt + [{"role": "assistant", "content": answer_text(expr, answer)}],
                "rejected": prompt + [{"role": "assistant", "content": answer_text(expr, wrong_answer(rng, answer))}],
            })
    for _ in range(SIZES["rl_train"]):
        expr, answer = fresh()
        rows["rl_train"].append({"messages": [{"role": "user", "content": prompt_text(expr)}],
                                 "ground_truth": str(answer), "dataset": "gsm8k"})
    rows["test"] = [{"messages": [{"role": "user", "content": prompt_text(expr)}],
                     "ground_truth": str(answer), "dataset": "gsm8k"} for expr, answer in test]

    for name, items in rows.items():
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            for row in items:
                f.write(json.dumps(row) + "\n")
        print(f"{name}.jsonl: {len(items)} rows")


if __name__ == "__main__":
    main()
