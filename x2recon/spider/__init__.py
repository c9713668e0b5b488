"""SPIDER (CT + segmentation from two X-rays): ``unet`` and ``hash_encoding`` (+ ``hash_triton``) inside
``network``; ``train`` (its task in the one training loop), ``inference`` (grid reconstruction, the CT
research path) and ``evaluate`` (the paper's Tables 1–3)."""
