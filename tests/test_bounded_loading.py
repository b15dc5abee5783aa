"""Bounded loading (samcl/bounded.py): a zip bomb, stride-0 and oversized tensors, directories and
symlink loops are refused by name before torch.load reads them, in bounded memory."""
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch

from samcl.learning_modules.augmodule import AugModule, AugModuleSpec
from samcl.bounded import MAX_PICKLE_BYTES, check_torch_file
from samcl.io import load_tagged
from samcl.release.convert import _release_pickle_module, release_dict
from samcl.release.folder import read_release_module
from samcl.release.unpickle import ReleaseFormatError
from samcl.run_folder import RunFolderError
from tests.conftest import REPO

INFLATED = 1536 << 20  # what the bomb's storage record inflates to: 1.5 GiB


def torch_zip_members(obj) -> "OrderedDict[str, bytes]":
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as zf:
        return OrderedDict((n, zf.read(n)) for n in zf.namelist())


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A torch checkpoint of about 1.5 MB whose one storage record inflates to 1.5 GiB of zeros."""
    path = tmp_path_factory.mktemp("bomb") / "Kvasir.pth"
    members = torch_zip_members({"w": torch.zeros(1)})
    storage = next(n for n in members if n.endswith("/data/0"))
    chunk = bytes(16 << 20)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            if name != storage:
                zf.writestr(name, data)
        with _deflated(zf, storage) as f:  # streamed: never 1.5 GiB in memory here
            for _ in range(INFLATED // len(chunk)):
                f.write(chunk)
    assert path.stat().st_size < 2 << 20
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo(storage).file_size == INFLATED
    return path


def _deflated(zf: zipfile.ZipFile, name: str):
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    return zf.open(info, "w")


class _Tensor:
    """Pickles as a tensor of any shape and strides over ``storage`` (what a crafted file holds)."""

    def __init__(self, storage, size, stride) -> None:
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False, OrderedDict())


def crafted_release_module(path, size, stride, features):
    """A release module whose A is a Linear(features -> features) over a 4-element storage."""
    d = release_dict(AugModule(AugModuleSpec(8, (1,), (8, 4), 2)), "sam")
    a = d["A"]
    a.in_features = a.out_features = features
    with warnings.catch_warnings():  # a typed storage pickles as torch.FloatStorage, as the release's do
        warnings.simplefilter("ignore", UserWarning)
        a._parameters["weight"] = _Tensor(torch.zeros(4).storage(), size, stride)
    torch.save(d, path, pickle_module=_release_pickle_module)
    return path


def test_the_bomb_is_refused_from_its_header_naming_the_file(bomb):
    with pytest.raises(ValueError, match=r"refused module file .*Kvasir\.pth: its zip members declare "
                                         r"1,610,6\d\d,\d{3} bytes uncompressed.*zip bomb"):
        check_torch_file(bomb, "module file")
    with pytest.raises(RunFolderError, match="Kvasir.pth.*zip bomb"):
        load_tagged(bomb, ("samcl-augmodule",), "module file", RunFolderError)
    with pytest.raises(ReleaseFormatError, match="Kvasir.pth.*zip bomb"):
        read_release_module(bomb)


def test_a_bombed_pickle_record_is_refused(tmp_path):
    path = tmp_path / "big_pickle.pth"
    with zipfile.ZipFile(path, "w") as zf, _deflated(zf, "archive/data.pkl") as f:
        for _ in range((MAX_PICKLE_BYTES >> 20) + 1):
            f.write(bytes(1 << 20))
    with pytest.raises(ValueError, match="big_pickle.pth"):
        check_torch_file(path)


@pytest.mark.parametrize("size,stride,problem", [
    ((100_000, 100_000), (0, 0), "stride-0 dimension"),
    ((100_000, 100_000), (1, 1), "is oversized"),
    ((8,), (1,), "is oversized"),  # reaches past the 4-element storage
])
def test_stride_0_and_oversized_tensors_are_refused_by_name(tmp_path, size, stride, problem):
    path = crafted_release_module(tmp_path / "camo.pth", size, stride, 100_000)
    with pytest.raises(ReleaseFormatError, match=rf"refused checkpoint .*camo\.pth: tensor \['A'\].* {problem}"):
        read_release_module(path)


def test_a_storage_larger_than_its_record_is_refused(tmp_path):
    members = torch_zip_members({"w": torch.zeros(1000)})
    storage = next(n for n in members if n.endswith("/data/0"))
    members[storage] = members[storage][:40]  # the pickle still claims 1000 floats
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(ValueError, match=r"short\.pth: tensor \['w'\] claims a storage of 1,000 elements"):
        check_torch_file(path)


def test_directories_symlink_loops_and_devices_are_refused_by_name(tmp_path):
    (tmp_path / "dir.pth").mkdir()
    os.symlink(tmp_path / "loop_b.pth", tmp_path / "loop_a.pth")
    os.symlink(tmp_path / "loop_a.pth", tmp_path / "loop_b.pth")
    for name, problem in (("dir.pth", "is a directory"), ("loop_a.pth", "is a symlink loop"),
                          ("none.pth", "not found")):
        with pytest.raises(ValueError, match=rf"{name} {problem}"):
            check_torch_file(tmp_path / name, "checkpoint")
    with pytest.raises(ValueError, match="/dev/zero is not a regular file"):
        check_torch_file("/dev/zero", "checkpoint")


def test_files_torch_saves_pass(tmp_path):
    for dtype in (torch.float32, torch.bfloat16, torch.uint16, torch.bool):
        base = torch.arange(24).to(dtype).reshape(4, 6)
        torch.save({"t": base, "view": base[1:, 2:], "row": base[2], "empty": base[:0],
                    "gen": torch.Generator().get_state(), "meta": [1, 2.5, "x", None]}, tmp_path / "ok.pt")
        check_torch_file(tmp_path / "ok.pt")


def test_the_backbone_checkpoint_is_checked_before_it_is_read(tmp_path, bomb):
    from samcl.config import load_config
    from samcl.pipeline import build_model

    cfg = load_config(None, {"vit_name": "vit_tiny", "ckpt": str(bomb)})
    with pytest.raises(ValueError, match="refused backbone checkpoint .*Kvasir.pth.*zip bomb"):
        build_model(cfg, torch.device("cpu"))
    (tmp_path / "ckpt_dir").mkdir()
    with pytest.raises(ValueError, match="backbone checkpoint .*ckpt_dir is a directory"):
        build_model(load_config(None, {"vit_name": "vit_tiny", "ckpt": str(tmp_path / "ckpt_dir")}),
                    torch.device("cpu"))


# ----------------------------------------------------------------------------- peak memory of the CLI
MEASURE = ("import json, resource, subprocess, sys\n"
           "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "print(json.dumps({'rc': r.returncode, 'stderr': r.stderr,\n"
           "                  'peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def inspect_release_file(folder, module_file):
    """`python -m samcl.release inspect` on a folder holding ``module_file`` as Kvasir.pth: exit
    status, stderr and the process's peak RSS (its own, read by a parent that ran nothing else)."""
    folder.mkdir()
    (folder / "Kvasir.pth").symlink_to(module_file)
    (folder / "Module_Selector.pth").write_bytes(b"unused: the module is read first")
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "samcl.release", "inspect",
                          str(folder), "--order", "Kvasir", "--unseen"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout)


def test_refusals_stay_in_bounded_memory(tmp_path, bomb):
    """The 1.5 MB bomb (1.5 GiB inflated) and a 100000 x 100000 stride-0 weight over 4 floats (which
    would have built a 40 GB AugModule) cost the CLI no more memory than a file of junk bytes."""
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    baseline = inspect_release_file(tmp_path / "junk", tmp_path / "junk.pth")
    assert baseline["rc"] == 2 and "junk" in baseline["stderr"]
    stride0 = crafted_release_module(tmp_path / "stride0.pth", (100_000, 100_000), (0, 0), 100_000)
    for name, path, needle in (("bomb", bomb, "zip bomb"), ("stride0", stride0, "stride-0")):
        res = inspect_release_file(tmp_path / name, path)
        lines = res["stderr"].splitlines()
        assert res["rc"] == 2 and len(lines) == 1 and "Kvasir.pth" in lines[0] and needle in lines[0], res["stderr"]
        assert res["peak_kb"] < baseline["peak_kb"] + 150 * 1024, (name, res["peak_kb"], baseline["peak_kb"])
