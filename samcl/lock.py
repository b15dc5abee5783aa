"""One writer per run folder: the OS's advisory lock on ``<run folder>/.lock``.

A process that trains in a run folder (a new run, a resume, a sweep's run) holds an exclusive
``flock`` on the folder's ``.lock`` file for as long as it writes there; a second one is refused at
once, naming the holder (pid, host and since when: the holder writes them into the file). The kernel
drops the lock when its process ends, however it ends (a SIGKILL, the OOM killer), so a lock is
never stale: a later process takes it, and if it finds the dead holder's details still in the file
(the holder did not end cleanly) it says so in a warning. A clean release empties the file; the
file itself stays (removing it would let a process that opened the old file hold a lock nobody
else sees). ``flock`` is honoured between processes of one machine and, on Linux, over NFS.
"""
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Dict, Optional, Type

log = logging.getLogger("samcl.lock")
LOCK_FILE = ".lock"


class RunFolderLocked(ValueError):
    """Another process holds the run folder's lock; the message names it and what to do."""


def _describe(holder: Dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since}"


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder's lock (creating the folder and the file).
    ``name``: another lock file of the folder; ``wait``: wait for the holder to release it instead of
    refusing (for a short write, such as a sweep's summary)."""

    def __init__(self, run_dir: Path, name: str = LOCK_FILE, wait: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self.wait = wait
        self._fd: Optional[int] = None

    def holder(self) -> Optional[Dict]:
        """What the lock file says of its holder (None: empty or unreadable)."""
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            held = self.holder()
            who = _describe(held) if held else "another process"
            raise RunFolderLocked(f"run folder {self.run_dir} is in use: {who} is training in it (lock "
                                  f"{self.path}); wait for it to end or stop it, or use another --run_dir") from None
        left = self.holder()
        if left is not None:
            log.warning("run folder %s: taking over the lock left by %s, which ended without releasing it (killed "
                        "or crashed)", self.run_dir, _describe(left))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # the details go first: a holder seen after this is one that did not end cleanly
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()


def lock_holder(run_dir: Path, name: str = LOCK_FILE) -> Optional[Dict]:
    """Who holds ``run_dir``'s lock now (what the holder wrote: pid, host, since), or None.

    An empty or absent file means no holder. Details left by a holder that ended without releasing
    are told apart by trying a shared lock for an instant (a trainer starting in that instant would
    be refused, as by any other holder; the probe is made only where such details are left)."""
    path = Path(run_dir) / name
    held = RunLock(run_dir, name).holder()
    if held is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return held
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
