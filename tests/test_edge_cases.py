"""Edge cases: zero and constant blocks, NaN / inf, saturation, empty and 0-d arrays, storage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax

EPS = np.finfo(np.float32).eps
ALL_SPECS = [
    qjax.QuantSpec("int8"),
    qjax.QuantSpec("uint8"),
    qjax.QuantSpec("int4", scheme="asymmetric", formulation="minval"),
    qjax.QuantSpec("uint4", scheme="asymmetric"),
    qjax.QuantSpec("int2", scheme="symmetric_with_clipping", formulation="zero_point"),
    qjax.QuantSpec("float8_e4m3fn"),
    qjax.QuantSpec("float4_e2m1fn"),
    qjax.QuantSpec("mxfp4"),
]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_zero_block_gets_eps_scale_and_exact_zeros(spec):
    x = np.zeros((4, 64), np.float32)
    x[1:] = np.random.default_rng(0).standard_normal((3, 64))
    spec = qjax.QuantSpec(spec.dtype, spec.scheme, spec.formulation, (1, 32), spec.scale_dtype)
    qa = qjax.quantize(x, spec)
    out = np.asarray(qa.dequantize())
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0], np.zeros(64, np.float32))
    smallest = EPS if spec.scale_dtype == "float32" else 2.0**-127
    np.testing.assert_array_equal(np.asarray(qa.scale[0], np.float32), [smallest, smallest])
    if spec.formulation == "zero_point":
        np.testing.assert_array_equal(np.asarray(qa.codes())[0], np.asarray(qa.offset)[0, 0])


@pytest.mark.parametrize("value", [3.0, -2.5])
@pytest.mark.parametrize("spec", ALL_SPECS[:5], ids=str)
def test_constant_block_is_finite(spec, value):
    x = np.full((2, 32), value, np.float32)
    out = np.asarray(qjax.fake_quant(x, spec))
    assert np.all(np.isfinite(out))
    assert np.max(np.abs(out - value)) <= abs(value) / 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_non_finite_values_spoil_only_their_block(spec, bad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    granularity = qjax.per_block(-1, 32, channel_axis="all")
    spec = qjax.QuantSpec(spec.dtype, spec.scheme, spec.formulation, granularity, spec.scale_dtype)
    clean = np.asarray(qjax.fake_quant(x, spec))
    x_bad = x.copy()
    x_bad[2, 40] = bad
    dirty = np.asarray(qjax.fake_quant(x_bad, spec))
    untouched = np.ones_like(x, bool)
    untouched[2, 32:] = False
    np.testing.assert_array_equal(dirty[untouched], clean[untouched])
    np.testing.assert_array_equal(
        np.asarray(qjax.quantize(x_bad, spec).dequantize())[untouched], clean[untouched]
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("scale", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("target", ["int8", "float8_e4m3fn"])
def test_a_spoiled_block_is_nan_whatever_the_scale_dtype(target, scale, bad):
    # A narrow scale dtype saturated an infinite scale to its max: the block came back
    # finite (zeros and one huge value), hiding the inf that float32 scales show as NaN.
    x = np.array([[0.5, -1.0, bad, 2.0], [0.5, -1.0, 1.5, 2.0]], np.float32)
    spec = f"{target}:per_channel:axis=0:scale={scale}"
    for out in (
        qjax.dequantize(qjax.quantize(x, spec)),
        jax.jit(lambda a: qjax.dequantize(qjax.quantize(a, spec)))(x),
        jax.jit(lambda a: qjax.fake_quant(a, spec))(x),
    ):
        out = np.asarray(out)
        assert np.isnan(out[0]).all(), out[0]
        assert np.isfinite(out[1]).all()


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"])
def test_float_targets_saturate_instead_of_nan(name):
    spec = qjax.QuantSpec(name)
    fmax = float(ml_dtypes.finfo(getattr(ml_dtypes, name)).max)
    qp = qjax.QParams(jnp.float32(1.0), None, None)
    x = jnp.array([-10 * fmax, -1.5 * fmax, 1.1 * fmax, 1e30], jnp.float32)
    q = np.asarray(qjax.quantize(x, spec, qparams=qp).values.astype(jnp.float32))
    np.testing.assert_array_equal(q, [-fmax, -fmax, fmax, fmax])
    np.testing.assert_array_equal(qjax.fake_quant(x, spec, qparams=qp), [-fmax, -fmax, fmax, fmax])


def test_bfloat16_scale_rounding_never_makes_nan():
    # A bf16 scale may round down; x / scale then exceeds fmax and must saturate.
    x = np.linspace(-1000, 1000, 64, dtype=np.float32).reshape(2, 32)
    spec = qjax.QuantSpec("float8_e4m3fn", scale_dtype="bfloat16")
    assert np.all(np.isfinite(np.asarray(qjax.quantize(x, spec).values.astype(jnp.float32))))


@pytest.mark.parametrize("spec", ALL_SPECS[:7], ids=str)
def test_zero_d_arrays_quantize_per_tensor(spec):
    x = jnp.float32(-0.75)
    qa = qjax.quantize(x, spec)
    assert qa.shape == () and qa.scale.shape == () and not qa.packed
    out = qa.dequantize()
    assert out.shape == ()
    assert abs(float(out) - -0.75) <= 0.75 / 2
    assert qjax.fake_quant(x, spec).shape == ()


@pytest.mark.parametrize("spec", ALL_SPECS[:7], ids=str)
@pytest.mark.parametrize(
    ("shape", "granularity", "scale_shape"),
    [
        ((0,), qjax.per_tensor(), (1,)),
        ((0, 4), qjax.per_channel(-1), (1, 4)),
        ((4, 0), qjax.per_channel(-1), (1, 0)),
        ((0, 8), qjax.per_block(-1, 4), (0, 2)),
    ],
)
def test_empty_arrays_give_empty_values(spec, shape, granularity, scale_shape):
    spec = qjax.QuantSpec(spec.dtype, spec.scheme, spec.formulation, granularity)
    qa = qjax.quantize(jnp.zeros(shape, jnp.float32), spec)
    assert qa.shape == shape
    assert qa.scale.shape == scale_shape
    assert np.all(np.isfinite(np.asarray(qa.scale, np.float32)))
    assert qa.dequantize().shape == shape
    assert qjax.fake_quant(jnp.zeros(shape, jnp.float32), spec).shape == shape


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"])
def test_float_codes_match_the_ml_dtypes_cast(name):
    """Every value of the format (and NaN) encodes to the bits of ml_dtypes' cast."""
    from qjax.dtypes import target_dtype
    from qjax.packing import float_codes

    target = target_dtype(name)
    storage = getattr(ml_dtypes, name)
    if target.bits == 8:
        values = np.arange(256, dtype=np.uint8).view(storage).astype(np.float32)
    else:  # float4 has no NaN and 16 codes; ml_dtypes keeps one per byte
        magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
        values = np.array(magnitudes + [-m for m in magnitudes], np.float32)
    values = values[np.isfinite(values)]  # quantize clamps to [-fmax, fmax] first
    expected = values.astype(storage).view(np.uint8).astype(np.int32) & ((1 << target.bits) - 1)
    got = np.asarray(jax.jit(lambda v: float_codes(v, target))(jnp.asarray(values)))
    np.testing.assert_array_equal(got, expected)
    if target.bits == 8:
        nan_code = np.asarray(float_codes(jnp.float32(np.nan), target)).astype(np.uint8)
        assert np.isnan(nan_code.view(storage).astype(np.float32))


@pytest.mark.parametrize("name", ["int4", "uint4", "int2", "uint2", "float4_e2m1fn"])
@pytest.mark.parametrize("last", [1, 3, 4, 7, 64])
def test_packed_storage_round_trips_exactly(name, last):
    x = np.random.default_rng(2).standard_normal((3, last)).astype(np.float32)
    scheme = "asymmetric" if name.startswith("uint") else "symmetric"
    spec = qjax.QuantSpec(name, scheme=scheme, granularity=qjax.per_channel(0))
    packed = qjax.quantize(x, spec)
    plain = qjax.quantize(x, spec, packed=False)
    bits = spec.target.bits
    assert packed.packed and packed.data.dtype == jnp.uint8
    assert packed.data.shape == (3, -(-last * bits // 8))
    assert packed.shape == plain.shape == (3, last)
    np.testing.assert_array_equal(
        packed.values.astype(jnp.float32), plain.values.astype(jnp.float32)
    )
    np.testing.assert_array_equal(packed.dequantize(), plain.dequantize())
    assert packed.nbytes == packed.data.size + packed.scale.nbytes + (
        0 if packed.offset is None else packed.offset.nbytes
    )


def test_int4_packs_two_values_per_byte():
    x = jnp.ones((4096, 256), jnp.float32)
    qa = qjax.quantize(x, qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32)))
    assert qa.data.nbytes == 4096 * 256 // 2
    assert qa.nbytes == 4096 * 256 // 2 + 128 * 256 * 4


def test_qarray_is_a_pytree():
    x = jnp.linspace(-1, 1, 64, dtype=jnp.float32).reshape(8, 8)
    qa = qjax.quantize(
        x, qjax.QuantSpec("uint4", scheme="asymmetric", granularity=qjax.per_channel(-1))
    )
    leaves, treedef = jax.tree.flatten(qa)
    assert len(leaves) == 3
    rebuilt = jax.tree.unflatten(treedef, leaves)
    np.testing.assert_array_equal(rebuilt.dequantize(), qa.dequantize())
    doubled = jax.jit(lambda q: jax.tree.map(lambda a: a, q))(qa)
    np.testing.assert_array_equal(doubled.dequantize(), qa.dequantize())
    assert jax.jit(qjax.dequantize)(qa).shape == (8, 8)


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"])
def test_float_grid_rounding_matches_the_ml_dtypes_cast(name):
    from qjax.affine import round_to_float_grid

    target = qjax.target_dtype(name)
    rng = np.random.default_rng(3)
    fmax = target.qmax
    magnitudes = np.exp2(rng.uniform(-30, np.log2(fmax), 200_000))
    v = np.concatenate(
        [
            np.linspace(-fmax, fmax, 400_001),
            np.clip(rng.standard_normal(200_000) * magnitudes, -fmax, fmax),
            [0.0, -0.0, 2.0**target.emin, -(2.0**target.emin)],
            # Ties just below and at the smallest normal: the subnormal grid's half steps.
            np.arange(1, 2 ** (target.mantissa_bits + 2), 2)
            * 2.0 ** (target.emin - target.mantissa_bits - 1),
        ]
    ).astype(np.float32)
    expected = v.astype(getattr(ml_dtypes, name)).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: round_to_float_grid(v, target))(v))
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert np.isnan(np.asarray(round_to_float_grid(jnp.float32(np.nan), target)))
