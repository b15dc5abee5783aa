"""The train command: train.py (family "sam") and train_SAM2.py ("sam2"), a new run or --resume one."""
import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..cli import (SCRIPTS, CLIError, Parser, add_common_flags, add_train_flags, check_module_family, chosen_family,
                   config_from_args, explained_errors, explicit_settings, flag_names, resolve_device)
from ..config import FAMILY_NAMES, default_config

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


def train_main(family: str, doc: str, argv: Optional[list] = None) -> None:
    """train.py (family "sam") and train_SAM2.py ("sam2"): a new run, or --resume one."""
    family = chosen_family(argv, family)
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p, family)
    add_train_flags(p, family)
    args = p.parse_args(argv)
    check_module_family(args.module, family, "train")
    if args.resume:
        if args.config or args.overwrite:
            raise CLIError("--resume keeps the run's own settings; drop --config/--overwrite")
    else:
        cfg = config_from_args(args, default_config(family, args.module), flag_names(p))
    # torch and the backbones only now, once the flags and settings passed
    from ..pipeline import resume, train

    with training_processes():
        device = resolve_device(args.cuda, args.device)
        if args.resume:
            resume(Path(args.resume), explicit_settings(args), device, family=family)
            from .. import distributed

            if distributed.is_main():
                print(after_resume(Path(args.resume), args.device, args.cuda), flush=True)
        else:
            train(cfg, device, overwrite=args.overwrite)


def after_resume(run_dir: Path, device: Optional[str], cuda: Optional[int]) -> str:
    """What a resume says last: the folder, which keeps its first name whatever the order, and the command
    that tests it (the run's own family's script, beside the train script called, with the run's data
    settings and the device flag given)."""
    import shlex

    from ..config import Config
    from ..run_folder import read_manifest

    manifest = read_manifest(run_dir)
    run = manifest["config"]
    flags = [f"--run_dir {shlex.quote(str(run_dir))}"]
    flags += [f"--{k} {shlex.quote(str(run[k]))}" for k in ("data_root", "test_json")
              if k in run and run[k] != getattr(Config, k)]
    flags += [f"--device {device}"] if device else [f"--cuda {cuda}"] if cuda is not None and cuda >= 0 else []
    script = SCRIPTS[run["backbone"], "test"]
    called = Path(sys.argv[0])
    if called.name in {SCRIPTS[f, "train"] for f in FAMILY_NAMES}:  # python ../train.py: ../test.py
        script = str(called.with_name(script))
    return (f"resumed {run_dir}: its run.json has the order {'_'.join(manifest['order'])} (the folder keeps its "
            f"name); test it with:\n    python {shlex.quote(script)} {' '.join(flags)}")


# what a surviving rank's collective reports when another process of the job died (Gloo, NCCL)
PEER_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                 "remote process exited", "NCCL communicator was aborted")
PEER_DIED = ("another process of this job stopped, which broke this one's connection to it: it died (killed, often "
             "by the out-of-memory killer, or crashed). torchrun's summary, printed when the job ends, names its "
             "rank and exit code (-9 or SIGKILL: killed, look for the out-of-memory killer in the kernel log, "
             "dmesg); its own error, if it printed one, is above. The run folder keeps the last saved epoch: "
             "--resume continues it")


def peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective's report of another rank gone, not this rank's own failure."""
    return any(p in str(e) for p in PEER_FAILURES)


@contextmanager
def training_processes() -> Iterator[None]:
    """The body of a training command: errors explained; under torchrun a failing rank says so
    (torchrun then ends the others instead of letting them hang) and the process group ends."""
    from .. import distributed

    try:
        with explained_errors():
            yield
    except BaseException as e:
        if distributed.is_distributed():
            if peer_failure(e):
                print(f"{distributed.rank_prefix()}{PEER_DIED}", file=sys.stderr, flush=True)
            print(f"{distributed.rank_prefix()}failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        distributed.shutdown()
