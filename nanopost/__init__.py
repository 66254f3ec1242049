"""What the nanopost scripts share by import: `nanopost.kernels` (log-probs under a linear head
without the [tokens, vocab] logits) and `nanopost.verifiers` (reward functions for RL with
verifiable rewards). Everything else is written out in each script."""
