#!/usr/bin/env python
"""Everything that needs a GPU, in one command, within a time budget (see bench/gpu_check.sh).

Steps, in order, each a subprocess with its own time limit (a step that fails or runs out is
recorded and the next one runs):

1. the CUDA-only tests (``pytest -m cuda``);
2. ``bench/speed.py`` at ViT-B 1024, ``bench/memory.py`` at ViT-B 1024 and at Hiera-T 1024;
3. ``bench/attention.py`` on CUDA (ViT-B 1024, batch 8, every attention path);
4. one training epoch of every registered method on 32 synthetic images at 1024 px (ViT-B, random
   weights), and SAMCL on SAM 2.1 Hiera-T.

Writes ``bench/results/<gpu name>-<date>.json`` (every step's command, status, seconds and the
last lines of its output, with the benches' own JSON reports) and prints one table.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def method_names() -> List[str]:
    sys.path.insert(0, str(REPO))
    from samcl.settings import registered_names

    return registered_names("register_method")


Step = Tuple[str, List[str], int]


def recipe(method: str) -> List[str]:
    """``--config`` of the method's own recipe (configs/baselines/<method>.yaml), where it has one."""
    own = REPO / "configs" / "baselines" / f"{method}.yaml"
    return ["--config", str(own.relative_to(REPO))] if own.is_file() else []


def plan(work: Path) -> Tuple[List[Step], List[Step], int]:
    """(the steps run one after another, the method epochs run :data:`PARALLEL` at a time, the seconds
    allowed for those together); a step is (name, command, seconds allowed)."""
    data = work / "data"
    steps: List[Step] = [
        ("cuda tests", [PY, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"], 120),
        ("attention vit_b 1024", [PY, "bench/attention.py", "--device", "cuda", "--batch", "8", "--paths", "stock",
                                  "chunked", "sdpa", "--steps", "3", "--json", str(work / "attention.json")], 60),
        ("memory vit_b 1024", [PY, "bench/memory.py", "--device", "cuda", "--vit_name", "vit_b", "--img_size", "1024",
                               "--batch", "4", "--steps", "3", "--json", str(work / "memory_vit_b.json")], 45),
        ("memory hiera_t 1024", [PY, "bench/memory.py", "--device", "cuda", "--hiera_name", "hiera_t", "--img_size",
                                 "1024", "--batch", "4", "--steps", "3", "--modules", "augmodule", "lora", "decoder",
                                 "--json", str(work / "memory_hiera_t.json")], 30),
        ("make data", [PY, "-c", f"from samcl.demo import make_demo_data; make_demo_data({str(data)!r}, n_train=16, "
                                 f"n_test=2)"], 20),
    ]
    common = ["--order", "polyp_shadow", "--epoch", "1", "--random_weights", "--device", "cuda", "--batch_size", "8",
              "--data_root", str(data), "--no-memory_check", "--num_workers", "2"]
    epochs: List[Step] = [(f"epoch {m}", [PY, "train.py", "--method", m, *recipe(m), "--vit_name", "vit_b",
                                          "--img_size", "1024", "--run_dir", str(work / "runs" / m)] + common, 90)
                          for m in method_names()]
    epochs.append(("epoch samcl sam2", [PY, "train_SAM2.py", "--hiera_name", "hiera_t", "--img_size", "1024",
                                        "--run_dir", str(work / "runs" / "samcl_sam2")] + common, 90))
    last = [("speed vit_b 1024", [PY, "bench/speed.py", "--device", "cuda", "--vit_name", "vit_b", "--img_size",
                                  "1024", "--out", str(work / "speed.json")], 120)]
    return steps, epochs, last


PARALLEL = 4  # method epochs at once: each needs a few GB of the GPU and 2 loader workers + 4 threads
EPOCHS_BUDGET = 200


def summary(name: str, cmd: List[str], out: str) -> str:
    """The figure a step's line of the table shows (an epoch's: whether its run folder, the command's
    --run_dir, got its metrics.json)."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if name == "cuda tests":
        return next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", ln)), "")
    if name.startswith("attention"):
        return next((ln for ln in reversed(lines) if ln.startswith("attention vs stock")), "")
    if name.startswith("speed"):
        return " ".join(ln for ln in lines if "img/s" in ln)[-200:]
    if name.startswith("epoch"):
        run = Path(cmd[cmd.index("--run_dir") + 1])
        return "metrics.json written" if (run / "metrics.json").is_file() else ""
    return lines[-1][-160:] if lines else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list the steps and their time budget; run nothing")
    p.add_argument("--budget", type=int, default=480, help="seconds for the whole check (default 480: 8 minutes)")
    p.add_argument("--out", type=Path, help="result file (default bench/results/<gpu name>-<date>.json)")
    p.add_argument("--only", nargs="+", metavar="WORD",
                   help="run only the steps whose name holds one of these words (e.g. --only cuda attention l2p)")
    args = p.parse_args(argv)
    work = Path(tempfile.gettempdir()) / "samcl_gpu_check" if args.dry_run else Path(
        tempfile.mkdtemp(prefix="samcl_gpu_check_"))
    steps, epochs, last = plan(work)
    if args.only:
        def chosen(items: List[Step]) -> List[Step]:
            return [x for x in items if any(w in x[0] for w in args.only)]
        epochs, last = chosen(epochs), chosen(last)
        steps = [x for x in steps if x in chosen(steps) or (x[0] == "make data" and epochs)]
    if args.dry_run:
        def show(items: List[Step], note: str = "") -> None:
            for name, cmd, secs in items:
                print(f"  {name:<24} at most {secs:3d} s{note}: {' '.join(cmd[1:])}")
        show(steps)
        print(f"  then the method epochs, {PARALLEL} at a time, together at most {EPOCHS_BUDGET} s:")
        show(epochs, " each")
        show(last)
        total = sum(s for _, _, s in steps + last) + EPOCHS_BUDGET
        print(f"total at most {total} s; the whole check stops at --budget {args.budget} s")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; bench/gpu_check.sh needs one (--dry-run lists the steps)",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    out_file = args.out or REPO / "bench" / "results" / (
        f"{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}-{datetime.date.today().isoformat()}.json")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    start = time.time()
    results: List[Dict] = []

    def record(name: str, cmd: List[str], status: str, took: float, out: str) -> None:
        print(f"--- {name}: {status} in {took:.0f} s\n{out[-3000:]}", flush=True)
        results.append({"step": name, "command": cmd, "status": status, "seconds": round(took, 1),
                        "figure": summary(name, cmd, out), "output_tail": out[-6000:]})

    def run_all(items: List[Step], parallel: int, budget: float) -> None:
        """Run ``items``, ``parallel`` at a time, each within its own limit and all within ``budget``."""
        t_start, queue, running = time.time(), list(items), []
        while queue or running:
            while queue and len(running) < parallel and time.time() - t_start < budget - 2:
                name, cmd, secs = queue.pop(0)
                log = tempfile.TemporaryFile(mode="w+")
                threads = {"OMP_NUM_THREADS": "4"} if parallel > 1 else {}
                proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env, **threads), stdout=log, stderr=subprocess.STDOUT,
                                        text=True)
                running.append((name, cmd, secs, proc, log, time.time()))
            for item in list(running):
                name, cmd, secs, proc, log, t0 = item
                over = time.time() - t0 > secs or time.time() - t_start > budget
                if proc.poll() is None and not over:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    status = f"timed out ({time.time() - t0:.0f} s)"
                else:
                    status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
                log.seek(0)
                record(name, cmd, status, time.time() - t0, log.read())
                log.close()
                running.remove(item)
            if not running and queue and time.time() - t_start >= budget - 2:
                for name, cmd, _secs in queue:
                    results.append({"step": name, "command": cmd, "status": "not run (budget)", "seconds": 0.0,
                                    "figure": ""})
                queue = []
            time.sleep(0.5)

    for item in steps:
        run_all([item], 1, max(0.0, min(item[2], args.budget - (time.time() - start))))
    after = sum(secs for _, _, secs in last)  # kept for the steps after the epochs
    run_all(epochs, PARALLEL, max(0.0, min(EPOCHS_BUDGET, args.budget - (time.time() - start) - after)))
    for item in last:
        run_all([item], 1, max(0.0, args.budget - (time.time() - start)))
    reports = {}
    for f in ("speed.json", "memory_vit_b.json", "memory_hiera_t.json", "attention.json"):
        if (work / f).is_file():
            reports[f[:-5]] = json.loads((work / f).read_text())
    report = {"format": "samcl-gpu-check", "version": 1, "gpu": gpu, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": round(time.time() - start, 1),
              "steps": results, "reports": reports}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}: {report['seconds']} s")
    print("| step | status | seconds | figure |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['step']} | {r['status']} | {r['seconds']} | {r['figure']} |")
    print(f"written: {out_file}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
