"""Contracts between a site population (a *target*) and the rest of synth.

A target answers two questions, Brain-Score style ("look at these stimuli, record
these sites"):

1. ``natural(...)``: which natural images did the sites view, and what was recorded?
2. ``recorder()``: the follow-up recorder: given new images, what do the sites do?
   (the rig; in synth, a simulated population or calibrated digital twins.)

Targets are built from ``targets/<name>.yaml`` files by registry name (``kind``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from synth.data.recordings import Recording
from synth.registry import Registry


@dataclass(frozen=True)
class NaturalData:
    """The natural image set and the responses recorded to it.

    Attributes:
        images: (N, C, H, W) float32 in [0, 1]; C = 1 or 3, at the display size.
        recording: Recording whose ``stimulus_id`` equals ``stimulus_id`` (same order)
            and whose ``site_id`` equals the target's ``site_ids``.
        stimulus_id: (N,) strings.
        info: free-form provenance (files and checksums, generator settings...).
    """

    images: torch.Tensor
    recording: Recording
    stimulus_id: np.ndarray
    info: Mapping[str, Any]


@runtime_checkable
class Recorder(Protocol):
    """A follow-up recorder: responses of the target's sites to new images."""

    site_ids: np.ndarray  # (S,) str
    areas: np.ndarray  # (S,) str

    def expected(self, images: torch.Tensor) -> torch.Tensor:
        """Noise-free mean responses.

        Shape:
            images: (N, C, H, W) float in [0, 1] (C = 1 is replicated where RGB is needed).
            returns: (N, S) float, in the recorder's response units.
        """
        ...

    def record(
        self, images: torch.Tensor, stimulus_ids: Sequence[str], *, n_repeats: int, seed: int, expected: torch.Tensor | None = None
    ) -> Recording:
        """Responses with trial-to-trial noise: a Recording of (S, N, n_repeats).

        ``expected``: this recorder's ``expected(images)``, when the caller already has it.
        """
        ...


@runtime_checkable
class Target(Protocol):
    """A site population to control (see module docstring)."""

    name: str
    site_ids: np.ndarray
    areas: np.ndarray

    def natural(self, *, image_size: int, grayscale: bool, seed: int) -> NaturalData:
        ...

    def recorder(self, device: torch.device | str | None = None) -> Recorder:
        """The simulated follow-up recorder (None for real recordings), computing on ``device``
        (None: where it already computes)."""
        ...


#: ``kind`` in a targets/*.yaml file -> builder(**params, root=..., session=...) -> Target
TARGETS: Registry = Registry("target kind")
