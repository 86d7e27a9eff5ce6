"""synth.surrogate."""
