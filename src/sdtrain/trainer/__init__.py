"""Training: the LightningModule wiring, EMA, optimiser and LR schedule, checkpoints."""
