"""The Triton kernels compiled ahead of time for real GPUs, on a machine without one, and checked
against each target's per-block limits: a kernel whose tiles need more shared memory than a block
may use fails at its first launch on that GPU, and only there.

Nothing here lists the launches. A child process (`python tests/test_kernels_aot.py compile`) runs
the dispatcher of nanopost/kernels/triton_impl.py, `_forward` and `_backward`, on meta tensors of the
Qwen2.5-0.5B head shape (N = 16384, H = 896, V = 151936) with each target's launch configuration
(`launch_config`, as on that GPU), for bf16, fp16 and fp32 with TF32 off and on, with and without
the entropy and its gradient, in the default and the deterministic backward, and records each
kernel launch instead of running it. Every distinct specialization (argument types, constexprs,
pointer alignment and integer divisibility by 16 or equality to 1, the way triton's JIT
specializes a launch, and the launch options) is compiled with `triton.compile` for the target
(ptxas ships in the triton wheel); shared memory comes from the compiled kernel, registers and
stack frame from cuobjdump. Other shapes whose sizes are multiples of 16 (H = 4096, V = 128256)
give the same specializations.

    python tests/test_kernels_aot.py report    # a table of every specialization on every target
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Maximum shared memory per block (opt-in) from the CUDA C++ Programming Guide's table of technical
# specifications per compute capability: 163 KiB on 8.0, 99 KiB on 8.6 and 8.9, 227 KiB on 9.0.
# SMs: A100 108, L40S 142, H100 SXM 132 (they set how many vocab splits the forward launches).
TARGETS = {
    "sm_80": dict(capability=80, shared_memory=163 * 1024, sms=108, gpus="A100"),
    "sm_89": dict(capability=89, shared_memory=99 * 1024, sms=142, gpus="L40S, RTX 4090"),
    "sm_90": dict(capability=90, shared_memory=227 * 1024, sms=132, gpus="H100"),
}
MAX_THREADS_PER_BLOCK, REGISTERS_PER_BLOCK = 1024, 65536  # the same on every target
SHAPE = dict(n=16384, h=896, v=151936)
PRECISIONS = ["bf16", "fp16", "fp32", "fp32-tf32"]


def expected_specializations():
    """Every (kernel, backward pass, entropy flag, precision) the dispatcher must be able to launch."""
    forward = [("forward", "-", entropy, p) for entropy in (False, True) for p in PRECISIONS]
    backward = [("backward", backward_pass, grad_entropy, p) for grad_entropy in (False, True) for p in PRECISIONS
                for backward_pass in ("atomic", "grad_hidden", "grad_weight")]
    return forward + backward


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "compile"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("target", TARGETS)
def test_every_specialization_is_compiled_once(compiled, target):
    labels = [(r["kernel"], r["pass"], r["entropy"], r["precision"]) for r in compiled if r["target"] == target]
    assert sorted(labels) == sorted(expected_specializations())


@pytest.mark.parametrize("target", TARGETS)
def test_every_specialization_fits_the_target(compiled, target):
    limits = TARGETS[target]
    records = [r for r in compiled if r["target"] == target]
    assert records
    too_big = []
    for r in records:
        label = f"{r['kernel']} {r['pass']} entropy={r['entropy']} {r['precision']}"
        if r["shared_memory"] > limits["shared_memory"]:
            too_big.append(f"{label}: {r['shared_memory']} bytes of shared memory > {limits['shared_memory']}")
        if 32 * r["num_warps"] > MAX_THREADS_PER_BLOCK:
            too_big.append(f"{label}: {32 * r['num_warps']} threads")
        per_warp = -(-r["registers"] * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        if per_warp * r["num_warps"] > REGISTERS_PER_BLOCK:
            too_big.append(f"{label}: {r['registers']} registers x {32 * r['num_warps']} threads")
    assert not too_big, f"on {target} ({limits['gpus']}):\n" + "\n".join(too_big)


# ---- the child process: record the dispatcher's launches, compile them ----

TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int64": "i64", "int32": "i32"}


def specialize(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) of one launch, as triton's JIT specializes it: None and
    the integer 1 become constants, 16-byte aligned pointers and integers divisible by 16 get
    tt.divisibility = 16."""
    import torch

    values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k in kernel.arg_names}
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if param.is_constexpr or value is None or (type(value) is int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
            divisible = value.storage_offset() * value.element_size() % 16 == 0  # allocations are aligned
        elif type(value) is int:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        elif type(value) is float:
            signature[name], divisible = "fp32", False
        else:
            raise TypeError(f"{kernel.__name__}: cannot specialize {name} = {value!r}")
        if divisible:
            attrs[str(i)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def record_launches(target):
    """The distinct kernel launches of linear_logprobs on `target`, each with a label."""
    import torch

    from nanopost.kernels import triton_impl

    launches = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                signature, constexprs, attrs, options = specialize(self.kernel, args, kwargs)
                key = json.dumps([self.kernel.__name__, signature, constexprs, attrs, options], sort_keys=True)
                launches.setdefault(key, dict(kernel=self.kernel.__name__, signature=signature,
                                              constexprs=constexprs, attrs=attrs, options=options, label=dict(label)))
            return launch

    passes = {"atomic": triton_impl.ATOMIC_PASS, "grad_hidden": triton_impl.GRAD_HIDDEN_PASS,
              "grad_weight": triton_impl.GRAD_WEIGHT_PASS}
    kernels = triton_impl._forward_kernel, triton_impl._backward_kernel
    triton_impl._forward_kernel, triton_impl._backward_kernel = map(Recorder, kernels)
    n, h, v = SHAPE["n"], SHAPE["h"], SHAPE["v"]
    limits = TARGETS[target]
    try:
        for precision in PRECISIONS:
            dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32"))
            torch.backends.cuda.matmul.allow_tf32 = precision == "fp32-tf32"
            config = (*triton_impl.launch_config(dtype, limits["shared_memory"]), limits["sms"])
            hidden = torch.empty(n, h, dtype=dtype, device="meta")
            weight = torch.empty(v, h, dtype=dtype, device="meta")
            targets = torch.empty(n, dtype=torch.int64, device="meta")
            grad = torch.empty(n, dtype=torch.float32, device="meta")
            for with_entropy in (False, True):
                label = dict(kernel="forward", entropy=with_entropy, precision=precision)
                lse, _, entropy = triton_impl._forward(hidden, weight, targets, 1.0, with_entropy, config)
                for grad_entropy in (None, grad) if with_entropy else (None,):
                    for deterministic in (False, True):
                        label = dict(kernel="backward", entropy=grad_entropy is not None, precision=precision)
                        triton_impl._backward(hidden, weight, targets, lse, entropy, grad, grad_entropy, 1.0,
                                              deterministic, config)
    finally:
        triton_impl._forward_kernel, triton_impl._backward_kernel = kernels
    for launch in launches.values():
        modes = [name for name, constexprs in passes.items() if constexprs.items() <= launch["constexprs"].items()]
        launch["label"]["pass"] = "-" if launch["kernel"] == "_forward_kernel" else "+".join(modes)
    return list(launches.values())


def compile_launch(job):
    """Compiles one recorded launch for a target; its shared memory, registers and stack frame."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanopost.kernels import triton_impl

    target, launch = job
    kernel = getattr(triton_impl, launch["kernel"])
    attrs = {(int(i),): value for i, value in launch["attrs"].items()}
    source = ASTSource(kernel, launch["signature"], launch["constexprs"], attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", TARGETS[target]["capability"], 32),
                              options=launch["options"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return dict(target=target, **launch["label"], blocks={k: v for k, v in launch["constexprs"].items()
                                                          if k.startswith("BLOCK_")},
                num_warps=launch["options"]["num_warps"], num_stages=launch["options"]["num_stages"],
                shared_memory=compiled.metadata.shared, registers=registers, stack_bytes=stack)


def compile_all():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(target, launch) for target in TARGETS for launch in record_launches(target)]
    # compiling is single-threaded: one process per core
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(compile_launch, jobs)


def report(records):
    """A markdown table: each specialization's shared memory (KiB) and registers / stack bytes per target."""
    rows = {}
    for r in records:
        rows.setdefault((r["kernel"], r["pass"], r["entropy"], r["precision"]), {})[r["target"]] = r
    print("| kernel | pass | entropy | dtype | " + " | ".join(f"{t} ({TARGETS[t]['shared_memory'] // 1024} KiB)"
                                                         for t in TARGETS) + " |")
    print("|---|---|---|---|" + "---|" * len(TARGETS))
    for (kernel, backward_pass, entropy, precision), by_target in sorted(rows.items()):
        cells = [f"{r['shared_memory'] // 1024} KiB, {r['num_stages']} stages, {r['registers']} reg, "
                 f"{r['stack_bytes']} B stack" for r in (by_target[t] for t in TARGETS)]
        entropy = "yes" if entropy else "no"
        print(f"| {kernel} | {backward_pass} | {entropy} | {precision} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's nanopost/kernels/, also in the spawned workers
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if sys.argv[1:] == ["compile"]:
        for record in compile_all():
            print(json.dumps(record), flush=True)
    elif sys.argv[1:] == ["report"]:
        report(list(compile_all()))
    else:
        sys.exit(f"usage: python {sys.argv[0]} compile|report")
