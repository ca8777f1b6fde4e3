"""The spec's three formulae, applied blockwise: the only place values are mapped.

Both functions work on blockified arrays ``(n0, b0, n1, b1, ...)`` with params of shape
``(n0, 1, n1, 1, ...)``, so every granularity takes the same path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.qparams import QParams, exact_divide
from qjax.spec import QuantSpec

__all__ = ["dequantize_blocks", "quantize_blocks"]


def quantize_blocks(xb: jax.Array, qp: QParams, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Maps float32 values to the target grid.

    Returns:
      ``(q, in_range)``: ``q`` holds the clamped values as float32 (whole numbers for
      integer targets; not yet cast for float targets, whose rounding is the cast), and
      ``in_range`` is True where no clamping happened (the straight-through mask).
    """
    scale = qp.scale.astype(jnp.float32)
    if spec.power_of_two_scale:
        v = xb * reciprocal_power_of_two(qp.scale)
    elif spec.is_float:
        v = exact_divide(xb, scale)
    elif spec.formulation == "minval":
        v = jnp.round(exact_divide(xb - qp.minval, scale)) + spec.qmin
    else:
        v = jnp.round(exact_divide(xb, scale))
        if spec.formulation == "zero_point":
            v = v + qp.zero_point.astype(jnp.float32)
    in_range = (v >= spec.qmin) & (v <= spec.qmax)
    return jnp.clip(v, spec.qmin, spec.qmax), in_range


def reciprocal_power_of_two(scale: jax.Array) -> jax.Array:
    """``1 / scale`` for float8_e8m0fnu scales, exact, as float32.

    Multiplying by an exact power of two equals dividing by its inverse. Computing the
    reciprocal from the exponent bits also survives the smallest scale, 2**-127: that is
    a float32 subnormal, which XLA:CPU flushes to zero (``x / 0`` would give inf or NaN).
    """
    biased = jax.lax.bitcast_convert_type(scale, jnp.uint8).astype(jnp.int32)
    reciprocal = jnp.ldexp(jnp.float32(1.0), 127 - biased)
    return jnp.where(biased == 255, jnp.float32(jnp.nan), reciprocal)


def dequantize_blocks(q: jax.Array, qp: QParams, spec: QuantSpec) -> jax.Array:
    """Maps quantized values (any real dtype) back to float32."""
    scale = qp.scale.astype(jnp.float32)
    q = q.astype(jnp.float32)
    if spec.formulation == "zero_point":
        return scale * (q - qp.zero_point.astype(jnp.float32))
    if spec.formulation == "minval":
        steps = scale * (q - spec.qmin)
        # The formula rounds twice. XLA:CPU contracts a multiply feeding an add into one
        # fused multiply-add (one rounding, ~25% of results differ in the last bit); a
        # select it cannot see through keeps the two apart at no measurable cost.
        steps = jnp.where(jnp.isnan(steps), jnp.nan, steps)
        return steps + qp.minval
    return scale * q
