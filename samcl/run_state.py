"""The state of a continual run in its folder: what is done, what was measured, which files hold it.

Every finished step *commits*: ``metrics.json``, then ``run.json`` with the SHA-256 of
every file the step wrote (the commit point). The domain in progress is saved after
every epoch in ``partial/<domain>.pt``. A resume checks that the setup is the same,
verifies the finished files and reloads them. Nothing here knows the method or the
kind of learning module: the method names its own files (:meth:`ContinualMethod.step_files`).
"""
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as dist
from .bounded import check_torch_file
from .config import stored_settings
from .io import atomic_torch_save
from .lock import LOCK_FILE, RunLock
from .methods.base import ContinualMethod
from .pictures import draw_report
from .metrics import AccuracyMatrix
from .run_folder import (CONFIG_FILE, MANIFEST, METRICS_FILE, PARTIAL_DIR, WEIGHTS, RunFolderError, backbone_identity,
                         buffer_part, load_module, module_path, package_versions, read_manifest, run_weights,
                         save_module, sha256_file, verify_files, write_config, write_json)
from .selector import EmbeddingBuffer

log = logging.getLogger("samcl.run_state")
REPORT_FILE = "report.png"


class RunState:
    """The run folder ``run_dir`` of ``cfg`` with ``method`` (whose model is the module bank)."""

    def __init__(self, cfg: Any, method: ContinualMethod, run_dir: Path, checkpoint: Optional[Dict] = None) -> None:
        self.cfg = cfg
        self.method = method
        self.model = method.model
        self.run_dir = Path(run_dir)
        self.domains = cfg.domains
        self.unseen = [d for d in self.domains if d in set(cfg.unseen)]
        self.checkpoint = checkpoint or {}
        self.buffer: EmbeddingBuffer = method.buffer
        self.matrix = AccuracyMatrix(self.domains, self.unseen)
        self.steps: List[Dict] = []
        self.checksums: Dict[str, str] = {}
        self.completed: List[str] = []
        self.with_module: set = set()  # the steps that saved a module file
        self.validation_files: Dict[str, List[str]] = {}  # --val_fraction: each domain's held-out image names
        self.weights = WEIGHTS  # a resumed run keeps its own (restore)
        method.weights = self.weights
        self._lock: Optional[RunLock] = None

    # ------------------------------------------------------------ the writer's lock
    def lock(self) -> None:
        """Take the run folder's lock (rank 0, which writes the folder): a second process training
        there is refused at once, naming this one (:mod:`samcl.lock`). Held until :meth:`unlock`."""
        if dist.is_main() and self._lock is None:
            self._lock = RunLock(self.run_dir).acquire()

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------ a new folder
    def prepare(self, overwrite: bool) -> None:
        exists = (self.run_dir / MANIFEST).exists()
        dist.barrier()  # every rank has looked before rank 0 may replace it
        if exists and not overwrite:
            raise RunFolderError(
                f"run folder {self.run_dir} already holds a run; pass --overwrite to replace it "
                f"or --run_dir for a new folder, or --resume it")
        self.lock()
        if dist.is_main() and exists:
            for entry in self.run_dir.iterdir():  # everything but the lock this process holds
                if entry.name != LOCK_FILE:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        dist.barrier()

    def identity(self) -> Dict:
        """What a resume must find unchanged: module type, backbone, its weights, the module spec."""
        return {"module": self.cfg.module, "backbone": backbone_identity(self.model.backbone),
                "checkpoint": self.checkpoint, "spec": self.model.spec.to_dict()}

    def begin(self) -> None:
        """The run's configuration and manifest, before the first step (rank 0)."""
        if dist.is_main():
            self.write_manifest()
            write_config(self.run_dir, self.cfg.to_dict())

    # ------------------------------------------------------------ resume
    def restore(self) -> None:
        """Pick up a run folder: take its lock, check it is the same setup and that the finished steps
        keep their roles, verify finished files, reload them."""
        manifest = read_manifest(self.run_dir)
        self.lock()
        self._report_edited_config(manifest["config"])
        old = {k: manifest.get(k) for k in ("module", "backbone", "checkpoint", "spec")}
        new = json.loads(json.dumps(self.identity()))
        diff = [f"{k}: run has {old[k]}, now {new[k]}" for k in new if old[k] != new[k]]
        if diff:
            raise RunFolderError(f"cannot resume {self.run_dir} with another setup ({'; '.join(diff)}); "
                                 f"resume with the run's backbone, checkpoint and module, or start a new run folder")
        old_order = manifest["order"]
        if self.domains[: len(old_order)] != old_order:
            raise RunFolderError(f"--order {self.cfg.order} must start with the run's order {'_'.join(old_order)} "
                                 f"(new domains are added at the end)")
        self.completed = list(manifest["completed"])
        self._check_roles(manifest)
        self.checksums = dict(manifest.get("files", {}))
        self.weights = self.method.weights = run_weights(manifest)
        if self.weights != WEIGHTS:
            log.info("%s was written with .%s weight files: it goes on in that format (one format per folder)",
                     self.run_dir, self.weights)
        self.with_module = set(manifest.get("modules", {}))
        verify_files(self.run_dir, self.checksums, [f for d in self.completed for f in self.step_files(d)])
        for d in self.completed:
            if self.buffered(d):
                self.buffer.load_part(self.run_dir / buffer_part(d, self.weights), d)
            if self.method.holds_out(d):
                continue
            module = None if d not in self.with_module else load_module(module_path(self.run_dir, d, self.weights),
                                                                        self.model.backbone, self.model.kind)
            self.model.add_domain(d, module)
        self.method.restore(self.completed)
        self.steps = self._restore_steps()
        for partial in sorted((self.run_dir / PARTIAL_DIR).glob("*.pt")):  # read by load_partial later
            try:
                check_torch_file(partial, "partial-domain file", RunFolderError)
            except RunFolderError as e:
                raise RunFolderError(f"{e}; delete it to train {partial.stem} from its first epoch") from None
        for step in self.steps:
            for d, res in step["evaluation"].items():
                self.matrix.set(step["step"], self.domains.index(d), res["metrics"])
                if "vanilla" in res:
                    self.matrix.set_vanilla(self.domains.index(d), res["vanilla"])
        log.info("resuming %s: done %s; to do %s", self.run_dir, self.completed or "nothing", self.todo())

    def _check_roles(self, manifest: Dict) -> None:
        """A finished step keeps its role: a domain trained (or collected as the method trains)
        cannot become test-only, nor a finished test-only domain trained; ``--unseen`` on a resume
        may name only domains not finished yet."""
        was_unseen, modules = set(manifest["unseen"]), set(manifest.get("modules", {}))
        for d in self.completed:
            if (d in was_unseen) == (d in self.unseen):
                continue
            what = ("was finished as a test-only (unseen) domain" if d in was_unseen else
                    "was trained (it has a learning module)" if d in modules else "was finished as a trained step")
            wanted = "a trained one" if d in was_unseen else "test-only (unseen)"
            todo = [x for x in self.domains if x not in self.completed]
            raise RunFolderError(f"{self.run_dir}: {d} {what}; this resume would make it {wanted}, but a finished "
                                 f"step's role is fixed. --unseen on a resume may name only domains not finished "
                                 f"yet ({', '.join(todo) if todo else 'none: every domain of the order is done'}) "
                                 f"besides the run's own ({' '.join(manifest['unseen']) or 'none'})")

    def _report_edited_config(self, stored: Dict[str, Any]) -> None:
        """config.yaml is the run's settings, for reading; the run goes on with run.json's. A hand
        edit is reported in one line (the file is rewritten with the run's settings)."""
        path = self.run_dir / CONFIG_FILE
        if not path.is_file():
            return
        try:
            edited = stored_settings(yaml.safe_load(path.read_text()) or {})
            if not isinstance(edited, dict):
                raise ValueError("not a mapping")
        except (yaml.YAMLError, ValueError, TypeError, UnicodeDecodeError):
            log.warning("%s is unreadable; the run's settings are used (%s)", path, MANIFEST)
            return
        differ = sorted(k for k in set(edited) | set(stored) if edited.get(k) != stored.get(k))
        if differ:
            log.warning("%s differs from the run's settings in %s; the run's settings are used (%s), and the file "
                        "is rewritten with them", path.name, ", ".join(differ), MANIFEST)

    def _restore_steps(self) -> List[Dict]:
        """The finished steps of metrics.json, checked against the checksum run.json records. A run
        stopped between writing metrics.json and run.json (the commit) leaves exactly one step more
        than run.json's; that file is used for its finished steps, with a warning."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            if self.completed and METRICS_FILE in self.checksums:
                verify_files(self.run_dir, self.checksums, [METRICS_FILE])  # names it missing
            return []
        try:
            steps = json.loads(path.read_text()).get("steps")
            if not isinstance(steps, list):
                raise ValueError("no list of steps")
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{path} is corrupt ({e}); restore it from a copy. Nothing was changed.") from None
        recorded = self.checksums.get(METRICS_FILE)
        if recorded is not None and sha256_file(path) != recorded:
            nxt = self.todo()[:1]
            if len(steps) == len(self.completed) + 1 and [steps[-1].get("domain")] == nxt:
                log.warning("%s is one step ahead of %s (the run stopped while committing %s); its first %d "
                            "step(s) are used", path, MANIFEST, nxt[0], len(self.completed))
            else:
                verify_files(self.run_dir, self.checksums, [METRICS_FILE])  # names the mismatch, changes nothing
        return steps[: len(self.completed)]

    def todo(self) -> List[str]:
        return [d for d in self.domains if d not in self.completed]

    # ------------------------------------------------------------ a step
    def buffered(self, domain: str) -> bool:
        """Whether ``domain``'s selector embeddings are kept (and its part of the buffer written)."""
        return self.method.keeps_embeddings and not self.method.holds_out(domain)

    def step_files(self, domain: str) -> List[str]:
        files = [buffer_part(domain, self.weights)] if self.buffered(domain) else []
        files += self.method.step_files(domain)
        return [module_path(self.run_dir, domain, self.weights).name] + files if domain in self.with_module else files

    def save_step(self, domain: str, module: Optional[nn.Module]) -> None:
        """The step's module file and the domain's part of the embedding buffer (rank 0)."""
        if module is not None:
            self.with_module.add(domain)
        if not dist.is_main():
            return
        if module is not None:
            save_module(module, self.model.backbone, domain, module_path(self.run_dir, domain, self.weights))
        if self.buffered(domain):
            self.buffer.save_part(self.run_dir / buffer_part(domain, self.weights), domain)

    def storage(self, domain: str) -> Dict[str, Any]:
        """What the step wrote and what the method keeps, in bytes of the files on disk.

        ``files``: each file the step wrote (module, buffer part, the method's own files) and
        ``bytes`` their sum. ``kept_bytes``: what the method needs to go on after this step: the
        module of every step that trained for a method that keeps a module bank (the latest one for
        a method that trains one shared module), the embedding buffer of every domain so far
        (test-only ones included: their embeddings train the selector too) and the method's
        :meth:`~samcl.methods.base.ContinualMethod.kept_files` (one selector, the latest replay
        buffer or Fisher). ``extra_bytes``: every other file the steps wrote (each step's selector
        snapshot, earlier module snapshots, earlier replay buffers), a record for reproducing the
        run, not memory the method needs."""
        if not dist.is_main():
            return {"files": {}, "bytes": 0, "kept_bytes": 0, "extra_bytes": 0}
        size = {}

        def nbytes(rels) -> int:
            return sum(size.setdefault(rel, (self.run_dir / rel).stat().st_size) for rel in rels)

        files = {rel: nbytes([rel]) for rel in self.step_files(domain)}
        done = self.completed + [domain]
        kept = set(self.kept_files(done))
        written = {rel for d in done for rel in self.step_files(d)} | set(self.method.run_files())
        return {"files": files, "bytes": sum(files.values()), "kept_bytes": nbytes(sorted(kept)),
                "extra_bytes": nbytes(sorted(written - kept))}

    def kept_files(self, done: List[str]) -> List[str]:
        """The files (relative to the run folder) the method needs after the steps ``done``."""
        trained = [d for d in done if d in self.with_module]
        modules = trained if self.method.keeps_every_module else trained[-1:]
        kept = [module_path(self.run_dir, d, self.weights).name for d in modules]
        if self.method.needs_buffer():
            kept += [buffer_part(d, self.weights) for d in done if self.buffered(d)]
        return kept + self.method.kept_files(done)

    def commit(self, domain: str) -> None:
        """Record the step: metrics.json, then run.json with the checksums (the commit point)."""
        self.completed.append(domain)
        if not dist.is_main():
            return
        write_json(self.run_dir / METRICS_FILE, self.metrics())
        for rel in self.step_files(domain) + self.method.run_files() + [METRICS_FILE]:
            self.checksums[rel] = sha256_file(self.run_dir / rel)
        self.write_manifest()
        self.draw_report()
        partial = self.partial_path(domain)
        if partial.exists():
            partial.unlink()
        if partial.parent.is_dir() and not any(partial.parent.iterdir()):
            partial.parent.rmdir()  # a finished run folder keeps no empty partial/

    # ------------------------------------------------------------ the domain in progress
    def partial_path(self, domain: str) -> Path:
        return self.run_dir / PARTIAL_DIR / f"{domain}.pt"

    def save_partial(self, domain: str, module: nn.Module, opt, sched, loader: DataLoader, epoch: int,
                     history: Dict) -> None:
        if not dist.is_main():
            return
        atomic_torch_save({"epoch": epoch, "module": module.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "history": history,
                           "generator": None if loader.generator is None else loader.generator.get_state(),
                           "buffer": self.buffer.store.get(domain), "buffer_index": self.buffer.seen.get(domain),
                           "method": self.method.state_dict(), "world_size": dist.world_size()},
                          self.partial_path(domain))

    def load_partial(self, domain: str, module: nn.Module, opt, sched, loader: DataLoader) -> Optional[Dict]:
        path = self.partial_path(domain)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            log.warning("%s is unreadable (%s): %s starts over", path, str(e).splitlines()[0], domain)
            return None
        if state["world_size"] != dist.world_size():
            log.warning("%s was saved by %d process(es), this run has %d: %s starts over", path,
                        state["world_size"], dist.world_size(), domain)
            return None
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if loader.generator is not None:
            loader.generator.set_state(state["generator"])
        if state["buffer"] is not None:
            self.buffer.store[domain] = state["buffer"]
            self.buffer.seen[domain] = state["buffer_index"]
        self.method.load_state_dict(state.get("method", {}))
        log.info("%s: resuming after epoch %d (from %s)", domain, state["epoch"] + 1, path)
        return state

    def draw_report(self) -> None:
        """``report.png``: the accuracy matrices and AA / FM over the steps so far. A picture is
        derived data: if it cannot be drawn the run goes on with a warning."""
        try:
            draw_report(self.matrix.to_dict(), self.run_dir / REPORT_FILE, self.run_dir.name)
        except Exception as e:  # noqa: BLE001 (matplotlib's errors are many; none may end a run)
            log.warning("%s could not be drawn (%s: %s)", self.run_dir / REPORT_FILE, type(e).__name__, e)

    def log_step(self, t: int) -> None:
        step, domain = self.steps[-1], self.domains[t]
        for d, res in step["evaluation"].items():
            m, acc = res["metrics"], res["selector_accuracy"]
            log.info("after %s | test %-10s IoU %.4f F1 %.4f MAE %.4f | selector %s | routed %s", domain, d,
                     m["iou"], m["f1"], m["mae"], "n/a (not learned yet)" if acc is None else f"{acc:.1%}",
                     res.get("selector_counts", "-"))
        s = step["summary"]["iou"]
        log.info("after %s | IoU AA %s FM %s FT %s | FM_max %s BWT %s FWT %s AIA %s | unseen %s (vanilla %s)", domain,
                 *(_fmt(s[k]) for k in ("AA", "FM", "FT", "FM_max", "BWT", "FWT", "AIA", "unseen", "unseen_vanilla")))

    # ------------------------------------------------------------ what is written
    def module_summary(self) -> Dict:
        if getattr(self, "_summary", None) is None:
            self._summary = {"module": self.cfg.module, **self.model.module_summary()}
        return self._summary

    def metrics(self) -> Dict:
        summary = self.module_summary()
        return {
            "format": "samcl-metrics",
            "version": 1,
            "config": self.cfg.to_dict(),
            "versions": package_versions(),
            "backbone": backbone_identity(self.model.backbone),
            **({"aug_module": {k: summary[k] for k in ("counted_parameters", "counted_mb", "spec")}}
               if self.model.kind == "augmodule" else {}),
            "learning_module": summary,
            "accuracy_matrix": self.matrix.to_dict(),
            "steps": self.steps,
        }

    def write_manifest(self) -> None:
        write_json(self.run_dir / MANIFEST, {
            "format": "samcl-run",
            "version": 1,
            **self.identity(),
            "order": self.domains,
            "unseen": self.unseen,
            "completed": list(self.completed),
            "weights": self.weights,
            "modules": {d: module_path(self.run_dir, d, self.weights).name for d in self.completed
                        if d in self.with_module},
            "selector": self.method.run_files()[0] if self.method.run_files() else None,
            "files": self.checksums,
            **({"validation_files": self.validation_files} if self.validation_files else {}),
            "config": self.cfg.to_dict(),
            "versions": package_versions(),
        })


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
