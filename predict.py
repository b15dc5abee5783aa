#!/usr/bin/env python
"""Segment your own images with a trained run (see samcl/predict.py, or python predict.py --help)."""
from samcl.cli import run_script
from samcl.predict import main

if __name__ == "__main__":
    run_script(main)
