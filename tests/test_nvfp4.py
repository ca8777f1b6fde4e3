"""NVFP4 (``"nvfp4"``): e2m1 values, e4m3 scales per block of 16, a float32 scale per tensor.

Checked bit for bit, under ``jit``, against a NumPy + ml_dtypes reference written from the
published definition (torchao's ``per_tensor_amax_to_scale`` and ``nvfp4_quantize``, and
its dequantization ``code * (per_tensor_scale * scale_e4m3)``), plus the one documented
choice of qjax: the tensor scale is floored at 2**-120, so an all-zero tensor gives zeros.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax

E2M1, E4M3 = ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e4m3fn
SPEC = qjax.QuantSpec("nvfp4")
quantize = jax.jit(lambda x: qjax.quantize(x, SPEC))
fake_quant = jax.jit(lambda x: qjax.fake_quant(x, SPEC))
dequantize = jax.jit(qjax.dequantize)


def reference(x, axis=-1, tensor_scale=True):
    """Codes, e4m3 scales, tensor scale, dequantized values and the in-range mask."""
    x32 = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    blocks = x32.reshape(*x32.shape[:-1], -1, 16)
    block_scale = np.abs(blocks).max(-1) / np.float32(6)
    t = np.float32(1)
    if tensor_scale:
        t = np.maximum(np.abs(x32).max() / np.float32(448 * 6), np.float32(2.0**-120))
        block_scale = block_scale / t
    e4m3 = np.clip(block_scale, np.float32(2.0**-6), np.float32(448)).astype(E4M3)
    total = (t * e4m3.astype(np.float32))[..., None]
    scaled = blocks / total
    codes = np.clip(scaled, np.float32(-6), np.float32(6)).astype(E2M1)
    dequantized = codes.astype(np.float32) * total

    def back(a):
        return np.moveaxis(a.reshape(x32.shape), -1, axis)

    return {
        "codes": back(codes),
        "scale": np.moveaxis(e4m3, -1, axis),
        "tensor_scale": np.float32(t),
        "dequantized": back(dequantized),
        "mask": back(np.abs(scaled) <= 6),
    }


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_matches(qa, x, axis=-1, tensor_scale=True):
    ref = reference(x, axis, tensor_scale)
    np.testing.assert_array_equal(bits(qa.values), bits(ref["codes"]))
    np.testing.assert_array_equal(bits(qa.scale), bits(ref["scale"]))
    if tensor_scale:
        assert qa.tensor_scale.shape == (1,) * x.ndim
        np.testing.assert_array_equal(bits(qa.tensor_scale.reshape(())), bits(ref["tensor_scale"]))
    else:
        assert qa.tensor_scale is None
    expected = ref["dequantized"].astype(x.dtype)
    np.testing.assert_array_equal(bits(dequantize(qa)), bits(expected))
    return ref


def cases() -> dict[str, np.ndarray]:
    """(8, 64) inputs: four blocks per row."""
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((8, 64)).astype(np.float32)
    exponents = rng.integers(-3, 4, (8, 4, 1)).repeat(16, -1).reshape(8, 64)
    spread = normal * (np.float32(10.0) ** exponents).astype(np.float32)
    # Tensor amax 2688 makes the tensor scale 1; a block with amax 6 then has scale 1 and its
    # values sit on e2m1 midpoints (ties); amax 6.375 and 7.125 put the block scale on e4m3
    # midpoints (1.0625, 1.1875).
    ties = np.zeros((8, 64), np.float32)
    ties[0, 0] = 2688.0
    midpoints = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5]
    ties[1, :16] = [6, *midpoints, *(-m for m in midpoints), 0]
    ties[2, :16] = np.linspace(-6.375, 6.375, 16)
    ties[3, :16] = np.linspace(-7.125, 7.125, 16)
    ties[4, 16:32] = rng.integers(-24, 25, 16) / np.float32(4)
    zero_blocks = normal.copy()
    zero_blocks[:, 16:32] = 0.0
    zero_blocks[3] = 0.0
    return {
        "normal": normal,
        "spread": spread,
        "ties": ties,
        "zero_blocks": zero_blocks,
        "all_zero": np.zeros((8, 64), np.float32),
        "huge": normal * np.float32(1e37),
        "near_max": np.where(normal > 0, np.float32(3.4e38), normal),
        "tiny": normal * np.float32(1e-30),
        "huge_and_tiny": np.concatenate(
            [normal[:4] * np.float32(1e30), normal[4:] * np.float32(1e-30)]
        ),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_codes_scales_and_values_match_the_reference(name):
    x = cases()[name]
    qa = quantize(x)
    ref = assert_matches(qa, x)
    y = np.asarray(fake_quant(x))
    np.testing.assert_array_equal(bits(y), bits(ref["dequantized"]))
    assert np.all(np.isfinite(y))


def test_all_zero_tensor_gives_zeros_not_nan():
    qa = quantize(np.zeros((2, 16), np.float32))
    np.testing.assert_array_equal(qa.values.astype(jnp.float32), 0.0)
    np.testing.assert_array_equal(qa.scale.astype(jnp.float32), 2.0**-6)
    assert float(qa.tensor_scale.reshape(())) == 2.0**-120
    np.testing.assert_array_equal(dequantize(qa), 0.0)


def test_flax_kernel_axis_and_bfloat16_input():
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    spec = qjax.parse_spec("nvfp4:axis=-2")
    assert spec.granularity == qjax.per_block(-2, 16, channel_axis="all")
    qa = jax.jit(lambda v: qjax.quantize(v, spec))(x)
    assert qa.scale.shape == (4, 8)
    assert_matches(qa, x, axis=-2)
    xb = jnp.asarray(x, jnp.bfloat16)
    qb = jax.jit(lambda v: qjax.quantize(v, spec))(xb)
    assert qb.float_dtype == "bfloat16" and dequantize(qb).dtype == jnp.bfloat16
    assert_matches(qb, np.asarray(xb), axis=-2)


def test_single_level_scales_without_a_tensor_scale():
    spec = qjax.QuantSpec("nvfp4", tensor_scale=False)
    x = cases()["spread"]
    qa = jax.jit(lambda v: qjax.quantize(v, spec))(x)
    assert_matches(qa, x, tensor_scale=False)
    assert str(spec).endswith("scale=float8_e4m3fn")


def test_stacked_layers_get_one_tensor_scale_each():
    rng = np.random.default_rng(2)
    x = (
        rng.standard_normal((3, 16, 32)).astype(np.float32)
        * np.array([1e-3, 1.0, 50.0], np.float32)[:, None, None]
    )
    qs = jax.jit(jax.vmap(lambda v: qjax.quantize(v, SPEC)))(x)
    assert qs.tensor_scale.shape == (3, 1, 1) and qs.shape == (3, 16, 32)
    for i in range(3):
        layer = jax.tree.map(lambda a, i=i: a[i], qs)
        assert_matches(layer, x[i])
    stacked = np.stack([reference(x[i])["dequantized"] for i in range(3)])
    np.testing.assert_array_equal(bits(dequantize(qs)), bits(stacked))
    np.testing.assert_array_equal(bits(jax.vmap(qjax.dequantize)(qs)), bits(stacked))
    fq = jax.jit(jax.vmap(lambda v: qjax.fake_quant(v, SPEC)))(x)
    np.testing.assert_array_equal(bits(fq), bits(stacked))


def test_stacked_layers_whose_other_axes_have_length_one():
    # A tensor scale (3, 1) for data (3, 1) was read as one per element, not one per layer.
    spec = qjax.QuantSpec(
        "float8_e4m3fn", scale_dtype="float8_e4m3fn", tensor_scale=True,
        granularity=qjax.per_channel(-1),
    )  # fmt: skip
    x = np.array([[0.5], [-3.0], [40.0]], np.float32)
    qs = jax.vmap(lambda v: qjax.quantize(v, spec))(x)
    assert qs.tensor_scale.shape == (3, 1)
    for i in range(3):
        one = qjax.quantize(x[i], spec)
        np.testing.assert_array_equal(np.asarray(qs.tensor_scale[i]), np.asarray(one.tensor_scale))
        np.testing.assert_array_equal(bits(qs.dequantize()[i]), bits(one.dequantize()))


def test_a_tensor_scale_per_element_is_refused():
    qa = qjax.quantize(np.ones((4, 16), np.float32), SPEC)
    with pytest.raises(ValueError, match=r"tensor_scale has shape \(4, 16\)"):
        dataclasses.replace(qa, tensor_scale=jnp.full((4, 16), 3.0, jnp.float32))


def test_packed_and_unpacked_storage_agree():
    x = cases()["normal"]
    packed, plain = quantize(x), qjax.quantize(x, SPEC, packed=False)
    assert packed.packed and packed.data.dtype == jnp.uint8 and packed.data.shape == (8, 32)
    assert plain.data.dtype == jnp.float4_e2m1fn
    np.testing.assert_array_equal(bits(packed.values), bits(plain.values))
    np.testing.assert_array_equal(dequantize(packed), dequantize(plain))
    codes = bits(plain.values) & 0xF
    np.testing.assert_array_equal(np.asarray(packed.data), codes[:, 0::2] | (codes[:, 1::2] << 4))
    # 4 bits per value, 8 per block of 16 and 32 per tensor
    assert packed.nbytes == 64 * 8 // 2 + 64 * 8 // 16 + 4


def test_fake_quant_gradient_is_straight_through_where_in_range():
    x = cases()["normal"]
    mask = reference(x)["mask"]
    assert mask.any() and not mask.all()  # e4m3 rounds some block scales down: those clamp
    grad = jax.jit(jax.grad(lambda v: jnp.sum(qjax.fake_quant(v, SPEC) * 3.0)))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.where(mask, 3.0, 0.0))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_spoil_only_their_block(bad):
    x = cases()["normal"]
    dirty = x.copy()
    dirty[2, 20] = bad
    clean_y, dirty_y = np.asarray(fake_quant(x)), np.asarray(fake_quant(dirty))
    untouched = np.ones(x.shape, bool)
    untouched[2, 16:32] = False
    np.testing.assert_array_equal(dirty_y[untouched], clean_y[untouched])
    np.testing.assert_array_equal(
        np.asarray(dequantize(quantize(dirty)))[untouched], clean_y[untouched]
    )
    assert np.isnan(dirty_y[2, 16:32]).all()


def test_user_qparams_reproduce_and_are_checked():
    x = cases()["spread"]
    qp = qjax.compute_qparams(x, SPEC)
    assert qp.tensor_scale.shape == (1, 1)
    again = qjax.quantize(x, SPEC, qparams=qp)
    np.testing.assert_array_equal(bits(again.values), bits(quantize(x).values))
    np.testing.assert_array_equal(bits(again.tensor_scale), bits(qp.tensor_scale))
    np.testing.assert_array_equal(qjax.fake_quant(x, SPEC, qparams=qp), fake_quant(x))
    with pytest.raises(ValueError, match=r"qparams.tensor_scale must have shape \(1, 1\).*None"):
        qjax.quantize(x, SPEC, qparams=qp._replace(tensor_scale=None))
    with pytest.raises(ValueError, match=r"qparams\.tensor_scale must be finite and > 0"):
        qjax.quantize(x, SPEC, qparams=qp._replace(tensor_scale=np.float32(0)))
    with pytest.raises(ValueError, match="smallest normal float32"):
        qjax.quantize(x, SPEC, qparams=qp._replace(tensor_scale=np.float32(1e-37)))


def test_spec_text_and_fields():
    spec = qjax.QuantSpec("nvfp4")
    assert (
        spec
        == qjax.parse_spec("nvfp4")
        == qjax.QuantSpec(
            "float4_e2m1fn",
            granularity=qjax.per_block(-1, 16, channel_axis="all"),
            scale_dtype="float8_e4m3fn",
            tensor_scale=True,
        )
    )
    assert (spec.dtype, spec.scale_dtype, spec.tensor_scale) == (
        "float4_e2m1fn",
        "float8_e4m3fn",
        True,
    )
    assert str(spec).endswith(":scale=float8_e4m3fn:tensor_scale")
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    assert qjax.QuantSpec(**fields) == spec  # what qjax's files store and rebuild
    text = "float4_e2m1fn:per_block:16:axis=-1:scale=float8_e4m3fn:tensor_scale"
    assert qjax.parse_spec(text).tensor_scale
    assert (
        qjax.parse_spec("mxfp4") == qjax.QuantSpec("mxfp4")
        and not qjax.QuantSpec("mxfp4").tensor_scale
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"dtype": "int4", "scale_dtype": "float8_e4m3fn"},
            ValueError,
            "float8_e4m3fn scales are for float",
        ),
        (
            {"dtype": "float4_e2m1fn", "tensor_scale": True},
            ValueError,
            "tensor_scale=True .* scale_dtype",
        ),
        ({"dtype": "nvfp4", "scale_dtype": "float32"}, ValueError, "tensor_scale=True"),
        (
            {"dtype": "nvfp4", "tensor_scale": "yes"},
            TypeError,
            "tensor_scale must be True or False",
        ),
    ],
)
def test_bad_specs_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        qjax.QuantSpec(**kwargs)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("nvfp4:per_block:16", "nvfp4 sets its own blocks"),
        ("int8:tensor_scale", "tensor_scale=True"),
        ("nvfp4:tensor_scale:tensor_scale", "repeats"),
    ],
)
def test_bad_shorthand_is_refused(text, match):
    with pytest.raises(ValueError, match=match):
        qjax.parse_spec(text)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="block size 16 does not divide axis 1 of size 24"):
        qjax.quantize(np.ones((4, 24), np.float32), SPEC)
    qa = quantize(cases()["normal"])
    with pytest.raises(ValueError, match="tensor_scale is missing"):
        dataclasses.replace(qa, tensor_scale=None)
    with pytest.raises(ValueError, match=r"tensor_scale has shape \(2, 1\)"):
        dataclasses.replace(qa, tensor_scale=jnp.ones((2, 1)))
    int8 = qjax.quantize(np.ones((4, 16), np.float32), "int8")
    with pytest.raises(ValueError, match="tensor_scale must be None"):
        dataclasses.replace(int8, tensor_scale=jnp.ones((1, 1)))
    with pytest.raises(ValueError, match="tensor_scale must be float32"):
        dataclasses.replace(qa, tensor_scale=qa.tensor_scale.astype(jnp.bfloat16)).validate()


def test_channel_scales_compose():
    """AWQ / SmoothQuant's input-channel multiplier applies after the two-level scale."""
    x = cases()["normal"].T  # [in, out] = (64, 8), blocks along in
    spec = qjax.parse_spec("nvfp4:axis=-2")
    qa = qjax.quantize(x, spec)
    m = np.linspace(0.5, 2.0, 64, dtype=np.float32)[:, None]
    scaled = dataclasses.replace(qa, channel_scale=jnp.asarray(m))
    np.testing.assert_array_equal(dequantize(scaled), np.asarray(dequantize(qa)) * m)
