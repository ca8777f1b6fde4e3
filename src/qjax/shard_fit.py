"""Whether quantized data splits evenly over the shards of a mesh.

Two things cannot be cut between shards: a byte that packs several sub-byte values, and a
block that shares one scale. :func:`qjax.quantize` (on an explicitly sharded array) and
:func:`qjax.orbax.abstract_quantized` (on an abstract one) both refuse shardings that would
cut them, with the same words.
"""

from __future__ import annotations

import math
from typing import Any

MeshAxes = tuple[str, ...]


def sharded_axes(mesh: Any, pspec: Any) -> list[tuple[int, MeshAxes, int]]:
    """``(axis, mesh axis names, shard count)`` of each axis ``pspec`` shards over ``mesh``.

    Examples:
      >>> import jax
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
      >>> sharded_axes(mesh, P(None, ("data", "model")))
      [(1, ('data', 'model'), 8)]
    """
    out = []
    for axis, names in enumerate(pspec or ()):
        if names is not None:
            names = names if isinstance(names, tuple) else (names,)
            out.append((axis, names, math.prod(mesh.shape[name] for name in names)))
    return out


def split_byte_problem(
    axis: int, size: int, names: MeshAxes, shards: int, packs: int
) -> str | None:
    """Why sharding a packed last axis ``shards`` ways would cut a byte, or None.

    Examples:
      >>> print(split_byte_problem(1, 24, ("m",), 8, 2))
      axis 1 (size 24) is sharded 8 ways over mesh axes ('m',), and packing 2 values per \
byte would split a byte across shards (24 / 8 = 3 values per shard); shard it a number of \
ways that divides 12 (whole bytes per shard), shard another axis, or quantize with \
packed=False
    """
    if size % (shards * packs) == 0:
        return None
    return (
        f"axis {axis} (size {size}) is sharded {shards} ways over mesh axes {names}, and "
        f"packing {packs} values per byte would split a byte across shards ({size} / "
        f"{shards} = {size / shards:g} values per shard); shard it a number of ways that "
        f"divides {size // packs} (whole bytes per shard), shard another axis, or quantize "
        "with packed=False"
    )


def split_block_problem(
    axis: int, size: int, blocks: int, names: MeshAxes, shards: int, granularity: Any
) -> str | None:
    """Why ``blocks`` scale blocks along an axis would not split evenly over ``shards``.

    One block (a per-tensor or per-channel axis) is replicated, so never a problem.

    Examples:
      >>> split_block_problem(0, 256, 8, ("m",), 8, "per_block(32)") is None
      True
      >>> print(split_block_problem(0, 256, 4, ("m",), 8, "per_block(64)"))
      axis 0 (size 256) is sharded 8 ways over mesh axes ('m',), but per_block(64) gives 4 \
blocks of 64, which do not split evenly over the shards of 32; choose a block size that \
divides 32 or shard another axis
    """
    if blocks <= 1 or blocks % shards == 0:
        return None
    return (
        f"axis {axis} (size {size}) is sharded {shards} ways over mesh axes {names}, but "
        f"{granularity} gives {blocks} blocks of {size // blocks}, which do not split evenly "
        f"over the shards of {size // shards}; choose a block size that divides "
        f"{size // shards} or shard another axis"
    )
