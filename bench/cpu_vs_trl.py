"""nanopost against TRL on the same CPU work: steps per second and peak resident memory of sft.py, dpo.py and
grpo.py beside TRL's SFTTrainer, DPOTrainer and GRPOTrainer, in one command.

    python bench/cpu_vs_trl.py                          # every stage, 3 rounds: prints the table, writes
                                                        # bench/results/cpu_vs_trl.jsonl
    python bench/cpu_vs_trl.py --stages sft_demo dpo_demo --rounds 1

Stages (the demo's shapes, and a Qwen2.5-0.5B-wide model cut to 2 layers: hidden 896, 14 heads, 2 KV heads,
MLP 4864, vocab 151936, tied embeddings, random init):
  sft_demo   sft.py's demo: the tiny model (random init), data/sft_train.jsonl, 32 conversations per step
  dpo_demo   the demo SFT checkpoint, data/dpo_train.jsonl, 16 pairs per step, sigmoid loss, beta 0.1
  grpo_demo  the demo SFT checkpoint, data/rl_train.jsonl, 16 prompts x 8 samples, 32 new tokens, dapo
  ppo_demo   nanopost only, packed against padded (TRL's PPO is not a like-for-like loop): the demo SFT
             checkpoint, rollouts of 64 prompts, 32 new tokens, 2 PPO epochs (its "steps" are rollouts)
  sft_896    the 896-wide shape, data/sft_train.jsonl, 8 conversations per step
  grpo_896   the 896-wide shape, data/rl_train.jsonl, 4 prompts x 4 samples, 64 new tokens (a random model
             never ends early, so both sample all 64)

Matched settings. The same model (weights from the same checkpoint, or each initialized from the same
config), the same rows, the same batch (one micro-batch per step, no gradient accumulation), fp32 weights
and compute (TRL: bf16=False), no gradient checkpointing (TRL's default is on: turned off), AdamW fused
(TRL's default adamw_torch_fused; nanopost's), betas (0.9, 0.999), weight decay 0, gradient clipping at
norm 1, the same learning rate and schedule without warmup, metrics logged every step, nothing saved or
evaluated during the steps, torch threads --threads for both (OMP_NUM_THREADS). SFT: TRL gets nanopost's
own tokenization (input ids and assistant-token mask), so the loss mask is the same token for token;
max length 256. DPO: both compute the reference log-probs once before training (TRL:
precompute_ref_log_probs=True; nanopost caches them), max length 256; TRL tokenizes the pairs with the
same chat template (its JSON line records TRL's token count over nanopost's: TRL keeps the template's line
break after the end-of-turn token, about 3% more tokens). GRPO: the same prompts
through the chat template, gsm8k verifier rewards, temperature 1, top-p 1, beta 0, dapo loss, epsilon 0.2,
one iteration per rollout, HF generate with a KV cache for both. nanopost runs its defaults otherwise
(packed micro-batches; `nanopost_padded` is the same with --no_padding_free); TRL pads each batch to its
longest row (its default; its padding-free mode needs FlashAttention).

Measurement. Each run is its own process (`python bench/cpu_vs_trl.py --worker ...`); the tools alternate
(round r runs nanopost first when r is even, TRL first otherwise). A step's time is the interval between
consecutive step ends (nanopost: Run.end_step; TRL: on_step_end), so both include everything a step does
(generation, logging); the first --warmup steps of each run are dropped and a run's figure is the median of
its other steps; a stage's figure is the median over rounds. The JSON lines also hold each step's CPU seconds
(all threads), which other processes on the machine inflate less than wall time. Peak memory is the
process's peak resident set size (ru_maxrss: loading, data and training included), the largest over rounds.
The load of the machine (1-minute load average and CPU pressure, /proc/pressure/cpu "some avg60") is
recorded before every run: measure on an otherwise idle machine.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script, bench/ comes first on sys.path and bench/sft.py would shadow sft.py

QWEN_896 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, layer_types=["full_attention"] * 2,
                max_position_embeddings=32768, tie_word_embeddings=True)

# name: (algorithm, model, per-step batch, steps measured after the warm-up, target ratio)
STAGES = {
    "sft_demo": ("sft", "tiny", dict(batch=32), 20, 1.2),
    "dpo_demo": ("dpo", "sft", dict(batch=16), 20, 1.2),
    "grpo_demo": ("grpo", "sft", dict(prompts=16, generations=8, new_tokens=32), 10, 1.2),
    "ppo_demo": ("ppo", "sft", dict(prompts=64, new_tokens=32), 6, None),
    "sft_896": ("sft", "896", dict(batch=8), 8, 1.0),
    "grpo_896": ("grpo", "896", dict(prompts=4, generations=4, new_tokens=64), 4, 1.0),
}
TOOLS = ("nanopost", "trl", "nanopost_padded")
SEED = 1
LR = {"sft": 3e-3, "dpo": 1e-4, "grpo": 1e-4, "ppo": 1e-4}
SCHEDULE = {"sft": "cosine", "dpo": "linear", "grpo": "constant", "ppo": "constant"}
MAX_LEN = 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES),
                        help="stages to run (default: all)")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS,
                        help="what to run on each stage (default: all; nanopost_padded on the demo stages only, TRL "
                             "where it has the algorithm)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each tool on each stage, alternating (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run (default 3)")
    parser.add_argument("--steps", type=float, default=1.0,
                        help="scales each stage's measured steps (default 1: 20 SFT and DPO demo steps, 10 GRPO, "
                             "6 PPO rollouts, 8 SFT and 4 GRPO steps at 896 wide)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads of every run, as OMP_NUM_THREADS (default: the machine's cores)")
    parser.add_argument("--sft_model", default=os.path.join(ROOT, "runs", "bench", "sft_demo", "final"),
                        help="the demo SFT checkpoint the dpo, grpo and ppo demo stages start from; made with the "
                             "demo's `python sft.py` if missing (default: runs/bench/sft_demo/final)")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "bench"),
                        help="runs' output dirs and the 896-wide model's config (default: runs/bench)")
    parser.add_argument("--output", help="JSON lines: one per run, then one per stage (default: "
                                             "bench/results/cpu_vs_trl.jsonl, with --profile cpu_vs_trl_profile.jsonl)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds before a run is abandoned (default 1800)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile each run's steps after the warm-up (torch.profiler) and "
                             "print where a step's time goes: generation and training, each split into matmuls, "
                             "attention, elementwise ops, data movement, the optimizer, collectives and the Python "
                             "around them (the profiler slows every op, so these are shares, not speeds)")
    parser.add_argument("--worker", nargs=4, metavar=("TOOL", "STAGE", "STEPS", "RESULT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# What each run trains on


def model_dir(kind, args):
    """The --model of a stage: assets/tiny (config only: random init), the demo SFT checkpoint, or a config-only
    dir of the 896-wide shape with assets/tiny's tokenizer (its ids are all below 320)."""
    if kind == "tiny":
        return os.path.join(ROOT, "assets", "tiny")
    if kind == "sft":
        return args.sft_model
    return os.path.join(args.work_dir, "qwen2_896x2")


def prepare(args):
    """The 896-wide config dir, and the demo SFT checkpoint if a stage needs it and it is missing."""
    from transformers import AutoConfig, AutoTokenizer

    path = model_dir("896", args)
    os.makedirs(path, exist_ok=True)
    config = AutoConfig.from_pretrained(os.path.join(ROOT, "assets", "tiny"))
    config.update(QWEN_896)
    config.save_pretrained(path)
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tiny")).save_pretrained(path)
    if any(STAGES[s][1] == "sft" for s in args.stages) and not os.path.isdir(args.sft_model):
        output_dir = os.path.dirname(os.path.abspath(args.sft_model))
        print(f"making the demo SFT checkpoint: python sft.py --output_dir {output_dir}", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--output_dir", output_dir, "--eval_dataset",
                        "None", "--overwrite_output_dir"], cwd=ROOT, env=child_env(args), check=True)


def rows(path, n):
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def stage_data(stage, steps, work):
    """A jsonl of the rows a run of `steps` steps reads (every row once), written under `work`."""
    algorithm, _, shape, _, _ = STAGES[stage]
    source, per_step = {"sft": ("sft_train.jsonl", shape.get("batch")), "dpo": ("dpo_train.jsonl", shape.get("batch")),
                        "grpo": ("rl_train.jsonl", shape.get("prompts")),
                        "ppo": ("rl_train.jsonl", shape.get("prompts"))}[algorithm]
    path = os.path.join(work, "data.jsonl")
    with open(path, "w") as f:
        for row in rows(os.path.join(ROOT, "data", source), per_step * steps):
            f.write(json.dumps(row) + "\n")
    return path


def nanopost_flags(stage, steps, data, model, output_dir, padded):
    """The command-line flags of the nanopost script for a stage."""
    algorithm, _, shape, _, _ = STAGES[stage]
    # PPO's steps are rollouts of 2 optimizer steps (one per PPO epoch)
    flags = ["--model", model, "--dataset", data, "--eval_dataset", "None", "--output_dir", output_dir,
             "--overwrite_output_dir", "--max_steps", str(steps * (2 if algorithm == "ppo" else 1)),
             "--lr", str(LR[algorithm]), "--lr_schedule", SCHEDULE[algorithm], "--warmup_ratio", "0",
             "--precision", "fp32", "--seed", str(SEED)]
    if algorithm in ("sft", "dpo"):
        flags += ["--per_device_batch_size", str(shape["batch"]), "--max_seq_len", str(MAX_LEN)]
    if algorithm == "dpo":
        flags += ["--loss_type", "sigmoid", "--beta", "0.1"]
    if algorithm == "grpo":
        flags += ["--per_device_batch_size", str(shape["prompts"] * shape["generations"]), "--num_generations",
                  str(shape["generations"]), "--max_completion_len", str(shape["new_tokens"]), "--loss_type", "dapo",
                  "--beta", "0", "--temperature", "1", "--epsilon", "0.2"]
    if algorithm == "ppo":  # the pipeline's PPO: one rollout of 64 prompts, 2 epochs over it
        flags += ["--per_device_batch_size", str(shape["prompts"]), "--max_completion_len", str(shape["new_tokens"]),
                  "--num_ppo_epochs", "2"]
    return flags + (["--no_padding_free"] if padded else [])


# ---------------------------------------------------------------------------------------------
# One run (a child process): train, record the end of every step

# --profile's categories: aten ops by a part of their name, first match; any other aten op is elementwise
CATEGORIES = [("attention", ("scaled_dot_product", "flash_attention")),
              ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
              ("optimizer", ("adam", "_foreach", "vector_norm")),
              ("data movement", ("copy", "cat", "index", "scatter", "gather", "fill", "zero", "empty", "clone",
                                 "stack", "pad", "slice_backward", "select_backward", "embedding", "narrow", "split",
                                 "chunk", "contiguous", "_to", "resize", "set_", "masked_select", "nonzero"))]


def category(name):
    if name.startswith(("c10d::", "gloo:", "nccl:")):
        return "collectives"
    if not name.startswith("aten::"):  # autograd nodes, FSDP and DTensor hooks, annotated Python
        return "python and framework"
    return next((c for c, parts in CATEGORIES if any(p in name for p in parts)), "elementwise")


class StepClock:
    """Wall and CPU time at the end of every step; with profile, torch.profiler over the steps after the warm-up,
    whose ops are summed by category and by phase (inside generate or not) into seconds per step."""

    def __init__(self, steps, warmup, profile):
        import torch

        self.times, self.steps, self.warmup, self.breakdown = [], steps, warmup, None
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
        if profile:  # mark generation, the same library function for both tools
            import transformers

            generate = transformers.GenerationMixin.generate

            def marked_generate(*args, **kwargs):
                with torch.profiler.record_function("generation"):
                    return generate(*args, **kwargs)

            transformers.GenerationMixin.generate = marked_generate

    def step_ended(self):
        self.times.append((time.perf_counter(), time.process_time()))
        if self.profiler and len(self.times) == self.warmup:
            self.profiler.start()
        if self.profiler and len(self.times) == self.steps:
            self.profiler.stop()
            self.breakdown = self.summed(self.profiler.events(), self.times[-1][0] - self.times[self.warmup - 1][0])

    def summed(self, events, wall):
        n, sums = self.steps - self.warmup, {}
        for event in events:
            parent, phase = event, "training"
            while parent is not None:
                if parent.name == "generation":
                    phase = "generation"
                parent = parent.cpu_parent
            key = f"{phase}: {category(event.name)}"
            sums[key] = sums.get(key, 0.0) + event.self_cpu_time_total / 1e6 / n
        sums["python outside any op"] = wall / n - sum(sums.values())
        return dict(sorted(sums.items()))


def run_nanopost(stage, steps, work, args, clock, padded):
    import importlib

    algorithm, kind, _, _, _ = STAGES[stage]
    script = importlib.import_module({"ppo": "ppo_rlvr"}.get(algorithm, algorithm))
    end_step = script.Run.end_step

    def timed_end_step(self, *a, **kw):
        end_step(self, *a, **kw)
        clock.step_ended()

    script.Run.end_step = timed_end_step
    data = stage_data(stage, steps, work)
    flags = nanopost_flags(stage, steps, data, model_dir(kind, args), os.path.join(work, "run"), padded)
    sys.argv = [script.__file__] + flags
    script.launch(script.main, script.Args)
    metrics = [json.loads(line) for line in open(os.path.join(work, "run", "metrics.jsonl"))]
    extra = {}
    if algorithm == "grpo":
        extra["mean_completion_length"] = statistics.mean(m["completions/mean_length"] for m in metrics[args.warmup:])
    return {"command": " ".join(["python", os.path.basename(script.__file__)] + flags), **extra}


def run_trl(stage, steps, work, args, clock):
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    import sft

    algorithm, kind, shape, _, _ = STAGES[stage]
    path = model_dir(kind, args)
    tokenizer, eot_text, _, _ = sft.load_tokenizer(path)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) if kind == "sft" else \
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    data = rows(stage_data(stage, steps, work), 10**9)

    class Timer(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.step_ended()

    common = dict(output_dir=os.path.join(work, "trl"), max_steps=steps, learning_rate=LR[algorithm],
                  lr_scheduler_type=SCHEDULE[algorithm], warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  optim="adamw_torch_fused", bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1,
                  save_strategy="no", report_to="none", use_cpu=True, seed=SEED, gradient_accumulation_steps=1)
    extra = {}
    if algorithm == "sft":
        from trl import SFTConfig, SFTTrainer

        tokenized = []
        for i, row in enumerate(data):
            ids, labels = sft.tokenize_conversation(tokenizer, row["messages"], eot_text, MAX_LEN, f"row {i}")
            tokenized.append({"input_ids": ids, "assistant_masks": [int(label != -100) for label in labels]})
        config = SFTConfig(**common, per_device_train_batch_size=shape["batch"], max_length=MAX_LEN, packing=False,
                           padding_free=False)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(tokenized),
                             processing_class=tokenizer, callbacks=[Timer()])
    elif algorithm == "dpo":
        import dpo
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common, per_device_train_batch_size=shape["batch"], max_length=MAX_LEN, beta=0.1,
                           loss_type="sigmoid", precompute_ref_log_probs=True)
        trainer = DPOTrainer(model=model, ref_model=None, args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]}
                                                              for r in data]), callbacks=[Timer()])
        # how many tokens TRL's tokenization gives the same pairs, against dpo.py's
        ours = theirs = 0
        for i, (row, tokenized) in enumerate(zip(data, trainer.train_dataset)):
            prompt, chosen, rejected = dpo.split_pair(row, f"row {i}")
            for response, key in ((chosen, "chosen_ids"), (rejected, "rejected_ids")):
                ours += len(dpo.tokenize_response(tokenizer, prompt, response, eot_text, MAX_LEN, f"row {i}")[0])
                theirs += len(tokenized["prompt_ids"]) + len(tokenized[key])
        extra["dpo_tokens_trl_over_nanopost"] = theirs / ours
    else:
        from trl import GRPOConfig, GRPOTrainer

        from nanopost import verifiers

        def gsm8k_reward(completions, ground_truth, **_):
            return [verifiers.get("gsm8k")(c[0]["content"], truth) for c, truth in zip(completions, ground_truth)]

        config = GRPOConfig(**common, per_device_train_batch_size=shape["prompts"] * shape["generations"],
                            num_generations=shape["generations"], max_completion_length=shape["new_tokens"],
                            temperature=1.0, top_p=1.0, beta=0.0, loss_type="dapo", epsilon=0.2, num_iterations=1,
                            scale_rewards="group")
        prompts = Dataset.from_list([{"prompt": r["messages"], "ground_truth": r["ground_truth"]} for r in data])
        trainer = GRPOTrainer(model=model, reward_funcs=[gsm8k_reward], args=config, processing_class=tokenizer,
                              train_dataset=prompts, callbacks=[Timer()])
    trainer.train()
    if algorithm == "grpo":
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
        extra["mean_completion_length"] = statistics.mean(lengths[args.warmup:])
    return extra


def worker(args):
    tool, stage, steps, result = args.worker
    steps, work = int(steps), os.path.dirname(os.path.abspath(result))
    clock = StepClock(steps, args.warmup, args.profile)
    if tool == "trl":
        extra = run_trl(stage, steps, work, args, clock)
    else:
        extra = run_nanopost(stage, steps, work, args, clock, padded=tool == "nanopost_padded")
    if len(clock.times) != steps:
        raise RuntimeError(f"{tool} {stage}: {len(clock.times)} steps ended, expected {steps}")
    # wall and CPU (all threads) seconds of each step after the warm-up
    step_s, cpu_s = ([b[k] - a[k] for a, b in zip(clock.times[args.warmup - 1:], clock.times[args.warmup:])]
                     for k in (0, 1))
    with open(result, "w") as f:
        json.dump({"step_s": step_s, "cpu_step_s": cpu_s, "profile_s_per_step": clock.breakdown,
                   "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **extra}, f)


# ---------------------------------------------------------------------------------------------
# The driver: rounds of alternating runs, the table


def child_env(args):
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(
                filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def machine_load():
    """The 1-minute load average and the share of the last minute in which some task waited for a CPU."""
    load = float(open("/proc/loadavg").read().split()[0])
    try:
        pressure = float(open("/proc/pressure/cpu").readline().split("avg60=")[1].split()[0])
    except (OSError, IndexError):
        pressure = None
    return {"load_1min": load, "cpu_pressure_avg60": pressure}


def runs_of(stage, tools):
    algorithm, kind, _, _, _ = STAGES[stage]
    return [t for t in tools if not (t == "trl" and algorithm == "ppo") and not (t == "nanopost_padded" and
                                                                                  kind == "896")]


def one_run(args, tool, stage, round_index, log):
    steps = args.warmup + max(2, round(STAGES[stage][3] * args.steps))
    work = os.path.join(args.work_dir, f"{stage}_{tool}")
    os.makedirs(work, exist_ok=True)
    result = os.path.join(work, "result.json")
    if os.path.exists(result):
        os.remove(result)
    record = {"stage": stage, "tool": tool, "round": round_index, **machine_load()}
    command = [sys.executable, os.path.abspath(__file__), "--worker", tool, stage, str(steps), result,
               "--warmup", str(args.warmup), "--sft_model", args.sft_model, "--work_dir", args.work_dir] + \
        (["--profile"] if args.profile else [])
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=child_env(args), stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.timeout)
        if done.returncode == 0:
            record |= json.load(open(result))
            record["median_step_s"] = statistics.median(record["step_s"])
            record["median_cpu_step_s"] = statistics.median(record["cpu_step_s"])
        else:
            record["error"] = f"exit status {done.returncode}; see {log.name}"
    except subprocess.TimeoutExpired:
        record["error"] = f"over --timeout {args.timeout} s"
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    return record


def summarize(stage, records):
    """Per tool: median steps/s over the rounds' medians, peak memory (the largest); nanopost / TRL."""
    summary = {"stage": stage, "summary": True, "target": STAGES[stage][4]}
    for tool in TOOLS:
        ok = [r for r in records if r["tool"] == tool and "median_step_s" in r]
        if ok:
            summary[tool] = {"steps_per_s": 1 / statistics.median(r["median_step_s"] for r in ok),
                             "cpu_s_per_step": statistics.median(r["median_cpu_step_s"] for r in ok),
                             "peak_GiB": max(r["peak_rss_bytes"] for r in ok) / 2**30, "runs": len(ok)}
    if "nanopost" in summary and "trl" in summary:
        summary["speed_ratio"] = summary["nanopost"]["steps_per_s"] / summary["trl"]["steps_per_s"]
        summary["memory_ratio"] = summary["nanopost"]["peak_GiB"] / summary["trl"]["peak_GiB"]
    if "nanopost" in summary and "nanopost_padded" in summary:
        summary["packed_over_padded"] = summary["nanopost"]["steps_per_s"] / summary["nanopost_padded"]["steps_per_s"]
    loads = [r["load_1min"] for r in records]
    summary["load_1min"] = [min(loads), max(loads)]
    return summary


def table(summaries):
    lines = ["| stage | nanopost steps/s | TRL steps/s | nanopost / TRL (target) | peak GiB nanopost / TRL | "
             "packed / padded | load (1 min) |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        def rate(tool):
            return f"{s[tool]['steps_per_s']:.3g}" if tool in s else "-"
        ratio = "-"
        if "speed_ratio" in s:
            ratio = f"{s['speed_ratio']:.2f} (>= {s['target']}: {'met' if s['speed_ratio'] >= s['target'] else 'not met'})"
        memory = " / ".join(f"{s[t]['peak_GiB']:.2f}" if t in s else "-" for t in ("nanopost", "trl"))
        if "memory_ratio" in s:
            memory += " (met)" if s["memory_ratio"] <= 1 else " (not met)"
        packed = f"{s['packed_over_padded']:.2f}" if "packed_over_padded" in s else "-"
        lines.append(f"| {s['stage']} | {rate('nanopost')} | {rate('trl')} | {ratio} | {memory} | {packed} | "
                     f"{s['load_1min'][0]:.1f}-{s['load_1min'][1]:.1f} |")
    return "\n".join(lines)


def profile_table(records):
    """ms per step in each category, the profiled runs as columns."""
    runs = [r for r in records if r.get("profile_s_per_step")]
    keys = sorted({k for r in runs for k in r["profile_s_per_step"]})
    lines = ["| ms per step | " + " | ".join(f"{r['stage']} {r['tool']}" for r in runs) + " |",
             "|---" * (len(runs) + 1) + "|"]
    for key in keys + ["total (profiled)"]:
        values = [r["profile_s_per_step"].get(key, 0.0) if key in keys else sum(r["profile_s_per_step"].values())
                  for r in runs]
        lines.append(f"| {key} | " + " | ".join(f"{1e3 * v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def main(args):
    if args.worker:
        return worker(args)
    args.output = args.output or os.path.join(ROOT, "bench", "results", "cpu_vs_trl_profile.jsonl" if args.profile
                                              else "cpu_vs_trl.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)
    prepare(args)
    import torch
    import transformers
    import trl

    t0 = time.perf_counter()
    records = []
    with open(os.path.join(args.work_dir, "runs.log"), "w") as log, open(args.output, "w") as out:
        out.write(json.dumps({"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "threads": args.threads, "torch": torch.__version__, "transformers":
                              transformers.__version__, "trl": trl.__version__, "rounds": args.rounds,
                              "warmup": args.warmup}) + "\n")
        for round_index in range(args.rounds):
            for stage in args.stages:
                tools = runs_of(stage, args.tools)
                for tool in tools if round_index % 2 == 0 else tools[::-1]:
                    record = one_run(args, tool, stage, round_index, log)
                    records.append(record)
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    shown = f"{1 / record['median_step_s']:.3g} steps/s ({record['median_cpu_step_s']:.3g} CPU s " \
                        f"per step), {record['peak_rss_bytes'] / 2**30:.2f} GiB" if "median_step_s" in record else \
                        record["error"]
                    print(f"round {round_index + 1}/{args.rounds} {stage:10s} {tool:16s} {shown} "
                          f"(load {record['load_1min']:.1f}, {record['wall_s']:.0f} s)", flush=True)
        summaries = [summarize(stage, [r for r in records if r["stage"] == stage]) for stage in args.stages]
        for summary in summaries:
            out.write(json.dumps(summary) + "\n")
    print(f"\n{os.cpu_count()} cores, {args.threads} threads, {args.rounds} rounds, "
          f"{(time.perf_counter() - t0) / 60:.1f} min; runs in {args.output}\n")
    print(profile_table(records) if args.profile else table(summaries))
    if any("error" in r for r in records):
        sys.exit(f"some runs failed: see {os.path.join(args.work_dir, 'runs.log')}")


if __name__ == "__main__":
    main(parse_args())
