"""The generation command: `fractalmidi-generate`, `python -m fractalmidi_jax.generate` or
`python generate.py`; fractalmidi_jax/generation.py does the work."""

from fractalmidi_jax.generation import main

if __name__ == "__main__":
    main()
