"""The .qdelta file store: the Python face of the Rust core (src/store.rs).

``Delta.save(path)`` / :func:`load` write and read one file; :class:`DeltaFile`
maps a file and hands out zero-copy, read-only numpy views of its tensors;
:class:`DeltaStore` is a directory of tenants. :func:`fingerprint` and
:func:`check_base` tie a delta to the base weights it was made against.
The format is in docs/FORMAT.md ("File format").
"""

from __future__ import annotations

import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdelta import _core
from qdelta.checks import as_int
from qdelta.delta import Delta, PackedLayer
from qdelta.errors import (
    BaseMismatchError,
    DTypeError,
    FileError,
    NonFiniteError,
    ShapeError,
    TenantNameError,
    UnknownTenantError,
)

PathLike = str | bytes | os.PathLike

FORMAT_VERSION: int = _core.FORMAT_VERSION
SUFFIX = ".qdelta"

# safetensors dtype name -> (numpy storage dtype, torch dtype). bfloat16 and
# the float8 types have no numpy dtype; their bits travel as uint16 / uint8.
_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "BOOL": (np.dtype(np.bool_), torch.bool),
    "U8": (np.dtype("<u1"), torch.uint8),
    "I8": (np.dtype("<i1"), torch.int8),
    "F8_E5M2": (np.dtype("<u1"), torch.float8_e5m2),
    "F8_E4M3": (np.dtype("<u1"), torch.float8_e4m3fn),
    "I16": (np.dtype("<i2"), torch.int16),
    "U16": (np.dtype("<u2"), torch.uint16),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),
    "I32": (np.dtype("<i4"), torch.int32),
    "U32": (np.dtype("<u4"), torch.uint32),
    "F32": (np.dtype("<f4"), torch.float32),
    "I64": (np.dtype("<i8"), torch.int64),
    "U64": (np.dtype("<u8"), torch.uint64),
    "F64": (np.dtype("<f8"), torch.float64),
}
_TORCH_NAMES = {t: name for name, (_, t) in _DTYPES.items()}
# numpy arrays are named by their own dtype (uint16 stays U16, never BF16).
_NUMPY_NAMES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16",
    np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.float32): "F32",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint64): "U64",
    np.dtype(np.float64): "F64",
}


def _raw(value: Any, what: str) -> tuple[str, list[int], np.ndarray]:
    """(dtype name, shape, little-endian bytes as a flat uint8 array) without copying
    when the input is a contiguous CPU tensor or array."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_meta:
            raise DTypeError(
                f"{what}: expected a tensor with data, found a meta tensor "
                "(load the weights first, e.g. without device_map='meta' / low_cpu_mem_usage)"
            )
        if t.layout != torch.strided:
            raise DTypeError(
                f"{what}: expected a dense (strided) tensor, found layout {t.layout} "
                "(call .to_dense() first)"
            )
        if t.device.type != "cpu":
            t = t.cpu()
        name = _TORCH_NAMES.get(t.dtype)
        if name is None:
            raise DTypeError(
                f"{what}: expected one of {sorted(map(str, _TORCH_NAMES))}, found {t.dtype}"
            )
        t = t.contiguous()
        return name, list(t.shape), t.reshape(-1).view(torch.uint8).numpy()
    if isinstance(value, np.ndarray):
        name = _NUMPY_NAMES.get(value.dtype.newbyteorder("="))
        if name is None:
            raise DTypeError(
                f"{what}: expected a numeric numpy dtype, found {value.dtype} "
                "(bfloat16 bits: pass a torch bfloat16 tensor)"
            )
        a = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        return name, list(a.shape), a.reshape(-1).view(np.uint8)
    raise DTypeError(
        f"{what}: expected a torch tensor or numpy array, found {type(value).__name__}"
    )


def _typed(dtype: str, shape: list[int], raw: np.ndarray) -> np.ndarray:
    """A uint8 view as its numpy storage dtype and shape (still a view; copied
    only when the bytes are not aligned for the dtype)."""
    arr = raw.view(_DTYPES[dtype][0]).reshape(shape)
    return arr if arr.flags.aligned else arr.copy()


def _to_torch(dtype: str, arr: np.ndarray) -> torch.Tensor:
    """An owned torch tensor of the file's dtype (the mapping is read-only)."""
    t = torch.from_numpy(np.array(arr, copy=True))
    want = _DTYPES[dtype][1]
    return t if t.dtype == want else t.view(want)


# --------------------------------------------------------------------------- fingerprint


def _named_weights(weights: Any) -> Mapping[str, Any]:
    if isinstance(weights, torch.nn.Module):
        return weights.state_dict()
    if isinstance(weights, Mapping):
        return weights
    raise DTypeError(
        "weights: expected an nn.Module, a state dict or a mapping of numpy arrays, "
        f"found {type(weights).__name__}"
    )


def fingerprint(weights: Any) -> str:
    """The base fingerprint: XXH3-128 (32 hex digits) over the sorted names,
    dtypes, shapes and bytes of ``weights`` (an ``nn.Module``, a state dict of
    tensors, or a mapping of numpy arrays); computed in Rust, in parallel."""
    items = []
    for name, value in _named_weights(weights).items():
        dtype, shape, raw = _raw(value, f"weight {name!r}")
        items.append((str(name), dtype, shape, raw))
    return _core.fingerprint(items)


def check_base(delta: Any, base: Any) -> None:
    """Raise :class:`BaseMismatchError` unless ``base`` (weights, or a fingerprint
    string) is the base ``delta`` (a Delta or DeltaFile) was made against."""
    want = delta.base_fingerprint
    found = base if isinstance(base, str) else fingerprint(base)
    if want != found:
        tenant = getattr(delta, "tenant", "") or "(unnamed)"
        raise BaseMismatchError(
            f"delta of tenant {tenant!r} was made against a base with fingerprint {want}, "
            f"but the given base has fingerprint {found}"
        )


# --------------------------------------------------------------------------- one file


def _path_text(path: PathLike, what: str) -> str:
    """``path`` (str, bytes or os.PathLike) as the str the core takes."""
    try:
        return os.fsdecode(path)
    except TypeError:
        raise DTypeError(
            f"{what}: expected a str, bytes or os.PathLike path, found {type(path).__name__}"
        ) from None


def _as_delta(value: Any, what: str) -> Delta:
    """``value`` as a Delta: a DeltaFile is copied faithfully (``to_delta``: its user
    metadata, not the raw header, which duck typing would write); anything else is a
    DTypeError rather than an AttributeError half way through."""
    if isinstance(value, Delta):
        return value
    if isinstance(value, DeltaFile):
        return value.to_delta()
    raise DTypeError(f"{what}: expected a Delta or a DeltaFile, found {type(value).__name__}")


def save(delta: Delta | DeltaFile, path: PathLike) -> None:
    """Write ``delta`` (a Delta, or a DeltaFile to copy) to ``path`` atomically
    (temporary file, fsync, rename)."""
    delta = _as_delta(delta, "save")
    layers = []
    for name, layer in delta.layers.items():
        planes = np.ascontiguousarray(layer.planes, dtype="<u4").reshape(-1).view(np.uint8)
        scales = np.ascontiguousarray(layer.scales, dtype="<f4").reshape(-1).view(np.uint8)
        layers.append(
            (name, layer.shape, layer.bits, layer.scale_mode, layer.transposed, planes, scales)
        )
    params = []
    for name, value in delta.params.items():
        dtype, shape, raw = _raw(value, f"param {name!r}")
        params.append((name, dtype, shape, raw))
    for key, value in {"tenant": delta.tenant, "base_fingerprint": delta.base_fingerprint}.items():
        if not isinstance(value, str):
            raise DTypeError(f"{key}: expected a str, found {type(value).__name__}")
    bad = [k for k, v in delta.metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise DTypeError(f"metadata: expected str keys and values, found {bad[0]!r}")
    _core.write_delta(
        _path_text(path, "save path"),
        layers,
        params,
        delta.tenant,
        delta.base_fingerprint,
        dict(delta.metadata),
    )


def load(path: PathLike) -> Delta:
    """The :class:`Delta` in a .qdelta file; planes and scales are zero-copy
    views of the mapped file, params are owned tensors."""
    return DeltaFile(path).to_delta()


class DeltaFile:
    """A memory-mapped .qdelta file. Opening reads and validates only the
    header; tensor bytes are paged in when touched. :meth:`verify` checks
    every checksum."""

    def __init__(self, path: PathLike) -> None:
        text = _path_text(path, "DeltaFile path")
        self._file = _core.DeltaFile(text)
        self._layers: dict[str, PackedLayer] | None = None
        self._absolute = os.path.abspath(text)  # as opened: the working directory may change

    def __reduce__(self) -> tuple:
        # A mapping cannot travel to another process: a copy (pickle, a spawned
        # worker) opens the file at this path again, as it is there then.
        return (DeltaFile, (self._absolute,))

    def __repr__(self) -> str:
        return (
            f"DeltaFile({str(self.path)!r}, tenant={self.tenant!r}, "
            f"layers={len(self._file.layers)}, nbytes={self.nbytes})"
        )

    @property
    def path(self) -> Path:
        return Path(self._file.path)

    @property
    def nbytes(self) -> int:
        """Size of the file in bytes."""
        return int(self._file.nbytes)

    @property
    def metadata(self) -> dict[str, str]:
        """The raw ``__metadata__`` map of the file (format, layer table, ...)."""
        return self._file.metadata

    @property
    def user_metadata(self) -> dict[str, str]:
        """The delta's own metadata (``Delta.metadata``)."""
        return self._file.user_metadata

    @property
    def tenant(self) -> str:
        return self._file.tenant

    @property
    def base_fingerprint(self) -> str:
        return self._file.base_fingerprint

    @property
    def format_version(self) -> int:
        return int(self._file.format_version)

    @property
    def creator(self) -> str:
        return self._file.creator

    @property
    def tensors(self) -> list[tuple[str, str, list[int], int]]:
        """Every tensor as ``(name, dtype, shape, nbytes)``, in file order."""
        return self._file.tensors

    @property
    def layer_table(self) -> list[tuple[str, tuple[int, int], int, str, bool, str, str]]:
        """``(module, (out, in), bits, scale, transposed, planes tensor, scales tensor)``."""
        return self._file.layers

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only numpy view of the mapping (bfloat16 as uint16 bits)."""
        dtype, shape, raw = self._file.tensor(name)
        return _typed(dtype, shape, raw)

    def _packed(self, row: tuple) -> PackedLayer:
        name, shape, _bits, _scale, transposed, planes, scales = row
        try:
            return PackedLayer(
                planes=self.tensor(planes),
                scales=self.tensor(scales),
                shape=shape,
                transposed=transposed,
            )
        except (NonFiniteError, ShapeError, DTypeError) as err:  # e.g. NaN scales on disk
            raise type(err)(f"{self.path}: layer {name}: {err}") from None

    def layer(self, name: str) -> PackedLayer:
        """One layer's planes and scales, zero-copy (only this layer is set up)."""
        if self._layers is not None and name in self._layers:
            self._file.check_unchanged()  # cached views: the file may have changed since
            return self._layers[name]
        return self._packed(self._file.layer(name))

    @property
    def layers(self) -> dict[str, PackedLayer]:
        """Module name -> :class:`PackedLayer` whose planes/scales view the mapping."""
        if self._layers is None:
            self._layers = {row[0]: self._packed(row) for row in self._file.layers}
        else:
            self._file.check_unchanged()  # cached views: the file may have changed since
        return self._layers

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Parameters kept whole, as owned tensors in their own dtype."""
        out = {}
        for name in self._file.params:
            dtype, shape, raw = self._file.tensor(name)
            out[name] = _to_torch(dtype, _typed(dtype, shape, raw))
        return out

    @property
    def header_covered(self) -> bool:
        """Whether the header has a checksum of its own (``header_checksum``; files
        written before it existed have none, and verify checks their tensors only)."""
        return bool(self._file.header_covered)

    def verify(self) -> int:
        """Check the header (when it has a checksum) and every tensor against its
        checksum; returns the number of tensors checked, raises
        :class:`ChecksumError` naming what fails."""
        return int(self._file.verify())

    def to_delta(self) -> Delta:
        return Delta(
            layers=dict(self.layers),
            params=self.params,
            base_fingerprint=self.base_fingerprint,
            tenant=self.tenant,
            metadata=self.user_metadata,
        )


# --------------------------------------------------------------------------- a directory

# Every DeltaStore, so a forked child can give each fresh locks: a copy of a lock
# another thread held at the fork would never be released in the child (its
# cache is consistent: each change of it is one dict operation under the GIL).
_STORES: weakref.WeakSet = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: [s._new_locks() for s in list(_STORES)])

_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What says a path still names the file the cache mapped (a replaced or
    rewritten file changes one of them)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# How often open() checks every cached file's path (a stat each; tenants() checks at
# every call): often enough that a deleted or replaced file is let go soon, rarely
# enough that open(), called per request, stays O(1) on average.
_SWEEP_SECONDS = 1.0


class DeltaStore:
    """A directory of tenants, one ``NAME.qdelta`` file each.

    ``open`` maps a tenant's file on first use and caches it; a cached file is
    re-opened when the file on disk was replaced (by this or another process).
    The cache keeps the ``max_open`` most recently opened files (each holds a
    descriptor and a mapping; one no one else references is closed when it
    leaves the cache) and forgets a file once its path is gone or names another
    file: at every ``tenants()`` (and ``in``, ``len``, iteration), and in ``open``
    at most once a second, so a deleted tenant's disk space is not pinned.
    ``add`` replaces a file by atomic rename and ``remove`` unlinks it, so a
    reader holding the old mapping keeps a complete, unchanged file.
    Thread-safe.
    """

    def __init__(self, directory: PathLike, *, max_open: int = 64) -> None:
        self.max_open = as_int("max_open", max_open, 1)
        self.directory = Path(_path_text(directory, "DeltaStore directory"))
        if self.directory.exists() and not self.directory.is_dir():
            raise FileError(
                f"{self.directory}: expected a directory for a delta store, found a file"
            )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FileError(f"cannot create the delta store directory {self.directory}: {e}") from e
        self._cache: OrderedDict[str, tuple[tuple[int, int, int, int], DeltaFile]] = OrderedDict()
        self._swept = 0.0  # time.monotonic() of the last check of every cached path
        self._new_locks()
        _STORES.add(self)

    def _new_locks(self) -> None:
        self._lock = threading.Lock()
        # Held across a write and the open of what it wrote, and by remove: in this
        # process, add() returns the file it wrote (across processes, the last
        # rename wins).
        self._write_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # A copy (pickle, deepcopy) is the same directory with its own locks and cache.
        return {"directory": self.directory, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], max_open=state.get("max_open", 64))

    def __repr__(self) -> str:
        return f"DeltaStore({str(self.directory)!r})"

    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name):
            raise TenantNameError(
                f"tenant name: expected 1-200 characters of letters, digits, '.', '_' or '-' "
                f"starting with a letter or digit, found {name!r}"
            )
        return self.directory / f"{name}{SUFFIX}"

    def _sweep(self, every: float = 0.0) -> None:
        """Forget cached files whose path is gone or names another file now (their
        mapping would pin a deleted file's disk space): a stat per cached file, done
        unless the last sweep was less than ``every`` seconds ago."""
        now = time.monotonic()
        if every and now - self._swept < every:  # the hot path: one comparison
            return
        with self._lock:
            if every and now - self._swept < every:  # another thread just swept
                return
            self._swept = now
            entries = list(self._cache.items())
        for name, (key, opened) in entries:
            try:
                found: tuple[int, int, int, int] | None = _identity(
                    os.stat(self.directory / f"{name}{SUFFIX}")
                )
            except OSError:  # gone (or unreadable: open() would fail on it too)
                found = None
            if found != key:
                with self._lock:
                    entry = self._cache.get(name)
                    if entry is not None and entry[1] is opened:  # not re-opened meanwhile
                        del self._cache[name]

    def tenants(self) -> list[str]:
        """Sorted tenant names."""
        self._sweep()
        try:
            entries = os.listdir(self.directory)
        except OSError as e:
            raise FileError(f"cannot list the delta store {self.directory}: {e}") from e
        return sorted(
            e[: -len(SUFFIX)]
            for e in entries
            if e.endswith(SUFFIX) and _TENANT_NAME.fullmatch(e[: -len(SUFFIX)])
        )

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.tenants()

    def __iter__(self) -> Iterator[str]:
        return iter(self.tenants())

    def __len__(self) -> int:
        return len(self.tenants())

    def open(self, name: str) -> DeltaFile:
        """The tenant's file, mapped (cached; re-opened if replaced on disk)."""
        path = self.path(name)
        self._sweep(_SWEEP_SECONDS)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            with self._lock:
                self._cache.pop(name, None)  # its mapping must not pin a deleted file
            if os.path.islink(path):  # listed by tenants(), but nothing behind it
                raise FileError(
                    f"tenant {name!r}: expected {path} to be a delta file, found a symbolic "
                    f"link to {os.readlink(path)!r}, which does not exist"
                ) from None
            known = self.tenants()
            raise UnknownTenantError(
                f"no tenant {name!r} in {self.directory} (tenants: "
                f"{', '.join(known[:10]) or 'none'}{', ...' if len(known) > 10 else ''})"
            ) from None
        except OSError as e:
            raise FileError(f"cannot stat {path}: {e}") from e
        key = _identity(st)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                self._cache.move_to_end(name)
                return cached[1]
        opened = DeltaFile(path)
        with self._lock:
            self._cache[name] = (key, opened)
            self._cache.move_to_end(name)
            while len(self._cache) > self.max_open:
                self._cache.popitem(last=False)
        return opened

    def add(self, name: str, delta: Delta | DeltaFile) -> DeltaFile:
        """Write ``delta`` (a Delta, or a DeltaFile, e.g. another store's tenant, to
        copy) as tenant ``name`` (replacing any previous file atomically) and return
        the new file, opened."""
        path = self.path(name)
        delta = _as_delta(delta, f"tenant {name!r}")
        if delta.tenant != name:
            delta = replace(delta, tenant=name)
        with self._write_lock:
            save(delta, path)
            with self._lock:
                self._cache.pop(name, None)
            return self.open(name)

    def remove(self, name: str) -> None:
        """Delete tenant ``name``; readers that already opened it keep their mapping."""
        path = self.path(name)
        with self._write_lock:
            with self._lock:
                self._cache.pop(name, None)
            try:
                os.remove(path)
            except FileNotFoundError:
                raise UnknownTenantError(f"no tenant {name!r} in {self.directory}") from None
            except OSError as e:
                raise FileError(f"cannot remove {path}: {e}") from e
