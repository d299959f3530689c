"""Train a FractalMIDI model: python train.py --config configs/<name>.yaml [--flag value ...]

The same as the `fractalmidi-train` command; `python train.py --help` lists every flag.
"""

from fractalmidi_jax.train import main

if __name__ == "__main__":
    main()
