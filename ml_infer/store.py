"""The prediction store: each (member, view) output on a data split, computed once, served often.

An entry is the logits [N, C] of one checkpoint under one test-time view on one data split, in
the data set's order, keyed by everything that changes a number: the checkpoint's bytes, raw or
EMA weights, the architecture, the view (its augmentation class and view name, which carries its
parameters), the data (a digest of the images the model sees, and their normalisation), the
precision and the engine's numerics (device type, memory layout, BatchNorm folding, forward
chunk size), and the torch version. A changed checkpoint, data file, view parameter or precision
is another key: nothing stale is served.

On disk (`engine.store=DIR`, or the sweep directory's `store/` in a sweep) an entry is
`<key>.npy` (float32, or float16 with `engine.store_dtype=float16`) and `<key>.json` (what the
key is made of, the shape, and the SHA-256 of the .npy file), each written to a temporary file
and renamed into place, the .json last: two jobs computing the same entry at once both write
whole files and either one is served. A damaged entry (truncated, or its checksum off) is
dropped with a warning and computed again. `MemoryStore` keeps a single run's entries when the
store is off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ml_infer.errors import one_of
from ml_infer.filedata import read_json_object

log = logging.getLogger(__name__)

STORE_VERSION = 1
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def entry_key(parts: Mapping[str, Any]) -> str:
    """The key of an entry: a digest of what it is made of (any JSON-able mapping).

    >>> entry_key({"a": 1}) == entry_key({"a": 1}) != entry_key({"a": 2})
    True
    """
    canonical = json.dumps(
        {"store_version": STORE_VERSION, "torch": torch.__version__, **parts},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def data_identity(dataset: Any) -> str:
    """What the models see of a data set: a streamed folder's `data_key` (its files), else the
    SHA-256 of the images held."""
    data = getattr(dataset, "data_key", None)
    if data is not None:
        return str(data)
    images = getattr(dataset, "images", None)
    if not isinstance(images, Tensor):
        return f"unkeyed:{id(dataset)}"
    # a run asks twice (its store keys, its metrics.json): hash the pixels once, again only
    # after a torch operation changed them in place (counted in `_version`; a write through
    # `.numpy()` or `.data` is not, and nothing here writes so)
    try:
        now = images._version
    except RuntimeError:  # a tensor made under inference_mode counts no versions: hash it
        return tensor_digest(images)
    held, version, digest = _IMAGE_DIGESTS.get(id(images), (None, None, ""))
    if held is None or held() is not images or version != now:
        digest = tensor_digest(images)

        def forget(_: Any, key: int = id(images)) -> None:
            _IMAGE_DIGESTS.pop(key, None)

        _IMAGE_DIGESTS[id(images)] = (weakref.ref(images, forget), now, digest)
    return digest


# id of an image tensor -> (the tensor, weakly; its version when hashed; the digest)
_IMAGE_DIGESTS: dict[int, tuple[Any, int, str]] = {}


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's values, shape and dtype: the identity of the images a model sees."""
    digest = hashlib.sha256(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class MemoryStore:
    """The entries of one run, kept in memory (`engine.store=off`)."""

    def __init__(self) -> None:
        self._entries: dict[str, Tensor] = {}

    def get(self, key: str) -> Tensor | None:
        return self._entries.get(key)

    def put(self, key: str, logits: Tensor, parts: Mapping[str, Any]) -> None:
        self._entries[key] = logits.float()

    def size_bytes(self) -> int:
        return 0


class DiskStore(MemoryStore):
    """Entries in a directory, shared by the jobs of a sweep and by later sweeps."""

    def __init__(self, directory: Path, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in STORE_DTYPES:
            raise one_of("engine.store_dtype", dtype, tuple(STORE_DTYPES))
        self.directory = directory
        self.dtype = dtype

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.directory / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def get(self, key: str) -> Tensor | None:
        if key in self._entries:
            return self._entries[key]
        values, meta = self._paths(key)
        if not meta.is_file():
            return None
        try:
            info = read_json_object(meta)
            data = values.read_bytes()
            if hashlib.sha256(data).hexdigest() != info.get("sha256"):
                raise ValueError("its checksum does not match its contents")
            array = np.load(values, allow_pickle=False)
            if list(array.shape) != info.get("shape"):
                raise ValueError(f"its shape {list(array.shape)} is not {info.get('shape')}")
        except (OSError, ValueError) as error:
            log.warning("store entry %s is damaged (%s); computing it again", values, error)
            for path in (meta, values):
                path.unlink(missing_ok=True)
            return None
        logits = torch.from_numpy(array.astype(np.float32))
        self._entries[key] = logits
        return logits

    def put(self, key: str, logits: Tensor, parts: Mapping[str, Any]) -> None:
        super().put(key, logits, parts)
        values, meta = self._paths(key)
        values.parent.mkdir(parents=True, exist_ok=True)
        array = logits.detach().cpu().float().numpy().astype(STORE_DTYPES[self.dtype])
        data = _npy_bytes(array)
        _replace(values, data)
        info = {"parts": dict(parts), "shape": list(array.shape), "dtype": self.dtype}
        info["sha256"] = hashlib.sha256(data).hexdigest()
        _replace(meta, (json.dumps(info, default=str, indent=1) + "\n").encode())

    def size_bytes(self) -> int:
        """Bytes of every entry on disk."""
        if not self.directory.is_dir():
            return 0
        return sum(path.stat().st_size for path in self.directory.rglob("*") if path.is_file())


def open_store(setting: str | None, sweep_dir: Path | None, dtype: str = "float32") -> MemoryStore:
    """The store `engine.store` names: `auto` (the sweep directory's store/ in a sweep, in memory
    for a single run), `off` (in memory: nothing kept after the run), or a directory."""
    value = str(setting or "auto")
    if value == "off" or (value == "auto" and sweep_dir is None):
        return MemoryStore()
    return DiskStore(sweep_dir / "store" if value == "auto" and sweep_dir else Path(value), dtype)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _replace(path: Path, data: bytes) -> None:
    """Writes `data` to `path` whole: a temporary file in the same folder, renamed into place."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
