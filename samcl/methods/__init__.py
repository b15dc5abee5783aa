"""Continual-learning methods: how learning proceeds across domains (one file per method).

Importing the package registers every method (``samcl.registry.METHODS``).
"""
from . import finetune, joint, samcl, zeroshot  # noqa: F401  (registers the methods)
from . import er  # noqa: F401
from . import der  # noqa: F401
from .base import ContinualMethod

__all__ = ["ContinualMethod"]
