"""Command-line flags shared by the commands (samcl.commands and the other entry points), device selection,
and how a script ends.

Every flag defaults to None so that only what the user typed overrides the
``--config`` file, which overrides the built-in defaults (the published setting).

An error the user can fix (a bad flag, setting, file or data: :class:`CLIError`, and
the ValueErrors and OSErrors the package raises with a message naming what to fix)
ends a script with that message on one line of stderr and exit status 2, before
anything is written where possible; any other exception is a bug and keeps its
traceback.

This module imports neither torch nor the backbones at import time: the scripts parse
their flags (and answer ``--help``) and read their settings first, and import the
heavy modules only for the work (see :func:`run_script` for how they end).
"""
import argparse
import logging
import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, NoReturn, Optional

from .config import CHOICES, CONFIG_DIR, DEFAULT_CONFIG, FAMILY_NAMES, MODULE_ALIASES, Config, load_config

if TYPE_CHECKING:
    import torch

class CLIError(SystemExit):
    """An error the user can fix; printed without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


# what the package raises for a problem the user can fix: its own errors are ValueErrors
# (ConfigError, DataError, RunFolderError, ...) and an OSError names its file
EXPLAINED = (ValueError, OSError)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def rank_prefix() -> str:
    """'[rank r/w] ' in a process of torchrun's group, else ''. A process that never imported
    samcl.distributed (which imports torch) has joined no group, so it is not imported here."""
    dist = sys.modules.get(__package__ + ".distributed")
    return dist.rank_prefix() if dist is not None else ""


@contextmanager
def explained_errors() -> Iterator[None]:
    """Turn the errors the package explains into a CLIError (with the rank under torchrun)."""
    try:
        yield
    except EXPLAINED as e:
        raise CLIError(rank_prefix() + one_line(e)) from None


def run_script(main: Callable[..., Any], *args: Any) -> NoReturn:
    """Run an entry point and end the process: exit status 0 (or the int ``main`` returns), 2
    with the message on one line of stderr for a CLIError, a SystemExit's own status (``--help``,
    ``sys.exit(n)``). Any other exception propagates: its traceback and the interpreter's
    ordinary exit."""
    try:
        code = main(*args)
    except CLIError as e:
        print(e.code, file=sys.stderr)
        code = 2
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):  # sys.exit("message"), as the interpreter would
        print(code, file=sys.stderr)
        code = 1
    exit_now(code or 0)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once its output is out, skipping the interpreter's teardown.

    After the last line, a normal exit spends 0.3-0.8 s on an idle machine (far more under load)
    finalising torch, segment_anything and sam2: freeing every module's objects and tensors one by
    one and running their extensions' destructors. Nothing the scripts need happens there: every
    file is written before ``main`` returns (atomically, flushed and fsynced, samcl.io), DataLoader
    workers end with their epoch, and tqdm's monitor thread is a daemon. So, after flushing
    stdout, stderr and every logging handler (log.txt, test_log.txt) and leaving torch.distributed's
    process group, ``os._exit`` ends the process at once (0.05 s). Under a tracer or profiler
    (a debugger, coverage, cProfile), which reports from the interpreter's exit, the exit is the
    ordinary one.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``... --help | head -1``) or a closed stream
            pass
    logging.shutdown()  # flushes and closes every handler
    if "torch.distributed" in sys.modules:
        from . import distributed

        distributed.shutdown()
    if sys.gettrace() is not None or sys.getprofile() is not None:
        sys.exit(code)
    os._exit(code)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that ends the script as every other refusal."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see {self.prog} --help)")


def flag_names(p: argparse.ArgumentParser) -> Dict[str, str]:
    """Setting -> the flag that sets it (test.py's --batch_size sets eval_batch_size)."""
    return {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}


SCRIPTS = {("sam", "train"): "train.py", ("sam", "test"): "test.py",
           ("sam2", "train"): "train_SAM2.py", ("sam2", "test"): "test_SAM2.py"}


def check_module_family(module: Optional[str], family: str, kind: str) -> None:
    """--module must be one the script's backbone family runs (CAD and SAMCL: SAM; SAMCL_2: SAM 2.1)."""
    if module is not None and MODULE_ALIASES[module].backbone != family:
        right = MODULE_ALIASES[module].backbone
        raise CLIError(f"--module {module} runs on the {FAMILY_NAMES[right]} backbone, but {SCRIPTS[family, kind]} "
                       f"is the {FAMILY_NAMES[family]} script: use {SCRIPTS[right, kind]}")


def add_common_flags(p: argparse.ArgumentParser, family: str = "sam") -> None:
    """Flags of train.py / test.py (family "sam") and train_SAM2.py / test_SAM2.py ("sam2"):
    the reference's and what a CPU user needs. ``family`` only picks the help texts."""
    sam2 = family == "sam2"
    default = DEFAULT_CONFIG[family].relative_to(CONFIG_DIR.parent)
    p.add_argument("--config", help=f"YAML file of settings (default: {default}); flags override it")
    p.add_argument("--module", choices=CHOICES["module"],
                   help=f"learning module: SAMCL (SAM) or SAMCL_2 (SAM 2.1) (default {'SAMCL_2' if sam2 else 'SAMCL'}); "
                        f"CAD: convolutional adapter + per-domain decoder (SAM only; without --config it takes "
                        f"configs/cad_vit_b.yaml, CAD's recipe)")
    p.add_argument("--backbone", choices=CHOICES["backbone"],
                   help="sam: SAM (ViT), as train.py / test.py; sam2: SAM 2.1 (Hiera), as train_SAM2.py / "
                        "test_SAM2.py (those scripts are this flag's aliases)")
    p.add_argument("--method", help="continual-learning method, a name registered in samcl/methods (default samcl: "
                                    "a module per domain, routed by the Module Selector; the baselines zeroshot, "
                                    "finetune, joint, ewc, er, der, lwf, olora, l2p: configs/baselines/)")
    p.add_argument("--learning_module",
                   help="what trains inside the frozen model, a name registered in samcl/modules: augmodule, lora, "
                        "adapter, decoder, cad, olora, prompt_pool (default: the one --module names: augmodule, or cad "
                        "for CAD)")
    p.add_argument("--vit_name", help="SAM size: vit_b (default), vit_l, vit_h, or vit_tiny (tests/demo)")
    p.add_argument("--hiera_name",
                   help="SAM 2.1 size: hiera_t (default), hiera_s, hiera_b+, hiera_l, or hiera_toy (tests/demo)")
    p.add_argument("--ckpt", help="official weights (default: checkpoint/sam2.1_hiera_tiny.pt for hiera_t)" if sam2
                   else "official SAM weights (default: checkpoint/sam_vit_b_01ec64.pth for vit_b)")
    p.add_argument("--random_weights", action="store_true", default=None,
                   help="build the backbone with random weights instead of --ckpt (smoke tests only; loud warning)")
    p.add_argument("--img_size", type=int, help="model input side (default: the architecture's, 1024)")
    p.add_argument("--num_embedding", type=int, help="buffered selector embeddings per domain (default 300)")
    p.add_argument("--seed", type=int, help="random seed (default 1234)")
    p.add_argument("--order", help="domain keys in training order joined by '_' (default Kvasir_camo_ISTD_ISIC_cod_COCO)")
    p.add_argument("--unseen", nargs="*", help="test-only domains that train no module (default COCO)")
    p.add_argument("--cuda", type=int,
                   help="GPU index (e.g. 0); -1 means distributed training under torchrun. Default: GPU 0 if "
                        "available, else CPU")
    p.add_argument("--device", help="explicit torch device, e.g. cpu or cuda:1 (overrides --cuda)")
    p.add_argument("--data_root", help="folder the JSON maps' paths are relative to (default: .)")
    p.add_argument("--test_json", help="domain -> test split map (default datasets_test.json under --data_root)")
    p.add_argument("--num_workers", type=int, help="data-loading worker processes (default 4; capped at the CPUs available)")
    p.add_argument("--eval_batch_size", type=int, help="images per evaluation batch (default 8)")
    p.add_argument("--output_dir", help=f"parent of run folders (default {'log_sam2' if sam2 else 'log_sam1'})")
    p.add_argument("--run_dir", help="run folder (default <output_dir>/<module>_<order>_<num_embedding>_<seed>_training)")
    p.add_argument("--mask_binarize", choices=CHOICES["mask_binarize"],
                   help="'threshold' (mask >= --mask_threshold, default) or 'reference' (floor(v/255), quirk Q5)")
    p.add_argument("--mask_threshold", type=int, help="binarisation threshold for 'threshold' (default 128)")
    p.add_argument("--upsample", choices=CHOICES["upsample"],
                   help="logit upsampling to the input size: default nearest on SAM (reference, quirk Q6), "
                        "bilinear on SAM 2.1 (as its image predictor)")
    p.add_argument("--heat_orientation", choices=CHOICES["heat_orientation"],
                   help="point heatmap at the SAM neck: reference: added without the transpose used inside the "
                        "blocks, so x and y are swapped there, as the release (quirk Q1, default); corrected: transposed")
    p.add_argument("--amp", choices=CHOICES["amp"],
                   help="off: fp32, exact reproduction (default); bf16: bfloat16 autocast for the module's forward "
                        "in training and for test inference, faster; CUDA GPUs and CPUs with native bfloat16 "
                        "(AVX512-BF16/AMX) (README, 'Performance')")


def add_train_flags(p: argparse.ArgumentParser, family: str = "sam") -> None:
    p.add_argument("--batch_size", type=int,
                   help=f"images per training batch (default {16 if family == 'sam2' else 8})")
    p.add_argument("--lr", type=float, help="learning rate of the module (default 0.005; CAD 2e-4)")
    p.add_argument("--optimizer", choices=CHOICES["optimizer"], help="adam (SAMCL, default) or adamw (CAD)")
    p.add_argument("--weight_decay", type=float, help="optimizer weight decay (default 0; CAD 0.01)")
    p.add_argument("--loss", choices=CHOICES["loss"],
                   help="samcl: focal + 10 dice + IoU-head MSE (default); bce_iou: CAD's BCE + soft IoU loss")
    p.add_argument("--prompt", choices=CHOICES["prompt"],
                   help="points: the static points.json prompts (default); box: CAD's full-image box (--module CAD)")
    p.add_argument("--epoch", type=int, help="epochs per domain (default 20)")
    p.add_argument("--train_json", help="domain -> train split map (default datasets_train.json under --data_root)")
    p.add_argument("--val_every", type=int, help="validate on the domain's test split every N epochs (default 5; 0: never)")
    p.add_argument("--scheduler", choices=CHOICES["scheduler"],
                   help="reference: cosine with T_max=epochs stepped per iteration (quirk Q4, default); "
                        "cosine: one cosine over the domain's iterations")
    p.add_argument("--iou_target", choices=CHOICES["iou_target"],
                   help="IoU-head target: reference thresholds raw logits at 0.5 (quirk Q3, default); sigmoid at p >= 0.5")
    p.add_argument("--focal", choices=CHOICES["focal"],
                   help="focal term: reference: BCE on sigmoid probabilities as the release (its log is clamped at "
                        "-100, so saturated wrong pixels cost 100 and pass no gradient; default); logits: BCE from "
                        "logits (unbounded, full gradient)")
    p.add_argument("--train_mode", choices=CHOICES["train_mode"],
                   help="backbone train/eval mode during training: reference: train mode once per domain, eval mode "
                        "from the first validation on, as the release (matters for SAM 2's decoder, which picks its "
                        "mask by stability in eval mode; default); every_epoch: train mode in every epoch")
    p.add_argument("--module_init", choices=CHOICES["module_init"],
                   help="shared: every domain's module starts from the same random draw, as the release (default); "
                        "per_domain: a new draw per domain")
    p.add_argument("--selector_epochs", type=int, help="selector epochs after each domain (default 25)")
    g = p.add_argument_group("baselines", "settings of the other continual methods (--method); each reads its own")
    g.add_argument("--replay_size", type=int, help="er, der: training samples kept in the reservoir (default 200)")
    g.add_argument("--ewc_lambda", type=float, help="ewc: weight of the penalty lambda/2 sum F (theta-theta*)^2 "
                   "(default 100)")
    g.add_argument("--ewc_gamma", type=float, help="ewc: decay of the running Fisher, online EWC (default 1.0)")
    g.add_argument("--der_alpha", type=float, help="der: weight of the MSE to the stored logits (default 0.1)")
    g.add_argument("--der_beta", type=float, help="der: weight of the replayed samples' loss (default 0.5)")
    g.add_argument("--lwf_lambda", type=float, help="lwf: weight of the distillation term (default 1.0)")
    g.add_argument("--lwf_temperature", type=float, help="lwf: distillation temperature (default 2.0)")
    g.add_argument("--olora_lambda", type=float, help="olora: weight of the orthogonality loss (default 0.5)")
    g.add_argument("--l2p_pool_size", type=int, help="l2p: key/prompt pairs in the pool (default 10)")
    g.add_argument("--l2p_top_k", type=int, help="l2p: prompts chosen per image (default 5)")
    g.add_argument("--l2p_prompt_length", type=int, help="l2p: prefix tokens per prompt and block (default 5)")
    g.add_argument("--l2p_pull_weight", type=float, help="l2p: weight of the key-pull loss (default 0.1)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="deterministic algorithms (default on)")
    p.add_argument("--feature_cache", choices=CHOICES["feature_cache"],
                   help="keep each training image's frozen encoder prefix from epoch 1 for the later epochs (same "
                        "results, less compute): auto (default: on the GPU if it fits beside the training step, "
                        "else pinned host memory), device, cpu, or off (recompute every epoch, as the release)")
    p.add_argument("--cache_budget_gb", type=float,
                   help="cap on the feature cache in GB; images beyond it are recomputed every epoch (default: "
                        "half the available host memory, or what fits on the GPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run (from its last finished domain and saved epoch), or add "
                        "domains to a finished one with a longer --order (the run's own settings are kept)")


def explicit_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The Config settings the user typed on the command line."""
    known = set(Config.__dataclass_fields__)
    return {k: v for k, v in vars(args).items() if k in known and v is not None}


def config_from_args(args: argparse.Namespace, default_config: Optional[str] = None,
                     flags: Optional[Dict[str, str]] = None) -> Config:
    known = set(Config.__dataclass_fields__)
    overrides: Dict[str, Any] = {k: v for k, v in vars(args).items() if k in known}
    with explained_errors():
        return load_config(args.config or default_config, overrides, flags)


def parse_device(device: str) -> "torch.device":
    """--device as a torch device: cpu or cuda[:N] (what the package runs on)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {device!r} is not a device this package runs on: use cpu, cuda or cuda:N")
    return dev


def resolve_device(cuda: Optional[int], device: Optional[str]) -> "torch.device":
    """--cuda -1 under torchrun joins the process group (one GPU per process, or Gloo on the CPU
    with --device cpu or without CUDA); otherwise --device wins, --cuda N is GPU N, default GPU 0 or CPU."""
    import torch

    from . import distributed

    if cuda is not None and cuda < -1:
        raise CLIError(f"--cuda {cuda} is not a GPU index (use 0, 1, ... or -1 for torchrun)")
    if distributed.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and cuda != -1:
        raise CLIError("launched by torchrun with several processes: pass --cuda -1 (distributed training)")
    if device and cuda != -1:
        dev = parse_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {device} needs CUDA, but no CUDA GPU is visible; use --device cpu")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        return dev
    if cuda is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if cuda == -1:
        if not distributed.launched_by_torchrun():
            raise CLIError("--cuda -1 selects distributed training, which must be launched with torchrun "
                           "(e.g. torchrun --nproc_per_node 4 train.py ... --cuda -1). For one GPU pass --cuda 0; "
                           "for the CPU pass --device cpu.")
        return distributed.init(prefer_cuda=device is None or parse_device(device).type == "cuda")
    if not torch.cuda.is_available():
        raise CLIError(f"--cuda {cuda} needs a CUDA GPU, but none is visible; use --device cpu")
    if cuda >= torch.cuda.device_count():
        raise CLIError(f"--cuda {cuda}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(f"cuda:{cuda}")


def chosen_family(argv: Optional[list], family: str) -> str:
    """The backbone family a script runs: ``--backbone`` if given, else the script's own (train.py and
    test.py: sam; train_SAM2.py and test_SAM2.py: sam2), so each pair is one script and an alias."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backbone", choices=CHOICES["backbone"])
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.backbone or family
