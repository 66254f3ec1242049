"""Reward functions for RL with verifiable rewards: verifiers.get(name)(completion, ground_truth)."""
