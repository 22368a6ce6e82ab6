"""Training: optimizers and schedules (optim), objectives (objectives), the sharded train state
and jitted step (step). The loop, Orbax checkpoints and the absl launch follow (issue 4)."""
