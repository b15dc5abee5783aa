"""The test command: test.py (family "sam") and test_SAM2.py ("sam2"): route every test image through the
Module Selector, evaluate, print and write the report."""
import argparse
import json
from pathlib import Path
from typing import List, Optional

from ..cli import (SCRIPTS, CLIError, Parser, add_common_flags, check_module_family, chosen_family, config_from_args,
                   explained_errors, flag_names, resolve_device)
from ..config import Config, default_config

RUN_DIR_HELP = """
--run_dir may be a run folder of this project (it has run.json) or a folder in the
release's layout (Module_Selector.pth + <domain>.pth pickles, loaded safely; the
domain order is --order, by default the release's, and the report goes to
<output_dir>/release_<folder name>/)."""

TEST_DOC = {
    "sam": """Test a SAMCL run: route every test image through the Module Selector and report per domain.

    python test.py --module SAMCL --cuda 0          # the run folder train.py made with the same flags
    python test.py --run_dir log_sam1/<run> --device cpu
    python test.py --run_dir checkpoint/SAM1 --cuda 0    # the authors' released modules (release folder)

Without --run_dir: the run folder train.py makes with the same flags, else the one in
--output_dir whose run.json has --order (a run resumed with a longer --order keeps its first
name), else the authors' release folder checkpoint/SAM1. The backbone weights are the run's
own (run.json) unless --ckpt or --random_weights is given.
""" + RUN_DIR_HELP,
    "sam2": """Test a SAMCL run on SAM 2.1: route every test image through the Module Selector and report per domain.

    python test_SAM2.py --module SAMCL_2 --cuda 0    # the run folder train_SAM2.py made with the same flags
    python test_SAM2.py --run_dir log_sam2/<run> --device cpu
    python test_SAM2.py --run_dir checkpoint/SAM2 --cuda 0   # the authors' released modules (release folder)

Without --run_dir: the run folder train_SAM2.py makes with the same flags, else the one
in --output_dir whose run.json has --order (a run resumed with a longer --order keeps its
first name), else the authors' release folder checkpoint/SAM2. The backbone weights are the
run's own (run.json) unless --ckpt or --random_weights is given.
""" + RUN_DIR_HELP,
}

RELEASE_FOLDERS = {"sam": "SAM1", "sam2": "SAM2"}


# what a run folder's default name says besides the order: a run with the order and these is the one
# train.py made with the same flags, resumed since with a longer --order
NAMED_SETTINGS = ("method", "learning_module_kind", "num_embedding", "seed")


def runs_with_order(cfg: Config) -> List[Path]:
    """The run folders in ``cfg.output_dir`` whose run.json has ``cfg``'s order and the settings its
    default name holds (NAMED_SETTINGS), whatever the folder's name: a resume with a longer --order
    keeps the folder's first name."""
    from ..config import build_config
    from ..run_folder import MANIFEST

    found = []
    for manifest in sorted(Path(cfg.output_dir).glob(f"*/{MANIFEST}")):
        try:
            run = json.loads(manifest.read_text())
            if run.get("order") != cfg.domains:
                continue
            own = build_config([(str(manifest), run["config"])])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not a readable run: not this one
            continue
        if all(getattr(own, k) == getattr(cfg, k) for k in NAMED_SETTINGS):
            found.append(manifest.parent)
    return found


def default_test_folder(cfg: Config, family: str) -> Path:
    """--run_dir if given; else the run folder train.py makes with the same flags; else the one run
    folder in the output folder whose run.json has the order (a resumed run keeps its first name);
    else the authors' release folder checkpoint/SAM1 (SAM2) if it holds their modules. Several runs
    of the order, or none of these, are a CLIError that names them or where it looked."""
    from ..config import CHECKPOINT_DIR

    run_dir = cfg.resolved_run_dir()
    if cfg.run_dir is not None and not run_dir.exists():
        raise CLIError(f"run folder {run_dir} does not exist (--run_dir takes a run folder of "
                       f"{SCRIPTS[family, 'train']} or a release folder such as checkpoint/{RELEASE_FOLDERS[family]})")
    if run_dir.exists():
        return run_dir
    same_order = runs_with_order(cfg)
    if len(same_order) == 1:
        print(f"no run folder {run_dir}: testing {same_order[0]}, whose run.json has the order {cfg.order}")
        return same_order[0]
    if same_order:
        raise CLIError(f"no run folder {run_dir}, and {len(same_order)} run folders in {cfg.output_dir} have the "
                       f"order {cfg.order} and these flags' method, module, num_embedding and seed: "
                       f"{', '.join(map(str, same_order))}; pass the one to test with --run_dir")
    from ..release.folder import is_release_folder

    release = CHECKPOINT_DIR / RELEASE_FOLDERS[family]
    if is_release_folder(release):
        print(f"no run folder {run_dir}: testing the release modules in {release}")
        return release
    state = "is not a release folder (Module_Selector.pth and <domain>.pth)" if release.exists() else "does not exist"
    train = SCRIPTS[family, "train"]
    raise CLIError(f"nothing to test: looked for the run folder {run_dir} (where {train} puts a run with these "
                   f"flags: it does not exist), for a run folder in {cfg.output_dir} whose run.json has the order "
                   f"{cfg.order} and these flags' method, module, num_embedding and seed (none) and for the authors' "
                   f"release modules in {release} (it {state}); "
                   f"train first (python {train} with the same flags), pass --run_dir, or put the release modules "
                   f"there")


def test_main(family: str, doc: str, argv: Optional[list] = None) -> None:
    """test.py (family "sam") and test_SAM2.py ("sam2"): route, evaluate, print and write the report."""
    family = chosen_family(argv, family)
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p, family)
    p.add_argument("--batch_size", type=int, dest="eval_batch_size", help="test images per batch (default 8)")
    p.add_argument("--no_vanilla", action="store_true", help="skip the vanilla (no module) comparison pass")
    p.add_argument("--output", help="where to write the report (default <run_dir>/test_metrics.json)")
    p.add_argument("--save_overlays", type=int, default=0, metavar="N",
                   help="also draw N test images per domain into the report folder's overlays/ (prediction, "
                        "ground truth, points, routed domain; default 0)")
    args = p.parse_args(argv)
    if args.save_overlays < 0:
        raise CLIError(f"--save_overlays must be >= 0, got {args.save_overlays}")
    check_module_family(args.module, family, "test")
    cfg = config_from_args(args, default_config(family, args.module), flag_names(p))
    with explained_errors():
        device = resolve_device(args.cuda, args.device)
        run_dir = default_test_folder(cfg, family)
        from ..pipeline import test  # the backbones only now, once the flags, settings and folder passed

        test(run_dir, cfg, device, with_vanilla=not args.no_vanilla, output=args.output,
             save_overlays=args.save_overlays)
