"""The test helpers of conftest.py: a run past its timeout is killed with all its processes, and
a shared fixture that fails is reported once, not once for every test that needs it."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_script


def test_a_timed_out_torchrun_is_killed_with_its_workers(tmp_path):
    script = tmp_path / "sleeps.py"
    script.write_text("import time\ntime.sleep(120)\n")
    start = time.time()
    with pytest.raises(AssertionError, match="did not finish within 5 s"):
        run_script(script, nproc=2, timeout=5)
    assert time.time() - start < 60
    time.sleep(1)
    survivors = [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(script) in p.read_text(errors="replace")]
    assert not survivors


def test_a_failed_shared_fixture_is_reported_once(tmp_path):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture(scope='session')\n"
        "def trained():\n"
        "    raise AssertionError('sft.py did not finish within 900 s')\n\n"
        "@pytest.fixture(scope='module')\n"
        "def runs(trained):\n"
        "    return trained\n\n"
        "def test_a(trained):\n    pass\n\n"
        "def test_b(runs):\n    pass\n\n"
        "def test_c(runs):\n    pass\n\n"
        "def test_d(trained):\n    pass\n\n"
        "def test_independent():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1].startswith("1 passed, 3 skipped, 1 error"), proc.stdout[-3000:]
    assert proc.stdout.count("AssertionError: sft.py did not finish within 900 s") == 1 + 3  # the error, the skips
    assert proc.stdout.count("a fixture it needs failed in test_inner.py::test_a") == 3
