"""Optional packages: the features that need them say which pip extra to install.

``pip install qdelta`` brings numpy, torch, safetensors and tqdm; Hugging Face
models, PEFT adapters, plots and cupy come with extras.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qdelta.errors import MissingDependencyError

# top-level package -> the extra of pyproject.toml that installs it
EXTRAS = {"transformers": "hf", "peft": "hf", "matplotlib": "demo", "cupy": "cuda"}


def missing(package: str, purpose: str) -> MissingDependencyError:
    top = package.split(".")[0]
    how = f"pip install 'qdelta[{EXTRAS[top]}]'" if top in EXTRAS else f"pip install {top}"
    return MissingDependencyError(
        f"{purpose} needs the optional package {top!r}, which is not installed: {how}"
    )


def require(package: str, purpose: str) -> ModuleType:
    """``package`` imported, or a MissingDependencyError naming its extra. A package
    that is installed but fails to import for another reason raises as it is."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != package.split(".")[0]:
            raise
        raise missing(package, purpose) from e
