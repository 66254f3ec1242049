"""pipeline.py: the demo's stages after SFT from the demo SFT model, as the README runs them: every stage
writes its checkpoint, curves and log, the table and plot are written, and the results tell the README's
story (test_grpo and test_ppo_rlvr hold the curves): the SFT model copies its teacher's carry slip; GRPO and
PPO against the verifier end far above the DPO model they start from, carry problems included; the reward
model ranks most held-out pairs right, and PPO against it raises its score while held-out accuracy falls below
where it started (over-optimization); rejection-sampling SFT on the model's own verified samples fixes part of
the slip. The margins hold in seeds 1 and 2 of the README's table (seed 1 is what CI runs); seed 3's weaker SFT
model is the README's exception."""

import pytest

from conftest import read_metrics


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_reports(demo_pipeline):
    out, results = demo_pipeline
    accuracy, carry = results["accuracy"], results["carry_accuracy"]
    print(f"pipeline held-out accuracy: {accuracy}, carry: {carry}, pairs: {results['pair_accuracy']}, "
          f"seconds: {results['seconds']}")
    assert set(accuracy) == {"sft", "dpo", "grpo", "ppo", "ppo_rm", "rs_sft"}
    assert set(results["pair_accuracy"]) == {"reward_model"}
    assert accuracy["sft"] >= 0.55 and carry["sft"] <= 0.1  # a random model scores 0; the teacher's slip copied
    for stage in ("grpo", "ppo"):  # seeds 1, 2: 88.7-93.7% and 55.8-86.5% on carry, from 81.0-82.7% and 0-34.6%
        assert accuracy[stage] >= accuracy["dpo"] + 0.05 and carry[stage] >= carry["dpo"] + 0.25, (stage, accuracy)
    assert results["pair_accuracy"]["reward_model"] >= 0.62  # 66.5-78.0% in seeds 1-3
    rm_scores = [row["objective/reward_model_score"] for _, row in sorted(read_metrics(out / "ppo_rm").items())
                 if "objective/reward_model_score" in row]
    fifth = len(rm_scores) // 5
    assert sum(rm_scores[-fifth:]) > sum(rm_scores[:fifth]), rm_scores  # the learned reward goes up ...
    assert accuracy["ppo_rm"] < accuracy["dpo"] and accuracy["ppo_rm"] < accuracy["ppo"] - 0.1  # ... accuracy down
    assert carry["rs_sft"] >= carry["sft"] + 0.15, carry  # seeds 1, 2: 63.5-73.1% from 0%
    for stage in ("dpo", "reward_model", "grpo", "ppo", "ppo_rm", "rs_sft"):
        assert (out / stage / "final" / "model.safetensors").exists() and (out / stage / "metrics.jsonl").exists()
        # healthy runs raise no such warning
        assert "is not learning" not in (out / "logs" / f"{stage}.txt").read_text(), stage
    assert (out / "rs_sft" / "best_of_4.jsonl").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert all(f"| {s} |" in table for s in ("dpo", "reward_model", "grpo", "ppo", "ppo_rm", "rs_sft"))
    assert (out / "pipeline.png").stat().st_size > 10_000
