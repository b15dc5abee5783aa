"""Learning modules: what trains inside the frozen backbone (one file per kind).

Importing the package imports every file in it, and each registers its kind
(``samcl.registry.LEARNING_MODULES``): a new kind is one new file, with no list to edit.
"""
import importlib
import pkgutil

from .augmodule import AugModule, AugModuleSpec
from .base import LearningModule, ModuleSpec, segment_with
from .cad import CADModule, CADSpec

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["AugModule", "AugModuleSpec", "CADModule", "CADSpec", "LearningModule", "ModuleSpec", "segment_with"]
