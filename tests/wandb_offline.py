"""Read an offline W&B run file (`wandb/offline-run-*/run-*.wandb`) back, for tests.

The file is a LevelDB-style log (32 KiB blocks; each record: crc32, length, type) of protobuf
`Record`s, after a 7-byte ":W&B" header. wandb 0.31 no longer ships a Python reader for it.
"""
from __future__ import annotations

import glob
import json
import os
import struct
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


def read_run(run_file: str) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run = OfflineRun()
    with open(run_file, "rb") as f:
        buf = f.read()
    for raw in _raw_records(buf):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.group, run.job_type = rec.run.run_group, rec.run.job_type
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
