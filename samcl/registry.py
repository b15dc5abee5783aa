"""Registries of the three plug-in axes: continual methods, learning modules, backbones.

A plug-in registers itself where it is defined::

    @register_learning_module("lora")
    class LoRAModule(LearningModule): ...

and is found by name (``LEARNING_MODULES.get("lora")``); an unknown name is refused with the
list of known ones. The packages :mod:`samcl.methods`, :mod:`samcl.learning_modules` and
:mod:`samcl.backbones` import every plug-in they hold, so importing a package fills
its registry. Nothing else in the project lists the kinds.
"""
from typing import Callable, Dict, Generic, List, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name no plug-in registered; the message lists the registered ones."""


class Registry(Generic[T]):
    """Name -> plug-in class (or factory) of one axis."""

    def __init__(self, axis: str) -> None:
        self.axis = axis
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.axis} {name!r} is registered twice "
                                 f"({self._entries[name]!r} and {entry!r})")
            self._entries[name] = entry
            if isinstance(entry, type):
                entry.name = name
            return entry

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownName(f"unknown {self.axis} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


METHODS: Registry = Registry("method")
LEARNING_MODULES: Registry = Registry("learning module")
BACKBONES: Registry = Registry("backbone")

register_method = METHODS.register
register_learning_module = LEARNING_MODULES.register
register_backbone = BACKBONES.register
