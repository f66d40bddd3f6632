"""Training: the experiment schema and its loader (``experiment.py``), the LightningModule
wiring, EMA, optimiser and LR schedule, validation, first-stage training, training checkpoints
(``checkpoints.py``: Lightning state, data positions, resume choice), preemption and the SLURM
requeue (``preemption.py``), the run-folder lock (``run_lock.py``) and ``fit``. Imports the
components and the ground floor, never ``launch``."""
