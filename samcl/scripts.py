"""The scripts: pyproject.toml's console scripts (``samcl-train``, ``samcl-test``, ``samcl-points``,
``samcl-demo``) and the top-level ``train.py``, ``test.py``, ``train_SAM2.py``, ``test_SAM2.py`` and
``generate_point.py``, which only call the functions here, so both show the same ``--help``.
``samcl-app`` (``python -m samcl.app``) is the web app of :mod:`samcl.app`. The commands themselves
are :mod:`samcl.commands` (train, test, points), :mod:`samcl.predict`, :mod:`samcl.demo` and :mod:`samcl.app`.

Each parses its flags before it imports torch or a backbone (``--help`` and a refused flag
answer at once) and ends through :func:`samcl.cli.run_script`.
"""
from typing import NoReturn

from .cli import run_script


def train(family: str = "sam") -> NoReturn:
    """``samcl-train`` and ``train.py`` (family "sam"), ``train_SAM2.py`` ("sam2")."""
    from .commands.train import TRAIN_DOC, train_main

    run_script(train_main, family, TRAIN_DOC[family])


def test(family: str = "sam") -> NoReturn:
    """``samcl-test`` and ``test.py`` (family "sam"), ``test_SAM2.py`` ("sam2")."""
    from .commands.test import TEST_DOC, test_main

    run_script(test_main, family, TEST_DOC[family])


def predict() -> NoReturn:
    """``samcl-predict`` and ``predict.py``: segment your own images with a trained run."""
    from .predict import main

    run_script(main)


def app() -> NoReturn:
    """``samcl-app``, as ``python -m samcl.app``: click to segment, in the browser (needs gradio)."""
    from .app import main

    run_script(main)


def points() -> NoReturn:
    """``samcl-points`` and ``generate_point.py``."""
    from .commands.points import points_main

    run_script(points_main)


def demo() -> NoReturn:
    """``samcl-demo``, as ``python -m samcl.demo``."""
    from .demo import main

    run_script(main)
