"""Exponential moving average of the U-Net weights."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """Return the EMA decay for the update after optimizer step ``step`` (counted from 0).

    With ``warmup`` the decay is ``min(decay, (1 + step) / (10 + step))``, so that the average is
    not dominated by the random initial weights in short runs; without it the decay is constant.

    Raises:
        ValueError: when ``decay`` is outside ``[0, 1]`` or ``step`` is negative.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}.")
    if step < 0:
        raise ValueError(f"EMA step must be non-negative, got {step}.")
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """Move every parameter of ``ema_model`` towards ``model``: ``ema = decay * ema + (1 - decay) * p``.

    The EMA copy stays in fp32 whatever the dtype of the trained weights.

    Raises:
        ValueError: when the two models do not have the same parameter names.
    """
    ema_parameters = dict(ema_model.named_parameters())
    parameters = dict(model.named_parameters())
    if ema_parameters.keys() != parameters.keys():
        missing = sorted(set(parameters) ^ set(ema_parameters))[:5]
        raise ValueError(f"The EMA model and the trained model differ in parameters, for example {missing}.")

    if not parameters:
        return
    ema_tensors = [ema_parameters[name] for name in parameters]
    trained_tensors = [parameters[name].detach().to(ema_parameters[name].dtype) for name in parameters]
    torch._foreach_lerp_(ema_tensors, trained_tensors, 1.0 - decay)
