"""`checkpoint.file_sha256` reads a file once per process while it is unchanged (prune and score hash
the checkpoint before start-up and again for provenance), and never serves a stale hash."""
from __future__ import annotations

import builtins
import hashlib
import os
import time

from megatron_prune import checkpoint


def _counting_open(monkeypatch) -> list:
    opened = []

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", counting, raising=False)
    return opened


def _age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_hash_is_the_sha256_of_the_bytes_and_an_old_file_is_read_once(tmp_path, monkeypatch):
    f = tmp_path / "w.distcp"
    f.write_bytes(b"weights" * 1000)
    _age(f, 60)
    opened = _counting_open(monkeypatch)
    first, second = checkpoint.file_sha256(f), checkpoint.file_sha256(f)
    assert first == second == hashlib.sha256(b"weights" * 1000).hexdigest()
    assert opened == [str(f)]


def test_a_rewritten_file_is_hashed_again(tmp_path):
    f = tmp_path / "w.distcp"
    f.write_bytes(b"a" * 100)
    _age(f, 120)
    old = checkpoint.file_sha256(f)
    f.write_bytes(b"b" * 100)  # same size; the write moves the mtime
    _age(f, 60)
    assert checkpoint.file_sha256(f) == hashlib.sha256(b"b" * 100).hexdigest() != old


def test_a_just_written_file_is_not_remembered(tmp_path):
    """Within the clock's granularity a rewrite can keep size and mtime: fresh files are not cached."""
    f = tmp_path / "w.distcp"
    f.write_bytes(b"a" * 100)
    stamp = os.stat(f).st_mtime_ns
    checkpoint.file_sha256(f)
    f.write_bytes(b"b" * 100)
    os.utime(f, ns=(stamp, stamp))  # the same size, inode and mtime as when it was hashed
    assert checkpoint.file_sha256(f) == hashlib.sha256(b"b" * 100).hexdigest()
