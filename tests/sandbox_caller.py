"""Calls the python sandbox from a process of its own, as a training process would, and prints the
SandboxResult as JSON. Reads {"code", "limits", "caller"} on stdin, the caller being one of
- "this process": as it was started;
- "unprivileged": not root: run as root, it first becomes user nobody, in a mount namespace of its own
  where the interpreter is reachable for nobody (as the sandbox itself does it), so that the sandbox
  takes its path for callers without root (namespaces inside a user namespace);
- "no namespaces": unprivileged, and inside a user namespace that may not create user namespaces, so
  that the sandbox finds no namespaces at all, as where the kernel or a container forbids them.

    python tests/sandbox_caller.py < request.json
"""

import importlib.util
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

# the sandbox module alone: importing nanopost.tools would import transformers and torch, seconds per call
SPEC = importlib.util.spec_from_file_location("sandbox", Path(__file__).parents[1] / "nanopost/tools/sandbox.py")
sandbox = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(sandbox)
NOBODY = 65534
PR_SET_DUMPABLE = 4


def become_nobody():
    sandbox.check(sandbox.libc.unshare(sandbox.CLONE_NEWNS), "unshare")
    sandbox.mount(None, "/", None, sandbox.MS_REC | sandbox.MS_PRIVATE)
    sandbox.reach_interpreter()
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    # changing user made this process undumpable, which hides its /proc/<pid>/environ even from its own
    # user; a process started as that user, like a training process, is dumpable
    sandbox.check(sandbox.libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl")


def forbid_namespaces():
    """Enters a user namespace whose limit on user namespaces within it is 0 (the sandbox's unshare then
    fails), where the kernel allows one at all; where it does not, namespaces are already out of reach."""
    user, group = os.getuid(), os.getgid()
    try:
        sandbox.check(sandbox.libc.unshare(sandbox.CLONE_NEWUSER), "unshare")
    except OSError:
        return
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{user} {user} 1"),
                       ("/proc/self/gid_map", f"{group} {group} 1"), ("/proc/sys/user/max_user_namespaces", "0")):
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    if request["caller"] != "this process" and os.geteuid() == 0:
        become_nobody()
    if request["caller"] == "no namespaces":
        forbid_namespaces()
    result = sandbox.run_python(request["code"], sandbox.Limits(**request["limits"]))
    print(json.dumps(asdict(result)))
