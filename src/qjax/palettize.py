"""Lookup-table weights: QLoRA's NF4 and k-means palettization, as a :class:`LUTArray`.

A lookup-table (LUT) quantized array stores, for every value, an ``n``-bit index into a
small table of float32 values, and reads it back as ``table[index]`` (times a per-block
scale for NF4). Two ways to build one:

* :func:`nf4`: QLoRA's NormalFloat4 (Dettmers et al., 2023). The table is the 16 fixed
  levels of :data:`NF4_LEVELS` (normal quantiles scaled to ``[-1, 1]``, with an exact
  zero); each block of 64 values along the contraction axis is divided by its absmax and
  every quotient maps to the nearest level.
* :func:`palettize`: a table of ``2**bits`` values fitted by 1-D k-means (Lloyd's
  algorithm) per tensor or per group of output channels (coremltools'
  ``per_grouped_channel``), optionally weighted by an importance (e.g. a diagonal
  Hessian), with 1- to 8-bit indices.

Nearest entry and ties: a value goes to the entry ``j`` with ``mid[j - 1] < v <= mid[j]``,
``mid[j] = (table[j] + table[j + 1]) / 2`` in float32 over the sorted table: a value
exactly on a midpoint takes the LOWER entry, as bitsandbytes' NF4 decision tree
(``x > midpoint``) does. The search is a binary search written as selects (no gathers,
which XLA:CPU runs several times slower), and the table read-back a select tree over the
index bits.

Layout of a :class:`LUTArray` (every part an array leaf, so it passes through ``jit``,
``vmap`` and ``tree_map``): ``indices`` are the codes packed along the last axis by
:func:`qjax.packing.pack_codes`; ``table`` has the array's rank plus one axis of entries,
one table per block, ``shape // table.shape[:-1]`` being the block (``(1, 1, 16)`` for one
table of a 2-D array; ``(1, out // g, 16)`` for groups of ``g`` output channels of a Flax
kernel ``[in, out]``); ``scale`` (NF4) has the array's rank, one absmax per block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from qjax import granularity as gran
from qjax import packing
from qjax.exact import exact_divide
from qjax.qarray import not_an_array

__all__ = [
    "NF4_BLOCK_SIZE",
    "NF4_LEVELS",
    "GroupedChannel",
    "LUTArray",
    "TableFormat",
    "fake_nf4",
    "fake_palettize",
    "kmeans_table",
    "nf4",
    "palettize",
    "per_grouped_channel",
    "quantize_to_table",
]

NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
"""QLoRA's 16 NF4 levels (bitsandbytes' table), sorted; code ``i`` stands for level ``i``."""

NF4_BLOCK_SIZE = 64
"""QLoRA's block: one absmax per 64 values."""

SAMPLES = 1 << 16
"""Arrays of more values start k-means from a fixed stride through them: about this many."""

SAMPLE_ITERS = 200
"""The most Lloyd iterations on that sample, before those on every value."""


@dataclasses.dataclass(frozen=True)
class GroupedChannel:
    """One table per ``group_size`` consecutive channels along ``axis``; build it with
    :func:`per_grouped_channel`."""

    axis: int
    group_size: int

    def __post_init__(self):
        for name in ("axis", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
                raise TypeError(f"per_grouped_channel {name} must be an int, got {value!r}")
        if self.group_size <= 0:
            raise ValueError(
                f"per_grouped_channel group_size must be a positive integer, got {self.group_size}"
            )

    def block_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The block one table covers: ``group_size`` along ``axis``, whole elsewhere.

        Raises:
          ValueError: when ``axis`` is out of range or ``group_size`` does not divide it.
        """
        shape = tuple(int(d) for d in shape)
        if not -len(shape) <= self.axis < len(shape):
            raise ValueError(
                f"per_grouped_channel axis {self.axis} is out of range for an array of shape "
                f"{shape}; use an axis in [{-len(shape)}, {len(shape) - 1}]"
            )
        size = shape[self.axis]
        if size % self.group_size:
            raise ValueError(
                f"per_grouped_channel group_size {self.group_size} does not divide axis "
                f"{self.axis} of size {size} (shape {shape}); choose a group size that "
                f"divides {size}"
            )
        blocks = list(shape)
        blocks[self.axis] = self.group_size
        return tuple(blocks)


def per_grouped_channel(axis: int, group_size: int) -> GroupedChannel:
    """One lookup table per ``group_size`` channels along ``axis`` (the output axis: -1 for
    a Flax kernel ``[in, out]``, 0 for a PyTorch weight ``[out, in]``).

    Examples:
      >>> from qjax.palettize import per_grouped_channel
      >>> per_grouped_channel(-1, 16).block_shape((256, 64))  # 4 tables for 64 outputs
      (256, 16)
    """
    return GroupedChannel(axis, group_size)


TableGranularity = Union[None, str, gran.Granularity, GroupedChannel]


@dataclasses.dataclass(frozen=True)
class LUTArray:
    """A lookup-table quantized array: ``table[indices]`` (times ``scale`` for NF4).

    Build one with :func:`nf4`, :func:`palettize` or :func:`quantize_to_table`. A
    registered pytree: ``indices``, ``table`` and ``scale`` are leaves, ``bits``, ``pad``
    and ``float_dtype`` static; vmapping a quantizer over a leading axis stacks LUTArrays.

    Attributes:
      indices: uint8, the ``bits``-wide codes packed along the last axis
        (:func:`qjax.packing.pack_codes`).
      table: float32 ``[*groups, entries]``: the array's rank plus one axis of at most
        ``2**bits`` distinct entries; block ``shape // groups`` shares one table.
      scale: None, or float32 with the array's rank: one multiplier per block (NF4's
        absmax), applied after the lookup.
      bits: the index width, one of 1, 2, 3, 4, 6, 8.
      pad: zero codes packed at the end of the last axis.
      float_dtype: the dtype :meth:`dequantize` returns.

    Building one checks the static fields and the parts' shapes and dtypes where they are
    arrays; :meth:`validate` also checks the values (distinct table entries, indices within
    the table).

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.palettize import palettize
      >>> la = palettize(jnp.array([[0.0, 0.1, 0.9], [1.0, 2.0, 2.1]]), 2)
      >>> la.table, la.codes()
      (Array([[[0.05, 0.9 , 1.  , 2.05]]], dtype=float32), Array([[0, 0, 1],
             [2, 3, 3]], dtype=int32))
      >>> la.dequantize()
      Array([[0.05, 0.05, 0.9 ],
             [1.  , 2.05, 2.05]], dtype=float32)
      >>> la.shape, la.nbytes  # 6 two-bit codes in 2 bytes (one per row) + 4 float32
      ((2, 3), 18)
    """

    indices: jax.Array
    table: jax.Array
    scale: jax.Array | None = None
    bits: int = dataclasses.field(default=4, metadata={"static": True})
    pad: int = dataclasses.field(default=0, metadata={"static": True})
    float_dtype: str = dataclasses.field(default="float32", metadata={"static": True})

    def __post_init__(self):
        _check_static(self)
        _check_leaves(self, strict=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape (of the unquantized array)."""
        per, nbytes = packing.code_group(self.bits)
        last = self.indices.shape[-1] // nbytes * per - self.pad
        return tuple(self.indices.shape[:-1]) + (last,)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> jnp.dtype:
        """The float dtype :meth:`dequantize` returns."""
        return jnp.dtype(self.float_dtype)

    @property
    def table_block(self) -> tuple[int, ...]:
        """The block of values that shares one table, ``shape // table.shape[:-1]``."""
        return tuple(d // g for d, g in zip(self.shape, self.table.shape[:-1]))

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed indices, tables and scales."""
        parts = (self.indices, self.table, self.scale)
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in parts if a is not None)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per value, tables and scales included: ``8 * nbytes / size``."""
        return 8 * self.nbytes / self.size

    def codes(self) -> jax.Array:
        """The indices unpacked: int32, in the array's shape."""
        return packing.unpack_codes(self.indices, self.bits, pad=self.pad)

    def dequantize(self) -> jax.Array:
        """``table[index]`` (times ``scale``) in :attr:`float_dtype`."""
        return _dequantize(self)

    def validate(self) -> LUTArray:
        """Checks every part strictly, values included, and returns the LUTArray.

        Raises:
          ValueError: naming the part that does not fit: a leaf that is no array, a wrong
            dtype or shape, duplicate or non-finite table entries, an index past the end
            of its table.

        Examples:
          >>> import dataclasses, jax.numpy as jnp
          >>> from qjax.palettize import palettize
          >>> la = palettize(jnp.arange(8.0).reshape(2, 4), 2)
          >>> la.validate() is la
          True
          >>> dataclasses.replace(la, table=jnp.array([[[0.0, 1.0, 1.0, 2.0]]])).validate()
          Traceback (most recent call last):
            ...
          ValueError: LUTArray table (0, 0) has duplicate entries [1.0]; each entry ...
        """
        _check_leaves(self, strict=True)
        table = np.asarray(self.table)
        _check_entries(table, "LUTArray table")
        entries = table.shape[-1]
        codes = np.asarray(self.codes())
        if entries < 2**self.bits and codes.size and codes.max() >= entries:
            position = tuple(int(i) for i in np.argwhere(codes >= entries)[0])
            raise ValueError(
                f"LUTArray indices hold {int(codes[position])} at {position}, out of range of "
                f"its table of {entries} entries; indices must be in [0, {entries - 1}]"
            )
        return self

    def __getattr__(self, name: str) -> Any:
        if hasattr(type(self), name):  # a property that failed: its own error, again
            return object.__getattribute__(self, name)
        raise not_an_array(self, name)

    def __repr__(self) -> str:
        def shape(leaf: Any) -> Any:
            found = getattr(leaf, "shape", None)
            return None if found is None else tuple(found)

        if shape(self.indices) is None:  # a placeholder tree (tree_map, Orbax targets)
            return f"LUTArray(indices={self.indices!r}, table={self.table!r}, bits={self.bits})"
        return (
            f"LUTArray(shape={self.shape}, bits={self.bits}, table_shape={shape(self.table)}, "
            f"scale_shape={shape(self.scale)}, nbytes={self.nbytes})"
        )


jax.tree_util.register_dataclass(LUTArray)


@jax.jit
def _dequantize(la: LUTArray) -> jax.Array:
    values = _lookup_blocks(la.codes(), la.table, la.bits)
    if la.scale is not None:
        layout = _layout(la.shape, la.scale.shape)
        scaled = layout.blockify(values) * layout.expand(la.scale.astype(jnp.float32))
        values = scaled.reshape(la.shape)
    return values.astype(la.float_dtype)


def nf4(w: jax.typing.ArrayLike, axis: int = -2, block_size: int = NF4_BLOCK_SIZE) -> LUTArray:
    """QLoRA's NF4: absmax per block of ``block_size`` along ``axis``, 4-bit codes.

    Each value is divided (IEEE float32 division) by its block's absmax and mapped to the
    nearest of :data:`NF4_LEVELS` (a midpoint goes to the lower level, as in
    bitsandbytes); dequantization gives ``level * absmax``. An all-zero block stores absmax
    0 and codes of the level 0.0. Blocks run along the contraction axis: -2 for a Flax
    kernel ``[in, out]`` (the default), -1 for a PyTorch weight ``[out, in]`` or a 1-D
    array. The absmax is kept in float32 (QLoRA's double quantization of the absmax to
    8 bits is not done).

    Args:
      w: float array (computed in float32; :meth:`LUTArray.dequantize` returns its dtype).
      axis: the blocked axis.
      block_size: values per block; it must divide the axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.palettize import nf4
      >>> la = nf4(jnp.array([[2.0, -1.0, 0.1, 0.5]]), axis=-1, block_size=4)
      >>> la.codes(), la.scale
      (Array([[15,  2,  8, 10]], dtype=int32), Array([[2.]], dtype=float32))
      >>> la.dequantize()
      Array([[ 2.       , -1.0501461,  0.1591606,  0.4922246]], dtype=float32)
    """
    x, dtype = _float_input(w, "nf4")
    blocks = _nf4_blocks(x.shape, axis, block_size)
    return _nf4(x, blocks, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _nf4(x: jax.Array, blocks: tuple[int, ...], dtype: str) -> LUTArray:
    codes, absmax = _nf4_codes(x, blocks)
    table = jnp.asarray(NF4_LEVELS).reshape((1,) * x.ndim + (16,))
    return _build(codes, table, absmax, 4, dtype)


def fake_nf4(
    w: jax.typing.ArrayLike, axis: int = -2, block_size: int = NF4_BLOCK_SIZE
) -> jax.Array:
    """``nf4(w, axis, block_size).dequantize()`` with a straight-through gradient (1) to
    ``w``, for QAT.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from qjax.palettize import fake_nf4
      >>> w = jnp.array([[2.0, -1.0, 0.1, 0.5]])
      >>> jax.grad(lambda w: jnp.sum(3 * fake_nf4(w, axis=-1, block_size=4)))(w)
      Array([[3., 3., 3., 3.]], dtype=float32)
    """
    x, dtype = _float_input(w, "fake_nf4")
    blocks = _nf4_blocks(x.shape, axis, block_size)
    return _fake_nf4(x, blocks, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fake_nf4(x: jax.Array, blocks: tuple[int, ...], dtype: str) -> jax.Array:
    codes, absmax = jax.lax.stop_gradient(_nf4_codes(x, blocks))
    table = jnp.asarray(NF4_LEVELS).reshape((1,) * x.ndim + (16,))
    layout = _layout(x.shape, absmax.shape)
    values = layout.blockify(_lookup_blocks(codes, table, 4)) * layout.expand(absmax)
    return _straight_through(x, values.reshape(x.shape)).astype(dtype)


def _nf4_codes(x: jax.Array, blocks: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """NF4 codes (int32, x's shape) and the float32 absmax per block (param shape)."""
    normalized, absmax = _absmax_normalize(x, blocks)
    return _nearest(normalized, jnp.asarray(_midpoints(NF4_LEVELS))), absmax


def _nf4_blocks(shape: tuple[int, ...], axis: int, block_size: int) -> tuple[int, ...]:
    """Blocks of ``block_size`` along ``axis`` and 1 elsewhere, or a ValueError naming both."""
    if not shape:
        raise ValueError("nf4 needs an array with at least one axis, got a 0-d array")
    if not _is_int(block_size) or block_size <= 0:
        raise ValueError(f"nf4 block_size must be a positive integer, got {block_size!r}")
    if not _is_int(axis):
        raise TypeError(f"nf4 axis must be an int, got {type(axis).__name__} {axis!r}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"nf4 axis {axis!r} is out of range for an array of shape {shape}; use an axis "
            f"in [{-len(shape)}, {len(shape) - 1}] (-2 for a Flax kernel [in, out], -1 for "
            "a PyTorch weight [out, in] or a 1-D array)"
        )
    if shape[axis] % block_size:
        raise ValueError(
            f"nf4 block_size {block_size} does not divide axis {axis} of size {shape[axis]} "
            f"(shape {shape}); choose a block size that divides {shape[axis]}"
        )
    return gran.per_block(int(axis), int(block_size), channel_axis="all").block_shape(shape)


def kmeans_table(
    w: jax.typing.ArrayLike,
    bits: int,
    granularity: TableGranularity = None,
    importance: jax.typing.ArrayLike | None = None,
    iters: int = 25,
) -> tuple[jax.Array, jax.Array]:
    """The k-means (Lloyd) table of ``2**bits`` values per tensor or group of channels.

    Init: the weighted quantiles ``(j + 1/2) / k`` of each group (the smallest value whose
    cumulative weight reaches that share of the group's); entries that coincide (fewer
    distinct values than entries) are moved apart by a few ulps so the table stays
    strictly increasing. Then Lloyd iterations until no entry changes or ``iters`` have
    run: assign each value to its nearest entry (ties to the lower), set each entry to the
    importance-weighted mean of its values (an entry with no weight keeps its value).
    The table comes back sorted. An array of more than 65,536 values first takes the
    init and up to 200 Lloyd iterations from a fixed stride through it (about 65,536
    values), then the iterations on every value: Lloyd converges slowly in 1-D, and
    iterations on the sample cost next to nothing.

    Args:
      w: float array.
      bits: index width, one of 1, 2, 3, 4, 6, 8.
      granularity: None / ``"per_tensor"`` / ``qjax.per_tensor()`` for one table, or
        :func:`per_grouped_channel` for one per group of channels.
      importance: optional non-negative weights, broadcastable to ``w``'s shape (e.g. a
        diagonal Hessian ``[in, 1]`` of a Dense kernel).
      iters: the most Lloyd iterations.

    Returns:
      ``(table, iterations)``: float32 ``[*groups, 2**bits]`` (see :class:`LUTArray`) and
      the number of iterations run on every value (int32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.palettize import kmeans_table
      >>> table, n = kmeans_table(jnp.array([0.0, 0.2, 1.0, 1.1, 1.2, 5.0]), 1)
      >>> table, int(n)
      (Array([[0.70000005, 5.        ]], dtype=float32), 4)
    """
    x, _ = _float_input(w, "kmeans_table")
    blocks = _table_blocks(x.shape, bits, granularity)
    weights = _importance(importance, x.shape)
    return _kmeans(x, weights, blocks, 2**bits, _iters(iters))


def palettize(
    w: jax.typing.ArrayLike,
    bits: int,
    granularity: TableGranularity = None,
    importance: jax.typing.ArrayLike | None = None,
    iters: int = 25,
    per_channel_scale: int | None = None,
) -> LUTArray:
    """Palettizes ``w``: a k-means table per tensor or group (:func:`kmeans_table`) and the
    nearest entry's ``bits``-wide index for every value, packed.

    With ``per_channel_scale`` (the output-channel axis: -1 for a Flax kernel, 0 for a
    PyTorch weight), as coremltools' ``enable_per_channel_scale``: each channel is first
    divided by its absmax, stored as the LUTArray's ``scale`` (one float32 per channel),
    and k-means runs on the quotients with the importance times ``absmax**2``, so it
    still minimises the error of the original values. Channels of different ranges then
    share one table.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from qjax.palettize import palettize, per_grouped_channel
      >>> w = jax.random.normal(jax.random.key(0), (64, 32))  # a Flax kernel [in, out]
      >>> la = palettize(w, 4, per_grouped_channel(-1, 16))  # 2 tables of 16 entries
      >>> la.table.shape, la.indices.shape, la.bits_per_weight
      ((1, 2, 16), (64, 16), 4.5)
    """
    x, dtype = _float_input(w, "palettize")
    blocks = _table_blocks(x.shape, bits, granularity)
    weights = _importance(importance, x.shape)
    scale_blocks = (
        None if per_channel_scale is None else _channel_blocks(x.shape, per_channel_scale)
    )
    return _palettize(x, weights, blocks, scale_blocks, bits, _iters(iters), dtype)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _palettize(
    x: jax.Array,
    weights: jax.Array | None,
    blocks: tuple[int, ...],
    scale_blocks: tuple[int, ...] | None,
    bits: int,
    iters: int,
    dtype: str,
) -> LUTArray:
    absmax = None
    if scale_blocks is not None:
        x, absmax = _absmax_normalize(x, scale_blocks)
        layout = gran.BlockLayout.of(x.shape, scale_blocks)
        weights = jnp.ones_like(x) if weights is None else weights
        weights = (layout.blockify(weights) * layout.expand(jnp.square(absmax))).reshape(x.shape)
    table, _ = _kmeans(x, weights, blocks, 2**bits, iters)
    return _build(_table_codes(x, table), table, absmax, bits, dtype)


def _iters(iters: object) -> int:
    if not isinstance(iters, numbers.Integral) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    return int(iters)


def _absmax_normalize(x: jax.Array, blocks: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``x`` divided (IEEE) by its absmax per block (1 where that is 0), and the absmax
    in the param shape."""
    layout = gran.BlockLayout.of(x.shape, blocks)
    xb = layout.blockify(x)
    absmax = jnp.max(jnp.abs(xb), axis=layout.axes, keepdims=True)
    normalized = exact_divide(xb, jnp.where(absmax == 0, jnp.float32(1), absmax))
    return normalized.reshape(x.shape), layout.compact(absmax)


def _is_int(value: object) -> bool:
    """An integer, but not a bool (True is no axis or size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _channel_blocks(shape: tuple[int, ...], axis: object) -> tuple[int, ...]:
    if not _is_int(axis):
        raise TypeError(
            f"per_channel_scale must be an int axis or None, got {type(axis).__name__} {axis!r}"
        )
    if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"per_channel_scale must be an axis of the array of shape {shape} (the output "
            f"channels: -1 for a Flax kernel, 0 for a PyTorch weight), got {axis!r}"
        )
    return gran.per_channel(int(axis)).block_shape(shape)


def quantize_to_table(
    w: jax.typing.ArrayLike, table: jax.typing.ArrayLike, bits: int | None = None
) -> LUTArray:
    """Maps every value of ``w`` to the nearest entry of its block's table.

    Args:
      w: float array.
      table: float32 ``[*groups, entries]`` with ``w``'s rank plus one, each group count
        dividing its axis; entries need not be sorted but must be distinct.
      bits: the index width (one of 1, 2, 3, 4, 6, 8); by default the smallest that holds
        ``entries`` codes.

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.palettize import quantize_to_table
      >>> la = quantize_to_table(jnp.array([[0.4, -3.0, 0.6]]), jnp.array([[[1.0, 0.0, -1.0]]]))
      >>> la.bits, la.codes(), la.dequantize()
      (2, Array([[1, 2, 0]], dtype=int32), Array([[ 0., -1.,  1.]], dtype=float32))
    """
    x, dtype = _float_input(w, "quantize_to_table")
    table = _table_input(table, x.shape)
    entries = table.shape[-1]
    if bits is None:
        bits = next(b for b in packing.CODE_BITS if 2**b >= entries)
    packing.code_group(bits)
    if entries > 2**bits:
        raise ValueError(f"a table of {entries} entries needs more than {bits}-bit indices")
    return _quantize_to_table(x, table, bits, dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _quantize_to_table(x: jax.Array, table: jax.Array, bits: int, dtype: str) -> LUTArray:
    return _build(_table_codes(x, table), table, None, bits, dtype)


def fake_palettize(
    w: jax.typing.ArrayLike,
    table: jax.typing.ArrayLike,
    *,
    scale: jax.typing.ArrayLike | None = None,
    learn_table: bool = False,
) -> jax.Array:
    """``quantize_to_table(w, table).dequantize()`` with straight-through gradients, for QAT.

    With ``scale`` (float32 with ``w``'s rank, one value per block, e.g. the ``scale`` of
    ``palettize(..., per_channel_scale=axis)``) the table is one of ``w / scale`` (IEEE
    division; 1 where the scale is 0) and the result is multiplied back by ``scale``.

    The gradient to ``w`` is 1 everywhere (also past the table's ends: the outer entries
    are means, so the outermost weights lie beyond them). With ``learn_table`` the table
    gets the gradient of the lookup: each entry the sum of the output gradients of the
    values mapped to it; otherwise none. Fit the table with :func:`kmeans_table` (again
    every few steps, as the weights move).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from qjax.palettize import fake_palettize
      >>> w, table = jnp.array([0.1, 0.9, 1.2]), jnp.array([0.0, 1.0])
      >>> fake_palettize(w, table)
      Array([0., 1., 1.], dtype=float32)
      >>> jax.grad(lambda t: jnp.sum(fake_palettize(w, t, learn_table=True) * w))(table)
      Array([0.1, 2.1], dtype=float32)
    """
    x, dtype = _float_input(w, "fake_palettize")
    table = _table_input(table, x.shape)
    if not learn_table:
        table = jax.lax.stop_gradient(table)
    if scale is not None:
        scale = jnp.asarray(scale, jnp.float32)
        if scale.ndim != x.ndim or any(s <= 0 or d % s for s, d in zip(scale.shape, x.shape)):
            raise ValueError(
                f"scale has shape {scale.shape}, which does not fit an array of shape "
                f"{x.shape}: it needs the array's rank, each size dividing its axis"
            )
    return _fake_palettize(x, table, scale, dtype)


@functools.partial(jax.jit, static_argnums=(3,))
def _fake_palettize(
    x: jax.Array, table: jax.Array, scale: jax.Array | None, dtype: str
) -> jax.Array:
    order = jnp.argsort(jax.lax.stop_gradient(table), axis=-1)
    ordered = jnp.take_along_axis(table, order, axis=-1)
    target = jax.lax.stop_gradient(x)
    if scale is not None:
        layout = _layout(x.shape, scale.shape)
        divisor = jnp.where(scale == 0, jnp.float32(1), scale)
        target = exact_divide(layout.blockify(target), layout.expand(divisor)).reshape(x.shape)
    codes = _nearest_blocks(target, jax.lax.stop_gradient(ordered))
    bits = max(1, (ordered.shape[-1] - 1).bit_length())
    values = _lookup_blocks(codes, ordered, bits)
    if scale is not None:
        values = (layout.blockify(values) * layout.expand(scale)).reshape(x.shape)
    return _straight_through(x, values).astype(dtype)


TABLE_KINDS = ("nf4", "kmeans")
"""What builds the table: QLoRA's fixed NF4 levels (:func:`nf4`) or k-means (:func:`palettize`)."""


@dataclasses.dataclass(frozen=True)
class TableFormat:
    """A lookup-table format as a value: what :func:`nf4` or :func:`palettize` is called with.

    Rules (:func:`qjax.quantize_tree`, :func:`qjax.plan`, ``qjax quantize``) carry one
    where others carry a :class:`~qjax.QuantSpec`; ``str()`` gives the rule shorthand
    that :func:`qjax.rules.parse_leaf_rule` reads back: ``nf4:per_block:64:axis=-2``,
    ``lut4:per_tensor``, ``lut4:per_grouped_channel:16:axis=-1:scaled``.

    Attributes:
      kind: ``"nf4"`` (QLoRA's 16 fixed levels, absmax per block) or ``"kmeans"`` (a table
        of ``2**bits`` entries fitted by k-means: :func:`palettize`).
      bits: the index width: 4 for NF4; 1, 2, 3, 4, 6 or 8 for k-means.
      block_size: NF4: values per absmax block along ``axis`` (default 64); None for k-means.
      group_size: k-means: ``group_size`` consecutive output channels along ``axis`` share
        one table (coremltools' ``per_grouped_channel``); None: one table for the tensor.
      scaled: k-means: each output channel along ``axis`` is first divided by its absmax
        (``palettize(..., per_channel_scale=axis)``, coremltools'
        ``enable_per_channel_scale``).
      axis: NF4: the blocked (contraction) axis, default -2 (a Flax kernel ``[in, out]``);
        k-means with groups or ``scaled``: the output-channel axis, default -1; None (and
        nothing else) for a k-means table per tensor without scales.

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.palettize import TableFormat
      >>> fmt = TableFormat("kmeans", bits=2, group_size=2)
      >>> print(fmt)
      lut2:per_grouped_channel:2:axis=-1
      >>> fmt.quantize(jnp.arange(32.0).reshape(8, 4)).table.shape  # 2 tables of 4 entries
      (1, 2, 4)
      >>> print(TableFormat("nf4", block_size=32))
      nf4:per_block:32:axis=-2
    """

    kind: str = "nf4"
    bits: int = 4
    block_size: int | None = None
    group_size: int | None = None
    scaled: bool = False
    axis: int | None = None

    def __post_init__(self):
        if self.kind not in TABLE_KINDS:
            raise ValueError(f"TableFormat kind must be one of {TABLE_KINDS}, got {self.kind!r}")
        for name in ("bits", "block_size", "group_size", "axis"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_))
            ):
                raise TypeError(f"TableFormat {name} must be an int, got {value!r}")
        if not isinstance(self.scaled, bool):
            raise TypeError(f"TableFormat scaled must be True or False, got {self.scaled!r}")
        if self.kind == "nf4":
            if self.bits != 4 or self.group_size is not None or self.scaled:
                raise ValueError(
                    "TableFormat nf4 has 4-bit codes and scales every block by its absmax: "
                    "bits=4, no group_size and scaled=False (those are k-means options)"
                )
            self._set("block_size", NF4_BLOCK_SIZE if self.block_size is None else self.block_size)
            self._set("axis", -2 if self.axis is None else self.axis)
        else:
            if self.bits not in packing.CODE_BITS:
                raise ValueError(
                    f"TableFormat bits must be one of {packing.CODE_BITS}, got {self.bits!r}"
                )
            if self.block_size is not None:
                raise ValueError(
                    "TableFormat block_size is NF4's (absmax blocks); a k-means table "
                    "covers the tensor or group_size output channels"
                )
            uses_axis = self.group_size is not None or self.scaled
            if self.axis is not None and not uses_axis:
                raise ValueError(
                    f"TableFormat axis={self.axis} has no meaning for one k-means table per "
                    "tensor without scales: give group_size or scaled=True, or drop the axis"
                )
            self._set("axis", -1 if uses_axis and self.axis is None else self.axis)
        for name in ("block_size", "group_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"TableFormat {name} must be a positive integer, got {value}")

    def _set(self, name: str, value: int | None) -> None:
        object.__setattr__(self, name, None if value is None else int(value))

    def shorthand(self, axis: bool = True) -> str:
        """The rule shorthand; ``axis=False`` leaves ``axis=`` out (a layout template).

        Examples:
          >>> from qjax.palettize import TableFormat
          >>> TableFormat("kmeans", bits=3, scaled=True).shorthand(axis=False)
          'lut3:per_tensor:scaled'
        """
        if self.kind == "nf4":
            parts = ["nf4", "per_block", str(self.block_size)]
        else:
            parts = [f"lut{self.bits}"]
            grouped = ["per_grouped_channel", str(self.group_size)]
            parts += ["per_tensor"] if self.group_size is None else grouped
        parts += [f"axis={self.axis}"] if axis and self.axis is not None else []
        return ":".join(parts + (["scaled"] if self.scaled else []))

    def __str__(self) -> str:
        return self.shorthand()

    def check(self, shape: Sequence[int]) -> None:
        """Checks that the format fits an array of ``shape``, without computing anything.

        Raises:
          ValueError: for a 0-d shape, an axis out of range, or a block or group size
            that does not divide its axis, naming them.

        Examples:
          >>> from qjax.palettize import TableFormat
          >>> TableFormat("nf4").check((48, 32))
          Traceback (most recent call last):
            ...
          ValueError: nf4 block_size 64 does not divide axis -2 of size 48 (shape (48, 32)); ...
        """
        shape = tuple(int(d) for d in shape)
        if self.kind == "nf4":
            _nf4_blocks(shape, self.axis, self.block_size)
            return
        if not shape:
            raise ValueError("palettize needs an array with at least one axis, got a 0-d array")
        _table_blocks(shape, self.bits, self._granularity())
        if self.scaled:
            _channel_blocks(shape, self.axis)

    def quantize(self, w: jax.typing.ArrayLike) -> LUTArray:
        """``nf4(w, axis, block_size)``, or ``palettize(w, bits, granularity,
        per_channel_scale=...)`` with this format's options."""
        if self.kind == "nf4":
            return nf4(w, self.axis, self.block_size)
        scale_axis = self.axis if self.scaled else None
        return palettize(w, self.bits, self._granularity(), per_channel_scale=scale_axis)

    def _granularity(self) -> GroupedChannel | None:
        return None if self.group_size is None else per_grouped_channel(self.axis, self.group_size)

    @classmethod
    def of(cls, la: LUTArray) -> TableFormat | None:
        """The format that builds a LUTArray like ``la``, its axis counted from the end; None
        where none does (e.g. tables of :func:`quantize_to_table` with fewer entries).

        NF4 is told by its table (:data:`NF4_LEVELS`) and its absmax blocks, k-means by
        the table groups and the per-channel scales.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from qjax.palettize import TableFormat, nf4, palettize, per_grouped_channel
          >>> w = jax.random.normal(jax.random.key(0), (128, 32))
          >>> print(TableFormat.of(nf4(w)), TableFormat.of(nf4(w.T, axis=1)))
          nf4:per_block:64:axis=-2 nf4:per_block:64:axis=-1
          >>> print(TableFormat.of(palettize(w, 2, per_grouped_channel(-1, 8))))
          lut2:per_grouped_channel:8:axis=-1
        """
        shape, ndim = la.shape, la.ndim
        groups, entries = tuple(la.table.shape[:-1]), la.table.shape[-1]
        scale = None if la.scale is None else tuple(la.scale.shape)
        if scale is not None and _has_nf4_table(la):
            blocks = [d // s if s else 1 for d, s in zip(shape, scale)]  # s = 0: empty axis
            long = [i for i, b in enumerate(blocks) if b > 1] or [ndim - 1]
            if len(long) > 1:
                return None
            return cls("nf4", block_size=blocks[long[0]], axis=long[0] - ndim)
        if entries != 2**la.bits:
            return None
        split = [i for i, g in enumerate(groups) if g > 1]
        if len(split) > 1:
            return None
        per_channel = [
            i
            for i in range(ndim)
            if scale == tuple(d if j == i else 1 for j, d in enumerate(shape))
        ]
        if scale is not None and not per_channel:
            return None
        if not split:
            axis = None if scale is None else per_channel[-1] - ndim
            return cls("kmeans", la.bits, scaled=scale is not None, axis=axis)
        axis = split[0]
        if scale is not None and axis not in per_channel:
            return None
        return cls(
            "kmeans",
            la.bits,
            group_size=shape[axis] // groups[axis],
            scaled=scale is not None,
            axis=axis - ndim,
        )


def _has_nf4_table(la: LUTArray) -> bool:
    """True when ``la`` has one table, :data:`NF4_LEVELS` (concrete values only)."""
    table = la.table
    if la.bits != 4 or table.shape[-1] != 16 or math.prod(table.shape[:-1]) != 1:
        return False
    if isinstance(table, jax.core.Tracer):
        return False
    return bool(np.array_equal(np.asarray(table).reshape(16), NF4_LEVELS))


# --- internals ---------------------------------------------------------------------------


def _straight_through(x: jax.Array, values: jax.Array) -> jax.Array:
    """``values`` forward (exactly: ``x - x`` is 0), gradient 1 to ``x``, and the
    gradient of ``values`` to whatever they depend on."""
    return values + (x - jax.lax.stop_gradient(x))


def _build(
    codes: jax.Array, table: jax.Array, scale: jax.Array | None, bits: int, dtype: str
) -> LUTArray:
    per, _ = packing.code_group(bits)
    return LUTArray(
        indices=packing.pack_codes(codes, bits),
        table=table,
        scale=scale,
        bits=bits,
        pad=-codes.shape[-1] % per,
        float_dtype=dtype,
    )


def _midpoints(levels: np.ndarray | jax.Array) -> Any:
    """Float32 midpoints of sorted levels along the last axis."""
    return (levels[..., 1:] + levels[..., :-1]) * np.float32(0.5)


def _nearest(v: jax.Array, mids: jax.Array) -> jax.Array:
    """The number of midpoints below ``v`` (int32): its nearest level, ties to the lower.

    ``mids[..., k - 1]`` (sorted, broadcastable against ``v``) are padded to ``2**n - 1``
    by repeating the last, then ``n`` rounds of a binary search; each round's threshold is
    picked from the candidates with selects on the bits found so far.
    """
    count = mids.shape[-1]
    if count == 0:  # a one-entry table: every value is its one level
        return jnp.zeros(v.shape, jnp.int32)
    bits = max(1, count.bit_length())
    if count < 2**bits - 1:
        fill = jnp.broadcast_to(mids[..., -1:], mids.shape[:-1] + (2**bits - 1 - count,))
        mids = jnp.concatenate([mids, fill], axis=-1)
    code = jnp.zeros(v.shape, jnp.int32)
    for level in range(bits):
        span = 2 ** (bits - level)
        candidates = [mids[..., p * span + span // 2 - 1] for p in range(2**level)]
        threshold = _select_tree(candidates, code >> (bits - level))
        code = code | ((v > threshold).astype(jnp.int32) << (bits - 1 - level))
    return jnp.minimum(code, count)


def _select_tree(values: list[jax.Array], index: jax.Array) -> jax.Array:
    """``values[index]`` for ``len(values) == 2**n``, as ``n`` rounds of selects on the bits
    of ``index`` (lowest first)."""
    bit = 0
    while len(values) > 1:
        on = ((index >> bit) & 1) == 1
        values = [jnp.where(on, values[2 * i + 1], values[2 * i]) for i in range(len(values) // 2)]
        bit += 1
    return values[0]


def _layout(shape: tuple[int, ...], groups: Sequence[int]) -> gran.BlockLayout:
    return gran.BlockLayout.of(shape, tuple(d // g if g else 1 for d, g in zip(shape, groups)))


def _lookup_blocks(codes: jax.Array, table: jax.Array, bits: int) -> jax.Array:
    """``table[code]`` per block: float32 in ``codes``' shape. Entries past the table's end
    (a table of fewer than ``2**bits`` entries) read its last entry."""
    layout = _layout(codes.shape, table.shape[:-1])
    tab = table.astype(jnp.float32).reshape(layout.kept + (table.shape[-1],))
    entries = [tab[..., min(j, table.shape[-1] - 1)] for j in range(2**bits)]
    return _select_tree(entries, layout.blockify(codes)).reshape(codes.shape)


def _nearest_blocks(x: jax.Array, ordered: jax.Array) -> jax.Array:
    """Codes of ``x``'s nearest entries in its block's sorted table."""
    layout = _layout(x.shape, ordered.shape[:-1])
    mids = _midpoints(ordered).reshape(layout.kept + (ordered.shape[-1] - 1,))
    return _nearest(layout.blockify(x), mids).reshape(x.shape)


def _table_codes(x: jax.Array, table: jax.Array) -> jax.Array:
    """Codes (positions in ``table`` as given) of the nearest entries."""
    order = jnp.argsort(table, axis=-1)
    codes = _nearest_blocks(x, jnp.take_along_axis(table, order, axis=-1))
    layout = _layout(x.shape, table.shape[:-1])
    perm = order.astype(jnp.int32).reshape(layout.kept + (table.shape[-1],))
    bits = max(1, (table.shape[-1] - 1).bit_length())
    entries = [perm[..., min(j, table.shape[-1] - 1)] for j in range(2**bits)]
    return _select_tree(entries, layout.blockify(codes)).reshape(x.shape)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _kmeans(
    x: jax.Array, weights: jax.Array | None, blocks: tuple[int, ...], k: int, iters: int
) -> tuple[jax.Array, jax.Array]:
    layout = gran.BlockLayout.of(x.shape, blocks)
    if x.size == 0:  # no values to fit: any distinct levels index them all
        table = _strictly_increasing(jnp.zeros(layout.params + (k,), jnp.float32))
        return table, jnp.int32(0)
    xb = layout.blockify(x)
    wb = jnp.ones_like(xb) if weights is None else layout.blockify(weights)
    groups = math.prod(layout.params)
    # The values of each group as a row [groups, n], for the init and the sample.
    inner = tuple(i for i in range(xb.ndim) if i not in layout.axes)
    rows = jnp.transpose(xb, inner + layout.axes).reshape(groups, -1)
    row_weights = jnp.transpose(wb, inner + layout.axes).reshape(groups, -1)
    stride = max(1, -(-rows.size // SAMPLES))  # 1 for an empty array: nothing to sample
    sample, sample_weights = rows[:, ::stride], row_weights[:, ::stride]
    quantiles = jax.vmap(functools.partial(_weighted_quantiles, k=k))(sample, sample_weights)
    table = _strictly_increasing(quantiles)
    if stride > 1:  # converge on the sample first: its iterations cost next to nothing
        row_ids = jnp.arange(groups, dtype=jnp.int32).reshape(groups, 1)
        table, _ = _lloyd(sample, sample_weights, row_ids, table, SAMPLE_ITERS)
    group_ids = jnp.arange(groups, dtype=jnp.int32).reshape(layout.kept)
    table, n = _lloyd(xb, wb, group_ids, table, iters)
    return table.reshape(layout.params + (k,)), n


def _lloyd(
    xb: jax.Array, wb: jax.Array, group_ids: jax.Array, table: jax.Array, iters: int
) -> tuple[jax.Array, jax.Array]:
    """Lloyd iterations on values ``xb`` (weights ``wb``) whose group of the ``[groups, k]``
    table is ``group_ids`` (broadcast against ``xb``), until no entry changes or ``iters``
    have run; the table and the number run."""
    groups, k = table.shape
    data = jnp.stack([(wb * xb).reshape(-1), wb.reshape(-1)], axis=-1)
    offsets = jnp.broadcast_to(k * group_ids, xb.shape)

    def step(table: jax.Array) -> jax.Array:
        mids = jnp.take(_midpoints(table), group_ids, axis=0)  # [*group_ids.shape, k - 1]
        segment = (_nearest(xb, mids) + offsets).reshape(-1)
        sums = jax.ops.segment_sum(data, segment, groups * k).reshape(groups, k, 2)
        has = sums[..., 1] > 0
        mean = sums[..., 0] / jnp.where(has, sums[..., 1], jnp.float32(1))
        return _strictly_increasing(jnp.where(has, mean, table))

    def cond(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        _, n, changed = state
        return changed & (n < iters)

    def body(state: tuple[jax.Array, jax.Array, jax.Array]):
        table, n, _ = state
        new = step(table)
        return new, n + 1, jnp.any(new != table)

    table, n, _ = jax.lax.while_loop(cond, body, (table, jnp.int32(0), jnp.bool_(True)))
    return table, n


def _weighted_quantiles(values: jax.Array, weights: jax.Array, k: int) -> jax.Array:
    """The smallest value whose cumulative weight reaches ``(j + 1/2) / k`` of the total,
    for ``j < k`` (the smallest value where the total is 0)."""
    order = jnp.argsort(values)
    cumulative = jnp.cumsum(weights[order])
    # cumulative >= (2j + 1) / (2k) * total, without a division (2k is a power of two).
    targets = (2 * jnp.arange(k, dtype=jnp.float32) + 1) * cumulative[-1]
    position = jnp.searchsorted(cumulative * np.float32(2 * k), targets, side="left")
    return values[order][jnp.minimum(position, values.shape[0] - 1)]


def _strictly_increasing(table: jax.Array) -> jax.Array:
    """``table`` (sorted along the last axis) with each entry raised to at least one ulp
    above the one before: equal entries are moved apart, distinct ones are kept."""
    bits = jax.lax.bitcast_convert_type(table, jnp.int32)
    key = jnp.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # ordered like the floats
    step = jnp.arange(table.shape[-1], dtype=jnp.int32).reshape((1,) * (table.ndim - 1) + (-1,))
    key = jax.lax.cummax(key - step, axis=table.ndim - 1) + step
    bits = jnp.where(key < 0, (-key) | jnp.int32(-(2**31)), key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _float_input(w: jax.typing.ArrayLike, what: str) -> tuple[jax.Array, str]:
    """``w`` as float32 and the name of its float dtype; TypeError for non-floats."""
    try:
        x = jnp.asarray(w)
    except TypeError as e:
        raise TypeError(f"{what} needs a float array, got {type(w).__name__}") from e
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{what} needs a float array, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{what} needs an array with at least one axis, got a 0-d array")
    return x.astype(jnp.float32), x.dtype.name


def _table_blocks(
    shape: tuple[int, ...], bits: int, granularity: TableGranularity
) -> tuple[int, ...]:
    packing.code_group(bits)  # refuses other widths
    if granularity in (None, "per_tensor") or (
        isinstance(granularity, gran.Granularity) and granularity.kind == "per_tensor"
    ):
        return shape
    if isinstance(granularity, GroupedChannel):
        return granularity.block_shape(shape)
    raise ValueError(
        "palettize granularity must be None / 'per_tensor' / qjax.per_tensor() or "
        f"per_grouped_channel(axis, group_size), got {granularity!r}"
    )


def _importance(importance: jax.typing.ArrayLike | None, shape: tuple[int, ...]):
    if importance is None:
        return None
    weights = jnp.asarray(importance)
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        weights = weights.astype(jnp.float32)
    try:
        weights = jnp.broadcast_to(weights.astype(jnp.float32), shape)
    except ValueError as e:
        raise ValueError(
            f"importance of shape {weights.shape} does not broadcast to the array's shape {shape}"
        ) from e
    if not isinstance(weights, jax.core.Tracer) and not bool(
        jnp.all(jnp.isfinite(weights) & (weights >= 0))
    ):
        raise ValueError("importance must be finite and non-negative")
    return weights


def _table_input(table: jax.typing.ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    t = jnp.asarray(table)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        raise TypeError(f"table must be a float array, got dtype {t.dtype}")
    t = t.astype(jnp.float32)
    if t.ndim == 1:  # one table for the whole array
        t = t.reshape((1,) * len(shape) + t.shape)
    _check_table_shape(tuple(t.shape), shape, 2**8, "table")
    if not isinstance(t, jax.core.Tracer):
        _check_entries(np.asarray(t), "table")
    return t


def _check_entries(table: np.ndarray, what: str) -> None:
    """Finite and distinct entries in every table, or a ValueError naming the table."""
    if not np.all(np.isfinite(table)):
        raise ValueError(f"{what} has non-finite entries; tables must be finite")
    ordered = np.sort(table, axis=-1)
    same = ordered[..., 1:] == ordered[..., :-1]
    if same.any():
        where = tuple(int(i) for i in np.argwhere(same)[0][:-1])
        dup = sorted({float(v) for v in ordered[where][1:][same[where]]})
        raise ValueError(
            f"{what} {where} has duplicate entries {dup}; each entry of a table must be distinct"
        )


def _divides(count: int, size: int) -> bool:
    """Whether ``count`` groups (or blocks) split an axis of ``size``: a positive divisor,
    or none of an empty axis."""
    return count == size == 0 or (count > 0 and size % count == 0)


def _check_table_shape(
    table: tuple[int, ...], shape: tuple[int, ...], most: int, what: str
) -> None:
    if len(table) != len(shape) + 1 or not all(map(_divides, table[:-1], shape)):
        raise ValueError(
            f"{what} has shape {table}, which does not fit an array of shape {shape}: it "
            "needs the array's rank plus one axis of entries, each group count dividing "
            "its axis (e.g. (1, 1, 16) for one 16-entry table of a 2-D array)"
        )
    if not 1 <= table[-1] <= most:
        raise ValueError(f"{what} has {table[-1]} entries; it needs 1 to {most}")


def _check_static(la: LUTArray) -> None:
    if la.bits not in packing.CODE_BITS or isinstance(la.bits, (bool, np.bool_)):
        raise ValueError(f"LUTArray bits must be one of {packing.CODE_BITS}, got {la.bits!r}")
    object.__setattr__(la, "bits", int(la.bits))
    per, _ = packing.code_group(la.bits)
    if not isinstance(la.pad, numbers.Integral) or isinstance(la.pad, (bool, np.bool_)):
        raise ValueError(f"LUTArray pad must be an int, got {la.pad!r}")
    if not 0 <= la.pad < per:
        raise ValueError(
            f"LUTArray pad must be in [0, {per - 1}] ({per} {la.bits}-bit codes per group of "
            f"bytes), got {la.pad}"
        )
    object.__setattr__(la, "pad", int(la.pad))
    try:
        dtype = jnp.dtype(la.float_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"LUTArray float_dtype must name a floating-point dtype, got {la.float_dtype!r}"
        )
    object.__setattr__(la, "float_dtype", dtype.name)


def _aval(leaf: Any, field: str, strict: bool) -> tuple[tuple[int, ...], np.dtype] | None:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if isinstance(shape, tuple) and isinstance(dtype, np.dtype):
        return tuple(int(d) for d in shape), dtype
    if strict:
        raise ValueError(f"LUTArray {field} must be an array, got {type(leaf).__name__}")
    return None


def _check_leaves(la: LUTArray, *, strict: bool) -> None:
    """Shapes and dtypes of the leaves that are arrays (all of them when ``strict``)."""
    indices, table = _aval(la.indices, "indices", strict), _aval(la.table, "table", strict)
    if indices is None or table is None:
        return
    if indices[1] != jax.dtypes.float0:
        if indices[1] != np.uint8:
            raise ValueError(f"LUTArray indices must be uint8 (packed codes), got {indices[1]}")
        if table[1] != np.float32 and (strict or not jnp.issubdtype(table[1], jnp.floating)):
            raise ValueError(f"LUTArray table must be float32, got {table[1]}")
    per, nbytes = packing.code_group(la.bits)
    if not indices[0] or indices[0][-1] % nbytes or (la.pad and indices[0][-1] == 0):
        raise ValueError(
            f"LUTArray indices of shape {indices[0]} cannot hold {la.bits}-bit codes with pad "
            f"{la.pad}: they need at least one axis, whose length is a multiple of {nbytes} "
            f"byte(s) ({per} codes)"
        )
    shape = la.shape
    _check_table_shape(table[0], shape, 2**la.bits, "LUTArray table")
    if la.scale is None:
        return
    scale = _aval(la.scale, "scale", strict)
    if scale is None:
        return
    if len(scale[0]) != len(shape) or not all(map(_divides, scale[0], shape)):
        raise ValueError(
            f"LUTArray scale has shape {scale[0]}, which does not fit an array of shape "
            f"{shape}: it needs one entry per block, the array's rank with each size dividing "
            "its axis"
        )
    if scale[1] != jax.dtypes.float0 and (
        scale[1] != np.float32 if strict else not jnp.issubdtype(scale[1], jnp.floating)
    ):
        raise ValueError(f"LUTArray scale must be float32, got {scale[1]}")
