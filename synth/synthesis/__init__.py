"""synth.synthesis."""
