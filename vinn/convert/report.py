"""What `vinn.bayesify` did: `ConversionReport`, one `LayerReport` per Linear/Conv/... layer and per
parameter a config rule names, printed as a table."""

from __future__ import annotations

from dataclasses import dataclass

_COLUMNS = ("layer", "type", "parameters", "Bayesian")


@dataclass(frozen=True)
class LayerReport:
    """One layer of the input model (of a type vinn converts), or one parameter that a `BayesConfig`
    name rule names, and what bayesify did with it.

    - ``name``: qualified name in the input model: a module's name (``"layer1.0.conv1"``), for
      an ``F.linear`` / ``F.conv*d`` call in ``forward`` the name of its weight (``"head.w"``), for
      a parameter its name (``"encoder.pos_embedding"``). A converted layer has the same name in
      the result; a converted parameter is parametrized there (`vinn.BayesianParameter`).
    - ``kind``: the module's class name (``"Conv2d"``), the function (``"F.linear"``), or
      ``"Parameter"``.
    - ``parameters``: number of weight and bias elements (each gets a loc and a scale if
      converted); a converted layer that shares a tied weight with a layer listed before it does
      not count that weight again.
    - ``converted``: whether the layer became Bayesian.
    - ``reason``: why it was kept deterministic; None when converted.
    - ``shared_with``: for a converted layer whose weight is tied to an earlier converted layer's,
      the qualified name of that weight there (``"transformer.wte.weight"``): the two share one
      posterior, that layer's. None otherwise.
    - ``drawn_whole``: True for a converted layer that vinn could not replace by a vinn layer:
      ``forward`` reads its parameters itself (torchvision's Swin passes its attention's
      ``qkv.weight`` to a function), or it is a subclass of a supported type with a ``forward``
      of its own (timm's ``ScaledStdConv2d`` standardizes its weight). Its weight and bias became
      `vinn.BayesianParameter` parametrizations, drawn whole by weight sampling wherever they are
      read; the module stays what it was, its keys are ``parametrize``'s. False otherwise.
    """

    name: str
    kind: str
    parameters: int
    converted: bool
    reason: str | None = None
    shared_with: str | None = None
    drawn_whole: bool = False


@dataclass(frozen=True)
class ConversionReport:
    """The conversion of one model: every layer of a type vinn converts and every parameter a
    config rule names, converted or kept with a reason.

    ``traced`` is False when torch.fx could not trace the model and bayesify walked the module
    tree instead; ``trace_error`` then says why tracing failed: the exception's type and the
    first line of its message (``"TraceError: symbolically traced variables cannot be used as
    inputs to control flow"``), which `str(report)` prints below its first line. ``total_parameters``
    counts the parameters of the input model. `str(report)` is a readable table.
    """

    layers: tuple[LayerReport, ...]
    traced: bool
    total_parameters: int
    trace_error: str | None = None

    @property
    def converted(self) -> tuple[LayerReport, ...]:
        """The layers that became Bayesian."""
        return tuple(layer for layer in self.layers if layer.converted)

    @property
    def kept(self) -> tuple[LayerReport, ...]:
        """The layers kept deterministic, each with its ``reason``."""
        return tuple(layer for layer in self.layers if not layer.converted)

    @property
    def bayesian_parameters(self) -> int:
        """Number of weight and bias elements that now have a posterior.

        Each has a learnable loc and a learnable scale, so the model has this many more learnable
        parameters than the input model (plus the prior's buffers).
        """
        return sum(layer.parameters for layer in self.converted)

    def __str__(self) -> str:
        how = "traced by torch.fx" if self.traced else "module tree walked"
        rows = [_COLUMNS] + [
            (
                layer.name or "(root)",
                layer.kind,
                f"{layer.parameters:,}",
                _bayesian_cell(layer),
            )
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
        layers = [layer for layer in self.layers if layer.kind != "Parameter"]
        counts = f"{sum(layer.converted for layer in layers)} of {len(layers)} layers"
        if len(layers) < len(self.layers):
            parameters = [layer for layer in self.layers if layer.kind == "Parameter"]
            counts += f" and {sum(p.converted for p in parameters)} of {len(parameters)} named parameters"
        lines = [f"bayesify: {counts} Bayesian ({how})"]
        if not self.traced:
            lines.append(f"torch.fx could not trace the model: {self.trace_error}")
        for row in rows:
            # parameters right-aligned (numbers), everything else left-aligned
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3]]
            lines.append("  ".join(cells).rstrip())
        lines.append(
            f"Bayesian parameters: {self.bayesian_parameters:,} of {self.total_parameters:,} "
            "(each now has a learnable posterior loc and scale)"
        )
        return "\n".join(lines)


def _bayesian_cell(layer: LayerReport) -> str:
    if not layer.converted:
        return f"no: {layer.reason}"
    if layer.drawn_whole:
        return "yes, its parameters drawn whole"
    return "yes" if layer.shared_with is None else f"yes, sharing the posterior of {layer.shared_with}"
