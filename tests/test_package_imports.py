"""The package loads its public names on first use: ``import qdelta`` and the
command's parser stay torch-free, and every public name still resolves."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import qdelta


def test_every_public_name_resolves_to_its_module_attribute():
    for name in qdelta.__all__:
        value = getattr(qdelta, name)
        if name in qdelta._LAZY:
            module, attr = qdelta._LAZY[name]
            assert value is getattr(sys.modules[module], attr), name
    assert set(qdelta._LAZY) <= set(qdelta.__all__)
    assert set(dir(qdelta)) >= set(qdelta.__all__)


def test_the_lazy_table_matches_what_type_checkers_see():
    """The TYPE_CHECKING imports and the run-time table name the same objects."""
    tree = ast.parse(Path(qdelta.__file__).read_text(encoding="utf-8"))
    guarded = next(
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test)
    )
    seen = {
        alias.asname or alias.name: (node.module, alias.name)
        for node in guarded.body
        for alias in node.names
    }
    assert seen == qdelta._LAZY


def test_submodules_and_unknown_names():
    assert qdelta.store.DeltaFile is qdelta.DeltaFile
    with pytest.raises(AttributeError, match="module 'qdelta' has no attribute 'no_such_name'"):
        qdelta.no_such_name  # noqa: B018


def _run(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_import_and_the_parser_do_not_import_torch():
    """``qdelta --help``/``--version`` answer in a fraction of a second, not torch's seconds."""
    code = (
        "import sys, qdelta, qdelta.cli\n"
        "qdelta.cli.build_parser()\n"
        "print(qdelta.__version__, 'torch' in sys.modules)"
    )
    assert _run(code) == f"{qdelta.__version__} False"


def test_star_import_gives_every_public_name():
    code = (
        "from qdelta import *\nimport qdelta\n"
        "print(all(n in globals() for n in qdelta.__all__), compress.__module__)"
    )
    assert _run(code) == "True qdelta.compress"  # the function, not its module
