"""What every public entry point of vinn does with a bad argument: one policy, in one place.

- TypeError for the wrong kind of object, ValueError for a right kind with a wrong value
  (arguments that contradict each other included).
- The message names the argument, says what was given and what is accepted, and where a common
  slip explains the mistake, how to fix it.
- Integers are `numbers.Integral` (numpy integers included) but not bool; reals are
  `numbers.Real` (numpy floats included) but not bool, and never NaN.
- Entry points check every argument before changing anything, so a failure leaves the objects
  the user passed as they were.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

_REPR_LIMIT = 80


def describe(value: object) -> str:
    """What was given, for a message: ``0``, ``'abc'``, ``list [1, 2]``, ``Tensor of shape (2, 3) and dtype torch.float32``."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype") and not isinstance(value, numbers.Number):
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {value.dtype}"
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    text = " ".join(repr(value).split())  # one line
    if len(text) > _REPR_LIMIT:
        text = text[: _REPR_LIMIT - 3] + "..."
    if value is None or isinstance(value, (numbers.Number, str, bytes)):
        return text  # the repr says the type
    return f"{type(value).__name__} {text}"


def _message(name: str, accepted: str, value: object, hint: str) -> str:
    return f"{name} must be {accepted}, got {describe(value)}{'; ' + hint if hint else ''}"


def wrong_type(name: str, accepted: str, value: object, hint: str = "") -> TypeError:
    """The TypeError for ``name``: ``"<name> must be <accepted>, got <what>[; <hint>]"``."""
    return TypeError(_message(name, accepted, value, hint))


def wrong_value(name: str, accepted: str, value: object, hint: str = "") -> ValueError:
    """The ValueError for ``name``, worded as `wrong_type`'s."""
    return ValueError(_message(name, accepted, value, hint))


def is_integer(value: object) -> bool:
    """An integer in the sense of this policy: `numbers.Integral` (numpy ints too), not bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number in the sense of this policy: `numbers.Real` (numpy floats too), not bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(value: object, name: str, *, minimum: int = 1, what: str = "") -> int:
    """``value`` as an int, checked to be an integer >= ``minimum``; ``what`` says what it counts."""
    accepted = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
    accepted += f" ({what})" if what else ""
    if not is_integer(value):
        raise wrong_type(name, accepted, value)
    if value < minimum:  # type: ignore[operator]
        raise wrong_value(name, accepted, value)
    return int(value)  # type: ignore[call-overload]


def optional_integer(value: object, name: str, *, minimum: int = 1, what: str = "") -> int | None:
    """`integer`, or None for None."""
    if value is None:
        return None
    try:
        return integer(value, name, minimum=minimum, what=what)
    except (TypeError, ValueError) as error:
        # the accepted values include None: say so
        raise type(error)(str(error).replace(" must be ", " must be None or ", 1)) from None


def real(
    value: object,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    accepted: str = "",
) -> float:
    """``value`` as a float, checked to be a real number (not NaN) in the interval from ``low`` to ``high``.

    The interval is closed at a finite end unless ``low_open`` / ``high_open``; an infinite end is
    never reached (inf is refused). ``accepted`` replaces the generated description.
    """
    if not accepted:
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high_open or high == math.inf else "]"
        accepted = f"a finite real number in {left}{low}, {high}{right}" if (low, high) != (-math.inf, math.inf) else "a finite real number"
    if not is_real(value):
        raise wrong_type(name, accepted, value)
    number = float(value)  # type: ignore[arg-type]
    inside = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not (inside and math.isfinite(number)):
        raise wrong_value(name, accepted, value)
    return number


def module(value: object, name: str = "model") -> nn.Module:
    """``value``, checked to be a `torch.nn.Module` (a class instead of an instance is named as such)."""
    if isinstance(value, nn.Module):
        return value
    hint = ""
    if isinstance(value, type) and issubclass(value, nn.Module):
        hint = f"pass an instance, {value.__name__}(...), not the class"
    raise wrong_type(name, "a torch.nn.Module", value, hint)


def one_of(value: object, name: str, options: Iterable[Any]) -> Any:
    """``value``, checked to be one of ``options`` (strings: TypeError for a non-string)."""
    options = tuple(options)
    accepted = "one of " + ", ".join(map(repr, options))
    if all(isinstance(option, str) for option in options) and not isinstance(value, str):
        raise wrong_type(name, accepted, value)
    if value not in options:
        raise wrong_value(name, accepted, value)
    return value


def finite(tensor: Tensor, name: str) -> None:
    """Raise ValueError if a floating ``tensor`` holds NaN or an infinity."""
    if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
        bad = "NaN" if bool(tensor.isnan().any()) else "an infinite value"
        raise ValueError(f"{name} must hold finite values, got a tensor of shape {tuple(tensor.shape)} with {bad}")
