"""Switching sampling off, `vinn.deterministic()`, and seeding it without touching the global RNG."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

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


@contextlib.contextmanager
def seeded(generator: torch.Generator | int | None, device: torch.device) -> Iterator[None]:
    """Draws inside come from a stream seeded by ``generator``; the global RNG is restored on exit.

    ``generator``: a `torch.Generator` (advanced by one draw, so successive calls differ and the
    sequence is reproducible, as with torch's own ``generator=`` arguments), an int seed, or None
    (no effect: the global RNG is used and advanced). Seeds and restores the CPU's global
    generator and that of ``device`` when it is an accelerator: every random draw of a forward
    pass (vinn layers, dropout, ``rsample`` of any distribution) is covered. Not thread-safe: like
    `torch.random.fork_rng`, it swaps the process-wide state for the duration.
    """
    if generator is None:
        yield
        return
    if isinstance(generator, int) and not isinstance(generator, bool):
        if generator < 0:
            raise ValueError(f"generator as a seed must be a non-negative int, got {generator}")
        generator = torch.Generator().manual_seed(generator)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    seed = int(torch.randint(1 << 62, (), generator=generator, device=generator.device))
    backend = None if device.type == "cpu" else getattr(torch, device.type)
    index = [] if backend is None else [backend.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=index, device_type=device.type if index else "cuda"):
        torch.random.default_generator.manual_seed(seed)
        if backend is not None:
            with backend.device(index[0]):
                backend.manual_seed(seed)
        yield
