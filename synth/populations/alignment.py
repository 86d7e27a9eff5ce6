"""Gradient alignment: does the surrogate's input gradient point where the site's does?

Synthesis climbs the surrogate's gradient, so an image drives a neuron only as far as that
gradient agrees with the neuron's own. Where the sites are simulated by differentiable
models (digital twins, the virtual population), the agreement can be measured directly:
for each site and each image, the cosine between the surrogate's gradient of its
prediction for that site and the gradient of the site's own model, at given images
(held-out natural images, or the synthesized images themselves). Two spaces:

- **pixel**: gradients with respect to the image;
- **param**: with respect to the synthesis parameterization's values at that image (the
  space the optimizer steps in; for the Fourier parameterization each frequency is
  weighted by ``1 / f ** decay_power``, so low frequencies count most). This is the
  direction synthesis actually follows.

A diagnostic of a surrogate (``synth bench gradients RUN_DIR``), much cheaper than a full
loop: no synthesis, one forward and backward pass per site and image for the site's model
and for each surrogate. Like ``synth bench ceiling`` it uses the evaluated session's own
twins, so it is for developers comparing surrogates, never part of making stimuli.

Example:
    >>> out = gradient_alignment({"surrogate": model}, recorder.site_model, images,
    ...                          sites=range(5), param=param)           # doctest: +SKIP
    >>> out.median("surrogate", "param")                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from synth.runtime import progress, resolve_device
from synth.synthesis.engine import frozen
from synth.synthesis.params import ImageParam

#: the two spaces gradients are compared in
SPACES = ("pixel", "param")


@dataclass(frozen=True)
class GradientAlignment:
    """Per-site median (over images) cosines between surrogates' and the sites' own gradients.

    Attributes:
        sites: ``(K,)`` site indices (columns of the surrogates' outputs).
        n_images: images each median is taken over.
        pixel: model name -> ``(K,)`` cosines of image gradients.
        param: model name -> ``(K,)`` cosines of parameterization gradients (empty
            without a parameterization).
    """

    sites: np.ndarray
    n_images: int
    pixel: dict[str, np.ndarray]
    param: dict[str, np.ndarray]

    def median(self, name: str, space: str = "param") -> float:
        """Median over sites of a model's per-site alignment in ``space`` (pixel or param)."""
        if space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
        table = getattr(self, space)
        if name not in table:
            raise KeyError(f"no {space}-space alignment for {name!r}; have {', '.join(table) or 'none'}")
        return float(np.median(table[name]))


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (N >= 1, C, H, W), got {shape}")


def gradient_alignment(
    models: Mapping[str, nn.Module],
    reference: Callable[[int], nn.Module],
    images: torch.Tensor,
    *,
    sites: Sequence[int],
    param: ImageParam | None = None,
    ensemble: str | None = "ensemble",
    device: torch.device | str = "cpu",
) -> GradientAlignment:
    """Cosine between each model's and each site's own input gradient, per image.

    Args:
        models: name -> surrogate ``(N, C, H, W) in [0, 1] -> (N, S)``.
        reference: ``site -> module`` giving that site's own response ``(N,)`` or ``(N, 1)``
            (e.g. ``TwinRecorder.site_model``).
        images: ``(N, C, H, W)`` images in [0, 1] where the gradients are taken.
        sites: site indices to compare (columns of the models' outputs).
        param: the synthesis parameterization; with it, gradients are also compared in its
            space, at the parameters that render ``images`` (``param.encode``), and the
            pixel gradients are taken at that rendering.
        ensemble: with more than one model, also report their mean under this name (the
            gradient of the mean prediction is the mean of the gradients); None: do not.
        device: where to compute.

    Returns:
        :class:`GradientAlignment`; each entry is the median over images of the cosine.

    Shape:
        images: ``(N, C, H, W)``.
    """
    _check_images(images)
    sites = [int(s) for s in sites]
    if not sites:
        raise ValueError("no sites to compare")
    if not models:
        raise ValueError("no models to compare")
    dev = resolve_device(device)
    x0 = images.detach().to(dev).float()
    with contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(frozen(m.to(dev)))
        if param is not None:
            param = param.to(dev)
            p = param.encode(x0).detach().requires_grad_(True)
            x = param(p)
            leaves = [x, p]
        else:
            x = x0.clone().requires_grad_(True)
            leaves = [x]
        outs = {name: m(x) for name, m in models.items()}
        for name, o in outs.items():
            if o.ndim != 2 or o.shape[0] != x.shape[0] or max(sites) >= o.shape[1] or min(sites) < 0:
                raise ValueError(f"model {name!r} gives outputs of shape {tuple(o.shape)}; sites {min(sites)}..{max(sites)} out of range")

        def grads(out: torch.Tensor) -> list[torch.Tensor]:
            return [g.flatten(1).double() for g in torch.autograd.grad(out.sum(), leaves, retain_graph=True)]

        names = list(models) + ([ensemble] if ensemble and len(models) > 1 else [])
        cos: dict[str, dict[str, list[float]]] = {space: {n: [] for n in names} for space in SPACES[: len(leaves)]}
        for s in progress(sites, desc="gradient alignment", total=len(sites)):
            ref = reference(s)
            with frozen(ref):
                r = ref(x).reshape(x.shape[0], -1)
                if r.shape[1] != 1:
                    raise ValueError(f"reference model of site {s} gives {r.shape[1]} outputs per image, expected 1")
                g_ref = grads(r[:, 0])
            g_models = {name: grads(o[:, s]) for name, o in outs.items()}
            if len(names) > len(models):
                g_models[ensemble] = [sum(g[k] for g in g_models.values()) / len(models) for k in range(len(leaves))]
            for k, space in enumerate(cos):
                for name in names:
                    c = F.cosine_similarity(g_models[name][k], g_ref[k], dim=1)
                    cos[space][name].append(float(np.median(c.cpu().numpy())))
    tables = {space: {n: np.asarray(v) for n, v in cos.get(space, {}).items()} for space in SPACES}
    return GradientAlignment(sites=np.asarray(sites), n_images=int(x0.shape[0]), pixel=tables["pixel"], param=tables["param"])
