"""Generate MIDI with a trained model: python generate.py --checkpoint <dir> [--mode ...]

`python generate.py --help` lists the flags; the README's generation guide shows each mode.
"""

from fractalmidi_jax.config import use_compilation_cache
from fractalmidi_jax.generation import main

if __name__ == "__main__":
    use_compilation_cache()
    main()
