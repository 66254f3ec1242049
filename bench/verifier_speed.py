"""Verifications per second of each verifier on realistic (completion, ground truth) pairs, on CPU.

    python bench/verifier_speed.py [--seconds 1.0]

Inputs: GSM8K reference solutions (tests/data) against bare answers, R1-style MATH completions
with a few hundred characters of reasoning and a boxed answer (right and wrong, numbers and
expressions), IFEval responses of about 150 words against single and multi-constraint ground
truths, and <think> completions for the format check. One process, one thread. Prints one JSON
line per verifier, then a table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanopost import verifiers  # noqa: E402

REASONING = ("<think>Let me set up the equation. The two conditions give a system; substituting the "
             "first into the second and simplifying, I get a quadratic whose roots I check against "
             "the constraints. Only one root is admissible.</think>\n")


def gsm8k_pairs():
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "gsm8k_sample.jsonl").open()]
    answers = [row["answer"].rsplit("####", 1)[1].strip() for row in rows]
    return [(row["answer"], truth) for row in rows for truth in (answers[0], answers[-1])]


def math_pairs():
    answers = [("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{8}"), ("(3, \\frac{\\pi}{2})", "\\left(3,\\frac{\\pi}{2}\\right)"),
               ("x^2+2x+1", "(x+1)^2"), ("\\{1, 2, 3\\}", "\\{3,2,1\\}"), ("[2, 5)", "[2,5)"), ("90^\\circ", "90"),
               ("10\\text{ cm}", "10"), ("\\frac{7}{3}", "\\frac{8}{3}"), ("\\text{Monday}", "\\text{Monday}"),
               ("x = 5", "5"), ("1024", "2^{10}")]
    return [(REASONING + f"So the answer is $\\boxed{{{given}}}$.", truth) for given, truth in answers]


def ifeval_pairs():
    response = ("<<a quiet morning>>\n\nthe *river* moves slowly past the old mill, and the town wakes. " * 4
                + "\n\n* first point\n* second point\n\nP.S. thanks for reading")
    truths = [
        json.dumps({"func_name": "validate_lowercase", "N": None}),
        json.dumps({"func_name": "validate_word_constraint", "N": 100, "quantifier": "at least"}),
        json.dumps({"func_name": "validate_response_language", "language": "en"}),
        json.dumps({"func_name": "verify_keyword_frequency", "word": "river", "N": 4}),
        str([{"instruction_id": ["detectable_format:title", "detectable_format:number_bullet_lists",
                                 "detectable_content:postscript", "punctuation:no_comma"],
              "kwargs": [{}, {"num_bullets": 2}, {"postscript_marker": "P.S."}, {}]}]),
    ]
    return [(response, truth) for truth in truths]


def format_pairs():
    return [(REASONING + "The answer is 42.", ""), ("no reasoning at all", ""), (REASONING, "")]


def measure(name: str, pairs: list[tuple[str, str]], seconds: float) -> tuple[float, float]:
    verify = verifiers.get(name)
    for completion, truth in pairs:  # warm caches (parsed ifeval ground truths, compiled regexes)
        verify(completion, truth)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for completion, truth in pairs:
            verify(completion, truth)
        calls += len(pairs)
    elapsed = time.perf_counter() - start
    return calls / elapsed, 1e6 * elapsed / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent per verifier")
    args = parser.parse_args()
    suites = {"gsm8k": gsm8k_pairs(), "math": math_pairs(), "ifeval": ifeval_pairs(), "format": format_pairs()}
    rows = []
    for name, pairs in suites.items():
        rate, micros = measure(name, pairs, args.seconds)
        rows.append((name, len(pairs), rate, micros))
        print(json.dumps({"impl": "nanopost", "verifier": name, "pairs": len(pairs),
                          "verifications_per_s": round(rate), "us_per_call": round(micros, 1)}), flush=True)
    print(f"\n{'verifier':<10} {'pairs':>6} {'verifications/s':>16} {'us/call':>9}")
    for name, n_pairs, rate, micros in rows:
        print(f"{name:<10} {n_pairs:>6} {rate:>16,.0f} {micros:>9.1f}")


if __name__ == "__main__":
    main()
