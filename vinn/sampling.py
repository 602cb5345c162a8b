"""Switching sampling off, `vinn.deterministic()`, seeding it without touching the global RNG, and the
context in which `vinn.sample` has layers draw weights for a folded batch, `weight_draws`."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

import torch
from torch.utils._contextlib import _NoParamDecoratorContextManager

from .validation import integer, is_integer, wrong_type

F = TypeVar("F", bound=Callable[..., Any])

# How many `deterministic` contexts are open: a context variable, so it is local to the thread and
# to the asyncio task (each task runs in a copy of its creator's context), and torch.compile reads
# it with a guard, recompiling for the other value.
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("vinn_deterministic_depth", default=0)


# While `vinn.sample` runs a batch folded from T samples: T, and the vinn layers that compute it with
# one weight draw per sample (see `weight_draws`).
_weight_draws: contextvars.ContextVar[tuple[int, frozenset[object]]] = contextvars.ContextVar(
    "vinn_weight_draws", default=(0, frozenset())
)


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
def weight_draws(samples: int, layers: Collection[object]) -> Iterator[None]:
    """Inside, each of ``layers`` takes its input as ``samples`` blocks of rows, the samples of a batch
    folded sample-major as `vinn.sample` folds it ((samples * N, ...), or (samples * N * k, ...) with
    the batch outermost), and computes every block with a weight draw of its own. Local to the
    thread and to the asyncio task, as `deterministic`."""
    token = _weight_draws.set((samples, frozenset(layers)))
    try:
        yield
    finally:
        _weight_draws.reset(token)


def weight_draws_of(layer: object) -> int:
    """How many blocks ``layer`` computes with a weight draw each (see `weight_draws`); 0 outside of them."""
    samples, layers = _weight_draws.get()
    return samples if layer in layers else 0


def _accelerator(device: torch.device) -> tuple[Any, list[int]]:
    """torch's module for ``device`` (``torch.cuda``, ...) and the device's index; (None, []) for the CPU."""
    if device.type == "cpu":
        return None, []
    backend = getattr(torch, device.type)
    return backend, [backend.current_device() if device.index is None else device.index]


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """The CPU's global RNG, and ``device``'s if it is an accelerator, restored on exit to their state on
    entry: what is drawn inside leaves no trace on what is drawn after. Not thread-safe, as
    `torch.random.fork_rng` that it uses."""
    _, index = _accelerator(device)
    with torch.random.fork_rng(devices=index, device_type=device.type if index else "cuda"):
        yield


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
    backend, index = _accelerator(device)
    with preserved_rng(device):
        torch.random.default_generator.manual_seed(seed)
        if backend is not None:
            with backend.device(index[0]):
                backend.manual_seed(seed)
        yield
