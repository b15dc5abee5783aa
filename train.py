#!/usr/bin/env python
"""Train SAMCL on SAM (python train.py --help); the code is samcl.scripts, as for the console script samcl-train."""
from samcl.scripts import train

if __name__ == "__main__":
    train("sam")
