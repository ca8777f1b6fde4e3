"""Quant params: the scale and offset of each block, computed from the block's range."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax import granularity as gran
from qjax import packing
from qjax.dtypes import target_dtype
from qjax.exact import exact_divide, round_to_format, round_to_scale_dtype
from qjax.spec import QuantSpec, SpecLike, as_spec, check_shorthand_fits

__all__ = [
    "QParams",
    "block_range",
    "check_float_input",
    "check_scale_holds",
    "compute_qparams",
    "expand_qparams",
    "overflows_scale_dtype",
    "qparams_from_minmax",
]

EPS = float(np.finfo(np.float32).eps)
"""Smallest scale: an all-zero block gets this, so it dequantizes to exact zeros."""

E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
"""Exponent range of a float8_e8m0fnu scale (255 is NaN)."""

E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
"""Largest float8_e4m3fn scale (448); the cast turns values past 464 into NaN, so clamp."""

E4M3_TINY = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).tiny)
"""Smallest normal float8_e4m3fn scale (2**-6): the floor of e4m3 block scales (torchao's
``E4M3_EPS``), so an all-zero block gets a usable scale."""

TENSOR_SCALE_MIN = 2.0**-120
"""Floor of a tensor scale: every ``tensor_scale * scale`` (at least ``tensor_scale * 2**-6``)
stays a normal float32, which XLA would otherwise flush to zero and divide by. It is reached
only by tensors with ``amax < 448 * 6 * 2**-120`` (about 2e-33), the all-zero tensor
included, whose tensor scale the published formula makes 0 (and its quotients NaN)."""


class QParams(NamedTuple):
    """The quant params of every block, each with shape ``x.shape // block_shape``.

    Attributes:
      scale: the step size, in the spec's ``scale_dtype``.
      zero_point: the int32 value that float 0 maps to (integer targets; None for floats).
      minval: the float32 value that ``qmin`` maps to (integer targets; None for floats):
        ``min(min(x), 0)`` for asymmetric, ``-amax`` for symmetric schemes.
      tensor_scale: specs with ``tensor_scale=True`` (NVFP4): the float32 scale of the
        whole tensor, shape ``(1,) * x.ndim``, that ``scale`` multiplies; else None.
    """

    scale: jax.Array
    zero_point: jax.Array | None
    minval: jax.Array | None
    tensor_scale: jax.Array | None = None

    def map_blocks(self, fn: Callable[[jax.Array], jax.Array]) -> QParams:
        """``fn`` applied to the per-block fields (not to the tensor scale)."""
        return QParams(
            fn(self.scale),
            None if self.zero_point is None else fn(self.zero_point),
            None if self.minval is None else fn(self.minval),
            self.tensor_scale,
        )


def check_float_input(x: jax.typing.ArrayLike, what: str = "quantize") -> jax.Array:
    """Checks that ``x`` is a floating-point array and returns it as a jax array.

    The upcast to float32 happens inside the jitted computation, fused with its first use.

    Raises:
      TypeError: for integer, boolean or complex input.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{what} expects a floating-point array, got dtype {x.dtype}; "
            "cast it first, e.g. x.astype(jnp.float32)"
        )
    return x


def overflows_scale_dtype(scale: jax.typing.ArrayLike, scale_dtype: str) -> np.ndarray:
    """Where a concrete float32 ``scale`` rounds to inf (or NaN) when stored as ``scale_dtype``.

    The one test, in NumPy, of whether a scale dtype can hold a scale: a float16 scale
    overflows from 65520 on (float16's max is 65504). The jitted path saturates such scales
    (:func:`qjax.exact.round_to_scale_dtype`), so eager callers check with this first.
    e8m0 scales are powers of two chosen within their range and never overflow here.

    Examples:
      >>> from qjax.qparams import overflows_scale_dtype
      >>> overflows_scale_dtype([65519.0, 65520.0], "float16").tolist()
      [False, True]
    """
    scale = np.asarray(scale, np.float32)
    if scale_dtype == "float8_e8m0fnu":
        return ~np.isfinite(scale)
    with np.errstate(over="ignore", invalid="ignore"):
        return ~np.isfinite(scale.astype(jnp.dtype(scale_dtype)).astype(np.float32))


def check_scale_holds(x: jax.Array, spec: QuantSpec, what: str = "quantize") -> None:
    """Refuses a concrete ``x`` whose range a float16 scale (``scale_dtype="float16"``)
    cannot hold, naming the largest range it can.

    Only eager calls are checked: under ``jit`` the values are traced, and a scale past
    float16's max is saturated to 65504 (see :func:`qjax.exact.round_to_scale_dtype`), so
    values past the range clamp. Other scale dtypes hold every float32 range.

    Raises:
      ValueError: when some block's scale would be 65520 or more (inf in float16).

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax.qparams import check_scale_holds
      >>> check_scale_holds(jnp.array([1e7]), qjax.QuantSpec("int8", scale_dtype="float16"))
      Traceback (most recent call last):
        ...
      ValueError: quantize: x needs a scale of 78431.4, past float16's max 65504 ...
    """
    if spec.scale_dtype != "float16" or isinstance(x, jax.core.Tracer):
        return
    wide = dataclasses.replace(spec, scale_dtype="float32")
    refuse_float16_overflow(_compute_qparams(x, wide).scale, spec, what)


def refuse_float16_overflow(scale: jax.Array, spec: QuantSpec, what: str) -> None:
    """Raises ValueError if a concrete float32 ``scale`` is too large for a float16 scale."""
    scale = np.asarray(scale, np.float32)
    # An inf scale comes from an inf in x: that block is spoiled (NaN), not out of range.
    largest = float(np.max(scale, where=np.isfinite(scale), initial=0.0))
    if not overflows_scale_dtype(largest, "float16"):
        return
    if spec.scheme == "asymmetric":
        levels, held = spec.qmax - spec.qmin, "a block's range max(x, 0) - min(x, 0)"
    else:
        levels, held = (spec.qmax - spec.qmin) / 2, "|x|"
    limit = float(np.finfo(np.float16).max) * levels
    raise ValueError(
        f"{what}: x needs a scale of {largest:.6g}, past float16's max 65504 (it would be "
        f"inf); with {spec.dtype} {spec.scheme}, scale_dtype='float16' holds {held} up to "
        f"{limit:.8g} (65504 * {levels:g}); use scale_dtype='float32' or 'bfloat16', or "
        "scale x down"
    )


def block_minmax(xb: jax.Array, layout: gran.BlockLayout) -> tuple[jax.Array, jax.Array]:
    """Per-block min and max of a blocked float32 array, in the layout's kept shape.

    An empty block gives min=+inf and max=-inf, hence zero range and the eps scale.
    NaN in a block makes that block's min and max NaN and leaves other blocks alone.
    """
    inf = jnp.float32(np.inf)
    if _fused_minmax_is_fast(layout):
        lo, hi = jax.lax.reduce(
            (xb, xb),
            (inf, -inf),
            lambda a, b: (jax.lax.min(a[0], b[0]), jax.lax.max(a[1], b[1])),
            layout.axes,
        )
    else:
        lo = jax.lax.reduce(xb, inf, jax.lax.min, layout.axes)
        hi = jax.lax.reduce(xb, -inf, jax.lax.max, layout.axes)
    lo, hi = lo.reshape(layout.kept), hi.reshape(layout.kept)
    # Keep the reductions out of the elementwise pass that follows: fused together, XLA:CPU
    # re-reads the input at a fraction of memory bandwidth.
    return jax.lax.optimization_barrier((lo, hi))


def block_absmax(xb: jax.Array, layout: gran.BlockLayout) -> jax.Array:
    """Per-block ``max(|x|)`` of a blocked float32 array, in the layout's kept shape.

    An empty block gives 0 (the eps scale); NaN in a block makes its amax NaN.
    """
    amax = jax.lax.reduce(jnp.abs(xb), jnp.float32(0), jax.lax.max, layout.axes)
    return jax.lax.optimization_barrier(amax.reshape(layout.kept))


FUSED_MINMAX_MAX_MIDDLE_BLOCK = 32
"""Largest block along a middle axis for which one fused min-max pass pays off."""


def _fused_minmax_is_fast(layout: gran.BlockLayout) -> bool:
    """Whether one variadic min-max reduce beats two plain ones on XLA:CPU.

    Measured on 4096x4096 float32: the fused pass is 1.3-2x faster for blocks along the
    last axis, (n, block), and for short blocks along a middle axis, (n, block<=32, cols);
    it is 5-15x slower for longer middle blocks, columns and whole arrays.
    """
    if len(layout.axes) != 1 or layout.axes[0] == 0:
        return False
    axis = layout.axes[0]
    last = axis == len(layout.blocked) - 1
    return last or layout.blocked[axis] <= FUSED_MINMAX_MAX_MIDDLE_BLOCK


def qparams_from_minmax(min_val: jax.Array, max_val: jax.Array, spec: SpecLike) -> QParams:
    """Quant params from each block's observed range (design notes section 1).

    This is the one place the scheme formulae live; :func:`compute_qparams`, calibration
    and static activation ranges all come through here.

    Args:
      min_val: the minimum of each block (any shape).
      max_val: the maximum of each block, same shape as ``min_val``.
      spec: the quantization spec.

    Returns:
      :class:`QParams` with the shape of ``min_val``.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> qp = qjax.qparams_from_minmax(jnp.float32(-1.0), jnp.float32(3.0),
      ...                               qjax.QuantSpec("uint8", scheme="asymmetric"))
      >>> float(qp.scale), int(qp.zero_point)
      (0.01568627543747425, 64)
    """
    spec = as_spec(spec)
    min_neg = jnp.minimum(jnp.asarray(min_val, jnp.float32), 0.0)
    max_pos = jnp.maximum(jnp.asarray(max_val, jnp.float32), 0.0)
    qmin, qmax = spec.qmin, spec.qmax
    tensor_scale = None
    if spec.scheme == "asymmetric":
        # Half the range over half the levels: the same quotient (halving a float32 is exact
        # but for subnormals, whose quotients fall below EPS), and finite for ranges wider
        # than float32's, where max_pos - min_neg would overflow.
        half_range = max_pos * 0.5 - min_neg * 0.5
        scale = jnp.maximum(exact_divide(half_range, jnp.float32((qmax - qmin) / 2)), EPS)
        zero_point = qmin - jnp.round(exact_divide(min_neg, scale))
        zero_point = jnp.clip(zero_point, qmin, qmax).astype(jnp.int32)
        minval = min_neg
    else:
        amax = jnp.maximum(-min_neg, max_pos)
        if spec.power_of_two_scale:
            scale = _power_of_two_scale(amax, spec.target.emax)
        elif spec.scale_dtype == "float8_e4m3fn":
            scale, tensor_scale = _e4m3_scale(amax, spec)
        else:
            scale = jnp.maximum(exact_divide(amax, jnp.float32((qmax - qmin) / 2)), EPS)
        zero_point = (
            None if spec.is_float else jnp.full(amax.shape, spec.symmetric_zero_point, jnp.int32)
        )
        minval = -amax
    if spec.is_float:
        minval = None
    return QParams(round_to_scale_dtype(scale, spec.scale_dtype), zero_point, minval, tensor_scale)


def _e4m3_scale(amax: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    """float8_e4m3fn block scales and the float32 tensor scale (NVFP4's two levels).

    ``block = amax / fmax``; with a tensor scale ``t = max(amax(x) / (448 * fmax), 2**-120)``
    the block scale becomes ``block / t``. It is clamped to ``[2**-6, 448]`` before the
    cast to e4m3 (torchao's ``nvfp4_quantize`` and ``per_tensor_amax_to_scale``, with the
    floor of :data:`TENSOR_SCALE_MIN`). The tensor's amax is taken over the finite blocks
    and a block with NaN or inf gets a NaN scale, so such values spoil only their block.
    """
    block = exact_divide(amax, jnp.float32(spec.qmax))
    tensor_scale = None
    if spec.tensor_scale:
        finite = jnp.isfinite(amax)
        tensor_amax = jnp.max(jnp.where(finite, amax, 0.0), initial=0.0)
        tensor_scale = jnp.maximum(
            exact_divide(tensor_amax, jnp.float32(E4M3_MAX * spec.qmax)), TENSOR_SCALE_MIN
        )
        block = exact_divide(block, tensor_scale)
        tensor_scale = tensor_scale.reshape((1,) * amax.ndim)
    scale = jnp.where(jnp.isfinite(amax), jnp.clip(block, E4M3_TINY, E4M3_MAX), jnp.nan)
    # Rounded and encoded with integer ops, not XLA:CPU's emulated float8 convert: XLA
    # fuses the scales into the loop over the values and recomputes them for each value.
    e4m3 = target_dtype("float8_e4m3fn")
    codes = packing.float_codes(round_to_format(scale, e4m3.mantissa_bits, e4m3.emin), e4m3)
    return jax.lax.bitcast_convert_type(codes.astype(jnp.uint8), e4m3.storage), tensor_scale


def _power_of_two_scale(amax: jax.Array, emax: int) -> jax.Array:
    """``2 ** (floor(log2(amax)) - emax)`` as float8_e8m0fnu, exponent clamped to its range.

    ``floor(log2(amax))`` is read off amax's exponent bits (exact, and a few integer ops,
    where ``frexp`` costs dozens that XLA:CPU would redo for every element of the block).
    Zero and subnormal amax (below 2**-126) land on the smallest scale, 2**-127, as
    ``frexp`` would after the clamp; the scale is built from its bits because 2**-127 is a
    float32 subnormal that XLA:CPU flushes to zero. A NaN or inf block gets NaN (bits
    255), which spoils only that block.
    """
    bits = jax.lax.bitcast_convert_type(amax, jnp.int32)
    exponent = ((bits >> 23) & 0xFF) - 127 - emax
    biased = jnp.clip(exponent, E8M0_MIN_EXP, E8M0_MAX_EXP) - E8M0_MIN_EXP
    biased = jnp.where(jnp.isfinite(amax), biased, 255).astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(biased, jnp.float8_e8m0fnu)


def compute_qparams(x: jax.typing.ArrayLike, spec: SpecLike) -> QParams:
    """Computes the scale and offsets of every block of ``x``.

    Args:
      x: a floating-point array (bf16 / f16 are computed in float32).
      spec: the quantization spec; its granularity decides the blocks.

    Returns:
      :class:`QParams`, each field with shape ``x.shape // block_shape``.

    Raises:
      ValueError: with ``scale_dtype="float16"``, when a block's range needs a scale past
        float16's max (see :func:`check_scale_holds`; under ``jit`` it saturates instead).

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> w = jnp.array([[1.0, -2.0], [0.5, 4.0]])
      >>> qp = qjax.compute_qparams(w, qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)))
      >>> qp.scale.shape, qp.scale * 127.5  # one scale per output channel
      ((1, 2), Array([[1., 4.]], dtype=float32))
    """
    given, spec = spec, as_spec(spec)
    x = check_float_input(x, "compute_qparams")
    check_shorthand_fits(given, spec, x.shape, "compute_qparams")
    check_scale_holds(x, spec, "compute_qparams")
    return _compute_qparams(x, spec)


@functools.partial(jax.jit, static_argnames="spec")
def _compute_qparams(x: jax.Array, spec: QuantSpec) -> QParams:
    layout = gran.BlockLayout.of(x.shape, gran.block_shape(x.shape, spec.granularity))
    return blockwise_qparams(layout.blockify(x.astype(jnp.float32)), layout, spec)


def block_range(x: jax.Array, spec: SpecLike) -> tuple[jax.Array, jax.Array]:
    """Per-block (min, max) of ``x`` as float32, each of shape ``x.shape // block_shape``.

    The observation that range calibration (static activations, moving averages) feeds
    into :func:`qparams_from_minmax`.
    """
    spec = as_spec(spec)
    x = check_float_input(x, "block_range")
    layout = gran.BlockLayout.of(x.shape, gran.block_shape(x.shape, spec.granularity))
    lo, hi = block_minmax(layout.blockify(x.astype(jnp.float32)), layout)
    return layout.compact(lo), layout.compact(hi)


def blockwise_qparams(xb: jax.Array, layout: gran.BlockLayout, spec: QuantSpec) -> QParams:
    """Quant params of a blocked float32 array, in the compact ``x.shape // block`` shape.

    Symmetric schemes need only ``amax``: one max-of-abs reduction instead of a min and
    a max, with the same params (``(-amax, amax)`` has the same ``min_neg``, ``max_pos``).
    """
    if spec.scheme == "asymmetric":
        lo, hi = block_minmax(xb, layout)
    else:
        hi = block_absmax(xb, layout)
        lo = -hi
    qp = qparams_from_minmax(lo, hi, spec).map_blocks(layout.compact)
    if qp.tensor_scale is None:
        return qp
    return qp._replace(tensor_scale=qp.tensor_scale.reshape((1,) * len(layout.shape)))


def expand_qparams(qp: QParams, layout: gran.BlockLayout) -> QParams:
    """Params of shape ``layout.params`` reshaped to broadcast against the blocked array.

    A tensor scale (``(1,) * ndim``, or stacked along leading axes as ``vmap`` stacks it)
    is broadcast to one per block first, so it lines up with the blocked array too.
    """
    qp = qp.map_blocks(layout.expand)
    if qp.tensor_scale is None:
        return qp
    per_block = jnp.broadcast_to(qp.tensor_scale, layout.params)
    return qp._replace(tensor_scale=layout.expand(per_block))
