"""The type stub python/qdelta/_core.pyi against the compiled module: the same
public names, and the same parameters wherever the runtime has a signature."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterable
from pathlib import Path

import pytest

from qdelta import _core

STUB = Path(_core.__file__).with_name("_core.pyi")


def _stub() -> ast.Module:
    return ast.parse(STUB.read_text(encoding="utf-8"), filename=str(STUB))


def _declared(body: list[ast.stmt]) -> dict[str, list[ast.stmt]]:
    """Name -> its definitions (several for an @overload), imports left out."""
    names: dict[str, list[ast.stmt]] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.setdefault(node.name, []).append(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.setdefault(node.target.id, []).append(node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names.setdefault(target.id, []).append(node)
    return names


def _public(names: Iterable[str]) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def _params(fn: ast.FunctionDef, *, drop_first: bool = False) -> list[tuple[str, bool]]:
    """(name, has a default) of each parameter, in order."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
    out = [(p.arg, d) for p, d in zip(positional, defaults, strict=True)]
    if a.vararg:
        out.append(("*" + a.vararg.arg, False))
    out += [(p.arg, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    if a.kwarg:
        out.append(("**" + a.kwarg.arg, False))
    return out[1:] if drop_first else out


def _runtime_params(obj: object) -> list[tuple[str, bool]] | None:
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [
        (prefix.get(p.kind, "") + p.name, p.default is not inspect.Parameter.empty)
        for p in sig.parameters.values()
    ]


def test_stub_declares_exactly_the_public_names():
    declared = _declared(_stub().body)
    assert _public(declared) == _public(dir(_core))
    all_node = declared["__all__"][0]
    assert isinstance(all_node, ast.Assign)
    assert set(ast.literal_eval(all_node.value)) == set(_core.__all__)


def _functions() -> list[str]:
    return sorted(n for n in _public(dir(_core)) if inspect.isbuiltin(getattr(_core, n)))


@pytest.mark.parametrize("name", _functions())
def test_function_parameters_match(name):
    want = _runtime_params(getattr(_core, name))
    if want is None:
        pytest.skip(f"{name} has no runtime signature")
    defs = _declared(_stub().body)[name]
    for fn in defs:  # every @overload
        assert isinstance(fn, ast.FunctionDef)
        assert _params(fn) == want, f"{name} (stub line {fn.lineno})"


def test_class_methods_match():
    classes = [n for n in _public(dir(_core)) if isinstance(getattr(_core, n), type)]
    stub = _declared(_stub().body)
    checked = 0
    for cls_name in classes:
        cls = getattr(_core, cls_name)
        (node,) = stub[cls_name]
        assert isinstance(node, ast.ClassDef)
        if issubclass(cls, BaseException):  # the exception family: the same bases
            bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
            assert bases == [b.__name__ for b in cls.__bases__], cls_name
            continue
        members = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
        want = _runtime_params(cls)
        if want is not None:
            assert _params(members["__new__"], drop_first=True) == want, cls_name
            checked += 1
        for attr, value in vars(cls).items():
            if attr.startswith("_"):
                continue
            assert attr in members, f"{cls_name}.{attr} missing from the stub"
            is_property = any(
                isinstance(d, ast.Name) and d.id == "property" for d in members[attr].decorator_list
            )
            assert is_property == inspect.isgetsetdescriptor(value), f"{cls_name}.{attr}"
            if not is_property and (want := _runtime_params(value)) is not None:
                assert _params(members[attr]) == want, f"{cls_name}.{attr}"
                checked += 1
    assert checked > 0
