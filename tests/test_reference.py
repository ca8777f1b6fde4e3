"""qjax against the independent NumPy reference, for every valid spec and granularity.

Every comparison is exact (bit for bit), and runs under ``jax.jit``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from reference import FLOAT_TARGETS, INT_TARGETS, reference

SIGNED = ("int8", "int4", "int2")


def valid_int_specs():
    for name in INT_TARGETS:
        schemes = ["symmetric", "asymmetric"] + (
            ["symmetric_with_clipping"] if name in SIGNED else []
        )
        for scheme in schemes:
            formulations = ["zero_point", "minval"]
            if name in SIGNED and scheme != "asymmetric":
                formulations.append("scale")
            for formulation in formulations:
                yield name, scheme, formulation


SPECS = [*valid_int_specs(), *((name, "symmetric", "scale") for name in FLOAT_TARGETS)]

# (shape, granularity, expected block shape worked out by hand from the definitions)
GRANULARITIES = [
    ((16,), qjax.per_tensor(), (16,)),
    ((16,), qjax.per_block(-1, 4), (4,)),
    ((8, 12), qjax.per_tensor(), (8, 12)),
    ((8, 12), qjax.per_channel(-1), (8, 1)),
    ((8, 12), qjax.per_channel(0), (1, 12)),
    ((8, 12), qjax.per_block(-2, 4), (4, 1)),
    ((8, 12), qjax.per_block(1, 6), (1, 6)),
    ((8, 12), (2, -1), (2, 12)),
    ((3, 3, 8, 4), qjax.per_tensor(), (3, 3, 8, 4)),
    ((3, 3, 8, 4), qjax.per_channel(-1), (3, 3, 8, 1)),
    ((3, 3, 8, 4), qjax.per_block(-2, 4), (3, 3, 4, 1)),
]


def make_data(shape, kind, seed=0):
    """'normal' values, or 'grid' values (multiples of 1/4 with amax 7.5: exact ties)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(shape).astype(np.float32) * np.float32(2.5)
        x.flat[:: max(1, x.size // 5)] = 0.0
        return x
    x = (rng.integers(-30, 31, size=shape) / 4).astype(np.float32)
    x.flat[0], x.flat[-1] = 7.5, -7.5
    return x


def assert_same(actual, expected, what):
    np.testing.assert_array_equal(np.asarray(actual, np.float32), expected, err_msg=what)


@functools.partial(jax.jit, static_argnums=1)
def run_all(x, spec):
    """Every public entry point, in one jitted function (one compile per spec)."""
    qa = qjax.quantize(x, spec)
    return (
        qjax.compute_qparams(x, spec),
        qa,
        qa.values,
        qjax.dequantize(qa),
        qjax.fake_quant(x, spec),
    )


# Every valid spec on four granularities that cover 1-D, 2-D and 4-D shapes, negative axes
# and explicit tuples; every granularity on specs that cover each scheme, formulation and
# kind of target. (The full product adds ~2 minutes and no new code path.)
SPEC_CASES = [
    s + g
    for s in SPECS
    for g in (GRANULARITIES[1], GRANULARITIES[3], GRANULARITIES[7], GRANULARITIES[10])
]
REPRESENTATIVE = [
    ("int8", "symmetric", "scale"),
    ("uint8", "asymmetric", "zero_point"),
    ("int4", "symmetric_with_clipping", "minval"),
    ("uint2", "symmetric", "zero_point"),
    ("float8_e5m2", "symmetric", "scale"),
    ("float4_e2m1fn", "symmetric", "scale"),
]
GRANULARITY_CASES = [s + g for s in REPRESENTATIVE for g in GRANULARITIES]
CASES = sorted(set(SPEC_CASES + GRANULARITY_CASES), key=lambda c: (c[:3], str(c[3:])))


@pytest.mark.parametrize(
    ("name", "scheme", "formulation", "shape", "granularity", "block"),
    CASES,
    ids=["-".join(c[:3]) + f"-{c[3]}-{c[4]}" for c in CASES],
)
def test_matches_reference(name, scheme, formulation, shape, granularity, block):
    spec = qjax.QuantSpec(name, scheme=scheme, formulation=formulation, granularity=granularity)
    assert spec.granularity.block_shape(shape) == block
    for kind in ("normal", "grid"):
        x = make_data(shape, kind)
        ref = reference(x, name, scheme, formulation, block)
        qp, qa, values, deq, fq = run_all(x, spec)
        assert_same(qp.scale, ref["scale"], "scale")
        if name in INT_TARGETS:
            assert_same(qp.zero_point, ref["zero_point"], "zero_point")
            assert_same(qp.minval, ref["minval"], "minval")
            assert qp.zero_point.dtype == jnp.int32
        assert qa.dtype == values.dtype == jnp.dtype(getattr(jnp, name))
        assert qa.shape == shape
        assert_same(values.astype(jnp.float32), ref["q"], "q")
        assert_same(deq, ref["dequantized"], "dequantized")
        assert_same(fq, ref["dequantized"], "fake_quant")


MX = [("mxfp8", "float8_e4m3fn"), ("mxfp4", "float4_e2m1fn")]


@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 96)])
@pytest.mark.parametrize(("preset", "name"), MX)
def test_mx_presets(preset, name, shape):
    x = make_data(shape, "normal", seed=1) * np.float32(100)
    spec = qjax.QuantSpec(preset)
    assert spec.dtype == name and spec.scale_dtype == "float8_e8m0fnu"
    block = (1,) * (len(shape) - 1) + (32,)
    ref = reference(x, name, "symmetric", "scale", block, scale_dtype="float8_e8m0fnu")
    qa = qjax.quantize(x, spec)
    assert qa.scale.dtype == jnp.float8_e8m0fnu
    assert qa.scale.shape == shape[:-1] + (shape[-1] // 32,)
    assert_same(qa.scale.astype(jnp.float32), ref["scale"], "scale")
    assert_same(qa.values.astype(jnp.float32), ref["q"], "q")
    assert_same(qa.dequantize(), ref["dequantized"], "dequantized")


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(
    ("name", "scheme", "formulation"),
    [
        ("int8", "symmetric", "scale"),
        ("uint4", "asymmetric", "zero_point"),
        ("int4", "symmetric", "minval"),
        ("float8_e4m3fn", "symmetric", "scale"),
    ],
)
def test_low_precision_scales(name, scheme, formulation, scale_dtype):
    x = make_data((8, 12), "normal", seed=2)
    spec = qjax.QuantSpec(
        name,
        scheme=scheme,
        formulation=formulation,
        granularity=qjax.per_channel(-1),
        scale_dtype=scale_dtype,
    )
    ref = reference(x, name, scheme, formulation, (8, 1), scale_dtype=scale_dtype)
    qa = qjax.quantize(x, spec)
    assert qa.scale.dtype == jnp.dtype(scale_dtype)
    assert_same(qa.scale.astype(jnp.float32), ref["scale"], "scale")
    assert_same(qa.values.astype(jnp.float32), ref["q"], "q")
    assert_same(qa.dequantize(), ref["dequantized"], "dequantized")


@pytest.mark.parametrize("in_dtype", ["bfloat16", "float16"])
def test_half_inputs_compute_in_float32(in_dtype):
    x = jnp.asarray(make_data((8, 12), "normal", seed=3)).astype(in_dtype)
    x32 = np.asarray(x.astype(jnp.float32))
    spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 4))
    ref = reference(x32, "int4", "symmetric", "scale", (4, 1))
    qa = qjax.quantize(x, spec)
    assert_same(qa.values.astype(jnp.float32), ref["q"], "q")
    out = qa.dequantize()
    assert out.dtype == jnp.dtype(in_dtype)
    np.testing.assert_array_equal(out, jnp.asarray(ref["dequantized"]).astype(in_dtype))
    assert qjax.fake_quant(x, spec).dtype == jnp.dtype(in_dtype)


@pytest.mark.parametrize(
    ("name", "scheme", "formulation"),
    [s for s in SPECS if s[0] in ("int8", "uint4", "float8_e4m3fn")],
)
def test_straight_through_gradient(name, scheme, formulation):
    x = make_data((8, 12), "normal", seed=4)
    spec = qjax.QuantSpec(
        name, scheme=scheme, formulation=formulation, granularity=qjax.per_channel(-1)
    )
    # Shrunken params clamp the largest values, so the mask has zeros to check.
    qp = qjax.compute_qparams(x * np.float32(0.6), spec)
    shrunk = reference(x * np.float32(0.6), name, scheme, formulation, (8, 1))
    scale = shrunk["scale"]
    if name in INT_TARGETS:
        qmin, qmax = (spec.qmin, spec.qmax)
        if formulation == "minval":
            v = np.round((x - shrunk["minval"]) / scale) + np.float32(qmin)
        else:
            zp = shrunk["zero_point"] if formulation == "zero_point" else 0
            v = np.round(x / scale) + zp
    else:
        qmin, qmax = spec.qmin, spec.qmax
        v = x / scale
    expected = ((v >= qmin) & (v <= qmax)).astype(np.float32)
    assert 0 < expected.sum() < expected.size

    grad = jax.grad(lambda x: qjax.fake_quant(x, spec, qparams=qp).sum())(x)
    np.testing.assert_array_equal(grad, expected)
    t = np.ones_like(x)
    _, tangent = jax.jvp(lambda x: qjax.fake_quant(x, spec, qparams=qp), (x,), (t,))
    np.testing.assert_array_equal(tangent, expected)


def test_gradient_without_qparams_is_identity_inside_range():
    x = make_data((8, 12), "normal", seed=5)
    spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
    mask = reference(x, "int8", "symmetric", "scale", (8, 1))["mask"]
    grad = jax.jit(jax.grad(lambda x: qjax.fake_quant(x, spec).sum()))(x)
    np.testing.assert_array_equal(grad, mask.astype(np.float32))


def test_power_of_two_scales_for_fp8():
    x = make_data((4, 64), "normal", seed=6)
    for name in FLOAT_TARGETS:
        spec = qjax.QuantSpec(name, granularity=qjax.per_channel(0), scale_dtype="float8_e8m0fnu")
        ref = reference(x, name, "symmetric", "scale", (1, 64), scale_dtype="float8_e8m0fnu")
        qa = qjax.quantize(x, spec)
        assert_same(qa.scale.astype(jnp.float32), ref["scale"], f"{name} scale")
        assert_same(qa.values.astype(jnp.float32), ref["q"], f"{name} q")
