#!/usr/bin/env python
"""Train SAMCL in the continual manner over --order (SAM ViT backbone).

    python train.py --module SAMCL --batch_size 8 --cuda 0
    python train.py --config configs/demo_sam.yaml --device cpu
"""
import argparse

from samcl.cli import DEFAULT_CONFIG, CLIError, add_common_flags, add_train_flags, config_from_args, resolve_device


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p)
    add_train_flags(p)
    args = p.parse_args(argv)
    device = resolve_device(args.cuda, args.device)
    cfg = config_from_args(args, DEFAULT_CONFIG["sam"])
    from samcl.pipeline import train

    try:
        train(cfg, device, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None


if __name__ == "__main__":
    main()
