"""Switching sampling off, `vinn.deterministic()`, and seeding it without touching the global RNG."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils._contextlib import _NoParamDecoratorContextManager

from .validation import integer, is_integer, wrong_type

F = TypeVar("F", bound=Callable[..., Any])

# How many `deterministic` contexts are open: a context variable, so it is local to the thread and
# to the asyncio task (each task runs in a copy of its creator's context), and torch.compile reads
# it with a guard, recompiling for the other value.
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("vinn_deterministic_depth", default=0)


def sampling_enabled() -> bool:
    """False inside `deterministic()` (in this thread or asyncio task), True otherwise."""
    return _depth.get() == 0


class deterministic(_NoParamDecoratorContextManager):
    """Make every vinn layer compute with its posterior loc instead of sampling.

    Used as `torch.no_grad` is: a context manager, a decorator with or without parentheses
    (``@vinn.deterministic`` or ``@vinn.deterministic()``), and an object that can be entered
    again and nested::

        with vinn.deterministic():
            y = bnn(x)          # the network at the posterior mean

    Local to the thread and to the asyncio task. A decorated generator function is
    deterministic while it runs, not between its yields; a decorated ``async def`` is
    deterministic while its coroutine runs.
    """

    def __enter__(self) -> None:
        _depth.set(_depth.get() + 1)

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        _depth.set(_depth.get() - 1)

    def __call__(self, function: F) -> F:
        if not callable(function):
            raise wrong_type("vinn.deterministic's argument", "a function to decorate (or nothing)", function)
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run(*args: Any, **kwargs: Any) -> Any:
                with self.clone():
                    return await function(*args, **kwargs)

            return run  # type: ignore[return-value]
        return super().__call__(function)


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
    if not isinstance(generator, torch.Generator):
        if not is_integer(generator):
            raise wrong_type("generator", "a torch.Generator, an int seed or None", generator)
        generator = torch.Generator().manual_seed(integer(generator, "generator", minimum=0, what="a seed"))
    seed = int(torch.randint(1 << 62, (), generator=generator, device=generator.device))
    backend = None if device.type == "cpu" else getattr(torch, device.type)
    index = [] if backend is None else [backend.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=index, device_type=device.type if index else "cuda"):
        torch.random.default_generator.manual_seed(seed)
        if backend is not None:
            with backend.device(index[0]):
                backend.manual_seed(seed)
        yield
