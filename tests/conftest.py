"""Shared helpers: launching the scripts as a user would (python or torchrun on CPU, gloo) and
reading what they wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, nproc=1, timeout=900, check=True):
    """Runs `python script args` (nproc=1) or `torchrun --nproc_per_node nproc script args` from the
    repo root, with the machine's cores shared among the processes, and returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), script]
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(output_dir):
    """metrics.jsonl as {step: merged metrics}; a resumed run's later lines override earlier ones."""
    merged = {}
    with open(Path(output_dir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            merged.setdefault(row["step"], {}).update(row)
    return merged


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def root():
    return ROOT


def greedy_accuracy(model_dir, n_rows=300):
    """Held-out accuracy on data/test.jsonl with greedy decoding, computed by eval.py: on all rows,
    and on the carry problems the demo's SFT teacher demonstrates wrong (pipeline.is_carry_problem)."""
    sys.path.insert(0, str(ROOT))
    import eval as evaluation
    from pipeline import is_carry_problem

    args = evaluation.Args(model=str(model_dir), dataset=str(ROOT / "data" / "test.jsonl"), max_rows=n_rows)
    summary, records = evaluation.evaluate(args)
    carry = [r["scores"][0] for r in records if is_carry_problem(r["prompt"])]
    return summary["accuracy"], sum(carry) / len(carry)


# The demo's SFT stage is sft.py's defaults (pipeline.py runs the same); the DPO, GRPO and PPO
# learning tests start from it.


@pytest.fixture(scope="session")
def sft_demo_checkpoint(tmp_path_factory):
    """(final checkpoint dir, (held-out accuracy, on carry problems)) of the demo SFT run."""
    out = tmp_path_factory.mktemp("sft_demo") / "run"
    run_script("sft.py", "--output_dir", out)
    return out / "final", greedy_accuracy(out / "final")


@pytest.fixture(scope="session")
def demo_pipeline(sft_demo_checkpoint, tmp_path_factory):
    """pipeline.py's DPO, GRPO and PPO stages at the demo settings, from the demo SFT run.
    Returns (output dir, results.json as a dict)."""
    import shutil

    out = tmp_path_factory.mktemp("pipeline") / "run"
    shutil.copytree(sft_demo_checkpoint[0].parent, out / "sft")
    run_script("pipeline.py", "--output_dir", out, "--stages", "dpo", "grpo", "ppo", timeout=1800)
    return out, json.loads((out / "results.json").read_text())
