"""synth.populations."""
