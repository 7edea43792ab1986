"""megatron_prune: Minitron-style pruning + distillation and N:M sparsity for megatron-core GPTModels."""
import os as _os

__version__ = "0.1.0"

# Installed, `conf/` and `kernels/` live inside the package (setup.py maps them there). In a source
# checkout they sit beside it at the repository's top level; make them importable the same way
# (`megatron_prune.conf` for Hydra's pkg:// search path, `megatron_prune.kernels`).
_here = _os.path.dirname(__file__)
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "conf")) and _os.path.isfile(
        _os.path.join(_root, "conf", "__init__.py")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821
