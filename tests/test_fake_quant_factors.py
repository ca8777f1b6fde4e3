"""Scales applied through factors computed once per block (the XLA paths) equal the
inline ones (Pallas kernels) bit for bit: e8m0 scales against NumPy's
``v * 2.0 ** exponent``, float8_e4m3fn steps (NVFP4's ``tensor_scale * scale``) against
NumPy's float32 product.

The once-per-block factors come out of a division, which XLA:CPU does not copy into the
loop over the values: the compiled mxfp4 fake-quant keeps the scale arithmetic out of its
loop over the values.
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax.affine import float_scale, times_power_of_two
from qjax.qparams import QParams

TINY = float(np.finfo(np.float32).tiny)


def _values() -> np.ndarray:
    """Zeros, ones, fp4 grid points, the edges of float32, inf, NaN and random values."""
    rng = np.random.default_rng(0)
    f32 = np.finfo(np.float32)
    special = [0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 6.0, -6.0, f32.tiny, f32.max, -f32.max]
    special += [float(f32.smallest_subnormal), np.inf, -np.inf, np.nan]
    mantissa = rng.uniform(1.0, 2.0, 48) * rng.choice([-1.0, 1.0], 48)
    spread = np.ldexp(mantissa, rng.integers(-140, 128, 48))
    return np.concatenate([special, spread]).astype(np.float32)


@pytest.mark.parametrize("sign", [-1, 1])
def test_once_per_block_factors_equal_inline_ones_and_numpy_for_every_scale(sign):
    scale_bits = np.arange(256, dtype=np.uint8)  # every e8m0 scale, 255 = NaN
    scales = jax.lax.bitcast_convert_type(jnp.asarray(scale_bits), jnp.float8_e8m0fnu)
    v = _values()
    apply = jax.jit(
        lambda v, s, once: times_power_of_two(v[None, :], s[:, None], sign, once_per_block=once),
        static_argnums=2,
    )
    once, inline = np.asarray(apply(v, scales, True)), np.asarray(apply(v, scales, False))
    np.testing.assert_array_equal(once.view(np.uint32), inline.view(np.uint32))

    exponent = sign * (scale_bits.astype(np.int64) - 127)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = (v[None, :].astype(np.float64) * np.ldexp(1.0, exponent)[:, None]).astype(
            np.float32
        )
    expected[scale_bits == 255, :] = np.nan
    # Both halves are normal floats, so only results (or intermediates) below float32's
    # normal range can be flushed to zero on CPUs; compare everywhere else.
    normal = np.isnan(expected) | (np.abs(expected) >= TINY) | (v[None, :] == 0)
    normal &= np.abs(v[None, :]) >= TINY
    np.testing.assert_array_equal(once[normal], expected[normal])


@pytest.mark.parametrize("tensor_scale", [None, 1.0, 3.0e-5, 2.0**-120, 2.0**-126])
def test_once_per_block_e4m3_steps_equal_inline_ones_and_numpy(tensor_scale):
    bits = np.arange(256, dtype=np.uint8)  # every float8_e4m3fn scale, NaN included
    scale = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.float8_e4m3fn)
    ts = None if tensor_scale is None else jnp.full((1,), tensor_scale, jnp.float32)
    step = jax.jit(
        lambda s, t, once: float_scale(QParams(s, None, None, t), once_per_block=once),
        static_argnums=2,
    )
    once, inline = np.asarray(step(scale, ts, True)), np.asarray(step(scale, ts, False))
    np.testing.assert_array_equal(once.view(np.uint32), inline.view(np.uint32))
    values = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    expected = values if tensor_scale is None else np.float32(tensor_scale) * values
    normal = np.isnan(expected) | (np.abs(expected) >= TINY) | (expected == 0)
    np.testing.assert_array_equal(once[normal], expected[normal])


def test_mxfp4_fake_quant_equals_numpy_blockwise():
    """mxfp4 (e2m1 values, e8m0 scale per 32 along the last axis) against plain NumPy."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 64)) * np.ldexp(1.0, rng.integers(-20, 20, (4, 1)))).astype(
        np.float32
    )
    blocks = x.reshape(4, 2, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    exponent = np.clip(np.floor(np.log2(amax)) - 2, -127, 127)  # e2m1's emax is 2
    scaled = np.clip(blocks / np.ldexp(1.0, exponent.astype(int)), -6.0, 6.0)
    grid = scaled.astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
    expected = (grid * np.ldexp(1.0, exponent.astype(int))).astype(np.float32).reshape(4, 64)
    got = np.asarray(jax.jit(lambda x: qjax.fake_quant(x, "mxfp4"))(x))
    np.testing.assert_array_equal(got, expected)


def test_mxfp4_fake_quant_loop_over_the_values_has_no_scale_arithmetic():
    """The fusion writing the full-size result reads the factors; the integer ops that
    build them from the block's amax (shifts, clamps) run in the per-block fusions."""
    x = jnp.zeros((64, 256), jnp.float32)
    hlo = jax.jit(lambda x: qjax.fake_quant(x, "mxfp4")).lower(x).compile().as_text()
    computations = dict(re.findall(r"\n(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
    full = [
        body
        for name, body in computations.items()
        if "fused" in name and re.search(r"ROOT [^\n]*= f32\[64,256\]", body)
    ]
    assert len(full) == 1, f"expected one loop over the values, found {len(full)}"
    per_block = re.findall(r"s32\[64,8,1\][^\n]*(shift-right|clamp)", full[0])
    assert not per_block, f"scale arithmetic in the loop over the values: {per_block}"
