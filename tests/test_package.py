"""nanopost installs one top-level package, `nanopost`, and takes no name that another package owns:
`kernels` is Hugging Face's kernel hub (which transformers imports since 5.25) and `verifiers` an
RL-environments library on PyPI. Run from the repo root, where a script's own folder is first on
sys.path, as it is for `python sft.py`."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import PYTHONPATH, ROOT

ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": PYTHONPATH,
       "OMP_NUM_THREADS": "1"}
SCRIPTS = ["sft.py", "dpo.py", "grpo.py", "ppo_rlvr.py", "eval.py", "reward_model.py", "pipeline.py"]


def python(code, cwd):
    """Runs `python -c code` in cwd, where '' (cwd) is first on sys.path, and returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("cwd", [ROOT, "/"])
def test_kernels_and_verifiers_are_not_ours(cwd):
    """From the repo root (as the scripts run) and from anywhere else, the names `kernels` and
    `verifiers` resolve to another package or to none, never to a folder of this repository."""
    found = json.loads(python(
        "import importlib.util, json\n"
        "specs = {name: importlib.util.find_spec(name) for name in ('kernels', 'verifiers')}\n"
        "print(json.dumps({name: spec and (spec.origin or str(list(spec.submodule_search_locations)))"
        " for name, spec in specs.items()}))", cwd))
    for name, origin in found.items():
        assert origin is None or str(ROOT) not in origin, (name, origin)


def test_transformers_model_classes_import_beside_nanopost():
    """transformers >= 5.25 imports Hugging Face's `kernels` when a model class is imported; with the
    repo root first on sys.path that must still be theirs, and nanopost's packages import beside it."""
    out = python("import transformers\n"
                 "from transformers import AutoModelForCausalLM, Qwen2ForCausalLM\n"
                 "from nanopost import tools, verifiers\n"
                 "from nanopost.kernels import linear_logprobs\n"
                 "from nanopost.kernels.packed_attention import packed_attention\n"
                 "print(transformers.__version__, verifiers.names(), tools.names())", ROOT)
    assert "gsm8k" in out and "calculator" in out


def test_hf_kernels_is_the_kernel_hub_when_installed():
    """Where Hugging Face's `kernels` is installed (transformers >= 5.25 requires it), `import kernels`
    gives it, with the names transformers imports from it."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25 does not require it)")
    out = python("import kernels; print(kernels.__file__, hasattr(kernels, 'get_kernel'))", ROOT)
    assert str(ROOT) not in out and out.split()[-1] == "True", out


def test_every_package_is_in_the_distribution():
    """pyproject.toml lists every package under nanopost/, so that a non-editable install has them all."""
    listed = json.loads(re.search(r"^packages = (\[.*\])$", (ROOT / "pyproject.toml").read_text(), re.M).group(1))
    found = [".".join(init.parent.relative_to(ROOT).parts) for init in ROOT.glob("nanopost/**/__init__.py")]
    assert sorted(listed) == sorted(found)


def test_the_distribution_installs_only_nanopost():
    """The installed distribution's top-level names are exactly `nanopost` (its wheel's
    top_level.txt, or for an editable install the package the import hook maps)."""
    dist = importlib.metadata.distribution("nanopost")
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert top_level == ["nanopost"], top_level


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_starts_with_todays_transformers(script):
    """`python X.py --help` imports everything the script imports, transformers' model classes included."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0 and "--seed" in proc.stdout, proc.stderr[-3000:]
