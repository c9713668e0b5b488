"""The one training loop every network plugs into (DDP, AMP, resume, logging, checkpoints)."""
