"""Continual-learning methods: how learning proceeds across domains (one file per method).

Importing the package registers every method (``samcl.registry.METHODS``).
"""
from . import der, er, ewc, finetune, joint, l2p, lwf, olora, samcl, zeroshot  # noqa: F401  (registers the methods)
from .base import ContinualMethod

__all__ = ["ContinualMethod"]
