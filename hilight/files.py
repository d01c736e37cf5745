"""Small file and naming utilities shared by every layer: the atomic directory writer, a
file's content digest, and the one spelling of dtypes (``fp32``, ``bf16``, ``fp16``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

DTYPE_NAMES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str):
    """``fp32`` / ``bf16`` / ``fp16`` -> the torch dtype (``auto`` is resolved by the engine)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        from hilight.errors import ConfigError

        raise ConfigError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}")
    return dtypes[name]


def dtype_name(dtype) -> str:
    """The torch dtype's own name (``float32``), as checkpoints record it."""
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; when the block ends normally it
    replaces ``target`` (an old ``target`` is renamed aside first and removed only after the
    swap, so an interruption never leaves neither); on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content: the identity of a video, whatever its name."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
