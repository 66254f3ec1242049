"""Real model sizes: every training script builds its models on the meta device, shards them and fills in
only each rank's shards from the full model that rank 0 alone reads; final/ is written tensor by tensor;
torchrun's multi-node launch (and hybrid sharding, --hsdp) gives the run that one node gives.

- sharded loading equals from_pretrained (and the seeded random init of a config-only dir), tied weights
  stay tied, non-persistent buffers are rank 0's, on a 1-D and a 2-D (hybrid) mesh; save_hf's sharded
  files and index load back to the same model (tests/sharded_loading.py, under torchrun);
- each rank's peak host memory while grpo.py loads its reference and policy, builds its generation copy
  and saves, for a 144M-parameter model on 2 ranks (tests/sharded_memory.py, under torchrun);
- two torchrun "nodes" of one process each equal one node of two processes, with and without --hsdp."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import ROOT, THREADS, free_port, kill_tree, read_metrics, run_script

TINY = ROOT / "assets" / "tiny"


def model_dir(path, weights, **config_changes):
    """assets/tiny's tokenizer and config with `config_changes`; with `weights`, a checkpoint of a seeded random
    init (fp32) whose generation config samples at temperature 0.7, else the config alone."""
    config = AutoConfig.from_pretrained(TINY)
    config.update(config_changes)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(path)
    if weights:
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        lm.generation_config = GenerationConfig(do_sample=True, temperature=0.7, eos_token_id=2, pad_token_id=0)
        lm.save_pretrained(path)
    else:
        config.save_pretrained(path)
    return path


def test_sharded_loading_equals_from_pretrained_and_saves_what_it_loads(tmp_path):
    # an odd vocabulary: the embedding (tied to the head) splits unevenly over 2 ranks
    small = {"vocab_size": 321, "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}
    checkpoint = model_dir(tmp_path / "checkpoint", True, **small)
    config_only = model_dir(tmp_path / "config_only", False, **small)
    run_script(ROOT / "tests" / "sharded_loading.py", checkpoint, config_only, tmp_path / "saved", nproc=2)


def test_peak_host_memory_per_rank_stays_below_a_full_copy_but_on_rank_0(tmp_path):
    """Peaks above each phase's start, in units of the model's fp32 size F (578 MB). Measured on a 2-core
    CPU machine: rank 1 (rank 0): loading the bf16 reference 0.31 F (1.30 F), then the policy 0.87 F (1.35 F:
    rank 0 frees its whole model as the policy's shards fill in), the bf16 generation copy 0.60 F (0.60 F),
    saving 0.15 F (0.36 F). Before rank 0 freed its whole model while loading, it peaked at 1.77 F (policy
    first: 1.52 F, then the reference); before sharded loading every rank peaked at 2.03 F while loading and
    rank 0 at 1.62 F while saving."""
    model = model_dir(tmp_path / "model", False, hidden_size=768, intermediate_size=3072, num_hidden_layers=16,
                      num_attention_heads=12, num_key_value_heads=4, vocab_size=8001,
                      layer_types=["full_attention"] * 16)
    run_script(ROOT / "tests" / "sharded_memory.py", model, ROOT / "data" / "rl_train.jsonl", tmp_path, nproc=2)
    rank0, rank1 = (json.loads((tmp_path / f"memory_rank{r}.json").read_text()) for r in (0, 1))
    full = rank0["fp32_bytes"]
    assert 140e6 < full / 4 < 150e6
    # rank 0 reads the whole model: the measurement sees a full copy where there is one, with the reference's
    # shards (1/4 F)
    assert rank0["reference"] > 1.2 * full
    # then the policy's shards (1/2 F) fill in the memory its whole model gives back, one tensor at a time
    assert rank0["load"] < rank0["reference"] + 0.1 * full and rank0["load"] < 1.4 * full, rank0
    # the others hold their shards (1/4 F of the bf16 reference, then 1/2 F of the policy) and one tensor in flight
    assert rank1["reference"] < 0.4 * full and rank1["load"] < 0.95 * full, rank1
    # the generation copy: the model in bf16 (1/2 F) on the device, filled one gathered tensor at a time
    assert max(rank0["generation_copy"], rank1["generation_copy"]) < 0.75 * full, (rank0, rank1)
    # final/ in bf16 (1/2 F) is streamed in files of F/16: rank 0 never holds it all, the others a tensor
    assert rank0["save"] < 0.5 * full and rank1["save"] < 0.25 * full, (rank0, rank1)
    final = tmp_path / "run" / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 8 and index["metadata"]["total_size"] == full // 2


# ---------------------------------------------------------------------------------------------
# Multi-node: two torchrun "nodes" on 127.0.0.1, one process each, against one node of two


def run_nodes(script, *args, timeout=600):
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d` twice (two "nodes"), as on a cluster."""
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--node_rank", str(node),
                               script, *map(str, args)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
             for node, log in enumerate(logs)]
    try:
        for node in nodes:
            node.wait(timeout=timeout)
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_tree(node.pid)
    for node, log in zip(nodes, logs):
        log.seek(0)
        assert node.returncode == 0, f"a node of {script} failed ({node.returncode}):\n{log.read()[-5000:]}"


def same_run(a, b, rtol, atol):
    """The same metrics at every step (timings aside) and the same final/ weights, to rtol and atol."""
    metrics_a, metrics_b = read_metrics(a), read_metrics(b)
    assert sorted(metrics_a) == sorted(metrics_b)
    for step in metrics_a:
        for key, value in metrics_a[step].items():
            if not key.startswith("perf/"):
                assert metrics_b[step][key] == pytest.approx(value, rel=rtol, abs=atol), (step, key)
    weights_a, weights_b = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=rtol, atol=atol)


SFT = ["--max_steps", 3, "--per_device_batch_size", 4, "--max_seq_len", 64, "--save_every", 2,
       "--eval_dataset", "data/sft_eval.jsonl"]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """One node of two processes: the run that the two-node runs must reproduce."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    run_script("sft.py", *SFT, "--output_dir", out, nproc=2)
    return out


def test_two_nodes_equal_one_node(one_node, tmp_path):
    """Global rank 0 writes metrics.jsonl, step_N/'s trainer state and final/, every rank its shards:
    the same numbers, bit for bit, and the same files."""
    run_nodes("sft.py", *SFT, "--output_dir", tmp_path)
    same_run(one_node, tmp_path, rtol=0, atol=0)
    lines = [(run / "metrics.jsonl").read_text().count("\n") for run in (one_node, tmp_path)]
    assert lines[0] == lines[1] and sorted(os.listdir(tmp_path / "step_2")) == sorted(os.listdir(one_node / "step_2"))


def test_hybrid_sharding_over_two_nodes_equals_one_node(one_node, tmp_path):
    """--hsdp over 2 nodes of 1 process: each node holds the whole model and gradients are all-reduced
    across nodes; the loss normalization (gradients off by the world size would show in grad_norm) and
    the clipped update are the one-node run's, to float rounding (the gradient norm sums other shards,
    and Adam amplifies that on tiny gradients)."""
    run_nodes("sft.py", *SFT, "--hsdp", "--output_dir", tmp_path)
    same_run(one_node, tmp_path, rtol=1e-4, atol=1e-5)
