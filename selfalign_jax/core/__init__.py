"""The functional core: the transformer and its checkpoints, the sampler and beam search, the trainer and the
memory planner. Parameters are pytrees and the steps are pure functions under `jax.jit`; nothing here imports
the ISARA application (`selfalign_jax.app`) or the commands above it."""
