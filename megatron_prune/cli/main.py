"""`megatron-prune <stage> [hydra overrides]` and `python -m megatron_prune <stage> ...`."""
from __future__ import annotations

import importlib
import sys

# stage -> (module with `app`, one-line description). Order is the pipeline's order.
STAGES: dict[str, tuple[str, str]] = {
    "assets": ("megatron_prune.cli.assets",
               "fetch the embedded default: SmolLM2-135M (GGUF -> HF, cached) + Shakespeare datasets"),
    "prepare-data": ("megatron_prune.cli.prepare_data",
                     "text files -> megatron indexed datasets with document-level splits"),
    "convert": ("megatron_prune.cli.convert",
                "HF checkpoint (safetensors dir or .gguf) -> megatron dist checkpoint at a TP/PP layout"),
    "evaluate": ("megatron_prune.cli.evaluate",
                 "validation perplexity and zero-shot multiple-choice accuracy at any TP/PP/DP"),
    "correct": ("megatron_prune.cli.correct",
                "teacher correction: fine-tune the teacher with LM loss on the distillation data -> checkpoint"),
    "score": ("megatron_prune.cli.score",
              "activation importance of heads, neurons, channels and layers -> importance artifact"),
    "prune": ("megatron_prune.cli.prune",
              "width / depth pruning of the sharded weights in place, from an importance artifact -> checkpoint"),
    "distill": ("megatron_prune.cli.distill",
                "forward-KL logit distillation of a student from a frozen teacher (resumable) -> checkpoint"),
    "export": ("megatron_prune.cli.export",
               "megatron checkpoint (any layout) -> HF safetensors directory for transformers"),
}


def usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = ["usage: megatron-prune <stage> [key=value ...]   (Hydra overrides; --cfg job shows the config)",
             "       torchrun --nproc-per-node=N -m megatron_prune <stage> [key=value ...]", "",
             "stages:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in STAGES.items()]
    lines += ["", "Each stage's config: megatron-prune <stage> --cfg job"]
    return "\n".join(lines)


def override_error(stage: str, overrides: list[str]) -> str | None:
    """Hydra's complaint about the overrides (unknown key, bad type or value, missing group option) as
    one line, or None. Checked by composing the stage's config before Hydra runs the app, which would
    print a multi-line report and exit 1. Hydra's own flags (--cfg, --help, -m) skip the check."""
    if any(a.startswith("-") for a in overrides):
        return None
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megatron_prune.cli.common import VERSION_BASE

    try:
        with initialize_config_module(config_module="megatron_prune.conf", version_base=VERSION_BASE):
            compose(config_name=stage.replace("-", "_"), overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        return _one_line(e)
    return None


def _one_line(e: BaseException) -> str:
    """What Hydra says, and why (the OmegaConf error it wraps), and the options it lists, on one line."""
    parts = [str(e).strip().splitlines()[0]] if str(e).strip() else [type(e).__name__]
    if e.__cause__ is not None and str(e.__cause__).strip():
        parts.append(str(e.__cause__).strip().splitlines()[0])  # e.g. "Key 'x' is not in struct"
    lines = str(e).splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Available options in"):
            options = []
            for option in lines[i + 1:]:  # a tab-indented list, then "Config search path:"
                if not option.startswith("\t"):
                    break
                options.append(option.strip())
            parts.append(f"choose one of: {', '.join(options)}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage = args[0]
    if stage not in STAGES:
        print(f"{usage()}\n\nmegatron-prune: error: unknown stage {stage!r}; choose one of: "
              f"{', '.join(STAGES)}", file=sys.stderr)
        return 2
    problem = override_error(stage, args[1:])
    if problem is not None:
        print(f"megatron-prune {stage}: error: {problem}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    # Hydra reads sys.argv: leave it only the overrides, with the stage in the program name.
    sys.argv = [f"megatron-prune {stage}", *args[1:]]
    module.app()
    return 0


if __name__ == "__main__":
    sys.exit(main())
