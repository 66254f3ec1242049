"""The python tool's sandbox, attacked: every attack ends in a short error result within its limit, the
next call works, and what the sandbox says protects it is what does, and nothing more. Each test runs
the sandbox from this process (as root: all the isolations), from an unprivileged caller (user
namespaces instead of root's user ids) and from a caller that can create no namespaces (the limits
alone); tests/sandbox_caller.py makes those callers. Network tests use loopback only."""

import ctypes
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanopost.tools import ToolCall, run_tool_call, sandbox
from nanopost.tools.sandbox import ISOLATIONS, Limits, SandboxResult, run_python

ROOT = Path(__file__).resolve().parents[1]
CALLERS = ["this process", "unprivileged", "no namespaces"]


def sandboxed(code, caller, env=None, python=sys.executable, **limits):
    """run_python(code, Limits(**limits)) from this process, or from a caller of its own (one of
    CALLERS; with `env` as its environment, run by the interpreter `python`)."""
    if caller == "this process" and env is None and python == sys.executable:
        return run_python(code, Limits(**limits))
    request = json.dumps({"code": code, "limits": limits, "caller": caller})
    proc = subprocess.run([python, str(ROOT / "tests" / "sandbox_caller.py")], input=request, text=True,
                          capture_output=True, timeout=300, env=env or os.environ, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reply = json.loads(proc.stdout)
    return SandboxResult(**{**reply, "protections": tuple(reply["protections"]), "missing": tuple(reply["missing"])})


def missing_names(result):
    return {why.split(":")[0] for why in result.missing}


def assert_next_call_works(caller):
    result = sandboxed("print(6 * 7)", caller)
    assert (result.output, result.error) == ("42\n", None)


def processes_running(path):
    """Processes on this machine whose command line names `path` (the program's directory)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if path.encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:
            pass  # it ended meanwhile
    return found


@pytest.mark.parametrize("caller", CALLERS)
def test_runs_a_program_and_says_what_protects_it(caller):
    """Each isolation is reported either as applied or as missing with a reason, never silently; as root
    the program runs as a user of its own, otherwise as the caller's user."""
    result = sandboxed("import json, os, sys\nprint(6 * 7)\nprint(os.getuid(), file=sys.stderr)\n"
                       "print(json.dumps(os.listdir('/dev')))\nopen('/dev/stdout', 'w').write('end')", caller)
    assert result.error is None and result.output.startswith("42\n")
    assert set(result.protections) | missing_names(result) == set(ISOLATIONS)
    assert not set(result.protections) & missing_names(result)
    uid = int(result.output.split("\n")[1])
    devices = set(json.loads(result.output.split("\n")[2]))
    assert result.output.endswith("\nend")
    if "mount namespace" in result.protections:
        assert devices == {"null", "zero", "full", "random", "urandom", "shm", "fd", "stdin", "stdout", "stderr"}
    if "unprivileged user" in result.protections:
        assert uid >= sandbox.UID_BASE
    else:
        assert caller != "this process" or os.geteuid() != 0
    if caller == "no namespaces":
        assert result.protections == ()


@pytest.mark.parametrize("caller", ["this process", "unprivileged"])
def test_an_interpreter_kept_in_tmp_stays_reachable(caller):
    """A venv made in a private directory under /tmp (`mktemp -d`, as CI makes it) lies under the empty
    tmpfs that the program gets as /tmp: the venv is bound back in, and nothing else of that directory."""
    home = Path(tempfile.mkdtemp())  # mode 0700, like mktemp -d
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home / "venv")], check=True)
        (home / "secret").write_text("training data")
        code = f"import os, sys\nprint(6 * 7, sys.executable, os.path.exists({str(home / 'secret')!r}))"
        python = home / "venv" / "bin" / "python"
        result = sandboxed(code, caller, python=str(python))
        assert result.error is None and "mount namespace" in result.protections, result
        assert result.output == f"42 {python} False\n"
    finally:
        shutil.rmtree(home)


@pytest.mark.parametrize("caller", CALLERS)
def test_infinite_loop_hits_the_cpu_limit(caller):
    result = sandboxed("while True: pass", caller, seconds=60, cpu_seconds=1)
    assert result.error == "CPU time limit exceeded (1 s)"
    assert_next_call_works(caller)


@pytest.mark.parametrize("caller", CALLERS)
def test_sleeping_hits_the_wall_clock_limit(caller):
    result = sandboxed("import time\nprint('started', flush=True)\ntime.sleep(60)", caller, seconds=1)
    assert (result.output, result.error) == ("started\n", "time limit exceeded (1 s)")
    assert_next_call_works(caller)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("code", ["x = bytearray(2 ** 40)", "held = []\nwhile True: held.append(bytearray(10 ** 7))"])
def test_memory_bomb_hits_the_memory_limit(caller, code):
    result = sandboxed(code, caller, memory_bytes=256 << 20)
    assert result.error == "the program exited with status 1" and result.output.endswith("MemoryError\n")
    assert_next_call_works(caller)


@pytest.mark.parametrize("caller", CALLERS)
def test_fork_bomb_ends_and_leaves_nothing_behind(caller):
    result = sandboxed("import os\nprint(os.getcwd(), flush=True)\nwhile True: os.fork()", caller, seconds=5)
    workdir = result.output.split("\n")[0]
    assert workdir.startswith("/") and result.error is not None and len(result.output) <= Limits().output_bytes
    assert processes_running(workdir) == []
    assert_next_call_works(caller)


@pytest.mark.parametrize("caller", CALLERS)
def test_process_limit_and_no_process_outlives_the_call(caller):
    """A program gets at most `processes` processes (itself included), and its children die with it."""
    code = ("import os, time\n"
            "children = 0\n"
            "while children < 100:\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        break\n"
            "    if pid == 0:\n"
            "        time.sleep(1000)\n"
            "    children += 1\n"
            "print(os.getcwd(), children)\n")
    result = sandboxed(code, caller, processes=5)
    workdir, children = result.output.split()
    assert result.error is None and processes_running(workdir) == []
    if "unprivileged user" in result.protections or "pid namespace" in result.protections:
        assert children == "4"
    else:  # the limit counts every process of the caller's user
        assert int(children) <= 4


@pytest.mark.parametrize("caller", CALLERS)
def test_concurrent_calls_have_their_own_process_limits(caller):
    """Three programs at once, each holding as many children as its limit allows: with a user id (root)
    or a user namespace of its own per call, each gets them all."""
    code = ("import os, time\n"
            "children = 0\n"
            "for _ in range(3):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        break\n"
            "    if pid == 0:\n"
            "        time.sleep(1000)\n"
            "    children += 1\n"
            "time.sleep(2)\n"
            "print(children)\n")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: sandboxed(code, caller, processes=5), range(3)))
    assert all(r.error is None for r in results)
    if "unprivileged user" in results[0].protections or "pid namespace" in results[0].protections:
        assert [r.output for r in results] == ["3\n"] * 3


@pytest.mark.parametrize("caller", CALLERS)
def test_100_megabytes_of_output_hit_the_output_limit(caller):
    result = sandboxed("print('x' * 10 ** 8)", caller)
    assert (result.output, result.error) == ("x" * 4096, "output limit exceeded (4096 bytes)")
    assert_next_call_works(caller)


@pytest.mark.parametrize("caller", CALLERS)
def test_writes_outside_its_directory_fail(caller):
    """The program writes in its own directory, up to the size limit, and nowhere else: not /tmp,
    /var/tmp, /dev/shm, this repository or a directory that everyone may write to."""
    name = f"nanopost-escape-{secrets.token_hex(4)}"
    open_to_all = Path(tempfile.mkdtemp(dir=ROOT))
    open_to_all.chmod(0o777)
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", str(ROOT / name), str(open_to_all / name)]
    code = ("import json\n"
            "def write(path, size=1):\n"
            "    try:\n"
            "        with open(path, 'wb') as f:\n"
            "            f.write(b'x' * size)\n"
            "        return 'written'\n"
            "    except OSError as e:\n"
            "        return e.strerror\n"
            f"print(json.dumps([write(p) for p in {targets!r}] + [write('inside'), write('big', 2 << 20)]))\n")
    try:
        result = sandboxed(code, caller, disk_bytes=1 << 20)
        escaped = [path for path in targets if os.path.exists(path)]
    finally:
        shutil.rmtree(open_to_all)
        for path in targets[:-1]:
            Path(path).unlink(missing_ok=True)
    *outside, inside, big = json.loads(result.output)
    assert inside == "written" and big in ("File too large", "No space left on device")
    if "read-only filesystem" in result.protections:
        # a directory inside /tmp (a clone of this repository there) is not there at all, or is part of the empty
        # skeleton that leads to an interpreter bound back in
        assert escaped == [] and outside[:3] == ["Read-only file system"] * 3, outside
        assert set(outside) <= {"Read-only file system", "No such file or directory"}, outside
    else:  # the program writes wherever its user may, on the caller's filesystem, and the sandbox says so
        assert "read-only filesystem" in missing_names(result)
    assert_next_call_works(caller)


@pytest.mark.parametrize("caller", CALLERS)
def test_a_listener_on_loopback_is_unreachable(caller):
    """A server this test opens on 127.0.0.1 cannot be reached from the program, which sees no network
    interface but its own (down) loopback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0)
        port = server.getsockname()[1]
        code = ("import socket\n"
                "print([name for _, name in socket.if_nameindex()])\n"
                "try:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                "    print('connected')\n"
                "except OSError as e:\n"
                "    print(e.strerror)\n")
        result = sandboxed(code, caller)
        if "network namespace" in result.protections:
            assert result.output == "['lo']\nNetwork is unreachable\n"
            with pytest.raises(BlockingIOError):
                server.accept()
        else:
            assert "network namespace" in missing_names(result)


@pytest.mark.parametrize("caller", CALLERS)
def test_the_training_processs_environment_stays_out(caller):
    """A secret in the calling process's environment is neither in the program's environment nor in any
    /proc/<pid>/environ the program can read."""
    secret = f"nanopost-secret-{secrets.token_hex(8)}"
    code = ("import os, glob\n"
            "found = [k for k, v in os.environ.items() if v.startswith('nanopost-secret-')]\n"
            "for path in glob.glob('/proc/[0-9]*/environ'):\n"
            "    try:\n"
            "        if b'NANOPOST_TEST_SECRET=' in open(path, 'rb').read():\n"
            "            found.append(path)\n"
            "    except OSError:\n"
            "        pass\n"
            "print(found, sorted(os.environ))\n")
    result = sandboxed(code, caller, env={**os.environ, "NANOPOST_TEST_SECRET": secret})
    assert secret not in result.output
    found, names = result.output.split("] ")
    assert names.strip() == str(sorted({*sandbox.ENV, "HOME", "TMPDIR"}))
    if "pid namespace" in result.protections or "unprivileged user" in result.protections:
        assert found == "["
    else:  # the program runs as the caller and sees its processes, and the sandbox says so
        assert {"pid namespace", "unprivileged user"} <= missing_names(result)


@pytest.mark.parametrize("caller", CALLERS)
def test_shared_memory_does_not_outlive_the_program(caller):
    """A SysV shared memory segment, which outlives the process that made it, dies with the program's IPC
    namespace."""
    key = secrets.randbelow(2 ** 30) + 1
    code = ("import ctypes\n"
            f"print(ctypes.CDLL(None).shmget({key}, 1 << 20, 0o1000 | 0o600) >= 0)\n")  # IPC_CREAT
    result = sandboxed(code, caller)
    segments = {int(line.split()[0]): int(line.split()[1])  # key: id
                for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]}
    if key in segments:
        ctypes.CDLL(None).shmctl(segments[key], 0, None)  # IPC_RMID
    assert result.output == "True\n"
    if "ipc namespace" in result.protections:
        assert key not in segments
    else:
        assert "ipc namespace" in missing_names(result)


def test_a_launcher_that_fails_or_hangs_gives_an_error_result(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "__file__", str(tmp_path / "missing.py"))
    result = run_python("print(1)")
    assert result.error.startswith("the sandbox failed: ") and "missing.py" in result.error
    hanging = tmp_path / "hanging.py"
    hanging.write_text("import time\ntime.sleep(1000)\n")
    monkeypatch.setattr(sandbox, "__file__", str(hanging))
    monkeypatch.setattr(sandbox, "GRACE_SECONDS", 1.0)
    assert run_python("print(1)", Limits(seconds=0.5)).error == "the sandbox failed: it did not answer in time"


def test_the_python_tool_answers_with_output_or_an_error():
    ok = run_tool_call(ToolCall("python", {"code": "print(6 * 7)"}))
    assert (ok.content, ok.ok) == ("42\n", True)
    quiet = run_tool_call(ToolCall("python", {"code": "x = 1"}))
    assert (quiet.content, quiet.ok) == ("(no output)", True)
    failed = run_tool_call(ToolCall("python", {"code": "print('before')\n1 / 0"}))
    assert not failed.ok and failed.content.startswith("Error: the program exited with status 1\nbefore\nTraceback")
    assert failed.content.endswith("ZeroDivisionError: division by zero")
