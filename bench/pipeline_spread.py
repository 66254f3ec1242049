"""The demo pipeline's results over seeds and thread counts: how far each number of the README's
table moves with float rounding (threads, CPU kernels) and the seed, rather than with the algorithm.

    python bench/pipeline_spread.py                              # 3 seeds x {1, 2} threads (the README's)
    python bench/pipeline_spread.py --seeds 1 --threads 1 --scale 0.1 --output_dir /tmp/spread  # a quick check

Runs `python pipeline.py --seed S` with OMP_NUM_THREADS=T for every seed and thread count, each into
output_dir/seed{S}_threads{T} (a finished run is read, not run again), one after the other, each with as
many stages at a time as the machine has cores for at T threads each (pipeline.py --parallel).
Then prints, for every cell of pipeline.py's table (held-out accuracy and carry problems per policy
stage, pair accuracy of the reward model, seconds per stage), the mean and range over the runs, and
writes them to output_dir/spread.json and spread.md. Each pipeline's own table, plot and stage
directories stay in its directory.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_pipeline(output_dir, seed, threads, scale):
    """One pipeline run (unless it finished before); returns its results.json and wall-clock seconds."""
    results = os.path.join(output_dir, "results.json")
    if not os.path.exists(results):
        os.makedirs(output_dir, exist_ok=True)
        t0 = time.perf_counter()
        with open(os.path.join(output_dir, "pipeline.log"), "w") as log:
            parallel = max(1, (os.cpu_count() or 1) // threads)
            subprocess.run([sys.executable, "pipeline.py", "--seed", str(seed), "--scale", str(scale), "--output_dir",
                            output_dir, "--overwrite_output_dir", "--parallel", str(parallel)], cwd=ROOT, stdout=log,
                           stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True)
        with open(os.path.join(output_dir, "wall_seconds"), "w") as f:
            f.write(str(time.perf_counter() - t0))
    with open(results) as f, open(os.path.join(output_dir, "wall_seconds")) as g:
        return json.load(f), float(g.read())


def cells(results, wall_seconds):
    """{cell name: value} of one run: pipeline.py's table, in percent and seconds."""
    out = {}
    for stage, value in results["accuracy"].items():
        out[f"{stage} held-out %"] = 100 * value
        out[f"{stage} carry %"] = 100 * results["carry_accuracy"][stage]
    for stage, value in results.get("pair_accuracy", {}).items():
        out[f"{stage} pairs %"] = 100 * value
    for stage, value in results["seconds"].items():
        out[f"{stage} s"] = value
    out["pipeline s"] = wall_seconds
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scale", type=float, default=1.0, help="pipeline.py's --scale")
    parser.add_argument("--output_dir", default="runs/spread")
    args = parser.parse_args()
    runs = [(seed, threads) for threads in args.threads for seed in args.seeds]
    path = {run: os.path.join(os.path.abspath(args.output_dir), f"seed{run[0]}_threads{run[1]}") for run in runs}
    results = {run: run_pipeline(path[run], *run, args.scale) for run in runs}

    per_run = {run: cells(*results[run]) for run in runs}
    names = list(per_run[runs[0]])
    spread = {name: {"mean": statistics.mean(per_run[run][name] for run in runs),
                     "min": min(per_run[run][name] for run in runs), "max": max(per_run[run][name] for run in runs),
                     "runs": {f"seed{seed}_threads{threads}": per_run[seed, threads][name] for seed, threads in runs}}
              for name in names}
    lines = ["| cell | mean | min | max |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['mean']:.1f} | {s['min']:.1f} | {s['max']:.1f} |" for name, s in spread.items()]
    table = "\n".join(lines)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "spread.json"), "w") as f:
        json.dump(spread, f, indent=1)
    with open(os.path.join(args.output_dir, "spread.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
