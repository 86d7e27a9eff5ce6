"""Student cores: a small CNN taught to reproduce other sessions' digital twins' inner maps.

``fit.core.objective: teacher_maps`` trains the core stage's small CNN on a regression
instead of on recorded responses: on the core sessions' distillation images
(``distill_images``), its output (a 1x1 ``head`` after the last layer) reproduces the
teachers' hidden maps (``teacher_layers`` of every twin of every ``distill_twins``
session), standardized per channel and projected onto their ``teacher_components``
principal components. A readout on the student then reads twin-like features at the
cost of a small CNN: the twins themselves as a backbone (``backbone: cowley_twins``) cost
30-200 times as much per synthesis step on a CPU.

Nothing of the evaluated session enters: the images are the other sessions' and the
teachers are other sessions' twins (:func:`synth.surrogate.core.plan_core` guards both).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from synth.runtime import autocast, derive_seed, progress, resolve_device, resolve_precision, torch_generator

log = logging.getLogger(__name__)

#: images whose maps fix the channels' standardization and principal components
FIT_IMAGES = 512
#: images per pass through the teachers
TEACHER_CHUNK = 64


@dataclass(frozen=True)
class MapTargets:
    """The teachers' maps as regression targets.

    Attributes:
        maps: ``(N, K, h, w)`` bfloat16: the standardized channels projected onto their
            first K principal components, scaled so that the kept components' mean
            variance is 1.
        n_channels: the teachers' channels before the projection.
        explained: share of the standardized channels' variance the K components keep.
        outputs: each teacher ensemble's raw outputs ``(N, T)`` in its dtype, from the same
            pass through the twins' layers (free: the maps run up to the last layer).
    """

    maps: torch.Tensor
    n_channels: int
    explained: float
    outputs: tuple[np.ndarray, ...] = ()


def _teacher_maps(ensembles: Sequence[Any], images: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Every teacher twin's hidden ``layers`` at 28 x 28, concatenated: ``(N, C, 28, 28)``
    float32, and each ensemble's raw outputs ``(N, T)`` from the same pass."""
    from synth.populations.twins import TWIN_SIZE

    side = TWIN_SIZE // 4  # layers 2-4 are 28 x 28; layers 0-1 are averaged down to it
    parts, outputs = [], []
    for e in ensembles:
        f, y = e.pooled_hidden(images, layers, side, with_outputs=True)
        parts.append(f.float().cpu())
        outputs.append(y.cpu().numpy())  # in the twins' dtype, as their cache holds them
    f = torch.cat(parts, dim=1)
    return f.view(images.shape[0], -1, side, side), outputs


@torch.no_grad()
def teacher_map_targets(
    ensembles: Sequence[Any], images: torch.Tensor, layers: Sequence[int], components: int, *, fit_images: int = FIT_IMAGES
) -> MapTargets:
    """The teachers' maps on ``images``, standardized and projected (see :class:`MapTargets`).

    The per-channel mean and standard deviation and the principal components are taken
    over the positions of the first ``fit_images`` images (the channels' covariance in
    float64); every image is then projected. Memory: the first ``fit_images`` images' full
    maps, then one chunk of ``TEACHER_CHUNK`` images at a time.

    Args:
        ensembles: the teachers' :class:`~synth.populations.twins.TwinEnsemble` s.
        images: ``(N, C, H, W)`` in [0, 1] (the twins' input rules: C = 1 or 3).
        layers: twin layer indices.
        components: principal components kept (0 or >= the channels: all, unrotated).
        fit_images: images that fix the standardization and the components.

    Returns:
        :class:`MapTargets` (with the teachers' outputs on ``images``).
    """
    n = images.shape[0]
    first, first_y = _teacher_maps(ensembles, images[: min(fit_images, n)], layers)
    outputs = [[y] for y in first_y]
    c = first.shape[1]
    # the channels' sums and cross-products in float64, a few images at a time (the
    # positions of 512 images times 1756 channels would take 5.6 GB at once)
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, c, dtype=torch.float64)
    for block in first.split(8):
        rows = block.permute(0, 2, 3, 1).reshape(-1, c).double()
        s1 += rows.sum(dim=0)
        s2 += rows.T @ rows
    m = first.shape[0] * first.shape[2] * first.shape[3]
    mean = s1 / m
    cov = (s2 - m * torch.outer(mean, mean)) / max(1, m - 1)
    std = cov.diagonal().clamp_min(0).sqrt().clamp_min(1e-3)
    if components and components < c:
        corr = cov / torch.outer(std, std)  # the standardized channels' covariance
        evals, evecs = torch.linalg.eigh(corr)
        order = torch.argsort(evals, descending=True)[:components]
        proj = evecs[:, order]
        kept = evals[order].clamp_min(0)
        explained = float(kept.sum() / evals.clamp_min(0).sum())
        proj = proj / math.sqrt(float(kept.mean()))
    else:
        proj = torch.eye(c, dtype=torch.float64)
        explained = 1.0
    k = proj.shape[1]
    scale = (proj / std.view(-1, 1)).float()  # (C, K): standardize and project in one product
    shift = (mean.view(1, -1) @ (proj / std.view(-1, 1))).float().view(1, k, 1, 1)
    out = torch.empty((n, k) + tuple(first.shape[2:]), dtype=torch.bfloat16)

    def put(i: int, maps: torch.Tensor) -> None:
        out[i : i + maps.shape[0]] = (torch.einsum("nchw,ck->nkhw", maps, scale) - shift).to(torch.bfloat16)

    put(0, first)
    starts = range(first.shape[0], n, TEACHER_CHUNK)
    for i in progress(starts, desc="teacher maps", total=len(starts)):
        maps, ys = _teacher_maps(ensembles, images[i : i + TEACHER_CHUNK], layers)
        put(i, maps)
        for o, y in zip(outputs, ys):
            o.append(y)
    return MapTargets(out, int(c), explained, tuple(np.concatenate(o) for o in outputs))


def _squares(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(sum of squared errors, sum of squares of the centred target) of a batch."""
    t = target.float()
    return float((pred.float() - t).pow(2).sum()), float(t.pow(2).sum())


def fit_student(
    images: torch.Tensor,
    targets: torch.Tensor,
    cc: Any,
    *,
    in_channels: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_seconds: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train a ``small_cnn`` with a 1x1 head to reproduce ``targets`` (mean squared error).

    Args:
        images: ``(N, C, H, W)`` in [0, 1] (resized inside to ``cc.input_size``).
        targets: ``(N, K, h, w)`` maps (averaged down to the student's output size if it
            differs).
        cc: the :class:`~synth.surrogate.core.CoreConfig` (architecture, epochs, batch size,
            lr, cosine schedule, val_fraction, precision).
        in_channels: image channels (1 or 3).
        device: where to train.
        seed: drives the split, initialization, shuffling and mirroring.
        max_seconds: training time limit (no epoch is started that would end past it;
            the best epoch is kept); None: no limit.

    Returns:
        (core, report): ``core`` in the format of :func:`~synth.surrogate.fit.fit_core`
        (``backbone: pretrained_core`` loads it, head included); ``report`` with the
        validation R^2 per epoch (``val_r2``), ``best_epoch``, ``epochs_run``...
    """
    from synth.surrogate.backbones import build_backbone
    from synth.surrogate.fit import _cosine, _plan_epochs, core_checkpoint, split_indices

    device = resolve_device(device)
    precision = resolve_precision(cc.precision, device)
    n, k = targets.shape[0], targets.shape[1]
    if images.shape[0] != n:
        raise ValueError(f"{images.shape[0]} images but {n} target maps")
    backbone = build_backbone(
        "small_cnn", weights="none", in_channels=in_channels, input_size=int(cc.input_size),
        kwargs={**dict(cc.backbone_kwargs), "head": k}, seed=derive_seed(seed, "student-init"),
    ).to(device, memory_format=torch.channels_last)
    out_hw = tuple(backbone.out_shape(images.shape[-1], in_channels)[1:])
    if tuple(targets.shape[2:]) != out_hw:
        log.info("student: teacher maps %s averaged to the student's output %s", tuple(targets.shape[2:]), out_hw)
        targets = torch.cat([F.adaptive_avg_pool2d(t.float(), out_hw).to(torch.bfloat16) for t in targets.split(256)])
    tr, va = split_indices(n, float(cc.val_fraction), derive_seed(seed, "student-split"))
    gen = torch_generator(derive_seed(seed, "student-batches"))
    opt = torch.optim.Adam(backbone.parameters(), lr=float(cc.lr), weight_decay=float(cc.weight_decay))
    bs = int(cc.batch_size)
    steps_per_epoch = math.ceil(tr.numel() / bs)
    sched = _cosine(opt, int(cc.epochs) * steps_per_epoch)
    cl = torch.channels_last

    def val_r2() -> float:
        backbone.eval()
        sse = sst = 0.0
        with torch.no_grad(), autocast(precision, device):
            for b in va.split(bs * 2):
                p = backbone(images[b].to(device, memory_format=cl))
                e, s = _squares(p, targets[b].to(device))
                sse, sst = sse + e, sst + s
        backbone.train()
        return 1.0 - sse / max(sst, 1e-12)

    t0 = time.perf_counter()
    history: list[float] = []
    durations: list[float] = []
    best, best_epoch, best_state = -math.inf, 0, None
    planned, stopped_by_time = int(cc.epochs), False
    backbone.train()
    epoch = 0
    for epoch in progress(range(int(cc.epochs)), desc="student core"):
        start = time.perf_counter()
        order = tr[torch.randperm(tr.numel(), generator=gen)]
        for b in order.split(bs):
            x = images[b].to(device)
            y = targets[b].to(device).float()
            if bool(torch.rand((), generator=gen) < 0.5):  # mirrored image, mirrored maps
                x, y = x.flip(-1), y.flip(-1)
            with autocast(precision, device):
                p = backbone(x.contiguous(memory_format=cl))
            loss = F.mse_loss(p.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        score = val_r2()
        history.append(round(score, 5))
        if score > best:
            best, best_epoch = score, epoch + 1
            best_state = copy.deepcopy(backbone.body.state_dict())
        log.info("student core epoch %d: val R^2 %.4f (best %.4f at epoch %d)", epoch + 1, score, best, best_epoch)
        durations.append(time.perf_counter() - start)
        if max_seconds is not None:
            planned, stop = _plan_epochs(
                durations, time.perf_counter() - t0, max_seconds, int(cc.epochs), planned, what="student core"
            )
            sched.total_steps[0] = planned * steps_per_epoch
            if stop:
                stopped_by_time = True
                break
        if epoch + 1 >= planned:
            break
    if best_state is not None:
        backbone.body.load_state_dict(best_state)
    core = core_checkpoint(backbone, in_channels)
    report = {
        "val_r2": round(best, 5),
        "val_r2_history": history,
        "epochs_run": epoch + 1,
        "best_epoch": best_epoch,
        "stopped_by_time_limit": stopped_by_time,
        "schedule_epochs": planned,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "precision": precision,
        "n_train": int(tr.numel()),
        "n_val": int(va.numel()),
    }
    log.info("student core: val R^2 %.3f after %d epochs (best %d), %.0f s", best, epoch + 1, best_epoch, report["train_seconds"])
    return core, report
