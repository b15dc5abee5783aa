"""python -m samcl.release inspect|convert|export (see the package docstring)."""
import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence


import sys

from ..config import FAMILY_NAMES
from . import RELEASE_ORDER, RELEASE_UNSEEN


def _inspect(folder: Path, order: Sequence[str], unseen: Sequence[str]) -> None:
    from .folder import read_release_folder

    rel = read_release_folder(folder, order, unseen)
    print(f"{folder}: {FAMILY_NAMES[rel.family]} release, order {'_'.join(rel.order)}, vanilla for {rel.unseen}")
    for d, rm in rel.modules.items():
        print(f"  {d:<8} {rm.describe()}  (cnt {rm.cnt})")
    sel = rel.selector
    print(f"  selector: {sel.layer1.in_features}-d input, {sel.num_domains} outputs")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import Parser, explained_errors

    p = Parser(prog="python -m samcl.release", description=sys.modules[__package__].__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    order_help = f"domain keys of the selector's outputs joined by '_' (default {'_'.join(RELEASE_ORDER)})"
    for name in ("inspect", "convert"):
        q = sub.add_parser(name, help="summarise a release folder" if name == "inspect"
                           else "release folder -> run folder in this project's format")
        q.add_argument("src", type=Path, help="release folder (Module_Selector.pth + <domain>.pth)")
        if name == "convert":
            q.add_argument("dst", type=Path, help="new run folder")
            q.add_argument("--family", choices=sorted(FAMILY_NAMES), required=True,
                           help="sam (checkpoint/SAM1) or sam2 (checkpoint/SAM2); checked against the files")
            q.add_argument("--overwrite", action="store_true", help="write into a non-empty destination")
        q.add_argument("--order", default="_".join(RELEASE_ORDER), help=order_help)
        q.add_argument("--unseen", nargs="*", default=list(RELEASE_UNSEEN),
                       help="domains without a module (default COCO)")
    q = sub.add_parser("export", help="run folder of this project -> release layout (for the authors' code)")
    q.add_argument("run_dir", type=Path)
    q.add_argument("dst", type=Path)
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty destination")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with explained_errors():
        from .convert import convert, export  # after the arguments: --help needs no torch

        if args.command == "inspect":
            _inspect(args.src, [d for d in args.order.split("_") if d], args.unseen)
        elif args.command == "convert":
            man = convert(args.src, args.dst, args.family, [d for d in args.order.split("_") if d], args.unseen,
                          args.overwrite)
            print(f"wrote run folder {args.dst}: modules {list(man['modules'])}, selector over {man['order']} "
                  f"(test it with test{'_SAM2' if args.family == 'sam2' else ''}.py --run_dir {args.dst})")
        else:
            info = export(args.run_dir, args.dst, args.overwrite)
            print(f"wrote release folder {args.dst}: modules {list(info['modules'])}, selector over {info['order']} "
                  f"(all modules verified bit-exact with the restricted loader)")
    return 0



if __name__ == "__main__":
    from ..cli import run_script

    run_script(main)
