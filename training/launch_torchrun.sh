#!/usr/bin/env bash
# One node, every visible GPU: DDP through torchrun (NCCL). Usage:
#   training/launch_torchrun.sh x2b --data ds_x2b --out runs/x2b_paper --batch-size 256
# Extra arguments go to `x2recon train`. NPROC overrides the process count.
set -euo pipefail
network="$1"; shift
nproc="${NPROC:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
exec torchrun --standalone --nproc-per-node "$nproc" -m x2recon.cli train "$network" "$@"
