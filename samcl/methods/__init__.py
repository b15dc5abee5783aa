"""Continual-learning methods: how learning proceeds across domains (one file per method).

Importing the package imports every file in it, and each registers its method
(``samcl.registry.METHODS``): a new method is one new file, with no list to edit.
"""
import importlib
import pkgutil

from .base import ContinualMethod

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ContinualMethod"]
