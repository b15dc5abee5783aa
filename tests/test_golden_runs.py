"""Golden fingerprints of three tiny seeded runs (SAMCL on SAM, SAMCL_2 on SAM 2, CAD).

They pin every number a run writes — module weights, embedding buffers, selectors, the
accuracy matrix, losses, validations and routing — so that a restructuring of the code
can show it changed none of them. The fingerprints hash tensor contents by name (not
file bytes, so a change of container format is not a change of numbers) and the
metrics without wall-clock fields.

CPU arithmetic rounds differently on another instruction set or torch version, so the
test compares only where those match the recorded ones and skips with the reason
elsewhere. Record anew (only when a change of numbers is intended, and say why in the
commit) with::

    python tests/test_golden_runs.py --record
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # --record runs from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samcl import pipeline  # noqa: E402
from samcl.config import CONFIG_DIR, load_config  # noqa: E402
from samcl.demo import make_demo_data  # noqa: E402
from samcl.io import read_tagged  # noqa: E402
from samcl.run_folder import WEIGHT_SUFFIXES  # noqa: E402

GOLDEN = Path(__file__).with_name("golden_runs.json")
RUNS = {"SAMCL": "demo_sam.yaml", "SAMCL_2": "demo_sam2.yaml", "CAD": "demo_cad.yaml"}
# the metrics a run computes (not its wall-clock time, paths or package versions)
STEP_FIELDS = ("step", "domain", "trained", "training", "buffer", "selector_loss", "evaluation", "summary")


def machine() -> dict:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__.split("+")[0]}


def tensor_digest(obj, h) -> None:
    """Feed the tensors of a loaded checkpoint into ``h``: each by its key path, dtype, shape and
    bytes (containers in sorted key order); other values (format tags, specs) are left out."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            tensor_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensor_digest(v, h)


def release_summary(summary: dict) -> dict:
    """A step's summary as first recorded: the release's AA/FM/FT (the canonical columns and the
    vanilla scores added since are derived from the same matrix: the fingerprint pins its numbers)."""
    return {k: v for k, v in summary.items() if k in ("AA", "FM", "FT", "step")}


def fingerprint(run_dir: Path) -> dict:
    out = {}
    for f in sorted(p for p in run_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES.values()):
        h = hashlib.sha256()
        tensor_digest(read_tagged(f, "weights file"), h)
        out[f.relative_to(run_dir).as_posix()] = h.hexdigest()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    matrix = {k: v for k, v in metrics["accuracy_matrix"].items() if k != "vanilla"}
    matrix["summary"] = {m: [release_summary(s) for s in v] for m, v in matrix["summary"].items()}
    steps = [{k: s[k] for k in STEP_FIELDS if k in s} for s in metrics["steps"]]
    for s in steps:
        s["summary"] = {m: release_summary(v) for m, v in s["summary"].items()}
        s["evaluation"] = {d: {k: v for k, v in res.items() if k != "vanilla"} for d, res in s["evaluation"].items()}
    kept = {"accuracy_matrix": matrix, "learning_module": metrics["learning_module"], "steps": steps}
    out["metrics.json"] = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return out


def run_all(root: Path) -> dict:
    make_demo_data(root, n_train=4, n_test=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU reductions split by thread: one thread, one rounding
    try:
        prints = {}
        for name, config in RUNS.items():
            cfg = load_config(CONFIG_DIR / config, {
                "data_root": str(root), "run_dir": str(root / name), "epoch": 2, "num_embedding": 2,
                "batch_size": 2, "eval_batch_size": 2, "selector_epochs": 2, "val_every": 1,
                "order": "polyp_shadow_natural", "unseen": ["natural"], "num_workers": 0,
                "attention": "stock"})  # segment_anything's own attention: the fingerprints are bit for bit
            pipeline.train(cfg, torch.device("cpu"))
            prints[name] = fingerprint(root / name)
        return prints
    finally:
        torch.set_num_threads(threads)


def test_tiny_runs_reproduce_their_golden_fingerprints(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    if golden["machine"] != machine():
        pytest.skip(f"fingerprints were recorded on {golden['machine']}, this is {machine()}: "
                    f"CPU arithmetic rounds differently there")
    got = run_all(tmp_path)
    for name, files in golden["runs"].items():
        assert got[name].keys() == files.keys(), name
        changed = [f for f in files if got[name][f] != files[f]]
        assert not changed, f"{name}: {changed} changed"


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden_runs.py --record")
    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_text(json.dumps({"machine": machine(), "runs": run_all(Path(d))}, indent=1) + "\n")
    print(f"recorded {GOLDEN}")
