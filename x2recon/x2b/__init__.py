"""X2B / X2B2 (bones from one or two X-rays): ``network`` with its occupancy ``decoder``, ``train`` (its task
in the one training loop), ``reconstruct`` (MISE → mesh in world mm) and ``evaluate`` (Tables 1–2; X2BR's
rows are injected by the CLI from ``x2recon.x2br.evaluate``)."""
