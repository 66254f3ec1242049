"""bench/gpu_check.py without a GPU: its plan, its step runner and its summary."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

SCRIPTS = ["sft", "sft_resume", "dpo", "reward_model", "grpo", "ppo_rlvr", "eval"]


def test_help_says_what_it_runs_needs_and_writes():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    for words in ("tests/test_kernels_gpu.py", "torchrun", "nccl", "bf16", "Qwen2.5-0.5B", "tyro", "datasets",
                  "liger-kernel", "cut-cross-entropy", "trl", "--wheels", "bench/results", "summary.md"):
        assert words in result.stdout, words


def test_plan_runs_every_script_and_every_benchmark():
    plan = gpu_check.build_plan(cpu_smoke=False, model_dir="/m", work_dir="/w")
    steps = {s.name: s for s in plan}
    benches = sorted(p.stem for p in (ROOT / "bench").glob("*.py")
                     if p.stem != "gpu_check" and p.name not in gpu_check.CPU_BENCHMARKS)
    assert list(steps) == ["tests", *SCRIPTS, *(f"bench_{b}" for b in ["fused_head", "sft", "dpo", "grpo", "ppo_rlvr",
                                                                          "padding_free", "verifier_speed"])]
    assert sorted(n.removeprefix("bench_") for n in steps if n.startswith("bench_")) == benches
    assert "tests/test_kernels_gpu.py" in steps["tests"].cmd and "tests/test_kernels_aot.py" in steps["tests"].cmd
    for name in SCRIPTS:
        cmd = " ".join(steps[name].cmd)
        assert "torch.distributed.run --standalone --nproc_per_node 1" in cmd, name
        assert steps[name].needs_cuda and {"tyro", "datasets"} <= set(steps[name].needs)
    for name in SCRIPTS[:-1]:
        cmd = steps[name].cmd
        assert cmd[cmd.index("--model") + 1] == "/m" and cmd[cmd.index("--precision") + 1] == "bf16", name
    resume = steps["sft_resume"].cmd
    assert "--resume" in resume and resume[resume.index("--output_dir") + 1] == "/w/runs/sft"
    assert steps["sft_resume"].metrics_file == steps["sft"].metrics_file == "/w/runs/sft/metrics.jsonl"
    assert steps["eval"].cmd[steps["eval"].cmd.index("--model") + 1] == "/w/runs/sft/final"

    smoke = {s.name: s for s in gpu_check.build_plan(cpu_smoke=True, model_dir="assets/tiny", work_dir="/w")}
    assert list(smoke) == list(steps)
    assert not any("bf16" in s.cmd for s in smoke.values())
    assert smoke["bench_fused_head"].needs_cuda and not smoke["bench_dpo"].needs_cuda
    assert "--small" in smoke["bench_dpo"].cmd and "--tiny" in smoke["bench_grpo"].cmd


def test_a_benchmark_missing_from_the_plan_is_an_error(monkeypatch):
    files = [str(p) for p in (ROOT / "bench").glob("*.py")] + [str(ROOT / "bench" / "new_bench.py")]
    monkeypatch.setattr(gpu_check.glob, "glob", lambda pattern: files)
    with pytest.raises(RuntimeError, match="new_bench.py"):
        gpu_check.build_plan(cpu_smoke=False, model_dir="/m", work_dir="/w")


def test_only_and_skip_take_steps_and_groups():
    plan = gpu_check.build_plan(cpu_smoke=False, model_dir="/m", work_dir="/w")
    assert [s.name for s in gpu_check.select(plan, ["scripts"], ["sft_resume"])] == \
        ["sft", "dpo", "reward_model", "grpo", "ppo_rlvr", "eval"]
    assert [s.name for s in gpu_check.select(plan, ["tests", "bench_sft"], None)] == ["tests", "bench_sft"]
    with pytest.raises(SystemExit, match="unknown step or group bench_nope"):
        gpu_check.select(plan, ["bench_nope"], None)


def test_model_dir_is_a_config_only_qwen2_5_0_5b_shape(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    gpu_check.make_model_dir(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size) == \
        ("qwen2", 896, 24, 151936)
    assert config.tie_word_embeddings and config.num_attention_heads == 14 and config.num_key_value_heads == 2
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert config.eos_token_id == tokenizer.eos_token_id and len(tokenizer) <= config.vocab_size
    assert not list(tmp_path.glob("*.safetensors"))  # the scripts initialize it randomly


def test_run_step_records_output_and_kills_a_step_past_its_timeout(tmp_path):
    code = ("import time; print('{\"impl\": \"nanopost\", \"ms\": 1.5}', flush=True); print('not json {'); "
            "time.sleep(60)")
    step = gpu_check.Step("slow", "bench", [sys.executable, "-c", code], timeout_s=2)
    record = gpu_check.run_step(step, None, tmp_path / "slow.log")
    assert record["status"] == "timeout" and record["seconds"] < 30
    assert record["results"] == [{"impl": "nanopost", "ms": 1.5}]
    step = gpu_check.Step("fails", "bench", [sys.executable, "-c", "import sys; sys.exit('broken')"], timeout_s=60)
    record = gpu_check.run_step(step, None, tmp_path / "fails.log")
    assert record["status"] == "failed" and record["returncode"] == 1 and "broken" in record["reason"]


def sample_records():
    kernels = [
        {"impl": "torch_eager_full_logits", "H": 896, "ms": 60.0, "peak_extra_GiB": 9.5},
        {"impl": "nanopost", "H": 896, "ms": 20.0, "peak_extra_GiB": 0.44},
        {"impl": "apple_cce", "H": 896, "ms": 25.0, "peak_extra_GiB": 0.28},
        {"impl": "nanopost", "H": 4096, "ms": 110.0, "peak_extra_GiB": 1.54},
        {"impl": "apple_cce", "H": 4096, "ms": 100.0, "peak_extra_GiB": 1.29},
        {"impl": "liger_flce", "skipped": "liger-kernel is not installed"},
    ]
    sft = [{"impl": "nanopost", "tokens_per_s": 120000, "peak_GiB": 17.5},
           {"impl": "hf", "tokens_per_s": 75000, "peak_GiB": 51.8},
           {"impl": "hf_liger", "skipped": "liger-kernel is not installed"}]
    return [
        dict(name="tests", group="tests", status="passed", seconds=95.0, results=[], reason="11 passed in 90.1s"),
        dict(name="sft", group="scripts", status="failed", seconds=12.0, results=[], reason="...\nRuntimeError: boom"),
        dict(name="dpo", group="scripts", status="skipped", seconds=0, results=[], reason="needs tyro (not installed)"),
        dict(name="bench_fused_head", group="bench", status="passed", seconds=80.0, results=kernels),
        dict(name="bench_sft", group="bench", status="passed", seconds=60.0, results=sft),
    ]


def test_summary_compares_with_each_anchor_and_lists_every_step(tmp_path):
    machine = {"python": "3.12.3", "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "gpu": "NVIDIA H100",
               "gpu_memory_GiB": 79.2, "capability": "9.0", "sms": 132, "shared_memory_per_block_optin": 232448,
               "date": "2025-01-01 12:00"}
    gpu_check.write_summary(tmp_path, machine, sample_records())
    summary = json.loads((tmp_path / "summary.json").read_text())
    compared = {(c["bench"], c["case"], c["metric"], c["anchor"]): c for c in summary["comparisons"]}
    assert compared[("fused_head", "H=896", "ms", "apple_cce")]["ratio"] == 0.8
    assert compared[("fused_head", "H=4096", "ms", "apple_cce")]["ratio"] == 1.1
    assert compared[("fused_head", "H=4096", "peak_extra_GiB", "apple_cce")]["target"] == "<= 1.1x CCE"
    assert compared[("fused_head", "H=896", "ms", "liger_flce")]["anchor_value"] == \
        "not run: liger-kernel is not installed"
    assert compared[("sft", "", "tokens_per_s", "hf")]["ratio"] == 1.6
    assert compared[("sft", "", "tokens_per_s", "hf_liger")]["anchor_value"] == \
        "not run: liger-kernel is not installed"
    assert len(summary["steps"]) == 5
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and {line["bench"] for line in lines} == {"fused_head", "sft"}

    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# GPU check: NVIDIA H100, 2025-01-01 12:00")
    assert "compute capability 9.0, 132 SMs, 227 KiB shared memory per block" in md
    for row in ("| tests | passed | 95 | 11 passed in 90.1s |", "| sft | failed | 12 | RuntimeError: boom |",
                "| dpo | skipped | 0 | needs tyro (not installed) |",
                "| fused_head | H=896 | ms | 20 | apple_cce | 25 | 0.8 | time <= CCE |",
                "| sft |  | tokens_per_s | 120,000 | hf_liger | not run: liger-kernel is not installed |  | "
                ">= 120k tokens/s |",
                "## bench/fused_head.py", "| impl | H | ms | peak_extra_GiB | skipped |",
                "| nanopost | 4096 | 110 | 1.54 |  |"):
        assert row in md, row


def test_cpu_smoke_runs_steps_and_rebuilds_its_summary(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--only", "bench_fused_head",
           "bench_verifier_speed", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    steps = {p.stem: json.loads(p.read_text()) for p in (out / "steps").glob("*.json")}
    head = steps["bench_fused_head"]
    assert head["status"] == "skipped" and head["reason"] == "needs a CUDA GPU"
    verifiers = steps["bench_verifier_speed"]
    assert verifiers["status"] == "passed"
    assert [r["verifier"] for r in verifiers["results"]] == ["gsm8k", "math", "ifeval", "format"]
    assert all(r["verifications_per_s"] > 0 for r in verifiers["results"])
    assert (out / "logs" / "bench_verifier_speed.log").exists()
    md = (out / "summary.md").read_text()
    assert "## bench/verifier_speed.py" in md and "| bench_fused_head | skipped | 0 | needs a CUDA GPU |" in md
    (out / "summary.md").unlink()
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--summarize", str(out)], check=True,
                   cwd=ROOT, capture_output=True)
    assert (out / "summary.md").read_text() == md


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_every_benchmark_starts_without_a_gpu(script):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()
