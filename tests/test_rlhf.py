"""RL against a learned reward (grpo.py and ppo_rlvr.py with --reward_model) and rejection sampling by it
(eval.py): the reward model scores each completion as plain transformers does on the conversation rendered
with the reward model's own tokenizer and chat template (here unlike the policy's), prompt-only rows train
against it alone, PPO's value model starts from it, and bad reward models or rows stop the run at once."""

import json
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT, read_metrics, run_script, write_jsonl

sys.path.insert(0, str(ROOT))
import grpo  # noqa: E402

TINY = ROOT / "assets" / "tiny"
# a chat template of another shape than the policy's (roles on the same line, nothing after <|im_end|>)
OTHER_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")


def other_tokenizer(path):
    """The tiny tokenizer with its byte tokens in reverse order and another chat template: the same text gets
    other token ids and another rendering than the policy's."""
    tokenizer = json.loads((TINY / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    special = {a["content"] for a in tokenizer["added_tokens"]}
    ids = sorted(i for token, i in vocab.items() if token not in special)
    tokenizer["model"]["vocab"] = {token: (ids[-1] + ids[0] - i if token not in special else i)
                                   for token, i in vocab.items()}
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "tokenizer_config.json").write_text((TINY / "tokenizer_config.json").read_text())
    (path / "chat_template.jinja").write_text(OTHER_TEMPLATE)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny policy, a random one-label reward model with another tokenizer, a causal LM and a
    two-label classifier (neither a reward model), and prompt-only rows."""
    base = tmp_path_factory.mktemp("rlhf")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY)
    AutoModelForCausalLM.from_config(config).save_pretrained(base / "policy")
    AutoTokenizer.from_pretrained(TINY).save_pretrained(base / "policy")
    tokenizer = other_tokenizer(base / "rm")
    rm = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(
        TINY, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    torch.nn.init.normal_(rm.score.weight, std=1.0)  # scores that differ visibly between completions
    rm.save_pretrained(base / "rm")
    two_labels = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(TINY, num_labels=2))
    two_labels.save_pretrained(base / "two_labels")
    AutoTokenizer.from_pretrained(TINY).save_pretrained(base / "two_labels")
    rows = [json.loads(line) for line in open(ROOT / "data" / "rl_train.jsonl")][:32]
    return {"policy": base / "policy", "rm": base / "rm", "two_labels": base / "two_labels",
            "prompts": write_jsonl(base / "prompts.jsonl", [{"messages": r["messages"]} for r in rows]),
            "rows": write_jsonl(base / "rows.jsonl", rows)}


SCORE = """
import json, sys, torch
import grpo
args = grpo.Args(model=sys.argv[1], reward_model=sys.argv[2], output_dir=sys.argv[3], per_device_batch_size=3,
                 padding_free=sys.argv[4] == "packed")
run = grpo.Run(args, "score")
conversations = json.loads(open(sys.argv[5]).read())
scores = grpo.reward_model_scores(grpo.load_reward_model(args.reward_model, run), conversations, args, run.device)
print(json.dumps(scores.tolist()))
"""


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_the_reward_model_scores_as_transformers_does_with_its_own_tokenizer(models, layout, tmp_path):
    """Completions of several lengths, scored in micro-batches of 3 by the frozen, sharded reward model (FSDP,
    packed or padded) equal plain from_pretrained on each conversation as the reward model's tokenizer
    renders it; the policy's rendering would give other scores."""
    conversations = [[{"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant", "content": f"{i} + {i} = {2 * i}\n#### {2 * i}" + " ok" * i}]
                     for i in range(7)]
    (tmp_path / "conversations.json").write_text(json.dumps(conversations))
    (tmp_path / "score.py").write_text(SCORE)
    proc = run_script(tmp_path / "score.py", models["policy"], models["rm"], tmp_path / "out", layout,
                      tmp_path / "conversations.json", env={"PYTHONPATH": str(ROOT)})
    ours = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=torch.float64)
    rm = AutoModelForSequenceClassification.from_pretrained(models["rm"], dtype=torch.float32).eval()
    rm_tokenizer, policy_tokenizer = AutoTokenizer.from_pretrained(models["rm"]), AutoTokenizer.from_pretrained(TINY)
    with torch.no_grad():
        plain = [rm(rm_tokenizer.apply_chat_template(c, return_tensors="pt", return_dict=True)["input_ids"])
                 .logits[0, 0].item() for c in conversations]
        policy_rendering = [rm(policy_tokenizer.apply_chat_template(c, return_tensors="pt", return_dict=True)
                               ["input_ids"]).logits[0, 0].item() for c in conversations]
    torch.testing.assert_close(ours, torch.tensor(plain, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert (ours - torch.tensor(policy_rendering, dtype=torch.float64)).abs().min() > 1e-3
    assert len(set(plain)) == len(plain)  # every conversation its own score: nothing was scored twice


def test_grpo_trains_prompt_only_rows_against_the_reward_model_alone(models, tmp_path):
    out = tmp_path / "grpo"
    proc = run_script("grpo.py", "--model", models["policy"], "--reward_model", models["rm"], "--dataset",
                      models["prompts"], "--num_generations", 4, "--per_device_batch_size", 8, "--max_steps", 2,
                      "--max_completion_len", 8, "--missing_eos_penalty", 1.0, "--eval_dataset", "None",
                      "--output_dir", out, nproc=2)
    assert f"reward model: {models['rm']} with its own head" in proc.stdout
    for step, row in read_metrics(out).items():
        # no verifier scores these rows: the reward is the reward model's score, less the penalty of the
        # completions cut at 8 tokens (a random policy rarely ends one)
        assert not any(k.startswith("rewards/gsm8k") for k in row) and "rewards/reward_model/mean" in row
        expected = row["rewards/reward_model/mean"] - 1.0 * row["completions/clipped_ratio"]
        assert row["reward"] == pytest.approx(expected, abs=1e-9), step
        assert row["grad_norm"] > 0


def test_ppo_against_the_reward_model_logs_it_beside_the_verifier_and_starts_the_value_model_from_it(models,
                                                                                                      tmp_path):
    out = tmp_path / "ppo"
    proc = run_script("ppo_rlvr.py", "--model", models["policy"], "--reward_model", models["rm"],
                      "--verification_reward", 0, "--non_stop_penalty", "None", "--dataset", models["rows"],
                      "--per_device_batch_size", 8, "--num_ppo_epochs", 1, "--max_steps", 2, "--max_completion_len", 8,
                      "--eval_dataset", "None", "--output_dir", out, nproc=2)
    assert f"value model: {models['rm']} with its own head" in proc.stdout  # InstructGPT's value model init
    for step, row in read_metrics(out).items():
        # no verifier in the score, but its accuracy is logged beside the reward model's score
        assert row["objective/scores"] == pytest.approx(row["objective/reward_model_score"], abs=1e-6), step
        assert 0 <= row["objective/verifiable_correct_rate"] <= 1


def test_a_bad_reward_model_or_a_row_it_cannot_score_stops_the_run_at_once(models, tmp_path):
    common = ["--model", models["policy"], "--eval_dataset", "None", "--output_dir", tmp_path / "out"]
    for script in ("grpo.py", "ppo_rlvr.py"):
        for reward_model, message in [(models["policy"], "not a sequence classifier with one label"),
                                      (models["two_labels"], "not a sequence classifier with one label"),
                                      (tmp_path / "missing", "no such directory")]:
            proc = run_script(script, *common, "--reward_model", reward_model, check=False)
            assert proc.returncode == 1 and f"error: --reward_model {reward_model}: {message}" in proc.stderr, \
                proc.stderr[-2000:]
        proc = run_script(script, *common, "--dataset", models["prompts"], check=False)
        assert proc.returncode == 1 and "row 0: no `ground_truth` and `dataset` for a verifier to score it (a " \
                                        "prompt-only row needs --reward_model)" in proc.stderr, proc.stderr[-2000:]
    with pytest.raises(grpo.InputError, match="--reward_weights needs 3 values \\(verifier, format, reward model\\)"):
        grpo.check_args(grpo.Args(model=str(models["policy"]), output_dir=str(tmp_path / "out"), format_reward=True,
                                  reward_model=str(models["rm"]), reward_weights=[1.0, 1.0]))


def test_eval_samples_prompt_only_rows_and_picks_by_the_reward_model(models, tmp_path):
    """Rejection sampling by a reward model: the best and worst of each prompt's samples by its scores, which are
    plain transformers' on the reward model's own rendering."""
    proc = run_script("eval.py", "--model", models["policy"], "--reward_model", models["rm"], "--dataset",
                      models["prompts"], "--max_rows", 6, "--num_samples", 3, "--temperature", 1.0,
                      "--max_completion_len", 6, "--output", tmp_path / "records.jsonl", "--pairs_output",
                      tmp_path / "pairs.jsonl")
    assert "reward_model/mean" in proc.stdout
    records = [json.loads(line) for line in open(tmp_path / "records.jsonl")]
    rm = AutoModelForSequenceClassification.from_pretrained(models["rm"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(models["rm"])
    for r in records:
        assert r["scores"] is None  # no verifier for these rows
        with torch.no_grad():
            plain = [rm(tokenizer.apply_chat_template(r["messages"] + [{"role": "assistant", "content": c}],
                                                      return_tensors="pt", return_dict=True)["input_ids"])
                     .logits[0, 0].item() for c in r["completions"]]
        assert r["reward_model_scores"] == pytest.approx(plain, abs=1e-4)
