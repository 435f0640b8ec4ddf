"""Without the optional packages, qdelta imports, and the features that need them
name the package and the pip extra (a one-line CLI error, no traceback).

Each case runs in a fresh interpreter whose import system refuses the packages,
as on a machine where ``pip install qdelta`` brought only the core dependencies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = """
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
"""


def run_without(blocked: set[str], code: str, cwd: Path | None = None):
    script = BLOCKER.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


HF = {"transformers", "peft"}
ALL = HF | {"matplotlib", "cupy"}


def test_import_and_core_work_without_any_optional_package():
    r = run_without(
        ALL,
        """
        import numpy as np, torch, qdelta
        planes, scales = qdelta.pack_residual(np.ones((3, 40), np.float32), bits=2)
        print(qdelta.__version__, planes.shape)
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "(2, 3, 2)" in r.stdout


@pytest.mark.parametrize(
    "argv, package, extra",
    [
        (["zoo", "--tiny"], "transformers", "hf"),
        (["demo", "--tiny"], "transformers", "hf"),
        (["ring-demo", "--seq-len", "16"], "transformers", "hf"),
    ],
)
def test_cli_names_the_missing_package_and_extra(argv, package, extra, tmp_path):
    if "--tiny" in argv:  # nothing may be built in the user's cache
        argv = [*argv, "--cache", str(tmp_path / "cache")]
    if argv[0] == "demo":
        argv = [*argv, "--out", str(tmp_path / "out")]
    r = run_without(HF, f"import sys\nfrom qdelta.cli import main\nsys.exit(main({argv!r}))")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"qdelta {argv[0]}: error:"), line
    assert f"'{package}'" in line and f"pip install 'qdelta[{extra}]'" in line, line


def test_cli_compress_of_hf_dirs_without_transformers(tmp_path):
    for d in ("base", "ft"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    r = run_without(
        HF,
        f"""
        import sys
        from qdelta.cli import main
        sys.exit(main(["compress", {str(tmp_path / "base")!r}, {str(tmp_path / "ft")!r},
                       "-o", {str(tmp_path / "x.qdelta")!r}]))
        """,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'qdelta[hf]'" in r.stderr
    assert not (tmp_path / "x.qdelta").exists()


@pytest.mark.parametrize(
    "code, package, extra",
    [
        ("qdelta.from_peft('adapter-dir', None)", "peft", "hf"),
        ("from qdelta.plots import _pyplot; _pyplot()", "matplotlib", "demo"),
        ("from qdelta.ring.hf import use_ring_attention; use_ring_attention(torch.nn.Linear(2, 2))",
         "transformers", "hf"),
    ],
)  # fmt: skip
def test_api_raises_missing_dependency_error(code, package, extra):
    r = run_without(
        ALL,
        f"""
        import torch, qdelta
        from qdelta.errors import MissingDependencyError
        try:
            {code}
        except MissingDependencyError as e:
            print("MISSING:", e)
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "MISSING:" in r.stdout and f"'{package}'" in r.stdout, r.stdout
    assert f"pip install 'qdelta[{extra}]'" in r.stdout, r.stdout


def test_a_broken_install_is_not_reported_as_missing(tmp_path, monkeypatch):
    # A package that is installed but whose own imports fail: the real error stays.
    from qdelta.errors import MissingDependencyError
    from qdelta.optional import require

    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import no_such_inner_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_inner_module") as info:
        require("brokenpkg", "a test")
    assert not isinstance(info.value, MissingDependencyError)
    with pytest.raises(MissingDependencyError, match=r"pip install absentpkg$"):
        require("absentpkg", "a test")


def test_version_flag():
    from qdelta import __version__

    r = subprocess.run(
        [sys.executable, "-m", "qdelta.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "python")},
    )
    assert r.returncode == 0 and r.stdout.strip() == f"qdelta {__version__}", r


def test_output_closed_early_is_not_a_traceback(tmp_path):
    import numpy as np

    import qdelta

    planes, scales = qdelta.pack_residual(np.ones((4, 40), np.float32))
    layers = {f"layer{i}": qdelta.PackedLayer(planes, scales, (4, 40)) for i in range(400)}
    qdelta.Delta(layers, {}, "f" * 32).save(tmp_path / "d.qdelta")
    inspect = subprocess.Popen(
        [sys.executable, "-m", "qdelta.cli", "inspect", str(tmp_path / "d.qdelta")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "python")},
    )
    inspect.stdout.readline()
    inspect.stdout.close()  # like `| head -1`
    _, err = inspect.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_demo_without_matplotlib_fails_before_any_work(tmp_path):
    """The plots are the demo's last step: without matplotlib it stops at once, not
    after building the zoo and serving (and without its demo.json)."""
    argv = ["demo", "--tiny", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    r = run_without(
        {"matplotlib"}, f"import sys\nfrom qdelta.cli import main\nsys.exit(main({argv!r}))"
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "[1/6]" not in r.stdout and not (tmp_path / "cache").exists(), r.stdout
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("qdelta demo: error:") and "'matplotlib'" in line, line
    assert "pip install 'qdelta[demo]'" in line, line


def test_demo_fails_when_a_ring_check_fails(monkeypatch, tmp_path):
    import qdelta.demo
    from qdelta.cli import main

    def result(window_ok: bool) -> dict:
        return {
            "mixed_batch": [{"matches_merged_dense_model": True}],
            "ring": {"ok": True},
            "ring_sliding_window": {"ok": window_ok},
        }

    for ok, code in ((True, 0), (False, 1)):
        monkeypatch.setattr(qdelta.demo, "run_demo", lambda *a, ok=ok, **k: result(ok))
        assert main(["demo", "--tiny", "--out", str(tmp_path)]) == code
