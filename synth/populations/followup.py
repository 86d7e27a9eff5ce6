"""The follow-up recording: a simulated subject views the natural set and a stimulus set.

``synth run`` records a run's own images this way when its target simulates its sites
(the virtual population, digital twins); ``synth record`` (:mod:`synth.record`) does the
same for a finished run folder and any simulated subject, so a lab can rehearse the
whole path (run, rig, ``synth validate``) before the monkey does.

Example:
    >>> rec, mean = record_followup(recorder, nat_images, nat_ids, stim_images, stim_ids,
    ...                             n_repeats=10, seed=0)                 # doctest: +SKIP
    >>> rec.save("followup.npz")                                          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import torch

from synth.data.recordings import Recording
from synth.populations.base import Recorder


def record_followup(
    recorder: Recorder,
    natural_images: torch.Tensor,
    natural_ids: Sequence[str],
    stimulus_images: torch.Tensor,
    stimulus_ids: Sequence[str],
    *,
    n_repeats: int,
    seed: int,
    record_natural: bool = True,
) -> tuple[Recording, torch.Tensor]:
    """Record the natural images, then the stimuli, with trial noise.

    Args:
        recorder: the simulated subject.
        natural_images, stimulus_images: ``(N, C, H, W)`` and ``(M, C, H, W)`` in [0, 1],
            the same display format.
        natural_ids, stimulus_ids: their ``stimulus_id`` values.
        n_repeats: trials per image.
        seed: the recording's seed (each image's trials depend only on it and the image's id).
        record_natural: False records the stimuli only (the natural statistics then come
            from elsewhere, ``followup.record_natural: false``).

    Returns:
        ``(recording, expected)``: the Recording (natural images first unless skipped) and
        the recorder's noise-free responses ``(N + M, S)`` to every image, natural ones
        included, from which the trials were drawn.

    Shape:
        natural_images: (N, C, H, W); stimulus_images: (M, C, H, W); expected: (N + M, S).
    """
    if natural_images.shape[1:] != stimulus_images.shape[1:]:
        raise ValueError(f"natural images {tuple(natural_images.shape[1:])} and stimuli {tuple(stimulus_images.shape[1:])} differ in format")
    ids = [str(s) for s in natural_ids] + [str(s) for s in stimulus_ids]
    images = torch.cat([natural_images, stimulus_images], dim=0)
    if len(ids) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(ids)} stimulus ids")
    # The subject's noise-free responses (the truth a real recording only estimates),
    # computed once: the noisy trials are drawn around them.
    expected = recorder.expected(images)
    first = 0 if record_natural else natural_images.shape[0]
    rec = recorder.record(images[first:], ids[first:], n_repeats=n_repeats, seed=seed, expected=expected[first:])
    return rec, expected
