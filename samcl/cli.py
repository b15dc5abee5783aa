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
import typing
from contextlib import contextmanager
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, NoReturn, Optional

from .config import (CHOICES, CONFIG_DIR, DEFAULT_CONFIG, FAMILY_NAMES, MODULE_ALIASES, SCRIPTS, SETTING_TYPES,
                     SETTINGS_META, Config, load_config, read_config_file)
from .settings import describe_default, registered_names

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
    """The exception's message and its notes (:func:`samcl.io.add_note`) on one line, "; " between."""
    return "; ".join(" ".join(part.split()) for part in [str(e), *getattr(e, "__notes__", [])])


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
    """argparse with a one-line error (no usage block) that ends the script as every other refusal,
    and flags matched exactly: no prefix abbreviations (``--selector`` is not ``--selector_epochs``,
    and a flag added later cannot change what an old abbreviated command means)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see {self.prog} --help)")


def flag_names(p: argparse.ArgumentParser) -> Dict[str, str]:
    """Setting -> the flag that sets it (test.py's --batch_size sets eval_batch_size)."""
    return {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}


def check_module_family(module: Optional[str], family: str, kind: str) -> None:
    """--module must be one the script's backbone family runs (CAD and SAMCL: SAM; SAMCL_2: SAM 2.1)."""
    if module is not None and MODULE_ALIASES[module].backbone != family:
        right = MODULE_ALIASES[module].backbone
        raise CLIError(f"--module {module} runs on the {FAMILY_NAMES[right]} backbone, but {SCRIPTS[family, kind]} "
                       f"is the {FAMILY_NAMES[family]} script: use {SCRIPTS[right, kind]}")


def declared_defaults() -> Dict[str, Any]:
    """Each setting's default as declared."""
    return {f.name: (f.default_factory() if f.default is MISSING else f.default) for f in fields(Config)}


def family_defaults(family: str) -> Dict[str, Any]:
    """What each setting is when no flag gives it: the family's default recipe over the declared
    defaults (what ``--help`` states; a script with ``--module CAD`` starts from CAD's recipe)."""
    return {**declared_defaults(), **read_config_file(str(DEFAULT_CONFIG[family]))}


def _group(p: argparse.ArgumentParser, title: str) -> Any:
    """The parser's argument group ``title``, made on first use (one block of --help per group)."""
    for g in p._action_groups:
        if g.title == title:
            return g
    return p.add_argument_group(title)


def _flag_options(name: str, default: Any) -> Dict[str, Any]:
    """argparse options of setting ``name``, from its declaration: type, choices, list, on/off."""
    hint, m = SETTING_TYPES[name], SETTINGS_META[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    inner = args[0] if typing.get_origin(hint) is typing.Union else hint
    help_text = m.help.format(methods=", ".join(registered_names("register_method")),
                              modules=", ".join(registered_names("register_learning_module")))
    if default is not None:
        help_text += f" (default: {describe_default(default)})"
    options: Dict[str, Any] = {"help": help_text.replace("%", "%%"), "default": None}
    if inner is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(inner) is list:
        options.update(nargs="*", type=typing.get_args(inner)[0], metavar=name.upper())
    else:
        options["type"] = inner
    if m.choices is not None:
        options["choices"] = m.choices
    return options


def add_setting_flags(p: argparse.ArgumentParser, scope: str, family: str = "sam") -> None:
    """A flag ``--<name>`` for every setting of ``scope`` ("common": train and test scripts; "train"),
    grouped as declared, with the help, type, choices and default of its declaration."""
    defaults = family_defaults(family)
    for name, m in SETTINGS_META.items():
        if m.scope == scope:
            _group(p, m.group).add_argument(f"--{name}", **_flag_options(name, defaults[name]))


def settings_reference() -> str:
    """docs/settings.md: every setting's flag, default (train.py's; "derived": decided at run time),
    scripts and meaning, grouped as declared (tests/test_settings.py keeps the page equal to this)."""
    sam, sam2 = family_defaults("sam"), family_defaults("sam2")
    lines = ["# Settings", "",
             "Every setting of a run, generated from the declarations (`samcl/config.py` for the core ones, each "
             "method's and learning module's own file for theirs). Each is a flag of the training scripts "
             "(`--name`), a line of a YAML recipe (`name: value`) and a field of `run.json`'s config; the "
             "*common* ones are flags of the test scripts too. Defaults are `train.py`'s "
             "(`configs/samcl_vit_b.yaml`); where the SAM 2.1 scripts' differ, both are given. "
             "`python train.py --help` says the same.", ""]
    groups: Dict[str, list] = {}
    for name, m in SETTINGS_META.items():
        groups.setdefault(m.group, []).append(name)
    for group, names in groups.items():
        lines += [f"## {group}", "", "| flag | default | scripts | meaning |", "|---|---|---|---|"]
        for name in names:
            m = SETTINGS_META[name]
            default = "derived" if sam[name] is None else f"`{describe_default(sam[name])}`"
            if sam2[name] != sam[name]:
                default += f" (SAM 2.1: `{describe_default(sam2[name])}`)"
            what = _flag_options(name, None)["help"].replace("%%", "%").replace("|", "\\|").replace("<", "\\<")
            if m.choices is not None:
                what += "; one of " + ", ".join(f"`{c}`" for c in m.choices)
            lines.append(f"| `--{name}` | {default} | {'train, test' if m.scope == 'common' else 'train'} | "
                         f"{what} |")
        lines.append("")
    return "\n".join(lines)


def add_setting_flag(p: argparse.ArgumentParser, name: str, *, with_default: bool = False,
                     help: Optional[str] = None) -> None:
    """The flag of one setting on a script that takes a few (generate_point.py, predict.py): the
    declaration's type, choices and help (``help`` instead, where the script reads the setting
    differently). ``with_default``: the declared default is the flag's own (else None: absent)."""
    default = declared_defaults()[name] if with_default else None
    options = _flag_options(name, default)
    if help is not None:
        options["help"] = help.replace("%", "%%")
    p.add_argument(f"--{name}", **{**options, "default": default})


def add_common_flags(p: argparse.ArgumentParser, family: str = "sam") -> None:
    """Flags of train.py / test.py (family "sam") and train_SAM2.py / test_SAM2.py ("sam2"): the
    common settings, the recipe and the device. ``family`` only picks the defaults --help states."""
    default = DEFAULT_CONFIG[family].relative_to(CONFIG_DIR.parent)
    p.add_argument("--config", help=f"YAML recipe of settings (default: {default}); flags override it")
    p.add_argument("--cuda", type=int,
                   help="GPU index (e.g. 0); -1 means distributed training under torchrun. Default: GPU 0 if "
                        "available, else CPU")
    p.add_argument("--device", help="explicit torch device, e.g. cpu or cuda:1 (overrides --cuda)")
    add_setting_flags(p, "common", family)


def add_train_flags(p: argparse.ArgumentParser, family: str = "sam") -> None:
    """The training scripts' own: every training setting (the methods' and learning modules' too),
    --overwrite and --resume."""
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run (from its last finished domain and saved epoch), or add "
                        "domains to a finished one with a longer --order (the run's own settings are kept)")
    add_setting_flags(p, "train", family)


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
