"""The one training loop every network plugs into (``loop``: a network gives a ``loop.Task`` — its step,
validation and checkpoint contents) and its shared parts (``common``: DDP, AMP, resume state, logging,
stopping cleanly)."""
