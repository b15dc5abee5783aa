"""Crash-safe file writes (a temporary file in the same folder, flushed, then renamed) and
restricted reads of the files this project writes.

A *tagged* file is a dict with a ``format`` tag, plain settings (version, kind, domain,
spec, ...) and tensors (each at the top level, or a dict of them such as a ``state_dict``).
Its name says how it is stored:

* ``.safetensors`` (what run folders are written in): the tensors under their names
  (``state_dict/<key>`` for a dict of them, ``<key>`` for one tensor), everything else as
  JSON in the header's metadata under :data:`TAG_KEY`. Reading it runs no pickle.
* ``.pth`` (run folders written before safetensors, which keep their format): ``torch.save``
  of the dict, read back with torch's restricted unpickler (``weights_only``).

Both are checked in bounded memory (:mod:`samcl.bounded`) before they are read, and read
back as the same dict. torch (and safetensors' torch half) is imported by the functions
that need it (writing points.json needs none).
"""
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Type

from .bounded import check_torch_file, read_safetensors_file

SAFETENSORS = ".safetensors"
TAG_KEY = "samcl"  # the safetensors metadata entry holding the file's JSON


# a write that failed for want of space: a full disk, a file-size limit, a quota
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class NoSpaceError(OSError):
    """A file could not be written for want of space; the message names the file and the free space.
    The file is as it was before (the write went to a temporary file, which is removed)."""


def add_note(e: BaseException, note: str) -> None:
    """Append ``note`` to what ``e`` says (``BaseException.add_note``, also on Python 3.10); the
    command line prints the message and its notes on one line."""
    e.__notes__ = [*getattr(e, "__notes__", []), note]


def free_space(folder: Path) -> str:
    """The free space of ``folder``'s file system, in words."""
    try:
        return f"{shutil.disk_usage(folder).free / 1024**2:,.1f} MB free"
    except OSError:
        return "free space unknown"


def _atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise NoSpaceError(e.errno, f"cannot write {path}: {e.strerror} ({free_space(path.parent)} on its "
                                        f"disk); the file is as it was before") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` of ``obj``, atomically. It is serialised in memory first: torch's writer turns
    the file's own errors (a full disk) into a RuntimeError that no longer says what happened."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic(path, lambda f: f.write(buffer.getbuffer()), "wb")


def save_tagged(obj: Dict[str, Any], path: Path) -> None:
    """Write the tagged file ``obj`` atomically, as ``path``'s suffix says (see the module docstring)."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    if Path(path).suffix != SAFETENSORS:
        atomic_torch_save(obj, path)
        return
    if any("/" in key for key in obj):
        raise ValueError(f"{path}: a tagged file's keys may not hold '/' ({list(obj)})")
    tag: Dict[str, Any] = {}
    tensors: Dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict) and value and all(isinstance(t, torch.Tensor) for t in value.values()):
            tag[key] = {}  # filled from the tensors named "<key>/..." when read
            tensors.update((f"{key}/{name}", t) for name, t in value.items())
        else:
            tag[key] = value
    data = safetensors_bytes({name: t.detach().cpu().contiguous() for name, t in tensors.items()},
                             metadata={TAG_KEY: json.dumps(tag)})
    _atomic(path, lambda f: f.write(data), "wb")


def read_tagged(path: Path, what: str, error: Type[Exception] = ValueError) -> Dict[str, Any]:
    """A tagged file, checked in bounded memory, then read (safetensors, or torch's restricted
    unpickler for ``.pth``). Failures raise ``error`` naming the file."""
    if Path(path).suffix == SAFETENSORS:
        return _read_safetensors(Path(path), what, error)
    import torch

    check_torch_file(path, what, error)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unreadable(path, what, e, error) from None


def _unreadable(path: Path, what: str, e: Exception, error: Type[Exception]) -> Exception:
    return error(f"cannot read {what} {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); it is "
                 f"corrupt or truncated: restore it or recreate it")


def _read_safetensors(path: Path, what: str, error: Type[Exception]) -> Dict[str, Any]:
    from safetensors.torch import load as safetensors_load

    meta, data = read_safetensors_file(path, what, error)
    try:
        tag = json.loads(meta[TAG_KEY])
    except (KeyError, ValueError, RecursionError):
        tag = None
    if not isinstance(tag, dict):
        raise error(f"{path} is not a valid {what} written by this project (no '{TAG_KEY}' metadata)")
    try:
        tensors = safetensors_load(data)  # tensors of their own memory, not a mapping of the file
    except Exception as e:
        raise _unreadable(path, what, e, error) from None
    holders = {key for key, value in tag.items() if value == {}}  # the dicts of tensors, empty in the JSON
    for name, t in tensors.items():
        key, nested, sub = name.partition("/")
        if nested and key in holders:
            tag[key][sub] = t
        elif not nested and key not in tag:
            tag[key] = t
        else:
            raise error(f"{path} is not a valid {what} written by this project (its tensor {name!r} has no place "
                        f"in its metadata)")
    return tag


def load_tagged(path: Path, formats: Collection[str], what: str, error: Type[Exception] = ValueError) -> Dict[str, Any]:
    """A tagged file this project wrote (:func:`read_tagged`) whose ``format`` tag is one of ``formats``."""
    data = read_tagged(path, what, error)
    if not isinstance(data, dict) or data.get("format") not in formats:
        raise error(f"{path} is not a valid {what} written by this project")
    return data
