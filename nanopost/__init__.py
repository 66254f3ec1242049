"""What the nanopost scripts share by import: `nanopost.kernels` (log-probs under a linear head
without the [tokens, vocab] logits), `nanopost.verifiers` (reward functions for RL with
verifiable rewards) and `nanopost.tools` (tools a model may call in RL rollouts, with a sandbox for
the code it writes). Everything else is written out in each script."""
