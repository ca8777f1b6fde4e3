"""Exact division: the correctly rounded float32 quotient on every backend.

NumPy's float32 division is IEEE (round to nearest even) and is the reference. On the
CPU, qjax uses the division instruction behind a barrier; on GPUs the hardware quotient
(``div.full.f32``, up to 2 ulp off) is corrected by :func:`qjax.exact.round_quotient`.
That correction is tested here on the CPU by feeding it quotients moved up to 2 ulp off
on purpose, under jit, where XLA:CPU contracts multiplies and adds into FMAs as a GPU
compiler would.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qjax import exact


def _operands(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with random signs, 24-bit mantissas and magnitudes across 2**-28..2**28
    (quotients in the safe range), plus quotients near 1 (num and den close) and x / x."""
    rng = np.random.default_rng(seed)

    def draw(size: int) -> np.ndarray:
        mantissa = rng.uniform(1.0, 2.0, size).astype(np.float32)
        exponent = rng.integers(-28, 29, size)
        sign = rng.choice(np.array([-1.0, 1.0], np.float32), size)
        return (sign * np.ldexp(mantissa, exponent)).astype(np.float32)

    num, den = draw(n), draw(n)
    near = n // 4
    den[:near] = (num[:near] * rng.uniform(0.999, 1.001, near)).astype(np.float32)
    num[near : 2 * near] = den[near : 2 * near]  # x / x == 1
    return num, den


def _ulp_steps(x: np.ndarray, steps: np.ndarray) -> np.ndarray:
    bits = x.view(np.int32) + steps.astype(np.int32)
    return bits.view(np.float32)


def test_round_quotient_recovers_ieee_from_quotients_2_ulp_off():
    num, den = _operands(400_000, seed=0)
    expected = num / den
    steps = np.random.default_rng(1).integers(-2, 3, num.shape)
    approx = _ulp_steps(expected, steps)
    got = np.asarray(jax.jit(exact.round_quotient)(num, den, approx))
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


def test_round_quotient_near_ties():
    """Quotients just above and below the midpoint between two floats."""
    rng = np.random.default_rng(2)
    den = rng.uniform(1.0, 2.0, 100_000).astype(np.float32)
    q = rng.uniform(1.0, 2.0, 100_000).astype(np.float32)
    midpoint = q.astype(np.float64) + np.spacing(q).astype(np.float64) / 2
    num = (midpoint * den).astype(np.float32)  # the nearest float32 to a tie's numerator
    expected = num / den
    approx = _ulp_steps(expected, rng.integers(-2, 3, num.shape))
    got = np.asarray(jax.jit(exact.round_quotient)(num, den, approx))
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


def test_round_quotient_keeps_the_approximation_for_zero_inf_and_nan_operands():
    """IEEE gives these quotients exactly; the approximation (here deliberately odd
    values) is returned as it is."""
    num = np.array([0.0, -0.0, np.inf, np.nan, 1.0, 1.0, 5.0, 0.0], np.float32)
    den = np.array([3.0, 3.0, 3.0, 3.0, 0.0, np.inf, np.nan, 0.0], np.float32)
    approx = np.array([0.0, -0.0, np.inf, np.nan, np.inf, 7.0, 2.0, np.nan], np.float32)
    got = np.asarray(jax.jit(exact.round_quotient)(num, den, approx))
    np.testing.assert_array_equal(got.view(np.int32), approx.view(np.int32))


def test_round_quotient_outside_the_old_safe_range():
    """Operands beyond [2**-60, 2**60], subnormals and overflowing quotients: the
    correction covers every finite operand (tests/test_hostile_numerics.py has more)."""
    num = np.array([2.0**70, 2.0**-70, 1e-17, 3e38, 1e-40, 1.0], np.float32)
    den = np.array([3.0, 3.0, 127.5, 1e-3, 3.0, 3e-39], np.float32)
    with np.errstate(over="ignore"):
        expected = num / den
    for step in (-2, -1, 1, 2):
        approx = _ulp_steps(expected, np.full(num.shape, step))
        approx = np.where(np.isinf(expected), expected, approx).astype(np.float32)
        got = np.asarray(jax.jit(exact.round_quotient)(num, den, approx))
        np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("path", ["backend", "corrected"])
def test_exact_divide_equals_numpy_under_jit(path):
    """``backend`` runs what this platform runs; ``corrected`` forces the GPU path."""
    num, den = _operands(200_000, seed=3)
    divide = exact.exact_divide if path == "backend" else exact._corrected_divide
    got = np.asarray(jax.jit(divide)(num, den))
    np.testing.assert_array_equal(got.view(np.int32), (num / den).view(np.int32))


def test_exact_divide_by_a_broadcast_constant_and_under_vmap():
    num, _ = _operands(4096, seed=4)
    num = num.reshape(64, 64)
    for divisor in (np.float32(127.5), np.float32(7.5), np.float32(448.0), np.float32(6.0)):
        expected = (num / divisor).view(np.int32)
        got = jax.jit(lambda x, d=divisor: exact.exact_divide(x, jnp.float32(d)))(num)
        np.testing.assert_array_equal(np.asarray(got).view(np.int32), expected)
    den = np.abs(num[:, :1]) + np.float32(0.5)
    got = jax.jit(jax.vmap(exact.exact_divide))(num, den)
    np.testing.assert_array_equal(np.asarray(got).view(np.int32), (num / den).view(np.int32))


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16"])
def test_round_to_scale_dtype_equals_the_cast(scale_dtype):
    """Random float32 bit patterns within the format's normal range (XLA:CPU flushes
    float32 subnormals), including every tie pattern of the dropped bits."""
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**31, 300_000, dtype=np.int64).astype(np.uint32)
    bits[:1000] = (bits[:1000] & ~np.uint32(0xFFFF)) | np.uint32(0x8000)  # bf16 ties
    bits[1000:2000] = (bits[1000:2000] & ~np.uint32(0x1FFF)) | np.uint32(0x1000)  # f16 ties
    bits |= rng.integers(0, 2, bits.size).astype(np.uint32) << np.uint32(31)  # random signs
    x = bits.view(np.float32)
    target = np.dtype(getattr(jnp, scale_dtype))
    finite_max = float(ml_dtypes.finfo(target).max)
    x = x[np.isfinite(x) & (np.abs(x) <= finite_max) & (np.abs(x) >= 2.0**-126)]
    if scale_dtype == "float16":
        x = np.clip(x, -(2.0**15), 2.0**15).astype(np.float32)  # keep below the f16 overflow
    got = jax.jit(lambda v: exact.round_to_scale_dtype(v, scale_dtype))(x)
    assert got.dtype == target
    np.testing.assert_array_equal(
        np.asarray(got).astype(np.float32), x.astype(target).astype(np.float32)
    )
