"""Training on megatron-core: settings, the schedule step, the loop with resumable checkpoints, and the
`correct` stage (teacher correction). `distill` builds on it (megatron_prune/distill/)."""
