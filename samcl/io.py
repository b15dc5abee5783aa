"""Crash-safe file writes (a temporary file in the same folder, flushed, then renamed) and
restricted reads of the files this project writes. torch is imported by the functions that
need it (writing points.json needs none)."""
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Type

from .bounded import check_torch_file


def _atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    _atomic(path, lambda f: torch.save(obj, f), "wb")


def load_tagged(path: Path, formats: Collection[str], what: str, error: Type[Exception] = ValueError) -> Dict[str, Any]:
    """A file this project wrote, checked in bounded memory (:mod:`samcl.bounded`), then read with
    torch's restricted unpickler (``weights_only``); its ``format`` tag must be one of ``formats``.
    Failures raise ``error`` naming the file."""
    import torch

    check_torch_file(path, what, error)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(f"cannot read {what} {path} ({str(e).splitlines()[0]}); it is corrupt or truncated: "
                    f"restore it or recreate it") from None
    if not isinstance(data, dict) or data.get("format") not in formats:
        raise error(f"{path} is not a valid {what} written by this project")
    return data
