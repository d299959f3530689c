"""Progress bars for the slow parts: corpus conversion, parsing, compiling, validation, generation
and evaluation.

rich's bars (rich comes with flax), drawn only when stdout is an interactive terminal and only by
process 0: CI logs, redirected output and the other hosts of a multi-host run stay clean. Each bar
disappears when its work is done; the one-line summaries the commands print stay.
"""

import contextlib
import sys


def enabled() -> bool:
    jax = sys.modules.get("jax")  # never import jax just to ask: the data tools run without it
    return sys.stdout.isatty() and (jax is None or jax.process_index() == 0)


def _console():
    from rich.console import Console

    return Console(file=sys.stdout, force_terminal=True)


def track(items, description: str, total: int | None = None):
    """Yields `items`, drawing a bar (count, elapsed, time left) while they are consumed."""
    if not enabled():
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description, total=total, transient=True, console=_console())


@contextlib.contextmanager
def status(description: str):
    """A spinner while work without countable steps runs (a compile)."""
    if not enabled():
        yield
        return
    with _console().status(description):
        yield
