"""torchrun with 2 CPU processes (Gloo): one buffer, every test image once, one copy of each file."""
import json
import socket
import subprocess
import sys

import pytest
import torch

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.data import SegmentationSplit, read_domain_map
from samcl.demo import make_demo_data
from samcl.evaluation import evaluate_split, routed
from samcl.loading import make_loader
from samcl.lock import LOCK_FILE
from samcl.selector import EmbeddingBuffer
from tests.conftest import REPO

DOMAINS = ["polyp", "shadow", "natural"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # odd sizes: 7 training images (buffer of 5 from batches of 2 x 2 ranks), 5 test images (the
    # DistributedSampler pads rank 1's share with a repeat that must not be counted)
    make_demo_data(root, n_train=7, n_test=5)
    run = root / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "train.py", "--config", "configs/demo_sam.yaml", "--cuda", "-1", "--device", "cpu",
           "--data_root", str(root), "--run_dir", str(run), "--epoch", "2", "--num_embedding", "5",
           "--batch_size", "2", "--order", "_".join(DOMAINS), "--num_workers", "0", "--selector_epochs", "3"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root, run, r


def test_torchrun_finishes_with_one_buffer_and_one_copy_of_each_file(ddp_run):
    root, run, r = ddp_run
    for d in DOMAINS:
        buf = EmbeddingBuffer(5)
        buf.load_part(run / f"embedding_buffer/{d}.safetensors", d)
        assert buf.store[d].shape == (5, 32)
        assert torch.unique(buf.store[d], dim=0).shape[0] == 5  # five different images
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".tmp") or "/." in f or (f.startswith(".") and f != LOCK_FILE)]
    assert (run / LOCK_FILE).read_text() == ""  # rank 0 held the lock and released it; no other rank took one
    assert files == sorted([LOCK_FILE, "run.json", "config.yaml", "log.txt", "metrics.json", "report.png",
                            "Module_Selector.safetensors", "polyp.safetensors", "shadow.safetensors",
                            *(f"embedding_buffer/{d}.safetensors" for d in DOMAINS),
                            *(f"selector/after_{d}.safetensors" for d in DOMAINS)])
    log = (run / "log.txt").read_text()
    assert log.count("=== step 2/3: shadow ===") == 1 and "2 process(es)" in log  # rank 0 alone writes
    assert r.stdout.count("=== step 1/3: polyp ===") == 1  # and alone logs to the console


def test_every_test_image_counted_once_and_equal_to_single_process(ddp_run):
    root, run, _ = ddp_run
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    final = steps[-1]["evaluation"]
    cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {"data_root": str(root), "order": "_".join(DOMAINS)})
    model = pipeline.load_run(run, cfg, torch.device("cpu"))
    test_map = read_domain_map("datasets_test.json", root)
    for d in DOMAINS:
        assert final[d]["metrics"]["n"] == 5 and sum(final[d]["selector_counts"].values()) == 5
        ds = SegmentationSplit(test_map[d], model.backbone.img_size, domain=d)
        single = evaluate_split(model, make_loader(ds, 3, False, 0, 0, torch.device("cpu")), torch.device("cpu"),
                                routed(model))
        for m in ("iou", "f1", "mae"):
            assert abs(single["metrics"][m] - final[d]["metrics"][m]) < 1e-6, (d, m)
        assert single["selector_counts"] == final[d]["selector_counts"]


def test_several_processes_without_cuda_minus_one_are_refused(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "train.py", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "pass --cuda -1" in r.stderr
