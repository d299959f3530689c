"""Train a FractalMIDI model: python train.py --config configs/<name>.yaml [--flag value ...]

Every field of fractalmidi_jax/config.py is a flag; `python train.py --help` lists them.
"""

from fractalmidi_jax.config import parse_flags
from fractalmidi_jax.trainer import train

if __name__ == "__main__":
    train(parse_flags(description=__doc__))
