"""Run by tests/test_sharded.py under torchrun: each training script's sharded loading (Run.build: the model
on the meta device, fully_shard, materialize from rank 0's full model) against an unsharded model read the
usual way, and its streamed save_hf against from_pretrained. Asserts; a failure names the script and source.

    torchrun --nproc_per_node 2 tests/sharded_loading.py CHECKPOINT CONFIG_ONLY OUTPUT_DIR
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import dpo
import grpo
import ppo_rlvr
import sft

SEED = 3
# each script and its wrapper (the FSDP root) of the policy
SCRIPTS = {"sft": (sft, sft.PolicyLogprobs), "dpo": (dpo, dpo.SequenceLogprobs), "grpo": (grpo, grpo.PolicyLogprobs),
           "ppo_rlvr": (ppo_rlvr, ppo_rlvr.PolicyLogprobs)}


def fake_run(script, rank, mesh=None):
    """The script's Run with only what its build() reads: padded rows (the test's forward has no boundaries),
    sdpa, fp32 compute, this rank on CPU, the mesh."""
    run = object.__new__(script.Run)
    run.args = SimpleNamespace(attn_implementation="sdpa", padding_free=False, resume=False)
    run.rank, run.device, run.mesh, run.compute_dtype = rank, torch.device("cpu"), mesh, torch.float32
    return run


def full_state(module):
    """Every parameter and buffer, gathered from its shards, by name."""
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
            for name, t in [*module.named_parameters(), *module.named_buffers()]}


def logits(root, lm, ids):
    """lm's logits with the root's parameters gathered (the decoder layers gather their own)."""
    root.unshard()
    with torch.no_grad():
        out = lm(input_ids=ids).logits
    root.reshard()
    return out


def check_same(name, sharded, reference):
    assert sharded.keys() == reference.keys(), f"{name}: {sorted(sharded.keys() ^ reference.keys())}"
    for key in reference:
        assert sharded[key].dtype == reference[key].dtype, f"{name}: {key} is {sharded[key].dtype}"
        assert torch.equal(sharded[key], reference[key]), f"{name}: {key} differs from the unsharded model's"


def main(checkpoint, config_only, out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = torch.tensor([list(range(3, 60)), list(range(100, 157))])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    hybrid = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    for script_name, (script, wrapper) in SCRIPTS.items():
        for source, dtype, mesh in [(checkpoint, torch.float32, None), (config_only, torch.float32, None),
                                    (checkpoint, torch.bfloat16, None), (config_only, torch.float32, hybrid)]:
            where = f"{script_name}, {os.path.basename(source)}, {dtype}, {'hsdp' if mesh else 'fsdp'}"
            torch.manual_seed(SEED)
            model = fake_run(script, rank, mesh).build(wrapper, source, dtype=dtype)
            lm = model.lm

            # the reference: what every rank built before, from_pretrained or the seeded init from the config
            torch.manual_seed(SEED)
            reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32) if source == checkpoint \
                else AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
            expected = {k: v.to(dtype) if k in dict(reference.named_parameters()) else v
                        for k, v in full_state(reference).items()}
            assert lm.lm_head.weight is lm.model.embed_tokens.weight, f"{where}: the head is no longer tied"
            check_same(where, full_state(lm), expected)  # non-persistent buffers (rotary frequencies) included
            if dtype == torch.float32:
                assert torch.equal(logits(model, lm, ids), reference(input_ids=ids).logits), f"{where}: logits"
            if source == checkpoint and dtype == torch.float32 and mesh is None:
                # streamed save in files of at most 100 kB, an index: from_pretrained gives the same model
                final = os.path.join(out, script_name)
                script.save_hf(final, model, source, tokenizer, torch.float32, 2, rank, max_file_bytes=100_000)
                files = sorted(f for f in os.listdir(final) if f.endswith(".safetensors"))
                index = json.load(open(os.path.join(final, "model.safetensors.index.json")))
                assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files, f"{where}: {files}"
                assert "lm_head.weight" not in index["weight_map"], f"{where}: a tied weight was saved twice"
                saved = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
                assert saved.lm_head.weight is saved.model.embed_tokens.weight
                assert torch.equal(saved(input_ids=ids).logits, logits(model, lm, ids)), f"{where}: saved logits"
                generation = json.load(open(os.path.join(final, "generation_config.json")))
                eos = sorted({2, tokenizer.eos_token_id} - {None})  # 2: the tiny tokenizer's <|im_end|>
                # the source's generation config (its temperature 0.7), stopping at the end-of-turn token
                assert generation["temperature"] == 0.7 and generation["eos_token_id"] == eos, generation
        if script is ppo_rlvr:  # the value model: the checkpoint's decoder and a new score head, seeded on rank 0
            torch.manual_seed(SEED)
            run = fake_run(ppo_rlvr, rank)
            full = ppo_rlvr.load_sequence_classifier(checkpoint, run, "value model")
            value_model = run.build(ppo_rlvr.ValueModel, checkpoint, full, dropout=False,
                                    auto_class=AutoModelForSequenceClassification, num_labels=1)
            torch.manual_seed(SEED)
            check_same("value model", full_state(value_model.lm),
                       full_state(ppo_rlvr.load_sequence_classifier(checkpoint, fake_run(ppo_rlvr, 0), "value model")))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
