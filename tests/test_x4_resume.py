"""Exact resumption of the tiny x4 upscaler: SIGKILL mid-run + ``resume=auto`` ends with weights
(UNet and EMA) bit-identical to an uninterrupted run. The upscaler draws more per step than the
base model (the degradation, a noise level and the low-res noise per sample), all from the
step's seeded generator; this checks that they come back the same after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import final_weights, fit_command, kill_at_checkpoint, run_fit

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards

EXPERIMENT = "tiny-x4-upscaler"
STEPS = ("trainer.max_steps=6", "checkpoint.every_n_steps=2", "data.num_workers=2",
         "data.batch_size=2", "ema.enabled=true")  # fmt: skip


@pytest.mark.slow
def test_sigkill_and_resume_of_the_upscaler_is_bit_identical(tmp_path: Path) -> None:
    shards = str(tmp_path / "shards")
    write_synthetic_shards(shards, SyntheticSpec(samples=16, per_shard=4, min_side=64, max_side=80))
    straight = tmp_path / "straight"
    run_fit(EXPERIMENT, shards, straight, *STEPS)

    killed = tmp_path / "killed"
    target = killed / "checkpoints" / "step=00000002.ckpt"
    kill_at_checkpoint(fit_command(EXPERIMENT, shards, killed, *STEPS), target)
    assert target.exists(), "the run never reached its step-2 checkpoint"
    assert not (killed / "checkpoints" / "step=00000006.ckpt").exists(), "killed too late"
    run_fit(EXPERIMENT, shards, killed, *STEPS, "resume=auto")

    (unet_a, ema_a), (unet_b, ema_b) = final_weights(straight, 6), final_weights(killed, 6)
    assert unet_a.keys() == unet_b.keys() and ema_a.keys() == ema_b.keys()
    assert "model.unet.label_emb.weight" in unet_a  # the noise-level embedding trains too
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # Training moved the weights (an all-equal pair of untouched models would prove nothing).
    first = torch.load(straight / "checkpoints" / "step=00000002.ckpt", weights_only=True)
    moved = [k for k in unet_a if not torch.equal(first["state_dict"][k], unet_a[k])]
    assert moved
