"""The authors' release checkpoint format (samcl/release/): safe loading, mapping, conversion, export.

Reads the released files from ../shared/reference (skips where absent). The
end-to-end tests run test.py / test_SAM2.py on the release folders with a seeded
random ViT-B / Hiera-T on the CPU over one sample image per domain (the ViT-B at a
512 input unless SAMCL_RELEASE_E2E_SIZE=1024; see E2E_SIZE).
"""
import json
import os
import re
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samcl.release import RELEASE_ORDER
from samcl.release.convert import _release_pickle_module, convert, export, release_dict, save_release_module
from samcl.release.folder import (check_fits, is_release_folder, module_files, read_release_folder, read_release_module,
                                  read_release_selector)
from samcl.release.unpickle import (MODULE_GLOBALS, ReleaseFormatError, UnsafePickleError, pickle_globals,
                                    restricted_load, torch_restricted_load)

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "reference"
RELEASE = REFERENCE / "samcl_release" / "checkpoint"
SAMPLE = REFERENCE / "samcl_sample"

COUNTED = {"SAM1": 61_304, "SAM2": 20_856}
SPECS = {"SAM1": (768, (7, 8, 9, 10, 11), (768, 256)), "SAM2": (384, (6, 7, 8, 9), None)}
FAMILY = {"SAM1": "sam", "SAM2": "sam2"}


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (it lives in ../shared/reference beside the repo)")
    return path


def release_dir(name: str) -> Path:
    return require(RELEASE / name)


def raw_release_tensors(path: Path) -> "OrderedDict[str, torch.Tensor]":
    """Every tensor of a release module file, keyed as in the file (``B_000.weight``, ``extra.upward.bias``)."""
    data = torch_restricted_load(path)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, obj in data.items():
        if isinstance(obj, nn.Module):
            for name, t in obj.state_dict().items():
                out[f"{key}.{name}"] = t
    return out


def our_key(release_key: str) -> str:
    """``B_003.weight`` -> ``B.3.weight``; ``extra.layer.bias`` and ``A.weight`` unchanged."""
    m = re.fullmatch(r"(B|norm1|norm2)_(\d{3})\.(.+)", release_key)
    return f"{m.group(1)}.{int(m.group(2))}.{m.group(3)}" if m else release_key


# ----------------------------------------------------------------------------- module files
@pytest.mark.parametrize("name", ["SAM1", "SAM2"])
def test_every_release_tensor_loads_bit_exactly(name):
    folder = release_dir(name)
    files = module_files(folder)
    assert sorted(files) == sorted(d for d in RELEASE_ORDER if d != "COCO")
    dim, layers, neck = SPECS[name]
    states = {}
    for domain, path in files.items():
        rm = read_release_module(path)
        assert rm.family == FAMILY[name]
        assert (rm.spec.dim, rm.spec.layers, rm.spec.neck_channels, rm.spec.rank) == (dim, layers, neck, 10)
        assert rm.module.counted_parameters() == COUNTED[name]
        ours = rm.module.state_dict()
        theirs = raw_release_tensors(path)
        mapped = {our_key(k): v for k, v in theirs.items()}
        assert set(mapped) == set(ours), (set(mapped) ^ set(ours))
        for k, v in mapped.items():
            assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), f"{path}: {k} differs"
        states[domain] = ours
    # the five domains are genuinely different modules (a mapping bug could load one file five times)
    a, b = states["Kvasir"], states["cod"]
    assert not torch.equal(a["B.0.weight"], b["B.0.weight"])


def test_counted_sizes_match_the_paper():
    for name in ("SAM1", "SAM2"):
        rm = read_release_module(release_dir(name) / "Kvasir.pth")
        assert rm.module.counted_parameters() == COUNTED[name]
    assert round(COUNTED["SAM1"] * 4 / 1024**2, 4) == 0.2339


def test_release_files_only_reference_allow_listed_globals():
    for name in ("SAM1", "SAM2"):
        for path in module_files(release_dir(name)).values():
            assert set(pickle_globals(path)) <= MODULE_GLOBALS


# ----------------------------------------------------------------------------- selector
def reference_mlp(state, x: torch.Tensor) -> torch.Tensor:
    """The release's selector MLP written out: Linear -> BN -> Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear (eval BN)."""

    def bn(h, i):
        s = {k: state[f"norm{i}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        return (h - s["running_mean"]) / torch.sqrt(s["running_var"] + 1e-5) * s["weight"] + s["bias"]

    def lin(h, i):
        return F.linear(h, state[f"layer{i}.weight"], state[f"layer{i}.bias"])

    h = bn(lin(x, 1), 1)
    h = F.relu(bn(lin(h, 2), 2))
    h = F.relu(bn(lin(h, 3), 3))
    return lin(h, 4)


@pytest.mark.parametrize("name,dim", [("SAM1", 768), ("SAM2", 384)])
def test_selector_loads_and_matches_a_plain_mlp(name, dim):
    path = release_dir(name) / "Module_Selector.pth"
    assert any(g == "torch.LongStorage" for g in pickle_globals(path))
    with zipfile.ZipFile(path) as zf:  # it was saved from CUDA: the map location matters
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert b"cuda" in pkl
    sel = read_release_selector(path)
    assert (sel.layer1.in_features, sel.num_domains, sel.training) == (dim, 6, False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in sel.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(32, dim, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        got = sel(x)
    want = reference_mlp(state, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(sel.route(x), want.argmax(1))


# ----------------------------------------------------------------------------- refusal
class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('echo pwned')",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "Kvasir.pth"
    torch.save({"extra": _Evil(f"echo pwned > {marker}"), "lora_layer": [7], "A": nn.Linear(768, 10)}, path)
    with pytest.raises(UnsafePickleError) as e:
        read_release_module(path)
    msg = str(e.value)
    assert str(path) in msg and ("posix.system" in msg or "os.system" in msg or "nt.system" in msg)
    # torch's own restricted unpickler (second line of defence) refuses it too
    with pytest.raises(UnsafePickleError) as e2:
        torch_restricted_load(path)
    assert str(path) in str(e2.value) and "system" in str(e2.value)
    assert not marker.exists()

    path2 = tmp_path / "camo.pth"
    torch.save({"extra": _EvalEvil()}, path2)
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        restricted_load(path2)


def test_a_tensor_only_file_with_a_foreign_class_is_refused(tmp_path):
    path = tmp_path / "Kvasir.pth"
    torch.save({"extra": nn.Conv2d(1, 1, 1)}, path)
    with pytest.raises(UnsafePickleError, match=r"Conv2d"):
        read_release_module(path)


def test_malformed_release_dict_is_named(tmp_path):
    rm = read_release_module(release_dir("SAM1") / "Kvasir.pth")
    d = release_dict(rm.module, "sam")
    del d["B_003"]
    path = tmp_path / "Kvasir.pth"
    torch.save(d, path, pickle_module=_release_pickle_module)
    with pytest.raises(ReleaseFormatError, match=r"lacks \['B_003'\]"):
        read_release_module(path)
    save_release_module(rm.module, "sam", path)
    assert read_release_module(path).spec == rm.spec
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(ReleaseFormatError, match="junk.pth"):
        read_release_module(tmp_path / "junk.pth")


# ----------------------------------------------------------------------------- backbone fit
@pytest.fixture(scope="module")
def vit_b():
    from samcl.backbones.sam import SAMBackbone, build_sam

    torch.manual_seed(0)
    sam, _ = build_sam("vit_b")
    return SAMBackbone(sam, "vit_b").eval()


def test_sam2_release_module_is_refused_by_a_vit_b_backbone(vit_b):
    rm = read_release_module(release_dir("SAM2") / "Kvasir.pth")
    with pytest.raises(ReleaseFormatError) as e:
        check_fits(rm, vit_b)
    msg = str(e.value)
    assert "Kvasir.pth" in msg and "SAM 2.1" in msg and "384" in msg and "sam/vit_b" in msg and "768" in msg
    ok = read_release_module(release_dir("SAM1") / "Kvasir.pth")
    check_fits(ok, vit_b)


def test_release_module_acts_through_the_backbone_hooks(vit_b):
    """Released tensors take effect in a windowed block, a global block and the neck; a zero module does not."""
    from samcl.learning_modules.augmodule import AugModule

    rm = read_release_module(release_dir("SAM1") / "Kvasir.pth")
    zero = AugModule(rm.spec)
    enc = vit_b.sam.image_encoder
    torch.manual_seed(1)
    # a 32 x 32 token grid (a 512 input) keeps this fast; every part accepts it (windows are padded,
    # global attention interpolates its relative positions, the neck is convolutional)
    tokens = torch.randn(1, 32, 32, 768) * 0.1
    heat = torch.zeros(1, 32, 32)
    heat[0, 5, 20] = 1.0
    parts = {"block 7 (windowed)": enc.blocks[7], "block 11 (global)": enc.blocks[11],
             "neck": lambda x: enc.neck(x.permute(0, 3, 1, 2))}
    with torch.no_grad():
        for name, part in parts.items():
            plain = part(tokens)
            with zero.attached(vit_b, heatmap=heat):
                assert torch.equal(part(tokens), plain), name
            with rm.module.attached(vit_b, heatmap=heat):
                assert not torch.allclose(part(tokens), plain), name


# ----------------------------------------------------------------------------- folders
@pytest.mark.parametrize("name", ["SAM1", "SAM2"])
def test_release_folder_detection_and_reading(name):
    folder = release_dir(name)
    assert is_release_folder(folder)
    rel = read_release_folder(folder)
    assert rel.order == list(RELEASE_ORDER) and rel.unseen == ["COCO"] and "COCO" not in rel.modules
    assert rel.family == FAMILY[name]
    with pytest.raises(ReleaseFormatError, match=r"6 outputs .* names 5 domains"):
        read_release_folder(folder, RELEASE_ORDER[:5], [])


@pytest.mark.parametrize("name", ["SAM1", "SAM2"])
def test_convert_round_trip_is_bit_exact(name, tmp_path):
    from samcl.io import read_tagged
    from samcl.run_folder import load_selector, read_manifest

    src = release_dir(name)
    dst = tmp_path / "converted"
    manifest = convert(src, dst, FAMILY[name])
    assert not is_release_folder(dst) and read_manifest(dst)["order"] == list(RELEASE_ORDER)
    assert manifest["unseen"] == ["COCO"] and sorted(manifest["modules"]) == sorted(module_files(src))
    assert manifest["weights"] == "safetensors" and not list(dst.rglob("*.pth"))  # it opens without a pickle
    for domain, path in module_files(src).items():
        rm = read_release_module(path)
        data = read_tagged(dst / f"{domain}.safetensors", "module file")  # converted: safetensors
        assert data["format"] == "samcl-augmodule" and data["backbone"]["family"] == FAMILY[name]
        assert data["release"]["cnt"] == rm.cnt
        ref = rm.module.state_dict()
        assert data["state_dict"].keys() == ref.keys()
        assert all(torch.equal(data["state_dict"][k], ref[k]) for k in ref)
    sel, domains = load_selector(dst / "Module_Selector.safetensors")
    orig = read_release_selector(src / "Module_Selector.pth").state_dict()
    assert domains == list(RELEASE_ORDER)
    assert all(torch.equal(v, orig[k]) for k, v in sel.state_dict().items())
    with pytest.raises(ReleaseFormatError, match="not empty"):
        convert(src, dst, FAMILY[name])
    other = "sam2" if FAMILY[name] == "sam" else "sam"
    with pytest.raises(ReleaseFormatError, match=f"pass --family {FAMILY[name]}"):
        convert(src, tmp_path / "x", other)


def test_open_with_reads_release_and_converted_folders_alike(tmp_path):
    """opening.open_with: a release folder (detected) and its converted run folder give the same model."""
    from samcl.config import Config
    from samcl.opening import open_with

    src, dst = release_dir("SAM1"), tmp_path / "converted"
    convert(src, dst, "sam")
    cfg = Config(random_weights=True, ckpt=None, output_dir=str(tmp_path / "out"))
    release, converted = open_with(src, cfg, torch.device("cpu")), open_with(dst, cfg, torch.device("cpu"))
    (man_r, out_r), (man_c, out_c) = (release.manifest, release.report_dir), (converted.manifest, converted.report_dir)
    assert man_r["format"] == "samcl-release" and out_r == tmp_path / "out" / "release_SAM1"
    assert man_c["format"] == "samcl-run" and out_c == dst
    assert (man_r["order"], man_r["unseen"]) == (man_c["order"], man_c["unseen"]) == (list(RELEASE_ORDER), ["COCO"])
    assert release.config.backbone == converted.config.backbone == "sam" and release.config.method == "samcl"
    assert (release.config.rank, release.config.order) == (converted.config.rank, converted.config.order)
    models = [release.model, converted.model]
    for model in models:
        assert model.domains == list(RELEASE_ORDER) and model.module_for("COCO") is None
        assert model.spec == read_release_module(src / "Kvasir.pth").spec
    for d in RELEASE_ORDER[:5]:
        a, b = models[0].module_for(d).state_dict(), models[1].module_for(d).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = models[0].selector.state_dict(), models[1].selector.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["SAM1", "SAM2"])
def test_export_round_trip_is_bit_exact(name, tmp_path):
    src = release_dir(name)
    conv, exp = tmp_path / "converted", tmp_path / "exported"
    convert(src, conv, FAMILY[name])
    info = export(conv, exp)
    assert is_release_folder(exp) and info["order"] == list(RELEASE_ORDER) and info["unseen"] == ["COCO"]
    for domain, path in module_files(src).items():
        out = exp / f"{domain}.pth"
        # the release's layout: same keys, same classes under the authors' names, same globals
        assert set(pickle_globals(out)) == set(pickle_globals(path))
        ours, theirs = torch_restricted_load(out), torch_restricted_load(path)
        assert list(ours) == list(theirs) and ours["lora_layer"] == theirs["lora_layer"]
        assert type(ours["extra"]) is type(theirs["extra"]) and ours["extra"].cnt == theirs["extra"].cnt
        for key in ours:
            if key != "lora_layer":
                assert type(ours[key]) is type(theirs[key])
        a, b = raw_release_tensors(out), raw_release_tensors(path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with zipfile.ZipFile(out) as zf:
            assert f"{domain}/data.pkl" in zf.namelist()
    sel = torch.load(exp / "Module_Selector.pth", map_location="cpu", weights_only=True)
    orig = torch.load(src / "Module_Selector.pth", map_location="cpu", weights_only=True)
    assert type(sel) is OrderedDict and list(sel) == list(orig)
    assert all(torch.equal(sel[k], orig[k]) for k in orig)


def test_exported_file_loads_in_the_authors_environment(tmp_path):
    """The authors' code does torch.load(path) with its own module.SAMCL on sys.path; emulate that
    in a child process on a file *we* wrote (never on a downloaded file)."""
    rm = read_release_module(release_dir("SAM1") / "Kvasir.pth")
    out = tmp_path / "Kvasir.pth"
    save_release_module(rm.module, "sam", out, cnt=rm.cnt)
    pkg = tmp_path / "authors" / "module"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "SAMCL.py").write_text("import torch.nn as nn\n\nclass Extra(nn.Module):\n    pass\n")
    code = "\n".join([
        "import sys, torch",
        f"sys.path.insert(0, {str(tmp_path / 'authors')!r})",
        f"d = torch.load({str(out)!r}, map_location='cpu', weights_only=False)",
        "import module.SAMCL",
        f"assert type(d['extra']) is module.SAMCL.Extra and d['extra'].cnt == {rm.cnt}",
        "assert isinstance(d['A'], torch.nn.Linear) and d['lora_layer'] == [7, 8, 9, 10, 11]",
        "assert d['extra'].upward(torch.randn(2, 10)).shape == (2, 768)",
        "print(repr(float(d['B_004'].weight.sum())))",
    ])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == repr(float(rm.module.B[4].weight.detach().sum()))


# ----------------------------------------------------------------------------- end to end
def _sample_subset(root: Path, per_domain: int = 1) -> Path:
    """A data root of symlinks to ``per_domain`` sample test images per domain (nothing copied)."""
    sample = require(SAMPLE)
    mapping = json.loads((sample / "datasets_test.json").read_text())
    for split in mapping.values():
        src = sample / split
        images = sorted((src / "images").iterdir())[:per_domain]
        masks = {p.stem: p for p in (src / "masks").iterdir() if p.name != "points.json"}
        points = json.loads((src / "masks" / "points.json").read_text())
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        keep = {}
        for img in images:
            mask = masks[img.stem]
            (root / split / "images" / img.name).symlink_to(img)
            (root / split / "masks" / mask.name).symlink_to(mask)
            keep[mask.name] = points[mask.name]
        (root / split / "masks" / "points.json").write_text(json.dumps(keep))
    (root / "datasets_test.json").write_text(json.dumps(mapping))
    return root


# Input side of the end-to-end tests. A 1024 ViT-B forward takes ~20 s per image on a 2-core CPU
# (2-4 minutes for the six images); at 512 the same seeded random ViT-B / Hiera-T (same widths and
# blocks: the release modules fit unchanged) runs several times faster. SAMCL_RELEASE_E2E_SIZE=1024
# runs the published size.
E2E_SIZE = os.environ.get("SAMCL_RELEASE_E2E_SIZE", "512")


def _run_release_test(script: str, folder: str, tmp_path: Path):
    """``script`` on the authors' ``folder`` + one sample image per domain, seeded random backbone, CPU."""
    data = _sample_subset(tmp_path / "data")
    report = tmp_path / "report.json"
    cmd = [sys.executable, script, "--run_dir", str(release_dir(folder)), "--data_root", str(data), "--random_weights",
           "--device", "cpu", "--no_vanilla", "--num_workers", "0", "--output_dir", str(tmp_path / "out"),
           "--output", str(report), "--img_size", E2E_SIZE]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(report.read_text())
    assert out["domains"] == list(RELEASE_ORDER) and out["unseen"] == ["COCO"]
    for d in RELEASE_ORDER:
        r = out["results"][d]
        assert r["trained"] is (d != "COCO")  # COCO has no module: routed there means vanilla SAM
        assert r["metrics"]["n"] == 1 and all(0.0 <= r["metrics"][m] <= 1.0 for m in ("iou", "f1", "mae"))
        assert list(r["selector_counts"]) == list(RELEASE_ORDER) and sum(r["selector_counts"].values()) == 1
        assert any(line.startswith(d) for line in res.stdout.splitlines()), res.stdout
    log_text = (tmp_path / "out" / f"release_{folder}" / "test_log.txt").read_text()
    assert "RANDOM WEIGHTS" in log_text  # logged while loading, before the log file could be opened
    assert "RANDOM WEIGHTS" in res.stdout + res.stderr
    return out


def test_test_py_runs_on_the_release_sam1_folder(tmp_path):
    out = _run_release_test("test.py", "SAM1", tmp_path)
    assert out["selector_domains"] == list(RELEASE_ORDER) and out["config"]["vit_name"] == "vit_b"


def test_test_sam2_py_runs_on_the_release_sam2_folder(tmp_path):
    out = _run_release_test("test_SAM2.py", "SAM2", tmp_path)
    assert out["config"]["backbone"] == "sam2"


@pytest.mark.parametrize("script,folder,wrong,right", [("test.py", "SAM2", "SAM 2.1 (Hiera)", "test_SAM2.py"),
                                                        ("test_SAM2.py", "SAM1", "SAM (ViT)", "test.py")])
def test_a_release_folder_of_the_other_family_is_refused_by_the_script(script, folder, wrong, right, tmp_path):
    cmd = [sys.executable, script, "--run_dir", str(release_dir(folder)), "--random_weights", "--device", "cpu",
           "--output_dir", str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert f"holds {wrong} modules" in res.stderr and f"test it with {right}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- export of a trained run
def test_export_of_a_trained_tiny_run_reads_back_and_tests(tmp_path):
    """train (tiny SAM, 2 domains, 1 epoch) -> export -> release folder: bit-exact, testable by pipeline.test."""
    from samcl import pipeline
    from samcl.learning_modules.augmodule import AugModuleSpec
    from samcl.config import CONFIG_DIR, load_config
    from samcl.demo import make_demo_data
    from samcl.io import read_tagged

    root = tmp_path / "demo"
    make_demo_data(root, n_train=4, n_test=2)
    cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(root), "output_dir": str(tmp_path / "log"), "order": "polyp_natural", "unseen": ["natural"],
        "epoch": 1, "num_embedding": 4, "batch_size": 2, "val_every": 0, "selector_epochs": 2})
    pipeline.train(cfg, torch.device("cpu"))
    run, exp = cfg.resolved_run_dir(), tmp_path / "exported"
    info = export(run, exp)
    assert info["order"] == ["polyp", "natural"] and info["unseen"] == ["natural"] and list(info["modules"]) == ["polyp"]
    assert is_release_folder(exp) and sorted(module_files(exp)) == ["polyp"]
    rm = read_release_module(exp / "polyp.pth")
    ours = read_tagged(run / "polyp.safetensors", "module file")
    assert rm.family == "sam" and rm.spec == AugModuleSpec.from_dict(ours["spec"])
    got = rm.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ours["state_dict"].items())
    # the exported folder is a release folder for test(): order from samcl_export.json, not from --order
    test_cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {"data_root": str(root), "output_dir": str(tmp_path / "t")})
    report = pipeline.test(exp, test_cfg, torch.device("cpu"), with_vanilla=False)
    assert report["domains"] == ["polyp", "natural"] and report["results"]["natural"]["trained"] is False
    assert (tmp_path / "t" / "release_exported" / "test_metrics.json").is_file()
