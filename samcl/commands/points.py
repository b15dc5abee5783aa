"""The points command: generate_point.py writes every split's static prompt points, or (--check) checks the data."""
import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from ..cli import CLIError, Parser, add_setting_flag, explained_errors

POINTS_DOC = """Write the static prompt points (masks/points.json) of every split in the JSON maps.

For each mask: resize to 1024x1024 (nearest), binarise, draw --num_points foreground
pixels uniformly with replacement, shuffle. A mask with no foreground gets negative
points (label 0) spread over the image and is reported by name.

    python generate_point.py                       # data/ per datasets_train.json + datasets_test.json
    python generate_point.py --data_root demo_output --num_points 3 --seed 1234
    python generate_point.py --check               # only check the data, report every problem, write nothing
"""


def points_main(argv: Optional[List[str]] = None) -> int:
    """generate_point.py: write every split's points.json, or (--check) check the data; exit status."""
    p = Parser(description=POINTS_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("data_root", "train_json", "test_json", "mask_binarize", "mask_threshold"):
        add_setting_flag(p, name, with_default=True)
    add_setting_flag(p, "seed", with_default=True,
                     help="seed; each file's draw depends only on it and its name (default: 1234)")
    p.add_argument("--num_points", type=int, default=3, help="points per mask (default 3)")
    p.add_argument("--domains", nargs="*", help="only these domain keys (default: all in the maps)")
    p.add_argument("--check", action="store_true",
                   help="write nothing: check every split of both maps, report every problem, exit 1 if any "
                        "(samcl.datacheck)")
    args = p.parse_args(argv)
    from .. import datacheck
    from ..config import check_setting
    from ..data import read_domain_map
    from ..points import generate_split_points

    if args.check:
        return datacheck.run_check(args.data_root, args.train_json, args.test_json, args.domains,
                                   args.mask_binarize, args.mask_threshold)
    if args.num_points < 1:
        raise CLIError("--num_points must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    with explained_errors():
        for name in ("seed", "mask_threshold"):  # the same ranges as the training settings
            check_setting(name, getattr(args, name), f"flag --{name}")
        splits = []
        for js in (args.train_json, args.test_json):
            for domain, folder in read_domain_map(Path(js), Path(args.data_root)).items():
                if args.domains is None or domain in args.domains:
                    splits.append((domain, folder))
        for domain, folder in splits:
            if not (folder / "images").is_dir():
                logging.warning("%s: %s has no images/ folder; skipped", domain, folder)
                continue
            entries, empty = generate_split_points(folder, args.num_points, args.seed, args.mask_binarize,
                                                   args.mask_threshold)
            logging.info("%s: wrote %d entries to %s%s", domain, len(entries), folder / "masks" / "points.json",
                         f" ({len(empty)} empty mask(s): {', '.join(empty)})" if empty else "")
    return 0
