"""Check a dataset tree before training: every split of both JSON maps, every problem at once.

    python generate_point.py --check [--data_root .] [--train_json ...] [--test_json ...] [--domains ...]
    python -m samcl.datacheck        [the same flags]

Reads every image and mask with the loaders training uses (``samcl.data``) and writes
nothing. Reported, one line per file: missing folders; images without a mask and masks
without an image (paired by file stem); two images or two masks with one stem;
unreadable, corrupt or truncated files; a mask of another size than its image; a mask with
no foreground (also a 0/1 mask, which binarisation reads as empty, and a foreground too
small to survive the resize to 1024x1024); a missing ``masks/points.json``, images it has
no entry for, malformed entries, points outside the 1024x1024 frame and entries that no
longer fit their mask (negative points for a mask with foreground, or the reverse); a
domain in one JSON map but not the other, or whose key holds the '_' that --order joins
keys with. Then a summary per domain and split.

A mask with values other than 0 and 255 that binarisation still reads correctly (the
anti-aliased edge of a JPEG mask) is a *warning*: it is counted and shown but does not
fail the check. Exit code 1 if there is any problem, 0 if none.
"""
import argparse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .data import (IMAGE_EXTS, POINTS_FILE, POINTS_FRAME, DataError, binarize_mask, domain_map_file, list_images,
                   lookup_points, parse_points_entry, read_domain_map, read_image, read_points, resize_mask)

SPLITS = ("train", "test")


@dataclass
class Finding:
    domain: str
    split: str
    path: Path
    message: str
    problem: bool = True  # False: a warning (shown, counted, not failing the check)

    def line(self) -> str:
        return f"{'problem' if self.problem else 'warning'}: {self.path}: {self.message}"


class SplitCheck:
    """The findings of one split folder (``<split>/images``, ``<split>/masks``, ``masks/points.json``)."""

    def __init__(self, domain: str, split: str, folder: Path, rule: str = "threshold", threshold: int = 128) -> None:
        self.domain, self.split, self.folder = domain, split, Path(folder)
        self.rule, self.threshold = rule, threshold
        self.findings: List[Finding] = []
        self.pairs = 0
        self.empty: Dict[Path, bool] = {}  # readable mask -> empty as training sees it (at 1024x1024)

    def add(self, path: Path, message: str, problem: bool = True) -> None:
        self.findings.append(Finding(self.domain, self.split, Path(path), message, problem))

    def add_error(self, path: Path, error: DataError) -> None:
        """A DataError from samcl.data, whose message starts with the file's name: drop that repeat."""
        text = str(error)
        if text.startswith(str(path)):
            text = text[len(str(path)):].lstrip(": ")
        self.add(path, text)

    def run(self) -> "SplitCheck":
        img_dir, mask_dir = self.folder / "images", self.folder / "masks"
        if not self.folder.is_dir():
            self.add(self.folder, f"split folder missing ({self.domain}'s {self.split} split in the JSON map)")
            return self
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                self.add(d, "folder missing: a split folder holds images/ and masks/ (see docs/data.md)")
        images = self._by_stem(img_dir, "images")
        masks = self._by_stem(mask_dir, "masks")
        if img_dir.is_dir() and not images:
            self.add(img_dir, f"no images (extensions {', '.join(IMAGE_EXTS)})")
        if mask_dir.is_dir():
            for stem in sorted(set(images) - set(masks)):
                self.add(images[stem], f"image without a mask: no masks/{stem}.* in {mask_dir}")
        if img_dir.is_dir():
            for stem in sorted(set(masks) - set(images)):
                self.add(masks[stem], f"mask without an image: no images/{stem}.* in {img_dir}")
        sizes = {}
        for p in list_images(img_dir) if img_dir.is_dir() else []:
            image = self._read(p, gray=False)
            sizes[p] = image.size if image else None
        if mask_dir.is_dir():
            sizes.update({p: self._check_mask(p) for p in list_images(mask_dir)})
        paired = [(images[s], masks[s]) for s in sorted(set(images) & set(masks))]
        self.pairs = len(paired)
        for img, mask in paired:
            if sizes[img] and sizes[mask] and sizes[img] != sizes[mask]:
                self.add(mask, f"mask is {sizes[mask][0]}x{sizes[mask][1]} but its image {img.name} is "
                               f"{sizes[img][0]}x{sizes[img][1]}; a mask must have its image's size")
        if mask_dir.is_dir():
            self._check_points(paired)
        return self

    def _by_stem(self, folder: Path, kind: str) -> Dict[str, Path]:
        """Stem -> file as samcl.data.pair_split pairs them (of two files with one stem, the later name wins)."""
        if not folder.is_dir():
            return {}
        groups: Dict[str, List[Path]] = defaultdict(list)
        for p in list_images(folder):
            groups[p.stem].append(p)
        for stem, files in groups.items():
            if len(files) > 1:
                self.add(files[0], f"{len(files)} {kind} share the stem {stem!r} ({', '.join(f.name for f in files)}): "
                                   f"only {files[-1].name} would be used; rename or remove the others")
        return {stem: files[-1] for stem, files in groups.items()}

    def _read(self, path: Path, gray: bool):
        """The file decoded as training decodes it, or None after reporting why it cannot be."""
        try:
            return read_image(path, gray=gray)
        except DataError as e:
            self.add_error(path, e)
            return None

    def _check_mask(self, path: Path) -> Optional[Tuple[int, int]]:
        mask = self._read(path, gray=True)
        if mask is None:
            return None
        values = np.asarray(mask)
        binarised = binarize_mask(values, self.rule, self.threshold)
        rule = f">= {self.threshold}" if self.rule == "threshold" else "floor(v/255), only 255 counts"
        odd = int(np.count_nonzero((values != 0) & (values != 255)))
        if odd and values.max() == 1:
            self.add(path, f"a 0/1 mask ({odd} pixels are 1): binarisation ({rule}) reads it as empty; save it "
                           f"with the values 0 and 255")
        elif odd and not binarised.any():
            self.add(path, f"not binary: {odd} pixels have values other than 0 and 255 (the highest is "
                           f"{values.max()}), none is foreground under binarisation ({rule}): it reads as empty")
        elif odd:
            self.add(path, f"not binary: {odd} pixels ({100 * odd / values.size:.2f} %) have values other than 0 and "
                           f"255 (e.g. an anti-aliased or JPEG edge); binarisation ({rule}) reads it as a mask of "
                           f"{int(binarised.sum())} foreground pixels", problem=False)
        elif not binarised.any():
            self.add(path, "no foreground: every pixel is background (generate_point.py gives it negative points); "
                           "if the object is missing, fix the mask or remove the pair")
        self.empty[path] = not binarize_mask(resize_mask(mask, POINTS_FRAME), self.rule, self.threshold).any()
        if binarised.any() and self.empty[path]:
            self.add(path, f"the foreground ({int(binarised.sum())} pixels) vanishes when the mask is resized to "
                           f"{POINTS_FRAME}x{POINTS_FRAME}: training and generate_point.py see it as empty")
        return mask.size

    def _check_points(self, paired: Sequence[Tuple[Path, Path]]) -> None:
        path = self.folder / "masks" / POINTS_FILE
        try:
            points = read_points(self.folder)
        except DataError as e:
            self.add_error(path, e)
            return
        if not isinstance(points, dict):
            self.add(path, "not a JSON object of mask name -> points; regenerate it with `python generate_point.py`")
            return
        by_stem = {Path(k).stem: v for k, v in points.items()}
        for img, mask in paired:
            entry = lookup_points(points, img, mask) or by_stem.get(img.stem)
            if entry is None:
                self.add(mask, f"no entry in {path}; regenerate it with `python generate_point.py`")
                continue
            try:
                coords, labels = parse_points_entry(entry, f"{mask.name} in {path}")
            except DataError as e:  # malformed, out of the 1024 frame, or labels other than 0/1
                self.add(mask, str(e))
                continue
            empty = self.empty.get(mask)  # None: the mask cannot be read (reported above)
            if empty is not None and bool((labels == 1).any() if empty else (labels == 0).all()):
                self.add(mask, f"its entry in {path} has {'positive' if empty else 'only negative'} points but the "
                               f"mask is {'empty' if empty else 'not empty'} (edited after the points were made?); "
                               f"regenerate them with `python generate_point.py`")


def check_tree(data_root: Path, train_json: str, test_json: str, domains: Optional[Sequence[str]] = None,
               rule: str = "threshold", threshold: int = 128) -> Tuple[List[Finding], List[SplitCheck]]:
    """Check every split that the two JSON maps name (or only ``domains``): (map findings, split checks)."""
    root = Path(data_root)
    given = (train_json, test_json)
    train_json, test_json = (str(domain_map_file(js, root)) for js in given)  # named so in every message
    findings: List[Finding] = []
    maps: Dict[str, Dict[str, Path]] = {}
    for split, js, named_as in zip(SPLITS, (train_json, test_json), given):
        try:
            maps[split] = read_domain_map(Path(named_as), root)
        except DataError as e:
            findings.append(Finding("", split, Path(js), str(e)))
    named = list(dict.fromkeys(d for m in maps.values() for d in m))
    for d in domains or []:
        if d not in named:
            findings.append(Finding(d, "", Path(train_json), f"--domains names {d!r}, which neither JSON map has"))
    selected = [d for d in named if domains is None or d in domains]
    for d in selected:
        if "_" in d:
            js = train_json if d in maps.get("train", {}) else test_json
            findings.append(Finding(d, "", Path(js), f"domain key {d!r} contains '_', which --order uses to join "
                                    f"keys (Kvasir_camo_...): rename it in both maps, e.g. {d.replace('_', '')!r}"))
    if len(maps) == 2:
        for d in selected:
            for split, js in zip(SPLITS, (train_json, test_json)):
                if d not in maps[split]:
                    other = test_json if split == "train" else train_json
                    findings.append(Finding(d, split, Path(js), f"domain {d!r} is in {other} but not in this map: "
                                            f"add its {split} split here (every domain needs both: it trains on "
                                            f"the train split and is evaluated on the test split)"))
    checks = [SplitCheck(d, split, maps[split][d], rule, threshold).run()
              for d in selected for split in SPLITS if split in maps and d in maps[split]]
    return findings, checks


def report(findings: List[Finding], checks: List[SplitCheck]) -> Tuple[List[str], int]:
    """(output lines, number of problems)."""
    everything = findings + [f for c in checks for f in c.findings]
    lines = [f.line() for f in everything]
    counts: Dict[Tuple[str, str], List[int]] = defaultdict(lambda: [0, 0])
    for f in everything:
        counts[(f.domain, f.split)][0 if f.problem else 1] += 1
    if lines:
        lines.append("")
    lines.append(f"{'domain':<12} {'split':<6} {'pairs':>6} {'problems':>9} {'warnings':>9}  folder")
    for c in checks:
        p, w = counts.pop((c.domain, c.split), [0, 0])
        lines.append(f"{c.domain:<12} {c.split:<6} {c.pairs:>6} {p:>9} {w:>9}  {c.folder}")
    for (domain, split), (p, w) in counts.items():  # no split folder checked: a map's entry, a domain key
        where = "(not in the map)" if split and domain else "(the JSON maps)"
        lines.append(f"{domain or '-':<12} {split or '-':<6} {'-':>6} {p:>9} {w:>9}  {where}")
    problems = sum(f.problem for f in everything)
    warnings = len(everything) - problems
    if problems:
        lines.append(f"{problems} problem(s), {warnings} warning(s); nothing was written. Fix the problems and run "
                     f"the check again.")
    else:
        lines.append(f"clean: {len(checks)} split(s), {sum(c.pairs for c in checks)} image/mask pairs"
                     + (f"; {warnings} warning(s)" if warnings else "") + "; nothing was written.")
    return lines, problems


def run_check(data_root: str, train_json: str, test_json: str, domains: Optional[Sequence[str]] = None,
              rule: str = "threshold", threshold: int = 128) -> int:
    """Print the check of the tree; 1 if it found a problem, else 0."""
    lines, problems = report(*check_tree(Path(data_root), train_json, test_json, domains, rule, threshold))
    print("\n".join(lines), flush=True)
    return 1 if problems else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m samcl.datacheck", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default=".", help="folder the JSON maps' paths are relative to (default .)")
    p.add_argument("--train_json", default="datasets_train.json", help="domain -> train split map")
    p.add_argument("--test_json", default="datasets_test.json", help="domain -> test split map")
    p.add_argument("--domains", nargs="*", help="only these domain keys (default: all in the maps)")
    p.add_argument("--mask_binarize", choices=("threshold", "reference"), default="threshold",
                   help="binarisation the mask checks assume: 'threshold' (default) or 'reference' (floor(v/255))")
    p.add_argument("--mask_threshold", type=int, default=128, help="threshold for 'threshold' (default 128)")
    args = p.parse_args(argv)
    return run_check(args.data_root, args.train_json, args.test_json, args.domains, args.mask_binarize,
                     args.mask_threshold)


if __name__ == "__main__":
    from .cli import run_script

    run_script(main)
