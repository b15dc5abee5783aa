"""Learning modules: what trains inside the frozen backbone (one file per kind).

Importing the package registers every kind (``samcl.registry.MODULES``).
"""
from . import adapter, augmodule, cad, decoder, lora, olora, prompt_pool  # noqa: F401  (registers the kinds)
from .augmodule import AugModule, AugModuleSpec
from .base import LearningModule, ModuleSpec, segment_with
from .cad import CADModule, CADSpec

__all__ = ["AugModule", "AugModuleSpec", "CADModule", "CADSpec", "LearningModule", "ModuleSpec", "segment_with"]
