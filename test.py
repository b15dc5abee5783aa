#!/usr/bin/env python
"""Test a SAMCL run: route every test image through the Module Selector and report per domain.

    python test.py --module SAMCL --cuda 0          # the run folder train.py made with the same flags
    python test.py --run_dir log_sam1/<run> --device cpu
"""
import argparse

from samcl.cli import DEFAULT_CONFIG, CLIError, add_common_flags, config_from_args, resolve_device


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p)
    p.add_argument("--batch_size", type=int, dest="eval_batch_size", help="test images per batch (default 8)")
    p.add_argument("--no_vanilla", action="store_true", help="skip the vanilla (no module) comparison pass")
    p.add_argument("--output", help="where to write the report (default <run_dir>/test_metrics.json)")
    args = p.parse_args(argv)
    device = resolve_device(args.cuda, args.device)
    cfg = config_from_args(args, DEFAULT_CONFIG["sam"])
    from samcl.pipeline import test

    try:
        test(cfg.resolved_run_dir(), cfg, device, with_vanilla=not args.no_vanilla, output=args.output)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None


if __name__ == "__main__":
    main()
