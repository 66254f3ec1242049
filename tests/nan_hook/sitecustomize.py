"""A bad micro-batch, made on purpose: Python imports this module at startup in every process that has
tests/nan_hook on its PYTHONPATH (tests/test_faults.py puts it there). On the rank named by NANOPOST_TEST_NAN_RANK,
the calls of the fused head numbered in NANOPOST_TEST_NAN_CALLS (1, 2, ... in the order the process makes them) get
a NaN hidden state, so that the micro-batch's loss and, through its backward, every gradient are NaN, as a corrupt
batch or an overflow makes them. The scripts themselves have no code for it."""

import os

if os.environ.get("NANOPOST_TEST_NAN_CALLS") and os.environ.get("RANK") == os.environ.get("NANOPOST_TEST_NAN_RANK"):
    import nanopost.kernels

    poisoned_calls = {int(n) for n in os.environ["NANOPOST_TEST_NAN_CALLS"].split(",")}
    fused_head = nanopost.kernels.linear_logprobs
    calls = 0

    def linear_logprobs(hidden, *args, **kwargs):
        global calls
        calls += 1
        return fused_head(hidden * float("nan") if calls in poisoned_calls else hidden, *args, **kwargs)

    nanopost.kernels.linear_logprobs = linear_logprobs  # what the scripts' `from nanopost.kernels import` then takes
