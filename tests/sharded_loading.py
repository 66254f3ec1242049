"""Run by tests/test_sharded.py under torchrun: each training script's sharded loading (empty_model on the
meta device, fully_shard, materialize from rank 0's full model) against an unsharded model read the usual
way, and its streamed save_hf against from_pretrained. Asserts; a failure names the script and source.

    torchrun --nproc_per_node 2 tests/sharded_loading.py CHECKPOINT CONFIG_ONLY OUTPUT_DIR
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import dpo
import grpo
import ppo_rlvr
import sft

SEED = 3
# each script's wrapper (the FSDP root) and the function with which its rank 0 reads the full policy
SCRIPTS = {"sft": (sft, sft.PolicyLogprobs, sft.load_model), "dpo": (dpo, dpo.SequenceLogprobs, dpo.load_model),
           "grpo": (grpo, grpo.PolicyLogprobs, grpo.load_model),
           "ppo_rlvr": (ppo_rlvr, ppo_rlvr.PolicyLogprobs, ppo_rlvr.load_causal_lm)}


def shard(root, decoder, mesh):
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    fully_shard(root, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    return root


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
    for script_name, (script, wrapper, read) in SCRIPTS.items():
        for source, dtype, mesh in [(checkpoint, torch.float32, None), (config_only, torch.float32, None),
                                    (checkpoint, torch.bfloat16, None), (config_only, torch.float32, hybrid)]:
            where = f"{script_name}, {os.path.basename(source)}, {dtype}, {'hsdp' if mesh else 'fsdp'}"
            torch.manual_seed(SEED)
            full = wrapper(read(source, "sdpa")) if rank == 0 else None
            lm = script.empty_model(source, "sdpa", dtype)
            model = shard(wrapper(lm), lm.get_decoder(), mesh)
            script.materialize(model, full, torch.device("cpu"))
            del full

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
                assert lm.generation_config.temperature == 0.7, f"{where}: the source's generation config is lost"
                # streamed save in files of at most 100 kB, an index: from_pretrained gives the same model
                final = os.path.join(out, script_name)
                script.save_hf(final, model, lm, tokenizer, torch.float32, 2, rank, max_file_bytes=100_000)
                files = sorted(f for f in os.listdir(final) if f.endswith(".safetensors"))
                index = json.load(open(os.path.join(final, "model.safetensors.index.json")))
                assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files, f"{where}: {files}"
                assert "lm_head.weight" not in index["weight_map"], f"{where}: a tied weight was saved twice"
                saved = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
                assert saved.lm_head.weight is saved.model.embed_tokens.weight
                assert torch.equal(saved(input_ids=ids).logits, logits(model, lm, ids)), f"{where}: saved logits"
                generation = json.load(open(os.path.join(final, "generation_config.json")))
                eos = sorted({2, tokenizer.eos_token_id} - {None})  # 2: the tiny tokenizer's <|im_end|>
                assert generation["temperature"] == 0.7 and generation["eos_token_id"] == eos, generation
        if script is ppo_rlvr:  # the value model: the checkpoint's decoder and a new score head, seeded on rank 0
            torch.manual_seed(SEED)
            full = ppo_rlvr.ValueModel(ppo_rlvr.load_value_model(checkpoint, "sdpa")) if rank == 0 else None
            seqcls = ppo_rlvr.empty_model(checkpoint, "sdpa", torch.float32, value_model=True)
            value_model = shard(ppo_rlvr.ValueModel(seqcls), seqcls.base_model, None)
            ppo_rlvr.materialize(value_model, full, torch.device("cpu"))
            torch.manual_seed(SEED)
            check_same("value model", full_state(seqcls), full_state(ppo_rlvr.load_value_model(checkpoint, "sdpa")))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
