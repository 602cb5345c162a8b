"""Bayesian drop-ins of torch.nn.LSTM, GRU and RNN: `LSTM`, `GRU`, `RNN`.

Each is its torch.nn layer (``isinstance(vinn.LSTM(...), nn.LSTM)``), built by the same constructor:
every ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` (and
``weight_hr_l{k}`` with ``proj_size``), the ``_reverse`` ones included, holds the posterior loc of a
random parameter, beside which the layer keeps its ``*_log_sigma2`` and its prior buffers.

Local reparameterization is not exact through a recurrence: the same weights act at every step, so
the pre-activations of a sequence's steps are correlated through them (and through the state they
feed back), and no independent draw per step, as LRT makes, samples one network. Two estimators do:

- ``"sample"`` (the default, any posterior): one reparameterized draw of every weight per forward
  pass, used at every step of every sequence of the batch, by torch's own fused kernel (cuDNN on
  a GPU), as fast as the torch layer. One draw is shared by the whole batch.
- ``"flipout"`` (symmetric posteriors; Wen et al. 2018): one draw of the perturbation
  ``Δw = w - loc`` per pass, which each sequence sees through its own random signs on the input
  and output features of every weight matrix, fixed over its steps: every sequence runs with its
  own weights (pseudo-independent across the batch), the same at all of its steps. The gates are
  then computed by an explicit loop over time (written once for the three cells), slower than the
  fused kernel.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .distributions import is_normal, normal_draw, sigma2
from .layers import BayesianLayer, random_signs, register_layer
from .sampling import sampling_enabled

State = tuple[Tensor, ...]  # (h,), or (h, c) for an LSTM; each (layers * directions, batch, features)
Hidden = Tensor | tuple[Tensor, Tensor]  # what torch's layers take and give: h, or (h, c) for an LSTM


# The constructor arguments of torch's recurrent layers, which torch declares in typing overloads only
# (its __init__ takes *args, **kwargs): the vinn layers' signatures and `_config` read them here.
def _rnn_arguments(input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh", bias: bool = True,
                   batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                   device: Any = None, dtype: Any = None) -> None: ...


def _gru_arguments(input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
                   dropout: float = 0.0, bidirectional: bool = False, device: Any = None, dtype: Any = None) -> None: ...


def _lstm_arguments(input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
                    dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                    device: Any = None, dtype: Any = None) -> None: ...


# torch's fused kernels, by torch's mode name, called as torch.nn.RNNBase.forward calls them
_KERNELS: dict[str, Callable[..., tuple[Tensor, ...]]] = {
    "LSTM": _VF.lstm,
    "GRU": _VF.gru,
    "RNN_TANH": _VF.rnn_tanh,
    "RNN_RELU": _VF.rnn_relu,
}

# What cuDNN says when the weights are not views of its flat buffer, as freshly drawn weights never are
# (it then packs them itself: the copy that drawing needs anyway).
_NOT_FLAT = "RNN module weights are not part of single contiguous chunk of memory"


class _RNNBase(BayesianLayer, nn.RNNBase):
    """The Bayesian recurrent layer; `LSTM`, `GRU` and `RNN` only name their torch layer and its arguments.

    The random parameters are torch's flat weights, ``_flat_weights_names``, which depend on the
    layer's configuration: ``parameter_names`` is the instance's. A ``state_dict`` holds torch's
    keys and, for each of them, ``<name>_log_sigma2`` and the prior's ``<name>_prior_*`` buffers.
    """

    estimators = ("sample", "flipout")  # no "lrt": not exact through a recurrence (module docstring)
    batched_draws = False  # a forward of its own
    output_dim = 0  # every weight matrix is (gate units, input features)

    def __init__(self, *args: Any, estimator: str | None = None, **kwargs: Any) -> None:
        if estimator == "lrt":
            raise ValueError(
                f"estimator='lrt' is not available for a {type(self).__name__}: local reparameterization draws every "
                "pre-activation independently, which samples no single network when the same weights act at every "
                "step of a sequence; use 'sample' (the default: one weight draw per forward pass, torch's fused "
                "kernel) or 'flipout' (a perturbation of its own for every sequence, fixed over its steps)"
            )
        super().__init__(*args, estimator=estimator, **kwargs)

    @property
    def parameter_names(self) -> tuple[str, ...]:  # type: ignore[override]
        """torch's flat weights: per layer and direction, weight_ih, weight_hh, [bias_ih, bias_hh], [weight_hr]."""
        return tuple(self._flat_weights_names)

    @classmethod
    def parameter_names_of(cls, module: nn.Module) -> tuple[str, ...]:
        if not isinstance(module, nn.RNNBase):
            raise TypeError(f"{cls.__name__}.parameter_names_of takes a recurrent layer, got {type(module).__name__}")
        return tuple(module._flat_weights_names)

    @property
    def fan_in(self) -> int:
        """``hidden_size``, the fan-in of torch's initialisation of every weight: uniform in ±1/√hidden_size."""
        return self.hidden_size

    @classmethod
    def _config(cls, module: nn.Module) -> dict[str, Any]:
        # torch keeps every argument as an attribute of its own name (``bias`` a bool, not a tensor)
        names = [name for name in cls._torch_signature.parameters if name not in ("device", "dtype")]
        reference = getattr(module, cls.parameter_names_of(module)[0])
        return {**{name: getattr(module, name) for name in names}, "device": reference.device, "dtype": reference.dtype}

    # -- forward ---------------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self, input: Tensor | PackedSequence, hx: Hidden | None = None
    ) -> tuple[Tensor | PackedSequence, Hidden]:
        """``output, h_n`` (``output, (h_n, c_n)`` for an LSTM) exactly as the torch layer's forward
        takes and returns them: ``input`` batched, unbatched or a `PackedSequence`, ``hx`` given or
        zero. One sample (by ``self.estimator``, see the module docstring); the posterior loc
        inside `vinn.deterministic()`, where the output equals the torch layer's."""
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batched, batch = True, int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            batched = input.dim() == 3
            if not batched:
                data = input.unsqueeze(self._batch_dim)
            batch = data.shape[self._batch_dim]
        state = self._initial_state(hx, batched, batch, data)
        if sorted_indices is not None:  # each state row follows its sequence (torch's permute_hidden)
            state = tuple(s.index_select(1, sorted_indices) for s in state)
        self.check_forward_args(data, self._hidden(state), batch_sizes)  # type: ignore[arg-type]  # LSTM's takes (h, c)
        output, state = self._run(data, batch_sizes, state)
        if isinstance(input, PackedSequence):
            if unsorted_indices is not None:
                state = tuple(s.index_select(1, unsorted_indices) for s in state)
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self._hidden(state)
        if not batched:
            output, state = output.squeeze(self._batch_dim), tuple(s.squeeze(1) for s in state)
        return output, self._hidden(state)

    @property
    def _batch_dim(self) -> int:
        return 0 if self.batch_first else 1

    def _hidden(self, state: State) -> Hidden:
        """The state as torch's layers take and give it."""
        return (state[0], state[1]) if self.mode == "LSTM" else state[0]

    def _initial_state(self, hx: Hidden | None, batched: bool, batch: int, data: Tensor) -> State:
        """``hx`` as a tuple of 3-D tensors (zeros without it), checked as torch checks it."""
        if hx is None:
            directions = 2 if self.bidirectional else 1
            sizes = [self.proj_size or self.hidden_size] + ([self.hidden_size] if self.mode == "LSTM" else [])
            return tuple(data.new_zeros(self.num_layers * directions, batch, size) for size in sizes)
        state = tuple(hx) if self.mode == "LSTM" else (hx,)
        dims = 3 if batched else 2
        if any(not isinstance(s, Tensor) or s.dim() != dims for s in state):
            got = ", ".join(f"{s.dim()}-D" if isinstance(s, Tensor) else type(s).__name__ for s in state)
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, the hidden state of a {type(self).__name__} should also be {dims}-D, got {got}")
        return state if batched else tuple(s.unsqueeze(1) for s in state)

    def _run(self, data: Tensor, batch_sizes: Tensor | None, state: State) -> tuple[Tensor, State]:
        if not sampling_enabled():
            return self._fused(data, batch_sizes, state, [getattr(self, name) for name in self.parameter_names])
        if self.estimator == "flipout":
            return self._flipout(data, batch_sizes, state, self._draw(centred=True))
        draws = list(self._draw().values())  # one network for the whole batch
        if not data.is_cuda:
            return self._fused(data, batch_sizes, state, draws)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_FLAT)
            return self._fused(data, batch_sizes, state, draws)

    def _draw(self, centred: bool = False) -> dict[str, Tensor]:
        """A reparameterized draw of every flat weight from its posterior (of ``w - loc`` if ``centred``), by name.

        Made as one draw of their concatenation: a few operations on all of them, where a draw per
        weight would be a few for each of the dozens that a deep bidirectional layer has.
        """
        names = self.parameter_names
        locs = [getattr(self, name) for name in names]
        log_sigma2 = torch.cat([getattr(self, f"{name}_log_sigma2").flatten() for name in names])
        loc = None if centred else torch.cat([loc.flatten() for loc in locs])
        if is_normal(self.posterior):
            draw = normal_draw(loc, log_sigma2)
        else:
            scale = sigma2(log_sigma2).sqrt()
            draw = self.posterior(loc=scale.new_zeros(()) if loc is None else loc, scale=scale, validate_args=False).rsample()
        pieces = draw.split([loc.numel() for loc in locs])
        return {name: piece.view_as(loc) for name, piece, loc in zip(names, pieces, locs)}

    def _fused(self, data: Tensor, batch_sizes: Tensor | None, state: State, weights: list[Tensor]) -> tuple[Tensor, State]:
        """torch's fused kernel for this layer's mode with ``weights`` as its flat weights."""
        kernel = _KERNELS[self.mode]
        hx = self._hidden(state)
        options = (self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if batch_sizes is None:
            output, *final = kernel(data, hx, weights, *options, self.batch_first)
        else:
            output, *final = kernel(data, batch_sizes, hx, weights, *options)
        return output, tuple(final)

    # -- flipout: the explicit loop over time ---------------------------------------------------------

    def _flipout(
        self, data: Tensor, batch_sizes: Tensor | None, state: State, deltas: dict[str, Tensor]
    ) -> tuple[Tensor, State]:
        """Every layer and direction in turn, each sequence with its own sign flips of ``deltas``, one
        draw of every weight's perturbation ``w - loc``.

        The input is handled in the packed layout, whatever it came as: ``rows`` (one per step of
        each sequence, time-major), ``sizes`` (how many sequences are still running at each step,
        non-increasing) and ``sequence`` (the sequence of every row), so padded and packed input
        share one loop.
        """
        padded = data.transpose(0, 1) if batch_sizes is None and self.batch_first else data  # (steps, batch, features)
        if batch_sizes is None:
            rows, sizes = padded.flatten(0, 1), [padded.shape[1]] * padded.shape[0]
        else:
            rows, sizes = data, [int(n) for n in batch_sizes]
        sequence = torch.cat([torch.arange(n, device=rows.device) for n in sizes])
        directions = 2 if self.bidirectional else 1
        finals: list[State] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                output, final = self._flipout_direction(
                    rows, sizes, sequence, tuple(s[index] for s in state), index, direction == 1, deltas
                )
                outputs.append(output)
                finals.append(final)
            rows = torch.cat(outputs, dim=1)
            if self.dropout and self.training and layer < self.num_layers - 1:  # as torch: between layers
                rows = F.dropout(rows, self.dropout, training=True)
        output = rows
        if batch_sizes is None:
            output = rows.unflatten(0, padded.shape[:2])
            output = output.transpose(0, 1) if self.batch_first else output
        return output, tuple(torch.stack([final[i] for final in finals]) for i in range(len(state)))

    def _flipout_direction(
        self, rows: Tensor, sizes: Sequence[int], sequence: Tensor, state: State, index: int, reverse: bool,
        deltas: dict[str, Tensor],
    ) -> tuple[Tensor, State]:
        """One layer in one direction: the input part of the gates for every step at once, then the loop."""
        names = {name.rsplit("_l", 1)[0]: name for name in self._all_weights[index]}  # weight_ih -> weight_ih_l0
        batch = sizes[0]
        input_map, hidden_map = (
            self._flipped(names[f"weight_{part}"], names.get(f"bias_{part}"), batch, deltas) for part in ("ih", "hh")
        )
        projection = self._flipped(names["weight_hr"], None, batch, deltas) if "weight_hr" in names else None
        cell = _CELLS[self.mode]
        from_input = input_map(rows, sequence).split(list(sizes))
        outputs: list[Tensor] = [rows.new_empty(0)] * len(sizes)
        for t in reversed(range(len(sizes))) if reverse else range(len(sizes)):
            running = sizes[t]  # the first `running` sequences (sorted by length) have a step t
            current = tuple(s[:running] for s in state)
            new = cell(from_input[t], hidden_map(current[0], slice(running)), current)
            if projection is not None:  # LSTM with proj_size: h = W_hr (o * tanh(c))
                new = (projection(new[0], slice(running)),) + new[1:]
            # the sequences that have ended (or, in reverse, not yet begun) keep their state
            state = new if running == batch else tuple(torch.cat([n, s[running:]]) for n, s in zip(new, state))
            outputs[t] = new[0]
        return torch.cat(outputs), state

    def _flipped(self, weight: str, bias: str | None, batch: int, deltas: dict[str, Tensor]) -> _FlippedLinear:
        """The linear map of the parameters ``weight`` and ``bias``, perturbed by ``deltas`` through the
        random signs of each of ``batch`` sequences."""
        loc = getattr(self, weight)
        signs = [random_signs((batch, n), loc) for n in (loc.shape[1], loc.shape[0])]
        return _FlippedLinear(
            loc,
            None if bias is None else getattr(self, bias),
            deltas[weight],
            None if bias is None else deltas[bias],
            *signs,
        )


class _FlippedLinear(NamedTuple):
    """``x Wᵀ + b`` with ``W = loc + Δw ∘ (s rᵀ)`` for each sequence: one perturbation ``Δw`` (``Δb``)
    shared by the batch, and random signs of every sequence on the input (``r``) and output (``s``)
    features, so each sequence has a weight of its own (Wen et al. 2018), the same at every step."""

    weight: Tensor
    bias: Tensor | None
    delta_weight: Tensor
    delta_bias: Tensor | None
    input_signs: Tensor  # (batch, in_features)
    output_signs: Tensor  # (batch, out_features)

    def __call__(self, x: Tensor, sequences: Tensor | slice) -> Tensor:
        """``x`` (rows, in_features), whose row i belongs to sequence ``sequences[i]`` (an index or a slice)."""
        flipped = F.linear(x * self.input_signs[sequences], self.delta_weight, self.delta_bias)
        return torch.addcmul(F.linear(x, self.weight, self.bias), flipped, self.output_signs[sequences])


# -- the cells: (input part of the gates, hidden part, state) -> new state, as torch computes them ----


def _tanh_cell(from_input: Tensor, from_hidden: Tensor, state: State) -> State:
    return (torch.tanh(from_input + from_hidden),)


def _relu_cell(from_input: Tensor, from_hidden: Tensor, state: State) -> State:
    return (torch.relu(from_input + from_hidden),)


def _lstm_cell(from_input: Tensor, from_hidden: Tensor, state: State) -> State:
    i, f, g, o = (from_input + from_hidden).chunk(4, dim=1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(from_input: Tensor, from_hidden: Tensor, state: State) -> State:
    input_r, input_z, input_n = from_input.chunk(3, dim=1)
    hidden_r, hidden_z, hidden_n = from_hidden.chunk(3, dim=1)
    r = torch.sigmoid(input_r + hidden_r)
    z = torch.sigmoid(input_z + hidden_z)
    n = torch.tanh(input_n + r * hidden_n)  # the reset gate scales the hidden part, bias included
    return ((1 - z) * n + z * state[0],)


_CELLS: dict[str, Callable[[Tensor, Tensor, State], State]] = {
    "RNN_TANH": _tanh_cell,
    "RNN_RELU": _relu_cell,
    "LSTM": _lstm_cell,
    "GRU": _gru_cell,
}


# -- the layers -----------------------------------------------------------------------------------


# (the ignore on each: one forward serves the three, where torch types each one's by overloads of its own)
@register_layer
class RNN(_RNNBase, nn.RNN):  # type: ignore[misc]
    """Bayesian `torch.nn.RNN` (tanh or ReLU); arguments as torch.nn.RNN plus ``posterior``, ``prior``,
    ``init_scale``, ``estimator`` (``"sample"`` or ``"flipout"``)."""

    _torch_signature = inspect.signature(_rnn_arguments)


@register_layer
class GRU(_RNNBase, nn.GRU):  # type: ignore[misc]
    """Bayesian `torch.nn.GRU`; arguments as torch.nn.GRU plus ``posterior``, ``prior``, ``init_scale``,
    ``estimator`` (``"sample"`` or ``"flipout"``)."""

    _torch_signature = inspect.signature(_gru_arguments)


@register_layer
class LSTM(_RNNBase, nn.LSTM):  # type: ignore[misc]
    """Bayesian `torch.nn.LSTM` (``proj_size`` included); arguments as torch.nn.LSTM plus ``posterior``,
    ``prior``, ``init_scale``, ``estimator`` (``"sample"`` or ``"flipout"``)."""

    _torch_signature = inspect.signature(_lstm_arguments)
