"""`python -m megatron_prune <stage> ...` (also under torchrun -m)."""
import sys

from megatron_prune.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
