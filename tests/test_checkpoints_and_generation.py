"""What every script saves and how every generator decodes: final/ carries the source model's config
(the KV cache on) in the source's dtype or --save_dtype; the generation copies of grpo.py and
ppo_rlvr.py and eval.py's model decode with a KV cache whatever the model's config says, and the static
cache (the default on CUDA, where generate compiles its decode step) gives exactly the greedy tokens of
the dynamic one, and copies of a prompt in a row are read once and sample what generate samples alone;
--precision bf16 runs every script end to end on 2 CPU ranks (gloo); step_N/ survives
SIGKILLs with --save_total_limit, and --resume unpickles nothing but tensors and plain containers."""

import copy
import fractions
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import PYTHONPATH, ROOT, read_metrics, run_script, write_jsonl

sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import dpo  # noqa: E402
import grpo  # noqa: E402
import ppo_rlvr  # noqa: E402
import sft  # noqa: E402

TINY = ROOT / "assets" / "tiny"
EOT = 2  # <|im_end|> in assets/tiny's tokenizer


def save_checkpoint(path, dtype=torch.bfloat16, **config_changes):
    """A randomly initialized assets/tiny model saved as a pretrained checkpoint in `dtype`.
    initializer_range 0.3 makes greedy completions vary from token to token (at the default 0.02
    the random model repeats one token)."""
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY)
    config.initializer_range = 0.3
    config.update(config_changes)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(path)
    return path


def input_lengths(model):
    """Records the width of input_ids of every forward of `model`."""
    widths = []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    return widths


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def demo_prompts(n):
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    rows = [json.loads(line) for line in open(ROOT / "data" / "test.jsonl")][:n]
    return [tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False).input_ids for r in rows]


# ---------------------------------------------------------------------------------------------
# Generators: a KV cache whatever the config says


@pytest.fixture(scope="module")
def no_cache_lm():
    """A policy loaded from a checkpoint whose config and generation_config switch the cache off."""
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY)
    config.initializer_range = 0.3
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    lm.config.use_cache = False
    lm.generation_config.use_cache = False
    return lm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("script", [grpo, ppo_rlvr])
def test_generation_copy_holds_the_policy_and_decodes_one_token_per_step(script, dtype, no_cache_lm):
    """The copy computes exactly what the policy computes in the compute dtype (FSDP casts parameters,
    not buffers: the rotary frequencies stay fp32), and decodes with a KV cache. Where the policy's
    parameters are whole and in the compute dtype (here fp32: one process), the copy is the parameters
    themselves, not a copy of them."""
    gen_lm = script.generation_copy(script.PolicyLogprobs(no_cache_lm), dtype, torch.device("cpu"), "sdpa")
    script.refresh_generation_copy(script.PolicyLogprobs(no_cache_lm), gen_lm)
    shared = [gen_lm.get_parameter(name).data_ptr() == param.data_ptr()
              for name, param in no_cache_lm.named_parameters()]
    assert all(shared) if dtype == torch.float32 else not any(shared)
    ids = torch.tensor([list(range(3, 60))])
    policy = copy.deepcopy(no_cache_lm)
    for param in policy.parameters():  # what FSDP computes with: parameters cast to the compute dtype
        param.data = param.data.to(dtype)
    torch.testing.assert_close(gen_lm(ids).logits, policy(ids).logits, rtol=0, atol=0)
    widths = input_lengths(gen_lm)
    script.sample(gen_lm, PROMPTS, 0, [EOT], 6)
    # the prompt once, then one new token per step; without a cache every step re-reads everything
    assert widths[0] == 5 and widths[1:] == [1] * (len(widths) - 1) and len(widths) > 1


def test_eval_decodes_one_token_per_step_from_a_checkpoint_without_cache(tmp_path):
    path = save_checkpoint(tmp_path / "no_cache", torch.float32, use_cache=False)
    assert all(json.loads((path / name).read_text())["use_cache"] is False
               for name in ("config.json", "generation_config.json"))
    model = evaluation.load_model(path, torch.float32, torch.device("cpu"))
    widths = input_lengths(model)
    evaluation.sample(model, demo_prompts(2), 0, [EOT], 6)
    assert widths[1:] == [1] * (len(widths) - 1) and len(widths) > 1


# ---------------------------------------------------------------------------------------------
# The static KV cache (the default on CUDA, where generate compiles the decode step) runs on CPU too


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("policy") / "lm", torch.float32)


@pytest.mark.parametrize("script", [grpo, ppo_rlvr])
def test_static_cache_gives_the_greedy_tokens_of_the_dynamic_one(script, policy):
    lm = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    prompts = demo_prompts(6)
    dynamic = script.sample(lm, prompts, 0, [EOT], 12)
    assert len({tuple(c) for c in dynamic[0]}) > 1 and len(set(dynamic[0][0])) > 3  # varied completions
    widths = input_lengths(lm)
    assert script.sample(lm, prompts, 0, [EOT], 12, width=64) == dynamic
    assert widths[0] == 64  # every prompt left-padded to the static width


@pytest.mark.parametrize("script", [grpo, ppo_rlvr, evaluation])
def test_copies_of_a_prompt_are_read_once_and_sample_what_generate_samples_alone(script, policy, monkeypatch):
    """k copies of each prompt in a row (a GRPO group, eval's --num_samples): the model reads each distinct prompt
    once (all but its last token), the copies decode from its repeated KV cache, and with the same seed the
    completions and the sampler's log-probs are those of generate reading every copy itself."""
    cases = {(1, 1, 2, 2): 2, (1, 2, 1, 2): 1, (3, 3, 3): 3, (4,): 1, (1, 1, 2): 1}
    assert {case: script.copies_in_a_row([[t] for t in case]) for case in cases} == cases
    lm = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    prompts = [[int(t) for t in p] for p in demo_prompts(2) for _ in range(4)]
    shapes = []
    lm.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                 with_kwargs=True)
    torch.manual_seed(0)
    shared = script.sample(lm, prompts, 0, [EOT], 12, temperature=1.0)
    width = max(len(p) for p in prompts)
    assert shapes[:3] == [(2, width - 1), (8, 1), (8, 1)]  # 2 distinct prompts, then the 8 copies token by token
    monkeypatch.setattr(script, "copies_in_a_row", lambda prompts: 1)
    shapes.clear()
    torch.manual_seed(0)
    alone = script.sample(lm, prompts, 0, [EOT], 12, temperature=1.0)
    assert shapes[0] == (8, width)
    assert shared[:2] == alone[:2] and len({tuple(c) for c in alone[0]}) > 2  # the same (varied) completions
    for got, expected in zip(shared[2], alone[2]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_eval_static_cache_gives_the_greedy_completions_of_the_dynamic_one(policy):
    def completions(cache):
        args = evaluation.Args(model=str(policy), max_completion_len=12, max_rows=6, generation_cache=cache)
        return [r["completions"] for r in evaluation.evaluate(args)[1]]

    dynamic = completions("dynamic")
    assert completions("static") == dynamic
    assert len(set(c[0] for c in dynamic)) > 1


# ---------------------------------------------------------------------------------------------
# final/: the source's config and dtype


@pytest.mark.parametrize("script", [sft, dpo, grpo, ppo_rlvr])
def test_final_dtype_is_the_source_configs_unless_told(script, tmp_path):
    (tmp_path / "bf16").mkdir()
    (tmp_path / "unnamed").mkdir()
    config = json.loads((TINY / "config.json").read_text())
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    (tmp_path / "unnamed" / "config.json").write_text(json.dumps(config))
    assert script.final_dtype(str(tmp_path / "bf16"), "auto") == torch.bfloat16
    assert script.final_dtype(str(tmp_path / "unnamed"), "auto") == torch.float32
    assert script.final_dtype(str(tmp_path / "bf16"), "fp32") == torch.float32
    assert script.final_dtype(str(tmp_path / "unnamed"), "bf16") == torch.bfloat16


def check_final(final, dtype, source):
    """final/config.json is the source's config (use_cache on) with `dtype`, the weights are stored in
    it, and a plain from_pretrained(final).generate() feeds one new token per step."""
    saved, original = (json.loads((path / "config.json").read_text()) for path in (final, source))
    assert saved["use_cache"] is True and saved["dtype"] == str(dtype).removeprefix("torch.")
    ignored = {"dtype", "transformers_version", "architectures"}
    assert {k: v for k, v in saved.items() if k not in ignored} == {k: v for k, v in original.items() if k not in ignored}
    with safe_open(final / "model.safetensors", "pt") as f, safe_open(source / "model.safetensors", "pt") as g:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {{torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]}
        assert set(f.keys()) == set(g.keys())  # the tied head is not written as a second copy
    lm = AutoModelForCausalLM.from_pretrained(final)
    widths = input_lengths(lm)
    lm.generate(torch.tensor([PROMPTS[0]]), attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=5,
                min_new_tokens=5, do_sample=False)
    assert widths == [5, 1, 1, 1, 1]


def test_final_is_saved_in_the_source_dtype_readable_as_the_umask_says(tmp_path):
    """An fp32 run (the CPU default) from a bf16 checkpoint writes bf16 weights, like the source; every file
    of final/, the weights too (safetensors alone writes them 0600), has the permissions of the umask."""
    source = save_checkpoint(tmp_path / "source")
    out = tmp_path / "run"
    umask = os.umask(0o027)  # inherited by the run: files rw for the owner, r for the group
    try:
        run_script("sft.py", "--model", source, "--max_steps", 1, "--per_device_batch_size", 4, "--max_seq_len", 64,
                   "--eval_dataset", "None", "--output_dir", out)
    finally:
        os.umask(umask)
    check_final(out / "final", torch.bfloat16, source)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (out / "final").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o640"}, modes


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    rl = [json.loads(line) for line in open(ROOT / "data" / "rl_train.jsonl")][:32]
    return {"plain": save_checkpoint(base / "plain"),
            # dropout in the source's config: PPO must train without it and give it back in final/
            "dropout": save_checkpoint(base / "dropout", attention_dropout=0.1),
            "rl": write_jsonl(base / "rl.jsonl", rl)}


# every script under torchrun with gloo and bf16 compute, the RL ones with the static cache, saving fp32
BF16 = ["--precision", "bf16", "--max_steps", 2, "--save_dtype", "fp32", "--eval_dataset", "None"]
RUNS = {
    "sft": ["--per_device_batch_size", 2, "--max_seq_len", 64],
    "dpo": ["--per_device_batch_size", 2, "--max_seq_len", 64],
    "grpo": ["--num_generations", 4, "--per_device_batch_size", 4, "--max_prompt_len", 64, "--max_completion_len", 8,
             "--beta", 0.1, "--generation_cache", "static"],
    "ppo_rlvr": ["--per_device_batch_size", 4, "--num_ppo_epochs", 1, "--max_prompt_len", 64, "--max_completion_len", 8,
                 "--generation_cache", "static"],
}


@pytest.mark.parametrize("script", list(RUNS))
def test_bf16_on_two_ranks_saves_the_source_config(script, sources, tmp_path):
    source = sources["dropout" if script == "ppo_rlvr" else "plain"]
    data = ["--dataset", sources["rl"]] if script in ("grpo", "ppo_rlvr") else []
    if script == "dpo":
        data = ["--ref_cache_dir", tmp_path / "ref"]
    out = tmp_path / "run"
    proc = run_script(f"{script}.py", "--model", source, *BF16, *RUNS[script], *data, "--output_dir", out, nproc=2)
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2]
    if script == "grpo":
        # the reference, stored in bf16, computes what the bf16 policy computed before its first update
        assert metrics[1]["kl"] == 0.0
    if script == "ppo_rlvr":
        # the same for PPO's reference, and dropout is off although the source's config has it: the
        # first minibatch reproduces the rollout's log-probs exactly
        assert metrics[1]["objective/kl"] == 0.0 and metrics[1]["val/ratio"] == 1.0
        # the value model's new head is announced in one line, not in transformers' missing-weights report
        assert "LOAD REPORT" not in proc.stdout + proc.stderr and f"{source} with a new score head" in proc.stdout
    check_final(out / "final", torch.float32, source)


def test_eval_bf16_with_the_static_cache_on_two_ranks(sources, tmp_path):
    proc = run_script("eval.py", "--model", sources["plain"], "--precision", "bf16", "--generation_cache", "static",
                      "--max_rows", 8, "--max_completion_len", 8, "--output", tmp_path / "eval.jsonl", nproc=2)
    records = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    assert [r["index"] for r in records] == list(range(8)) and all(len(r["completions"]) == 1 for r in records)
    assert '"num_rows": 8' in proc.stdout


# ---------------------------------------------------------------------------------------------
# step_N/: resumable, safe to load, as many as asked for


def complete_checkpoints(out):
    return sorted(int(p.name.split("_")[1]) for p in out.glob("step_*") if p.name.split("_")[1].isdigit())


def test_a_deletion_that_a_kill_cut_short_is_finished_by_resume(tmp_path):
    """A kill while an old step_N was being deleted leaves step_N.tmp (its step_N is gone, so no later rotation
    names it): --resume removes it, also when the run has no step left to train (the kill came in the last
    save's rotation)."""
    out = tmp_path / "run"
    flags = ["--eval_dataset", "None", "--per_device_batch_size", "4", "--save_every", "1", "--save_total_limit", "2",
             "--output_dir", out]
    run_script("sft.py", *flags, "--max_steps", 3)
    for max_steps in (3, 4):
        (out / f"step_{max_steps - 2}.tmp").mkdir()  # as the kill left it: renamed, partly deleted
        (out / f"step_{max_steps - 2}.tmp" / "rank0.pt").write_bytes(b"")
        run_script("sft.py", *flags, "--max_steps", max_steps, "--resume")
        assert complete_checkpoints(out) == [max_steps - 1, max_steps] and not list(out.glob("*.tmp"))


def test_save_total_limit_keeps_the_newest_complete_checkpoint_through_sigkills(tmp_path):
    """A run that saves every step and keeps 2 checkpoints is SIGKILLed at 5 random moments (most land in a
    save: a step takes a fraction of a second, its save most of that); each time the newest step_N is
    complete, at most one older one is left beside the 2 (its deletion may be cut short, as step_N.tmp),
    and --resume continues from it, until the run ends with every step logged once. The run is long enough
    that no restart can finish it before its kill comes (a restart trains a few steps in the 0.5 s it gets)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "sft.py", "--eval_dataset", "None", "--per_device_batch_size", "4", "--max_steps", "40",
           "--save_every", "1", "--save_total_limit", "2", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}
    moments = random.Random(0)
    for kill in range(5):
        before = complete_checkpoints(out)
        proc = subprocess.Popen(cmd + (["--resume"] if before else []), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while complete_checkpoints(out)[-1:] <= before[-1:] and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(moments.uniform(0, 0.5))
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read()[-2000:]
        saved = complete_checkpoints(out)
        assert len(saved) <= 3 and saved[-1] > (before[-1] if before else 0), (kill, saved)
        assert (out / f"step_{saved[-1]}" / "trainer_state.json").exists() and \
            (out / f"step_{saved[-1]}" / "rank0.pt").exists()
    run_script("sft.py", *cmd[2:], "--resume")
    assert complete_checkpoints(out) == [39, 40] and not list(out.glob("*.tmp"))
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == list(range(1, 41))


def test_resume_refuses_a_checkpoint_that_would_unpickle_code(tmp_path):
    """step_N/rank{r}.pt is read with torch.load(weights_only=True): tensors and plain containers only. One
    that holds another object (here a Fraction; a malicious one would run code) is refused, in one line."""
    out = tmp_path / "run"
    common = ["--eval_dataset", "None", "--per_device_batch_size", 4, "--save_every", 1, "--output_dir", out]
    run_script("sft.py", *common, "--max_steps", 1)
    state = torch.load(out / "step_1" / "rank0.pt", weights_only=True)
    torch.save({**state, "rollout": fractions.Fraction(1, 3)}, out / "step_1" / "rank0.pt")
    proc = run_script("sft.py", *common, "--max_steps", 2, "--resume", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {out / 'step_1' / 'rank0.pt'} holds more than tensors and plain containers, which --resume does not "
        f"unpickle (it could run code): {proc.stderr.split('(it could run code): ')[1].strip()}"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]
