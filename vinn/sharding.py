"""The KL of parameters that FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps sharded as DTensors.

Inside ``forward`` FSDP2 gathers each sharded module's parameters into plain tensors, so sampling
needs nothing. The KL is computed outside ``forward`` (`vinn.ELBO` calls `vinn.kl` after the model
ran), when the parameters of a module sharded with the default ``reshard_after_forward=True`` are
sharded DTensors again, while the prior buffers (never sharded) are plain tensors. Each rank then
computes the KL of its own shard: the prior's tensors join the computation as replicated DTensors,
and the layers' partial sums are added on each rank and all-reduced once, so that every rank gets
the KL of the whole model. Its gradient reaches each shard directly, once: added to FSDP2's
average of the ranks' likelihood gradients, it gives what `DistributedDataParallel` gives.

torch.distributed.tensor is imported only once a tensor is not a plain tensor (importing it costs
more than importing vinn, and a model that no one sharded holds no DTensor).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import Tensor, nn


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor
        return None
    return DTensor


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP2, or any other)."""
    if type(tensor) in (Tensor, nn.Parameter) or not isinstance(tensor, Tensor):
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def replicated_like(reference: Tensor, tensor: Tensor) -> Tensor:
    """``tensor`` (a prior buffer) as a DTensor replicated over ``reference``'s mesh when ``reference``
    is a DTensor and ``tensor`` is not, so that the two combine; ``tensor`` itself otherwise."""
    if not is_dtensor(reference) or is_dtensor(tensor):
        return tensor
    from torch.distributed.tensor import DTensor, Replicate

    mesh = reference.device_mesh  # type: ignore[attr-defined]
    return DTensor.from_local(tensor, mesh, [Replicate()] * mesh.ndim, run_check=False)


def full_tensor(tensor: Tensor) -> Tensor:
    """A plain tensor: a DTensor gathered (differentiably: all-reduced where it is a partial sum), anything else as is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def gathered(terms: Iterable[Tensor]) -> list[Tensor]:
    """``terms`` as plain tensors: the DTensors among them summed per device mesh, each sum gathered
    once (one all-reduce per mesh, however many layers), the plain tensors as they are."""
    plain: list[Tensor] = []
    by_mesh: dict[object, Tensor] = {}
    for term in terms:
        if is_dtensor(term):
            mesh = term.device_mesh  # type: ignore[attr-defined]
            by_mesh[mesh] = term if mesh not in by_mesh else by_mesh[mesh] + term
        else:
            plain.append(term)
    return plain + [total.full_tensor() for total in by_mesh.values()]  # type: ignore[attr-defined]
