"""Train a FractalMIDI model: python train.py --config configs/<name>.yaml [--flag value ...]

Every field of fractalmidi_jax/config.py is a flag; `python train.py --help` lists them.
"""

from fractalmidi_jax.config import parse_flags, use_compilation_cache
from fractalmidi_jax.trainer import main

if __name__ == "__main__":
    config = parse_flags(description=__doc__)
    use_compilation_cache()
    main(config)
