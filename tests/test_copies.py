"""The shape every script keeps: its algorithm above one banner line, within a line budget; under it the
plumbing, every definition that several scripts share identical in each (tests/fix_copies.py, which
also rewrites drifted copies); the common flags under the same names, in the same order, everywhere."""

import dataclasses
import shutil
import subprocess
import sys

import pytest

import fix_copies
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import dpo  # noqa: E402
import eval as evaluation  # noqa: E402
import grpo  # noqa: E402
import ppo_rlvr  # noqa: E402
import reward_model  # noqa: E402
import sft  # noqa: E402

# lines above the banner, docstring, imports and every flag included
BUDGETS = {"sft.py": 300, "dpo.py": 450, "grpo.py": 550, "ppo_rlvr.py": 625, "reward_model.py": 300}
# the flags of more than one script, in the order every script lists them (after its own)
COMMON = ["model", "dataset", "dataset_split", "eval_dataset", "output_dir", "lr", "max_steps", "num_epochs",
          "per_device_batch_size", "grad_accum_steps", "max_tokens_per_micro_batch", "max_seq_len", "max_prompt_len",
          "max_completion_len", "warmup_ratio", "lr_schedule", "weight_decay", "max_grad_norm", "max_bad_steps", "seed",
          "precision", "save_dtype", "attn_implementation", "padding_free", "gradient_checkpointing", "hsdp",
          "save_every", "save_total_limit", "resume", "overwrite_output_dir", "eval_every", "log_every", "track",
          "wandb_project", "run_name"]
MODULES = {"sft.py": sft, "dpo.py": dpo, "grpo.py": grpo, "ppo_rlvr.py": ppo_rlvr, "eval.py": evaluation,
           "reward_model.py": reward_model}


def test_every_shared_definition_is_the_same_in_every_script():
    problems = fix_copies.check() + fix_copies.unused()
    assert not problems, "\n".join(problems) + "\n(python tests/fix_copies.py --fix rewrites the copies)"


def test_a_drifted_copy_is_reported_with_its_diff_and_fixed(tmp_path):
    for name in fix_copies.SCRIPTS:
        shutil.copy(ROOT / name, tmp_path / name)
    grpo_source = (tmp_path / "grpo.py").read_text()
    drifted = grpo_source.replace("def global_batch(step, n_rows, batch_size, seed):",
                                  "def global_batch(step, n_rows, batch_size, seed):\n    seed += 1")
    (tmp_path / "grpo.py").write_text(drifted)
    problems = fix_copies.check(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("global_batch: grpo.py differs from sft.py")
    assert "+    seed += 1" in problems[0]
    assert fix_copies.check(tmp_path, fix=True) == [] and (tmp_path / "grpo.py").read_text() == grpo_source
    # an edit made in a copy: --from takes it as the original for every script
    (tmp_path / "grpo.py").write_text(drifted)
    assert fix_copies.check(tmp_path, fix=True, origin="grpo.py") == []
    assert "    seed += 1" in (tmp_path / "sft.py").read_text() and fix_copies.check(tmp_path) == []
    (tmp_path / "dpo.py").write_text((tmp_path / "dpo.py").read_text().replace(fix_copies.BANNER, "# plumbing"))
    problems = fix_copies.check(tmp_path)
    assert problems[0].startswith("dpo.py: no banner line") and any("above the banner in dpo.py" in p for p in problems)


def test_the_command_checks_and_fixes():
    proc = subprocess.run([sys.executable, "tests/fix_copies.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout


@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_the_algorithm_comes_first_within_its_budget(script):
    lines = (ROOT / script).read_text().splitlines()
    banner = lines.index(fix_copies.BANNER)
    assert banner <= BUDGETS[script], f"{script}: {banner} lines above the banner, budget {BUDGETS[script]}"
    assert lines[:banner].count("def main(args):") == 1  # main, its loop included, is read before the banner
    assert lines[-2:] == ['if __name__ == "__main__":', "    launch(main, Args)"]


@pytest.mark.parametrize("script", sorted(MODULES))
def test_common_flags_have_one_name_and_one_order(script):
    fields = [f.name for f in dataclasses.fields(MODULES[script].Args)]
    common = [name for name in fields if name in COMMON]
    assert common == [name for name in COMMON if name in fields], script
    assert fields[len(fields) - len(common):] == common, f"{script}: its own flags come first, then the common ones"
    assert not {"max_new_tokens", "cliprange", "cliprange_value", "ref_cache"} & set(fields)
