"""A sandbox for model-written Python: each call runs the code in a new child process, in a fresh
directory, with a scrubbed environment and limits on wall-clock time, CPU time, memory, processes,
output and file sizes, isolated further wherever the OS allows it.

    result = run_python("print(6 * 7)")          # SandboxResult(output="42\n", error=None, ...)

run_python starts this file as a fresh interpreter (`python -I -S`: the standard library only, no
PYTHONPATH, no site-packages), the launcher, which isolates itself, forks the program's process,
supervises it and answers with one JSON line. A fresh interpreter rather than a fork of the caller:
a training process has threads (torch, CUDA, data loading), and forking a threaded process can
deadlock the child.

What the launcher applies, by what it may do (SandboxResult.protections and .missing say which):
- as root: new network, mount, pid and IPC namespaces; private empty tmpfs over /tmp, /var/tmp and
  /dev/shm, a /dev of null, zero, full, random and urandom alone, a /proc of the sandbox's own
  processes, everything else mounted read-only, and the program's directory a tmpfs of at most
  limits.disk_bytes; then the program runs as a user id of its own (no account: UID_BASE + the
  launcher's pid), so that RLIMIT_NPROC (which root ignores) bounds its processes, it can neither
  signal nor read concurrent calls, and it reads only world-readable files. Directories on the
  interpreter's path that others may not enter (a venv under /root) are replaced by an empty tmpfs
  holding only the interpreter's directories.
- not root: the same namespaces and mounts inside a new user namespace where the kernel allows
  unprivileged ones; the program runs as the calling user, so it can read whatever that user can.
- neither: only the limits, the fresh directory and the scrubbed environment.
The limits apply in every case: RLIMIT_CPU, _AS, _NPROC, _FSIZE, _NOFILE and _CORE, a wall-clock
deadline and an output cap enforced by the launcher, which then kills the program with all its
processes (in a pid namespace the kernel kills them with its first process). In a pid namespace the
program is its process 1, so, as for any init, the signals it sends itself are ignored unless it
handles them, and the CPU limit ends it with SIGKILL rather than SIGXCPU.
"""

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0
    """wall-clock time"""
    cpu_seconds: int = 10
    """CPU time of each process"""
    memory_bytes: int = 512 << 20
    """address space of each process (so the program's processes together may take `processes` times this)"""
    processes: int = 8
    """processes and threads at once"""
    output_bytes: int = 4096
    """stdout and stderr together; the program is stopped when it writes more"""
    disk_bytes: int = 16 << 20
    """each file written; with namespaces, all files together"""
    open_files: int = 64
    """file descriptors of each process"""


@dataclass(frozen=True)
class SandboxResult:
    output: str
    """stdout and stderr as the program wrote them, interleaved, at most output_bytes"""
    error: str | None
    """why the program did not end normally (a limit, a signal, a non-zero exit status), or None"""
    protections: tuple[str, ...]
    """the isolations that applied, beyond the limits (see ISOLATIONS)"""
    missing: tuple[str, ...]
    """the isolations that did not apply, each with why"""
    seconds: float
    """wall-clock time of the call"""


# what SandboxResult.protections may name: the isolations that come with the namespaces, and root's
NAMESPACED = ("network namespace", "pid namespace", "ipc namespace", "mount namespace", "read-only filesystem")
ISOLATIONS = NAMESPACED + ("unprivileged user",)
# user ids of sandboxed programs as root: one per launcher, above the ranges that distributions and
# systemd allocate (systemd's container range ends at 0x6FFFFFFF); pids stay below 2**22
UID_BASE = 0x7F000000
# the environment of the launcher and the program: nothing from the training process
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
       "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# the launcher's own set-up and teardown, beyond limits.seconds, after which the caller gives up on it
GRACE_SECONDS = 10.0


def run_python(code: str, limits: Limits = Limits()) -> SandboxResult:
    """Runs `code` as a Python program in the sandbox and returns what it wrote and how it ended. Never
    raises for anything the code does; a launcher that fails or hangs gives an error result too.
    Thread-safe: concurrent calls are separate processes with separate limits."""
    start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="nanopost-python-")
    request = json.dumps({"code": code, "workdir": workdir, "limits": asdict(limits)})
    launcher = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd="/",
                                start_new_session=True)
    try:
        answer, problem = launcher.communicate(request.encode(), timeout=limits.seconds + GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        answer, problem = b"", b"it did not answer in time"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - start
    try:
        reply = json.loads(answer)
    except ValueError:  # the launcher failed: its last line of stderr says why
        why = problem.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {launcher.returncode}"]
        return SandboxResult("", f"the sandbox failed: {why[0]}", (), (), seconds)
    return SandboxResult(reply["output"], reply["error"], tuple(reply["protections"]), tuple(reply["missing"]),
                         seconds)


def report() -> str:
    """One line saying which isolations the sandbox applies here (it runs a program to find out)."""
    result = run_python("print('ok')")
    if result.error:
        return f"python sandbox: does not work here: {result.error}"
    missing = "; ".join(result.missing) or "none"
    return f"python sandbox: {', '.join(result.protections) or 'limits only'}; not applied: {missing}"


# ---------------------------------------------------------------------------------------------
# The launcher: runs as `python -I -S sandbox.py`, reads the request on stdin, answers on stdout.

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1  # the same on every arch
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def check(status, what):
    """Raises OSError naming `what` when a libc call returned non-zero."""
    if status != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, options=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     options and options.encode()), f"mount {target}")


def launch():
    request = json.loads(sys.stdin.read())
    limits, workdir = Limits(**request["limits"]), request["workdir"]
    isolation = isolate(workdir, limits)
    script = os.path.join(workdir, "main.py")
    with open(script, "w") as f:
        f.write(request["code"])
    if isolation.uid is not None:
        os.chown(workdir, isolation.uid, isolation.uid)
        os.chown(script, isolation.uid, isolation.uid)
    output, error = supervise(script, workdir, isolation, limits)
    json.dump({"output": output, "error": error, "protections": isolation.protections,
               "missing": isolation.missing}, sys.stdout)


@dataclass
class Isolation:
    uid: int | None
    """the user id the program runs as; None: the caller's"""
    user_namespace: bool
    """whether the launcher is in a user namespace of its own, where it counts toward the process limit"""
    own_proc: bool
    """whether the program mounts a /proc of its pid namespace"""
    protections: list
    """as in SandboxResult"""
    missing: list
    """as in SandboxResult"""


def isolate(workdir, limits):
    """Puts the launcher into new namespaces and mounts where it may, and picks the user id the program
    runs as: an Isolation."""
    root = os.geteuid() == 0
    isolation = Isolation(UID_BASE + os.getpid() if root else None, False, False, [], [])
    if root:
        isolation.protections.append("unprivileged user")
    else:
        isolation.missing.append("unprivileged user: not root, so the program runs as the training user")
    try:
        enter_namespaces(root)
    except OSError as e:
        isolation.missing += [f"{name}: {e}" for name in NAMESPACED]
        return isolation
    isolation.user_namespace = not root
    isolation.protections += ["network namespace", "pid namespace", "ipc namespace"]
    try:  # the first mount: where mounts are refused (a security module's policy), nothing has changed yet
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates to the host
    except OSError as e:
        isolation.missing += [f"mount namespace: {e}", f"read-only filesystem: {e}"]
        return isolation
    isolation.own_proc = True
    isolation.protections.append("mount namespace")
    if root:
        reach_interpreter()
    private_dev()
    shared = [path for path in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(path)]
    # an interpreter kept in one of them (a venv made in `mktemp -d`) is bound back into the empty tmpfs
    kept = {path: os.open(path, os.O_PATH) for path in interpreter_dirs()
            if any(path.startswith(os.path.realpath(s) + os.sep) for s in shared)}
    for path in shared:  # empty, and read-only like the rest below
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    for path, handle in kept.items():
        os.makedirs(path)
        mount(f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC)
        os.close(handle)
    os.makedirs(workdir, exist_ok=True)  # its path again, in the new /tmp if it was in the old one
    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        isolation.protections.append("read-only filesystem")
    else:  # kernels before 5.12
        isolation.missing.append(f"read-only filesystem: mount_setattr: {os.strerror(ctypes.get_errno())}")
    owner = f",uid={isolation.uid},gid={isolation.uid}" if root else ""
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={limits.disk_bytes}{owner}")
    return isolation


def enter_namespaces(root):
    """New network, mount, pid and IPC namespaces (the pid namespace for the children; SysV shared memory
    and message queues die with the IPC namespace instead of outliving the program); without root, inside
    a new user namespace, which lets an unprivileged user create the others where the kernel allows it."""
    namespaces = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    if root:
        check(libc.unshare(namespaces), "unshare")
        return
    user, group = os.getuid(), os.getgid()
    check(libc.unshare(CLONE_NEWUSER | namespaces), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{user} {user} 1"), ("gid_map", f"{group} {group} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def interpreter_dirs():
    """The directories the interpreter and its libraries are in (a venv's bin/, whose python links to the
    base installation, and that installation), none inside another."""
    executable = {os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.path.abspath(sys.executable))}
    needed = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)} | executable)
    return [p for p in needed if not any(p.startswith(q + os.sep) for q in needed)]


def reach_interpreter():
    """Makes the interpreter and its libraries reachable for any user: each directory on their paths that
    others may not enter (/root of a venv in /root) is covered by an empty tmpfs into which only the
    interpreter's directories are bound. Everything else in it stays out of sight."""
    covers = {}
    for path in interpreter_dirs():
        parts = path.split(os.sep)
        for i in range(2, len(parts)):
            ancestor = os.sep.join(parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:  # others may not enter it
                covers.setdefault(ancestor, []).append(path)
                break
    for ancestor, paths in covers.items():
        handles = {path: os.open(path, os.O_PATH) for path in paths}
        mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for path, handle in handles.items():
            os.makedirs(path)
            mount(f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC)
            os.close(handle)


def private_dev():
    """A /dev with only the harmless devices (DEVICES) and the links to the standard streams: no GPU,
    disk, terminal or virtual machine device of the host."""
    handles = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES if os.path.exists(f"/dev/{name}")}
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=0755,size=64k")
    for name, handle in handles.items():
        open(f"/dev/{name}", "w").close()  # a mount point
        mount(f"/proc/self/fd/{handle}", f"/dev/{name}", None, MS_BIND)
        os.close(handle)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")


def supervise(script, workdir, isolation, limits):
    """Runs the program and returns (its output, why it did not end normally or None)."""
    out_read, out_write = os.pipe()
    started_read, started_write = os.pipe2(os.O_CLOEXEC)  # closed by a successful exec, else it says why not
    pid = os.fork()
    if pid == 0:
        os.close(out_read)
        os.close(started_read)
        try:
            become_program(script, workdir, isolation, limits, out_write)
        except BaseException as e:
            os.write(started_write, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(127)
    os.close(out_write)
    os.close(started_write)
    with os.fdopen(started_read, "rb") as f:
        failed_start = f.read().decode(errors="replace")
    if failed_start:
        os.waitpid(pid, 0)
        return "", f"the sandbox could not start python: {failed_start}"
    output, stop = collect(pid, out_read, limits)
    try:
        os.killpg(pid, signal.SIGKILL)  # the program's processes that are still alive (none in a pid namespace)
    except ProcessLookupError:
        pass
    _, status, usage = os.wait4(pid, 0)  # in a pid namespace this returns once all of its processes are gone
    output += drain(out_read, limits.output_bytes - len(output))
    text = output[:limits.output_bytes].decode(errors="replace")
    if stop:
        return text, stop
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        # at the limit the kernel sends SIGKILL; rusage, counted in clock ticks, can show a little less
        if sig == signal.SIGKILL and usage.ru_utime + usage.ru_stime >= 0.9 * limits.cpu_seconds:
            return text, f"CPU time limit exceeded ({limits.cpu_seconds} s)"
        if sig == signal.SIGXFSZ:
            return text, f"file size limit exceeded ({limits.disk_bytes} bytes)"
        return text, f"the program was killed by {signal.Signals(sig).name}"
    code = os.WEXITSTATUS(status)
    return text, f"the program exited with status {code}" if code else None


def become_program(script, workdir, isolation, limits, out_fd):
    """In the forked child: the program's limits, identity and standard streams, then exec python."""
    if isolation.own_proc:  # pid 1 of the new pid namespace: a /proc that shows only the sandbox's processes
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.setsid()  # its own process group, which the launcher kills at the end
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.chdir(workdir)
    for kind, value in ((resource.RLIMIT_CPU, (limits.cpu_seconds,) * 2),
                        (resource.RLIMIT_AS, (limits.memory_bytes,) * 2),
                        (resource.RLIMIT_FSIZE, (limits.disk_bytes,) * 2),
                        (resource.RLIMIT_NOFILE, (limits.open_files,) * 2),
                        (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(kind, value)
    if isolation.uid is not None:
        os.fchown(out_fd, isolation.uid, isolation.uid)  # /dev/stdout reopens the pipe, which is root's
        os.setgroups([])
        os.setgid(isolation.uid)
        os.setuid(isolation.uid)
    # set after entering the namespaces: in a user namespace the kernel counts the processes of that
    # namespace, the launcher's among them
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes + isolation.user_namespace,) * 2)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")  # no setuid binary raises its privileges
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")  # the launcher's death ends it
    env = {**ENV, "HOME": workdir, "TMPDIR": workdir}
    try:
        os.execve(sys.executable, [sys.executable, "-I", "-u", "-X", "utf8", script], env)
    except PermissionError as e:  # as root without a mount namespace, nothing makes it reachable
        raise PermissionError(f"{e}: the interpreter must be reachable by user {os.getuid()}") from None


def collect(pid, out_fd, limits):
    """The program's output until it exits, the deadline passes or the output exceeds its limit; and
    which limit stopped it (None: it exited)."""
    exited = os.pidfd_open(pid)
    deadline = time.monotonic() + limits.seconds
    output, watched = bytearray(), [out_fd, exited]
    while True:
        remaining = deadline - time.monotonic()
        ready = select.select(watched, [], [], max(remaining, 0))[0]
        if not ready:
            return output, f"time limit exceeded ({limits.seconds:g} s)"
        if out_fd in ready:
            chunk = os.read(out_fd, 1 << 16)
            output += chunk
            if not chunk:
                watched.remove(out_fd)
            elif len(output) > limits.output_bytes:
                return output, f"output limit exceeded ({limits.output_bytes} bytes)"
        if exited in ready:
            return output, None


def drain(fd, budget):
    """What is left in the pipe after the program ended, at most budget bytes, without waiting."""
    os.set_blocking(fd, False)
    left = bytearray()
    while len(left) < budget:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        left += chunk
    return left


if __name__ == "__main__":
    launch()
