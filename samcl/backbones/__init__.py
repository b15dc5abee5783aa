"""Backbones: the frozen models SAMCL augments, behind one interface (:class:`Backbone`)."""
from .base import Backbone, Features, index_features
from .build import build_backbone

__all__ = ["Backbone", "Features", "index_features", "build_backbone"]
