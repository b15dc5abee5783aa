#!/usr/bin/env python
"""Train SAMCL in the continual manner over --order (SAM ViT backbone).

    python train.py --module SAMCL --batch_size 8 --cuda 0
    python train.py --config configs/demo_sam.yaml --device cpu
    python train.py --module CAD --cuda 0                     # CAD, its own recipe (configs/cad_vit_b.yaml)
    python train.py --resume log_sam1/<run> --cuda 0          # after a crash, or with a longer --order
    torchrun --nproc_per_node 4 train.py --module SAMCL --batch_size 2 --cuda -1
"""
from samcl.cli import run_script, train_main

if __name__ == "__main__":
    run_script(train_main, "sam", __doc__)
