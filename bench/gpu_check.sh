#!/usr/bin/env bash
# Validate and benchmark a GPU machine: the CUDA tests, every script on a Qwen2.5-0.5B-shaped model
# under torchrun (nccl, bf16), every benchmark beside its anchors. `bench/gpu_check.sh --help` says more.
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
