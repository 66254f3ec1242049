"""eval.py: pass@k against brute-force enumeration, scoring through the verifiers, IFEval's four
accuracies, data-parallel evaluation equal to a single process, and bad rows."""

import itertools
import json
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, run_script, write_jsonl

sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402


@pytest.mark.math
@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (6, 3, 4), (4, 4, 2), (8, 1, 8)])
def test_pass_at_k_equals_enumeration(n, c, k):
    """The fraction of all k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.math
def test_summary_scores_per_verifier():
    records = [{"dataset": "gsm8k", "scores": [1.0, 0.0]}, {"dataset": "GSM8K", "scores": [1.0, 1.0]},
               {"dataset": "ifeval", "scores": [0.5, 0.0]}]
    summary = evaluation.summarize(records, 2)
    assert summary["accuracy"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert summary["accuracy/gsm8k"] == pytest.approx(0.75) and summary["accuracy/ifeval"] == pytest.approx(0.25)
    assert summary["pass@2"] == pytest.approx(2 / 3)


def test_ifeval_accuracies_are_prompt_and_instruction_level_strict_and_loose():
    records = [{"dataset": "ifeval", "scores": [0.5, 1.0],
                "followed": [{"strict": [True, False], "loose": [True, True]},
                             {"strict": [True, True], "loose": [True, True]}]},
               {"dataset": "IFEval", "scores": [0.0, 0.0],
                "followed": [{"strict": [False], "loose": [True]}, {"strict": [False], "loose": [False]}]},
               {"dataset": "gsm8k", "scores": [1.0, 1.0]}]
    summary = evaluation.summarize(records, 2)
    assert summary["ifeval/prompt_level_strict_acc"] == pytest.approx(1 / 4)  # only the 2nd completion
    assert summary["ifeval/inst_level_strict_acc"] == pytest.approx(3 / 6)
    assert summary["ifeval/prompt_level_loose_acc"] == pytest.approx(3 / 4)
    assert summary["ifeval/inst_level_loose_acc"] == pytest.approx(5 / 6)
    assert summary["accuracy/ifeval"] == pytest.approx((0.75 + 0.0) / 2) and summary["accuracy/gsm8k"] == 1.0
    assert not any(key.startswith("ifeval/") for key in evaluation.summarize(records[2:], 2))


def test_summary_counts_completions_that_ended_and_their_length():
    records = [{"dataset": "gsm8k", "scores": [1.0, 0.0], "ended": [True, False], "num_tokens": [5, 64]},
               {"dataset": "gsm8k", "scores": [0.0, 0.0], "ended": [False, False], "num_tokens": [64, 64]}]
    summary = evaluation.summarize(records, 2)
    assert summary["completions/ended"] == 0.25 and summary["completions/mean_tokens"] == (5 + 3 * 64) / 4


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("random_model")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "assets" / "tiny")).save_pretrained(path)
    AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny").save_pretrained(path)
    return path


def test_two_ranks_match_one_and_scores_align_with_rows(random_checkpoint, tmp_path):
    common = ["--model", random_checkpoint, "--max_completion_len", 8, "--max_rows", 12]
    proc_one = run_script("eval.py", *common, "--output", tmp_path / "one.jsonl")
    proc_two = run_script("eval.py", *common, "--output", tmp_path / "two.jsonl", nproc=2)
    one = [json.loads(line) for line in open(tmp_path / "one.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert len(one) == 12 and [r["completions"] for r in one] == [r["completions"] for r in two]
    assert last_json(proc_one.stdout) == last_json(proc_two.stdout)
    # every record is scored against its own row's ground truth, after the ranks' results are merged
    rows = [json.loads(line) for line in open(ROOT / "data" / "test.jsonl")][:12]
    verify = evaluation.verifiers.get("gsm8k")
    for record, row in zip(two, rows):
        assert record["ground_truth"] == row["ground_truth"]
        assert record["scores"] == [verify(record["completions"][0], row["ground_truth"])]
    assert last_json(proc_two.stdout)["accuracy"] == pytest.approx(sum(r["scores"][0] for r in two) / 12)


def test_records_go_to_the_working_directory_not_into_the_model(random_checkpoint, tmp_path):
    """Evaluating changes nothing in the model's directory (it may be read-only or shared): without --output
    the records go under the working directory, named after the model and the dataset."""
    before = sorted(p.name for p in random_checkpoint.iterdir())
    dataset = ROOT / "data" / "test.jsonl"
    proc = run_script("eval.py", "--model", random_checkpoint, "--dataset", dataset, "--max_rows", 4,
                      "--max_completion_len", 4, cwd=tmp_path)
    assert sorted(p.name for p in random_checkpoint.iterdir()) == before
    written, = (tmp_path / "runs" / "eval").iterdir()
    assert written.name == f"{str(random_checkpoint).strip('/').replace('/', '-')}__" \
                           f"{str(dataset.with_suffix('')).strip('/').replace('/', '-')}.jsonl"
    assert f"wrote {written.relative_to(tmp_path)}" in proc.stdout
    assert [json.loads(line)["index"] for line in open(written)] == [0, 1, 2, 3]


def test_completions_end_at_the_first_stop_token_or_are_cut_at_max_completion_len(random_checkpoint):
    """sample's completions against the same sampling (same seed) with no stop token: a completion ends at
    the first stop token in it, else it is cut at --max_completion_len."""
    model = evaluation.load_model(random_checkpoint, torch.float32, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(random_checkpoint, padding_side="left")
    prompts = ["What is 12 + 30?", "Hi", "What is 7 times 8?", "What is 3 + 4?"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.generation_config.eos_token_id = None
    torch.manual_seed(0)
    raw = model.generate(**enc, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                         pad_token_id=tokenizer.pad_token_id, use_cache=True)
    raw = raw[:, enc.input_ids.shape[1]:].tolist()
    position = next(p for p in range(1, 8) if raw[0][p] not in raw[0][:p])  # the first time a token appears
    stop = raw[0][position]
    torch.manual_seed(0)
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    completions, ended, _ = evaluation.sample(model, ids, tokenizer.pad_token_id, [stop], 8, temperature=1.0)
    for tokens, completion, stopped in zip(raw, completions, ended):
        expected_length = tokens.index(stop) + 1 if stop in tokens else 8
        assert (stopped, completion) == (stop in tokens, tokens[:expected_length])
    assert ended[0] and len(completions[0]) == position + 1
    assert not all(ended), "every completion ended: pick another seed"


def last_json(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_ifeval_rows_report_strict_and_loose_from_their_completions(random_checkpoint, tmp_path):
    constraints = [("punctuation:no_comma", {}), ("change_case:english_lowercase", {}), ("startend:quotation", {}),
                   ("length_constraints:number_words", {"num_words": 3, "relation": "at least"})]
    rows = [{"messages": [{"role": "user", "content": f"Say something {i}."}], "dataset": "ifeval",
             "ground_truth": json.dumps({"instruction_id": [c[0] for c in constraints[i % 4:]],
                                         "kwargs": [c[1] for c in constraints[i % 4:]]})} for i in range(6)]
    rows.append({"messages": [{"role": "user", "content": "What is 1 + 1?"}], "ground_truth": "2", "dataset": "gsm8k"})
    proc = run_script("eval.py", "--model", random_checkpoint, "--dataset", write_jsonl(tmp_path / "if.jsonl", rows),
                      "--max_completion_len", 12, "--output", tmp_path / "out.jsonl")
    summary = last_json(proc.stdout)
    records = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    strict = [evaluation.instruction_results(r["completions"][0], r["ground_truth"]) for r in records[:6]]
    loose = [evaluation.instruction_results(r["completions"][0], r["ground_truth"], loose=True) for r in records[:6]]
    assert [r["followed"][0] for r in records[:6]] == [{"strict": s, "loose": lo} for s, lo in zip(strict, loose)]
    assert summary["ifeval/prompt_level_strict_acc"] == pytest.approx(sum(map(all, strict)) / 6)
    assert summary["ifeval/inst_level_strict_acc"] == pytest.approx(sum(map(sum, strict)) / sum(map(len, strict)))
    assert summary["ifeval/prompt_level_loose_acc"] == pytest.approx(sum(map(all, loose)) / 6)
    assert summary["ifeval/inst_level_loose_acc"] == pytest.approx(sum(map(sum, loose)) / sum(map(len, loose)))
    assert "followed" not in records[6] and "accuracy/gsm8k" in summary


def test_bad_rows_are_rejected_with_their_index(random_checkpoint, tmp_path):
    rows = [json.loads(line) for line in open(ROOT / "data" / "test.jsonl")][:3]
    rows[1]["dataset"] = "no_such_verifier"
    proc = run_script("eval.py", "--model", random_checkpoint, "--dataset", write_jsonl(tmp_path / "r.jsonl", rows),
                      check=False)
    assert proc.returncode != 0 and "row 1: no verifier named 'no_such_verifier'" in proc.stderr


def test_rejection_sampling_picks_the_best_and_worst_ended_samples_and_counts_the_rest():
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]

    def record(scores, ended):
        return {"messages": prompt, "scores": scores, "ended": ended,
                "completions": [f"answer {i}" for i in range(len(scores))]}

    records = [record([0.0, 1.0, 0.5, 1.0], [True] * 4),  # a tie for the best: the first sampled is taken
               record([1.0, 0.0, 1.0], [False, True, True]),  # the cut one is no example, even scoring 1
               record([1.0, 1.0], [True, True]),  # every ended sample scored the same: no pair
               record([0.0, 0.0, 1.0], [True, True, False]),  # ended, but none correct
               record([1.0, 0.0], [True, False]),  # one ended sample: an SFT row, no pair
               record([1.0, 1.0], [False, False])]  # none ended
    sft_rows, pairs, counts = evaluation.rejection_sampling(records)
    best = [row["messages"][-1]["content"] for row in sft_rows]
    assert best == ["answer 1", "answer 2", "answer 0", "answer 0", "answer 0"]
    assert all(row["messages"][:-1] == prompt and row["messages"][-1]["role"] == "assistant" for row in sft_rows)
    assert [(p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs] == \
        [("answer 1", "answer 0"), ("answer 2", "answer 1")]
    assert all(p["chosen"][:-1] == p["rejected"][:-1] == prompt for p in pairs)
    assert counts == {"prompts": 6, "sft rows": 5, "pairs": 2, "no ended sample": 1, "best below --sft_min_score": 0,
                      "fewer than two ended samples": 1, "every ended sample scored the same": 2,
                      "several samples tied for the best": 3}
    sft_rows, pairs, counts = evaluation.rejection_sampling(records, min_score=1.0)
    assert [row["messages"][-1]["content"] for row in sft_rows] == ["answer 1", "answer 2", "answer 0", "answer 0"]
    assert counts["best below --sft_min_score"] == 1 and len(pairs) == 2


def test_rejection_sampling_files_train_sft_and_dpo_as_they_are(sft_demo_checkpoint, tmp_path):
    """Best-of-4 samples of the demo SFT model on training prompts, scored by the verifier: the SFT rows are
    the correct answers, the pairs a correct and a wrong one, and sft.py and dpo.py train on the files."""
    model, _ = sft_demo_checkpoint
    sft_rows, pairs = tmp_path / "best.jsonl", tmp_path / "pairs.jsonl"
    proc = run_script("eval.py", "--model", model, "--dataset", ROOT / "data" / "rl_train.jsonl", "--max_rows", 24,
                      "--num_samples", 4, "--temperature", 1.0, "--sft_output", sft_rows, "--sft_min_score", 1,
                      "--pairs_output", pairs, "--output", tmp_path / "records.jsonl")
    assert "rejection sampling: prompts 24, sft rows" in proc.stdout
    records = {json.dumps(r["messages"]): r for r in map(json.loads, open(tmp_path / "records.jsonl"))}
    best = [json.loads(line) for line in open(sft_rows)]
    chosen_rejected = [json.loads(line) for line in open(pairs)]
    assert best and chosen_rejected
    for row in best:
        record = records[json.dumps(row["messages"][:-1])]
        assert row["messages"][-1]["content"] in record["completions"]
        assert evaluation.verifiers.get("gsm8k")(row["messages"][-1]["content"], record["ground_truth"]) == 1.0
    for pair in chosen_rejected:
        ground_truth = records[json.dumps(pair["chosen"][:-1])]["ground_truth"]
        scores = [evaluation.verifiers.get("gsm8k")(pair[side][-1]["content"], ground_truth)
                  for side in ("chosen", "rejected")]
        assert scores[0] > scores[1]
    quick = ["--model", model, "--max_steps", 2, "--per_device_batch_size", 4, "--eval_dataset", "None"]
    run_script("sft.py", *quick, "--dataset", sft_rows, "--output_dir", tmp_path / "sft")
    run_script("dpo.py", *quick, "--dataset", pairs, "--output_dir", tmp_path / "dpo",
               "--ref_cache_dir", tmp_path / "ref")
    assert (tmp_path / "sft" / "final").is_dir() and (tmp_path / "dpo" / "final").is_dir()
