"""reward_model.py: data formats and the token each conversation is scored at, bad rows, end to end on 2 CPU
ranks, exact equivalence of gradient accumulation / data parallelism / resume, final/ as a standard Hugging
Face sequence classifier that scores through plain transformers as training did, and learning on the demo
preference pairs. The loss against TRL's RewardTrainer: tests/test_trl_reference.py."""

import json
import math
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT, read_metrics, run_script, write_jsonl

sys.path.insert(0, str(ROOT))
import reward_model  # noqa: E402

TINY = str(ROOT / "assets" / "tiny")
CENTER = 0.01
# fp32 everywhere so that different batch splits must agree to float rounding; the centering term on
COMMON = ["--model", TINY, "--precision", "fp32", "--lr", "1e-4", "--max_seq_len", 64, "--warmup_ratio", 0.2,
          "--max_steps", 4, "--center_rewards_coefficient", CENTER]


def demo_rows(name, n, margins=False):
    """The first n demo pairs; with margins, a `margin` column of 0, 0.5 or 1 (per-row margins, as in Llama 2)."""
    rows = [json.loads(line) for line in open(ROOT / "data" / name)][:n]
    return [{**row, "margin": i % 3 / 2} for i, row in enumerate(rows)] if margins else rows


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


def conversations(row):
    prompt, chosen, rejected = reward_model.split_pair(row, "test")
    return prompt + [chosen], prompt + [rejected]


def hf_scores(model, tokenizer, rows):
    """[n, 2] scores of the pairs' conversations through plain transformers, one conversation at a time:
    apply_chat_template, then the sequence classifier's logits."""
    out = []
    for row in rows:
        with torch.no_grad():
            out.append([model(**tokenizer.apply_chat_template(c, return_dict=True, return_tensors="pt")).logits.item()
                        for c in conversations(row)])
    return torch.tensor(out, dtype=torch.float64)


def loss_of(scores, margins, center):
    """The Bradley-Terry loss with margin and centering, written out: softplus(-(r_c - r_r - m)) + c (r_c + r_r)^2."""
    chosen, rejected = scores.unbind(1)
    return (torch.nn.functional.softplus(-(chosen - rejected - margins)) + center * (chosen + rejected) ** 2).mean()


# ---------------------------------------------------------------------------------------------
# Data


def test_both_formats_give_the_conversation_as_apply_chat_template_tokenizes_it(tokenizer, tmp_path, capsys):
    prompt = [{"role": "system", "content": "Add."}, {"role": "user", "content": "What is 1 + 2?"},
              {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 40 + 2?"}]
    good, bad = {"role": "assistant", "content": "40 + 2 = 42"}, {"role": "assistant", "content": "40 + 2 = 24"}
    long_answer = {"role": "assistant", "content": "4" * 200}
    rows = [{"chosen": prompt + [good], "rejected": prompt + [bad], "margin": 1},
            {"prompt": prompt, "chosen": [good], "rejected": [bad], "margin": 0.5},
            {"prompt": prompt, "chosen": [good], "rejected": [long_answer], "margin": 0.0}]
    pad_id = tokenizer.pad_token_id
    pairs = reward_model.tokenize_dataset(str(write_jsonl(tmp_path / "pairs.jsonl", rows)), "train", tokenizer, pad_id,
                                          max_seq_len=160)
    # the pair over --max_seq_len is dropped, not truncated, and the run says so
    assert "dropped 1 of 3 rows, which are longer than --max_seq_len=160" in capsys.readouterr().out
    assert len(pairs) == 2
    assert [p["margin"] for p in pairs] == [1.0, 0.5]
    assert pairs[0]["chosen_ids"] == pairs[1]["chosen_ids"] and pairs[0]["rejected_ids"] == pairs[1]["rejected_ids"]
    for side, response in (("chosen", good), ("rejected", bad)):
        ids = tokenizer.apply_chat_template(prompt + [response], return_dict=True)["input_ids"]
        assert pairs[0][f"{side}_ids"] == ids
    # ChatML: the score is read at the "\n" after the end-of-turn token, the template's last token
    assert tokenizer.decode(pairs[0]["chosen_ids"][-4:]) == "42<|im_end|>\n"
    # a micro-batch's targets mark exactly each conversation's last token, packed or padded
    for packed in (True, False):
        (chunk, batch), = reward_model.micro_batches(pairs, [0, 1], 0, 1, 2, None, packed, pad_id)
        marked = batch["input_ids"][batch["targets"] != -100].tolist()
        ends = [pairs[i][f"{side}_ids"][-1] for side in ("chosen", "rejected") for i in chunk]
        assert marked == ends and len(marked) == 4
    # Tulu 3's preference mixtures: a `prompt` string and conversations that already begin with it
    user, four, five = ({"role": role, "content": text} for role, text in
                        (("user", "What is 2 + 2?"), ("assistant", "4"), ("assistant", "5")))
    tulu = {"prompt": user["content"], "chosen": [user, four], "rejected": [user, five]}
    explicit = {"prompt": [user], "chosen": [four], "rejected": [five]}
    assert reward_model.split_pair(tulu, "r") == reward_model.split_pair(explicit, "r") == ([user], four, five)
    # without a margin column every pair's margin is 0
    plain = reward_model.tokenize_dataset(str(write_jsonl(tmp_path / "plain.jsonl", demo_rows("dpo_eval.jsonl", 3))),
                                          "train", tokenizer, pad_id, max_seq_len=64)
    assert [p["margin"] for p in plain] == [0.0, 0.0, 0.0]


def test_bad_rows_name_the_row_and_the_problem(tokenizer, tmp_path):
    rows = demo_rows("dpo_eval.jsonl", 4, margins=True)
    cases = {
        "row 2: margin must be a finite number, got None": [rows[0], rows[1], {**rows[2], "margin": None}, rows[3]],
        "row 0: margin must be a finite number, got 'high'": [{**row, "margin": "high"} for row in rows],
        "row 1 rejected: expected a non-empty list": [rows[0], {**rows[1], "rejected": None}, rows[2]],
        "row 3: chosen and rejected must share the prompt": [*rows[:3], {**rows[3], "rejected": rows[0]["rejected"]}],
    }
    for i, (message, bad) in enumerate(cases.items()):
        path = str(write_jsonl(tmp_path / f"bad{i}.jsonl", bad))
        with pytest.raises(reward_model.InputError, match=message):
            reward_model.tokenize_dataset(path, "train", tokenizer, tokenizer.pad_token_id, 64)
    # a pad token that ends the conversation: a sequence classifier would read the token before it
    newline = tokenizer.apply_chat_template(conversations(rows[0])[0], return_dict=True)["input_ids"][-1]
    with pytest.raises(reward_model.InputError, match="row 0: chosen ends with the pad token"):
        reward_model.tokenize_dataset(str(write_jsonl(tmp_path / "good.jsonl", rows)), "train", tokenizer, newline, 64)
    with pytest.raises(reward_model.InputError, match="--center_rewards_coefficient must be >= 0"):
        reward_model.check_args(reward_model.Args(model=TINY, center_rewards_coefficient=-0.1))


def test_a_bad_margin_stops_the_run_before_training(tmp_path):
    rows = demo_rows("dpo_train.jsonl", 8, margins=True)
    rows[5]["margin"] = [1.0]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = run_script("reward_model.py", "--model", TINY, "--dataset", data, "--output_dir", tmp_path / "out",
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {data} row 5: margin must be a finite number, got [1.0]"]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("reward_model_data")
    return {"train": write_jsonl(base / "train.jsonl", demo_rows("dpo_train.jsonl", 32, margins=True)),
            "eval": write_jsonl(base / "eval.jsonl", demo_rows("dpo_eval.jsonl", 7, margins=True))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """The same 4 steps with a global batch of 4 pairs (margins and the centering term on), split three ways,
    plus a resume; 7 eval pairs, uneven over 2 ranks."""
    base = tmp_path_factory.mktemp("reward_model")
    out = {name: base / name for name in ("ranks2", "accum4", "batch4", "resumed")}
    common = [*COMMON, "--dataset", data["train"], "--eval_dataset", data["eval"]]
    run_script("reward_model.py", *common, "--per_device_batch_size", 1, "--grad_accum_steps", 2, "--save_every", 2,
               "--eval_every", 2, "--output_dir", out["ranks2"], nproc=2)
    run_script("reward_model.py", *common, "--per_device_batch_size", 1, "--grad_accum_steps", 4,
               "--output_dir", out["accum4"])
    run_script("reward_model.py", *common, "--per_device_batch_size", 4, "--output_dir", out["batch4"])
    out["resumed"].mkdir()
    shutil.copytree(out["ranks2"] / "step_2", out["resumed"] / "step_2")
    run_script("reward_model.py", *common, "--per_device_batch_size", 1, "--grad_accum_steps", 2, "--resume",
               "--output_dir", out["resumed"], nproc=2)
    return out


def final_weights(path):
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).state_dict()


def test_two_ranks_end_to_end(runs, tokenizer):
    """The logged metrics of the first step, against the initial model's scores of the first batch computed here
    through plain transformers and the loss written out: the initial model is assets/tiny initialized with --seed 1
    and the new score head, as load_sequence_classifier makes it on rank 0."""
    out = runs["ranks2"]
    metrics = read_metrics(out)
    assert sorted(metrics) == [0, 1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in ("loss", "accuracy", "margin", "mean_reward", "grad_norm", "learning_rate",
                    "perf/tokens_per_second"):
            assert math.isfinite(metrics[step][key]), key
    for step in (0, 2, 4):
        assert {"eval/loss", "eval/accuracy", "eval/margin", "eval/mean_reward"} <= set(metrics[step])
    rows = demo_rows("dpo_train.jsonl", 32, margins=True)
    first = [rows[i] for i in reward_model.global_batch(0, len(rows), 4, seed=1)]
    torch.manual_seed(1)
    fake_run = SimpleNamespace(rank=0, args=SimpleNamespace(attn_implementation="sdpa", resume=False))
    initial = reward_model.load_sequence_classifier(TINY, fake_run, "reward model").eval()
    initial.config.pad_token_id = tokenizer.pad_token_id
    scores = hf_scores(initial, tokenizer, first)
    margins = torch.tensor([row["margin"] for row in first], dtype=torch.float64)
    assert metrics[1]["loss"] == pytest.approx(loss_of(scores, margins, CENTER).item(), rel=1e-5)
    assert metrics[1]["accuracy"] == (scores[:, 0] > scores[:, 1]).double().mean().item()
    assert metrics[1]["margin"] == pytest.approx((scores[:, 0] - scores[:, 1]).mean().item(), rel=1e-5, abs=1e-6)
    assert metrics[1]["mean_reward"] == pytest.approx(scores.mean().item(), rel=1e-5, abs=1e-6)
    assert (out / "step_2" / "trainer_state.json").exists() and (out / "step_4").exists()
    assert not list(out.glob("*.tmp"))


def test_accumulation_and_data_parallel_give_the_same_update(runs):
    """4 pairs in one micro-batch (batch4), 4 micro-batches of 1 (accum4), 2 ranks x 2 micro-batches of 1 (ranks2):
    the first step's metrics and gradient norm agree to float rounding. After it, ranks2 and accum4, whose forwards
    are the same, agree to float rounding throughout, weights included. batch4's forward of 4 pairs at once rounds
    differently; as in DPO, the chosen and rejected gradients nearly cancel on some weights (the pair shares its
    prompt), whose rounding Adam's normalized step turns into full steps: a few of the 0.8M weights end up about
    1e-5 apart (measured: 7 by more than 2e-6), and the logged numbers in their sixth digit."""
    batch4, accum4, ranks2 = (read_metrics(runs[name]) for name in ("batch4", "accum4", "ranks2"))
    for metrics in (accum4, ranks2):
        for key in ("loss", "margin", "mean_reward", "grad_norm"):
            assert metrics[1][key] == pytest.approx(batch4[1][key], rel=1e-6, abs=1e-6), key
        assert metrics[1]["accuracy"] == batch4[1]["accuracy"]
    for step in range(1, 5):
        for key in ("loss", "margin", "mean_reward", "grad_norm", "eval/loss"):
            if key in batch4[step]:
                assert ranks2[step][key] == pytest.approx(accum4[step][key], rel=1e-5, abs=1e-6), (step, key)
                assert accum4[step][key] == pytest.approx(batch4[step][key], rel=1e-5, abs=1e-5), (step, key)
    weights = final_weights(runs["accum4"] / "final")
    for key, value in final_weights(runs["ranks2"] / "final").items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=2e-6, msg=key)
    diff = torch.cat([(value - weights[key]).abs().flatten()
                      for key, value in final_weights(runs["batch4"] / "final").items()])
    assert diff.max() < 5e-5 and (diff > 2e-6).double().mean() < 1e-4, (diff.max(), (diff > 2e-6).sum())


def test_resume_continues_the_same_curve(runs):
    uninterrupted, resumed = read_metrics(runs["ranks2"]), read_metrics(runs["resumed"])
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "margin", "learning_rate"):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-6), (step, key)
    weights = final_weights(runs["ranks2"] / "final")
    for key, value in final_weights(runs["resumed"] / "final").items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)


def test_final_is_a_sequence_classifier_that_scores_as_training_did(runs, data):
    """final/ loads with plain from_pretrained as a one-label sequence classifier whose pad token is the tokenizer's.
    Its scores of the held-out pairs (apply_chat_template, then the logits; one at a time and in a right-padded
    batch) give the eval metrics that training logged from its own packed forward at the last step, and equal
    the packed forward of final/'s weights pair by pair."""
    final = runs["ranks2"] / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["id2label"] == {"0": "LABEL_0"}
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    rows = demo_rows("dpo_eval.jsonl", 7, margins=True)
    scores = hf_scores(model, tokenizer, rows)
    chats = [c for row in rows for c in conversations(row)]
    with torch.no_grad():
        batched = model(**tokenizer.apply_chat_template(chats, padding=True, return_dict=True,
                                                        return_tensors="pt")).logits.double().view(-1, 2)
    torch.testing.assert_close(batched, scores, rtol=1e-5, atol=1e-6)
    logged = read_metrics(runs["ranks2"])[4]
    margins = torch.tensor([row["margin"] for row in rows], dtype=torch.float64)
    assert logged["eval/loss"] == pytest.approx(loss_of(scores, margins, CENTER).item(), rel=1e-5)
    assert logged["eval/accuracy"] == (scores[:, 0] > scores[:, 1]).double().mean().item()
    assert logged["eval/margin"] == pytest.approx((scores[:, 0] - scores[:, 1]).mean().item(), rel=1e-5, abs=1e-6)
    assert logged["eval/mean_reward"] == pytest.approx(scores.mean().item(), rel=1e-5, abs=1e-6)
    # the training-time forward of final/'s weights, its micro-batch packed into one row (the default) or padded
    pairs = reward_model.tokenize_dataset(str(data["eval"]), "train", tokenizer, tokenizer.pad_token_id, 64)
    for packed in (True, False):
        wrapper = reward_model.RewardScores(AutoModelForSequenceClassification.from_pretrained(final))
        if packed:
            wrapper.lm.set_attn_implementation("packed")
        (chunk, batch), = reward_model.micro_batches(pairs, list(range(len(pairs))), 0, 1, len(pairs), None, packed,
                                                     tokenizer.pad_token_id)
        with torch.no_grad():
            trained = torch.stack(wrapper(**batch).double().split(len(chunk)), 1)
        torch.testing.assert_close(trained, scores[chunk], rtol=1e-5, atol=1e-6, msg=f"packed={packed}")


# ---------------------------------------------------------------------------------------------
# Learning


@pytest.mark.slow
def test_reward_model_learns_the_demo_preferences(demo_pipeline):
    """The pipeline's reward model stage (reward_model.py's defaults from the demo SFT model: one epoch over the
    3000 demo pairs, 187 steps). The held-out pairs' accuracy (the chosen answer is the correct one) goes from
    about chance with the new head (0.37 to 0.60, margins within 0.2 of 0) to far above it (0.665 to 0.78), over the
    demo SFT models of several seeds and of the code before and after the CPU speed-ups."""
    out, _ = demo_pipeline
    metrics = read_metrics(out / "reward_model")
    last = max(metrics)
    start = metrics[0]
    assert abs(start["eval/margin"]) <= 0.5 and start["eval/loss"] <= math.log(2) + 0.2 and start["eval/accuracy"] <= 0.62
    assert metrics[last]["eval/accuracy"] >= max(0.62, start["eval/accuracy"] + 0.1), metrics[last]
    assert metrics[last]["eval/loss"] <= math.log(2) - 0.15 and metrics[last]["eval/margin"] >= 1, metrics[last]
