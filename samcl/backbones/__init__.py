"""Backbones: the frozen models the learning modules act on, behind one interface (:class:`Backbone`).

Importing the package registers every backbone family (``samcl.registry.BACKBONES``).
"""
from . import sam, sam2  # noqa: F401  (registers the families)
from .base import Backbone, BlockGeometry, DecodeOptions, Features, index_features
from .build import build_backbone

__all__ = ["Backbone", "BlockGeometry", "DecodeOptions", "Features", "index_features", "build_backbone"]
