"""One thin Hydra app per stage: compose the config, build the process groups, call the library."""
