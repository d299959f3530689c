"""Generate MIDI with a trained model: python generate.py --checkpoint <dir> [--mode ...]

The same as the `fractalmidi-generate` command; `python generate.py --help` lists the flags and
the README's generation guide shows each mode.
"""

from fractalmidi_jax.generation import main

if __name__ == "__main__":
    main()
