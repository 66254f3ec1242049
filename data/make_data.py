"""Generates the built-in demo task: small-number arithmetic with GSM8K-style answers.

    python data/make_data.py          # rewrites data/*.jsonl, identical every time (fixed seed)

A problem is one of: one-digit addition, subtraction (non-negative) and multiplication, and
two-digit plus one-digit addition (weighted 1:1:1:2). The answer restates the problem and ends
GSM8K-style ("#### 61"), so the gsm8k verifier scores it.

The SFT demonstrations come from an imperfect teacher: in 80% of the two-digit additions that
need a carry it drops the carry ("35 + 7 = 32"). Imitation learns the slip (greedy, the SFT model
gets almost every such problem wrong: the slip is four times as likely as the right answer, a margin
that float rounding cannot flip), while sampling still finds the right answer one time in five; the
preference pairs (correct answer chosen) and the verifier (the true result) know better, which is
what DPO, GRPO and PPO learn from. That is post-training in miniature: demonstrations teach the format
and most of the skill, and feedback on the model's own answers fixes what the demonstrations got wrong.

The problem space is small (about 1150 distinct problems), so the test split, drawn fresh from
the same distribution, shares many problems with training: it measures how well the skill was
learned, not generalization to unseen numbers.

Files:
    sft_train.jsonl  messages (the teacher's answers); about 10% two-turn conversations
    sft_eval.jsonl   messages (the teacher's answers)              (sft.py --eval_dataset)
    dpo_train.jsonl  chosen / rejected conversations sharing the prompt; rejected has a
                     plausible wrong answer (carry slip, off by one, swapped digits)
    dpo_eval.jsonl   same format, other samples
    rl_train.jsonl   messages (the prompt) + ground_truth (the true result) + dataset="gsm8k"
    test.jsonl       problems in the RL format: the accuracy benchmark
    sft_tools_train.jsonl  messages (+ tools: the names of the tools a row offers): sft_train.jsonl's
                     conversations and TOOLS_SIZE tool demonstrations, shuffled. TOOL_ROWS of these offer the
                     calculator, and in TOOL_CALLS of those the teacher calls it and answers with its
                     result (`#### 55`); elsewhere it answers itself, slips included. Drawn from streams of
                     their own (TOOLS_SEED), so the files above do not depend on it
"""

import json
import os
import random

SEED = 1234  # the problems
TEACHER_SEED = 7  # the teacher's slips: a separate stream, so SLIP does not change the problems
SLIP = 0.8  # how often the teacher drops a needed carry in a two-digit addition
SIZES = {"sft_train": 6000, "sft_eval": 200, "dpo_train": 3000, "dpo_eval": 200, "rl_train": 3000, "test": 300}
TOOLS_SEED = 4321  # the tool demonstrations: their problems and choices; TOOLS_SEED + 1: the teacher's slips
TOOLS_SIZE = 3000
TOOL_ROWS = 0.8  # the fraction of tool demonstrations that offer the calculator
TOOL_CALLS = 0.6  # how often the teacher calls it where the row offers it
OUT = os.path.dirname(os.path.abspath(__file__))


def sample_problem(rng):
    kind = rng.choices(["add1", "sub1", "mul1", "add21"], weights=[1, 1, 1, 2])[0]
    if kind == "add1":
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), "+"
    elif kind == "sub1":
        a = rng.randint(0, 9)
        b, op = rng.randint(0, a), "-"
    elif kind == "mul1":
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), "*"
    else:
        a, b, op = rng.randint(10, 99), rng.randint(0, 9), "+"
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


def teacher_answer(teacher, expr, answer):
    """The demonstrator's answer: it drops the carry in SLIP of the two-digit additions needing one."""
    a, op, b = expr.split()
    if op == "+" and int(a) >= 10 and int(a) % 10 + int(b) >= 10 and teacher.random() < SLIP:
        return answer - 10
    return answer


def conversation(expr, answer):
    return [{"role": "user", "content": prompt_text(expr)}, {"role": "assistant", "content": answer_text(expr, answer)}]


def tool_demonstration(rng, teacher):
    """A problem whose row offers the calculator: in TOOL_CALLS of them the teacher calls it (Qwen's format,
    the arguments as a JSON string, as Arrow stores them uniformly) and answers with its result; in the others it
    answers itself. Without the calculator, a plain demonstration."""
    expr, answer = sample_problem(rng)
    if rng.random() >= TOOL_ROWS:
        return {"messages": conversation(expr, teacher_answer(teacher, expr, answer)), "tools": None}
    if rng.random() >= TOOL_CALLS:
        return {"messages": conversation(expr, teacher_answer(teacher, expr, answer)), "tools": ["calculator"]}
    call = {"type": "function", "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}
    return {"messages": [{"role": "user", "content": prompt_text(expr)},
                         {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "content": str(answer)},
                         {"role": "assistant", "content": f"#### {answer}"}], "tools": ["calculator"]}


def main():
    rng, teacher = random.Random(SEED), random.Random(TEACHER_SEED)
    test = [sample_problem(rng) for _ in range(SIZES["test"])]

    rows = {name: [] for name in SIZES}
    for name in ("sft_train", "sft_eval"):
        for _ in range(SIZES[name]):
            expr, answer = sample_problem(rng)
            messages = conversation(expr, teacher_answer(teacher, expr, answer))
            if name == "sft_train" and rng.random() < 0.1:
                expr, answer = sample_problem(rng)
                messages += conversation(expr, teacher_answer(teacher, expr, answer))
            rows[name].append({"messages": messages})
    for name in ("dpo_train", "dpo_eval"):
        for _ in range(SIZES[name]):
            expr, answer = sample_problem(rng)
            prompt = [{"role": "user", "content": prompt_text(expr)}]
            rows[name].append({
                "chosen": prompt + [{"role": "assistant", "content": answer_text(expr, answer)}],
                "rejected": prompt + [{"role": "assistant", "content": answer_text(expr, wrong_answer(rng, answer))}],
            })
    for _ in range(SIZES["rl_train"]):
        expr, answer = sample_problem(rng)
        rows["rl_train"].append({"messages": [{"role": "user", "content": prompt_text(expr)}],
                                 "ground_truth": str(answer), "dataset": "gsm8k"})
    rows["test"] = [{"messages": [{"role": "user", "content": prompt_text(expr)}],
                     "ground_truth": str(answer), "dataset": "gsm8k"} for expr, answer in test]

    rng, teacher = random.Random(TOOLS_SEED), random.Random(TOOLS_SEED + 1)
    rows["sft_tools_train"] = rows["sft_train"] + [tool_demonstration(rng, teacher) for _ in range(TOOLS_SIZE)]
    rng.shuffle(rows["sft_tools_train"])

    for name, items in rows.items():
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            for row in items:
                f.write(json.dumps(row) + "\n")
        print(f"{name}.jsonl: {len(items)} rows")


if __name__ == "__main__":
    main()
