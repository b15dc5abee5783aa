"""The scripts: pyproject.toml's console scripts (``samcl-train``, ``samcl-test``, ``samcl-points``,
``samcl-demo``) and the top-level ``train.py``, ``test.py``, ``train_SAM2.py``, ``test_SAM2.py`` and
``generate_point.py``, which only call the functions here, so both show the same ``--help``.

Each parses its flags before it imports torch or a backbone (``--help`` and a refused flag
answer at once) and ends through :func:`samcl.cli.run_script`.
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import List, NoReturn, Optional

from .cli import CLIError, Parser, explained_errors, run_script, test_main, train_main

RUN_DIR_HELP = """
--run_dir may be a run folder of this project (it has run.json) or a folder in the
release's layout (Module_Selector.pth + <domain>.pth pickles, loaded safely; the
domain order is --order, by default the release's, and the report goes to
<output_dir>/release_<folder name>/)."""

TRAIN_DOC = {
    "sam": """Train SAMCL in the continual manner over --order (SAM ViT backbone).

    python train.py --module SAMCL --batch_size 8 --cuda 0
    python train.py --config configs/demo_sam.yaml --device cpu
    python train.py --module CAD --cuda 0                     # CAD, its own recipe (configs/cad_vit_b.yaml)
    python train.py --resume log_sam1/<run> --cuda 0          # after a crash, or with a longer --order
    torchrun --nproc_per_node 4 train.py --module SAMCL --batch_size 2 --cuda -1
""",
    "sam2": """Train SAMCL in the continual manner over --order (SAM 2.1 Hiera backbone).

    python train_SAM2.py --module SAMCL_2 --batch_size 16 --cuda 0
    python train_SAM2.py --config configs/demo_sam2.yaml --device cpu
    python train_SAM2.py --resume log_sam2/<run> --cuda 0     # after a crash, or with a longer --order
    torchrun --nproc_per_node 4 train_SAM2.py --module SAMCL_2 --batch_size 4 --cuda -1
""",
}

TEST_DOC = {
    "sam": """Test a SAMCL run: route every test image through the Module Selector and report per domain.

    python test.py --module SAMCL --cuda 0          # the run folder train.py made with the same flags
    python test.py --run_dir log_sam1/<run> --device cpu
    python test.py --run_dir checkpoint/SAM1 --cuda 0    # the authors' released modules (release folder)

Without --run_dir: the run folder train.py makes with the same flags or, if there is
none, the authors' release folder checkpoint/SAM1.
""" + RUN_DIR_HELP,
    "sam2": """Test a SAMCL run on SAM 2.1: route every test image through the Module Selector and report per domain.

    python test_SAM2.py --module SAMCL_2 --cuda 0    # the run folder train_SAM2.py made with the same flags
    python test_SAM2.py --run_dir log_sam2/<run> --device cpu
    python test_SAM2.py --run_dir checkpoint/SAM2 --cuda 0   # the authors' released modules (release folder)

Without --run_dir: the run folder train_SAM2.py makes with the same flags or, if there
is none, the authors' release folder checkpoint/SAM2.
""" + RUN_DIR_HELP,
}

POINTS_DOC = """Write the static prompt points (masks/points.json) of every split in the JSON maps.

For each mask: resize to 1024x1024 (nearest), binarise, draw --num_points foreground
pixels uniformly with replacement, shuffle. A mask with no foreground gets negative
points (label 0) spread over the image and is reported by name.

    python generate_point.py                       # data/ per datasets_train.json + datasets_test.json
    python generate_point.py --data_root demo_output --num_points 3 --seed 1234
    python generate_point.py --check               # only check the data, report every problem, write nothing
"""


def train(family: str = "sam") -> NoReturn:
    """``samcl-train`` and ``train.py`` (family "sam"), ``train_SAM2.py`` ("sam2")."""
    run_script(train_main, family, TRAIN_DOC[family])


def test(family: str = "sam") -> NoReturn:
    """``samcl-test`` and ``test.py`` (family "sam"), ``test_SAM2.py`` ("sam2")."""
    run_script(test_main, family, TEST_DOC[family])


def predict() -> NoReturn:
    """``samcl-predict`` and ``predict.py``: segment your own images with a trained run."""
    from .predict import main

    run_script(main)


def points() -> NoReturn:
    """``samcl-points`` and ``generate_point.py``."""
    run_script(points_main)


def demo() -> NoReturn:
    """``samcl-demo``, as ``python -m samcl.demo``."""
    from .demo import main

    run_script(main)


def points_main(argv: Optional[List[str]] = None) -> int:
    """generate_point.py: write every split's points.json, or (--check) check the data; exit status."""
    p = Parser(description=POINTS_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default=".", help="folder the JSON maps' paths are relative to (default .)")
    p.add_argument("--train_json", default="datasets_train.json", help="domain -> train split map")
    p.add_argument("--test_json", default="datasets_test.json", help="domain -> test split map")
    p.add_argument("--num_points", type=int, default=3, help="points per mask (default 3)")
    p.add_argument("--seed", type=int, default=1234, help="seed; each file's draw depends only on it and its name")
    p.add_argument("--mask_binarize", choices=("threshold", "reference"), default="threshold",
                   help="'threshold' (>= --mask_threshold, default) or 'reference' (floor(v/255))")
    p.add_argument("--mask_threshold", type=int, default=128, help="threshold for 'threshold' (default 128)")
    p.add_argument("--domains", nargs="*", help="only these domain keys (default: all in the maps)")
    p.add_argument("--check", action="store_true",
                   help="write nothing: check every split of both maps, report every problem, exit 1 if any "
                        "(samcl.datacheck)")
    args = p.parse_args(argv)
    from . import datacheck
    from .config import check_setting
    from .data import read_domain_map
    from .points import generate_split_points

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
