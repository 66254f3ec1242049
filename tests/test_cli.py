"""What every script does with its command line, run as a user would: a missing local file, a bad
flag or a bad data row ends in one line that says what is wrong (an unexpected error keeps its
traceback); a fresh run refuses an output_dir that holds a run unless told to overwrite it, and a
resumed run logs each step once; Ctrl-C saves a resumable checkpoint like SIGTERM; --help spells
flags as the docs do; the demo's --model defaults say which checkpoint to pass when theirs is missing."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import PYTHONPATH, ROOT, read_metrics, run_script, write_jsonl

sys.path.insert(0, str(ROOT))
import dpo  # noqa: E402
import eval as evaluation  # noqa: E402
import grpo  # noqa: E402
import ppo_rlvr  # noqa: E402
import reward_model  # noqa: E402
import sft  # noqa: E402

TINY = str(ROOT / "assets" / "tiny")
TRAINERS = {"sft.py": sft, "dpo.py": dpo, "grpo.py": grpo, "ppo_rlvr.py": ppo_rlvr, "reward_model.py": reward_model}
# a few quick steps of each trainer on the tiny model (random init) and the demo data
QUICK = {"sft.py": ["--per_device_batch_size", 4],
         "dpo.py": ["--per_device_batch_size", 4],
         "grpo.py": ["--per_device_batch_size", 8, "--num_generations", 4, "--max_completion_len", 8],
         "ppo_rlvr.py": ["--per_device_batch_size", 4, "--max_completion_len", 8, "--num_ppo_epochs", 1],
         "reward_model.py": ["--per_device_batch_size", 4]}
GOOD_SFT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def only_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "grpo.py", "ppo_rlvr.py", "eval.py", "reward_model.py"])
def test_a_missing_local_dataset_is_one_line(script, tmp_path):
    """Named like a local file, the dataset is not looked up on the hub (which retried for 42 s and
    ended in a ConnectionError): one line, exit status 1."""
    missing = tmp_path / "missing.jsonl"
    output = [] if script == "eval.py" else ["--output_dir", tmp_path / "out"]
    proc = run_script(script, "--model", TINY, "--dataset", missing, *output, check=False)
    assert proc.returncode == 1
    assert only_line(proc.stderr) == f"error: --dataset {missing}: no such file or directory"


def test_a_broken_json_line_names_its_row(tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join([json.dumps(GOOD_SFT_ROW)] * 5 + ['{"messages": [ broken'] + [json.dumps(GOOD_SFT_ROW)]))
    proc = run_script("sft.py", "--dataset", data, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert only_line(proc.stderr) == f"error: {data}: row 5 (line 6) is not valid JSON: Expecting value at column 16"


def test_a_row_without_messages_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD_SFT_ROW] * 3 + [{"text": "no messages"}])
    proc = run_script("sft.py", "--dataset", data, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert only_line(proc.stderr) == (f"error: {data} row 3: expected a non-empty list of {{role, content}} "
                                      "messages, got None")


def test_an_unexpected_error_keeps_its_traceback(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{ not json")
    proc = run_script("sft.py", "--model", model, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr


@pytest.mark.parametrize("script", sorted(TRAINERS))
def test_flags_and_paths_are_checked_first(script, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    module = TRAINERS[script]
    fresh = dict(model=TINY, dataset=str(ROOT / "data" / "rl_train.jsonl"), eval_dataset=None,
                 output_dir=str(tmp_path / "out"))
    module.check_args(module.Args(**fresh))
    with pytest.raises(module.InputError, match="--lr must be > 0"):
        module.check_args(module.Args(**{**fresh, "lr": -1.0}))
    for flag, value in (("dataset", "data/no_such.parquet"), ("eval_dataset", str(tmp_path / "none.json")),
                        ("eval_dataset", "data/no_such_dir")):
        with pytest.raises(module.InputError, match=f"--{flag} {value}: no such file or directory"):
            module.check_args(module.Args(**{**fresh, flag: value}))
    with pytest.raises(module.InputError, match="--model ./nowhere: no such directory"):
        module.check_args(module.Args(**{**fresh, "model": "./nowhere"}))
    module.check_args(module.Args(**{**fresh, "eval_dataset": "someone/some-dataset"}))  # a hub id: not checked
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("")
    with pytest.raises(module.InputError, match=r"holds an earlier run \(metrics.jsonl\): pass --resume to continue "
                                                "it, --overwrite_output_dir to replace it"):
        module.check_args(module.Args(**fresh))
    module.check_args(module.Args(**fresh, overwrite_output_dir=True))
    with pytest.raises(module.InputError, match="pass one"):
        module.check_args(module.Args(**fresh, overwrite_output_dir=True, resume=True))


@pytest.mark.parametrize("script,stage", [("dpo.py", "sft"), ("grpo.py", "dpo"), ("ppo_rlvr.py", "dpo"),
                                          ("eval.py", "grpo"), ("reward_model.py", "sft")])
def test_a_missing_default_model_says_which_checkpoint_to_pass(script, stage, tmp_path, monkeypatch):
    """Each script starts, by default, from the checkpoint that `python pipeline.py` writes for the stage
    before it (runs/pipeline/<stage>/final), so that the README's commands run after the pipeline; where it
    is missing, the error says how to make it, or names the demo checkpoints that exist."""
    module = {**TRAINERS, "eval.py": evaluation}[script]
    assert module.Args().model == f"runs/pipeline/{stage}/final"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(module.InputError, match=re.escape(
            f"--model runs/pipeline/{stage}/final: no such directory; `python pipeline.py` writes the demo's "
            f"checkpoints (runs/pipeline/{stage}/final, ...), `python {stage}.py` writes runs/{stage}/final")):
        module.check_args(module.Args())
    (tmp_path / "runs" / stage / "final").mkdir(parents=True)
    with pytest.raises(module.InputError, match=f"; found runs/{stage}/final: pass it with --model$"):
        module.check_args(module.Args())
    (tmp_path / "runs" / "sft" / "final").mkdir(parents=True, exist_ok=True)
    if stage != "sft":  # a script whose stage follows DPO also names SFT checkpoints, after DPO's
        with pytest.raises(module.InputError, match=f"; found runs/{stage}/final, runs/sft/final: pass one of them"):
            module.check_args(module.Args())


def test_eval_checks_its_flags():
    with pytest.raises(evaluation.InputError, match="--num_samples > 1 needs --temperature > 0"):
        evaluation.check_args(evaluation.Args(model=TINY, num_samples=4))
    with pytest.raises(evaluation.InputError, match="--max_completion_len must be >= 1"):
        evaluation.check_args(evaluation.Args(model=TINY, max_completion_len=0))


def test_a_used_output_dir_is_refused_resumed_once_per_step_or_overwritten(tmp_path):
    out = tmp_path / "run"
    common = ["--eval_dataset", "None", "--per_device_batch_size", 4, "--output_dir", out]
    run_script("sft.py", *common, "--max_steps", 4, "--save_every", 2)
    first = read_metrics(out)
    # as if the run had died after logging steps 3 and 4 but before saving step_4
    shutil.rmtree(out / "step_4")
    run_script("sft.py", *common, "--max_steps", 4, "--save_every", 2, "--resume")
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert [read_metrics(out)[s]["loss"] for s in steps] == [first[s]["loss"] for s in steps]

    proc = run_script("sft.py", *common, "--max_steps", 1, check=False)
    assert proc.returncode == 1
    assert only_line(proc.stderr) == (f"error: --output_dir {out} holds an earlier run (final, metrics.jsonl, step_2, "
                                      "step_4): pass --resume to continue it, --overwrite_output_dir to replace it, "
                                      "or another --output_dir")
    run_script("sft.py", *common, "--max_steps", 1, "--overwrite_output_dir")
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("script", sorted(TRAINERS))
def test_ctrl_c_saves_a_resumable_checkpoint(script, tmp_path):
    out = tmp_path / "run"
    model = [] if script == "sft.py" else ["--model", TINY]
    if script == "dpo.py":  # 64 pairs: a short reference pass
        pairs = [json.loads(line) for line in open(ROOT / "data" / "dpo_train.jsonl")][:64]
        model += ["--dataset", str(write_jsonl(tmp_path / "pairs.jsonl", pairs))]
    cmd = [sys.executable, script, *model, "--eval_dataset", "None", "--max_steps", "100000", "--output_dir", str(out),
           *map(str, QUICK[script])]
    # stdout and stderr (the progress bar's) in one stream, as a terminal shows them
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and \
            not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    # saved, then the shell's status of a run ended by SIGINT: 128 + 2
    assert proc.returncode == 130 and "\nCtrl-C: saving a checkpoint after this step" in output, output[-3000:]
    saved = [p.name for p in out.glob("step_*")]
    # on a line of its own, not after the progress bar's
    assert len(saved) == 1 and f"\nSIGINT: saved {saved[0]}, exiting (--resume continues from it)" in output, \
        (saved, output[-3000:])
    assert (out / saved[0] / "trainer_state.json").exists()


@pytest.mark.parametrize("script", sorted(TRAINERS))
def test_a_second_ctrl_c_takes_the_default_action(script):
    """The first SIGINT only asks the loop to stop; the handler then gives SIGINT back to the system,
    so a second one ends the process at once, even inside a long C call."""
    module = TRAINERS[script]
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        received = module.stop_on_signals(rank=1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert received == ["SIGTERM", "SIGINT"]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM keeps asking to stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_help_spells_flags_with_underscores_and_both_spellings_work():
    """One interpreter runs every script's __main__ with --help, as `python X.py --help` would."""
    code = ("import runpy, sys\n"
            "for script in sys.argv[1:]:\n"
            "    sys.argv = [script, '--help']\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit:\n"
            "        print('=== end of', script, flush=True)\n")
    scripts = ["sft.py", "dpo.py", "grpo.py", "ppo_rlvr.py", "eval.py", "reward_model.py", "pipeline.py"]
    proc = subprocess.run([sys.executable, "-c", code, *scripts], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": PYTHONPATH},
                          timeout=300)
    helps = proc.stdout.split("=== end of")
    assert len(helps) == len(scripts) + 1, proc.stderr[-3000:]
    for script, text in zip(scripts, helps):
        flags = [word for word in text.split() if word.startswith("--")]
        assert "--help" in flags and not any("-" in flag[2:] for flag in flags), (script, flags)
        if script != "pipeline.py":
            assert "--max_completion_len" in flags or "--max_steps" in flags, script
        if script in TRAINERS:
            words = " ".join(text.replace("│", " ").split())
            assert "--overwrite_output_dir," in flags and "(None: output_dir's name) (default: None)" in words
    args = sft.tyro.cli(sft.prose_help(sft.Args), args=["--max-steps", "3", "--max_seq_len", "32"],
                        use_underscores=True)
    assert (args.max_steps, args.max_seq_len) == (3, 32)


@dataclasses.dataclass
class Wrapped:
    steps: int = 3
    """a docstring that the source wraps
    mid-sentence, as long docstrings are"""


def test_a_wrapped_docstring_is_one_paragraph_of_help(capsys, monkeypatch):
    """tyro keeps a docstring's line breaks; prose_help gives it the docstring as one paragraph."""
    monkeypatch.setenv("COLUMNS", "200")

    def help_lines(args_class):
        with pytest.raises(SystemExit):
            sft.tyro.cli(args_class, args=["--help"])
        return [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]

    assert not any("wraps mid-sentence" in line for line in help_lines(Wrapped))
    assert any("a docstring that the source wraps mid-sentence, as long docstrings are" in line
               for line in help_lines(sft.prose_help(Wrapped)))
    assert sft.tyro.cli(sft.prose_help(Wrapped), args=["--steps", "5"]).steps == 5


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "grpo.py", "ppo_rlvr.py", "eval.py", "reward_model.py"])
def test_help_reads_as_prose(script):
    """Each flag's help is its docstring as one paragraph: on a terminal wide enough for the longest, every
    help text is on one line, wherever the source wraps the docstring."""
    module = {**TRAINERS, "eval.py": evaluation}[script]
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000", "PYTHONPATH": PYTHONPATH})
    lines = [" ".join(line.replace("│", " ").split()) for line in proc.stdout.splitlines()]
    helps = sft.prose_help(module.Args).__dataclass_fields__
    for field in dataclasses.fields(module.Args):
        text = helps[field.name].type.__metadata__[0].help
        assert any(text in line for line in lines), (script, field.name, text)
        # tyro appends "(default: ...)": a help that names its default too would say it twice
        assert "default" not in text.lower(), (script, field.name, text)


def test_torchruns_failure_report_ends_with_the_error(tmp_path):
    """Under torchrun a bad flag's one line is printed, and it is what torchrun's failure report, printed
    last, names as the cause (instead of 'To enable traceback see ...')."""
    proc = run_script("dpo.py", "--model", tmp_path / "missing", "--output_dir", tmp_path / "out", nproc=2,
                      check=False)
    message = f"error: --model {tmp_path / 'missing'}: no such directory"
    assert proc.returncode != 0 and message in proc.stderr
    tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
    assert "Root Cause" in tail and message in tail, tail


def test_resume_does_not_warn_of_a_random_init(tmp_path):
    """A resumed run's weights come from its checkpoint: no warning that the config-only model is
    initialized randomly (the fresh run does warn)."""
    common = ["--eval_dataset", "None", "--per_device_batch_size", 4, "--save_every", 1, "--output_dir", tmp_path]
    fresh = run_script("sft.py", *common, "--max_steps", 1)
    resumed = run_script("sft.py", *common, "--max_steps", 2, "--resume")
    warning = "WARNING: assets/tiny has a config but no weights"
    assert warning in fresh.stdout and warning not in resumed.stdout and "resumed from" in resumed.stdout


def test_wandb_files_go_with_the_run(tmp_path):
    """--track (offline here) writes wandb's local files under --output_dir, not ./wandb of the working
    directory, so that two runs started from one directory keep theirs apart."""
    proc = run_script("sft.py", "--model", TINY, "--dataset", ROOT / "data" / "sft_train.jsonl", "--eval_dataset",
                      "None", "--per_device_batch_size", 4, "--max_steps", 1, "--track", "--output_dir", tmp_path / "run",
                      env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}, cwd=tmp_path)
    assert proc.returncode == 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")) and not (tmp_path / "wandb").exists()


def test_cpu_threads_leave_a_core_free_unless_told():
    code = ("import os, torch, sft\n"
            "os.environ.pop('OMP_NUM_THREADS', None)\n"
            "sft.cpu_threads(); alone = torch.get_num_threads()\n"
            "os.environ['LOCAL_WORLD_SIZE'] = '2'; sft.cpu_threads(); shared = torch.get_num_threads()\n"
            "os.environ['OMP_NUM_THREADS'] = '3'; torch.set_num_threads(3); sft.cpu_threads()\n"
            "print(alone, shared, torch.get_num_threads(), os.cpu_count())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**env, "PYTHONPATH": PYTHONPATH}).stdout.split()
    alone, shared, told, cores = map(int, out)
    assert (alone, shared, told) == (max(1, cores - 1), max(1, (cores - 1) // 2), 3)


def test_pipeline_checks_its_stages_before_running_any(tmp_path):
    sys.path.insert(0, str(ROOT))
    import pipeline

    specs = {name: (start, learns, commands) for name, start, learns, commands in pipeline.STAGES}
    with pytest.raises(pipeline.InputError, match="unknown"):
        pipeline.check_args(pipeline.Args(output_dir=str(tmp_path), stages=("sft", "rlhf")), specs)
    with pytest.raises(pipeline.InputError, match="grpo starts from .*dpo/final, which does not exist"):
        pipeline.check_args(pipeline.Args(output_dir=str(tmp_path), stages=("grpo",)), specs)
    pipeline.check_args(pipeline.Args(output_dir=str(tmp_path), stages=("sft", "dpo", "grpo")), specs)
    # PPO against the reward model also needs the reward model, from this run or an earlier one
    with pytest.raises(pipeline.InputError, match="ppo_rm needs .*reward_model/final, which does not exist"):
        pipeline.check_args(pipeline.Args(output_dir=str(tmp_path), stages=("sft", "dpo", "ppo_rm")), specs)
    pipeline.check_args(pipeline.Args(output_dir=str(tmp_path), stages=("sft", "dpo", "reward_model", "ppo_rm")),
                        specs)
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "metrics.jsonl").write_text("")
    with pytest.raises(pipeline.InputError, match="dpo holds an earlier run: pass --overwrite_output_dir"):
        pipeline.check_args(pipeline.Args(output_dir=str(tmp_path), stages=("sft", "dpo")), specs)
    pipeline.check_args(pipeline.Args(output_dir=str(tmp_path), stages=("sft", "dpo"), overwrite_output_dir=True), specs)
