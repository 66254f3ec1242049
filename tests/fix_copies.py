"""Keeps the scripts' plumbing identical, as transformers' utils/check_copies.py keeps its copied code.

Each script reads its algorithm first; one banner line then starts the plumbing (distributed setup,
loading and saving, checkpoints, batching, logging), which several scripts share. A top-level
definition under the banner (function, class or constant) that appears in more than one script must
have exactly the same source in each, comments above it included. Its original is the copy in the
first script of SCRIPTS that has it; `--from` takes another script's copy instead (after editing it
there). A script-specific definition lives above the banner, under its own name.

    python tests/fix_copies.py                      # check: a diff for every copy that drifted, exit 1
    python tests/fix_copies.py --fix                # rewrite every copy from its original
    python tests/fix_copies.py --fix --from grpo.py # ... taking the originals from grpo.py where it has them

tests/test_copies.py runs the check.
"""

import argparse
import ast
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["sft.py", "dpo.py", "grpo.py", "ppo_rlvr.py", "eval.py", "reward_model.py"]
BANNER = "# " + "=" * 21 + " plumbing: the same code in every script that has it (tests/fix_copies.py) " + "=" * 21


def definitions(source):
    """The top-level definitions of a script as {name: (first line, last line, text, below the banner)}, lines
    counted from 0, each with the comment lines right above it; and the banner's line (None if absent)."""
    lines = source.splitlines(keepends=True)
    banner = next((i for i, line in enumerate(lines) if line.rstrip("\n") == BANNER), None)
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) != 1 or not isinstance(targets[0], ast.Name):
                continue
            name = targets[0].id
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            name = "__main__"
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while first > 0 and lines[first - 1].startswith("#") and first - 1 != banner:
            first -= 1
        if name in found:
            raise ValueError(f"{name} is defined twice")
        last = node.end_lineno - 1
        found[name] = (first, last, "".join(lines[first:last + 1]), banner is not None and first > banner)
    return found, banner


def check(root=ROOT, fix=False, origin=None):
    """Problems (each a message, a drifted copy with its diff) of the scripts in root; with fix, every copy
    is rewritten from its original first, so only what cannot be fixed is left."""
    sources = {name: (root / name).read_text() for name in SCRIPTS}
    parsed = {name: definitions(source) for name, source in sources.items()}
    problems = [f"{name}: no banner line (expected {BANNER!r})" for name, (_, banner) in parsed.items()
                if banner is None]
    shared = sorted({d for defs, _ in parsed.values() for d, (*_, below) in defs.items() if below})
    order = ([origin] if origin else []) + [s for s in SCRIPTS if s != origin]
    edits = {name: [] for name in SCRIPTS}
    for definition in shared:
        holders = [s for s in order if definition in parsed[s][0]]
        if len(holders) < 2:
            continue
        original = holders[0]
        first, last, text, below = parsed[original][0][definition]
        for script in holders[1:]:
            c_first, c_last, copy, c_below = parsed[script][0][definition]
            if not (below and c_below):
                where = original if not below else script
                problems.append(f"{definition}: above the banner in {where} but shared under it elsewhere; a "
                                "script-specific version needs a name of its own")
                continue
            if copy == text:
                continue
            if fix:
                edits[script].append((c_first, c_last, text))
                continue
            diff = "".join(difflib.unified_diff(text.splitlines(keepends=True), copy.splitlines(keepends=True),
                                                f"{original}:{definition} (original)", f"{script}:{definition}"))
            problems.append(f"{definition}: {script} differs from {original}\n{diff}")
    for script, changes in edits.items():
        if changes:
            lines = sources[script].splitlines(keepends=True)
            for first, last, text in sorted(changes, reverse=True):
                lines[first:last + 1] = [text]
            (root / script).write_text("".join(lines))
    return problems


def unused(root=ROOT):
    """Plumbing definitions that their script never uses: a copy where it is not needed is dead code."""
    problems = []
    for script in SCRIPTS:
        source = (root / script).read_text()
        defs, _ = definitions(source)
        nodes = list(ast.walk(ast.parse(source)))
        names = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} | \
            {n.attr for n in nodes if isinstance(n, ast.Attribute)}
        for name, (*_, below) in defs.items():
            if below and name != "__main__" and name not in names:
                problems.append(f"{script}: {name} is never used")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true", help="rewrite every copy from its original")
    parser.add_argument("--from", dest="origin", choices=SCRIPTS, help="take the originals from this script")
    args = parser.parse_args()
    problems = check(fix=args.fix, origin=args.origin) + unused()
    for problem in problems:
        print(problem)
    if args.fix and not problems:
        print("every copy is its original")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
