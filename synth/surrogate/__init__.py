"""synth.surrogate: brain-mapped CNN surrogates (backbone + per-site readout).

Public API:

- :class:`~synth.surrogate.fit.FitConfig` (the ``fit`` config section),
  :func:`~synth.surrogate.fit.fit_surrogate`, :func:`~synth.surrogate.fit.predict`
- :class:`~synth.surrogate.model.Surrogate` (``save`` / ``Surrogate.load``,
  ``receptive_fields``); :class:`~synth.surrogate.model.SurrogateEnsemble` (the mean of
  several, ``fit.ensemble``)
- :func:`~synth.surrogate.fit.fit_core` / :func:`~synth.surrogate.fit.save_core`: a small
  core shared by several sessions, reused with ``backbone: pretrained_core``
- :class:`~synth.surrogate.core.CoreConfig` (``fit.core``), :func:`~synth.surrogate.core.plan_core`,
  :func:`~synth.surrogate.core.ensure_core`: the core stage (``weights: auto``), a core
  trained on the other sessions of a data root and cached outside the repository
- registries ``BACKBONES`` (backbones.py; ``cowley_twins`` in twin_backbone.py) and ``READOUTS`` (readouts.py)
"""

from synth.surrogate.backbones import BACKBONES
from synth.surrogate import twin_backbone  # noqa: F401  (registers the cowley_twins backbone)
from synth.surrogate.core import CoreConfig, CorePlan, ensure_core, plan_core
from synth.surrogate.fit import FitConfig, SplitConfig, fit_core, fit_surrogate, predict, save_core
from synth.surrogate.model import Surrogate, SurrogateEnsemble
from synth.surrogate.readouts import READOUTS

__all__ = ["BACKBONES", "READOUTS", "CoreConfig", "CorePlan", "ensure_core", "plan_core", "FitConfig", "SplitConfig", "Surrogate", "SurrogateEnsemble", "fit_core", "fit_surrogate", "predict", "save_core"]
