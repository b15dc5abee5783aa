#!/usr/bin/env python
"""Train SAMCL on SAM 2.1 (python train_SAM2.py --help); the code is samcl.scripts."""
from samcl.scripts import train

if __name__ == "__main__":
    train("sam2")
