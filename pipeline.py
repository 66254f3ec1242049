"""The whole post-training pipeline on the built-in arithmetic task, offline, on a laptop CPU: SFT
from a random tiny model; DPO and a reward model from the SFT model; GRPO and PPO against the verifier,
and PPO against the reward model, each from the DPO model; and rejection-sampling SFT of the SFT model
on its own best samples. Held-out accuracy (eval.py, greedy) after every stage, a results table and a
plot of every stage's training curves.

    python pipeline.py                        # minutes on a laptop CPU (measured: the README)
    python pipeline.py --nproc 2              # each stage under torchrun with 2 processes
    python pipeline.py --scale 0.3            # fewer steps: a quick check that everything runs

Each stage is the plain scripts with the flags below: the commands it prints are the commands to
run by hand. Two stages run at a time where their inputs allow it (--parallel), each on its share of
the cores. Outputs: output_dir/<stage>/ (metrics.jsonl, final/), output_dir/logs/<stage>.txt (what
the stage's commands printed), output_dir/results.md, output_dir/pipeline.png. Running a stage again
into the same output_dir needs --overwrite_output_dir; `python eval.py --model runs/pipeline/grpo/final`
evaluates a stage again.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
import tyro

import eval as evaluation

# The demo recipe: (stage, the stage whose model it starts from, what it learns from, commands). A command is a
# script and its flags, where {name} is output_dir/name, a stage's directory. Each command also gets --model (the
# starting model) and --seed, a training script also --output_dir (the stage's directory); --scale multiplies
# the step counts.
PPO = ["--max_steps", "120", "--lr", "1e-4", "--value_lr", "3e-4", "--lam", "1.0", "--num_ppo_epochs", "2",
       "--per_device_batch_size", "64", "--eval_every", "40"]
STAGES = [
    ("sft", None, "the teacher's demonstrations", [("sft.py", ["--num_epochs", "6", "--eval_every", "75"])]),
    ("dpo", "sft", "preference pairs", [("dpo.py", ["--loss_type", "dpo_norm", "--beta", "5", "--lr", "3e-5",
                                                    "--max_steps", "64", "--eval_every", "16"])]),
    ("reward_model", "sft", "preference pairs", [("reward_model.py", ["--num_epochs", "1", "--eval_every", "47"])]),
    ("grpo", "dpo", "the verifier", [("grpo.py", ["--max_steps", "150", "--lr", "1e-4", "--warmup_ratio", "0.1",
                                                  "--lr_schedule", "cosine", "--per_device_batch_size", "128",
                                                  "--eval_every", "25"])]),
    ("ppo", "dpo", "the verifier", [("ppo_rlvr.py", PPO)]),
    ("ppo_rm", "dpo", "the reward model", [("ppo_rlvr.py", PPO + ["--reward_model", "{reward_model}/final",
                                                                  "--verification_reward", "0"])]),
    ("rs_sft", "sft", "its own samples, the best of 4 by the verifier", [
        ("eval.py", ["--dataset", "data/rl_train.jsonl", "--max_rows", "1500", "--num_samples", "4",
                     "--temperature", "1.0", "--max_completion_len", "32", "--output", "{rs_sft}/samples.jsonl",
                     "--sft_output", "{rs_sft}/best_of_4.jsonl", "--sft_min_score", "1"]),
        ("sft.py", ["--dataset", "{rs_sft}/best_of_4.jsonl", "--eval_dataset", "None", "--num_epochs", "2",
                    "--lr", "3e-4", "--warmup_ratio", "0"])]),
]
# The curves plotted for each stage: (y-axis label, metric names) per y-axis; a second one is drawn
# on the right.
CURVES = {"sft": [("loss (nats per token)", ["loss", "eval/loss"])],
          "dpo": [("loss", ["loss"]), ("implicit reward accuracy", ["rewards/accuracies", "eval/rewards/accuracies"])],
          "reward_model": [("loss", ["loss"]), ("pair accuracy", ["accuracy", "eval/accuracy"])],
          "grpo": [("reward, accuracy", ["reward", "eval/accuracy"])],
          "ppo": [("fraction correct", ["objective/verifiable_correct_rate", "eval/accuracy"])],
          "ppo_rm": [("reward model's score", ["objective/reward_model_score"]),
                     ("fraction correct", ["objective/verifiable_correct_rate", "eval/accuracy"])],
          "rs_sft": [("loss (nats per token)", ["loss"])]}
# the stages whose model is a policy, evaluated on the held-out problems (the reward model scores pairs)
POLICIES = [stage for stage, *_ in STAGES if stage != "reward_model"]


# The held-out problems the SFT teacher demonstrates wrong (data/make_data.py): two-digit
# additions that need a carry. Their accuracy is reported beside the whole test set's.
TWO_DIGIT_ADDITION = re.compile(r"What is (\d\d) \+ (\d)\?")


def is_carry_problem(prompt):
    match = TWO_DIGIT_ADDITION.search(prompt)
    return bool(match) and int(match[1]) % 10 + int(match[2]) >= 10


@dataclass
class Args:
    output_dir: str = "runs/pipeline"
    """one subdirectory per stage, plus logs/ (each stage's output), results.md and pipeline.png"""
    nproc: int = 1
    """processes per stage (torchrun --nproc_per_node) when > 1"""
    parallel: int = min(2, os.cpu_count() or 1)
    """stages run at the same time, each as soon as the stages it needs have finished (2 where the machine has 2
    cores or more: DPO beside the reward model, GRPO beside PPO, ...); each stage's processes get 1/parallel of
    the cores (OMP_NUM_THREADS, unless set), so that the stages never ask for more threads than there are cores"""
    scale: float = 1.0
    """multiplies every stage's step count (epochs for SFT): < 1 for a quick run"""
    stages: tuple[str, ...] = tuple(stage for stage, *_ in STAGES)
    """which stages to run, started in this order as their inputs are ready; a stage's starting model must exist
    (from this or an earlier run)"""
    eval_rows: int = 300
    """held-out rows evaluated after each stage"""
    seed: int = 1
    """passed to every stage"""
    overwrite_output_dir: bool = False
    """rerun stages whose directory holds an earlier run (each stage deletes its metrics, checkpoints, final/)"""


class InputError(ValueError):
    """A bad flag: the message says what is wrong, and the pipeline prints it alone, without a traceback."""


def scaled(flags, scale):
    """The flags with --max_steps / --num_epochs multiplied by scale, in whole rollouts for PPO (a rollout
    takes num_ppo_epochs x num_mini_batches optimizer steps) and at least one."""
    out, value = list(flags), dict(zip(flags[::2], flags[1::2]))
    unit = int(value.get("--num_ppo_epochs", 1)) * int(value.get("--num_mini_batches", 1))
    for i, flag in enumerate(out[:-1]):
        if flag in ("--max_steps", "--num_epochs"):
            step_unit = unit if flag == "--max_steps" else 1
            out[i + 1] = str(step_unit * max(1, round(float(out[i + 1]) * scale / step_unit)))
    return out


def run_command(stage, script, flags, nproc, threads, log):
    """Runs one command of a stage to its end, its output appended to the file `log`; True if it succeeded.
    threads: its OMP_NUM_THREADS (per process), unless the environment sets it."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc_per_node", str(nproc)]
    command = ["python" if nproc == 1 else f"torchrun --nproc_per_node {nproc}", script] + flags
    print(f"[{stage}] $ " + " ".join(command), flush=True)
    env = {"OMP_NUM_THREADS": str(threads), **os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    log.write(f"$ {script} {' '.join(flags)}\n")
    log.flush()
    return subprocess.run(launcher + [script] + flags, env=env, stdout=log, stderr=subprocess.STDOUT).returncode == 0


def read_metrics(path):
    rows = {}
    if os.path.exists(path):
        for line in open(path):
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    return rows


def figure(output_dir, stages, accuracies, carry_accuracies):
    """Each stage's curves from output_dir/<stage>/metrics.jsonl, on the y-axes CURVES gives it, and the
    held-out accuracies after each stage with a policy as bars: panels of three across, about 900 pixels wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(stages) + 1 + 2) // 3
    fig = plt.figure(figsize=(9, 3.3 * rows))
    grid = fig.add_gridspec(rows, 3)
    axes = [fig.add_subplot(grid[i // 3, i % 3]) for i in range(len(stages))]
    axes.append(fig.add_subplot(grid[len(stages) // 3, len(stages) % 3:]))  # the bars take the rest of the row
    for ax, stage in zip(axes, stages):
        metrics = read_metrics(os.path.join(output_dir, stage, "metrics.jsonl"))
        lines = []
        for y_axis, (ylabel, names) in zip([ax] + [ax.twinx() for _ in CURVES[stage][1:]], CURVES[stage]):
            for name in names:
                points = [(step, row[name]) for step, row in sorted(metrics.items()) if name in row]
                if points:
                    lines += y_axis.plot(*zip(*points), marker="." if len(points) < 30 else None, label=name,
                                         color=f"C{len(lines)}")
            y_axis.set_ylabel(ylabel, fontsize=9)
            y_axis.tick_params(labelsize=8)
        ax.set_title(stage.upper().replace("_", " "), fontsize=10)
        ax.set_xlabel("step", fontsize=9, labelpad=1)
        # below the panel, clear of every curve on either y-axis
        long_names = any(len(line.get_label()) > 24 for line in lines)
        ax.legend(handles=lines, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=1 if long_names else 2, frameon=False, handlelength=1.5, columnspacing=1, borderaxespad=0,
                  labelspacing=0.2)
    policies = [stage for stage in stages if stage in accuracies]
    for shift, values, color, label in ((-0.2, accuracies, "tab:green", "all"),
                                        (0.2, carry_accuracies, "tab:orange", "carry problems")):
        xs = [i + shift for i in range(len(policies))]
        axes[-1].bar(xs, [values[s] for s in policies], width=0.4, color=color, label=label)
        for x, s in zip(xs, policies):
            axes[-1].text(x, values[s], f"{values[s]:.0%}", ha="center", va="bottom", fontsize=8)
    axes[-1].set_xticks(range(len(policies)), policies)
    axes[-1].set_title("held-out accuracy", fontsize=10)
    axes[-1].set_ylabel("greedy accuracy", fontsize=9)
    axes[-1].set_ylim(0, 1.3)  # bars up to 1 and their labels; the legend above them
    axes[-1].tick_params(labelsize=8)
    axes[-1].legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    return fig


def plot(output_dir, stages, accuracies, carry_accuracies):
    path = os.path.join(output_dir, "pipeline.png")
    figure(output_dir, stages, accuracies, carry_accuracies).savefig(path, dpi=100)
    return path


def held_out_accuracy(model_dir, rows):
    """Greedy accuracy on the test rows, and on those of them that are carry problems."""
    summary, records = evaluation.evaluate(evaluation.Args(model=model_dir, max_rows=rows))
    carry = [r["scores"][0] for r in records if is_carry_problem(r["prompt"])]
    return summary["accuracy"], sum(carry) / max(1, len(carry))


def needs(stage, stage_specs):
    """The stages whose output a stage uses: the one it starts from, and those its flags name ({name})."""
    start, _, commands = stage_specs[stage]
    named = {name for _, flags in commands for flag in flags for name in re.findall(r"\{(\w+)\}", flag)}
    return sorted(({start} | named) - {None, stage})


def check_args(args, stage_specs):
    """The stages exist, each one's inputs exist or come from an earlier stage of this run, and no stage would
    overwrite an earlier run unless told to: before the first stage starts."""
    unknown = set(args.stages) - set(stage_specs)
    if unknown:
        raise InputError(f"--stages: unknown {sorted(unknown)}; choose from {list(stage_specs)}")
    for i, stage in enumerate(args.stages):
        for needed in needs(stage, stage_specs):
            model = os.path.join(args.output_dir, needed, "final")
            if needed not in args.stages[:i] and not os.path.isdir(model):
                verb = "starts from" if needed == stage_specs[stage][0] else "needs"
                raise InputError(f"--stages: {stage} {verb} {model}, which does not exist: run stage {needed} "
                                 "first (add it to --stages)")
        stage_dir = os.path.join(args.output_dir, stage)
        names = os.listdir(stage_dir) if os.path.isdir(stage_dir) else []
        if not args.overwrite_output_dir and any(n == "metrics.jsonl" or re.fullmatch(r"(step_\d+|final)(\.tmp)?", n)
                                                 for n in names):
            raise InputError(f"{stage_dir} holds an earlier run: pass --overwrite_output_dir to run stage {stage} "
                             "again, or another --output_dir")


def stage_flags(script, flags, model, args, stage):
    """A command's flags as run: --model and --seed, for a training script --output_dir and
    --overwrite_output_dir, then its own with step counts scaled and {name} made a stage's directory."""
    common = ["--model", model, "--seed", str(args.seed)]
    if script != "eval.py":
        common += ["--output_dir", os.path.join(args.output_dir, stage)] + \
            ["--overwrite_output_dir"] * args.overwrite_output_dir
    return common + [re.sub(r"\{(\w+)\}", lambda m: os.path.join(args.output_dir, m[1]), flag)
                     for flag in scaled(flags, args.scale)]


def pair_accuracy(stage_dir):
    """A reward model's last held-out pair accuracy (eval/accuracy in its metrics.jsonl)."""
    metrics = read_metrics(os.path.join(stage_dir, "metrics.jsonl"))
    return [row["eval/accuracy"] for _, row in sorted(metrics.items()) if "eval/accuracy" in row][-1]


def main(args):
    stage_specs = {name: (start, learns, commands) for name, start, learns, commands in STAGES}
    check_args(args, stage_specs)
    os.makedirs(os.path.join(args.output_dir, "logs"), exist_ok=True)
    final = {name: os.path.join(args.output_dir, name, "final") for name in stage_specs}
    accuracies, carry_accuracies, pair_accuracies, times = {}, {}, {}, {}
    # each stage's processes get their share of the cores, and never more than a script takes by itself
    cores = os.cpu_count() or 1
    threads = max(1, min((cores - 1) // args.nproc, cores // (args.parallel * args.nproc)))
    torch.set_num_threads(threads)  # the held-out evaluations, in this process
    evaluating = threading.Lock()  # one at a time: torch's thread count is per process

    def evaluate(stage, model):
        with evaluating:
            if stage not in accuracies:
                accuracies[stage], carry_accuracies[stage] = held_out_accuracy(model, args.eval_rows)

    def run_stage(stage):
        """The stage's commands in turn, then its held-out evaluation; False if a command failed or was stopped,
        None if it did not start because another stage had."""
        if interrupted or failed:
            return None
        start, _, commands = stage_specs[stage]
        model = final[start] if start else "assets/tiny"
        if start:  # where this one starts (once: a stage of this run was evaluated when it finished)
            evaluate(start, model)
        t0 = time.perf_counter()
        with open(os.path.join(args.output_dir, "logs", f"{stage}.txt"), "a") as log:
            print(f"{stage}: started, output in {log.name}", flush=True)
            for script, flags in commands:
                if not run_command(stage, script, stage_flags(script, flags, model, args, stage), args.nproc, threads,
                                   log):
                    print(f"{stage}: {script} stopped; its output: {log.name}", flush=True)
                    return False
        times[stage] = time.perf_counter() - t0
        if stage in POLICIES:
            evaluate(stage, final[stage])
            print(f"{stage}: held-out accuracy {accuracies[stage]:.1%}, on carry problems "
                  f"{carry_accuracies[stage]:.1%} ({times[stage]:.0f} s)", flush=True)
        else:
            pair_accuracies[stage] = pair_accuracy(os.path.join(args.output_dir, stage))
            print(f"{stage}: held-out pair accuracy {pair_accuracies[stage]:.1%} ({times[stage]:.0f} s)", flush=True)
        return True

    # Ctrl-C reaches the stages' processes too (the same terminal): each training script saves a resumable step_N
    # and exits, the pipeline waits for them and stops; a second Ctrl-C ends everything at once
    interrupted = []

    def stop(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    signal.signal(signal.SIGINT, stop)
    t0, running, done, failed = time.perf_counter(), {}, set(), []
    with ThreadPoolExecutor(args.parallel) as pool:
        while True:
            if not (interrupted or failed):  # start every stage whose inputs are ready, in --stages order
                for stage in args.stages:
                    ready = all(n in done or n not in args.stages for n in needs(stage, stage_specs))
                    if stage not in done and stage not in running and ready:
                        running[stage] = pool.submit(run_stage, stage)
            if not running:
                break
            finished, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            for stage in [s for s, future in running.items() if future in finished]:
                result = running.pop(stage).result()
                if result is not None:
                    (done.add if result else failed.append)(stage)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted or failed:
        sys.exit(f"pipeline: {'stopped by Ctrl-C' if interrupted else 'failed'} in {', '.join(failed)}; each stage's "
                 f"output is in {os.path.join(args.output_dir, 'logs')}, and its command with --resume continues it")
    print(f"\nall stages: {time.perf_counter() - t0:.0f} s", flush=True)

    lines = ["| stage | starts from | learns from | held-out accuracy | on carry problems | time |",
             "|---|---|---|---|---|---|"]
    for stage in (s for s in stage_specs if s in accuracies or s in pair_accuracies):
        start, learns, _ = stage_specs[stage]
        took = f"{times[stage]:.0f} s" if stage in times else "(earlier run)"
        held_out = f"{accuracies[stage]:.1%} | {carry_accuracies[stage]:.1%}" if stage in accuracies else \
            f"{pair_accuracies[stage]:.1%} of pairs | -"
        lines.append(f"| {stage} | {start or 'random init'} | {learns} | {held_out} | {took} |")
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"accuracy": accuracies, "carry_accuracy": carry_accuracies, "pair_accuracy": pair_accuracies,
                   "seconds": times}, f, indent=1)
    print("\n" + table)
    ran = [s for s in stage_specs if s in accuracies or s in pair_accuracies]
    print(f"plot: {plot(args.output_dir, ran, accuracies, carry_accuracies)}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, use_underscores=True))
    except InputError as error:  # the message says what to fix; a traceback would only bury it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
