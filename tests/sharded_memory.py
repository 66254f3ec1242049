"""Run by tests/test_sharded.py under torchrun: grpo.py's main on a model given by its config alone, with
each rank's peak host memory (the kernel's high-water mark of resident memory, reset before each phase)
recorded over loading (the frozen reference, then the policy, which frees rank 0's whole model as it fills
in), building and filling the generation copy, and saving final/. Writes OUTPUT_DIR/memory_rank<r>.json:
per phase the peak above the resident memory at its start, in bytes, and the model's size in fp32.

    torchrun --nproc_per_node 2 tests/sharded_memory.py MODEL_DIR DATASET OUTPUT_DIR
"""

import ctypes
import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import grpo


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class Phases:
    """Peak resident memory above each phase's start; the peak is reset at every start."""

    def __init__(self):
        self.peaks, self.base = {}, None

    def start(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory goes back to the system: not counted, not reused
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size, to the current one
        self.base = status("VmRSS")

    def end(self, name):
        self.peaks[name] = status("VmHWM") - self.base


def main(model, dataset, out):
    phases = Phases()
    calls = {"materialize": 0, "refresh": 0}
    sizes = {}
    load_full, empty_model, materialize = grpo.load_full, grpo.empty_model, grpo.materialize
    generation_copy, refresh, save_hf = grpo.generation_copy, grpo.refresh_generation_copy, grpo.save_hf

    def first_of_loading(fn):
        def wrapped(*args, **kwargs):
            if phases.base is None:  # rank 0 reads the full model first, the others start with the empty one
                phases.start()
            return fn(*args, **kwargs)
        return wrapped

    def timed_materialize(root, full, device, free_full):
        materialize(root, full, device, free_full)
        calls["materialize"] += 1
        # from the start of loading: reference, the reference's shards (and on rank 0 the whole model); load, the
        # policy's shards too
        phases.end({1: "reference", 2: "load"}[calls["materialize"]])
        sizes["fp32_bytes"] = 4 * sum(p.numel() for p in root.parameters())

    def timed_generation_copy(*args):
        phases.start()
        return generation_copy(*args)

    def timed_refresh(root, gen_lm):
        refresh(root, gen_lm)
        calls["refresh"] += 1
        if calls["refresh"] == 1:
            phases.end("generation_copy")

    def timed_save(*args):
        phases.start()
        save_hf(*args, max_file_bytes=sizes["fp32_bytes"] // 16)
        phases.end("save")

    with torch.device("meta"):  # imports the model's code now: that memory is not the loading's
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    grpo.load_full, grpo.empty_model = first_of_loading(load_full), first_of_loading(empty_model)
    grpo.materialize, grpo.generation_copy = timed_materialize, timed_generation_copy
    grpo.refresh_generation_copy, grpo.save_hf = timed_refresh, timed_save
    grpo.main(grpo.Args(model=model, dataset=dataset, eval_dataset=None, output_dir=os.path.join(out, "run"),
                        max_steps=1, num_generations=2, per_device_batch_size=2, max_prompt_len=64,
                        max_completion_len=4, beta=0.1, precision="bf16", save_dtype="bf16"))
    with open(os.path.join(out, f"memory_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({**phases.peaks, **sizes}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
