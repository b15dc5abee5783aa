"""Bounded checks of a checkpoint before it is read: torch zip files and safetensors files.

Every ``.pth``/``.pt`` a user hands us (backbone weights, the authors' release files,
the module, selector and buffer files of run folders written before safetensors, partial
files) is checked here first, in memory bounded by the caps below whatever the file claims:

1. it is a regular file (not a directory, device, FIFO or symlink loop);
2. the zip's central directory: every member's declared (uncompressed) size, whose
   sum may not exceed :data:`MAX_EXPANSION` times the file's size (``torch.save``
   stores members uncompressed, so a legitimate file declares about its own size;
   a zip bomb declares far more), and the pickle record (``data.pkl``) at most
   :data:`MAX_PICKLE_BYTES`;
3. a dry run of the pickle with stand-ins for every class and function (nothing is
   imported or called): each tensor storage must fit in its zip record, and each
   tensor in its storage, with no stride-0 dimension (a tiny storage posing as a
   huge tensor) and no more elements than its storage.

Only then does ``torch.load`` (``weights_only=True``) read the file.

A ``.safetensors`` file (this project's module, selector and buffer files) holds no pickle;
:func:`read_safetensors_file` checks its header before the safetensors reader sees it: the
declared header length against the file's size and :data:`MAX_SAFETENSORS_HEADER`, and
every tensor's dtype, shape and byte range against the file's data section (inside it,
exactly the shape's bytes, no two tensors overlapping), so reading allocates at most the
file's size.
"""
import errno
import io
import json
import math
import os
import pickle
import stat
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Tuple, Type

MAX_PICKLE_BYTES = 64 << 20  # a checkpoint's pickle holds names and shapes; the tensors are separate records
MAX_EXPANSION = 4  # declared uncompressed bytes per byte of file


def regular_file_size(path: Path, what: str, error: Type[Exception]) -> int:
    """Size of ``path``, refusing what is not a regular file (each named)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{what} {path} is a symlink loop, not a file") from None
        if e.errno == errno.ENOENT:
            raise error(f"{what} {path} not found") from None
        raise error(f"{what} {path} cannot be read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file")
    return st.st_size


class TorchZip:
    """A torch zip checkpoint whose headers passed the size checks; :meth:`pickle_bytes` reads
    its pickle record (bounded)."""

    def __init__(self, path: Path, what: str = "file", error: Type[Exception] = ValueError) -> None:
        self.path, self.what, self.error = Path(path), what, error
        size = regular_file_size(self.path, what, error)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise error(f"{what} {self.path} is not a torch zip checkpoint ({e}: corrupt, truncated, or saved in "
                        f"the legacy non-zip format); re-download it or re-save it with torch.save") from None
        self.members = {i.filename: i for i in infos}
        records = [n for n in self.members if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(records) != 1:
            raise error(f"{what} {self.path} is not a torch checkpoint (expected one data.pkl record, found "
                        f"{len(records)})")
        self.pickle_name = records[0]
        self.prefix = self.pickle_name[: -len("data.pkl")]
        declared = sum(i.file_size for i in infos)  # every member, repeated names included
        if declared > MAX_EXPANSION * size + (1 << 20):
            raise error(f"refused {what} {self.path}: its zip members declare {declared:,} bytes uncompressed, more "
                        f"than {MAX_EXPANSION}x the file's {size:,} bytes (a zip bomb, or not a file torch.save "
                        f"wrote); nothing was read")
        pkl = self.members[self.pickle_name].file_size
        if pkl > MAX_PICKLE_BYTES:
            raise error(f"refused {what} {self.path}: its pickle record declares {pkl:,} bytes, more than the "
                        f"{MAX_PICKLE_BYTES:,} a checkpoint needs; nothing was read")

    def pickle_bytes(self) -> bytes:
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.pickle_name) as f:
                return f.read(MAX_PICKLE_BYTES + 1)[:MAX_PICKLE_BYTES]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise self.error(f"{self.what} {self.path}: its pickle record is unreadable ({e}); the file is corrupt "
                             f"or truncated") from None

    def record_size(self, key: str) -> Optional[int]:
        info = self.members.get(f"{self.prefix}data/{key}")
        return None if info is None else info.file_size


# ----------------------------------------------------------------------------- dry run
class _Storage:
    def __init__(self, key: Any, itemsize: Optional[int], numel: Any) -> None:
        self.key, self.itemsize, self.numel = key, itemsize, numel


class _Tensor:
    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _StandIn:
    """Whatever a pickle names: records what it is given, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_StandIn":
        obj = super().__new__(cls)
        obj._parts = [args, kwargs]
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_StandIn":
        return _StandIn(args, kwargs)

    def __setstate__(self, state: Any) -> None:
        self._parts.append(state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._parts.append((key, value))

    def append(self, value: Any) -> None:
        self._parts.append(value)

    def extend(self, values: Any) -> None:
        self._parts.append(list(values))


# element size of the storage types torch.save names (torch.FloatStorage, ...)
_ITEMSIZE = {f"{t}Storage": n for n, types in {
    1: ("Byte", "Char", "Bool", "QUInt8", "QInt8", "QUInt4x2", "QUInt2x4", "Untyped", "Float8_e4m3fn", "Float8_e5m2"),
    2: ("Half", "BFloat16", "Short"), 4: ("Float", "Int", "QInt32"), 8: ("Double", "Long", "ComplexFloat"),
    16: ("ComplexDouble",)}.items() for t in types}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.itemsize = _ITEMSIZE.get(name)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> _Tensor:
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    return func(*args) if callable(func) else _StandIn(func, args)


_REBUILDERS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "collections.OrderedDict": OrderedDict,  # a plain container, as the real one
    "builtins.set": set,
    "builtins.frozenset": frozenset,
}


class _DryRun(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.tensors: List[_Tensor] = []
        self.bad_ids: List[str] = []
        self._classes: Dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _REBUILDERS:
            found = _REBUILDERS[full]
            if found is _rebuild_tensor:
                return self._record
            return found
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return _StorageType(name)
        return self._classes.setdefault(full, type(name, (_StandIn,), {}))

    def _record(self, *args: Any) -> _Tensor:
        t = _rebuild_tensor(*args) if len(args) >= 4 else _Tensor(None, 0, (), ())
        self.tensors.append(t)
        return t

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage"):
            _, stype, key, _location, numel = pid
            return _Storage(key, stype.itemsize if isinstance(stype, _StorageType) else None, numel)
        self.bad_ids.append(repr(pid)[:80])
        return _StandIn(pid)


def _names(root: Any) -> Dict[int, str]:
    """id(tensor) -> where it sits in the loaded object (``['state_dict']['A.weight']``), first path found."""
    out: Dict[int, str] = {}
    seen = set()
    stack: List[Tuple[Any, str]] = [(root, "")]
    while stack:
        obj, where = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _Tensor):
            out.setdefault(id(obj), where or "(the whole file)")
        elif isinstance(obj, dict):
            stack.extend((v, f"{where}[{k!r}]") for k, v in obj.items())
        elif isinstance(obj, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(obj))
        elif isinstance(obj, _StandIn):
            label = f"{where}<{type(obj).__name__}>"
            stack.extend((v, label) for v in obj._parts)
    return out


def _is_int_tuple(v: Any) -> bool:
    return isinstance(v, tuple) and all(type(i) is int for i in v)


def _tensor_problem(t: _Tensor, zf: TorchZip) -> Optional[str]:
    st = t.storage
    if not isinstance(st, _Storage):
        return "has no tensor storage"
    if st.itemsize is None or type(st.numel) is not int or st.numel < 0:
        return f"has a storage of an unknown type or size ({st.numel!r} elements)"
    record = zf.record_size(str(st.key))
    if record is None:
        return f"refers to storage record {st.key!r}, which the file lacks"
    if st.numel * st.itemsize > record:
        return (f"claims a storage of {st.numel:,} elements ({st.numel * st.itemsize:,} bytes) but its record "
                f"holds {record:,} bytes")
    if not (_is_int_tuple(t.size) and _is_int_tuple(t.stride) and type(t.offset) is int
            and len(t.size) == len(t.stride)):
        return "has a malformed shape"
    if t.offset < 0 or any(v < 0 for v in t.size + t.stride):
        return f"has a negative size, stride or offset (shape {t.size}, strides {t.stride}, offset {t.offset})"
    numel = math.prod(t.size)
    if numel == 0:
        return None
    if any(s == 0 and n > 1 for n, s in zip(t.size, t.stride)):
        return f"has a stride-0 dimension (shape {t.size}, strides {t.stride}): a small storage posing as a large tensor"
    # elements of the tensor's dtype against the storage's (a _rebuild_tensor_v3 storage counts bytes,
    # a bound looser by the element size, still within the file)
    end = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) + 1
    if end > st.numel or numel > st.numel:
        return (f"is oversized: shape {t.size} with strides {t.stride} and offset {t.offset} needs more than its "
                f"storage's {st.numel:,} elements")
    return None


def check_torch_file(path: Path, what: str = "file", error: Type[Exception] = ValueError) -> None:
    """Refuse (with ``error`` naming the file and the tensor) a torch zip checkpoint that could make
    ``torch.load`` read or allocate more than the file holds. Memory is bounded by the caps above."""
    zf = TorchZip(path, what, error)
    dry = _DryRun(zf.pickle_bytes())
    try:
        root = dry.load()
    except Exception as e:  # a malformed stream; the real load would fail too
        raise error(f"{what} {zf.path}: its pickle is malformed ({type(e).__name__}: {e}); the file is corrupt") \
            from None
    if dry.bad_ids:
        raise error(f"refused {what} {zf.path}: its pickle refers to {dry.bad_ids[0]}, which is not a tensor storage")
    names = None
    for t in dry.tensors:
        problem = _tensor_problem(t, zf)
        if problem:
            names = names if names is not None else _names(root)
            raise error(f"refused {what} {zf.path}: tensor {names.get(id(t), '(unreachable)')} {problem}; the file "
                        f"is corrupt or crafted, nothing was loaded")


# ----------------------------------------------------------------------------- safetensors
MAX_SAFETENSORS_HEADER = MAX_PICKLE_BYTES  # names, dtypes, shapes and offsets; the tensors follow it

# bytes per element of the dtypes the safetensors torch reader knows
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
                        "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                        "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _safetensors_problem(entry: Any, data_bytes: int) -> Optional[str]:
    """What is wrong with one tensor entry of a safetensors header (None: nothing)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return "has a malformed entry (no dtype, shape and data_offsets)"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_ITEMSIZE:
        return f"has an unknown dtype {str(dtype)[:20]!r}"
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        return "has a malformed shape"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return "has malformed data offsets"
    begin, end = offsets
    if end > data_bytes:
        return f"lies past the end of the file (bytes {begin:,}..{end:,} of a data section of {data_bytes:,})"
    need = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
    if need != end - begin:
        return f"claims shape {shape} of {dtype} ({need:,} bytes) but spans {end - begin:,} bytes"
    return None


def _safetensors_header(f: BinaryIO, size: int, path: Path, what: str, error: Type[Exception]) -> Dict[str, str]:
    """Check the header of the safetensors file open as ``f`` (of ``size`` bytes); its metadata."""
    head = f.read(8)
    if len(head) < 8:
        raise error(f"{what} {path} is not a safetensors file ({size} bytes, less than its header's length); "
                    f"it is corrupt or truncated")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise error(f"refused {what} {path}: its header declares {n:,} bytes but the file holds {size:,} "
                    f"(truncated or crafted); nothing was read")
    if n > MAX_SAFETENSORS_HEADER:
        raise error(f"refused {what} {path}: its header declares {n:,} bytes, more than the "
                    f"{MAX_SAFETENSORS_HEADER:,} a header needs; nothing was read")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{what} {path}: its safetensors header is not JSON ({type(e).__name__}); the file is corrupt") \
            from None
    if not isinstance(header, dict):
        raise error(f"{what} {path}: its safetensors header is not a JSON object; the file is corrupt")
    meta = header.pop("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise error(f"{what} {path}: its safetensors metadata is not a map of strings; the file is corrupt")
    data_bytes = size - 8 - n
    spans = []
    for name, entry in header.items():
        problem = _safetensors_problem(entry, data_bytes)
        if problem:
            raise error(f"refused {what} {path}: tensor {name[:80]!r} {problem}; the file is corrupt or crafted, "
                        f"nothing was loaded")
        spans.append((*entry["data_offsets"], name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise error(f"refused {what} {path}: tensors {first[:80]!r} and {second[:80]!r} overlap in the file "
                        f"(from byte {begin:,}); the file is corrupt or crafted, nothing was loaded")
    return meta


def read_safetensors_file(path: Path, what: str = "file",
                          error: Type[Exception] = ValueError) -> Tuple[Dict[str, str], bytes]:
    """(header metadata, the file's bytes) of a safetensors file, refusing (with ``error`` naming the
    file and the tensor) one whose header could make the reader read or allocate more than the file
    holds. The 8-byte length and the header are checked first, in memory bounded by the file's size
    and the cap above; only then is the rest read, from the same open file."""
    path = Path(path)
    size = regular_file_size(path, what, error)
    with open(path, "rb") as f:
        meta = _safetensors_header(f, size, path, what, error)
        f.seek(0)
        return meta, f.read(size)
