"""Networks: X2B / X2B2 occupancy networks (encoders, conditional-batch-norm decoder), SPIDER, hash
encoding, and checkpoint IO (safetensors weights + JSON config, never pickled code)."""
