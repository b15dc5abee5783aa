#!/usr/bin/env python
"""Test a SAMCL run on SAM 2.1 (python test_SAM2.py --help); the code is samcl.scripts."""
from samcl.scripts import test

if __name__ == "__main__":
    test("sam2")
