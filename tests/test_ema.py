"""EMA against the closed form of the original LitEma update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdtrain.trainer.ema import EMA, EMAConfig


def test_warmup_decay_sequence_and_update_closed_form() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, EMAConfig(decay=0.9999))
    start = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.update(model)
    for name, p in model.named_parameters():
        expected = start[name] - (1 - 2 / 11) * (start[name] - p.detach())
        torch.testing.assert_close(ema.shadow[name], expected)
    assert ema.num_updates == 1 and ema.current_decay() == pytest.approx(3 / 12)
    ema.num_updates = 10**7
    assert ema.current_decay() == 0.9999
    assert EMA(model, EMAConfig(decay=0.5, warmup=False)).current_decay() == 0.5


def test_converges_to_a_constant_target_geometrically() -> None:
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, EMAConfig(decay=0.9, warmup=False))
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.shadow["weight"].fill_(0.0)
    for _ in range(10):
        ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(1 - 0.9**10)


def test_state_round_trip_swap_and_errors() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, EMAConfig())
    ema.update(model)
    state = ema.state_dict()
    other = EMA(nn.Linear(3, 2), EMAConfig())
    other.load_state_dict(state)
    assert other.num_updates == 1
    assert all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    before = model.weight.detach().clone()
    ema.shadow["weight"].fill_(7.0)
    with ema.applied_to(model):
        assert torch.all(model.weight == 7.0)
    assert torch.equal(model.weight, before)
    with pytest.raises(ValueError, match="keys differ"):
        EMA(nn.Linear(3, 2, bias=False), EMAConfig()).load_state_dict(state)
