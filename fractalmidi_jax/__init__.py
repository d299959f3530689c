"""FractalMIDI in JAX: a fractal of MAR/AR transformers that writes MIDI piano rolls.

    import fractalmidi_jax
    model = fractalmidi_jax.load("outputs/quickstart/checkpoints/best")
    songs = model.generate(num_samples=4, target_width=128, seed=0)  # pretty_midi.PrettyMIDI each

`load` and `Generator` live in fractalmidi_jax/generation.py and are imported on first use, so
`import fractalmidi_jax` stays cheap (no JAX until a model is loaded).
"""

__all__ = ["Generator", "load"]


def __getattr__(name: str):
    if name in __all__:
        from fractalmidi_jax import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'fractalmidi_jax' has no attribute {name!r}")
