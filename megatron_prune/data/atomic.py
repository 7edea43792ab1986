"""Write a whole output directory or nothing: build under a temporary sibling, then rename it in.

The temporary directory sits next to the target (same filesystem), so the final `os.rename` is
atomic; any exception removes it, so a failed run leaves no partial output behind and an existing
output (with `overwrite=True`) stays intact until the new one is complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from megatron_prune.config import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(output_dir: str, overwrite: bool, field: str = "output_dir") -> str:
    """Refuse an existing non-empty target unless `overwrite`; returns the absolute path."""
    path = os.path.abspath(os.path.expanduser(output_dir))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{field}={output_dir!r} exists and is not a directory. Fix: choose another path.")
        if os.listdir(path) and not overwrite:
            raise ConfigError(f"{field}={output_dir!r} exists and is not empty. Fix: choose a new "
                              f"{field}, or pass overwrite=true to replace it.")
    return path


@contextmanager
def atomic_directory(output_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory; on normal exit it becomes `output_dir`, on error it vanishes."""
    final = check_output_dir(output_dir, overwrite)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output should look like a mkdir
    trash = None
    try:
        yield tmp
        if os.path.exists(final):
            # Move the old output aside (not delete) first, so it can be put back if the rename fails.
            trash = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(final, os.path.join(trash, name))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and not os.path.exists(final):
            os.rename(os.path.join(trash, name), final)
            os.rmdir(trash)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
