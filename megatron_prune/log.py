"""Rank-0 logging: console, progress bars and Weights & Biases. A no-op on other ranks.

W&B is offline by default (runs land in `<logger.dir>/wandb/offline-run-*`, sync them later with
`wandb sync`), online when `logger.mode=online`, and off with `logger=none`. One run per stage,
grouped by `logger.group` (the pipeline name) so a dashboard shows a whole recipe together.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, Optional, Sequence, TypeVar

from megatron_prune.config import LoggerConfig

T = TypeVar("T")


def progress(items: Iterable[T], total: Optional[int] = None, desc: str = "",
             enabled: bool = True) -> Iterator[T]:
    """A tqdm bar on stderr when enabled (pass `groups.is_rank0`); otherwise the bare iterable."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                    mininterval=1.0)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table for the end-of-stage summary."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([line, rule, *body])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


class RunLogger:
    """One stage's run. Construct on every rank; only rank 0 talks to W&B or prints."""

    def __init__(self, cfg: LoggerConfig, stage: str, config: dict[str, Any], is_rank0: bool) -> None:
        self.stage = stage
        self.is_rank0 = is_rank0
        self.run = None
        if not is_rank0 or cfg.kind == "none" or cfg.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group,
            job_type=stage, name=f"{cfg.group + '-' if cfg.group else ''}{stage}", dir=cfg.dir,
            config=config, tags=list(cfg.tags) or None, reinit="finish_previous")

    @property
    def run_dir(self) -> Optional[str]:
        return None if self.run is None else str(self.run.dir)

    def echo(self, message: str) -> None:
        if self.is_rank0:
            print(message, flush=True)

    def log(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, key: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.echo(format_table(headers, rows))
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=list(headers), data=[list(r) for r in rows])})

    def image(self, key: str, path: str) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(path)})

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
