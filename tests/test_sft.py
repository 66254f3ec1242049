"""sft.py: tokenization and masking, packing, end to end on 2 CPU ranks, exact equivalence of
gradient accumulation / data parallelism / resume, the Hugging Face checkpoint, SIGTERM, bad
input, and learning on the demo task."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import PYTHONPATH, ROOT, free_port, read_metrics, run_script, write_jsonl

sys.path.insert(0, str(ROOT))
import sft  # noqa: E402

TINY = str(ROOT / "assets" / "tiny")
# fp32 everywhere so that different batch splits must agree to float rounding
COMMON = ["--precision", "fp32", "--lr", "1e-3", "--max_seq_len", "64", "--warmup_ratio", "0.2"]
# 7 eval rows: uneven over 2 ranks, so the ranks' eval batches differ in count
EVAL_ROWS = [json.loads(line) for line in open(ROOT / "data" / "sft_eval.jsonl")][:7]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


def test_only_assistant_turns_carry_loss(tokenizer):
    messages = [{"role": "system", "content": "You add numbers."},
                {"role": "user", "content": "What is 1 + 2?"},
                {"role": "assistant", "content": "1 + 2 = 3\n#### 3"},
                {"role": "user", "content": "And 40 + 2?"},
                {"role": "assistant", "content": "40 + 2 = 42\n#### 42"}]
    _, eot_text, eot_id, _ = sft.load_tokenizer(TINY)
    assert eot_text == "<|im_end|>" and eot_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, labels = sft.tokenize_conversation(tokenizer, messages, eot_text, 1000, "test")
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    # the labelled tokens, read in order, are exactly each assistant content followed by <|im_end|>
    labelled = tokenizer.decode([t for t in labels if t != -100])
    assert labelled == "1 + 2 = 3\n#### 3<|im_end|>40 + 2 = 42\n#### 42<|im_end|>"
    # and they are contiguous runs that start right after "<|im_start|>assistant\n"
    runs = [i for i in range(len(labels)) if labels[i] != -100 and (i == 0 or labels[i - 1] == -100)]
    assert len(runs) == 2
    for start in runs:
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_truncation_and_malformed_messages(tokenizer):
    messages = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}]
    ids, labels = sft.tokenize_conversation(tokenizer, messages, "<|im_end|>", 10, "r")
    assert len(ids) == len(labels) == 10 and all(x == -100 for x in labels)
    with pytest.raises(ValueError, match="row 7: no assistant message"):
        sft.tokenize_conversation(tokenizer, messages[:1], "<|im_end|>", 10, "row 7")
    with pytest.raises(ValueError, match="row 3: message 1 must be"):
        sft.tokenize_conversation(tokenizer, [messages[0], {"role": "bot", "content": "x"}], "<|im_end|>", 10, "row 3")


def test_padded_micro_batch_equals_separate_sequences():
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), dtype=torch.float32).eval()
    model = sft.PolicyLogprobs(lm)
    rows = [{"input_ids": torch.randint(0, 250, (n,)).tolist(), "labels": torch.randint(0, 250, (n,)).tolist()}
            for n in (9, 5, 12)]
    rows[1]["labels"][:3] = [-100] * 3
    batch, = sft.micro_batches(rows, [0, 1, 2], [9, 5, 12], 0, 1, 3, None, False, pad_id=0)
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == (3, 12) and (targets[2, 4:] == -100).all()  # the 5-token row is padded
    batched = model(**batch)
    separate = []
    for row in rows:  # rows come out longest first
        t = torch.tensor(row["labels"][1:] + [-100])
        logits = lm(torch.tensor([row["input_ids"]])).logits[0].double()
        lp = torch.log_softmax(logits, -1)[t != -100].gather(1, t[t != -100, None]).squeeze(1)
        separate.append((len(row["input_ids"]), lp))
    expected = torch.cat([lp for _, lp in sorted(separate, key=lambda x: -x[0])])
    torch.testing.assert_close(batched.double(), expected, rtol=1e-5, atol=1e-5)


def test_adamw_is_fused_and_steps_as_the_unfused_loop():
    """The scripts' AdamW (fused, with weight decay, through a warmup and the cosine schedule) against
    torch's single-tensor loop, both given the same gradients (random, some near 0, as the k_proj biases'
    are, where Adam's step is largest relative to them): the same weights after 5 steps to float rounding."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), dtype=torch.float32)
    start = {name: param.detach().clone() for name, param in lm.named_parameters()}
    unfused_params = [param.detach().clone().requires_grad_() for param in lm.parameters()]
    optimizer, scheduler = sft.adamw(lm, 1e-2, sft.Args(weight_decay=0.1, warmup_ratio=0.2), total_steps=5)
    assert optimizer.defaults["fused"]
    unfused = torch.optim.AdamW(unfused_params, lr=1e-2, weight_decay=0.1, foreach=False)
    unfused_scheduler = torch.optim.lr_scheduler.LambdaLR(unfused, sft.lr_lambda("cosine", 5, 1))
    for _ in range(5):
        for param, unfused_param in zip(lm.parameters(), unfused_params):
            param.grad = torch.randn_like(param) * 10.0 ** torch.randint(-9, 1, param.shape)
            unfused_param.grad = param.grad.clone()
        for opt, schedule in ((optimizer, scheduler), (unfused, unfused_scheduler)):
            opt.step()
            schedule.step()
    for (name, param), expected in zip(lm.named_parameters(), unfused_params):
        assert not torch.equal(param, start[name]), name
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 steps with a global batch of 4 sequences, split three ways, plus a resume."""
    base = tmp_path_factory.mktemp("sft")
    out = {name: base / name for name in ("ranks2", "accum4", "batch4", "resumed")}
    out["eval_data"] = write_jsonl(base / "eval.jsonl", EVAL_ROWS)
    run_script("sft.py", *COMMON, "--max_steps", 6, "--per_device_batch_size", 1, "--grad_accum_steps", 2,
               "--save_every", 3, "--eval_every", 3, "--eval_dataset", out["eval_data"], "--output_dir", out["ranks2"],
               nproc=2)
    run_script("sft.py", *COMMON, "--max_steps", 6, "--per_device_batch_size", 1, "--grad_accum_steps", 4,
               "--output_dir", out["accum4"])
    run_script("sft.py", *COMMON, "--max_steps", 6, "--per_device_batch_size", 4, "--grad_accum_steps", 1,
               "--output_dir", out["batch4"])
    out["resumed"].mkdir()
    shutil.copytree(out["ranks2"] / "step_3", out["resumed"] / "step_3")
    run_script("sft.py", *COMMON, "--max_steps", 6, "--per_device_batch_size", 1, "--grad_accum_steps", 2,
               "--resume", "--output_dir", out["resumed"], nproc=2)
    return out


def final_weights(path):
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v for k, v in lm.state_dict().items()}


def test_two_ranks_end_to_end(runs):
    out = runs["ranks2"]
    metrics = read_metrics(out)
    assert sorted(metrics) == [0, 1, 2, 3, 4, 5, 6]  # --eval_every 3 evaluates before the first step too
    for step in range(1, 7):
        for key in ("loss", "grad_norm", "learning_rate", "perf/tokens_per_second"):
            assert math.isfinite(metrics[step][key]), key
    assert metrics[0]["eval/loss"] > metrics[3]["eval/loss"]
    assert metrics[1]["loss"] > metrics[6]["loss"]
    assert (out / "step_3" / "trainer_state.json").exists() and (out / "step_6").exists()
    assert not list(out.glob("*.tmp"))
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "tokenizer.json").exists()


def test_accumulation_and_data_parallel_give_the_same_update(runs):
    reference = read_metrics(runs["batch4"])
    weights = final_weights(runs["batch4"] / "final")
    for name in ("accum4", "ranks2"):
        metrics = read_metrics(runs[name])
        for step in range(1, 7):
            assert metrics[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), (name, step)
            assert metrics[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-4), (name, step)
        for key, value in final_weights(runs[name] / "final").items():
            torch.testing.assert_close(value, weights[key], rtol=0, atol=2e-6, msg=f"{name} {key}")


def test_resume_continues_the_same_curve(runs):
    uninterrupted, resumed = read_metrics(runs["ranks2"]), read_metrics(runs["resumed"])
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-6)
        assert resumed[step]["learning_rate"] == uninterrupted[step]["learning_rate"]
    weights = final_weights(runs["ranks2"] / "final")
    for key, value in final_weights(runs["resumed"] / "final").items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)


def test_hf_checkpoint_reproduces_the_trained_model(runs):
    """eval/loss was computed by the sharded model in training; recompute it from final/ with a
    plain Hugging Face forward and full log_softmax."""
    out = runs["ranks2"]
    metrics = read_metrics(out)
    assert "eval/loss" in metrics[3] and metrics[6]["eval/loss"] < metrics[3]["eval/loss"]
    logged = metrics[6]["eval/loss"]
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    lm = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for row in EVAL_ROWS:
        ids, labels = sft.tokenize_conversation(tokenizer, row["messages"], "<|im_end|>", 64, "eval")
        targets = torch.tensor(labels[1:])
        if (targets != -100).sum() == 0:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0, :-1].double(), -1)
        keep = targets != -100
        nll -= logp[keep].gather(1, targets[keep, None]).sum().item()
        count += keep.sum().item()
    assert nll / count == pytest.approx(logged, rel=1e-5)
    assert lm.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "sft.py", *COMMON, "--max_steps", "100000", "--per_device_batch_size", "2", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    # torchrun's own agent exits non-zero on SIGTERM after forwarding it; the workers must not
    saved = sorted(out.glob("step_*"))
    assert "SIGTERM: saved step_" in stdout and "ChildFailedError" not in stderr, stderr[-3000:]
    assert len(saved) == 1 and not list(out.glob("*.tmp")), saved
    step = int(saved[0].name.split("_")[1])
    run_script("sft.py", *COMMON, "--max_steps", step + 1, "--per_device_batch_size", 2, "--resume",
               "--output_dir", out, nproc=2)
    assert sorted(read_metrics(out))[-1] == step + 1


def test_malformed_row_stops_before_training(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}
    data = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    proc = run_script("sft.py", "--dataset", data, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "row 2: message 1 must be" in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_bad_flag_is_rejected(tmp_path):
    proc = run_script("sft.py", "--per_device_batch_size", 0, "--output_dir", tmp_path, check=False)
    assert proc.returncode != 0 and "--per_device_batch_size must be >= 1" in proc.stderr


@pytest.mark.slow
def test_sft_learns_the_demo_task(sft_demo_checkpoint):
    """From random init, the demo SFT run (sft.py's defaults) reaches a held-out exact-answer
    accuracy far above chance (a random model scores 0; measured: 0.72), and imitates its teacher's
    slip: it gets the held-out two-digit carry problems, which the teacher mostly demonstrates with
    the carry dropped, nearly all wrong (measured: 0.04)."""
    path, (accuracy, carry_accuracy) = sft_demo_checkpoint
    metrics = read_metrics(path.parent)
    assert metrics[1]["loss"] > 4 and metrics[max(metrics)]["eval/loss"] < 0.1
    assert accuracy >= 0.55, accuracy
    assert carry_accuracy <= 0.25, carry_accuracy
