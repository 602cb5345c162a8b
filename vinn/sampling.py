"""Switching sampling off: `vinn.deterministic()`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


def sampling_enabled() -> bool:
    """False inside `deterministic()` (in this thread), True otherwise."""
    return getattr(_state, "depth", 0) == 0


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Make every vinn layer compute with its posterior loc instead of sampling.

    Thread-local and nestable; usable as a context manager or a decorator::

        with vinn.deterministic():
            y = bnn(x)          # the network at the posterior mean
    """
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
