"""Restricted loading of the release's pickles: stand-ins for the authors' classes, allow-lists."""
import pickle
import pickletools
import re
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterator, List, Tuple, Type

import torch
from torch import nn

from ..bounded import TorchZip, check_torch_file
from ..run_folder import RunFolderError


class ReleaseFormatError(RunFolderError):
    """A release file is unreadable, malformed or does not fit the backbone; the message says what to do."""


class UnsafePickleError(ReleaseFormatError):
    """A checkpoint references a global outside the allow-list; it was not loaded."""


# ----------------------------------------------------------------------------- stand-ins
class ReleaseExtra(nn.Module):
    """Stand-in for the authors' ``module.SAMCL.Extra`` (SAM): holds ``layer``, ``norm``,
    ``upward``, ``upward_`` and the int ``cnt``. Never called; only its tensors are read."""

    release_global: Tuple[str, str] = ("module.SAMCL", "Extra")
    family = "sam"

    def __init__(self) -> None:
        super().__init__()
        self.cnt = 0


class ReleaseExtra2(ReleaseExtra):
    """Stand-in for the authors' ``module.SAMCL_2.Extra`` (SAM 2): ``layer``, ``norm`` and ``cnt``."""

    release_global = ("module.SAMCL_2", "Extra")
    family = "sam2"


EXTRA_CLASSES: Dict[str, Type[ReleaseExtra]] = {"sam": ReleaseExtra, "sam2": ReleaseExtra2}

# ----------------------------------------------------------------------------- allow-lists
_STORAGES = frozenset(f"torch.{t}Storage" for t in
                      ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool"))
SELECTOR_GLOBALS: FrozenSet[str] = frozenset({"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"}) | _STORAGES
MODULE_GLOBALS: FrozenSet[str] = SELECTOR_GLOBALS | frozenset({
    "builtins.set",
    "torch._utils._rebuild_parameter",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.normalization.LayerNorm",
    "module.SAMCL.Extra",
    "module.SAMCL_2.Extra",
})
# What torch's restricted unpickler is told it may rebuild beyond its built-in tensor support.
_TORCH_SAFE_GLOBALS: List[Any] = [
    nn.Linear,
    nn.LayerNorm,
    (ReleaseExtra, "module.SAMCL.Extra"),
    (ReleaseExtra2, "module.SAMCL_2.Extra"),
]


def pickle_globals(path: Path) -> List[str]:
    """Every global a torch zip checkpoint's pickle references, read statically (nothing runs).

    Dynamic lookups (STACK_GLOBAL, INST, OBJ) are reported as ``<OPCODE>``; torch's
    restricted unpickler does not support them, and neither does this loader.
    """
    data = TorchZip(Path(path), "checkpoint", ReleaseFormatError).pickle_bytes()
    found: List[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                module, name = str(arg).split(" ", 1)
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
                found.append(f"{module}.{name}")
            elif op.name in ("STACK_GLOBAL", "OBJ"):
                found.append(f"<{op.name}>")
    except Exception as e:  # malformed pickle stream
        raise ReleaseFormatError(f"{path}: its pickle is malformed ({e}); the file is corrupt") from None
    return found


def check_globals(path: Path, allowed: FrozenSet[str]) -> None:
    """Refuse ``path`` if its pickle references anything outside ``allowed`` (names file and globals)."""
    bad = sorted({g for g in pickle_globals(path) if g not in allowed})
    if bad:
        raise UnsafePickleError(
            f"refused to load {path}: it references {', '.join(bad)}, which is not on the allow-list of the SAMCL "
            f"release format ({', '.join(sorted(allowed - _STORAGES))} and tensor storages). It is not an authors' "
            f"release file or it has been tampered with: do not open it with torch.load(weights_only=False); "
            f"re-download the release checkpoints from the authors' repository instead.")


@contextmanager
def _allowed_in_torch() -> Iterator[None]:
    """Register the release classes with torch's restricted unpickler for the duration only
    (leaving entries the caller had registered before untouched)."""
    have = torch.serialization.get_safe_globals()
    missing = [g for g in _TORCH_SAFE_GLOBALS if g not in have]
    with torch.serialization.safe_globals(missing):
        yield


def torch_restricted_load(path: Path) -> Any:
    """``torch.load(weights_only=True, map_location='cpu')`` with the release classes allowed.

    This is the second line of defence (:func:`restricted_load` scans first); its
    refusals are re-raised as :class:`UnsafePickleError` naming the file and the global.
    """
    path = Path(path)
    try:
        with _allowed_in_torch():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"unrecognized function (.+?)(?: which|$)", str(e), re.M)
        what = m.group(1) if m else str(e).strip().splitlines()[-1]
        raise UnsafePickleError(f"refused to load {path}: torch's restricted unpickler rejected {what}; it is not "
                                f"a release file of the expected kind. Do not open it with "
                                f"torch.load(weights_only=False).") from None
    except ReleaseFormatError:
        raise
    except Exception as e:
        raise ReleaseFormatError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                 f"; it is corrupt or truncated: re-download it") from None


def restricted_load(path: Path, allowed: FrozenSet[str] = MODULE_GLOBALS) -> Any:
    """Load a release checkpoint safely: static allow-list scan, bounded size checks
    (:mod:`samcl.bounded`), then torch's restricted unpickler."""
    path = Path(path)
    if not path.is_file() and not path.is_symlink():
        raise ReleaseFormatError(f"{path} not found")
    check_globals(path, allowed)
    check_torch_file(path, "checkpoint", ReleaseFormatError)
    return torch_restricted_load(path)


