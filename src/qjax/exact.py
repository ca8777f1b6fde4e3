"""Exact float32 arithmetic under XLA, on every backend.

The spec's formulae are IEEE float32 operations, each rounded once to nearest even, and
qjax must give those bits wherever it runs. Two compiler habits get in the way:

* **Division.** XLA's algebraic simplifier rewrites ``x / broadcast(y)`` (and division by
  a constant) into ``x * (1 / y)``. On NVIDIA GPUs XLA also emits ``div.full.f32``, which
  is up to 2 ulp off (about a quarter of quotients differ in the last bit; openxla/xla
  issue 37181). :func:`exact_divide` gives the correctly rounded quotient on both: an
  optimization barrier stops the rewrite, and on backends other than the CPU the
  hardware quotient is corrected by exact residuals (:func:`round_quotient`).
* **Fused multiply-add.** XLA:CPU and the GPU backends contract a multiply that feeds an
  add into one FMA (one rounding instead of two). :func:`unfused` keeps a product
  rounded on its own.
* **Excess precision.** XLA on GPUs drops a cast to a narrower float that is cast back
  (``xla_allow_excess_precision``, on by default), so ``x.astype(float8).astype(float32)``
  inside one jitted function can return ``x`` unrounded. :func:`round_to_format` rounds
  with integer ops, which no pass removes; the cast after it is then exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes

__all__ = ["exact_divide", "round_quotient", "round_to_format", "round_to_scale_dtype", "unfused"]

NARROW_SCALE_DTYPES = ("bfloat16", "float16", "float8_e4m3fn")
"""The float scale dtypes narrower than float32 that :func:`round_to_scale_dtype` rounds
to (float8_e8m0fnu scales are built from exponent bits and need no rounding)."""

_SPLITTER = 4097.0
"""Veltkamp's constant 2**12 + 1: splits a float32 into two halves of 12 bits."""

_SIGN = -(2**31)
"""The sign bit of a float32's bits, as an int32 mask."""

_MAGNITUDE = 2**31 - 1
"""The other 31 bits: exponent and fraction."""

_INF_BITS = 0x7F800000
"""The bits of +inf: exponent field 255, fraction 0."""

_EXPONENT_LIMIT = 60
"""Scaled candidates are kept within ``[2**-60, 2**61)``, where every partial product of
:func:`round_quotient`'s residuals is a normal float32."""


def unfused(product: jax.Array) -> jax.Array:
    """``product`` behind a select XLA cannot see through, so it is rounded on its own.

    XLA:CPU contracts a multiply that feeds an add into one fused multiply-add (a single
    rounding; ~25% of results differ in the last bit), under jit but not op by op. Formulae
    that round twice (``scale * (q - qmin) + minval``, a moving average) put each product
    through this select; an optimization barrier does not help (it is gone by the time
    LLVM contracts). It costs nothing measurable.
    """
    return jnp.where(jnp.isnan(product), jnp.asarray(jnp.nan, product.dtype), product)


def round_to_format(v: jax.Array, mantissa_bits: int, emin: int) -> jax.Array:
    """``v`` rounded to nearest even onto a narrower float format's grid, as float32.

    Equals ``v.astype(fmt).astype(float32)`` for values within the format's finite range,
    with integer ops on the float32 bits: no compiler drops them (see the module notes),
    and XLA:CPU emulates float8 / float4 casts at several times this cost. Normal values
    keep ``mantissa_bits`` bits (round half to even on the dropped ones); below
    ``2 ** emin`` the grid is uniform with step ``2 ** (emin - mantissa_bits)``. A format
    with float32's exponent range (``emin <= -126``, bfloat16) needs no subnormal branch:
    dropping bits of a float32 subnormal is its rounding. NaN stays NaN.
    """
    drop = 23 - mantissa_bits
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    half_even = (1 << (drop - 1)) - 1 + ((bits >> drop) & 1)
    out = jax.lax.bitcast_convert_type((bits + half_even) & ~((1 << drop) - 1), jnp.float32)
    if emin > -126:
        inverse_step = float(2 ** (mantissa_bits - emin))
        subnormal = jnp.round(v * inverse_step) * (1 / inverse_step)
        out = jnp.where(jnp.abs(v) < float(2**emin), subnormal, out)
    return jnp.where(jnp.isnan(v), v, out)


def round_to_scale_dtype(scale: jax.Array, scale_dtype: str) -> jax.Array:
    """``scale.astype(scale_dtype)``, rounded first so that no compiler can skip it.

    A finite scale beyond the scale dtype's largest finite value is saturated to it (65504
    for float16, 2**127 for float8_e8m0fnu), where the cast would give inf (NaN for e8m0);
    an infinite or NaN scale (a block holding inf or NaN) stays non-finite, so the block
    dequantizes to NaN as with float32 scales.
    Scales computed from float32 data reach that only in float16 (ranges past about
    8.4e6 for int8); values past the range then clamp to ``qmin`` / ``qmax``. A scale
    already in ``scale_dtype`` is returned as it is.

    >>> import jax.numpy as jnp
    >>> from qjax.exact import round_to_scale_dtype
    >>> round_to_scale_dtype(jnp.float32(1.00390625), "bfloat16")  # a tie: rounds to even
    Array(1, dtype=bfloat16)
    >>> float(round_to_scale_dtype(jnp.float32(1e6), "float16"))  # saturated, not inf
    65504.0
    """
    target = jnp.dtype(scale_dtype)
    if scale.dtype == target:
        return scale
    scale = scale.astype(jnp.float32)
    if scale_dtype != "float32":
        limit = jnp.float32(ml_dtypes.finfo(target).max)  # inf and NaN (a spoiled block) pass
        scale = jnp.where(jnp.isfinite(scale), jnp.clip(scale, -limit, limit), scale)
    if scale_dtype in NARROW_SCALE_DTYPES:
        info = ml_dtypes.finfo(target)
        scale = round_to_format(scale, int(info.nmant), int(info.minexp))
    return scale.astype(target)


def exact_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """IEEE ``num / den`` (float32, round to nearest even) under jit, on every backend.

    ``den`` is broadcast to ``num``'s shape. Both operands pass through an optimization
    barrier at full shape, so the divisor is no broadcast or constant XLA could turn into
    a reciprocal; the broadcast still fuses into the division loop after it. On the CPU
    the division instruction is IEEE; elsewhere :func:`round_quotient` corrects the
    hardware quotient. Under ``vmap`` an unbatched operand is broadcast along the batch
    axis before the barrier too (``custom_vmap``), and ``custom_jvp`` keeps the quotient
    differentiable.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from qjax.exact import exact_divide
      >>> x = jnp.float32(3163.328613)
      >>> bool(jax.jit(exact_divide)(x, x) == 1.0)
      True
    """
    return _divide(num, jnp.broadcast_to(den, jnp.shape(num)))


def round_quotient(num: jax.Array, den: jax.Array, approx: jax.Array) -> jax.Array:
    """The correctly rounded ``num / den`` from a quotient ``approx`` at most 2 ulp off.

    Each candidate ``c`` within 2 ulp of ``approx`` gets its residual ``num - c * den``,
    computed exactly: ``p = c * den`` rounded, its error ``e`` from Dekker's product of
    Veltkamp halves (12-bit halves multiply exactly), and ``num - p`` exact by Sterbenz's
    lemma. The candidate with the smallest residual is the nearest to the true quotient;
    on an exact tie the residuals are equal and the even candidate wins. Only rounded
    multiplies and adds are used, which every backend does in IEEE arithmetic; the
    products that must not become part of an FMA pass through :func:`unfused`.

    Every finite operand is covered, subnormals included: the residuals are computed on
    the operands' significands (``|num| = n * 2**a``, ``|den| = d * 2**b`` with ``n, d``
    in ``[1, 2)``) and the candidates scaled by ``2**(b - a)``, all read off and built
    from the float32 bits with integer ops, so every float in the arithmetic is normal and
    near 1 (no overflow, no underflow, nothing a flush-to-zero mode could flush). Scaling
    by a power of two multiplies every residual by the same factor, so the nearest
    candidate is the same. Candidates are the neighbours of ``approx`` in its own grid, so
    a subnormal quotient is rounded on the subnormal grid, and ``inf`` takes part as
    ``2**128``: a quotient past the overflow midpoint becomes ``inf``, as in IEEE.

    Where an operand is zero, inf or NaN (or ``approx`` is NaN) ``approx`` is returned
    unchanged: IEEE gives those quotients exactly.

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.exact import round_quotient
      >>> num, den = jnp.float32(1e-17), jnp.float32(127.5)  # the scale of amax 1e-17
      >>> one_ulp_off = jnp.nextafter(num / den, jnp.float32(1))
      >>> bool(round_quotient(num, den, one_ulp_off) == num / den)
      True
    """
    num_bits, den_bits, approx_bits = (
        jax.lax.bitcast_convert_type(v, jnp.int32) for v in (num, den, approx)
    )
    num_fraction, num_exponent = _unpack(num_bits & _MAGNITUDE)
    den_fraction, den_exponent = _unpack(den_bits & _MAGNITUDE)
    n, d = _pack(num_fraction, 0), _pack(den_fraction, 0)
    d_hi, d_lo = _split(d)

    def residual(candidate: jax.Array) -> jax.Array:
        """``|n - c * d|`` for the candidate's magnitude bits, scaled by ``2**(b - a)``."""
        fraction, exponent = _unpack(candidate)
        scaled_exponent = jnp.clip(
            exponent + den_exponent - num_exponent, -_EXPONENT_LIMIT, _EXPONENT_LIMIT
        )
        c = jnp.where(candidate == 0, jnp.float32(0), _pack(fraction, scaled_exponent))
        product = unfused(c * d)
        c_hi, c_lo = _split(c)
        error = ((c_hi * d_hi - product) + c_hi * d_lo + c_lo * d_hi) + c_lo * d_lo
        return jnp.abs((n - product) - error)

    magnitude = approx_bits & _MAGNITUDE
    best, best_residual = magnitude, residual(magnitude)
    for step in (-2, -1, 1, 2):
        candidate = magnitude + step
        r = residual(candidate)
        even = (candidate & 1) == 0
        valid = (candidate >= 0) & (candidate <= _INF_BITS)
        better = valid & ((r < best_residual) | ((r == best_residual) & even))
        best = jnp.where(better, candidate, best)
        best_residual = jnp.where(better, r, best_residual)
    # The quotient's exponent, exact: n / d lies in [1, 2) when n >= d, else in (1/2, 1).
    exponent = num_exponent - den_exponent - (n < d).astype(jnp.int32)
    best = jnp.where(exponent >= 128, _INF_BITS, best)  # at least 2**128: overflow
    best = jnp.where(exponent < -150, 0, best)  # below 2**-150: rounds to zero
    sign = (num_bits ^ den_bits) & _SIGN
    rounded = jax.lax.bitcast_convert_type(best | sign, jnp.float32)
    special = (
        _zero_or_non_finite(num_bits)
        | _zero_or_non_finite(den_bits)
        | (magnitude > _INF_BITS)  # approx is NaN
    )
    return jnp.where(special, approx, rounded)


def _unpack(magnitude: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fraction bits and exponent of a float32 from its magnitude bits (sign cleared).

    The value is ``(1 + fraction * 2**-23) * 2**exponent``: a subnormal is normalized with
    a count of leading zeros, integer ops only. Infinity reads as ``2**128``; zero gives an
    exponent below -149 and must be handled by the caller.
    """
    field = magnitude >> 23
    fraction = magnitude & 0x7FFFFF
    shift = jnp.where(field == 0, jax.lax.clz(fraction) - 8, 0)
    exponent = jnp.where(field == 0, -126 - shift, field - 127)
    return (fraction << shift) & 0x7FFFFF, exponent


def _pack(fraction: jax.Array, exponent: jax.Array | int) -> jax.Array:
    """``(1 + fraction * 2**-23) * 2**exponent`` for exponents of normal floats, from bits."""
    return jax.lax.bitcast_convert_type(((exponent + 127) << 23) | fraction, jnp.float32)


def _zero_or_non_finite(bits: jax.Array) -> jax.Array:
    magnitude = bits & _MAGNITUDE
    return (magnitude == 0) | (magnitude >= _INF_BITS)


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Veltkamp's split: ``x == hi + lo`` exactly, each with at most 12 significant bits."""
    scaled = unfused(jnp.float32(_SPLITTER) * x)
    hi = scaled - (scaled - x)
    return hi, x - hi


def _hardware_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    return num / den


def _corrected_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    return round_quotient(num, den, num / den)


@jax.custom_batching.custom_vmap
def _barrier_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    num, den = jax.lax.optimization_barrier((num, den))
    return jax.lax.platform_dependent(num, den, cpu=_hardware_divide, default=_corrected_divide)


@_barrier_divide.def_vmap
def _barrier_divide_vmap(axis_size, in_batched, num, den):
    num, den = (
        x if batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))
        for x, batched in zip((num, den), in_batched)
    )
    return _barrier_divide(num, den), True


@jax.custom_jvp
def _divide(num: jax.Array, den: jax.Array) -> jax.Array:
    return _barrier_divide(num, den)


@_divide.defjvp
def _divide_jvp(primals, tangents):
    num, den = primals
    d_num, d_den = tangents
    quotient = _divide(num, den)
    return quotient, (d_num - quotient * d_den) / den
