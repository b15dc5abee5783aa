"""Domain datasets in the release's folder layout.

``<split>/images/<name>.<ext>``, ``<split>/masks/<name>.<ext>`` and
``<split>/masks/points.json``; ``datasets_{train,test}.json`` map domain keys to
split folders. Images and masks are paired by file stem.

A sample is prepared exactly as the release prepares it: the image decoded by PIL
(``convert('RGB')``) and resized to S x S with PIL's bilinear filter (aspect ratio
ignored; PIL antialiases when it shrinks), uint8 0..255, CHW; the mask decoded by
PIL (``convert('L')``), resized with PIL's nearest neighbour (pixel-centre
sampling) and binarised; the static prompt points scaled from the 1024 x 1024
frame of ``points.json`` to the S x S frame.

torch is imported where tensors are made, so that reading and checking files
(``generate_point.py``, ``samcl.datacheck``) starts without it.
"""
import io
import json
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
POINTS_FILE = "points.json"
POINTS_FRAME = 1024  # points.json coordinates live in a 1024 x 1024 frame
PAD_LABEL = -1  # SAM's label for a padding point


class DataError(ValueError):
    """A problem with the data on disk; the message names the file and the fix."""


def domain_map_file(json_path: Path, data_root: Path) -> Path:
    """The absolute path of a domain map: an absolute ``json_path`` as it is, a relative one under ``data_root``."""
    return Path(os.path.abspath(Path(data_root) / json_path))


def _same_map(a: Path, b: Path) -> bool:
    """Whether two map files say the same (same bytes, or the same JSON object)."""
    if a.read_bytes() == b.read_bytes():
        return True
    try:
        return json.loads(a.read_text()) == json.loads(b.read_text())
    except (ValueError, UnicodeDecodeError):
        return False


def read_domain_map(json_path: Path, data_root: Path) -> Dict[str, Path]:
    """``{"Kvasir": "data/Kvasir/train", ...}`` -> domain key -> split folder under data_root.

    A relative ``json_path`` is read under ``data_root`` (:func:`domain_map_file`); a map of the same
    name in the current folder that says something else is refused, naming both files, as either
    could be the one meant. Every message names the absolute path of the map.
    """
    path = domain_map_file(json_path, data_root)
    here = Path(os.path.abspath(json_path))
    elsewhere = not Path(json_path).is_absolute() and here != path and here.is_file()
    if not path.is_file():
        hint = (f"; the current folder has {here}, but a relative map path is read under the data root "
                f"{os.path.abspath(data_root)}: pass --data_root or the map's absolute path" if elsewhere else
                "; it maps domain keys to split folders (see docs/data.md)")
        raise DataError(f"domain map {path} not found{hint}")
    if elsewhere and not here.samefile(path) and not _same_map(here, path):
        raise DataError(f"two different domain maps named {json_path}: {path} (under the data root, the one a "
                        f"relative path names) and {here} (in the current folder); remove or rename the one not "
                        f"meant, or pass the map's absolute path")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"domain map {path} is not valid JSON: {e}") from None
    if not isinstance(mapping, dict):
        raise DataError(f"domain map {path} must be an object of domain key -> folder")
    return {k: Path(data_root) / v for k, v in mapping.items()}


def list_images(folder: Path) -> List[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)


def files_by_stem(folder: Path) -> Dict[str, Path]:
    """stem -> image file of a folder; two files with one stem (a.jpg and a.png) are refused by name,
    as either could be the pair of the other folder's file."""
    out: Dict[str, Path] = {}
    for p in list_images(folder):
        if p.stem in out:
            raise DataError(f"{folder}: {out[p.stem].name} and {p.name} share the name {p.stem!r}; images and masks "
                            f"pair by file name without extension: rename or remove one of them")
        out[p.stem] = p
    return out


def pair_split(split_dir: Path) -> List[Tuple[Path, Path]]:
    """(image, mask) pairs of a split, matched by file stem; mismatches are an error naming them."""
    split_dir = Path(split_dir)
    img_dir, mask_dir = split_dir / "images", split_dir / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{d} is missing; a split folder holds images/ and masks/ (see data/README.md)")
    images, masks = files_by_stem(img_dir), files_by_stem(mask_dir)
    problems = []
    for label, names in (("images without a mask", sorted(set(images) - set(masks))),
                         ("masks without an image", sorted(set(masks) - set(images)))):
        if names:
            shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise DataError(f"{split_dir}: images and masks do not pair by file name; " + "; ".join(problems))
    if not images:
        raise DataError(f"{split_dir}: no images found in {img_dir} (extensions {', '.join(IMAGE_EXTS)})")
    return [(images[s], masks[s]) for s in sorted(images)]


def read_image(path: Path, gray: bool = False) -> Image.Image:
    """Decode an image file strictly -> a PIL image in mode "RGB" (or "L" with ``gray``).

    As the release: ``Image.open(path).convert('RGB' | 'L')`` (EXIF orientation is not
    applied; alpha is dropped; palette images are expanded; PIL's own conversions for
    16-bit files). Corrupt files, truncated ones (PIL refuses those, and a JPEG without
    its end-of-image marker, which decoders would fill with grey, is refused here) and
    decompression bombs raise a DataError naming the file.
    """
    data = Path(path).read_bytes()
    # JPEG scan data never holds 0xFFD9 (byte stuffing), so a complete file has its
    # end-of-image marker after the last start-of-scan, even with a trailer behind it.
    truncated_jpeg = data[:2] == b"\xff\xd8" and data.find(b"\xff\xd9", data.rfind(b"\xff\xda")) < 0
    reason = "truncated JPEG" if truncated_jpeg else ""
    if not reason:
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("L" if gray else "RGB")
        except Image.DecompressionBombError as e:
            reason = f"too large to decode safely: {e}"
        except Image.UnidentifiedImageError:
            reason = "not an image format PIL can read" if data else "empty file"
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated and broken files
            reason = f"unreadable: {e}"
    raise DataError(f"{path}: cannot decode the image ({reason}); it is corrupt or truncated. "
                    f"Re-export it, or remove it together with its pair.")


def resize_image(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> size x size x C uint8 with PIL's bilinear filter (torchvision ``Resize`` on a PIL image)."""
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def resize_mask(mask: Image.Image, size: int) -> np.ndarray:
    """PIL "L" mask -> size x size uint8 with PIL's nearest neighbour (pixel-centre sampling)."""
    return np.asarray(mask.resize((size, size), Image.Resampling.NEAREST))


def binarize_mask(mask: np.ndarray, rule: str = "threshold", threshold: int = 128) -> np.ndarray:
    """uint8 mask -> {0, 1}: ``>= threshold`` (default) or the release's floor(v / 255) (quirk Q5)."""
    if rule == "threshold":
        return (mask >= threshold).astype(np.uint8)
    if rule == "reference":
        return (mask.astype(np.int32) // 255).astype(np.uint8)
    raise ValueError(f"mask binarisation rule must be 'threshold' or 'reference', got {rule!r}")


def load_mask(path: Path, size: int, rule: str = "threshold", threshold: int = 128) -> np.ndarray:
    """Mask file -> size x size {0, 1} uint8 (decoded and resized as the release, then binarised)."""
    return binarize_mask(resize_mask(read_image(path, gray=True), size), rule, threshold)


def read_points(split_dir: Path) -> Dict[str, list]:
    path = Path(split_dir) / "masks" / POINTS_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; generate the static prompt points with `python generate_point.py`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); regenerate it with `python generate_point.py`") from None


def lookup_points(points: Dict[str, list], image: Path, mask: Path) -> Optional[list]:
    """The points.json entry of a pair: keyed by mask name, image name, or (fallback) stem."""
    for key in (mask.name, image.name):
        if key in points:
            return points[key]
    return None


class SegmentationSplit:
    """One split of one domain: a map-style dataset for torch's DataLoader (``__len__`` and
    ``__getitem__``; no torch base class, so that this module imports without torch).

    Items are dicts: ``image`` (3, S, S) uint8, ``mask`` (1, S, S) float {0, 1},
    ``points`` (P, 2) float (x, y) in the S frame, ``labels`` (P,) long, ``name`` str,
    ``index`` int, ``domain`` str (the split's domain key).
    """

    def __init__(self, split_dir: Path, img_size: int, mask_binarize: str = "threshold",
                 mask_threshold: int = 128, domain: str = "") -> None:
        self.split_dir = Path(split_dir)
        self.img_size = int(img_size)
        self.mask_binarize = mask_binarize
        self.mask_threshold = mask_threshold
        self.domain = domain
        self.pairs = pair_split(self.split_dir)
        all_points = read_points(self.split_dir)
        by_stem = {Path(k).stem: v for k, v in all_points.items()}
        self.points: List[list] = []
        missing = []
        for img, mask in self.pairs:
            entry = lookup_points(all_points, img, mask) or by_stem.get(img.stem)
            if entry is None:
                missing.append(mask.name)
            else:  # checked before anything is trained or written (and parsed again when the sample is read)
                parse_points_entry(entry, f"{mask.name} in {self.split_dir / 'masks' / POINTS_FILE}")
            self.points.append(entry)
        if missing:
            raise DataError(f"{self.split_dir / 'masks' / POINTS_FILE} has no points for {len(missing)} image(s): "
                            f"{', '.join(missing[:10])}; regenerate it with `python generate_point.py`")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        import torch

        img_path, mask_path = self.pairs[i]
        img = read_image(img_path)
        raw_mask = read_image(mask_path, gray=True)
        if raw_mask.size != img.size:
            raise DataError(f"{mask_path} is {raw_mask.width}x{raw_mask.height} but its image {img_path} is "
                            f"{img.width}x{img.height}; a mask must have its image's size")
        s = self.img_size
        image = resize_image(img, s)
        mask = binarize_mask(resize_mask(raw_mask, s), self.mask_binarize, self.mask_threshold)
        coords, labels = parse_points_entry(self.points[i], f"{mask_path.name} in {self.split_dir / 'masks' / POINTS_FILE}")
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask).float().unsqueeze(0),
            "points": coords * (s / POINTS_FRAME),
            "labels": labels,
            "name": img_path.name,
            "index": i,
            "domain": self.domain,
        }


class JointSplit:
    """Several splits read as one dataset, in the order given; ``index`` runs on through them
    (unique over the union, as the feature cache and the evaluation need)."""

    def __init__(self, splits: Sequence[SegmentationSplit]) -> None:
        self.splits = list(splits)
        self.starts = np.cumsum([0] + [len(s) for s in self.splits])
        self.domain = "+".join(s.domain for s in self.splits)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        item = self.splits[k][i - int(self.starts[k])]
        item["index"] = i
        return item


def hold_out(n: int, fraction: float, seed: int, domain: str) -> Tuple[List[int], List[int]]:
    """(kept, held out) item indices of a split of ``n`` items, each list sorted and together all of them.

    ``round(fraction * n)`` items are held out (at least one, and one at least is kept), drawn
    without replacement by ``numpy.random.default_rng([seed, crc32(domain)])``: the same for a
    seed and a domain whatever the order or the other domains.
    """
    if n < 2:
        raise DataError(f"{domain} has {n} training image(s): holding out a validation fraction needs two at least")
    count = min(max(int(round(fraction * n)), 1), n - 1)
    rng = np.random.default_rng([int(seed), zlib.crc32(domain.encode("utf-8"))])
    held = sorted(int(i) for i in rng.permutation(n)[:count])
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], held


class SplitPart:
    """The items ``indices`` of a split read as a dataset of their own, in that order; ``index``
    runs 0..len-1 through the part (unique within it, as the feature cache and the buffer need)."""

    def __init__(self, split: SegmentationSplit, indices: Sequence[int]) -> None:
        self.split = split
        self.indices = [int(i) for i in indices]
        self.domain = split.domain
        self.pairs = [split.pairs[i] for i in self.indices]

    @property
    def names(self) -> List[str]:
        """The part's image file names, in order."""
        return [image.name for image, _mask in self.pairs]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        item = self.split[self.indices[i]]
        item["index"] = i
        return item


def parse_points_entry(entry: list, where: str) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """``[[[x, y], ...], [1, ...]]`` -> (P, 2) float and (P,) long; points must lie in the
    1024 x 1024 frame of points.json and labels be 1 (foreground) or 0 (background)."""
    import torch

    try:
        coords = torch.tensor(entry[0], dtype=torch.float32).reshape(-1, 2)
        labels = torch.tensor(entry[1], dtype=torch.long).reshape(-1)
    except Exception:
        raise DataError(f"points of {where} are not [[[x, y], ...], [label, ...]]: {entry!r}") from None
    if coords.shape[0] != labels.shape[0] or coords.shape[0] == 0:
        raise DataError(f"points of {where}: {coords.shape[0]} points but {labels.shape[0]} labels")
    outside = ~((coords >= 0) & (coords <= POINTS_FRAME)).all(1)  # NaN is outside too
    if outside.any():
        raise DataError(f"points of {where}: {coords[outside].tolist()[:3]} lie outside the {POINTS_FRAME}x"
                        f"{POINTS_FRAME} frame of {POINTS_FILE} (0..{POINTS_FRAME}); regenerate it with "
                        f"`python generate_point.py`")
    if not ((labels == 0) | (labels == 1)).all():
        raise DataError(f"points of {where}: labels {sorted(set(labels.tolist()))} must be 1 (foreground) or "
                        f"0 (background); regenerate it with `python generate_point.py`")
    return coords, labels


def collate(batch: Sequence[dict]) -> dict:
    """Stack samples; point sets of different sizes are padded with label -1 (ignored)."""
    import torch

    p = max(b["points"].shape[0] for b in batch)
    points = torch.zeros(len(batch), p, 2)
    labels = torch.full((len(batch), p), PAD_LABEL, dtype=torch.long)
    for i, b in enumerate(batch):
        points[i, : b["points"].shape[0]] = b["points"]
        labels[i, : b["labels"].shape[0]] = b["labels"]
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "points": points,
        "labels": labels,
        "name": [b["name"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch]),
        "domain": [b.get("domain", "") for b in batch],
    }
