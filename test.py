#!/usr/bin/env python
"""Test a SAMCL run on SAM (python test.py --help); the code is samcl.scripts, as for the console script samcl-test."""
from samcl.scripts import test

if __name__ == "__main__":
    test("sam")
