"""Every config key with its type, default and docstring: ``rlrelay keys [PREFIX]``.

The reference is read from the config dataclasses themselves (each field's docstring is the
string literal after it in the class body), so it cannot drift from what ``load_config``
accepts: a field without a docstring fails a unit test.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True, slots=True)
class KeyDoc:
    """One leaf key of the config tree.

    Example: ``KeyDoc(key="learner.lr", type="float", default="1e-05", doc="Peak learning rate.")``
    """

    key: str
    type: str
    default: str
    doc: str


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass, from the string literal after each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _nested(tp) -> tuple[type, str] | None:
    """The dataclass inside ``tp`` (itself, ``X | None`` or ``list[X]``) and the key suffix
    that reaches its fields (``""`` or ``"[]"``), or None for a leaf type."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0], ""
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    return None


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "(section)" if dataclasses.is_dataclass(value) else repr(value)
    return "(required)"


def key_reference(cls: type | None = None, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key under ``cls`` (default: the whole job ``Config``), in declaration order."""
    if cls is None:
        from cluster.config import Config

        cls = Config
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        nested = _nested(hints[f.name])
        if nested is not None:
            inner, suffix = nested
            out += key_reference(inner, f"{key}{suffix}.")
            continue
        out.append(KeyDoc(key=key, type=_type_name(hints[f.name]), default=_default(f), doc=docs.get(f.name, "")))
    return out


def format_reference(keys: list[KeyDoc], width: int = 100) -> str:
    lines = []
    for k in keys:
        lines.append(f"{k.key}: {k.type} = {k.default}")
        lines += textwrap.wrap(" ".join(k.doc.split()), width=width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)
