"""Methods and learning modules as plugins: any registered pair runs under the one protocol,
unknown names and impossible combinations are refused before anything is written, and runs
record their storage for `python -m samcl.compare`."""
import csv
import json

import pytest
import torch

from samcl import compare, pipeline
from samcl.config import CONFIG_DIR, ConfigError, load_config
from samcl.plugins import check_plugins
from samcl.demo import make_demo_data
from samcl.io import read_tagged
from samcl.registry import METHODS, UnknownName

KNOWN_METHODS = ", ".join(METHODS.names())  # every registered method, in name order

CPU = torch.device("cpu")
CONFIGS = {"sam": "demo_sam.yaml", "sam2": "demo_sam2.yaml"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    make_demo_data(root, n_train=4, n_test=2)
    return root


def cfg_for(data, family, run_dir, **kw):
    return check_plugins(load_config(CONFIG_DIR / CONFIGS[family], {
        "data_root": str(data), "run_dir": str(run_dir), "epoch": 1, "num_embedding": 2, "batch_size": 2,
        "eval_batch_size": 2, "selector_epochs": 2, "val_every": 1, "order": "polyp_natural", "unseen": ["natural"],
        "num_workers": 0, **kw}))


def test_unknown_names_are_refused_listing_the_known_ones(data, tmp_path):
    with pytest.raises(UnknownName, match=f"unknown method 'ewc2'; known: {KNOWN_METHODS}$"):
        cfg_for(data, "sam", tmp_path / "a", method="ewc2")
    with pytest.raises(UnknownName, match="unknown learning module 'dora'; known: adapter, augmodule, cad, decoder, lora"):
        cfg_for(data, "sam", tmp_path / "b", learning_module="dora")
    with pytest.raises(ConfigError, match="learning module cad needs the sam backbone, not sam2: SAM 2's mask decoder"):
        cfg_for(data, "sam2", tmp_path / "c", learning_module="cad")
    with pytest.raises(ConfigError, match="prompt: box is CAD's recipe; the augmodule module reads the point heatmap"):
        cfg_for(data, "sam", tmp_path / "d", prompt="box")
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.parametrize("family", ["sam", "sam2"])
@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_samcl_routing_over_other_modules_trains_tests_and_resumes(data, tmp_path, family, kind):
    run = tmp_path / "run"
    cfg = cfg_for(data, family, run, learning_module=kind)
    assert cfg.run_name().startswith(f"samcl-{kind}_polyp_natural")
    metrics = pipeline.train(cfg, CPU)
    module_file = read_tagged(run / "polyp.safetensors", "module file")
    assert module_file["format"] == f"samcl-{kind}" and module_file["kind"] == kind
    assert metrics["learning_module"]["kind"] == kind and "aug_module" not in metrics
    steps = metrics["steps"]
    assert [s["domain"] for s in steps] == ["polyp", "natural"] and steps[0]["trained"] and not steps[1]["trained"]
    # storage: the step's files, by name and size
    files = steps[0]["storage"]["files"]
    assert set(files) == {"polyp.safetensors", "embedding_buffer/polyp.safetensors", "selector/after_polyp.safetensors"}
    assert files["polyp.safetensors"] == (run / "polyp.safetensors").stat().st_size
    assert steps[0]["storage"]["bytes"] == sum(files.values()) and steps[0]["training_seconds"] > 0
    model = pipeline.load_run(run, cfg, CPU)
    assert type(model.module_for("polyp")).name == kind
    report = pipeline.test(run, cfg, CPU, with_vanilla=False)
    assert report["results"]["polyp"]["metrics"]["iou"] == pytest.approx(steps[1]["evaluation"]["polyp"]["metrics"]["iou"])
    # resume adds a domain: the finished module is read back, one more trained
    before = read_tagged(run / "polyp.safetensors", "module file")["state_dict"]
    pipeline.resume(run, {"order": "polyp_natural_shadow"}, CPU)
    after = json.loads((run / "metrics.json").read_text())
    assert [s["domain"] for s in after["steps"]] == ["polyp", "natural", "shadow"]
    assert read_tagged(run / "shadow.safetensors", "module file")["kind"] == kind
    kept = read_tagged(run / "polyp.safetensors", "module file")["state_dict"]
    assert all(torch.equal(before[k], kept[k]) for k in before)


def test_compare_tables_runs_with_their_storage(data, tmp_path, capsys):
    runs = []
    for kind in ("augmodule", "lora"):
        run = tmp_path / kind
        pipeline.train(cfg_for(data, "sam", run, learning_module=kind), CPU)
        runs.append(run)
    capsys.readouterr()  # the training logs
    out_csv = tmp_path / "table" / "compare.csv"
    assert compare.main([str(r) for r in runs] + ["--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| run | method | module | backbone | domains | iou_AA |")
    rows = list(csv.DictReader(out_csv.open()))
    from PIL import Image

    assert Image.open(out_csv.with_suffix(".png")).format == "PNG"
    assert [r["module"] for r in rows] == ["augmodule", "lora"] and all(r["method"] == "samcl" for r in rows)
    for r, run in zip(rows, runs):
        # the module, the embedding buffer of both domains (the unseen one trains the selector too), ONE selector
        stored = sum((run / f).stat().st_size for f in ("polyp.safetensors", "embedding_buffer/polyp.safetensors",
                                                        "embedding_buffer/natural.safetensors",
                                                        "Module_Selector.safetensors"))
        assert float(r["stored_mb_per_domain"]) == pytest.approx(stored / 1024**2)
        snapshots = sum((run / f"selector/after_{d}.safetensors").stat().st_size for d in ("polyp", "natural"))
        assert float(r["record_mb"]) == pytest.approx(snapshots / 1024**2)
        steps = json.loads((run / "metrics.json").read_text())["steps"]
        assert float(r["iou_AA"]) == pytest.approx(steps[-1]["summary"]["iou"]["AA"])
    assert compare.main([str(tmp_path / "nothing")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--method", "ewc2"], f"error: unknown method 'ewc2'; known: {KNOWN_METHODS}"),
    (["--learning_module", "dora"], "error: unknown learning module 'dora'; known: adapter, augmodule, cad, decoder, lora"),
    (["--backbone", "sam2", "--config", "configs/demo_sam2.yaml", "--learning_module", "cad"],
     "error: learning module cad needs the sam backbone, not sam2: SAM 2's mask decoder"),
])
def test_the_command_line_refuses_before_writing_anything(data, tmp_path, flags, message):
    import subprocess
    import sys

    from tests.conftest import REPO

    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/demo_sam.yaml", "--data_root", str(data),
                        "--run_dir", str(run), "--device", "cpu", *flags], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not run.exists()


def test_the_sam2_scripts_are_aliases_of_backbone_sam2():
    import subprocess
    import sys

    from tests.conftest import REPO

    def flags_of(*args):
        out = subprocess.run([sys.executable, *args, "--help"], cwd=REPO, capture_output=True, text=True).stdout
        return out[out.index("options:"):]

    assert flags_of("train_SAM2.py") == flags_of("train.py", "--backbone", "sam2")
    assert flags_of("test_SAM2.py") == flags_of("test.py", "--backbone", "sam2")
