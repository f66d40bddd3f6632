"""Driver of the multi-process training tests (``tests/test_ddp.py``): trains like ``sdtrain fit``
with one extra callback that compares the ranks after every optimiser step.

    python tests/ddp_worker.py [--deepspeed-on-cpu] REPORT.json CONFIG.yaml [key=value ...]

Run it once; Lightning's subprocess launcher starts the other ranks by re-running this same
command line. After each optimiser step every rank contributes a checksum of its UNet weights and
of its EMA shadow, and the keys of the samples it trained on; rank 0 writes them all to
``REPORT.json`` at the end. The file is a script, not a test module: pytest does not collect it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from sdtrain.trainer.experiment import load_config
from sdtrain.trainer.fit import build_module, build_trainer, prepare_run
from sdtrain.trainer.fsdp import clean_name, full_parameters
from sdtrain.trainer.module import LatentDiffusionModule


def checksum(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """A float64 sum and a SHA-256 of the bytes of ``tensors``: equal hashes = identical bits."""
    digest = hashlib.sha256()
    total = 0.0
    count = 0
    for name, tensor in tensors:
        value = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
        total += value.double().sum().item()
        count += value.numel()
    return {"sum": total, "sha256": digest.hexdigest(), "numel": count}


class ReplicaCheck(Callback):
    """Gathers every rank's weight checksums and batch keys after each optimiser step."""

    def __init__(self, report: Path) -> None:
        self.report = report
        self.records: list[dict[str, Any]] = []
        self._keys: list[str] = []

    def _snapshot(self, module: LatentDiffusionModule) -> dict[str, Any]:
        ema = module.ema
        # FSDP: the whole weights, names without its wrappers; copies, since FSDP frees the
        # gathered storage afterwards, which numpy views (in checksum) would forbid
        with full_parameters(module):
            unet = [
                (clean_name(n), p.detach().clone()) for n, p in module.model.unet.named_parameters()
            ]
        unet_sum = checksum(unet)
        return {
            "rank": module.global_rank,
            "unet": unet_sum,
            "unet_dtype": str(next(module.model.unet.parameters()).dtype),
            "ema": checksum(sorted(ema.shadow.items())) if ema is not None else None,
            "ema_updates": ema.num_updates if ema is not None else None,
            "keys": self._keys,
        }

    def _gather(self, trainer: pl.Trainer, module: LatentDiffusionModule) -> None:
        own = self._snapshot(module)
        ranks: list[Any] = [own]
        if dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, own)
        self.records.append({"step": trainer.global_step, "ranks": ranks})
        self._keys = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, LatentDiffusionModule)
        self._gather(trainer, pl_module)  # step 0: the weights every rank starts from

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        assert isinstance(pl_module, LatentDiffusionModule)
        self._keys.extend(str(k) for k in batch["key"])
        if (idx + 1) % trainer.accumulate_grad_batches == 0:  # an optimiser step just ended
            self._gather(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            report = {
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "global_step": trainer.global_step,
                "steps": self.records,
            }
            self.report.write_text(json.dumps(report, indent=1))


def allow_deepspeed_on_cpu() -> None:
    """Lift Lightning's CUDA-only guards around DeepSpeed, so that ZeRO runs on DeepSpeed's CPU
    accelerator (gloo). For tests only: Lightning does not support this configuration."""
    import importlib

    import deepspeed
    import pytorch_lightning.strategies.deepspeed as lightning_deepspeed
    from pytorch_lightning.strategies import DDPStrategy

    # 1. "The DeepSpeed strategy is only supported on CUDA GPUs": skip the accelerator check.
    lightning_deepspeed.DeepSpeedStrategy.setup_environment = DDPStrategy.setup_environment
    # 2. CPU devices have no index, which the device-index check rejects.
    lightning_deepspeed._validate_device_index_selection = lambda devices: None
    # 3. Lightning passes device_rank=None (the CPU device's index); -1 = "take LOCAL_RANK".
    initialize = deepspeed.initialize

    def initialize_on_cpu(*args: Any, **kwargs: Any) -> Any:
        kwargs["args"].device_rank = -1
        return initialize(*args, **kwargs)

    deepspeed.initialize = initialize_on_cpu
    # 4. Not the shared-memory all-reduce kernel, a C++ extension compiled on first use (minutes).
    # (``deepspeed.comm.torch`` as an attribute is the torch package itself: import the module.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def main(argv: list[str]) -> None:
    if argv[0] == "--deepspeed-on-cpu":
        allow_deepspeed_on_cpu()
        argv = argv[1:]
    report, config, *overrides = argv
    warnings.filterwarnings(
        "ignore", message=r".*module\(s\) in eval mode at the start of training"
    )
    cfg = load_config([config], overrides)
    plan = prepare_run(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    plan.dir.mkdir(parents=True, exist_ok=True)
    module = build_module(cfg)
    trainer = build_trainer(cfg, plan)
    trainer.callbacks.append(ReplicaCheck(Path(report)))
    trainer.fit(module, ckpt_path=str(plan.resume_from) if plan.resume_from else None)


if __name__ == "__main__":
    main(sys.argv[1:])
