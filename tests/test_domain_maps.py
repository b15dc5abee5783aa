"""The JSON domain maps: a relative map path is read under --data_root, a different map of the same
name in the current folder is refused by both absolute paths, and the demo, its --compare and the
sweep read their own data's maps whatever the current folder holds."""
import functools
import json
import os
from pathlib import Path

import pytest
import torch

from samcl import demo, sweep
from samcl.config import CONFIG_DIR, build_config
from samcl.data import DataError, domain_map_file, read_domain_map
from samcl.demo import make_demo_data

CPU = torch.device("cpu")
OTHER = {"Hospital": "data/Hospital/train"}  # a user's own map, in the folder the commands run from


@pytest.fixture
def cwd_with_maps(tmp_path, monkeypatch):
    """A current folder holding the user's own datasets_{train,test}.json (other domains than the demo's)."""
    here = tmp_path / "here"
    here.mkdir()
    for split in ("train", "test"):
        (here / f"datasets_{split}.json").write_text(json.dumps({"Hospital": f"data/Hospital/{split}"}))
    monkeypatch.chdir(here)
    return here


def write_map(folder: Path, mapping) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datasets_train.json").write_text(json.dumps(mapping))
    return folder / "datasets_train.json"


def test_a_relative_map_is_read_under_the_data_root_not_the_current_folder(tmp_path, monkeypatch):
    root = tmp_path / "root"
    write_map(root, {"polyp": "data/Polyp/train"})
    monkeypatch.chdir(tmp_path)
    assert read_domain_map("datasets_train.json", root) == {"polyp": root / "data/Polyp/train"}
    assert domain_map_file("datasets_train.json", root) == root.absolute() / "datasets_train.json"
    # the same map in the current folder (a copy, or the same JSON written otherwise) is no conflict
    (tmp_path / "datasets_train.json").write_text('{\n  "polyp": "data/Polyp/train"\n}\n')
    assert read_domain_map("datasets_train.json", root) == {"polyp": root / "data/Polyp/train"}
    # --data_root . is the current folder: one file
    assert read_domain_map("datasets_train.json", ".") == {"polyp": Path("data/Polyp/train")}


def test_a_different_map_of_the_same_name_in_the_current_folder_is_refused_by_both_paths(tmp_path, monkeypatch):
    root = tmp_path / "root"
    write_map(root, {"polyp": "data/Polyp/train"})
    write_map(tmp_path, OTHER)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        read_domain_map("datasets_train.json", "root")
    assert str(e.value) == (
        f"two different domain maps named datasets_train.json: {root}/datasets_train.json (under the data root, "
        f"the one a relative path names) and {tmp_path}/datasets_train.json (in the current folder); remove or "
        f"rename the one not meant, or pass the map's absolute path")
    # an absolute path names one file
    assert read_domain_map(root / "datasets_train.json", "root") == {"polyp": Path("root/data/Polyp/train")}


def test_a_missing_map_is_named_by_its_absolute_path_with_the_one_in_the_current_folder(tmp_path, monkeypatch):
    write_map(tmp_path, OTHER)
    (tmp_path / "root").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        read_domain_map("datasets_train.json", "root")
    assert str(e.value) == (
        f"domain map {tmp_path}/root/datasets_train.json not found; the current folder has "
        f"{tmp_path}/datasets_train.json, but a relative map path is read under the data root {tmp_path}/root: "
        f"pass --data_root or the map's absolute path")
    with pytest.raises(DataError) as e:
        read_domain_map("nope.json", "root")
    assert str(e.value) == (f"domain map {tmp_path}/root/nope.json not found; it maps domain keys to split folders "
                            f"(see docs/data.md)")


def test_a_domain_the_maps_lack_is_reported_with_the_maps_absolute_paths(tmp_path, monkeypatch):
    from samcl.loading import load_splits
    from samcl.run_folder import RunFolderError

    make_demo_data(tmp_path / "d", n_train=1, n_test=1, points=False)
    monkeypatch.chdir(tmp_path)
    cfg = build_config([("test", {"data_root": "d", "order": "polyp_Hospital", "unseen": []})])
    with pytest.raises(RunFolderError) as e:
        load_splits(cfg, 64, cfg.domains, cfg.domains, [])
    assert str(e.value) == (f"--order names domains the JSON maps lack: Hospital (in train map), Hospital (in test "
                            f"map); train map {tmp_path}/d/datasets_train.json, test map "
                            f"{tmp_path}/d/datasets_test.json")


def small_demo(monkeypatch):
    monkeypatch.setattr(demo, "make_demo_data", functools.partial(make_demo_data, n_train=4, n_test=2))
    threads = torch.get_num_threads()
    return lambda: torch.set_num_threads(threads)  # the demo pins one thread for its printed table


def test_the_demo_reads_its_own_maps_beside_other_maps_and_ends_with_a_predict_command(
        cwd_with_maps, monkeypatch, capsys):
    restore = small_demo(monkeypatch)
    try:
        demo.main(["--epoch", "1"])  # python -m samcl.demo, from a folder holding the user's own maps
    finally:
        restore()
    out = capsys.readouterr().out
    run = Path("demo_output/log_sam1/SAMCL_polyp_shadow_lesion_natural_24_1234_training")
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["completed"] == ["polyp", "shadow", "lesion", "natural"]
    assert manifest["config"]["train_json"] == str(cwd_with_maps / "demo_output" / "datasets_train.json")
    image = sorted(Path("demo_output/data/Polyp/test/images").iterdir())[0]
    from PIL import Image
    w, h = Image.open(image).size
    assert out.splitlines()[-1] == (f"    python predict.py --run_dir {run} --input {image} --points {w // 2},{h // 2} "
                                    f"--output demo_output/predict")


def test_demo_compare_reads_its_own_maps_beside_other_maps(cwd_with_maps, monkeypatch):
    """--compare trains every method with the same data settings as the demo (its first one is enough here)."""
    restore = small_demo(monkeypatch)
    monkeypatch.setattr(demo, "COMPARED", ("zeroshot",))
    try:
        demo.main(["--compare", "--epoch", "1"])
    finally:
        restore()
    manifest = json.loads(Path("demo_output/compare_sam/zeroshot/run.json").read_text())
    assert manifest["completed"] == ["polyp", "shadow", "lesion", "natural"]
    assert manifest["config"]["test_json"] == str(cwd_with_maps / "demo_output" / "datasets_test.json")


def test_the_sweep_on_demo_data_reads_the_maps_under_its_data_root(cwd_with_maps):
    make_demo_data(Path("demo_output"), n_train=4, n_test=2)
    # the --help example's --config and --data_root (the config by absolute path: the cwd is elsewhere)
    argv = ["--methods", "zeroshot", "--orders", "1", "--seeds", "1", "--config", str(CONFIG_DIR / "demo_sam.yaml"),
            "--data_root", "demo_output", "--device", "cpu", "--set", "epoch=1", "--order", "polyp_natural",
            "--unseen", "natural", "--set", "num_embedding=3", "--set", "selector_epochs=1", "--num_workers", "0",
            "--output", "sweep"]
    plan, _ = sweep.plan_from_args(sweep.build_parser().parse_args(argv))
    assert {(k, r.settings[k]) for r in plan.runs for k in ("train_json", "test_json")} == {
        ("train_json", str(cwd_with_maps / "demo_output" / "datasets_train.json")),
        ("test_json", str(cwd_with_maps / "demo_output" / "datasets_test.json"))}
    assert sweep.main(argv) == 0
    manifest = json.loads(Path("sweep/zeroshot/order0_seed1234/run.json").read_text())
    assert manifest["completed"] == ["polyp", "natural"]
    assert os.path.isabs(manifest["config"]["train_json"])
