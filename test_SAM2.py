#!/usr/bin/env python
"""Test a SAMCL run on SAM 2.1: route every test image through the Module Selector and report per domain.

    python test_SAM2.py --module SAMCL_2 --cuda 0    # the run folder train_SAM2.py made with the same flags
    python test_SAM2.py --run_dir log_sam2/<run> --device cpu
    python test_SAM2.py --run_dir checkpoint/SAM2 --cuda 0   # the authors' released modules (release folder)

--run_dir may be a run folder of this project (it has run.json) or a folder in the
release's layout (Module_Selector.pth + <domain>.pth pickles, loaded safely; the
domain order is --order, by default the release's, and the report goes to
<output_dir>/release_<folder name>/).
"""
from samcl.cli import run_script, test_main

if __name__ == "__main__":
    run_script(test_main, "sam2", __doc__)
