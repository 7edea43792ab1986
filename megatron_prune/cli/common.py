"""What every stage app shares: error reporting, runtime start-up, the run logger."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from megatron_prune.config import (ConfigError, ParallelConfig, logger_config_from,
                                   parallel_config_from, register_configs)

register_configs()
# Expected on CPU (and harmless): megatron falls back to torch norms/optimizers without TE/apex.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex).*")
if not OmegaConf.has_resolver("mp_cache"):
    # `${mp_cache:}` in YAML: $MEGATRON_PRUNE_CACHE or ~/.cache/megatron_prune
    OmegaConf.register_new_resolver("mp_cache", lambda: str(_cache_root()))


def _cache_root():
    from megatron_prune.convert.cache import cache_root

    return cache_root()

CONF = "pkg://megatron_prune.conf"
VERSION_BASE = "1.3"


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def fail(stage: str, message: str, code: int = 2) -> None:
    """One clear line on stderr (rank 0 only, so torchrun output is not repeated), non-zero exit."""
    if _rank() == 0:
        print(f"megatron-prune {stage}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_stage(stage: str, cfg: DictConfig, body: Callable[..., Any], needs_runtime: bool = True,
              check: Optional[Callable[[DictConfig, Optional[ParallelConfig]], None]] = None) -> Any:
    """Validate, start the runtime and the logger, run `body`, report errors.

    Order matters for "bad input fails early and leaves nothing behind": the common groups are
    parsed, then `check(cfg, parallel_config)` validates the stage's inputs and outputs (cheap:
    files and config.json only), then the launch layout; only after all of that does the process
    join torch.distributed, import megatron and start the W&B run (which writes `<dir>/wandb/`).
    """
    from megatron_prune.log import RunLogger

    started = False
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        lcfg = logger_config_from(cfg.get("logger"))
        pcfg = parallel_config_from(cfg.parallel) if needs_runtime else None
        if check is not None:
            check(cfg, pcfg)
        groups = None
        if needs_runtime:
            from megatron_prune.runtime import init_runtime

            started = True  # a half-finished start-up is torn down too
            groups = init_runtime(pcfg)
        is_rank0 = groups.is_rank0 if groups is not None else _rank() == 0
        logger = RunLogger(lcfg, stage, container, is_rank0)  # type: ignore[arg-type]
        try:
            return body(cfg, groups, logger)
        finally:
            logger.finish()
    except ConfigError as err:
        fail(stage, str(err))
    finally:
        if started:
            from megatron_prune.runtime import shutdown

            shutdown()
