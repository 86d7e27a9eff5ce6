"""The small typed objects passed between the pipeline and the synthesis engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch


def stimulus_id_of(objective: str, site: str, rank: int) -> str:
    """The stimulus id of a site's ``rank``-th image for ``objective``: ``<objective>_<site>_s<rank>``.

    Example:
        >>> stimulus_id_of("one_hot", "201025_n003", 2)
        'one_hot_201025_n003_s2'
    """
    return f"{objective}_{site}_s{int(rank)}"


def parse_stimulus_id(stimulus_id: str, site_ids: Sequence[str], objectives: Sequence[str] = ("stretch", "one_hot")) -> tuple[str, str, int]:
    """The inverse of :func:`stimulus_id_of` for the sites ``site_ids`` (which may hold ``_``).

    Raises:
        ValueError: not such an id for one of ``objectives`` and ``site_ids``.

    Example:
        >>> parse_stimulus_id("one_hot_201025_n003_s2", ["201025_n003"])
        ('one_hot', '201025_n003', 2)
    """
    for obj in objectives:
        if stimulus_id.startswith(obj + "_") and "_s" in stimulus_id:
            site, k = stimulus_id[len(obj) + 1 :].rsplit("_s", 1)
            if site in site_ids and k.isdigit():
                return obj, site, int(k)
    raise ValueError(f"stimulus id '{stimulus_id}' is not <{'|'.join(objectives)}>_<site>_s<k> for a site of the run")


@dataclass(frozen=True)
class Job:
    """One image to synthesize.

    Args:
        stimulus_id: the image's id (file name stem in the stimulus set).
        objective: a registry spec: a name (``"stretch"``, ``"one_hot"``, or a name
            defined in ``SynthesisConfig.objectives``), a mapping ``{"name": ..., **kwargs}``
            or a list of such specs (summed; each may carry a ``weight``).
        target_site: index (into the model's outputs) of the site this image targets.
        seed: the image's own seed: its initialization and its transform draws come only
            from generators seeded with it, so the image does not depend on which other
            jobs share its batch.
    """

    stimulus_id: str
    objective: str | Mapping[str, Any] | Sequence[Any]
    target_site: int
    seed: int


def natural_statistics(responses: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-site statistics objectives z-score with: mean and standard deviation over
    the natural images.

    One definition for every place that z-scores an objective (the synthesis context, the
    ranking of natural start images): the population standard deviation plus 1e-6, so it
    is > 0 even for a site that never varies.

    Args:
        responses: ``(N, S)`` responses of S sites to N >= 1 natural images.

    Returns:
        ``(mean, std)``, each ``(S,)`` float32.

    Example:
        >>> m, s = natural_statistics(np.array([[1.0, 2.0], [3.0, 2.0]]))
        >>> m.tolist(), [round(v, 6) for v in s.tolist()]
        ([2.0, 2.0], [1.000001, 1e-06])
    """
    if isinstance(responses, torch.Tensor):
        responses = responses.detach().cpu().numpy()
    r = np.asarray(responses, dtype=np.float64)  # computed in float64, returned as float32
    if r.ndim != 2 or r.shape[0] < 1:
        raise ValueError(f"responses must be (natural images, sites) with at least one image, got shape {r.shape}")
    return torch.as_tensor(r.mean(axis=0), dtype=torch.float32), torch.as_tensor(r.std(axis=0) + 1e-6, dtype=torch.float32)


@dataclass(frozen=True)
class ObjectiveContext:
    """What objectives and constraints need to know about the natural image set.

    Args:
        site_ids: (S,) site ids in model output order.
        natural_mean: (S,) mean predicted response to the natural images (z-scoring).
        natural_std: (S,) standard deviation of those predictions (> 0).
        luminance: mean luminance of the natural images (mean pixel value in [0, 1]).
        contrast: mean RMS contrast of the natural images (std of pixel values).
        rf_masks: optional (S, H, W) receptive fields in [0, 1] (the surrogate's
            ``receptive_fields()``), for the receptive-field display mask.
    """

    site_ids: Sequence[str] | np.ndarray
    natural_mean: torch.Tensor
    natural_std: torch.Tensor
    luminance: float = 0.5
    contrast: float = 0.2
    rf_masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        s = len(self.site_ids)
        for name in ("natural_mean", "natural_std"):
            v = torch.as_tensor(getattr(self, name), dtype=torch.float32)
            if v.shape != (s,):
                raise ValueError(f"ObjectiveContext.{name} must have shape ({s},), got {tuple(v.shape)}")
            object.__setattr__(self, name, v)
        if not bool((self.natural_std > 0).all()):
            raise ValueError("ObjectiveContext.natural_std must be > 0 for every site")
        if self.rf_masks is not None:
            rf = torch.as_tensor(self.rf_masks, dtype=torch.float32)
            if rf.ndim != 3 or rf.shape[0] != s:
                raise ValueError(f"ObjectiveContext.rf_masks must have shape ({s}, H, W), got {tuple(rf.shape)}")
            object.__setattr__(self, "rf_masks", rf)

    @classmethod
    def from_predictions(
        cls,
        site_ids: Sequence[str],
        natural_pred: torch.Tensor | np.ndarray,
        natural_images: torch.Tensor | None = None,
        rf_masks: torch.Tensor | None = None,
    ) -> "ObjectiveContext":
        """Build from predicted natural responses ``(N, S)`` (and the natural images ``(N, C, H, W)``).

        The z-scoring statistics are :func:`natural_statistics`; the luminance and contrast
        targets are the natural images' mean luminance and RMS contrast as
        :func:`synth.synthesis.image_stats` measures every image (population sd).
        """
        from synth.synthesis.constraints import image_stats  # (constraints imports this module)

        mean, std = natural_statistics(natural_pred)
        lum, con = 0.5, 0.2
        if natural_images is not None:  # measured as the constraints measure each image
            lum_i, con_i = image_stats(natural_images)
            lum, con = float(lum_i.mean()), float(con_i.mean())
        return cls(site_ids=np.asarray(site_ids).astype(str), natural_mean=mean, natural_std=std, luminance=lum, contrast=con, rf_masks=rf_masks)


@dataclass
class SynthesisResult:
    """Synthesized images and what was achieved, in job order.

    Attributes:
        stimulus_id: (N,) ids, in job order.
        images: (N, H, W, C) uint8, exactly as they will be saved.
        luminance: (N,) achieved mean luminance of the uint8 images (/255).
        contrast: (N,) achieved RMS contrast (population std) of the uint8 images (/255).
        objective_value: (N,) final objective of the uint8 images (no transforms).
        target_response: (N,) predicted response of each job's target site to its uint8 image.
        predicted: (N, S) predicted responses to the uint8 images.
        steps: (N,) optimization steps each image ran.
        history: per-image per-step records, each (N, max_steps) float32 NaN-padded:
            ``loss`` (objective under transforms minus priors, negated),
            ``objective`` (under transforms) and ``target_response`` (under transforms).
        info: timing and settings (seconds, device, precision...).
    """

    stimulus_id: np.ndarray
    images: np.ndarray
    luminance: np.ndarray
    contrast: np.ndarray
    objective_value: np.ndarray
    target_response: np.ndarray
    predicted: np.ndarray
    steps: np.ndarray
    history: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def images_float(self) -> torch.Tensor:
        """The uint8 images as float ``(N, C, H, W)`` in [0, 1]."""
        return torch.as_tensor(self.images).permute(0, 3, 1, 2).float() / 255.0
