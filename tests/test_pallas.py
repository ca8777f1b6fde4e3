"""qjax.kernels.pallas: the Pallas kernels in interpret mode on CPU, and their Triton lowering.

References are independent of the kernels: nibbles unpacked by hand in NumPy (low nibble
first, two's complement), products in float64 (weight-only) or int64 (integer codes). The
integer kernel must equal the XLA integer path bit for bit.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax import kernels
from qjax.kernels import pallas

ACT = qjax.QuantSpec("int8", granularity=qjax.per_token())
INT4_BLOCK = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32))
INT4_CHANNEL = qjax.QuantSpec("int4", granularity=qjax.per_channel(-1))
MXFP4 = qjax.QuantSpec("mxfp4", granularity=qjax.per_block(-2, 32))
FLOAT8_CHANNEL = qjax.QuantSpec("float8_e4m3fn", granularity=qjax.per_channel(-1))
INT8_CHANNEL = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
SHAPES = ((1, 64, 64), (8, 256, 128), (24, 256, 64))  # (rows of x, in, out)
BLOCKS = {"block_n": 32, "block_k": 32}


def _weight(spec: qjax.QuantSpec, k: int, n: int, seed: int = 0) -> qjax.QArray:
    w = jax.random.normal(jax.random.key(seed), (k, n)) / np.sqrt(k)
    return qjax.quantize(w, spec)


def _abstract(spec: qjax.QuantSpec, k: int, n: int) -> qjax.QArray:
    """A weight with abstract leaves: the checks read shapes and specs only."""
    return jax.eval_shape(lambda: qjax.quantize(jnp.ones((k, n)), spec))


def _x(shape: tuple[int, ...], seed: int = 1, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _codes(w: qjax.QArray) -> np.ndarray:
    """int64 codes from the stored bytes: two nibbles per byte, the first the low one."""
    data = np.asarray(w.data).astype(np.int64)
    if not w.packed:
        return data
    nibbles = np.stack([data & 15, data >> 4], axis=-1).reshape(data.shape[0], -1)
    return np.where(nibbles >= 8, nibbles - 16, nibbles)


def _scales(w: qjax.QArray) -> np.ndarray:
    """float64 scales, one per weight element."""
    scale = np.asarray(w.scale, np.float64)
    return np.repeat(scale, w.shape[0] // scale.shape[0], axis=0)


def _close(y: jax.Array, ref: np.ndarray, x: np.ndarray, w: np.ndarray, rtol: float) -> None:
    """Within ``rtol`` of the sum of magnitudes each output adds up."""
    bound = rtol * (np.abs(x) @ np.abs(w)) + 1e-30
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= bound), f"max error / bound {np.max(err / bound):.3g}"


@pytest.mark.parametrize(
    ("spec", "shape"),
    [(INT4_BLOCK, shape) for shape in SHAPES] + [(INT4_CHANNEL, SHAPES[-1])],
    ids=lambda v: str(v.granularity) if isinstance(v, qjax.QuantSpec) else str(v),
)
def test_int4_matches_dequantize_and_float64_reference(spec, shape):
    m, k, n = shape
    w, x = _weight(spec, k, n), _x((m, k))
    y = pallas.int4_matmul(x, w, **BLOCKS)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    ref_w = _codes(w) * _scales(w)
    x64 = np.asarray(x, np.float64)
    _close(y, x64 @ ref_w, x64, ref_w, rtol=1e-6)
    xla = np.asarray(x @ w.dequantize(), np.float64)
    _close(y, xla, x64, ref_w, rtol=2e-6)  # float32 sums in another order


def test_mxfp4_matches_float64_reference():
    w, x = _weight(MXFP4, 64, 64), _x((5, 64))
    codes = np.asarray(w.data)
    nibbles = np.stack([codes & 15, codes >> 4], axis=-1).reshape(64, 64).astype(np.uint8)
    values = nibbles.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    exponents = np.asarray(w.scale).view(np.uint8).astype(np.int64) - 127
    ref_w = values * np.repeat(np.ldexp(1.0, exponents), 32, axis=0)
    x64 = np.asarray(x, np.float64)
    _close(pallas.int4_matmul(x, w, block_n=32), x64 @ ref_w, x64, ref_w, rtol=1e-6)


def test_int4_split_k_and_bfloat16_input():
    w, x = _weight(INT4_BLOCK, 256, 64), _x((3, 256))
    ref_w = _codes(w) * _scales(w)
    x64 = np.asarray(x, np.float64)
    _close(pallas.int4_matmul(x, w, split_k=4, **BLOCKS), x64 @ ref_w, x64, ref_w, rtol=1e-6)
    xb = x.astype(jnp.bfloat16)
    y = pallas.int4_matmul(xb, w, **BLOCKS)
    assert y.dtype == jnp.bfloat16
    # Each weight rounded to bfloat16 in the tile, the result rounded to bfloat16 once.
    xb64 = np.asarray(xb.astype(jnp.float32), np.float64)
    _close(y, xb64 @ ref_w, xb64, ref_w, rtol=2**-7)


@pytest.mark.parametrize(
    ("spec", "shape"),
    [(INT8_CHANNEL, shape) for shape in SHAPES]
    + [(INT4_CHANNEL, SHAPES[1]), (qjax.QuantSpec("int8"), SHAPES[0])],
    ids=lambda v: f"{v.dtype}-{v.granularity.kind}" if isinstance(v, qjax.QuantSpec) else str(v),
)
def test_int8_equals_xla_integer_path_exactly(spec, shape):
    m, k, n = shape
    w, x = _weight(spec, k, n), _x((m, k))
    y = pallas.int8_matmul(x, w, block_m=16, **BLOCKS)
    xla = kernels.matmul(x, w, activation=ACT, path="int8_dot")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))
    # Independently: the int64 product of the codes, rescaled in float64.
    xq = qjax.quantize(x, ACT)
    sums = np.asarray(xq.values, np.int64) @ _codes(w)
    ref = sums * np.asarray(xq.scale, np.float64) * np.asarray(w.scale, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-6, atol=1e-30)


def test_float8_matches_float64_reference():
    w, x = _weight(FLOAT8_CHANNEL, 64, 64), _x((19, 64))
    y = pallas.float8_matmul(x, w, block_m=16, **BLOCKS)
    xq = qjax.quantize(x, pallas.FLOAT8_ACTIVATION)
    x64 = np.asarray(xq.data).astype(np.float64) * np.asarray(xq.scale, np.float64)
    w64 = np.asarray(w.data).astype(np.float64) * np.asarray(w.scale, np.float64)
    # Products of float8 codes are exact in float32; only the sums and the rescale round.
    _close(y, x64 @ w64, x64, w64, rtol=1e-6)


def test_int8_takes_a_quantized_activation():
    w, x = _weight(INT8_CHANNEL, 64, 64), _x((5, 64))
    xq = qjax.quantize(x, ACT, packed=False)
    y = pallas.int8_matmul(xq, w, block_m=16, **BLOCKS)
    xla = kernels.matmul(xq, w, path="int8_dot")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))


def test_odd_rows_batch_axes_jit_vmap_and_default_interpret():
    w = _weight(INT4_BLOCK, 64, 64)
    x = _x((2, 3, 64))  # 6 rows, padded to one block of 16
    ref = np.asarray(x @ w.dequantize())
    jitted = jax.jit(lambda x, w: pallas.int4_matmul(x, w, interpret=True, **BLOCKS))(x, w)
    assert jitted.shape == (2, 3, 64)
    np.testing.assert_allclose(np.asarray(jitted), ref, rtol=1e-5, atol=1e-6)
    mapped = jax.vmap(lambda x: pallas.int4_matmul(x, w, **BLOCKS))(x)
    np.testing.assert_allclose(np.asarray(mapped), ref, rtol=1e-5, atol=1e-6)
    w8 = _weight(INT8_CHANNEL, 64, 64)
    y8 = jax.jit(lambda x, w: pallas.int8_matmul(x, w, **BLOCKS))(x, w8)
    xla = kernels.matmul(x, w8, activation=ACT, path="int8_dot")
    np.testing.assert_array_equal(np.asarray(y8), np.asarray(xla))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: pallas.int4_matmul(_x((2, 64)), _x((64, 64))), "w must be a qjax.QArray"),
        (
            lambda: pallas.int4_matmul(jnp.ones((2, 64), jnp.int32), _abstract(INT4_BLOCK, 64, 64)),
            "x must be a floating-point array",
        ),
        (
            lambda: pallas.int4_matmul(_x((2, 64)), _abstract(INT8_CHANNEL, 64, 64)),
            "of int4 or float4",
        ),
        (
            lambda: pallas.int4_matmul(
                _x((2, 64)), _abstract(qjax.QuantSpec("uint4", scheme="asymmetric"), 64, 64)
            ),
            "formulation 'scale'",
        ),
        (lambda: pallas.int4_matmul(_x((2, 64)), _abstract(INT4_CHANNEL, 64, 63)), "pad=1"),
        (
            lambda: pallas.int4_matmul(_x((2, 32)), _abstract(INT4_BLOCK, 64, 64)),
            r"x's last axis \(32",
        ),
        (
            lambda: pallas.int4_matmul(_x((2, 64)), _abstract(INT4_CHANNEL, 64, 48)),
            r"out \(48, w.shape \(64, 48\)\) must be a multiple of block_n \(64\)",
        ),
        (
            lambda: pallas.int4_matmul(_x((2, 64)), _abstract(INT4_CHANNEL, 64, 64), block_k=24),
            "block_k must be a power of two",
        ),
        (
            lambda: pallas.int4_matmul(_x((2, 64)), _abstract(INT4_CHANNEL, 64, 64), block_m=8),
            "block_m must be a power of two of at least 16",
        ),
        (
            lambda: pallas.int4_matmul(_x((2, 96)), _abstract(INT4_CHANNEL, 96, 64), block_k=64),
            r"in \(96, w.shape \(96, 64\)\) must be a multiple of block_k \(64\)",
        ),
        (
            lambda: pallas.int4_matmul(
                _x((2, 64)), _abstract(INT4_CHANNEL, 64, 64), block_k=32, split_k=3
            ),
            r"split_k \(3\) must divide",
        ),
        (
            lambda: pallas.int4_matmul(
                _x((2, 64)), _abstract(qjax.QuantSpec("int4", granularity=(32, 2)), 64, 64)
            ),
            "one scale per output column or one for all",
        ),
        (
            lambda: pallas.int4_matmul(_x((2, 64)), _abstract(qjax.QuantSpec("mxfp4"), 64, 64)),
            r"scale shape \(64, 2\); quantize with granularity per_tensor\(\)",
        ),
        (
            lambda: pallas.float8_matmul(_x((2, 64)), _abstract(INT8_CHANNEL, 64, 64)),
            "float8_matmul: w must be a 2-D QArray .* of float8_e4m3fn with",
        ),
        (
            lambda: pallas.int8_matmul(_x((2, 64)), _abstract(MXFP4, 64, 64)),
            "of int8 or int4 with",
        ),
        (
            lambda: pallas.int8_matmul(_x((2, 64)), _abstract(INT4_BLOCK, 64, 64)),
            "must be per_channel\\(-1\\) or per tensor",
        ),
        (
            lambda: pallas.int8_matmul(
                qjax.quantize(_x((2, 64)), "int8"), _abstract(INT8_CHANNEL, 64, 64)
            ),
            "a quantized x must have spec",
        ),
        (
            lambda: pallas.int8_matmul(
                _x((2, 64)),
                dataclasses.replace(_weight(INT8_CHANNEL, 64, 64), channel_scale=jnp.ones((64, 1))),
            ),
            "channel_scale set",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_inputs_say_what_to_change(build, message):
    with pytest.raises((TypeError, ValueError), match=message):
        build()


def test_kernels_lower_to_triton():
    """The kernels lower for CUDA (on a CPU-only machine too) as Triton calls."""
    k, n = 512, 256
    w4 = _abstract(qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 128)), k, n)
    x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
    cases = (
        (pallas.int4_matmul, w4),
        (pallas.int4_matmul, _abstract(MXFP4, k, n)),
        (pallas.int8_matmul, _abstract(INT8_CHANNEL, k, n)),
        (pallas.float8_matmul, _abstract(FLOAT8_CHANNEL, k, n)),
    )
    for fn, w in cases:
        traced = jax.jit(lambda x, w, fn=fn: fn(x, w, interpret=False)).trace(x, w)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text


def test_kernels_read_packed_bytes_and_sum_in_int32():
    """The int8 kernel's dot sums int8 operands in int32; the int4 kernel's weight operand
    is the packed bytes, and no float weight of the full shape appears anywhere."""
    x = _x((3, 64))
    w8 = _weight(INT8_CHANNEL, 64, 64)
    text = str(jax.make_jaxpr(lambda x: pallas.int8_matmul(x, w8, block_m=16, **BLOCKS))(x))
    assert "pallas_call" in text
    x_tile = re.search(r"(\w+):i8\[16,32\] <-", text)  # int8 codes read in the kernel
    w_tile = re.search(r"(\w+):i8\[32,32\] <-", text)
    assert x_tile and w_tile
    dot = r"i32\[16,32\] = dot_general\[\s*dimension_numbers=[^\n]*\n\s*"
    dot += rf"preferred_element_type=int32\s*\] {x_tile[1]} {w_tile[1]}\n"
    assert re.search(dot, text)
    w4 = _weight(INT4_BLOCK, 64, 64)
    text = str(jax.make_jaxpr(lambda x: pallas.int4_matmul(x, w4, **BLOCKS))(x))
    assert "Ref<default>{u8[64,16]}" in text  # [in, block_n / 2] packed bytes per program
    assert "f32[64,64]" not in text and "bf16[64,64]" not in text


def test_two_level_scales_reach_the_product():
    # NVFP4 (e4m3 block scales times one float32 tensor scale) and float8 weights with
    # float8 scales and a tensor scale: the tensor scale multiplies every weight.
    nvfp4 = qjax.QuantSpec("nvfp4", granularity=qjax.per_block(-2, 16, channel_axis="all"))
    w, x = _weight(nvfp4, 64, 64), _x((5, 64))
    assert w.tensor_scale is not None
    ref_w = np.asarray(w.dequantize(), np.float64)
    x64 = np.asarray(x, np.float64)
    _close(pallas.int4_matmul(x, w, block_n=32, block_k=16), x64 @ ref_w, x64, ref_w, rtol=1e-6)
    spec = dataclasses.replace(FLOAT8_CHANNEL, scale_dtype="float8_e4m3fn", tensor_scale=True)
    w = _weight(spec, 64, 64)
    assert w.tensor_scale is not None
    y = pallas.float8_matmul(x, w, block_m=16, **BLOCKS)
    xq = qjax.quantize(x, pallas.FLOAT8_ACTIVATION)
    x64 = np.asarray(xq.dequantize(), np.float64)
    w64 = np.asarray(w.dequantize(), np.float64)
    _close(y, x64 @ w64, x64, w64, rtol=1e-6)


def test_float8_with_power_of_two_scales():
    spec = dataclasses.replace(FLOAT8_CHANNEL, scale_dtype="float8_e8m0fnu")
    w, x = _weight(spec, 64, 64), _x((5, 64))
    exponents = np.asarray(w.scale).view(np.uint8).astype(np.int64) - 127
    w64 = np.asarray(w.data).astype(np.float64) * np.ldexp(1.0, exponents)
    xq = qjax.quantize(x, pallas.FLOAT8_ACTIVATION)
    x64 = np.asarray(xq.data).astype(np.float64) * np.asarray(xq.scale, np.float64)
    _close(pallas.float8_matmul(x, w, block_m=16, **BLOCKS), x64 @ w64, x64, w64, rtol=1e-6)


@pytest.mark.parametrize(
    ("kernel", "spec"),
    [
        (pallas.int4_matmul, INT4_BLOCK),
        (pallas.int8_matmul, INT8_CHANNEL),
        (pallas.float8_matmul, FLOAT8_CHANNEL),
    ],
    ids=["int4", "int8", "float8"],
)
def test_no_rows_give_an_empty_product(kernel, spec):
    w = _weight(spec, 64, 64)
    for x in (jnp.zeros((0, 64)), jnp.zeros((2, 0, 64), jnp.bfloat16)):
        y = kernel(x, w, **BLOCKS)
        assert y.shape == (*x.shape[:-1], 64) and y.dtype == x.dtype


def test_int4_names_scale_blocks_it_cannot_step_through():
    w = _weight(qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 48)), 96, 64)
    with pytest.raises(ValueError, match="scale blocks hold 48 rows"):
        pallas.int4_matmul(_x((2, 96)), w, block_n=32)
