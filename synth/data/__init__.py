"""synth.data."""
