"""safetensors run folders: the same numbers as the .pth ones, opened without a pickle, checked by
the checksums and in bounded memory; run folders written before (.pth) still test, resume in
their own format and export."""
import json
import pickle
import shutil
import struct
import tracemalloc

import pytest
import safetensors.torch
import torch

from samcl import bounded, pipeline, run_state
from samcl.compare import summarise
from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from samcl.io import load_tagged, read_tagged
from samcl.predictor import SAMCLPredictor
from samcl.release.convert import export
from samcl.release.folder import read_release_module, read_release_selector
from samcl.run_folder import MANIFEST, METRICS_FILE, RunFolderError, sha256_file

CPU = torch.device("cpu")
WEIGHT_FILES = {".safetensors", ".pth"}


def weight_files(run):
    """Relative names of the run folder's module, selector and buffer files, without their suffix."""
    return sorted(p.relative_to(run).with_suffix("").as_posix() for p in run.rglob("*") if p.suffix in WEIGHT_FILES)


def written_before_safetensors(run):
    """A .pth run folder as the code before safetensors left it: its run.json names no weight format."""
    manifest = json.loads((run / MANIFEST).read_text())
    assert manifest.pop("weights") == "pth"
    (run / MANIFEST).write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same seeded tiny run (SAMCL on a tiny SAM, polyp then the unseen natural) written as
    safetensors and as .pth."""
    root = tmp_path_factory.mktemp("safetensors")
    make_demo_data(root, n_train=4, n_test=2)
    out = {}
    for weights in ("safetensors", "pth"):
        cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {
            "data_root": str(root), "run_dir": str(root / weights), "epoch": 2, "num_embedding": 2,
            "batch_size": 2, "eval_batch_size": 2, "selector_epochs": 2, "val_every": 1, "order": "polyp_natural",
            "unseen": ["natural"], "num_workers": 0})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run_state, "WEIGHTS", weights)
            pipeline.train(cfg, CPU)
        out[weights] = (root / weights, cfg)
    written_before_safetensors(root / "pth")
    return out


def copy_of(runs, weights, dst):
    shutil.copytree(runs[weights][0], dst)
    return dst, runs[weights][1]


def same_files(a, b):
    """Every weight file of run folder ``a`` and its twin in ``b`` hold the same settings and
    bit-identical tensors (same dtype, shape and bytes)."""
    names = weight_files(a)
    assert names == weight_files(b) and names
    suffix = {run: next(p.suffix for p in run.rglob("*") if p.suffix in WEIGHT_FILES) for run in (a, b)}
    for name in names:
        x, y = (read_tagged(run / f"{name}{suffix[run]}", "weights file") for run in (a, b))
        assert x.keys() == y.keys(), name
        for k in x:
            tx, ty = tensors_of(x[k]), tensors_of(y[k])
            if tx is None:  # a setting: the same once both are JSON (a .pth keeps tuples)
                assert ty is None and json.loads(json.dumps(x[k])) == json.loads(json.dumps(y[k])), (name, k)
                continue
            assert tx.keys() == ty.keys(), (name, k)
            for t in tx:
                assert tx[t].dtype == ty[t].dtype and torch.equal(tx[t], ty[t]), (name, k, t)


def tensors_of(value):
    """A tensor or a dict of them as a dict of tensors (None: not tensors)."""
    if isinstance(value, torch.Tensor):
        return {"": value}
    if isinstance(value, dict) and value and all(isinstance(t, torch.Tensor) for t in value.values()):
        return value
    return None


def test_a_safetensors_run_folder_holds_the_pth_ones_tensors_bit_exactly_and_tests_the_same(runs):
    (st, cfg), (pth, _) = runs["safetensors"], runs["pth"]
    assert weight_files(st) == ["Module_Selector", "embedding_buffer/natural", "embedding_buffer/polyp", "polyp",
                                "selector/after_natural", "selector/after_polyp"]
    assert not list(st.rglob("*.pth")) and not list(pth.rglob("*.safetensors"))
    manifest = json.loads((st / MANIFEST).read_text())
    assert manifest["weights"] == "safetensors" and manifest["modules"] == {"polyp": "polyp.safetensors"}
    assert manifest["selector"] == "Module_Selector.safetensors" and "polyp.safetensors" in manifest["files"]
    same_files(st, pth)
    # the spec travels as JSON in the header, readable without this project
    from safetensors import safe_open

    with safe_open(st / "polyp.safetensors", framework="pt") as f:
        tag = json.loads(f.metadata()["samcl"])
        assert tag["format"] == "samcl-augmodule" and tag["spec"]["rank"] == cfg.rank
        assert "state_dict/A.weight" in f.keys()
    steps = [json.loads((run / METRICS_FILE).read_text())["steps"] for run in (st, pth)]
    for a, b in zip(*steps):
        assert {k: v for k, v in a.items() if k not in ("seconds", "training_seconds", "storage")} == \
            {k: v for k, v in b.items() if k not in ("seconds", "training_seconds", "storage")}
    reports = [pipeline.test(run, cfg, CPU, with_vanilla=False, output=run.parent / f"{run.name}_test.json")
               for run in (st, pth)]
    assert reports[0]["results"] == reports[1]["results"]


def refuse_pickles(monkeypatch):
    """Every way this process could read a pickle raises."""
    def refused(*args, **kwargs):
        raise AssertionError("a pickle was read")

    class Refused(pickle.Unpickler):
        __init__ = refused

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, refused)
    monkeypatch.setattr(pickle, "Unpickler", Refused)
    monkeypatch.setattr(bounded._DryRun, "__init__", refused)  # the bounded checks' dry run of a .pth


def test_opening_a_safetensors_run_folder_reads_no_pickle(runs, monkeypatch, tmp_path):
    (st, cfg), (pth, _) = runs["safetensors"], runs["pth"]
    refuse_pickles(monkeypatch)
    model = pipeline.load_run(st, cfg, CPU)
    assert model.domains == ["polyp", "natural"] and model.module_for("polyp") is not None
    report = pipeline.test(st, cfg, CPU, output=tmp_path / "test_metrics.json")
    assert report["results"]["polyp"]["trained"]
    predictor = SAMCLPredictor.from_run(st, device="cpu")
    predictor.set_image(torch.zeros(40, 60, 3, dtype=torch.uint8).numpy())
    masks, scores, low = predictor.predict([[10, 10]], [1])
    assert masks.shape == (3, 40, 60) and scores.shape == (3,) and low.shape[0] == 3
    with pytest.raises(AssertionError, match="a pickle was read"):  # the guard is real: a .pth folder trips it
        pipeline.load_run(pth, cfg, CPU)


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampering_with_a_safetensors_file_is_refused_by_the_checksums(runs, tmp_path):
    run, cfg = copy_of(runs, "safetensors", tmp_path / "run")
    flip_byte(run / "polyp.safetensors", -5)  # a tensor's bytes: still a valid file, other numbers
    with pytest.raises(RunFolderError, match=r"polyp\.safetensors \(checksum mismatch: truncated or modified\)"):
        pipeline.load_run(run, cfg, CPU)
    shutil.copy(runs["safetensors"][0] / "polyp.safetensors", run / "polyp.safetensors")
    flip_byte(run / "selector/after_natural.safetensors", 20)  # its header (metadata)
    with pytest.raises(RunFolderError, match=r"selector/after_natural\.safetensors \(checksum mismatch"):
        pipeline.load_run(run, cfg, CPU)
    shutil.copy(runs["safetensors"][0] / "selector/after_natural.safetensors", run / "selector/after_natural.safetensors")
    flip_byte(run / "embedding_buffer/polyp.safetensors", -1)
    with pytest.raises(RunFolderError, match=r"embedding_buffer/polyp\.safetensors \(checksum mismatch"):
        pipeline.resume(run, {"order": "polyp_natural_shadow"}, CPU)
    assert not (run / "shadow.safetensors").exists()


# ----------------------------------------------------------------------------- crafted files
def safetensors_file(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
CRAFTED = {
    "huge-header": (lambda p: p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}"),
                    r"its header declares 4,611,686,018,427,387,904 bytes but the file holds 10"),
    "past-the-end": (lambda p: safetensors_file(p, {"w": {"dtype": "F32", "shape": [100_000, 100_000],
                                                          "data_offsets": [0, 40_000_000_000]}}, bytes(16)),
                     r"tensor 'w' lies past the end of the file \(bytes 0\.\.40,000,000,000 of a data section of 16\)"),
    "shape-over-span": (lambda p: safetensors_file(p, {"w": {**F32, "shape": [100_000, 100_000]}}, bytes(16)),
                        r"tensor 'w' claims shape \[100000, 100000\] of F32 \(40,000,000,000 bytes\) but spans 16"),
    "overlap": (lambda p: safetensors_file(p, {"a": F32, "b": F32}, bytes(16)), r"tensors 'a' and 'b' overlap"),
    "dtype": (lambda p: safetensors_file(p, {"w": {**F32, "dtype": "F128"}}, bytes(16)), r"unknown dtype 'F128'"),
    "not-json": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), r"header is not JSON"),
    "short": (lambda p: p.write_bytes(b"\x01\x02"), r"is not a safetensors file"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_safetensors_header_is_refused_by_name_in_bounded_memory(case, tmp_path, monkeypatch):
    make, message = CRAFTED[case]
    path = tmp_path / "Kvasir.safetensors"
    make(path)
    monkeypatch.setattr(safetensors.torch, "load", lambda *a: pytest.fail("the safetensors reader saw a crafted file"))
    tracemalloc.start()
    try:
        with pytest.raises(RunFolderError, match=rf"Kvasir\.safetensors.*{message}"):
            load_tagged(path, ("samcl-augmodule",), "module file", RunFolderError)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_a_header_longer_than_the_cap_is_refused_unread(tmp_path, monkeypatch):
    path = safetensors_file(tmp_path / "big.safetensors", {"w": F32, "__metadata__": {"pad": "x" * 200}}, bytes(16))
    monkeypatch.setattr(bounded, "MAX_SAFETENSORS_HEADER", 100)
    with pytest.raises(ValueError, match=r"refused file .*big\.safetensors: its header declares 2\d\d bytes, more than"):
        bounded.read_safetensors_file(path)


def test_a_crafted_module_with_matching_checksums_is_refused_by_name(runs, tmp_path):
    """Someone who rewrote both a module file and run.json's checksum still meets the bounded check."""
    run, cfg = copy_of(runs, "safetensors", tmp_path / "run")
    good = read_tagged(run / "polyp.safetensors", "module file")
    meta = {"samcl": json.dumps({k: ({} if k == "state_dict" else v) for k, v in good.items()})}
    safetensors_file(run / "polyp.safetensors", {"__metadata__": meta, "state_dict/A.weight": {
        "dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}, bytes(64))
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["files"]["polyp.safetensors"] = sha256_file(run / "polyp.safetensors")
    (run / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RunFolderError, match=r"refused module file .*polyp\.safetensors: tensor 'state_dict/A\.weight' "
                                             r"lies past the end"):
        pipeline.load_run(run, cfg, CPU)


def test_an_unknown_weight_format_in_run_json_is_refused(runs, tmp_path):
    run, cfg = copy_of(runs, "safetensors", tmp_path / "run")
    manifest = json.loads((run / MANIFEST).read_text())
    (run / MANIFEST).write_text(json.dumps({**manifest, "weights": "gguf"}))
    with pytest.raises(RunFolderError, match=r"run\.json names the weight format 'gguf', which this version does not"):
        pipeline.load_run(run, cfg, CPU)


# ----------------------------------------------------------------------------- run folders written before
def test_an_old_pth_run_folder_exports_tests_and_resumes_in_its_own_format(runs, tmp_path, capsys):
    old, cfg = copy_of(runs, "pth", tmp_path / "old")
    new, _ = copy_of(runs, "safetensors", tmp_path / "new")
    assert "weights" not in json.loads((old / MANIFEST).read_text())
    # export reads either format into the same release folder
    for run in (old, new):
        export(run, tmp_path / f"{run.name}_release")
    a, b = (read_release_module(tmp_path / f"{r}_release" / "polyp.pth").module.state_dict() for r in ("old", "new"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (read_release_selector(tmp_path / f"{r}_release" / "Module_Selector.pth").state_dict() for r in ("old", "new"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resume goes on in the folder's own format (one format per folder), with the same numbers
    capsys.readouterr()
    for run in (old, new):
        pipeline.resume(run, {"order": "polyp_natural_shadow"}, CPU)
    assert capsys.readouterr().out.count("written with .pth weight files: it goes on in that format") == 1
    assert not list(old.rglob("*.safetensors")) and (old / "shadow.pth").is_file()
    manifest = json.loads((old / MANIFEST).read_text())
    assert manifest["weights"] == "pth" and manifest["selector"] == "Module_Selector.pth"
    assert {"shadow.pth", "embedding_buffer/shadow.pth", "selector/after_shadow.pth"} <= set(manifest["files"])
    same_files(old, new)
    reports = [pipeline.test(run, cfg, CPU, with_vanilla=False, output=tmp_path / f"{run.name}.json")
               for run in (old, new)]
    assert reports[0]["results"] == reports[1]["results"] and reports[0]["results"]["shadow"]["trained"]


def test_compare_sizes_an_old_folder_without_recorded_storage_from_its_pth_files(runs, tmp_path):
    run, _ = copy_of(runs, "pth", tmp_path / "old")
    metrics = json.loads((run / METRICS_FILE).read_text())
    for step in metrics["steps"]:
        del step["storage"]  # written before storage was recorded
    (run / METRICS_FILE).write_text(json.dumps(metrics))
    stored = sum((run / f).stat().st_size for f in ("polyp.pth", "embedding_buffer/polyp.pth",
                                                    "selector/after_polyp.pth"))
    assert summarise(run)["stored_mb_per_domain"] == pytest.approx(stored / 1024**2)
