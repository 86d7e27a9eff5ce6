"""The ``synthesis`` config section: parameterization, transforms, priors, constraints, loop.

Every component is named by registry name with keyword arguments, e.g.::

    synthesis:
      param: {name: fourier, decay_power: 1.5}
      transforms:
        - {name: jitter, pixels: 4}
        - {name: scale, min: 0.95, max: 1.05}
        - {name: rotate, degrees: 5}
      priors:
        - {name: tv, weight: 0.05}
      constraints: {luminance: natural, contrast: natural, aperture_radius: 0.48}
      objectives:                      # job objective name -> registry spec (optional)
        one_hot: {name: one_hot, temperature: 0.5}
      steps: 128
      lr: 0.2

The registries are ``PARAMS``, ``TRANSFORMS``, ``PRIORS`` and ``OBJECTIVES`` (see
``synth.synthesis``); names and arguments are checked when the config is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from synth.errors import ConfigError

def _spec_name(spec: Any, key: str) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        return spec["name"], {k: v for k, v in spec.items() if k != "name"}
    raise ConfigError(f"expected a name or a mapping with 'name', got {spec!r}", key=key)


def check_spec(registry: Any, spec: Any, key: str, *, allow: tuple[str, ...] = ()) -> None:
    """Raise ConfigError (naming ``key``) if ``spec`` names an unknown component or argument.

    ``allow`` lists extra keys that the engine itself consumes (e.g. ``weight``).
    """
    name, kwargs = _spec_name(spec, key)
    registry.get(name, key=key)
    registry.check_kwargs(name, {k: v for k, v in kwargs.items() if k not in allow}, key=key)


@dataclass(frozen=True, kw_only=True)
class ConstraintsConfig:
    """Display constraints, enforced on every image the model sees and on the saved PNGs.

    The displayed image is ``background + w * u`` where ``w`` is the soft aperture (times
    the soft receptive-field mask) and ``u`` is projected so that the whole image has the
    requested mean luminance and RMS contrast (population std of all pixel values) with
    every pixel in [0, 1]. Outside the aperture the image equals the background, which is
    the mean luminance.
    """

    luminance: float | str | None = field(
        default="natural",
        metadata={"help": "mean luminance in [0, 1]: 'natural' (mean of the natural set), a number, or null (free)"},
    )
    contrast: float | str | None = field(
        default="natural",
        metadata={"help": "RMS contrast (std of pixel values): 'natural', a number, or null (free)"},
    )
    background: float | None = field(
        default=None,
        metadata={"min": 0.0, "max": 1.0, "help": "background grey level outside the aperture (default: the luminance, else 0.5)"},
    )
    aperture_radius: float | None = field(
        default=None,
        metadata={"min": 0.0, "max": 1.0, "help": "soft circular aperture radius as a fraction of the image size (0.5 touches the edges); null: none"},
    )
    aperture_edge: float = field(
        default=0.06, metadata={"min": 0.0, "max": 1.0, "help": "width of the aperture's raised-cosine edge (fraction of image size)"}
    )
    rf_mask: bool = field(default=False, metadata={"help": "blend to background outside the target site's receptive field"})
    rf_threshold: float = field(
        default=0.2, metadata={"min": 0.0, "max": 1.0, "help": "RF mask: the RF is where the surrogate's receptive_fields() >= this"}
    )
    rf_edge: float = field(
        default=0.04, metadata={"min": 0.0, "max": 1.0, "help": "RF mask: Gaussian softening of its edge (sigma, fraction of image size)"}
    )
    project_iters: int = field(
        default=4, metadata={"min": 1, "max": 100, "help": "projection iterations (shift, scale, clip) per optimization step"}
    )
    final_iters: int = field(
        default=50, metadata={"min": 1, "max": 1000, "help": "projection iterations for the saved images"}
    )
    tolerance: float = field(
        default=0.01, metadata={"min": 0.0, "help": "warn when an image's achieved luminance or contrast is off by more than this"}
    )

    def __post_init__(self) -> None:
        for name in ("luminance", "contrast"):
            v = getattr(self, name)
            if isinstance(v, str) and v != "natural":
                raise ConfigError(f"expected 'natural', a number or null, got {v!r}", key=name)
            if isinstance(v, float) and not 0.0 <= v <= 1.0:
                raise ConfigError(f"expected a value in [0, 1], got {v!r}", key=name)
        if isinstance(self.contrast, float) and self.contrast <= 0:
            raise ConfigError(f"expected a contrast > 0, got {self.contrast!r}", key="contrast")


@dataclass(frozen=True, kw_only=True)
class StoppingConfig:
    """When each image stops (images stop independently; ``steps`` is the maximum)."""

    rule: str = field(
        default="plateau", metadata={"choices": ("fixed", "plateau"), "help": "fixed: run all steps; plateau: stop an image when its objective stops improving"}
    )
    patience: int = field(default=24, metadata={"min": 1, "help": "plateau: steps without improvement before an image stops"})
    min_delta: float = field(
        default=0.002, metadata={"min": 0.0, "help": "plateau: smallest improvement (relative to |objective| + 1) that counts"}
    )
    min_steps: int = field(default=32, metadata={"min": 0, "help": "plateau: never stop before this step"})
    smoothing: float = field(
        default=0.8, metadata={"min": 0.0, "max": 0.999, "help": "plateau: EMA factor of the (noisy, transformed) objective"}
    )


@dataclass(frozen=True, kw_only=True)
class SynthesisConfig:
    """The ``synthesis`` section (see the module docstring for an example)."""

    param: str | dict[str, Any] = field(
        default_factory=lambda: {"name": "fourier", "decay_power": 1.5},
        metadata={"help": "image parameterization: pixel or fourier (+ arguments: decay_power, output, decorrelate, init_sd)"},
    )
    transforms: tuple[str | dict[str, Any], ...] = field(
        default_factory=lambda: (
            {"name": "jitter", "pixels": 3},
            {"name": "scale", "min": 0.95, "max": 1.05},
            {"name": "rotate", "degrees": 5.0},
        ),
        metadata={"help": "robustness transforms applied in order each step: pad, jitter, scale, rotate"},
    )
    priors: tuple[str | dict[str, Any], ...] = field(
        default_factory=lambda: ({"name": "tv", "weight": 0.5},),
        metadata={"help": "image priors / regularizers: tv, l2, blur_grad (each with a weight or sigma)"},
    )
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    objectives: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "job objective name -> registry spec (name + arguments, or a list of them to sum, each with an optional weight)"},
    )
    steps: int = field(default=128, metadata={"min": 1, "max": 100000, "help": "maximum optimization steps per image"})
    lr: float = field(default=0.2, metadata={"min": 0.0, "help": "step size of the optimizer"})
    optimizer: str = field(
        default="adam", metadata={"choices": ("adam", "sgd", "nsgd"), "help": "adam, sgd, or nsgd (SGD with a per-image normalized gradient)"}
    )
    betas: tuple[float, float] = field(
        default=(0.8, 0.99), metadata={"min": 0.0, "max": 0.9999, "help": "adam: decay rates of the gradient mean and square"}
    )
    stopping: StoppingConfig = field(default_factory=StoppingConfig)
    batch_size: int | None = field(
        default=16,
        metadata={"min": 1, "help": "images per model call; a fixed size keeps results independent of how jobs are split into batches (null: all at once)"},
    )
    precision: str = field(
        default="fp32",
        metadata={
            "choices": ("fp32", "bf16", "fp16", "auto"),
            "help": "fp32, or autocast of the model to bf16 (CUDA; CPUs with AVX512-BF16/AMX) or fp16 (CUDA only); auto: bf16 where native, else fp32",
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (CUDA: faster after a warm-up)"})

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"expected two numbers, got {list(self.betas)!r}", key="betas")
        from synth.synthesis.objectives import check_objective_spec
        from synth.synthesis.params import PARAMS
        from synth.synthesis.priors import PRIORS
        from synth.synthesis.transforms import TRANSFORMS

        check_spec(PARAMS, self.param, "param")
        PARAMS.build(self.param, key="param", channels=3, size=8)  # its values too, now rather than after the core and fit stages
        for i, t in enumerate(self.transforms):
            check_spec(TRANSFORMS, t, f"transforms[{i}]")
        for i, p in enumerate(self.priors):
            check_spec(PRIORS, p, f"priors[{i}]")
        for name, spec in self.objectives.items():
            check_objective_spec(spec, key=f"objectives.{name}")
