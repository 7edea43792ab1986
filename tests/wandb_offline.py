"""Read an offline W&B run file (`wandb/offline-run-*/run-*.wandb`) back, for tests.

The file is a LevelDB-style log (32 KiB blocks; each record: crc32, length, type) of protobuf
`Record`s, after a 7-byte ":W&B" header. wandb 0.31 no longer ships a Python reader for it.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _raw_records(buf: bytes, start: int = 7) -> Iterator[bytes]:
    pos, pending = start, b""
    while pos + 7 <= len(buf):
        left = _BLOCK - (pos % _BLOCK)
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # block padding
            pos += left - 7
            continue
        chunk = buf[pos:pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


@dataclass
class OfflineRun:
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def _complete(buf: bytes) -> bool:
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in _raw_records(buf):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "exit":
            return True
    return False


def read_run(run_file: str, wait_s: float = 60.0) -> OfflineRun:
    """Parse a finished run. `wandb.finish()` can return before W&B's service process has flushed
    the file (seen on a loaded machine), so wait for the run's final `exit` record."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + wait_s
    while True:
        with open(run_file, "rb") as f:
            buf = f.read()
        if _complete(buf) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    run = OfflineRun()
    for raw in _raw_records(buf):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            # a run may be recorded more than once (updates); keep what any record says
            run.group = run.group or rec.run.run_group
            run.job_type = run.job_type or rec.run.job_type
            for item in rec.run.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                if item.key:
                    run.summary[item.key] = json.loads(item.value_json)
    run.files = [os.path.relpath(p, os.path.dirname(run_file))
                 for p in glob.glob(os.path.join(os.path.dirname(run_file), "files", "**", "*"),
                                    recursive=True)]
    return run


def find_runs(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "wandb", "offline-run-*", "run-*.wandb")))
