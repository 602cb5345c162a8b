"""What `vinn.bayesify` did: `ConversionReport`, one `LayerReport` per Linear/Conv layer, printed as a table."""

from __future__ import annotations

from dataclasses import dataclass

_COLUMNS = ("layer", "type", "parameters", "Bayesian")


@dataclass(frozen=True)
class LayerReport:
    """One Linear/Conv/ConvTranspose layer of the input model, and what bayesify did with it.

    - ``name``: qualified name in the input model: a module's name (``"layer1.0.conv1"``), or for
      an ``F.linear`` / ``F.conv*d`` call in ``forward``, the name of its weight (``"head.w"``).
      A converted layer has the same name in the result.
    - ``kind``: the module's class name (``"Conv2d"``), or the function (``"F.linear"``).
    - ``parameters``: number of weight and bias elements (each gets a loc and a scale if converted).
    - ``converted``: whether the layer became Bayesian.
    - ``reason``: why it was kept deterministic; None when converted.
    """

    name: str
    kind: str
    parameters: int
    converted: bool
    reason: str | None = None


@dataclass(frozen=True)
class ConversionReport:
    """The conversion of one model: every Linear/Conv layer, converted or kept with a reason.

    ``traced`` is False when torch.fx could not trace the model and bayesify walked the module
    tree instead; ``trace_error`` then says why tracing failed. ``total_parameters`` counts the
    parameters of the input model. `str(report)` is a readable table.
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
        how = "traced by torch.fx" if self.traced else f"module tree walked; torch.fx could not trace: {self.trace_error}"
        rows = [_COLUMNS] + [
            (
                layer.name or "(root)",
                layer.kind,
                f"{layer.parameters:,}",
                "yes" if layer.converted else f"no: {layer.reason}",
            )
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
        lines = [f"bayesify: {len(self.converted)} of {len(self.layers)} layers Bayesian ({how})"]
        for row in rows:
            # parameters right-aligned (numbers), everything else left-aligned
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3]]
            lines.append("  ".join(cells).rstrip())
        lines.append(
            f"Bayesian parameters: {self.bayesian_parameters:,} of {self.total_parameters:,} "
            "(each now has a learnable posterior loc and scale)"
        )
        return "\n".join(lines)
