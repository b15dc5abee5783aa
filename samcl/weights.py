"""Official backbone weights: fetch them into checkpoint/ and verify their SHA-256.

    python -m samcl.weights download vit_b                  # or a file name: sam_vit_b_01ec64.pth
    python -m samcl.weights download hiera_t hiera_l --dir checkpoint
    python -m samcl.weights verify                          # check what checkpoint/ holds

NAME is an architecture (configs/models/sam.yaml, sam2.yaml: vit_b, vit_l, vit_h, hiera_t,
hiera_s, hiera_b+, hiera_l) or its official file name. Files come from the addresses the
official repositories publish (segment-anything's README; sam2's
checkpoints/download_ckpts.sh), or from ``$SAMCL_WEIGHTS_BASE_URL/<file>`` when that
variable is set (a mirror, or a local ``file://`` folder). A download goes to a temporary
file beside the target and is renamed only once its size and SHA-256 match ``SHA256``
below, so a failed or interrupted download never leaves a file under the official name.
An existing good file is kept; an existing file with the wrong hash is reported and only
replaced with ``--force``. A file without a published hash is downloaded only with
``--trust-unverified`` (its hash is then appended to ``checkpoint/SHA256SUMS``), and an
existing copy of it is never overwritten. Errors name the file and the fix; exit code 2.
"""
import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Tuple

from .config import CHECKPOINT_DIR, load_model_table

BASE_URL_ENV = "SAMCL_WEIGHTS_BASE_URL"
# where each model table's official files are published
BASE_URLS = {
    "sam.yaml": "https://dl.fbaipublicfiles.com/segment_anything/",  # segment-anything README
    "sam2.yaml": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/",  # sam2 checkpoints/download_ckpts.sh
}
DEFAULT_DIR = CHECKPOINT_DIR
SUMS_FILE = "SHA256SUMS"  # hashes of files downloaded with --trust-unverified ("<sha256>  <file>" lines)
PART_SUFFIX = ".part"
CHUNK = 1 << 20
TIMEOUT_S = 60

# file -> (SHA-256, size in bytes); None where no SHA-256 is published (download then needs
# --trust-unverified). This table is the one place the hashes live.
# Meta publishes no checksums beside these files. Each SHA-256 below is published by
# micro-sam, which fetches these very addresses with pooch and checks them against it:
#   SAM:      https://github.com/computational-cell-analytics/micro-sam/blob/00006fc6a86d4f6888f7ef333cf070987ffabb51/micro_sam/util.py
#             (MODELS registry: vit_h, vit_l, vit_b)
#   SAM 2.1:  https://github.com/computational-cell-analytics/micro-sam/blob/05c57cce615abd66915365b7ca6c9bf552b71455/micro_sam/v2/util.py
#             (HASHES: hvit_t, hvit_s, hvit_b, hvit_l)
# and each is the Git LFS object id (the SHA-256 of the bytes), with the byte size given here,
# of copies of the official files on the Hugging Face Hub, cited per file.
SHA256: Dict[str, Tuple[Optional[str], Optional[int]]] = {
    # https://huggingface.co/sam-hq-team/sam-hq-training/commit/d401202bc7a12ffcf56557bd3f2c38d1a154f4e8
    "sam_vit_b_01ec64.pth": ("ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375042383),
    # https://huggingface.co/netradrishti/sam/commit/0ca332df7096f034b3d7f18f9ce6b6912dbce70b
    "sam_vit_l_0b3195.pth": ("3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1249524607),
    # https://huggingface.co/sam-hq-team/sam-hq-training/commit/d401202bc7a12ffcf56557bd3f2c38d1a154f4e8
    "sam_vit_h_4b8939.pth": ("a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2564550879),
    # SAM 2.1 (all four): https://huggingface.co/camenduru/sam2-1-hiera/commit/cdd35a45a78a3a93bc99988f4b56db40131a823a
    "sam2.1_hiera_tiny.pt": ("7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156008466),
    "sam2.1_hiera_small.pt": ("6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", 184416285),
    "sam2.1_hiera_base_plus.pt": ("a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", 323606802),
    "sam2.1_hiera_large.pt": ("2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898083611),
}


class WeightsError(Exception):
    """A problem the user can fix; the message names the file and the fix."""


@dataclass(frozen=True)
class Weight:
    file: str
    arch: str
    url: str
    sha256: Optional[str]
    size: Optional[int]


def official_weights(base_url: Optional[str] = None) -> Dict[str, Weight]:
    """File name -> Weight for every architecture with an official checkpoint in configs/models/.

    ``base_url`` (default ``$SAMCL_WEIGHTS_BASE_URL``) replaces every published address with
    ``<base_url>/<file>``."""
    base_url = base_url or os.environ.get(BASE_URL_ENV)
    table = {}
    for models, published in BASE_URLS.items():
        for arch, spec in load_model_table(models).items():
            file = spec.get("checkpoint")
            if file:
                sha, size = SHA256.get(file, (None, None))
                url = base_url.rstrip("/") + "/" + file if base_url else published + file
                table[file] = Weight(file, arch, url, sha, size)
    return table


def resolve(name: str, table: Dict[str, Weight]) -> Weight:
    by_arch = {w.arch: w for w in table.values()}
    if name in table or name in by_arch:
        return table.get(name) or by_arch[name]
    for models in BASE_URLS:
        if name in load_model_table(models):
            raise WeightsError(f"{name} has no official weights (it is built with random weights for tests and "
                               f"the demo); choose one of: {', '.join(by_arch)}")
    raise WeightsError(f"unknown weights {name!r}: give an architecture ({', '.join(by_arch)}) or an official file "
                       f"name ({', '.join(table)})")


def hash_stream(src: BinaryIO, dst: Optional[BinaryIO] = None, progress=None) -> Tuple[str, int]:
    """SHA-256 and length of what ``src`` yields, copied to ``dst`` on the way if given."""
    h, n = hashlib.sha256(), 0
    for block in iter(lambda: src.read(CHUNK), b""):
        h.update(block)
        n += len(block)
        if dst is not None:
            dst.write(block)
        if progress is not None:
            progress.update(len(block))
    return h.hexdigest(), n


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hash_stream(f)[0]


def recorded_sums(folder: Path) -> Dict[str, str]:
    """The hashes --trust-unverified recorded in <folder>/SHA256SUMS (the latest line per file wins)."""
    path = Path(folder) / SUMS_FILE
    sums = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def fetch(w: Weight, dest: Path) -> str:
    """Download ``w`` to ``dest`` atomically: a temporary file in dest's folder, renamed only if
    its size (where known) and SHA-256 (where known) match. Returns the file's SHA-256."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PART_SUFFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(w.url, timeout=TIMEOUT_S) as response:
                    announced = response.headers.get("Content-Length")
                    announced = int(announced) if announced and announced.isdigit() else None
                    if announced is not None and w.size is not None and announced != w.size:
                        raise WeightsError(f"{w.file}: {w.url} announces {announced} bytes, but the published file "
                                           f"has {w.size}; it serves another file. Nothing was downloaded; check "
                                           f"the address (or ${BASE_URL_ENV}).")
                    with tqdm(total=announced or w.size, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=w.file, file=sys.stderr, leave=False) as bar:
                        sha, n = hash_stream(response, out, bar)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
                raise WeightsError(f"{w.file}: download from {w.url} failed ({reason}); nothing was "
                                   f"installed. Check the network (or ${BASE_URL_ENV}) and run the command again, or "
                                   f"fetch the file by hand into {dest.parent} and run `python -m samcl.weights verify`"
                                   ) from None
            out.flush()
            os.fsync(out.fileno())
        expected_n = announced if announced is not None else w.size
        if expected_n is not None and n != expected_n:
            raise WeightsError(f"{w.file}: the download from {w.url} stopped after {n} of {expected_n} bytes "
                               f"(interrupted transfer); nothing was installed. Run the command again.")
        if w.sha256 is not None and sha != w.sha256:
            raise WeightsError(f"{w.file}: the download from {w.url} has SHA-256 {sha}, not the published {w.sha256} "
                               f"(corrupt transfer or a different file); nothing was installed. Run the command "
                               f"again; if it persists, the source serves another file.")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sha


def download_one(w: Weight, folder: Path, force: bool = False, trust_unverified: bool = False) -> str:
    """Install one file in ``folder``; returns what was done. Raises WeightsError."""
    dest = Path(folder) / w.file
    if w.sha256 is None:
        return _download_unverified(w, dest, trust_unverified)
    if dest.is_file():
        sha = file_sha256(dest)
        if sha == w.sha256:
            return f"{dest}: present and verified (SHA-256 {sha}); kept"
        if not force:
            raise WeightsError(f"{dest} exists but its SHA-256 is {sha}, not the published {w.sha256} (truncated, "
                               f"corrupt or another file); it was not overwritten. Re-run with --force to replace it.")
        print(f"{dest}: SHA-256 {sha} does not match the published {w.sha256}; --force: replacing it", flush=True)
    fetch(w, dest)
    return f"{dest}: downloaded from {w.url} and verified (SHA-256 {w.sha256})"


def _download_unverified(w: Weight, dest: Path, trust_unverified: bool) -> str:
    recorded = recorded_sums(dest.parent).get(w.file)
    if dest.exists():
        sha = file_sha256(dest)
        if recorded == sha:
            return f"{dest}: present; no published SHA-256, matches the hash in {dest.parent / SUMS_FILE}; kept"
        found = (f"its SHA-256 {sha} differs from {recorded} recorded in {dest.parent / SUMS_FILE}" if recorded
                 else f"no SHA-256 is published for it and none is recorded in {dest.parent / SUMS_FILE}")
        raise WeightsError(f"{dest} exists but cannot be verified: {found}. It is never overwritten: to replace it, "
                           f"delete it and run `python -m samcl.weights download {w.file} --trust-unverified`.")
    if not trust_unverified:
        raise WeightsError(f"{w.file}: no published SHA-256, so a download cannot be verified; nothing was "
                           f"downloaded. Pass --trust-unverified to download it anyway (its hash is then recorded "
                           f"in {dest.parent / SUMS_FILE}).")
    sha = fetch(w, dest)
    with open(dest.parent / SUMS_FILE, "a") as f:
        f.write(f"{sha}  {w.file}\n")
    return (f"{dest}: downloaded from {w.url} UNVERIFIED (no published SHA-256); its SHA-256 {sha} is recorded in "
            f"{dest.parent / SUMS_FILE}")


def verify_folder(folder: Path, table: Dict[str, Weight]) -> List[Tuple[str, str]]:
    """(status, line) for each official file in ``folder`` and each leftover temporary file;
    status is "ok", "absent" or "bad"."""
    folder = Path(folder)
    recorded = recorded_sums(folder)
    report = []
    for w in table.values():
        path = folder / w.file
        if not path.is_file():
            report.append(("absent", f"{path}: absent (`python -m samcl.weights download {w.arch}` fetches it)"))
            continue
        sha = file_sha256(path)
        if w.sha256 == sha:
            report.append(("ok", f"{path}: OK (SHA-256 {sha})"))
        elif w.sha256 is not None:
            report.append(("bad", f"{path}: SHA-256 {sha}, not the published {w.sha256} (truncated, corrupt or another "
                                  f"file). Replace it: `python -m samcl.weights download {w.file} --force`."))
        elif recorded.get(w.file) == sha:
            report.append(("ok", f"{path}: no published SHA-256; matches {folder / SUMS_FILE}"))
        else:
            found = f"{folder / SUMS_FILE} records {recorded[w.file]}" if w.file in recorded else "none is recorded"
            report.append(("bad", f"{path}: cannot be verified (no published SHA-256; {found}; the file has {sha}). "
                                  f"If in doubt, delete it and download it again with --trust-unverified."))
    if folder.is_dir():
        for part in sorted(folder.glob(f".*{PART_SUFFIX}")):
            report.append(("bad", f"{part}: left over from an interrupted download (the process was killed); "
                                  f"delete it."))
    return report


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m samcl.weights", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch official weights into --dir, verified by SHA-256")
    d.add_argument("names", nargs="+", metavar="NAME", help="architecture (vit_b, hiera_t, ...) or official file name")
    d.add_argument("--force", action="store_true", help="replace an existing file whose SHA-256 is wrong")
    d.add_argument("--trust-unverified", action="store_true",
                   help="download files without a published SHA-256 and record their hash in SHA256SUMS")
    v = sub.add_parser("verify", help="check the SHA-256 of the official files in --dir")
    for q in (d, v):
        q.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"weights folder (default {DEFAULT_DIR})")
    args = p.parse_args(argv)
    table = official_weights()
    errors: List[str] = []
    try:
        if args.command == "verify":
            report = verify_folder(args.dir, table)
            for status, line in report:
                print(("error: " if status == "bad" else "") + line)
            counts = {k: sum(status == k for status, _ in report) for k in ("ok", "bad", "absent")}
            print(f"{args.dir}: {counts['ok']} verified, {counts['bad']} bad, {counts['absent']} absent")
            if counts["bad"]:
                return 2
        else:
            for w in [resolve(n, table) for n in args.names]:
                try:
                    print(download_one(w, args.dir, args.force, args.trust_unverified), flush=True)
                except WeightsError as e:
                    errors.append(str(e))
                except OSError as e:  # the folder: not writable, full disk, a folder under the file's name
                    errors.append(f"{w.file}: {e}; nothing was installed. Make {args.dir} a writable folder with "
                                  f"room for the file and run the command again.")
    except WeightsError as e:
        errors.append(str(e))
    except OSError as e:  # verify: a file that cannot be read
        errors.append(f"{e}; make it readable (or move it away) and run the command again")
    except KeyboardInterrupt:
        errors.append("interrupted; nothing partial was installed (a download in progress is discarded)")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
