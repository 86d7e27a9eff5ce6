"""synth.validation: score predictions against follow-up recordings (NumPy-only, no torch).

- :mod:`~synth.validation.io`: predictions / recordings (npz or long CSV) / manifest readers.
- :mod:`~synth.validation.metrics`: per-site Pearson r, noise-corrected r^2 (Pospisil &
  Bair 2021), split-half reliability, joining on ``stimulus_id`` / ``site_id``.
- :mod:`~synth.validation.control`: stretch / one-hot control outcomes with bootstrap CIs
  (:func:`~synth.validation.control.closed_loop_metrics`).
- :mod:`~synth.validation.validate`: ``synth validate`` (:func:`run_validate`) and the
  pipeline's validate stage (:func:`closed_loop_report`).
- :mod:`~synth.validation.html`: the self-contained report.html.
"""
