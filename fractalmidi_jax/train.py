"""The training command: `fractalmidi-train`, `python -m fractalmidi_jax.train` or `python train.py`.

    fractalmidi-train --config configs/<name>.yaml [--any_field value ...]

Every field of fractalmidi_jax/config.py is a flag (`--help` lists them by section, each with
its comment and default); flags override the YAML.
"""

from fractalmidi_jax.config import parse_flags, set_xla_flags, use_compilation_cache


def main(argv: list[str] | None = None) -> None:
    config = parse_flags(argv, description=__doc__.split("\n")[0])
    set_xla_flags()
    use_compilation_cache()
    from fractalmidi_jax.trainer import train  # after the flags: --help and flag errors skip importing jax

    train(config)


if __name__ == "__main__":
    main()
