"""Atomic file writes and JSON-ready values (private): one implementation for the whole package.

A file is written to a temporary file in the target's folder (a hidden
``.<name>.<random>.tmp``), flushed to disk (fsync), then renamed onto the target
with :func:`os.replace`, which is atomic on one file system. A reader, or a run that
is killed half-way, therefore sees either the previous complete file or the new
complete one, never a partial one; a failed write deletes its temporary file (a
killed process may leave one behind, which ``runs._remove_stale_temporaries``
removes on resume).

Imports flow one way: model and solve know nothing of files; training, regional and symbolic
may import this module; runs and cli may import anything.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_text", "atomic_torch_save", "jsonable"]


def jsonable(x: Any) -> Any:
    """``x`` with every value JSON can hold: mappings (string keys), lists, numbers (NaN and
    infinity as None, so that ``json.dumps(..., allow_nan=False)`` writes standard JSON),
    booleans, strings and None; arrays and tensors as lists; anything else as its string."""
    import math
    from collections.abc import Mapping

    import numpy as np

    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    if torch is not None and isinstance(x, torch.Tensor):
        return jsonable(x.detach().cpu().tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield the name of a new temporary file beside ``path`` to write completely.

    When the block ends without an exception the temporary file is fsynced and renamed
    onto ``path``; on any exception (Ctrl-C included) it is deleted and ``path`` keeps
    its previous content. Any writer works (text, ``torch.save``, ``h5py.File``), which
    is why the fsync reopens the file instead of relying on the writer's handle.
    """
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_path`)."""
    import torch  # only the writers of checkpoints need it

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
