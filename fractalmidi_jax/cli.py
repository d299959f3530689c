"""The argparse parser every command uses (train, generate, evaluate, data, bench).

Plain argparse plus two things it lacks: a misspelt flag gets "did you mean --x" (argparse
only learns that in Python 3.14), and every flag's help shows its default unless the default
says nothing (None, False, ""). Our own few lines rather than tyro or simple-parsing: the
config flags must default to "not given" so that a YAML file's values survive, booleans keep
`--x`/`--no_x`, lists take `a,b` or `a b`, and flags keep the guide's underscores; a library
would need as many lines of configuration to do the same, and one more dependency.
"""

import argparse
import difflib
import sys
from pathlib import Path


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written (module docstrings) and appends '(default: X)' to a flag's
    help when X is worth reading and the help does not already speak of its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or any(default is nothing for nothing in (None, False, argparse.SUPPRESS))
            or default == ""
            or not action.option_strings
        ):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(d) for d in default)
        return f"{text} (default: {default})".strip()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown-flag errors suggest the closest known flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("prog", _program_name())
        kwargs.setdefault("allow_abbrev", False)  # --max_step must not quietly mean --max_steps
        super().__init__(*args, **kwargs)

    def known_flags(self) -> list[str]:
        """Every --flag of this parser and of its subcommands (argparse reports a subcommand's
        unknown flag from the top-level parser)."""
        flags = []
        for action in self._actions:
            flags += [flag for flag in action.option_strings if flag.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                flags += [flag for sub in action.choices.values() for flag in sub.known_flags()]
        return sorted(set(flags))

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{suggestions(message, self.known_flags())}\n")


def _program_name() -> str:
    """'python -m fractalmidi_jax.data' when run so (argparse would say 'data.py'), else the
    script's name (fractalmidi-data, train.py)."""
    script = Path(sys.argv[0])
    if script.parent == Path(__file__).parent:
        return f"python -m fractalmidi_jax.{script.stem}"
    return script.name


def suggestions(message: str, flags: list[str]) -> str:
    """'; did you mean --x?' for each unknown flag argparse names in `message`, else ''."""
    if "unrecognized arguments:" not in message:
        return ""
    unknown = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("--")]
    hints = []
    for word in unknown:
        underscored = "--" + word[2:].replace("-", "_")
        close = (
            [underscored] if underscored in flags else difflib.get_close_matches(word, flags, n=1, cutoff=0.6)
        )
        if close:
            hints.append(f"{word}: did you mean {close[0]}?")
    return ("\n" + "\n".join(hints)) if hints else "\n(--help lists every flag)"
