#!/usr/bin/env python
"""Train SAMCL in the continual manner over --order (SAM 2.1 Hiera backbone).

    python train_SAM2.py --module SAMCL_2 --batch_size 16 --cuda 0
    python train_SAM2.py --config configs/demo_sam2.yaml --device cpu
    python train_SAM2.py --resume log_sam2/<run> --cuda 0     # after a crash, or with a longer --order
    torchrun --nproc_per_node 4 train_SAM2.py --module SAMCL_2 --batch_size 4 --cuda -1
"""
from samcl.cli import run_script, train_main

if __name__ == "__main__":
    run_script(train_main, "sam2", __doc__)
