"""The CUDA kernel sources, shipped inside the package (compiled at run time by
cupy or NVRTC, or by g++ for the emulator): ``DIR`` is where they are."""

from pathlib import Path

DIR = Path(__file__).resolve().parent
