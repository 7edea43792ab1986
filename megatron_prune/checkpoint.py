"""Checkpoints: megatron-core distributed checkpoints that describe themselves.

Layout of a checkpoint directory:
    model/              megatron-core dist checkpoint of the model (torch_dist format); it stores
                        global shapes and offsets, so it reloads at any TP/PP layout
    model_config.json   the ModelConfig (architecture) the weights belong to
    provenance.json     stage, inputs and their hashes, the stage config, the writing layout
    COMPLETE            written last: a directory without it is an unfinished write

Writes are atomic: everything goes to `.<dir>.tmp-<id>` beside it and is renamed into place at the
end, so a crash leaves whatever was there before usable and never a half checkpoint under the final
name. `atomic_dir` (all ranks) and `atomic_directory` (one process: HF exports, prepared data, the
asset cache) are the project's only two ways to publish a directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.parallel import Groups

MARKER = "COMPLETE"
MODEL_DIR = "model"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: str) -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def check_output_dir(path: str | os.PathLike, overwrite: bool, field: str) -> Path:
    """Refuse to clobber an existing output unless asked to; called before any work starts."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{field}={path} is a file; pass a directory path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{field}={path} already exists and is not empty; choose a new path or "
                          f"pass overwrite=true")
    return out


def check_not_overlapping(output: str | os.PathLike, field: str, **inputs: str | os.PathLike) -> None:
    """A stage never writes into (or replaces a directory holding) one of its inputs."""
    out = Path(output).resolve()
    for name, value in inputs.items():
        src = Path(value).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ConfigError(f"{field}={output} overlaps {name}={value}; a stage never writes into "
                              f"its inputs, choose an output path outside it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_sibling(final: Path, kind: str) -> Path:
    """An empty directory beside `final` (same filesystem, so renames are atomic), mode as mkdir's."""
    final.parent.mkdir(parents=True, exist_ok=True)  # also creates missing parents (e.g. runs/)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output should look like a mkdir
    return tmp


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `final`. A previous `final` (overwrite) is moved aside first, not
    deleted, and put back if the rename fails; it is removed only once the new one is in place."""
    if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
        raise ConfigError(f"{final} appeared while writing; refusing to replace it")  # an empty dir is fine
    trash = None
    try:
        if final.exists():
            trash = _temp_sibling(final, "old")
            os.rename(final, trash / final.name)
        os.rename(tmp, final)
    except BaseException:
        if trash is not None and not final.exists():
            os.rename(trash / final.name, final)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """One process: yield an empty temporary sibling of `final`; on normal exit it becomes `final`,
    on any error it vanishes (and a previous `final` is untouched)."""
    final = Path(final).expanduser().absolute()
    tmp = _temp_sibling(final, "tmp")
    try:
        yield tmp
        _publish(tmp, final, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], None],
               overwrite: bool = False) -> Path:
    """All ranks: run `write(tmp)` on every rank into one shared temporary directory (made by rank 0),
    then rank 0 publishes it as `final`. A failure on any rank removes it and re-raises."""
    final = Path(final).expanduser().absolute()
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = Path(_broadcast_str(str(_temp_sibling(final, "tmp")) if rank == 0 else ""))
    barrier()
    try:
        write(tmp)
        barrier()
        if rank == 0:
            _publish(tmp, final, overwrite)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


_SHA256_CACHE: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, computed once per process while the file is unchanged (same inode,
    size and mtime): a stage checks an input's hash before start-up and again for its provenance."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _SHA256_CACHE:
        return _SHA256_CACHE[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    # a file written in the last seconds could change again within the clock's granularity and
    # keep its mtime (git's "racily clean" case): only older files are remembered
    if time.time_ns() - st.st_mtime_ns > 2_000_000_000:
        _SHA256_CACHE[key] = h.hexdigest()
    return h.hexdigest()


def tree_sha256(path: str | os.PathLike, suffixes: Optional[tuple[str, ...]] = None) -> str:
    """Hash of a file, or of a directory's files (names and contents; only `suffixes` if given),
    for provenance of inputs."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if suffixes is not None and f.suffix not in suffixes:
            continue
        h.update(str(f.relative_to(root)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def model_hash(ckpt: Path) -> str:
    """sha256 over the checkpoint's weight files and its model config. megatron's distributed
    checkpoint splits files by the layout that wrote it, so the same weights saved at another layout
    hash differently: the hash names a checkpoint, not weights."""
    weights = tree_sha256(ckpt / MODEL_DIR, (".distcp", ".metadata"))
    config = file_sha256(ckpt / "model_config.json")
    return hashlib.sha256(f"{weights}{config}".encode()).hexdigest()


def save_checkpoint(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | os.PathLike,
                    groups: Groups, provenance: dict[str, Any], overwrite: bool = False,
                    extra_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Save `model` (this rank's shards) with its config and provenance; `extra_files(tmp)` may add
    files (e.g. the tokenizer) before the directory is marked complete and renamed into place."""
    from megatron.core import dist_checkpointing

    def write(tmp: Path) -> None:
        if groups.is_rank0:
            (tmp / MODEL_DIR).mkdir()
        barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp / MODEL_DIR))
        if groups.is_rank0:
            (tmp / "model_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            record = dict(provenance)
            record.setdefault("written_at_layout", groups.layout)
            record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            (tmp / "provenance.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if extra_files is not None:
            extra_files(tmp)
        barrier()
        if groups.is_rank0:
            (tmp / MARKER).write_text("ok\n")

    return atomic_dir(out_dir, write, overwrite=overwrite)


def validate_checkpoint(path: str | os.PathLike, field: str = "checkpoint") -> Path:
    """Check that a directory is a complete checkpoint of ours before anything is built."""
    ckpt = Path(path)
    if not ckpt.exists():
        raise ConfigError(f"{field}={ckpt} does not exist; pass the directory written by convert, "
                          f"prune or distill")
    if not ckpt.is_dir():
        raise ConfigError(f"{field}={ckpt} is a file; a checkpoint is a directory")
    if not (ckpt / MARKER).exists():
        raise ConfigError(f"{field}={ckpt} is incomplete (no {MARKER} marker): the write that made "
                          f"it did not finish; rerun the stage that produces it")
    for name in ("model_config.json", f"{MODEL_DIR}/metadata.json", f"{MODEL_DIR}/.metadata"):
        if not (ckpt / name).exists():
            raise ConfigError(f"{field}={ckpt} is missing {name}; the checkpoint is damaged, "
                              f"rerun the stage that produces it")
    distcp = list((ckpt / MODEL_DIR).glob("*.distcp"))
    if not distcp:
        raise ConfigError(f"{field}={ckpt}/{MODEL_DIR} holds no *.distcp shard files; the "
                          f"checkpoint is damaged, rerun the stage that produces it")
    _check_shard_files(ckpt / MODEL_DIR, field)
    return ckpt


def _check_shard_files(model_dir: Path, field: str) -> None:
    """Every shard file the dist-checkpoint metadata points into exists and is long enough, so a
    truncated or missing `.distcp` is reported by name before a model is built (reads the
    metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(model_dir)).read_metadata().storage_data
    except Exception as err:  # a damaged .metadata pickle raises anything
        raise ConfigError(f"{field}: {model_dir / '.metadata'} cannot be read ({type(err).__name__}); "
                          f"the checkpoint is damaged, rerun the stage that produces it") from err
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = model_dir / name
        if not file.is_file():
            raise ConfigError(f"{field}: shard file {file} is missing; the checkpoint is damaged, "
                              f"rerun the stage that produces it")
        if file.stat().st_size < size:
            raise ConfigError(f"{field}: shard file {file} is truncated ({file.stat().st_size} of "
                              f"{size} bytes); the checkpoint is damaged, rerun the stage that "
                              f"produces it")


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    file = Path(path) / "model_config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{file}: cannot read the model config ({err}); the checkpoint is damaged")
    return ModelConfig.from_dict(data, where=str(file))


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "provenance.json"
    return json.loads(file.read_text()) if file.exists() else {}


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load weights into a model built at any layout (megatron reshards from global offsets)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt = validate_checkpoint(path)
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt / MODEL_DIR))
    # torch's CheckpointException (a corrupt shard surfaces as one) derives from BaseException.
    except (Exception, CheckpointException) as err:
        raise ConfigError(f"checkpoint={ckpt}: loading the weights failed ({_one_line(err)}); the "
                          f"checkpoint is damaged or does not match "
                          f"{ckpt / 'model_config.json'}") from err
    model.load_state_dict(state, strict=False)


def _one_line(err: BaseException) -> str:
    """`Type: first sentence` of the root failure, on one line (a CheckpointException's str() is
    a multi-line traceback per rank; torch.load's errors run to a paragraph of advice)."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    text = " ".join(str(err).split()).split(". ")[0][:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
