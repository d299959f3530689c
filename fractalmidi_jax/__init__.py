"""FractalMIDI in JAX: a fractal of MAR/AR transformers that writes MIDI piano rolls."""
