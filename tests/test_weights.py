"""Official weights downloader (samcl.weights): SHA-256 verification, atomic install, no silent overwrite.

Nothing leaves this machine: files are served from a file:// folder or from an HTTP server on
127.0.0.1 that the test starts and stops; $SAMCL_WEIGHTS_BASE_URL points the downloader at them.
"""
import hashlib
import http.server
import re
import subprocess
import sys
import threading

import pytest

from samcl import weights
from tests.conftest import REPO

FILE = "sam_vit_b_01ec64.pth"  # vit_b's official file name, with a test payload and its hash
GOOD = b"official weights " * 4096
BAD = bytes(reversed(GOOD))  # same size, other bytes: a corrupt transfer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A file:// folder serving the official names; vit_b's table entry is the test payload's."""
    folder = tmp_path / "source"
    folder.mkdir()
    monkeypatch.setenv(weights.BASE_URL_ENV, folder.as_uri())
    monkeypatch.setitem(weights.SHA256, FILE, (sha(GOOD), len(GOOD)))
    return folder


def download(ck, *args):
    return weights.main(["download", *args, "--dir", str(ck)])


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_file_is_verified_and_installed_then_kept(source, tmp_path, capsys):
    (source / FILE).write_bytes(GOOD)
    ck = tmp_path / "checkpoint"
    assert download(ck, "vit_b") == 0
    assert (ck / FILE).read_bytes() == GOOD and listing(ck) == [FILE]  # no temporary file left
    assert "verified" in capsys.readouterr().out
    (source / FILE).unlink()  # a second run must not download: the good file is kept
    assert download(ck, FILE) == 0
    assert "present and verified" in capsys.readouterr().out and (ck / FILE).read_bytes() == GOOD


def test_corrupt_download_is_refused_and_leaves_no_file(source, tmp_path, capsys):
    (source / FILE).write_bytes(BAD)
    ck = tmp_path / "checkpoint"
    assert download(ck, "vit_b") == 2
    err = capsys.readouterr().err
    assert FILE in err and "nothing was installed" in err and sha(BAD) in err
    assert listing(ck) == []


class _Handler(http.server.BaseHTTPRequestHandler):
    """Announces the whole payload but sends only half of it, then drops the connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(GOOD)))
        self.end_headers()
        self.wfile.write(GOOD[: len(GOOD) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def broken_server(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(weights, "TIMEOUT_S", 10)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_interrupted_download_leaves_no_file(source, broken_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(weights.BASE_URL_ENV, broken_server)
    ck = tmp_path / "checkpoint"
    assert download(ck, "vit_b") == 2
    err = capsys.readouterr().err
    assert FILE in err and "nothing was installed" in err
    assert listing(ck) == []


def test_existing_file_with_wrong_hash_is_reported_and_not_overwritten(source, tmp_path, capsys):
    (source / FILE).write_bytes(GOOD)
    ck = tmp_path / "checkpoint"
    ck.mkdir()
    (ck / FILE).write_bytes(b"truncated")
    assert download(ck, "vit_b") == 2
    err = capsys.readouterr().err
    assert str(ck / FILE) in err and "not overwritten" in err and "--force" in err
    assert (ck / FILE).read_bytes() == b"truncated"
    assert weights.main(["verify", "--dir", str(ck)]) == 2  # verify reports it too
    assert re.search(rf"error: .*{re.escape(FILE)}: SHA-256 {sha(b'truncated')}", capsys.readouterr().out)


def test_force_replaces_a_bad_file_and_says_so(source, tmp_path, capsys):
    (source / FILE).write_bytes(GOOD)
    ck = tmp_path / "checkpoint"
    ck.mkdir()
    (ck / FILE).write_bytes(b"truncated")
    assert download(ck, "vit_b", "--force") == 0
    assert "--force: replacing it" in capsys.readouterr().out
    assert (ck / FILE).read_bytes() == GOOD and listing(ck) == [FILE]
    assert weights.main(["verify", "--dir", str(ck)]) == 0


def test_force_keeps_the_old_file_when_the_new_download_is_corrupt(source, tmp_path):
    (source / FILE).write_bytes(BAD)
    ck = tmp_path / "checkpoint"
    ck.mkdir()
    (ck / FILE).write_bytes(b"truncated")
    assert download(ck, "vit_b", "--force") == 2
    assert (ck / FILE).read_bytes() == b"truncated" and listing(ck) == [FILE]


def test_unknown_hash_needs_trust_records_it_and_never_overwrites(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(weights.SHA256, FILE, (None, None))
    (source / FILE).write_bytes(GOOD)
    ck = tmp_path / "checkpoint"
    assert download(ck, "vit_b") == 2
    err = capsys.readouterr().err
    assert "cannot be verified" in err and "--trust-unverified" in err and listing(ck) == []

    assert download(ck, "vit_b", "--trust-unverified") == 0
    assert "UNVERIFIED" in capsys.readouterr().out and (ck / FILE).read_bytes() == GOOD
    assert (ck / weights.SUMS_FILE).read_text() == f"{sha(GOOD)}  {FILE}\n"
    assert download(ck, "vit_b") == 0  # matches its recorded hash: kept
    assert weights.main(["verify", "--dir", str(ck)]) == 0

    (ck / FILE).write_bytes(b"changed")  # an existing unverifiable file is never overwritten, even with --force
    (source / FILE).write_bytes(BAD)
    capsys.readouterr()
    assert download(ck, "vit_b", "--force", "--trust-unverified") == 2
    assert "never overwritten" in capsys.readouterr().err
    assert (ck / FILE).read_bytes() == b"changed"
    assert (ck / weights.SUMS_FILE).read_text() == f"{sha(GOOD)}  {FILE}\n"


def test_cli_refuses_a_wrong_file_against_the_published_table(tmp_path):
    """The real table (no override): a fake file under the official name is refused, exit 2, no traceback."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "sam2.1_hiera_tiny.pt").write_bytes(GOOD)
    ck = tmp_path / "checkpoint"
    env = {"PATH": "/usr/bin:/bin", weights.BASE_URL_ENV: source.as_uri()}
    r = subprocess.run([sys.executable, "-m", "samcl.weights", "download", "hiera_t", "--dir", str(ck)],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sam2.1_hiera_tiny.pt" in r.stderr and "nothing was" in r.stderr.lower()
    assert listing(ck) == []
    r = subprocess.run([sys.executable, "-m", "samcl.weights", "download", "vit_q"], cwd=REPO,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "vit_b" in r.stderr


def test_table_covers_every_official_checkpoint_with_its_published_address(monkeypatch):
    monkeypatch.delenv(weights.BASE_URL_ENV, raising=False)
    table = weights.official_weights()
    assert {w.arch for w in table.values()} == {"vit_b", "vit_l", "vit_h", "hiera_t", "hiera_s", "hiera_b+", "hiera_l"}
    assert set(weights.SHA256) == set(table)  # one hash entry per official file, no stray ones
    for w in table.values():
        assert re.fullmatch(r"[0-9a-f]{64}", w.sha256) and w.size > 0, w.file
    readme = (REPO / "checkpoint" / "README.md").read_text()
    for w in table.values():
        if w.file.startswith("sam_") or w.file == "sam2.1_hiera_tiny.pt":
            assert w.url in readme, w.url
    assert table["sam2.1_hiera_large.pt"].url == \
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
    assert weights.resolve("hiera_b+", table).file == "sam2.1_hiera_base_plus.pt"
