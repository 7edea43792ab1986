"""A build-once cache of derived directories (the converted SmolLM2, the prepared data).

A directory is published by renaming a finished temp sibling into place (`checkpoint.atomic_directory`), so readers see either
nothing or a complete directory (DESIGN invariant 3). Cached directories also carry a marker file
written last; a directory without it is unfinished (or predates the marker) and is re-checked.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from megatron_prune.config import ConfigError

MARKER = ".megatron_prune_complete.json"


def cache_root() -> Path:
    """`$MEGATRON_PRUNE_CACHE`, else `~/.cache/megatron_prune`."""
    env = os.environ.get("MEGATRON_PRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron_prune"


def _write_marker(directory: Path, payload: Mapping[str, Any]) -> None:
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps(dict(payload), indent=1, sort_keys=True))
    os.replace(tmp, directory / MARKER)


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def cached_dir(out_dir: str | Path, build: Callable[[Path], None], validate: Callable[[Path], None],
               payload: Mapping[str, Any]) -> Path:
    """Return `out_dir`, building it once with `build(tmp_dir)` if it has no marker.

    An unmarked existing `out_dir` (e.g. made by hand before markers existed) is adopted if
    `validate` accepts it, else rebuilt. A file lock serialises concurrent builders."""
    out = Path(out_dir)
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if is_complete(out):
            return out
        if out.exists():
            try:
                validate(out)
                _write_marker(out, {**payload, "adopted": True})
                return out
            except ConfigError:
                stale = Path(tempfile.mkdtemp(prefix=f".{out.name}.stale-", dir=out.parent))
                os.rename(out, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
        from megatron_prune.checkpoint import atomic_directory  # torch: only when building

        with atomic_directory(out) as tmp:
            build(tmp)
            validate(tmp)
            _write_marker(tmp, payload)  # last: its presence means everything else is there
    return out
