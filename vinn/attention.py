"""Bayesian `torch.nn.MultiheadAttention`: its query, key, value and output projections drawn from the posterior.

`MultiheadAttention` *is* torch's layer, built by torch's constructor, with torch's parameters and
state_dict keys. Its random parameters are the input projection, ``in_proj_weight`` (or
``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight`` where kdim or vdim differs from
embed_dim) and ``in_proj_bias``, and the output projection ``out_proj``.

``out_proj`` is a vinn layer of its own, `OutProjection` (a `vinn.Linear` that is, as torch's, a
``NonDynamicallyQuantizableLinear``), rather than two more random parameters of the attention
layer: torch makes it a Linear submodule, so as a vinn.Linear it samples exactly as every other
Linear does (no second copy of that code), its keys are torch's ``out_proj.weight`` and
``out_proj.bias`` with vinn.Linear's own beside them, and `vinn.bayesify` reports it under its
own name. It shares the attention layer's posterior family, prior, initial scale and estimator;
the attention layer's ``kl`` and ``reset_scale`` cover it, and `vinn.kl` counts every layer's own
parameters once.

``bias_k`` and ``bias_v`` (``add_bias_kv=True``) stay deterministic: two vectors of embed_dim
elements appended to the sampled keys and values, as torch appends them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .layers import BayesianLayer, InitScale, Linear, PriorArgument, _factory, normal_sample, register_layer
from .sampling import sampling_enabled

_OUT_PROJ = "out_proj."
_NO_BIAS = (None, None)


class OutProjection(Linear, NonDynamicallyQuantizableLinear):
    """The output projection of a `MultiheadAttention`: a `vinn.Linear` that is, as torch's, a NonDynamicallyQuantizableLinear."""


@register_layer
class MultiheadAttention(BayesianLayer, nn.MultiheadAttention):
    """Bayesian `torch.nn.MultiheadAttention`: the four projections drawn from the posterior, then attention.

    Arguments as torch.nn.MultiheadAttention (``embed_dim``, ``num_heads``, ``dropout``, ``bias``,
    ``add_bias_kv``, ``add_zero_attn``, ``kdim``, ``vdim``, ``batch_first``, ``device``,
    ``dtype``), plus ``posterior``, ``prior``, ``init_scale`` and ``estimator``, which serve
    ``out_proj`` too. A mapping ``prior`` is keyed by state_dict name: ``"in_proj_weight"``,
    ``"in_proj_bias"``, ``"out_proj.weight"``, ... (a missing one is Normal(0, 1)).

    Inside `vinn.deterministic()` the forward pass is torch's own, fast path included: exactly
    nn.MultiheadAttention at the posterior loc. Otherwise each projection samples by the estimator:

    - ``"lrt"`` (default for Normal): each projection is linear in its input and in its weights,
      so q, k, v and the output pre-activations are drawn from their exact Normal marginals, fresh
      noise for every feature of every token of every example. (Tokens of one sequence are then
      independent given their inputs, where one weight draw would correlate them: the marginal of
      each element is exact, their joint across tokens is not, as for a vinn.Linear applied to a
      sequence.)
    - ``"flipout"``: one weight perturbation per projection, decorrelated by random signs per token
      and feature.
    - ``"sample"``: one draw of the weights per call, shared by every token and example.

    Attention is then computed from the sampled q, k and v with torch's semantics for every
    argument (masks bool or float, ``is_causal``, ``need_weights``, ``average_attn_weights``,
    unbatched input, ``bias_k``/``bias_v``, ``add_zero_attn``, dropout in training mode):
    `F.scaled_dot_product_attention` without weights, an explicit softmax with them. (torch's
    ``F.multi_head_attention_forward`` projects q, k and v itself; reusing it on the sampled ones
    would take identity projections, four more products of embed_dim² per token: measured slower,
    forward and backward.)
    """

    parameter_names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")
    batched_draws = False  # a forward of its own
    out_proj: OutProjection

    def __init__(self, *args: Any, prior: PriorArgument = None, **kwargs: Any) -> None:
        own_prior, out_proj_prior = _split_out_proj_prior(prior)
        super().__init__(*args, prior=own_prior, **kwargs)
        # torch's out_proj, as torch initialised it, becomes a vinn layer that samples alike
        self.out_proj = OutProjection.from_torch(  # type: ignore[assignment]  # typed as returning a BayesianLayer
            self.out_proj, posterior=self.posterior, prior=out_proj_prior, init_scale=self.init_scale, estimator=self.estimator
        )

    @property
    def fan_in(self) -> int:
        """embed_dim, the inputs of each query unit (`FanInPrior` uses it for the key and value projections too)."""
        return self.embed_dim

    @classmethod
    def _config(cls, module: nn.Module) -> dict[str, Any]:
        # torch keeps add_bias_kv and bias as the presence of bias_k and in_proj_bias
        return {
            "embed_dim": module.embed_dim,
            "num_heads": module.num_heads,
            "dropout": module.dropout,
            "bias": module.in_proj_bias is not None,
            "add_bias_kv": module.bias_k is not None,
            "add_zero_attn": module.add_zero_attn,
            "kdim": module.kdim,
            "vdim": module.vdim,
            "batch_first": module.batch_first,
            **_factory(module),
        }

    def _register_priors(self) -> None:
        super()._register_priors()
        if isinstance(self.out_proj, BayesianLayer):  # torch's own out_proj while torch's __init__ runs
            self.out_proj._register_priors()

    def reset_scale(self, init_scale: InitScale | None = None, column_covariance: Tensor | None = None) -> None:
        """Set the posterior scale of every element, out_proj's included (see `BayesianLayer.reset_scale`)."""
        super().reset_scale(init_scale, column_covariance)
        if isinstance(self.out_proj, BayesianLayer):  # torch's own out_proj while torch's __init__ runs
            self.out_proj.reset_scale(init_scale)

    # -- forward -----------------------------------------------------------------------------------

    def forward(  # type: ignore[override]  # torch.nn.MultiheadAttention's signature, not BayesianLayer's
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``(attn_output, attn_output_weights)`` as torch.nn.MultiheadAttention returns them, for one sample
        of the projections (their posterior loc inside `vinn.deterministic()`)."""
        if not sampling_enabled():
            return nn.MultiheadAttention.forward(
                self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError(
                "vinn.MultiheadAttention samples from padded tensors, not nested ones: build nn.TransformerEncoder "
                "with enable_nested_tensor=False (vinn.bayesify does so for the encoders it converts)"
            )
        # torch's own checks and mask conversion: bool masks to float, -inf where True
        batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)  # type: ignore[attr-defined]
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype, check_other=False
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True is a hint that attn_mask is the causal mask: pass that attn_mask too")
        # as torch, the hint stands for the mask where nothing else is to be merged with it or read from it
        causal = is_causal and key_padding_mask is None and not need_weights
        self_attention = query is key and key is value
        q, k, v = self._in_projection([self._as_batch_first(x, batched) for x in (query, key, value)], self_attention)
        keys = k.shape[1]
        if self.bias_k is not None and self.bias_v is not None:  # one more key and value, every query may attend them
            k = torch.cat([k, self.bias_k.expand(k.shape[0], 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(v.shape[0], 1, -1)], dim=1)
        q, k, v = (x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for x in (q, k, v))  # (N, H, L, D)
        if self.add_zero_attn:  # and one more, of zeros
            k, v = (torch.cat([x, x.new_zeros(x.shape[:2] + (1, self.head_dim))], dim=2) for x in (k, v))
        mask = None if causal else _merged_mask(attn_mask, key_padding_mask, self.num_heads, k.shape[2] - keys)
        attention, weights = self._attend(q, k, v, mask, causal, need_weights)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        output = self.out_proj(attention.transpose(1, 2).flatten(2))  # (N, L, E), sampled too
        if not batched:
            return output.squeeze(0), None if weights is None else weights.squeeze(0)
        return (output if self.batch_first else output.transpose(0, 1)), weights

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of the heads (N, H, L, D) and, with ``need_weights``, their weights (N, H, L, S)."""
        if not need_weights:
            dropout = self.dropout if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal), None
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        weights = F.dropout(torch.softmax(scores if mask is None else scores + mask, dim=-1), self.dropout, self.training)
        return weights @ v, weights

    def _as_batch_first(self, x: Tensor, batched: bool) -> Tensor:
        """``x`` as (N, L, features), whatever the layout (a view)."""
        if not batched:
            return x.unsqueeze(0)
        return x if self.batch_first else x.transpose(0, 1)

    def _in_projection(self, inputs: Sequence[Tensor], self_attention: bool) -> tuple[Tensor, ...]:
        """One sample of q, k and v from the batch-first query, key and value, each (N, L or S, embed_dim)."""
        query, key, value = inputs
        terms = {name: self._terms(name) for name in self.random_parameters()}
        bias = terms.get("in_proj_bias")
        if "in_proj_weight" in terms and self_attention:  # q, k and v in one product
            return self._linear(query, terms["in_proj_weight"], bias).chunk(3, dim=-1)
        rows = [slice(i * self.embed_dim, (i + 1) * self.embed_dim) for i in range(3)]
        if "in_proj_weight" in terms:
            weights = [tuple(t[r] for t in terms["in_proj_weight"]) for r in rows]
        else:
            weights = [terms["q_proj_weight"], terms["k_proj_weight"], terms["v_proj_weight"]]
        biases = [None if bias is None else tuple(t[r] for t in bias) for r in rows]
        return tuple(self._linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _terms(self, name: str) -> tuple[Tensor, ...]:
        """What `_linear` needs of the random parameter ``name`` for one forward pass, by estimator: a draw
        (``"sample"``); the loc and the variance (``"lrt"``); the loc and a draw of ``w - loc`` (``"flipout"``).
        Elementwise, so the rows of a packed parameter are those of the packed projection."""
        # (the casts: ``name`` has a loc, so its posterior, variance and perturbation are not None)
        if self.estimator == "sample":
            return (cast(Tensor, self._draw_parameter(name)),)
        second = self._sigma2(name) if self.estimator == "lrt" else self._perturbation(name)
        return getattr(self, name), cast(Tensor, second)

    def _linear(self, input: Tensor, weight: tuple[Tensor, ...], bias: tuple[Tensor | None, ...] | None) -> Tensor:
        """One sample of ``F.linear(input, w, b)`` from `_terms` of w and b, as `BayesianLayer.forward` samples."""
        bias = bias or _NO_BIAS
        mean = F.linear(input, weight[0], bias[0])
        if self.estimator == "sample":  # from drawn weights: the sample itself
            return mean
        if self.estimator == "lrt":
            return normal_sample(mean, F.linear(input.square(), weight[1], bias[1]))
        return torch.addcmul(mean, F.linear(input * self._random_signs(input), weight[1], bias[1]), self._random_signs(mean))


def _merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, heads: int, appended: int) -> Tensor | None:
    """``attn_mask`` ((L, S) or (N * heads, L, S)) plus ``key_padding_mask`` ((N, S)), float masks, as one
    mask broadcastable to (N, heads, L, S + appended), the ``appended`` keys attendable by every query."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.view(-1, heads, *attn_mask.shape[1:]) if attn_mask.dim() == 3 else attn_mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(-1, 1, 1, key_padding_mask.shape[-1]))
    if not masks:
        return None
    return F.pad(sum(masks[1:], masks[0]), (0, appended))


def _split_out_proj_prior(prior: PriorArgument) -> tuple[PriorArgument, PriorArgument]:
    """The prior of the attention layer's own parameters and that of out_proj: a mapping keyed by
    state_dict name is split by prefix; an elementwise distribution is the first parameter's alone
    (out_proj keeps Normal(0, 1)); anything else serves both."""
    if isinstance(prior, Mapping):
        own = {name: p for name, p in prior.items() if not name.startswith(_OUT_PROJ)}
        return own, {name.removeprefix(_OUT_PROJ): p for name, p in prior.items() if name.startswith(_OUT_PROJ)}
    if isinstance(prior, Distribution) and prior.batch_shape != ():
        return prior, None
    return prior, prior
