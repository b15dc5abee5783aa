"""Settings, each declared once: its type, default, help, allowed values, range and group.

A setting is a dataclass field made by :func:`setting` (as peft declares its tuner configs:
the field's metadata carries the help and the constraints). The core settings are the fields of
:class:`samcl.config.CoreSettings`; a method or a learning module declares its own in its own
file, as a subclass of :class:`Settings` (as mammoth's models bring their own ``get_parser``)::

    class EWCSettings(Settings):
        \"\"\"Online EWC.\"\"\"

        ewc_lambda: float = setting(100.0, "weight of the penalty lambda/2 sum F (theta - theta*)^2")

Everything else derives from the declarations: the :class:`samcl.config.Config` dataclass (the
core fields plus every plugin's), the checks of a value's type, choice and range, the argparse
flags and their ``--help``, and the README's flag table test. A new method with a setting is one
file in ``samcl/methods/``: no list to edit (:func:`plugin_files` finds the file).

Plugin files import torch, and ``--help`` answers without it, so a plugin's settings class is
*read*, not run (:func:`read_settings`): the file is parsed and each top-level ``Settings``
subclass's annotated assignments are taken, whose annotation is a plain type (``int``,
``Optional[float]``, ``List[str]``, ...) and whose value is a ``setting(...)`` call with literal
arguments (``ast.literal_eval``). Imported, the same class is an ordinary dataclass; a test checks
that the two readings agree for every plugin file. This module imports neither torch nor any plugin.
"""
import ast
import dataclasses
import functools
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

PACKAGE_DIR = Path(__file__).resolve().parent
# the folders of samcl/ whose every file is a plugin: (folder, registering decorator, group label)
PLUGIN_FOLDERS = (("methods", "register_method", "method"),
                  ("learning_modules", "register_learning_module", "learning module"))
SCOPES = ("common", "train")  # common: train and test scripts take the flag; train: training scripts only


class SettingsError(ValueError):
    """A declaration that cannot be read (not literal, declared twice, ...); names the file."""


class Bounds(NamedTuple):
    """Allowed values of a numeric setting: ``low <= v <= high`` (``low < v`` with ``open_low``)."""

    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False

    def admits(self, v: float) -> bool:
        return ((self.low is None or (v > self.low if self.open_low else v >= self.low))
                and (self.high is None or v <= self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None and not self.open_low:
            return f"in {self.low}..{self.high}"
        parts = [f"{'>' if self.open_low else '>='} {self.low}" if self.low is not None else "",
                 f"<= {self.high}" if self.high is not None else ""]
        return " and ".join(p for p in parts if p)


NON_NEGATIVE = Bounds(0)  # a number's range unless its declaration says otherwise


class Meta(NamedTuple):
    """What a setting's declaration says besides its type and default (a field's ``metadata["samcl"]``)."""

    help: str
    choices: Optional[Tuple[Any, ...]] = None
    bounds: Bounds = NON_NEGATIVE
    scope: str = "train"
    group: str = ""


def setting(default: Any = None, help: str = "", *, choices: Optional[Tuple[Any, ...]] = None,
            low: Optional[float] = 0, high: Optional[float] = None, open_low: bool = False, scope: str = "train",
            group: str = "") -> Any:
    """A setting's dataclass field. ``low``/``high``/``open_low`` bound a number (or each item of a
    list of numbers; default ``>= 0``); ``choices`` list a string's allowed values; ``scope``
    "common" gives the flag to the test scripts too; ``group`` titles its block of ``--help``
    (a plugin's settings take the plugin's name). A list default is copied per Config."""
    if scope not in SCOPES:
        raise SettingsError(f"scope must be one of {SCOPES}, got {scope!r}")
    meta = {"samcl": Meta(help, tuple(choices) if choices is not None else None, Bounds(low, high, open_low),
                          scope, group)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def meta(f: dataclasses.Field) -> Meta:
    """The declaration of a setting's field."""
    return f.metadata["samcl"]


class Settings:
    """Base of a plugin's settings class: a subclass is made a dataclass (its fields are
    :func:`setting` calls). See the module docstring for what a declaration may contain."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(cls)


# ----------------------------------------------------------------------------- reading plugin files
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _annotation(node: ast.expr, where: str) -> Any:
    """A plain annotation as a typing object: int, float, str, bool, Optional[...], List[...]."""
    import typing

    if isinstance(node, ast.Name) and node.id in _TYPES:
        return _TYPES[node.id]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in ("Optional", "List"):
        inner = _annotation(node.slice, where)
        return typing.Optional[inner] if node.value.id == "Optional" else typing.List[inner]
    raise SettingsError(f"{where}: the annotation {ast.unparse(node)!r} is not one a setting may have "
                        f"(int, float, str, bool, Optional[...], List[...])")


def _literal(node: ast.expr, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise SettingsError(f"{where}: {ast.unparse(node)!r} is not a literal; a settings class is read without "
                            f"running its file, so its setting(...) arguments must be literals") from None


def read_settings(path: Path, group: str) -> List[Tuple[str, Any, dataclasses.Field]]:
    """(name, type, field) of every setting the top-level ``Settings`` subclasses of a Python
    file declare, read without importing the file; ``group`` titles them where the declaration
    gives no group."""
    path = Path(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for cls in tree.body:
        if not (isinstance(cls, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id == "Settings"
                                                      for b in cls.bases)):
            continue
        for stmt in cls.body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # the docstring
            where = f"{path}:{stmt.lineno} ({cls.name})"
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Name)
                    and stmt.value.func.id == "setting"):
                raise SettingsError(f"{where}: a settings class holds only lines `name: type = setting(...)`")
            args = [_literal(a, where) for a in stmt.value.args]
            kwargs = {k.arg: _literal(k.value, where) for k in stmt.value.keywords}
            kwargs.setdefault("group", group)
            out.append((stmt.target.id, _annotation(stmt.annotation, where), setting(*args, **kwargs)))
    return out


def plugin_files() -> List[Tuple[Path, str, str]]:
    """(file, registering decorator, group label) of every plugin file of the package."""
    return [(p, decorator, label) for folder, decorator, label in PLUGIN_FOLDERS
            for p in sorted((PACKAGE_DIR / folder).glob("*.py")) if not p.name.startswith("_")]


def plugin_settings() -> List[Tuple[str, Any, dataclasses.Field]]:
    """Every plugin's settings, each titled by its plugin ("method ewc"); a name declared twice is
    refused, naming both files."""
    seen: Dict[str, Path] = {}
    out = []
    for path, _decorator, label in plugin_files():
        for name, hint, f in read_settings(path, f"{label} {path.stem}"):
            if name in seen:
                raise SettingsError(f"setting {name!r} is declared in {seen[name]} and in {path}")
            seen[name] = path
            out.append((name, hint, f))
    return out


@functools.lru_cache(maxsize=None)  # every flag's help names them: the files are read once
def registered_names(decorator: str) -> List[str]:
    """The names the plugin files register with ``decorator`` ("register_method", ...), read
    without importing them (for ``--help``)."""
    names = []
    for path, dec, _label in plugin_files():
        if dec != decorator:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                for d in node.decorator_list:
                    if (isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == decorator
                            and d.args and isinstance(d.args[0], ast.Constant)):
                        names.append(d.args[0].value)
    return sorted(names)


def describe_default(value: Any) -> str:
    """A default as the README and ``--help`` write it: on/off, space-separated lists, plain numbers."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    return str(value)
