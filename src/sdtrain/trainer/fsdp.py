"""PyTorch FSDP for the UNet (``trainer.strategy: fsdp``), on Lightning's ``FSDPStrategy``.

What this adds to Lightning's strategy:

- **Per-block wrapping.** Every ``TimestepEmbedSequential`` of the UNet (each input block, the
  middle block, each output block) is one FSDP unit; the rest of the UNet (time embedding,
  output head) sits in the root unit.
- **Frozen parts whole.** The autoencoder, text encoder and any other part of the model but the
  UNet are FSDP ``ignored_modules``: every rank holds them whole, as under DDP, and they are
  moved to the rank's device here (FSDP leaves ignored modules where they are).
- **Float32 weights and reductions.** ``bf16-mixed`` / ``16-mixed`` run as torch autocast over
  float32 weights with float32 gradient reductions, as under DDP (Lightning's own FSDP policy
  would cast the UNet's weights to bf16); buffers are never cast.
- **CPU.** FSDP (the ``FullyShardedDataParallel`` wrapper) runs on CPU with gloo when it is given
  ``device_id=cpu``; Lightning passes ``None`` there, which FSDP refuses.
- **EMA of the full weights.** The EMA keeps full float32 weights on every rank (as under DDP);
  it is updated inside ``full_parameters``, which gathers the UNet's shards.
- **Checkpoints without pickles.** ``step=NNNNNNNN.ckpt`` is a folder: ``full.ckpt``, written by
  rank 0, is an ordinary step checkpoint holding the gathered UNet, the EMA, the config and the
  loop state but no optimiser (what ``sdtrain export`` reads), and ``shard-R-of-W.pt`` holds rank
  R's own shards of the weights and of the AdamW state (what ``resume`` reads). Every file is
  read with ``weights_only=True`` (``torch.distributed.checkpoint``, Lightning's sharded format,
  reads a pickled metadata file). The folder is written under a hidden temp name (rank 0's
  ``files.temp_path``) and renamed once every rank has written its shard; the temp folder of a
  save killed midway is removed when the next run starts, with the other temp files of writers
  that died (``fit.ready_run_folder``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

from sdtrain.errors import CheckpointError, WriteError
from sdtrain.models.unet import TimestepEmbedSequential
from sdtrain.trainer.checkpoints import (
    FSDP_FULL_FILE,
    AtomicCheckpointIO,
    fsdp_shard_name,
    remove_checkpoint,
)
from sdtrain.trainer.config import TrainerConfig
from sdtrain.trainer.ema import FSDP_PREFIX
from sdtrain.utils import files


def clean_name(name: str) -> str:
    """A parameter name without the segments FSDP's wrappers insert."""
    return name.replace(FSDP_PREFIX, "")


class UNetFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with the UNet wrapped per block and the frozen parts left whole."""

    def __init__(self, sharding_strategy: str) -> None:
        super().__init__(
            sharding_strategy=sharding_strategy,
            auto_wrap_policy={TimestepEmbedSequential},
            mixed_precision=MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32),
            state_dict_type="full",
        )

    # --- wrapping ---------------------------------------------------------------------------

    def _setup_model(self, model: nn.Module) -> nn.Module:
        frozen = frozen_parts(model)
        for part in frozen:
            part.to(self.root_device)
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,  # Lightning passes its index: None on CPU, refused there
            ignored_modules=frozen,
            **self.kwargs,
        )

    # --- checkpoints ------------------------------------------------------------------------

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """This rank's own AdamW state: the moments of its shards (``shard-R-of-W.pt``)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return optimizer.state_dict()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        final = Path(filepath)
        tmp = Path(self.broadcast(str(files.temp_path(final)) if self.is_global_zero else ""))
        if self.is_global_zero:
            tmp.mkdir(parents=True)
        self.barrier("fsdp-checkpoint-folder")
        shard = {
            "rank": self.global_rank,
            "world_size": self.world_size,
            "params": local_shards(self.model),
            "optimizer_states": checkpoint.pop("optimizer_states", []),
        }
        failure = ""
        try:
            files.save_torch(tmp / fsdp_shard_name(self.global_rank, self.world_size), shard)
        except (WriteError, OSError) as err:
            failure = (
                (err.reason or str(err))
                if isinstance(err, WriteError)
                else files.describe_os_error(err)
            )
        failures: list[Any] = [None] * self.world_size
        dist.all_gather_object(failures, failure)  # every rank learns whether all shards exist
        if any(failures):
            if self.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            rank, reason = next((r, f) for r, f in enumerate(failures) if f)
            raise CheckpointError(
                f"rank {rank} could not write its shard ({reason}); the previous checkpoint is "
                "intact. Free the space (or fix the folder) and continue with resume=auto",
                final,
            )
        if self.is_global_zero:
            AtomicCheckpointIO().save_checkpoint(checkpoint, tmp / FSDP_FULL_FILE)
            if final.exists():
                remove_checkpoint(final)
            os.rename(tmp, final)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / FSDP_FULL_FILE).is_file():
            raise CheckpointError(
                f"is not an FSDP step checkpoint (no {FSDP_FULL_FILE} inside); trainer.strategy "
                "must be the one the run was saved with",
                path,
            )
        checkpoint = AtomicCheckpointIO().load_checkpoint(path / FSDP_FULL_FILE)
        shard_file = path / fsdp_shard_name(self.global_rank, self.world_size)
        if not shard_file.is_file():
            saved = sorted(p.name for p in path.glob("shard-*.pt"))
            raise CheckpointError(
                f"holds no {shard_file.name} (it has {', '.join(saved) or 'no shards'}): FSDP "
                f"shards are resumed by as many ranks as saved them, this run has "
                f"{self.world_size}; set trainer.devices x trainer.num_nodes to match",
                path,
            )
        shard = files.load_torch(shard_file, mmap=False)
        assert isinstance(shard, dict)
        load_local_shards(self.model, shard["params"], shard_file)
        for optimizer, state in zip(self.optimizers, shard["optimizer_states"], strict=True):
            optimizer.load_state_dict(state)
        checkpoint["optimizer_states"] = shard["optimizer_states"]
        return checkpoint


def fsdp_strategy(t: TrainerConfig) -> UNetFSDPStrategy:
    return UNetFSDPStrategy(t.fsdp.sharding_strategy)


def frozen_parts(module: nn.Module) -> list[nn.Module]:
    """Every part of the LightningModule's model but the UNet (autoencoder, text encoder, depth
    estimator): FSDP leaves them whole."""
    model = module.model  # type: ignore[union-attr]
    return [part for name, part in model.named_children() if name != "unet"]


def local_shards(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's pieces of the UNet's parameters (the views FSDP keeps between steps)."""
    return {
        name: p.detach().cpu().clone() for name, p in wrapped.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def load_local_shards(wrapped: nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    params = {name: p for name, p in wrapped.named_parameters() if p.requires_grad}
    if set(params) != set(saved):
        missing = sorted(set(params) - set(saved))[:3]
        raise CheckpointError(f"its shards do not fit this model (missing {missing})", path)
    for name, p in params.items():
        if p.shape != saved[name].shape:
            raise CheckpointError(
                f"shard {name} has shape {list(saved[name].shape)}, this rank holds "
                f"{list(p.shape)}: saved with another sharding (trainer.fsdp) or model",
                path,
            )
        p.copy_(saved[name])


def is_fsdp(module: pl.LightningModule) -> bool:
    return module._trainer is not None and isinstance(
        module.trainer.model, FullyShardedDataParallel
    )


@contextlib.contextmanager
def full_parameters(module: pl.LightningModule) -> Iterator[None]:
    """Inside: the UNet's parameters are whole on every rank (read-only; FSDP gathers them, a
    collective every rank must enter); outside FSDP nothing happens. Names of wrapped blocks
    carry ``_fsdp_wrapped_module.`` meanwhile (``clean_name``)."""
    if not is_fsdp(module):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(module.trainer.model, writeback=False):
        yield


def global_norm(local: torch.Tensor, module: pl.LightningModule) -> torch.Tensor:
    """The gradient norm over all ranks from this rank's shards' norm (FSDP); else ``local``."""
    if not is_fsdp(module):
        return local
    squared = local.double() ** 2
    dist.all_reduce(squared)
    return squared.sqrt().to(local.dtype)
