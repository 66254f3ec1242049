"""Faults a run survives, tested as they happen on a cluster: `--resume auto` makes one command start a run and
continue it, so that torchrun --max-restarts (or a requeued job) picks up a run whose worker was SIGKILLed, in a
step or in the middle of a save, and ends with the losses of a run never interrupted; a step whose loss or gradient
is not finite changes no weight and no optimizer state, bit for bit, on every rank, and too many in a row stop the
run with a checkpoint; a save that fails (disk full, a file size limit) ends in one line naming the path and the OS
error, with the earlier step_N and final/ as they were."""

import hashlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import PYTHONPATH, ROOT, THREADS, free_port, kill_tree, read_metrics, run_script, write_jsonl

sys.path.insert(0, str(ROOT))
import sft  # noqa: E402

TINY = str(ROOT / "assets" / "tiny")
SFT = ["--eval_dataset", "None", "--per_device_batch_size", 4]


def only_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def steps_logged(out):
    """The steps of metrics.jsonl's rows, in the order written."""
    return [json.loads(line)["step"] for line in open(Path(out) / "metrics.jsonl")]


def complete_checkpoints(out):
    return sorted(int(p.name.split("_")[1]) for p in Path(out).glob("step_*") if p.name.split("_")[1].isdigit())


# ---------------------------------------------------------------------------------------------
# --resume: bare (continue; a step_N must exist), auto (continue if there is one, else start), absent (start)


def test_resume_takes_no_value_or_auto():
    def parse(*flags):
        return sft.tyro.cli(sft.prose_help(sft.Args), args=list(flags), use_underscores=True).resume

    assert (parse(), parse("--resume"), parse("--resume", "auto"), parse("--resume=auto")) == \
        (False, True, "auto", "auto")
    assert parse("--resume", "--max_steps", "3") is True  # a bare --resume before another flag
    with pytest.raises(SystemExit):
        parse("--resume", "always")


def test_resume_auto_never_replaces_a_finished_run(tmp_path):
    """With no step_N, --resume auto starts afresh where a run died before its first save (its metrics.jsonl goes),
    but a finished run's final/ is never deleted; bare --resume needs a step_N."""
    fresh = dict(model=TINY, eval_dataset=None, output_dir=str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    sft.check_args(sft.Args(**fresh, resume="auto"))
    with pytest.raises(sft.InputError, match=f"^--resume: no step_N checkpoint in {tmp_path} "
                                             r"\(`--resume auto` starts a run where there is none\)$"):
        sft.check_args(sft.Args(**fresh, resume=True))
    (tmp_path / "final").mkdir()
    with pytest.raises(sft.InputError, match=f"^--resume auto: --output_dir {tmp_path} holds a finished run "
                                             r"\(final\) and no step_N to continue from: pass --overwrite_output_dir"):
        sft.check_args(sft.Args(**fresh, resume="auto"))
    with pytest.raises(sft.InputError, match="pass one"):
        sft.check_args(sft.Args(**fresh, resume="auto", overwrite_output_dir=True))
    (tmp_path / "step_2").mkdir()
    sft.check_args(sft.Args(**fresh, resume="auto"))


def test_the_same_command_starts_continues_and_refuses_other_settings(tmp_path):
    """One command, run twice: it starts (and says so); then, as if the run had died while saving final/, it
    continues from the last step_N (and says so), logging each step once with the same losses; with a setting that
    the data order depends on changed, it refuses the step_N in one line."""
    out = tmp_path / "run"
    command = [*SFT, "--max_steps", 3, "--save_every", 2, "--output_dir", out, "--resume", "auto"]
    first = run_script("sft.py", *command)
    assert f"started a fresh run (--resume auto: no step_N checkpoint in {out})" in first.stdout
    losses = [row["loss"] for row in read_metrics(out).values()]
    (out / "final").rename(out / "final.tmp")
    again = run_script("sft.py", *command)
    assert f"resumed from {out / 'step_2'} (--resume auto)" in again.stdout
    assert "started a fresh run" not in again.stdout and "initializing the model randomly" not in again.stdout
    assert steps_logged(out) == [1, 2, 3] and [row["loss"] for row in read_metrics(out).values()] == losses
    assert complete_checkpoints(out) == [2] and (out / "final").is_dir() and not (out / "final.tmp").exists()
    other = run_script("sft.py", *command, "--seed", 2, check=False)
    assert other.returncode == 1
    assert only_line(other.stderr).startswith(f"error: {out / 'step_2'} was trained with {{'seed': 1, ")


# ---------------------------------------------------------------------------------------------
# A dead worker costs only the steps since the last save: torchrun --max-restarts with --resume auto


def announced(lines):
    """The line each attempt of a run with --resume auto printed: whether it started afresh or resumed."""
    return [line for line in lines if "(--resume auto" in line]


def resumed_at(lines):
    """The step of each `resumed from .../step_N (--resume auto)` line."""
    return [int(line.split(" (--resume auto")[0].rsplit("step_", 1)[1]) for line in lines if "resumed from" in line]


def torchrun_workers(torchrun_pid):
    """{rank: pid} of the live worker processes that torchrun started."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != torchrun_pid or fields[0] == "Z":
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
            found[int(next(v for v in environ if v.startswith(b"RANK="))[5:])] = int(stat.parent.name)
        except (OSError, StopIteration, ValueError):
            continue  # the process ended meanwhile
    return found


def run_with_kills(script, flags, out, kills, seed):
    """`torchrun --nproc_per_node 2 --max-restarts 2 script flags --resume auto`, SIGKILLing one worker once in each
    attempt but the last, at the moments `kills` names: ("save", rank) as soon as the attempt, having saved a
    step_N, starts writing the next (its step_N.tmp appears), ("step", rank) a random 0-0.3 s after the attempt
    logged the first step after a step_N it saved. Returns what torchrun printed, its status and, per kill,
    (moment, rank, the step whose save it interrupted or the last step logged)."""
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONPATH": PYTHONPATH, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "2",
           "--master_port", str(free_port()), str(ROOT / script), *map(str, flags), "--output_dir", str(out),
           "--resume", "auto"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = [], []
    readers = [threading.Thread(target=lambda s, into: into.extend(s), args=pipe) for pipe in
               ((proc.stdout, stdout), (proc.stderr, stderr))]
    for reader in readers:
        reader.start()
    moments, deadline, landed = random.Random(seed), time.time() + 600, []

    def wait_for(condition, pause):
        while not condition():
            assert proc.poll() is None and time.time() < deadline, "".join(stdout)[-2000:] + "".join(stderr)[-3000:]
            time.sleep(pause)

    try:
        for attempt, (moment, rank) in enumerate(kills):
            wait_for(lambda: len(announced(stdout)) > attempt, 0.01)
            resumed = (resumed_at(announced(stdout)[-1:]) or [0])[0]  # the step this attempt continues from (0: none)
            if moment == "save":  # as soon as this attempt starts writing a step_N after one it completed
                saving = lambda: [p for p in out.glob("step_*.tmp")  # noqa: E731
                                  if complete_checkpoints(out)[-1:] > [resumed] and
                                  int(p.name[5:-4]) > complete_checkpoints(out)[-1]]
                wait_for(saving, 0.002)
                step = int(saving()[0].name[5:-4])
                os.kill(torchrun_workers(proc.pid)[rank], signal.SIGKILL)
                assert not (out / f"step_{step}").exists(), "the kill came after the save had completed"
            else:  # in a step after the first that this attempt saved, and after that step's log line
                saved = lambda: complete_checkpoints(out)[-1:] > [resumed]  # noqa: E731
                wait_for(lambda: saved() and steps_logged(out)[-1] > complete_checkpoints(out)[-1], 0.01)
                time.sleep(moments.uniform(0, 0.3))
                os.kill(torchrun_workers(proc.pid)[rank], signal.SIGKILL)
                step = steps_logged(out)[-1]
            landed.append((moment, rank, step))
        proc.wait(timeout=max(1, deadline - time.time()))
    except (subprocess.TimeoutExpired, AssertionError):
        kill_tree(proc.pid)
        raise
    finally:
        for reader in readers:
            reader.join()
    return "".join(stdout), "".join(stderr), proc.returncode, landed


def check_restarted_run(out, reference, stdout, landed, keys):
    """The run restarted after each kill from its last complete step_N (for a kill in a save, the one before it),
    logged every step once, and computed every step as the uninterrupted reference run did, to the bit."""
    lines = announced(stdout.splitlines(keepends=True))
    assert lines[0] == f"started a fresh run (--resume auto: no step_N checkpoint in {out})\n", lines
    resumes = resumed_at(lines)
    assert len(resumes) == len(lines) - 1 == len(landed), lines
    for (moment, _, step), resume in zip(landed, resumes):
        assert resume < step if moment == "save" else resume <= step, (landed, resumes)
    steps = sorted(read_metrics(reference))
    assert steps_logged(out) == steps and not list(out.glob("*.tmp"))
    restarted, uninterrupted = read_metrics(out), read_metrics(reference)
    for step in steps:
        for key in keys:
            assert restarted[step][key] == uninterrupted[step][key], (step, key)
    expected = load_file(reference / "final" / "model.safetensors")
    for name, tensor in load_file(out / "final" / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name


RESTARTS = {
    # 12 steps, a step_N every 3; a kill in the save of a step_N, then one in a step after the next start
    "sft.py": ([*SFT, "--max_steps", 12, "--save_every", 3], [("save", 1), ("step", 0)], ["loss", "grad_norm"]),
    # 8 rollouts (one optimizer step each), a step_N every 2; a kill in a step, then one in a save
    "ppo_rlvr.py": (["--model", TINY, "--eval_dataset", "None", "--per_device_batch_size", 4, "--num_ppo_epochs", 1,
                     "--max_completion_len", 8, "--max_steps", 8, "--save_every", 2],
                    [("step", 0), ("save", 1)], ["loss/policy_avg", "loss/value_avg", "objective/kl", "grad_norm",
                                                 "value_grad_norm", "completions/mean_length"]),
}


@pytest.mark.parametrize("script", sorted(RESTARTS))
def test_sigkilled_workers_cost_only_the_steps_since_the_last_save(script, tmp_path):
    """Under torchrun --max-restarts 2 with --resume auto, one worker is SIGKILLed twice: torchrun restarts the
    group each time, the same command continues from the last complete step_N, and the run ends with every step
    logged once and the numbers (and final weights) of a run never interrupted."""
    flags, kills, keys = RESTARTS[script]
    reference = tmp_path / "uninterrupted"
    run_script(script, *flags, "--output_dir", reference, "--resume", "auto", nproc=2)
    out = tmp_path / "restarted"
    stdout, stderr, status, landed = run_with_kills(script, flags, out, kills, seed=len(script))
    assert status == 0 and len(landed) == 2, stderr[-5000:]
    check_restarted_run(out, reference, stdout, landed, keys)


# ---------------------------------------------------------------------------------------------
# A bad step never reaches the weights


def checkpoint_state(path):
    """Every tensor of a step_N's models and optimizer states (not the learning rate: the scheduler's)."""
    dcp_to_torch_save(path, path.parent / f"{path.name}.pt")
    state = torch.load(path.parent / f"{path.name}.pt", weights_only=False)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for param, moments in state["model_optim"]["state"].items():
        flat |= {f"optim.{param}.{k}": v for k, v in moments.items()}
    return flat


def test_a_non_finite_step_changes_no_weight_and_too_many_stop_the_run(tmp_path):
    """On 2 ranks with 2 micro-batches each per step, rank 1's first micro-batch of steps 3, 5 and 6 is NaN (the
    hook in tests/nan_hook). Step 3 is skipped on both ranks: step_3's weights and AdamW moments and step counts
    are step_2's, bit for bit, while the learning rate moves on; step 4 trains. Steps 5 and 6 are skipped too,
    and with --max_bad_steps 2 the run saves step_6 (step_4's weights) and stops in one line."""
    out = tmp_path / "run"
    proc = run_script("sft.py", *SFT, "--grad_accum_steps", 2, "--max_steps", 10, "--save_every", 1,
                      "--max_bad_steps", 2, "--output_dir", out, nproc=2, check=False,
                      env={"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "nan_hook"), PYTHONPATH]),
                           "NANOPOST_TEST_NAN_RANK": "1", "NANOPOST_TEST_NAN_CALLS": "5,9,11"})
    message = ("error: 2 steps in a row had a non-finite loss or gradient norm (the last, step 6, with loss is nan and "
               "model gradient norm is nan); saved step_6, which none of them changed, and stopped")
    assert proc.returncode != 0 and message in proc.stderr.splitlines(), proc.stderr[-5000:]
    assert message in "\n".join(proc.stderr.strip().splitlines()[-12:])  # torchrun's report names it
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr  # torchrun's own, no worker's
    for step in (3, 5, 6):
        assert f"WARNING: skipped step {step}, whose loss is nan and model gradient norm is nan: no weight or " \
               "optimizer state changed" in proc.stdout

    metrics = read_metrics(out)
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert [metrics[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 2, 3]
    assert [math.isfinite(metrics[s]["loss"]) for s in range(1, 7)] == [True, True, False, True, False, False]
    assert metrics[3]["learning_rate"] > metrics[4]["learning_rate"] > metrics[5]["learning_rate"]  # it moved on

    states = {step: checkpoint_state(out / f"step_{step}") for step in (2, 3, 4, 5, 6)}
    assert any(key.endswith(".step") for key in states[2]) and len(states[2]) > 30
    for before, after in ((2, 3), (4, 5), (4, 6)):
        assert states[before].keys() == states[after].keys()
        for key, value in states[before].items():
            assert torch.equal(value, states[after][key]), (before, after, key)
    assert not all(torch.equal(value, states[4][key]) for key, value in states[3].items())  # step 4 trained
    trainer_state = json.loads((out / "step_6" / "trainer_state.json").read_text())
    assert trainer_state["skipped_steps"] == 3 and trainer_state["schedulers"][0]["last_epoch"] == 6


# ---------------------------------------------------------------------------------------------
# A save that fails leaves the earlier checkpoints as they were


def digest(path):
    """A hash of every file under path, with its name."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return h.hexdigest()


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a 32 MiB tmpfs, and a function that fills it but for `free` bytes. Mounting needs root
    (CAP_SYS_ADMIN): where the OS refuses, the test is skipped (the file size limit case fails writes without it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"the OS refused to mount a tmpfs: {mounted.stderr.strip()}")

    def fill(free):
        with open(disk / "filler", "ab") as f:
            f.write(bytes(max(0, os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - free)))

    try:
        yield disk, fill
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("how", ["disk full", "file size limit"])
def test_a_failed_save_leaves_the_earlier_checkpoints_and_ends_in_one_line(how, tmp_path, request):
    """A run saves step_2 and final/; then, with the disk full (a tmpfs filled to its last 64 KiB; one process) or
    a limit on the size of a file (512 KiB, RLIMIT_FSIZE; 2 ranks, each writing its own shards, so that every rank
    must learn of a failure on any), the resumed run's save of step_4, and in another its save of final/, fail:
    each ends in one line naming the path and the OS error, deletes what it had written, and leaves step_2 and
    final/ as they were."""
    rows = [json.loads(line) for line in open(ROOT / "data" / "sft_train.jsonl")][:64]
    if how == "disk full":
        disk, fill = request.getfixturevalue("full_disk")
        out, nproc, limit, error = disk / "run", 1, None, "[Errno 28] No space left on device"
    else:
        out, nproc, limit, error = tmp_path / "run", 2, 512 * 1024, "[Errno 27] File too large"
    common = [*SFT, "--dataset", write_jsonl(tmp_path / "sft.jsonl", rows), "--output_dir", out]
    run_script("sft.py", *common, "--max_steps", 2, "--save_every", 2, nproc=nproc)
    before = {name: digest(out / name) for name in ("step_2", "final")}
    if how == "disk full":
        fill(free=64 * 1024)
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "PYTHONPATH": PYTHONPATH, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                   str(nproc), "--master_port", str(free_port())]
    for flags, saved in ((["--max_steps", 4, "--save_every", 2], "step_4"), (["--max_steps", 3], "final")):
        proc = subprocess.run([*launcher, str(ROOT / "sft.py"), *map(str, common), "--resume", *map(str, flags)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=(
                                  lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None)
        line = f"error: could not save {out / saved}: {error}"
        if nproc == 1:  # the last line, after the progress bar's
            assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-3000:]
            assert "Traceback" not in proc.stderr
        else:  # printed by rank 0, and named by torchrun's report
            assert proc.returncode != 0 and line in proc.stderr.splitlines(), proc.stderr[-5000:]
            assert line in "\n".join(proc.stderr.strip().splitlines()[-12:])
            assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr  # torchrun's own
        assert complete_checkpoints(out) == [2] and not list(out.glob("*.tmp"))
        assert {name: digest(out / name) for name in before} == before
