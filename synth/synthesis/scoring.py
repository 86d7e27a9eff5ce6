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
from synth.synthesis.jobs import natural_statistics


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


def held_out_splits(train: np.ndarray, val: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices for a held-out surrogate: another split of the same images.

    The primary surrogate's validation images all go into the held-out surrogate's
    training set, and as many of the primary's training images (a seeded draw) become its
    validation set, so the two models are fitted (and early-stopped) on different data.
    The test images stay out of both.

    Args:
        train, val: the primary surrogate's index arrays into the natural set.
        seed: seed of the draw.

    Returns:
        ``(train, val)`` sorted index arrays of the same sizes as the inputs.
    """
    train, val = np.asarray(train), np.asarray(val)
    if val.size == 0 or train.size <= val.size:
        raise ValueError(f"need more training ({train.size}) than validation ({val.size}) images for a held-out split")
    rng = np.random.default_rng(seed)
    moved = rng.choice(train, size=val.size, replace=False)
    new_train = np.concatenate([np.setdiff1d(train, moved), val])
    return np.sort(new_train), np.sort(moved)


def ensemble_guard(
    held_out: nn.Module,
    images: torch.Tensor | np.ndarray,
    target_index: np.ndarray,
    predicted: np.ndarray,
    natural_predicted: np.ndarray,
    natural_held_out: np.ndarray,
    *,
    agree_fraction: float = 0.5,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Score the saved images with a held-out surrogate and flag images the models disagree on.

    Responses are compared as z-scores against each model's own predictions for the
    natural images (so models with different scales are comparable). An image counts as
    agreed on when the held-out model moves the target in the same direction by at least
    ``agree_fraction`` of the synthesis surrogate's z-score:
    ``sign(z) * z_held >= agree_fraction * |z|`` (so suppression images count too).

    Args:
        held_out: the held-out surrogate (other split or backbone), same sites in the same order.
        images: the saved images, uint8 ``(N, H, W, C)`` (or float ``(N, C, H, W)``).
        target_index: ``(N,)`` target site index of each image.
        predicted: ``(N, S)`` the synthesis surrogate's predictions to the same images.
        natural_predicted: ``(M, S)`` the synthesis surrogate's predictions to the natural set.
        natural_held_out: ``(M, S)`` the held-out surrogate's predictions to the natural set.
        agree_fraction: see above.

    Returns:
        Fields for ``write_stimulus_set(extra=...)``: ``held_out_predicted`` ``(N, S)``
        (adds a ``held_out_predicted_target`` manifest column), and ``(N,)`` columns
        ``target_z``, ``held_out_target_z`` and ``models_agree`` (0/1).
    """
    target_index = np.asarray(target_index, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.float64)
    n, s = predicted.shape
    if target_index.shape != (n,):
        raise ValueError(f"target_index must have shape ({n},), got {target_index.shape}")
    ho = score_with(held_out, images, batch_size=batch_size, device=device).astype(np.float64)
    if ho.shape != (n, s):
        raise ValueError(f"the held-out surrogate predicts {ho.shape[1] if ho.ndim == 2 else ho.shape} sites for {s} sites of the synthesis surrogate")

    def z(pred: np.ndarray, nat: np.ndarray) -> np.ndarray:
        nat = np.asarray(nat, dtype=np.float64)
        if nat.ndim != 2 or nat.shape[1] != s:
            raise ValueError(f"natural predictions must have shape (M, {s}), got {nat.shape}")
        mean, std = natural_statistics(nat)  # as the synthesis objective z-scores (checks M >= 1)
        zz = (pred - mean.numpy().astype(np.float64)) / std.numpy().astype(np.float64)
        return zz[np.arange(n), target_index]

    z_primary = z(predicted, natural_predicted)
    z_held = z(ho, natural_held_out)
    agree = np.sign(z_primary) * z_held >= agree_fraction * np.abs(z_primary)
    return {
        "held_out_predicted": ho.astype(np.float32),
        "target_z": z_primary,
        "held_out_target_z": z_held,
        "models_agree": agree.astype(np.int64),
    }


def candidate_scores(objectives, target_index: np.ndarray, predicted: np.ndarray, natural_predicted: np.ndarray) -> np.ndarray:
    """Each image's score on its own objective, as the validation scores a recording.

    ``stretch``: the predicted response of the target site. ``one_hot``: the target's share
    of the softmax over sites of the z-scored predictions, z-scored by the same model's
    predictions of the natural images (``synth.validation.control.one_hot_scores``).

    Args:
        objectives: ``(N,)`` ``"stretch"`` or ``"one_hot"`` per image.
        target_index: ``(N,)`` target site index of each image.
        predicted: ``(N, S)`` a model's predictions to the images.
        natural_predicted: ``(M, S)`` the same model's predictions to the natural images.

    Returns:
        ``(N,)`` scores (higher is better within an objective and target).

    Example:
        >>> candidate_scores(["stretch"], np.array([1]), np.array([[0.5, 2.0]]), np.ones((3, 2)))
        array([2.])
    """
    from synth.validation.control import one_hot_scores

    objectives = [str(o) for o in objectives]
    target_index = np.asarray(target_index, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if predicted.ndim != 2 or predicted.shape[0] != len(objectives) or target_index.shape != (len(objectives),):
        raise ValueError(f"expected (N, S) predictions and (N,) objectives and targets, got {predicted.shape}, {len(objectives)}, {target_index.shape}")
    unknown = sorted(set(objectives) - {"stretch", "one_hot"})
    if unknown:
        raise ValueError(f"unknown objective {unknown[0]!r}; expected stretch or one_hot")
    rows = np.arange(len(objectives))
    out = predicted[rows, target_index]
    if "one_hot" in objectives:
        soft = one_hot_scores(np.asarray(natural_predicted, dtype=np.float64).T, predicted.T)[1]  # (S, N)
        oh = np.array([o == "one_hot" for o in objectives])
        out = np.where(oh, soft[target_index, rows], out)
    return out


def choose_candidates(objectives, target_index: np.ndarray, scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` best-scoring images of each (objective, target), in input order.

    Ties go to the earlier image (a lower seed).

    Example:
        >>> choose_candidates(["stretch"] * 3, np.zeros(3, int), np.array([1.0, 3.0, 2.0]), keep=2)
        array([1, 2])
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    scores = np.asarray(scores, dtype=np.float64)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (o, t) in enumerate(zip(objectives, np.asarray(target_index).tolist())):
        groups.setdefault((str(o), int(t)), []).append(i)
    kept = []
    for idx in groups.values():
        order = np.argsort(-np.nan_to_num(scores[idx], nan=-np.inf), kind="stable")
        kept.extend(np.asarray(idx)[order[:keep]].tolist())
    return np.asarray(sorted(kept), dtype=np.int64)
