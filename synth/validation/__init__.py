"""synth.validation."""
