"""The spec's three formulae, applied blockwise: the only place values are mapped.

Both functions work on blockified arrays ``(n0, b0, n1, b1, ...)`` with params of shape
``(n0, 1, n1, 1, ...)``, so every granularity takes the same path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax import packing
from qjax.dtypes import TargetDType, target_dtype
from qjax.exact import exact_divide, round_to_format, unfused
from qjax.qparams import QParams
from qjax.spec import QuantSpec

__all__ = ["dequantize_blocks", "float_scale", "quantize_blocks", "saturate"]

E4M3 = target_dtype("float8_e4m3fn")


def quantize_blocks(xb: jax.Array, qp: QParams, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Maps float32 values to the target grid.

    Returns:
      ``(q, in_range)``: ``q`` holds the clamped values as float32 (whole numbers for
      integer targets; not yet cast for float targets, whose rounding is the cast), and
      ``in_range`` is True where no clamping happened (the straight-through mask).
    """
    scale = float_scale(qp)
    if spec.power_of_two_scale:
        v = times_power_of_two(xb, qp.scale, -1)
    elif spec.is_float:
        v = exact_divide(xb, scale)
    elif spec.formulation == "minval":
        v = jnp.round(_divide_offset(xb, qp.minval, scale)) + spec.qmin
    else:
        v = jnp.round(exact_divide(xb, scale))
        if spec.formulation == "zero_point":
            v = v + qp.zero_point.astype(jnp.float32)
    in_range = (v >= spec.qmin) & (v <= spec.qmax)
    return jnp.clip(v, spec.qmin, spec.qmax), in_range


def _divide_offset(x: jax.Array, minval: jax.Array, scale: jax.Array) -> jax.Array:
    """``(x - minval) / scale``, correctly rounded also where ``x - minval`` overflows.

    The difference overflows only for ranges wider than float32's (``x`` near 3e38,
    ``minval`` near -3e38). There both sides are halved, exactly:
    ``round(x/2 - minval/2) / (scale/2)`` equals the formula with an unbounded exponent.
    Everywhere else the plain difference is used, so ordinary inputs keep their bits.
    """
    difference = x - minval
    wide = jnp.isinf(difference)
    halved = x * 0.5 - minval * 0.5
    return exact_divide(jnp.where(wide, halved, difference), jnp.where(wide, scale * 0.5, scale))


def times_power_of_two(
    v: jax.Array, scale: jax.Array, sign: int, *, once_per_block: bool = True
) -> jax.Array:
    """``v * scale ** sign`` for float8_e8m0fnu scales, exact, in float32.

    The exponent comes from the scale's bits and is applied in two halves, so no factor
    is a float32 subnormal (2**-127 is one, and XLA:CPU flushes subnormals to zero) and
    none overflows. Each factor is built from its bits: a few integer ops, where
    ``ldexp`` costs dozens that XLA:CPU would redo for every element. Multiplying by an
    exact power of two equals dividing by its inverse. A NaN scale (bits 255) gives NaN.

    ``once_per_block=True`` (the default) takes the factors from
    :func:`power_of_two_factors`, computed once per block instead of in the loop over the
    values; Pallas kernels, which cannot lower its division, pass False and build the
    factors inline.
    """
    if once_per_block:
        low, high = power_of_two_factors(scale, sign)
    else:
        low, high = _factor_bits(scale, sign)
    return jnp.where(jnp.isnan(low), jnp.float32(jnp.nan), v * low * high)


def power_of_two_factors(scale: jax.Array, sign: int) -> tuple[jax.Array, jax.Array]:
    """The two float32 factors whose product is ``scale ** sign``, shaped like ``scale``.

    Each lies in ``[2**-64, 2**64]``; the first is NaN for a NaN scale (bits 255). Each
    comes out of a division of 1 by its inverse, exact for powers of two
    (:func:`qjax.exact.exact_divide`): XLA never copies a division into the fusions
    that read its result, so the factors, and the block scales they come from (a
    block's amax, its exponent bits), are computed once per block. Built inline, XLA:CPU
    recomputes them for every value of the block, in every loop that reads them (the
    fake-quantized forward and, in training, the straight-through mask of the backward
    pass), which made mxfp4's fake-quant several times slower than a copy.
    """
    low, high = _factor_bits(scale, -sign)
    return exact_divide(jnp.ones_like(low), low), exact_divide(jnp.ones_like(high), high)


def _factor_bits(scale: jax.Array, sign: int) -> tuple[jax.Array, jax.Array]:
    """``scale ** sign`` as two float32 powers of two built from the scale's bits, the
    first NaN for a NaN scale (bits 255)."""
    biased = jax.lax.bitcast_convert_type(scale, jnp.uint8).astype(jnp.int32)
    exponent = sign * (biased - 127)
    half = exponent >> 1  # floor(exponent / 2); both halves lie in [-64, 64]
    low = jnp.where(biased == 255, jnp.float32(jnp.nan), _power_of_two(half))
    return low, _power_of_two(exponent - half)


def _power_of_two(exponent: jax.Array) -> jax.Array:
    """``2.0 ** exponent`` for int32 exponents in the normal float32 range [-126, 127]."""
    return jax.lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def dequantize_stored(
    q: jax.Array, qp: QParams, spec: QuantSpec, dtype: jax.typing.DTypeLike = jnp.float32
) -> jax.Array:
    """Dequantizes clamped values from :func:`quantize_blocks` through the stored type.

    Casting first gives exactly what ``dequantize(quantize(x))`` gives: float targets are
    rounded by their cast, and an integer 0 never carries the sign of ``round(-0.0)``.
    The result is in ``dtype``, saturated as in :func:`dequantize_blocks`. e8m0 scales
    are applied through factors computed once per block, as in :func:`quantize_blocks`.
    """
    stored = round_to_float_grid(q, spec.target) if spec.is_float else q.astype(jnp.int32)
    return dequantize_blocks(stored, qp, spec, dtype)


def round_to_float_grid(v: jax.Array, target: TargetDType) -> jax.Array:
    """``v.astype(target).astype(float32)`` for float32 values within ``[-fmax, fmax]``.

    See :func:`qjax.exact.round_to_format`; equal to the cast bit for bit (tested
    exhaustively against ml_dtypes); NaN stays NaN.
    """
    return round_to_format(v, target.mantissa_bits, target.emin)


def dequantize_blocks(
    q: jax.Array,
    qp: QParams,
    spec: QuantSpec,
    dtype: jax.typing.DTypeLike = jnp.float32,
    *,
    once_per_block: bool = True,
) -> jax.Array:
    """Maps quantized values (any real dtype) back to floats, computed in float32.

    The result is in ``dtype`` (the dtype that was quantized), saturated to its finite
    range: a finite input never dequantizes to inf. Symmetric integer specs map ``-amax``
    to ``qmin``, one step past ``amax`` (``-128 / 127.5 * amax`` for int8), which
    overflows for ``amax`` near the dtype's largest value (65504 in float16); that code
    dequantizes to ``-finfo(dtype).max`` instead. The codes are unchanged. NaN stays NaN.
    ``once_per_block`` (default True; False in Pallas kernels) computes the scales'
    factors once per block, as :func:`times_power_of_two` and :func:`float_scale` describe.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> x = jnp.array([-65504.0, 65504.0], jnp.float16)
      >>> qa = qjax.quantize(x, qjax.QuantSpec("int8"))
      >>> qa.values, qjax.dequantize(qa).tolist()  # -128 * 65504 / 127.5 is -inf in float16
      (Array([-128,  127], dtype=int8), [-65504.0, 65248.0])
    """
    q = q.astype(jnp.float32)
    if spec.power_of_two_scale:
        y = times_power_of_two(q, qp.scale, 1, once_per_block=once_per_block)
    elif spec.formulation == "zero_point":
        y = qp.scale.astype(jnp.float32) * (q - qp.zero_point.astype(jnp.float32))
    elif spec.formulation == "minval":
        y = _scale_plus_minval(q - spec.qmin, qp.scale.astype(jnp.float32), qp.minval)
    else:
        y = float_scale(qp, once_per_block=once_per_block) * q
    return saturate(y, dtype).astype(dtype)


def float_scale(qp: QParams, *, once_per_block: bool = True) -> jax.Array:
    """The step of each block in float32: ``scale``, or ``tensor_scale * scale`` (NVFP4's
    two levels, one rounding: torchao's ``per_tensor_scale * scale_e4m3``).

    ``once_per_block=True`` (the default) computes a float8_e4m3fn scale's step once per
    block, not in the loop over the values: it comes out of an exact division by 1
    (:func:`qjax.exact.exact_divide`, subnormals kept), and XLA never copies a division
    into the fusions that read it (see :func:`power_of_two_factors`). Pallas kernels,
    which cannot lower that division, pass False.
    """
    if qp.scale.dtype != jnp.float8_e4m3fn:
        return qp.scale.astype(jnp.float32)
    # Read off the bits: XLA:CPU's emulated float8 convert costs several times as much.
    scale = packing.float_values(
        jax.lax.bitcast_convert_type(qp.scale, jnp.uint8).astype(jnp.int32), E4M3
    )
    step = scale if qp.tensor_scale is None else qp.tensor_scale * scale
    return exact_divide(step, jnp.ones_like(step)) if once_per_block else step


def _scale_plus_minval(steps: jax.Array, scale: jax.Array, minval: jax.Array) -> jax.Array:
    """``scale * steps + minval`` with two roundings, finite where the result is.

    On ranges wider than float32's the product can overflow although the sum does not;
    there half of each term is summed and the sum doubled. Halving and doubling normal
    floats is exact, so this is the formula with an unbounded exponent. Elsewhere the
    plain formula is used, bit for bit.
    """
    y = unfused(scale * steps) + minval
    halved = unfused(scale * (steps * 0.5)) + minval * 0.5
    return jnp.where(jnp.isinf(y), halved * 2, y)


def saturate(y: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
    """Float32 ``y`` clipped to ``dtype``'s finite range (float32's, for wider dtypes).

    Only values that overflowed (inf) or lie beyond ``dtype``'s largest finite value
    change; NaN stays NaN.
    """
    limit = min(float(ml_dtypes.finfo(jnp.dtype(dtype)).max), float(np.finfo(np.float32).max))
    return jnp.clip(y, jnp.float32(-limit), jnp.float32(limit))
