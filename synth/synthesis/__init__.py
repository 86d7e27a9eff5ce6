"""synth.synthesis: batched synthesis of control images on a surrogate.

Public API (used by synth.pipeline)::

    from synth.synthesis import Job, ObjectiveContext, SynthesisConfig, synthesize
    result = synthesize(model, jobs, cfg, context=ctx, image_size=112, channels=1, device="cpu")
    result.images          # (N, H, W, C) uint8, as they will be saved

Registries (names usable in YAML): ``PARAMS`` (pixel, fourier), ``TRANSFORMS`` (pad,
jitter, scale, rotate), ``PRIORS`` (tv, l2, blur_grad), ``OBJECTIVES`` (stretch,
suppress, one_hot, pattern, diversity). See ``synth.synthesis.engine`` for the loop and
how batching affects results (it does not on CPU).
"""

from synth.synthesis.config import ConstraintsConfig, StoppingConfig, SynthesisConfig
from synth.synthesis.constraints import Display, image_stats, quantize
from synth.synthesis.engine import Synthesizer, synthesize
from synth.synthesis.jobs import Job, ObjectiveContext, SynthesisResult
from synth.synthesis.objectives import OBJECTIVES, Objective, ObjectiveInputs, build_objective
from synth.synthesis.params import PARAMS
from synth.synthesis.priors import PRIORS
from synth.synthesis.scoring import score_with
from synth.synthesis.steps import PlateauStopper, Stopper, ValueStopper
from synth.synthesis.transforms import TRANSFORMS, TransformPipeline, build_transforms

__all__ = [
    "OBJECTIVES",
    "PARAMS",
    "PRIORS",
    "TRANSFORMS",
    "ConstraintsConfig",
    "Display",
    "Job",
    "Objective",
    "ObjectiveContext",
    "ObjectiveInputs",
    "PlateauStopper",
    "StoppingConfig",
    "Stopper",
    "SynthesisConfig",
    "SynthesisResult",
    "Synthesizer",
    "TransformPipeline",
    "ValueStopper",
    "build_objective",
    "build_transforms",
    "image_stats",
    "quantize",
    "score_with",
    "synthesize",
]
