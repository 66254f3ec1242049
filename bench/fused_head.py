"""LM-head cross-entropy forward + backward: time and peak extra memory, side by side in one run.

    python bench/fused_head.py                 # N=16384, V=151936, H in {896, 4096}, bf16, one H100
    python bench/fused_head.py --hidden 896 --impls nanopost apple_cce

Compares nanopost's linear_logprobs (default and deterministic backward, and with entropy, as
GRPO uses it) against torch eager over full logits, Liger's fused linear cross-entropy and Apple's
Cut Cross-Entropy (each only if installed). Two warmup iterations, then the best of --reps timed
iterations (host clock around synchronized CUDA work), peak memory as
torch.cuda.max_memory_allocated minus what was allocated before (inputs, not gradients), TF32
allowed. Every implementation's loss (mean CE over non-ignored tokens = -mean logp) is checked
against an fp32 full-logits computation. Prints one JSON line per (implementation, H), and one
per implementation that is not installed, then a markdown table.

The anchor, measured this way on one H100 80GB at N=16384, V=151936, bf16: Apple's CCE 23.4 ms and
0.28 GiB at H=896, 99.2 ms and 1.29 GiB at H=4096; Liger 73.2 and 107.0 ms.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# the repository root, so that nanopost imports without an install
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def torch_eager(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)


def nanopost(deterministic=None, with_entropy=False):
    from nanopost.kernels import linear_logprobs
    from nanopost.kernels.triton_impl import linear_logprobs_triton

    def loss(hidden, weight, targets):
        if deterministic is None:
            logp, entropy = linear_logprobs(hidden, weight, targets, with_entropy=with_entropy)
        else:
            logp, entropy = linear_logprobs_triton(hidden, weight, targets, with_entropy=with_entropy,
                                                   deterministic=deterministic)
        ce = -logp.sum() / (targets != -100).sum()
        # a zero-weighted entropy term keeps the loss comparable and still runs the entropy backward
        return ce if entropy is None else ce + 0.0 * entropy.sum()
    return loss


def implementations():
    """The implementations that can run here, and why the others cannot."""
    impls = {
        "torch_eager_full_logits": torch_eager,
        "nanopost": nanopost(),
        "nanopost_deterministic": nanopost(deterministic=True),
        "nanopost_with_entropy": nanopost(with_entropy=True),
    }
    skipped = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        impls["liger_flce"] = lambda hidden, weight, targets: liger(weight, hidden, targets)
    except ImportError as e:
        skipped["liger_flce"] = f"liger-kernel is not installed ({e})"
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["apple_cce"] = lambda hidden, weight, targets: linear_cross_entropy(hidden, weight, targets)
    except ImportError as e:
        skipped["apple_cce"] = f"cut-cross-entropy is not installed ({e})"
    return impls, skipped


def make_inputs(n, h, v):
    torch.manual_seed(0)
    hidden = (torch.randn(n, h, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::7] = -100
    return hidden, weight, targets


def bench(fn, hidden, weight, targets, reps):
    for _ in range(2):
        fn(hidden, weight, targets).backward()
        hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = fn(hidden, weight, targets)
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        hidden.grad = weight.grad = None
    return min(times) * 1e3, (torch.cuda.max_memory_allocated() - base) / 2**30, loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16384, help="tokens")
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 4096], help="hidden sizes H")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size V")
    parser.add_argument("--reps", type=int, default=5, help="timed iterations; the best is reported")
    parser.add_argument("--impls", nargs="+", help="subset of implementations to run (default: all available)")
    parser.add_argument("--rtol", type=float, default=5e-3, help="allowed relative loss difference to fp32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/fused_head.py needs a CUDA GPU")
    impls, skipped = implementations()
    if args.impls:
        skipped = {name: reason for name, reason in skipped.items() if name in args.impls}
        impls = {name: impls[name] for name in args.impls if name not in skipped}
    for name, reason in skipped.items():
        print(json.dumps(dict(impl=name, skipped=reason)), flush=True)
    rows = []
    for h in args.hidden:
        hidden, weight, targets = make_inputs(args.n, h, args.vocab)
        # the truth in true fp32; the timed runs allow TF32, as the anchor measurements did
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad():
            fp32_loss = torch_eager(hidden.float(), weight.float(), targets).item()
        torch.backends.cuda.matmul.allow_tf32 = True
        for name, fn in impls.items():
            row = dict(impl=name, N=args.n, H=h, V=args.vocab)
            try:
                ms, gib, loss = bench(fn, hidden, weight, targets, args.reps)
                row.update(ms=round(ms, 2), peak_extra_GiB=round(gib, 3),
                           tflops=round(6 * args.n * h * args.vocab / ms / 1e9, 1), loss=round(loss, 5),
                           fp32_loss=round(fp32_loss, 5),
                           loss_ok=abs(loss - fp32_loss) <= args.rtol * abs(fp32_loss))
            except Exception as e:  # one failing implementation (often out of memory) must not hide the others
                row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
            hidden.grad = weight.grad = None
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
        del hidden, weight, targets
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}, N={args.n}, V={args.vocab}, bf16, forward + backward\n")
    print("| impl | H | ms | peak extra GiB | TFLOP/s | loss | fp32 loss | loss ok |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["error"]] + [""] * 5 if "error" in r else [
            r[k] for k in ("ms", "peak_extra_GiB", "tflops", "loss", "fp32_loss", "loss_ok")]
        print(f"| {r['impl']} | {r['H']} | " + " | ".join(str(c) for c in cells) + " |")
    if not all(r.get("loss_ok") for r in rows):
        sys.exit("some implementation failed or its loss differs from the fp32 loss")


if __name__ == "__main__":
    main()
