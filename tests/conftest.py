"""Shared helpers: launching the scripts as a user would (python or torchrun on CPU, gloo) and
reading what they wrote."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# Triton chooses between its interpreter and the compiler when it is imported, once per process, and
# the scripts import it through transformers: this process runs Triton kernels only in the
# interpreter (tests/test_kernels_triton.py), so it is switched on before anything imports triton.
# The processes the tests launch run without it (on a GPU the scripts use the compiled kernels).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# One thread per process, here and in every process a test launches. CPU torch with more threads
# than free cores slows down several times over (measured: SFT on the tiny model fell from 4,700
# to 700 tokens/s with 2 threads on a 2-core machine with one core busy elsewhere); one thread per
# process never oversubscribes the cores as long as there are no more processes than cores.
THREADS = "1"
os.environ["OMP_NUM_THREADS"] = THREADS
torch.set_num_threads(int(THREADS))
# The repo first, then whatever was on the path (packages installed with `pip --target` stay visible).
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def run_script(script, *args, nproc=1, timeout=900, check=True, env=None, cwd=ROOT):
    """Runs `python script args` (nproc=1) or `torchrun --nproc_per_node nproc script args` from the
    repo root (or cwd), one thread per process, with env added to the environment, and returns the
    CompletedProcess. Past the timeout the whole process tree is killed (torchrun's workers too) and
    the test fails saying so."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": THREADS,
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": PYTHONPATH, **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(ROOT / script)]
    cmd += [str(a) for a in args]
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout} s (is the machine busy?):\n"
                                 f"{stdout[-3000:]}\n{stderr[-5000:]}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}")
    return result


def kill_tree(pid):
    """SIGKILLs a process and all its descendants, found through /proc: torchrun starts its workers in
    sessions of their own, so killing its process group would leave them running."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree = [pid]
    for p in tree:
        tree += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
    """(final checkpoint dir, (held-out accuracy, on carry problems)) of the demo SFT run: pipeline.py's SFT stage."""
    sys.path.insert(0, str(ROOT))
    from pipeline import STAGES

    (script, flags), = STAGES[0][3]
    out = tmp_path_factory.mktemp("sft_demo") / "run"
    run_script(script, *flags, "--output_dir", out)
    return out / "final", greedy_accuracy(out / "final")


@pytest.fixture(scope="session")
def demo_pipeline(sft_demo_checkpoint, tmp_path_factory):
    """pipeline.py's stages after SFT at the demo settings, from the demo SFT run. Returns (output dir,
    results.json as a dict); what each stage printed is in output dir/logs/<stage>.txt, what the pipeline
    printed in output dir/pipeline.log."""
    import shutil

    sys.path.insert(0, str(ROOT))
    from pipeline import STAGES

    out = tmp_path_factory.mktemp("pipeline") / "run"
    shutil.copytree(sft_demo_checkpoint[0].parent, out / "sft")
    proc = run_script("pipeline.py", "--output_dir", out, "--stages", *[s for s, *_ in STAGES if s != "sft"],
                      timeout=3600)
    (out / "pipeline.log").write_text(proc.stdout + proc.stderr)
    return out, json.loads((out / "results.json").read_text())


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """pyproject's addopts spread the suite over one pytest-xdist worker per core. The tests that need
    the demo model (directly or through a module fixture) run on one worker, first, so that it is
    trained once while the other workers take the rest; each file's other tests stay together, so
    that its module fixtures are built once."""
    def needs_demo(item):
        return bool({"sft_demo_checkpoint", "demo_pipeline"} & set(item.fixturenames))

    items.sort(key=lambda item: not needs_demo(item))
    for item in items:
        item.add_marker(pytest.mark.xdist_group("demo" if needs_demo(item) else item.path.name))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """The groups reach xdist's scheduler as a suffix of each test's id. Where pytest-xdist and pytest
    disagree on how to set it (pytest-dev/pytest-xdist#1386), the suffix is silently lost: every worker
    would train the demo model itself and the suite would take twice as long, so stop instead."""
    if node.config.getvalue("dist") == "loadgroup" and ids and "@" not in ids[0]:
        raise pytest.UsageError("pytest-xdist's --dist loadgroup does not group the tests with this pytest "
                                "(pytest-dev/pytest-xdist#1386); install the test extra's pytest: "
                                "pip install -e '.[test]'")


# A session or module fixture that fails (a run past its timeout on a busy machine, say) raises the
# same error in every test that needs it. The first of them reports it; the others are reported as
# skipped, in one line that points to it, instead of repeating the error.
_setup_errors = []  # (error, test that reported it)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when != "setup" or not report.failed or call.excinfo is None:
        return
    error = call.excinfo.value
    first = next((nodeid for seen, nodeid in _setup_errors if seen is error), None)
    if first is None:
        _setup_errors.append((error, item.nodeid))
        return
    summary = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    report.outcome = "skipped"
    report.longrepr = (str(item.path), item.location[1] + 1,
                       f"Skipped: a fixture it needs failed in {first} ({type(error).__name__}: {summary})")
