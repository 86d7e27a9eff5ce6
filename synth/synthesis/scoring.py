"""Scoring images with a model: the synthesis surrogate, or a held-out one (ensemble guard).

A held-out surrogate (fitted on another split, or another architecture) that also
predicts a strong target response is evidence that a synthesized image exploits the
neurons' tuning rather than one model's quirks; the pipeline reports its predictions in
the manifest beside the synthesis surrogate's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from synth.runtime import resolve_device


def as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` (as saved) or float ``(N, C, H, W)`` in [0, 1] -> float ``(N, C, H, W)``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        if images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, H, W, C), got shape {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 255.0
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    return images.float()


def score_with(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Predicted responses of ``model`` to ``images``.

    Args:
        model: ``(B, C, H, W) in [0, 1] -> (B, S)`` (any surrogate with the synthesis contract).
        images: uint8 ``(N, H, W, C)`` exactly as saved, or float ``(N, C, H, W)`` in [0, 1].
        batch_size: images per forward pass.
        device: where to run (default: the model's device).

    Returns:
        ``(N, S)`` float32 numpy array.
    """
    x = as_float_images(images)
    if device is None:
        p = next(iter(model.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                out.append(model(x[i : i + batch_size].to(dev)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)
