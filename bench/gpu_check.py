"""Validate and benchmark a GPU machine in one command, one process tree, one GPU (planned to take
about 20 minutes on an H100; not yet measured).

    bench/gpu_check.sh                          # everything below
    bench/gpu_check.sh --wheels .whl            # first install the wheels in .whl (see "Needs")
    bench/gpu_check.sh --only tests scripts     # some groups or steps (names below); runs into the
                                                # same --out add up to one summary
    bench/gpu_check.sh --dry-run                # print the plan and what is installed, run nothing
    bench/gpu_check.sh --cpu-smoke              # the same plan at toy sizes on CPU: checks the harness
    bench/gpu_check.sh --summarize DIR          # rebuild DIR's summary from its step records

What it runs, in order (group: steps):
  tests:   tests          python -m pytest tests/test_kernels_gpu.py tests/test_kernels_aot.py: the
                          Triton kernels at real LM-head shapes against fp32 truths, and every kernel
                          specialization compiled for sm_80, sm_89 and sm_90 with this triton
  scripts: sft, sft_resume, dpo, reward_model, grpo, ppo_rlvr, eval
                          each script under `torchrun --nproc_per_node 1` (nccl) with --precision
                          bf16 for a few steps on a random-init Qwen2.5-0.5B-shaped model (hidden 896,
                          24 layers, vocab 151936, tied: a config-only directory with assets/tiny's
                          tokenizer, built locally, no hub access), on the demo data in data/,
                          saving a resumable checkpoint; sft_resume continues sft from it; eval
                          scores sft's final Hugging Face checkpoint
  bench:   bench_fused_head  bench/fused_head.py: head forward+backward vs torch eager, Liger, Apple's CCE
           bench_sft      bench/sft.py: SFT step vs Hugging Face and Hugging Face + Liger
           bench_dpo      bench/dpo.py: DPO step vs TRL's DPOTrainer
           bench_grpo     bench/grpo.py: GRPO step vs TRL's GRPOTrainer
           bench_ppo_rlvr bench/ppo_rlvr.py: PPO step (no anchor)
           bench_padding_free bench/padding_free.py: SFT steps on chat-length sequences, padded vs
                          packed (padding-free): real tokens/s and peak memory
           bench_verifier_speed bench/verifier_speed.py: verifications per second (CPU)
An anchor that is not installed is skipped by its benchmark with the reason recorded; a step
whose required packages are missing is skipped the same way.

Needs: a CUDA GPU; torch, triton, transformers, pytest (the GPU image has torch 2.11, triton 3.6,
transformers 5.17); the scripts also need tyro and datasets, the anchors liger-kernel,
cut-cross-entropy and trl. Where those cannot be installed from an index, download the wheels
elsewhere for the GPU machine's Python and platform, with the dependencies its image lacks, and
carry them in a directory, e.g.
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        tyro docstring-parser typeguard datasets 'dill<0.4.2' 'multiprocess<0.70.20' \\
        liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0
then pass --wheels .whl: they are installed with pip --no-index --no-deps --target OUT/site, and
OUT/site is put on every step's PYTHONPATH.

Results go to --out (default bench/results/<date>-<time>-<gpu>/): steps/<step>.json (command,
status, seconds, the JSON lines it printed), logs/<step>.log (its whole output), results.jsonl
(every benchmark's JSON lines, tagged with the benchmark), summary.json, and summary.md: the
machine, a table of steps, nanopost against each anchor with the target, and each benchmark's
rows; the README's performance section is built from it. The scripts' runs, checkpoints and the
model directory go to a temporary directory, removed at the end (--keep-work keeps it).
"""

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("tests", "scripts", "bench")
OPTIONAL = {"tyro": "tyro", "datasets": "datasets", "liger_kernel": "liger-kernel",
            "cut_cross_entropy": "cut-cross-entropy", "trl": "trl"}
QWEN_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1e6)

# nanopost against its anchors: (benchmark, metric, anchor impl, fields that tell cases apart, target)
COMPARISONS = [
    ("fused_head", "ms", "apple_cce", ["H"], "time <= CCE"),
    ("fused_head", "peak_extra_GiB", "apple_cce", ["H"], "<= 1.1x CCE"),
    ("fused_head", "ms", "liger_flce", ["H"], ""),
    ("sft", "tokens_per_s", "hf_liger", [], ">= 120k tokens/s"),
    ("sft", "peak_GiB", "hf_liger", [], "<= 18 GiB"),
    ("sft", "tokens_per_s", "hf", [], ""),
    ("dpo", "tokens_per_s", "trl", [], ">= 2x TRL"),
    ("dpo", "peak_GiB", "trl", [], ""),
    ("grpo", "step_s", "trl", [], "<= 1/4 of TRL"),
]


@dataclass
class Step:
    name: str
    group: str
    cmd: list
    timeout_s: int
    needs: list = field(default_factory=list)  # importable modules, else the step is skipped
    needs_cuda: bool = False
    metrics_file: str | None = None  # a script's metrics.jsonl: its last line is the step's result


def torchrun(script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", script, *args]


# Benchmarks of CPU runs for the README (the demo's spread over seeds and threads, nanopost against TRL on
# CPU): nothing to check on a GPU
CPU_BENCHMARKS = {"pipeline_spread.py", "cpu_vs_trl.py"}


def bench_steps(cpu_smoke):
    """One step per bench/*.py; a benchmark without an entry here is an error, so none is forgotten."""
    sizes = {  # (arguments on a GPU, arguments for --cpu-smoke), timeout in seconds
        "fused_head.py": ([], None, 900),
        "sft.py": ([], ["--small", "--steps", "3"], 900),
        "dpo.py": ([], ["--small", "--steps", "4"], 900),
        "grpo.py": ([], ["--tiny", "--steps", "3"], 900),
        "ppo_rlvr.py": ([], ["--small", "--steps", "3"], 600),
        "padding_free.py": ([], ["--small", "--steps", "4"], 900),
        "verifier_speed.py": (["--seconds", "1"], ["--seconds", "0.2"], 120),
    }
    needs = {"sft.py": ["tyro", "datasets"], "dpo.py": ["tyro", "datasets"], "grpo.py": ["tyro", "datasets"],
             "ppo_rlvr.py": ["tyro", "datasets"], "padding_free.py": ["tyro", "datasets"]}
    files = {Path(p).name for p in glob.glob(str(ROOT / "bench" / "*.py"))} - {"gpu_check.py"} - CPU_BENCHMARKS
    if files - sizes.keys():
        raise RuntimeError(f"bench/gpu_check.py has no plan for {', '.join(sorted(files - sizes.keys()))}")
    steps = []
    for name, (gpu_args, smoke_args, timeout) in sizes.items():
        args = smoke_args if cpu_smoke else gpu_args
        needs_cuda = args is None or (not cpu_smoke and name != "verifier_speed.py")
        steps.append(Step(f"bench_{name.removesuffix('.py')}", "bench",
                          [sys.executable, f"bench/{name}", *(args or [])], timeout, needs.get(name, []), needs_cuda))
    return steps


def build_plan(cpu_smoke, model_dir, work_dir):
    """Every step, in order. model_dir: the Qwen2.5-0.5B-shaped config directory (assets/tiny for
    --cpu-smoke); work_dir: where the scripts' runs go."""
    runs = Path(work_dir) / "runs"
    if cpu_smoke:
        common = ["--model", str(model_dir)]
        sizes = dict(sft=["--per_device_batch_size", "8", "--max_seq_len", "128"],
                     dpo=["--per_device_batch_size", "4", "--max_seq_len", "128"],
                     reward_model=["--per_device_batch_size", "4", "--max_seq_len", "128"],
                     grpo=["--per_device_batch_size", "8", "--num_generations", "4", "--max_completion_len", "16"],
                     ppo_rlvr=["--per_device_batch_size", "4", "--max_new_tokens", "16"],
                     eval=["--max_rows", "8", "--max_new_tokens", "16"])
        tests = ["tests/test_kernels_gpu.py"]  # the compile test takes minutes on a small CPU; it runs in CI
    else:
        common = ["--model", str(model_dir), "--precision", "bf16"]
        sizes = dict(sft=["--per_device_batch_size", "8", "--max_seq_len", "512"],
                     dpo=["--per_device_batch_size", "8", "--max_seq_len", "512"],
                     reward_model=["--per_device_batch_size", "8", "--max_seq_len", "512"],
                     grpo=["--per_device_batch_size", "32", "--num_generations", "8", "--max_completion_len", "128"],
                     ppo_rlvr=["--per_device_batch_size", "16", "--max_new_tokens", "128"],
                     eval=["--max_rows", "128", "--max_new_tokens", "128"])
        tests = ["tests/test_kernels_gpu.py", "tests/test_kernels_aot.py"]

    def script(name, file, *args, run=None):
        out = runs / (run or name)
        return Step(name, "scripts", torchrun(file, *common, *sizes[file.removesuffix(".py")], *args,
                                              "--output_dir", str(out)),
                    600, ["tyro", "datasets"], needs_cuda=not cpu_smoke, metrics_file=str(out / "metrics.jsonl"))

    # eval.py computes in bf16 on CUDA by itself
    eval_args = ["--model", str(runs / "sft" / "final"), *sizes["eval"], "--output", str(runs / "eval.jsonl")]
    return [
        Step("tests", "tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests], 1200,
             ["pytest"], needs_cuda=not cpu_smoke),
        script("sft", "sft.py", "--max_steps", "4", "--save_every", "2", "--eval_every", "2"),
        script("sft_resume", "sft.py", "--max_steps", "6", "--save_every", "2", "--resume", run="sft"),
        script("dpo", "dpo.py", "--max_steps", "4", "--save_every", "2", "--eval_every", "2"),
        script("reward_model", "reward_model.py", "--max_steps", "4", "--save_every", "2", "--eval_every", "2"),
        script("grpo", "grpo.py", "--max_steps", "3", "--save_every", "2"),
        script("ppo_rlvr", "ppo_rlvr.py", "--max_steps", "3", "--save_every", "2"),
        Step("eval", "scripts", torchrun("eval.py", *eval_args), 600, ["tyro", "datasets"], needs_cuda=not cpu_smoke),
    ] + bench_steps(cpu_smoke)


def select(steps, only, skip):
    """Steps named (or in a group named) by --only, minus those named by --skip."""
    names = {s.name for s in steps} | set(GROUPS)
    unknown = [n for n in (only or []) + (skip or []) if n not in names]
    if unknown:
        raise SystemExit(f"unknown step or group {', '.join(unknown)}; choose from {', '.join(sorted(names))}")
    keep = lambda s, chosen: s.name in chosen or s.group in chosen  # noqa: E731
    return [s for s in steps if (not only or keep(s, only)) and not (skip and keep(s, skip))]


def make_model_dir(path):
    """A config-only directory (the scripts initialize such a model randomly) of Qwen2.5-0.5B's
    shape, with assets/tiny's byte-level tokenizer: the model's 151936 ids cover the tokenizer's."""
    from transformers import AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny")
    Qwen2Config(**QWEN_SHAPE, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def machine_info():
    info = {"python": sys.version.split()[0], "host": os.uname().nodename}
    for module in ("torch", "triton", "transformers", "pytest", *OPTIONAL):
        try:
            info[module] = importlib.metadata.version(OPTIONAL.get(module, module))
        except importlib.metadata.PackageNotFoundError:
            info[module] = None
    import torch

    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    shared_memory_per_block_optin=props.shared_memory_per_block_optin)
    else:
        info["gpu"] = None
    return info


def skip_reason(step, available, cuda):
    if step.needs_cuda and not cuda:
        return "needs a CUDA GPU"
    missing = [m for m in step.needs if not available.get(m)]
    if missing:
        return f"needs {', '.join(OPTIONAL.get(m, m) for m in missing)} (not installed)"
    return None


def json_lines(text):
    """The JSON objects printed one per line in `text`."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                rows.append(value)
    return rows


def run_step(step, env, log_path):
    """Runs one step in its own process group; its record."""
    start = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(step.cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=step.timeout_s)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
            proc.wait()
            rc, status = None, "timeout"
    output = Path(log_path).read_text(errors="replace")
    results = json_lines(output)
    if step.metrics_file and os.path.exists(step.metrics_file):
        lines = Path(step.metrics_file).read_text().splitlines()
        results = [json.loads(lines[-1])] if lines else []
    record = dict(name=step.name, group=step.group, cmd=step.cmd, status=status, returncode=rc,
                  seconds=round(time.time() - start, 1), results=results, log=str(log_path))
    if status != "passed":
        record["reason"] = output.strip()[-1500:]
    elif step.name == "tests":
        record["reason"] = output.strip().splitlines()[-1]  # pytest's "N passed, M skipped in T s"
    return record


# ---- the summary ----

def fmt(value):
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return "" if value is None else str(value)


def bench_rows(records):
    """{benchmark name: its JSON lines}, from the bench_* steps."""
    return {r["name"].removeprefix("bench_"): r["results"] for r in records if r["group"] == "bench"}


def comparisons(records):
    """Rows (benchmark, case, metric, nanopost, anchor, anchor value, ratio, target)."""
    rows = []
    benches = bench_rows(records)
    for bench, metric, anchor, case_fields, target in COMPARISONS:
        results = benches.get(bench, [])
        for ours in (r for r in results if r.get("impl") == "nanopost" and metric in r):
            case = {k: ours.get(k) for k in case_fields}
            theirs = next((r for r in results if r.get("impl") == anchor
                           and all(r.get(k) == v for k, v in case.items())), None)
            case_text = ", ".join(f"{k}={v}" for k, v in case.items())
            if theirs is None or metric not in theirs:
                # a skipped or failed anchor prints one line without the case's fields
                why = next((r.get("skipped") or r.get("error") for r in results if r.get("impl") == anchor
                            and (r.get("skipped") or r.get("error"))), None)
                rows.append((bench, case_text, metric, ours[metric], anchor, f"not run: {why or 'no result'}", "",
                             target))
            else:
                numbers = all(isinstance(v, (int, float)) for v in (ours[metric], theirs[metric]))
                ratio = ours[metric] / theirs[metric] if numbers and theirs[metric] else None
                rows.append((bench, case_text, metric, ours[metric], anchor, theirs[metric],
                             None if ratio is None else round(ratio, 3), target))
    return rows


def markdown(machine, records):
    lines = [f"# GPU check: {machine.get('gpu') or 'no GPU'}, {machine.get('date', '')}", ""]
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in machine.items()
                         if k in ("python", "torch", "cuda", "triton", "transformers", *OPTIONAL))
    lines += [versions + ".", ""]
    if machine.get("gpu"):
        lines += [f"{machine['gpu']}: {machine['gpu_memory_GiB']} GiB, compute capability {machine['capability']}, "
                  f"{machine['sms']} SMs, {machine['shared_memory_per_block_optin'] // 1024} KiB shared memory "
                  "per block.", ""]
    lines += ["| step | status | seconds | notes |", "|---|---|---|---|"]
    for r in records:
        note = (r.get("reason") or "").strip().splitlines()
        note = note[-1] if note else ""
        lines.append(f"| {r['name']} | {r['status']} | {fmt(r.get('seconds'))} | {note.replace('|', '/')[:200]} |")
    rows = comparisons(records)
    if rows:
        lines += ["", "## nanopost against its anchors", "",
                  "| benchmark | case | metric | nanopost | anchor | anchor's | nanopost / anchor | target |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    for bench, results in bench_rows(records).items():
        if not results:
            continue
        columns = list(dict.fromkeys(k for r in results for k in r))
        lines += ["", f"## bench/{bench}.py", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        lines += ["| " + " | ".join(fmt(r.get(c)).replace("|", "/").replace("\n", " ")[:120] for c in columns) + " |"
                  for r in results]
    return "\n".join(lines) + "\n"


def write_summary(out, machine, records):
    out = Path(out)
    with open(out / "results.jsonl", "w") as f:
        for bench, results in bench_rows(records).items():
            for row in results:
                f.write(json.dumps({"bench": bench, **row}) + "\n")
    summary = {"machine": machine, "steps": records, "comparisons": [
        dict(zip(("bench", "case", "metric", "nanopost", "anchor", "anchor_value", "ratio", "target"), row))
        for row in comparisons(records)]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(machine, records))


def load_records(out):
    records = [json.loads(p.read_text()) for p in Path(out).glob("steps/*.json")]
    return sorted(records, key=lambda r: r.get("order", 0))


# ---- main ----

def install_wheels(wheels, site):
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not files:
        raise SystemExit(f"--wheels {wheels}: no .whl files there")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *files], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these steps or groups")
    parser.add_argument("--skip", nargs="+", metavar="NAME", help="leave out these steps or groups")
    parser.add_argument("--out", help="results directory (default bench/results/<date>-<time>-<gpu>)")
    parser.add_argument("--wheels", help="directory of wheels to install first (pip --no-index --target OUT/site)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what is installed; run nothing")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the same plan at toy sizes on CPU (assets/tiny, gloo, small benchmarks)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scripts' runs and the model directory")
    parser.add_argument("--summarize", metavar="DIR", help="rebuild DIR's summary from DIR/steps/*.json and exit")
    args = parser.parse_args()

    if args.summarize:
        summary = json.loads((Path(args.summarize) / "summary.json").read_text())
        write_summary(args.summarize, summary["machine"], load_records(args.summarize))
        print((Path(args.summarize) / "summary.md").read_text())
        return

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    steps = select(build_plan(args.cpu_smoke, ROOT / "assets" / "tiny" if args.cpu_smoke else work / "model",
                              work), args.only, args.skip)
    if args.dry_run:
        machine = machine_info()
        print(json.dumps(machine, indent=1))
        available = {m: machine.get(m) is not None or importlib.util.find_spec(m) is not None
                     for m in ("pytest", *OPTIONAL)}
        for i, step in enumerate(steps, 1):
            reason = skip_reason(step, available, machine.get("gpu") is not None)
            print(f"\n[{i}/{len(steps)}] {step.name} ({step.group}, timeout {step.timeout_s} s)"
                  + (f": would be skipped, {reason}" if reason else "") + "\n    " + " ".join(step.cmd))
        shutil.rmtree(work)
        return

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no CUDA GPU here: --cpu-smoke runs the plan at toy sizes on CPU, --dry-run prints it")
    slug = (torch.cuda.get_device_name() if cuda else "cpu").replace(" ", "_")
    out = Path(args.out or ROOT / "bench" / "results" / f"{datetime.now():%Y%m%d-%H%M%S}-{slug}"
               + ("-cpu-smoke" if args.cpu_smoke else ""))
    (out / "steps").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    if args.wheels:
        install_wheels(args.wheels, out / "site")
        env["PYTHONPATH"] += os.pathsep + str(out / "site")
        sys.path.append(str(out / "site"))
        importlib.invalidate_caches()
    machine = {**machine_info(), "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu_smoke": args.cpu_smoke}
    available = {m: importlib.util.find_spec(m) is not None for m in ("pytest", *OPTIONAL)}
    if not args.cpu_smoke and any(s.group == "scripts" for s in steps):
        make_model_dir(work / "model")
    print(f"gpu_check: {len(steps)} steps, results in {out}" + (f", runs in {work}" if args.keep_work else ""),
          flush=True)
    existing = load_records(out)
    order = max((r.get("order", 0) for r in existing), default=0)
    try:
        for i, step in enumerate(steps, 1):
            reason = skip_reason(step, available, cuda)
            if reason:
                record = dict(name=step.name, group=step.group, cmd=step.cmd, status="skipped", reason=reason,
                              seconds=0, results=[])
            else:
                print(f"[{i}/{len(steps)}] {step.name}: {' '.join(step.cmd)}", flush=True)
                record = run_step(step, env, out / "logs" / f"{step.name}.log")
            record["order"] = order + i
            (out / "steps" / f"{step.name}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(f"[{i}/{len(steps)}] {step.name}: {record['status']} ({record['seconds']} s)"
                  + (f", {record['reason'].splitlines()[-1]}" if record.get("reason") else ""), flush=True)
            write_summary(out, machine, load_records(out))
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    records = load_records(out)
    print("\n" + (out / "summary.md").read_text())
    failed = [r["name"] for r in records if r["status"] in ("failed", "timeout")]
    if failed:
        sys.exit(f"gpu_check: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
