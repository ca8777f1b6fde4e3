"""Granularity: which values share one set of quant params, expressed as a block shape.

Every granularity reduces to ONE mechanism, a block shape with one entry per axis. Each
block shares a scale (and zero point or minval), so the parameters have shape
``x.shape // block_shape``:

* ``per_tensor()``: the block is the whole tensor;
* ``per_channel(axis)``: 1 along ``axis``, whole along every other axis;
* ``per_block(axis, block_size)``: ``block_size`` along ``axis``, 1 along the channel axis
  and whole along the remaining axes (coreai-opt's convention: a conv block spans all
  kernel positions);
* an explicit tuple, with -1 meaning the whole dimension.

Flax puts the output channel last, so a Dense or Conv kernel ``[..., in, out]`` takes
``per_channel(-1)`` and ``per_block(-2, B)``; an Embed table ``[vocab, features]`` takes
``per_channel(0)`` and ``per_block(1, B)``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Literal, NamedTuple, Union

import jax
import numpy as np

__all__ = [
    "BlockLayout",
    "Granularity",
    "GranularityLike",
    "as_granularity",
    "block_shape",
    "param_shape",
    "per_block",
    "per_channel",
    "per_tensor",
    "per_token",
]

ChannelAxis = Union[int, Literal["auto", "all"]]


@dataclasses.dataclass(frozen=True)
class Granularity:
    """A rule that turns an array shape into a block shape.

    Build one with :func:`per_tensor`, :func:`per_channel`, :func:`per_block`, or pass an
    explicit block-shape tuple wherever a granularity is accepted.

    Attributes:
      kind: ``"per_tensor"``, ``"per_channel"``, ``"per_block"``, ``"per_token"`` or
        ``"explicit"``.
      axis: the channel axis (per_channel) or the blocked axis (per_block).
      block_size: the block length along ``axis`` (per_block).
      channel_axis: per_block only: the axis that gets one block per index, ``"auto"``
        (the last axis, or the second-to-last when ``axis`` is the last), or ``"all"``
        (every axis other than ``axis`` gets size-1 blocks, as in the OCP MX formats).
      explicit: the explicit block shape (kind ``"explicit"``).
    """

    kind: Literal["per_tensor", "per_channel", "per_block", "per_token", "explicit"]
    axis: int | None = None
    block_size: int | None = None
    channel_axis: ChannelAxis = "auto"
    explicit: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown granularity kind {self.kind!r}; choose one of {KINDS}")
        if self.kind in ("per_channel", "per_block"):
            object.__setattr__(self, "axis", _int(f"{self.kind} axis", self.axis))
        if self.kind == "per_block":
            size = _int("per_block block_size", self.block_size, "a positive integer")
            if size <= 0:
                raise ValueError(f"per_block block_size must be a positive integer, got {size}")
            object.__setattr__(self, "block_size", size)
            channel = self.channel_axis
            if not (isinstance(channel, str) and channel in ("auto", "all")):
                what = "'auto', 'all' or an int"
                if isinstance(channel, str):
                    raise ValueError(f"per_block channel_axis must be {what}, got {channel!r}")
                channel = _int("per_block channel_axis", channel, what)
                object.__setattr__(self, "channel_axis", channel)
        if self.kind == "explicit":
            if isinstance(self.explicit, (str, bytes)) or not isinstance(self.explicit, Sequence):
                raise TypeError(
                    f"an explicit block shape must be a tuple of ints, got {self.explicit!r}"
                )
            sizes = tuple(self.explicit)
            for size in sizes:
                if not _is_int(size) or (size <= 0 and size != -1):
                    raise ValueError(
                        f"block shape {sizes} has entry {size!r}; each entry must "
                        "be a positive integer or -1 (the whole dimension)"
                    )
            object.__setattr__(self, "explicit", tuple(int(size) for size in sizes))

    def __str__(self) -> str:
        if self.kind in ("per_tensor", "per_token"):
            return self.kind
        if self.kind == "per_channel":
            return f"per_channel(axis={self.axis})"
        if self.kind == "per_block":
            extra = "" if self.channel_axis == "auto" else f", channel_axis={self.channel_axis!r}"
            return f"per_block(axis={self.axis}, block_size={self.block_size}{extra})"
        return f"block_shape{self.explicit}"

    def block_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The block shape for an array of ``shape``; see :func:`block_shape`."""
        return block_shape(shape, self)


KINDS = ("per_tensor", "per_channel", "per_block", "per_token", "explicit")

GranularityLike = Union[Granularity, Sequence[int]]


def per_tensor() -> Granularity:
    """One set of parameters for the whole tensor.

    Examples:
      >>> import qjax
      >>> qjax.per_tensor().block_shape((4, 6))
      (4, 6)
    """
    return Granularity("per_tensor")


def per_token() -> Granularity:
    """One set of parameters per row: size-1 blocks on every axis but the last.

    The granularity of dynamic activation quantization: each token of a
    ``[batch, seq, features]`` activation gets its own scale.

    Examples:
      >>> import qjax
      >>> qjax.per_token().block_shape((2, 5, 64))
      (1, 1, 64)
    """
    return Granularity("per_token")


def per_channel(axis: int) -> Granularity:
    """One set of parameters per index of ``axis``.

    Examples:
      >>> import qjax
      >>> qjax.per_channel(-1).block_shape((4, 6))  # Flax Dense kernel: out is last
      (4, 1)
    """
    return Granularity("per_channel", axis=axis)


def per_block(axis: int, block_size: int, channel_axis: ChannelAxis = "auto") -> Granularity:
    """One set of parameters per run of ``block_size`` values along ``axis``.

    Args:
      axis: the axis split into blocks (the input axis of a Flax kernel: -2).
      block_size: the number of values per block along ``axis``; it must divide the axis.
      channel_axis: the axis that gets one block per index. ``"auto"`` picks the last
        axis, or the second-to-last when ``axis`` is the last. ``"all"`` gives size-1
        blocks along every other axis (the OCP MX layout). Remaining axes are whole.

    Examples:
      >>> import qjax
      >>> qjax.per_block(-2, 32).block_shape((128, 64))  # Dense kernel [in, out]
      (32, 1)
      >>> qjax.per_block(-2, 32).block_shape((3, 3, 64, 16))  # Conv HWIO: spans H, W
      (3, 3, 32, 1)
      >>> qjax.per_block(-1, 32, channel_axis="all").block_shape((2, 3, 64))
      (1, 1, 32)
    """
    return Granularity("per_block", axis=axis, block_size=block_size, channel_axis=channel_axis)


def as_granularity(granularity: GranularityLike | None) -> Granularity:
    """Accepts a :class:`Granularity`, an explicit block-shape tuple or None (per tensor)."""
    if granularity is None:
        return per_tensor()
    if isinstance(granularity, Granularity):
        return granularity
    if isinstance(granularity, Sequence) and not isinstance(granularity, str):
        return Granularity("explicit", explicit=tuple(granularity))
    raise TypeError(
        f"granularity must be per_tensor(), per_channel(axis), per_block(axis, block_size) "
        f"or a block-shape tuple, got {granularity!r}"
    )


def block_shape(shape: Sequence[int], granularity: GranularityLike) -> tuple[int, ...]:
    """Resolves a granularity to a concrete block shape for ``shape``.

    Raises:
      ValueError: when an axis is out of range, or a block does not divide its axis.

    Examples:
      >>> import qjax
      >>> qjax.block_shape((8, 6), (-1, 3))
      (8, 3)
    """
    g = as_granularity(granularity)
    shape = tuple(int(d) for d in shape)
    ndim = len(shape)
    if g.kind == "per_tensor":
        blocks = list(shape)
    elif g.kind == "per_token":
        blocks = [1] * ndim
        if ndim:
            blocks[-1] = shape[-1]
    elif g.kind == "explicit":
        if len(g.explicit) != ndim:
            raise ValueError(
                f"block shape {g.explicit} has {len(g.explicit)} entries but the array has "
                f"{ndim} dimensions (shape {shape}); give one entry per axis"
            )
        blocks = [d if b == -1 else b for b, d in zip(g.explicit, shape)]
    elif g.kind == "per_channel":
        axis = _normalize_axis(g.axis, ndim, "per_channel axis")
        blocks = list(shape)
        blocks[axis] = 1
    else:
        axis = _normalize_axis(g.axis, ndim, "per_block axis")
        blocks = list(shape)
        if g.channel_axis == "all":
            blocks = [1] * ndim
        else:
            channel = (
                _default_channel_axis(axis, ndim)
                if g.channel_axis == "auto"
                else (_normalize_axis(g.channel_axis, ndim, "per_block channel_axis"))
            )
            if channel == axis and g.channel_axis != "auto":
                raise ValueError(
                    f"per_block channel_axis {g.channel_axis} is the blocked axis {g.axis}; "
                    "choose a different channel axis"
                )
            if channel is not None:
                blocks[channel] = 1
        blocks[axis] = g.block_size
    for i, (d, b) in enumerate(zip(shape, blocks)):
        divides = d % b == 0 if b else d == 0
        if not divides:
            raise ValueError(
                f"block size {b} does not divide axis {i} of size {d} (shape {shape}, "
                f"granularity {g}); choose a block size that divides {d}"
            )
    return tuple(blocks)


def param_shape(shape: Sequence[int], blocks: Sequence[int]) -> tuple[int, ...]:
    """The shape of the quant params: one entry per block, ``shape // blocks``."""
    return tuple(d // b if b else 1 for d, b in zip(shape, blocks))


class BlockLayout(NamedTuple):
    """How an array of ``shape`` splits into blocks, as a reshape that XLA gets for free.

    The array is viewed as ``(n0, b0, n1, b1, ...)`` (block counts and block sizes) with
    the size-1 dimensions dropped: per-channel on the last axis is ``(rows, cols)`` and
    per-block on the second-to-last ``(n, block, cols)``. Degenerate axes slow XLA:CPU's
    reductions down, and every granularity still takes the same code path. Neighbouring
    axes are not merged: a reshape that merges a sharded axis would make JAX gather it.

    Attributes:
      shape: the array's shape.
      params: the shape of the quant params, ``shape // block_shape``.
      blocked: the ``(n, b, ...)`` shape.
      axes: the axes of ``blocked`` that run inside a block (reduce over these).
      kept: ``blocked`` with the block axes set to 1 (params broadcast in this shape).
    """

    shape: tuple[int, ...]
    params: tuple[int, ...]
    blocked: tuple[int, ...]
    axes: tuple[int, ...]
    kept: tuple[int, ...]

    @classmethod
    def of(cls, shape: Sequence[int], blocks: Sequence[int]) -> BlockLayout:
        """The layout of an array of ``shape`` cut into blocks of ``blocks``."""
        dims = [
            (size, inside)
            for d, b in zip(shape, blocks)
            for size, inside in ((d // b if b else 1, False), (b, True))
            if size != 1
        ]
        return cls(
            shape=tuple(shape),
            params=param_shape(shape, blocks),
            blocked=tuple(size for size, _ in dims),
            axes=tuple(i for i, (_, inside) in enumerate(dims) if inside),
            kept=tuple(1 if inside else size for size, inside in dims),
        )

    def blockify(self, x: jax.Array) -> jax.Array:
        """``x`` in the blocked shape."""
        return x.reshape(self.blocked)

    def expand(self, p: jax.Array) -> jax.Array:
        """Params of shape :attr:`params` reshaped to broadcast against the blocked array."""
        return p.reshape(self.kept)

    def compact(self, p: jax.Array) -> jax.Array:
        """Per-block values in the kept shape reshaped to :attr:`params`."""
        return p.reshape(self.params)


def _default_channel_axis(axis: int, ndim: int) -> int | None:
    if ndim < 2:
        return None
    return ndim - 2 if axis == ndim - 1 else ndim - 1


def _normalize_axis(axis: int, ndim: int, what: str) -> int:
    if not ndim:
        raise ValueError(f"{what} {axis} cannot apply to a 0-d array; use per_tensor()")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what} {axis} is out of range for an array with {ndim} dimensions; "
            f"use an axis in [{-ndim}, {ndim - 1}]"
        )
    return axis % ndim


def _is_int(value: object) -> bool:
    """True for Python and NumPy integers; bools are refused."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _int(name: str, value: object, what: str = "an int") -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    return int(value)
