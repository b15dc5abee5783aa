#!/usr/bin/env python
"""Test a SAMCL run: route every test image through the Module Selector and report per domain.

    python test.py --module SAMCL --cuda 0          # the run folder train.py made with the same flags
    python test.py --run_dir log_sam1/<run> --device cpu
    python test.py --run_dir checkpoint/SAM1 --cuda 0    # the authors' released modules (release folder)

--run_dir may be a run folder of this project (it has run.json) or a folder in the
release's layout (Module_Selector.pth + <domain>.pth pickles, loaded safely; the
domain order is --order, by default the release's, and the report goes to
<output_dir>/release_<folder name>/).
"""
from samcl.cli import run_script, test_main

if __name__ == "__main__":
    run_script(test_main, "sam", __doc__)
