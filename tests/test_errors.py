"""Bad input gets a clear error that says what to change."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import qjax


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "int5"}, "unsupported target dtype 'int5'"),
        ({"dtype": jnp.float32}, "unsupported target dtype"),
        ({"dtype": "int8", "scheme": "affine"}, "unknown scheme 'affine'"),
        ({"dtype": "int8", "formulation": "offset"}, "unknown formulation 'offset'"),
        ({"dtype": "float8_e4m3fn", "formulation": "minval"}, "supports only formulation='scale'"),
        ({"dtype": "float4_e2m1fn", "formulation": "zero_point"}, "float target"),
        ({"dtype": "float8_e5m2", "scheme": "asymmetric"}, "use scheme='symmetric'"),
        ({"dtype": "uint8", "formulation": "scale"}, "has zero point 128"),
        ({"dtype": "uint4", "formulation": "scale"}, "has zero point 8"),
        (
            {"dtype": "int8", "scheme": "asymmetric", "formulation": "scale"},
            "data-dependent zero point",
        ),
        ({"dtype": "uint8", "scheme": "symmetric_with_clipping"}, "needs a signed dtype"),
        ({"dtype": "int8", "scale_dtype": "float64"}, "unsupported scale_dtype 'float64'"),
        ({"dtype": "int8", "scale_dtype": "float8_e8m0fnu"}, "are for float targets"),
        ({"dtype": "int8", "granularity": "per_tensor"}, "granularity must be"),
    ],
)
def test_invalid_spec_is_refused_when_built(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        qjax.QuantSpec(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: qjax.per_block(-2, 0), "block_size must be a positive integer, got 0"),
        (lambda: qjax.per_block(-2, -4), "block_size must be a positive integer, got -4"),
        (lambda: qjax.per_block(-2, 2.5), "block_size must be a positive integer"),
        (lambda: qjax.per_channel(1.0), "axis must be an int"),
        (lambda: qjax.QuantSpec(granularity=(4, 0)), "each entry must be a positive integer"),
    ],
)
def test_invalid_granularity_is_refused_when_built(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize(
    ("shape", "granularity", "message"),
    [
        (
            (250, 8),
            qjax.per_block(0, 32),
            r"block size 32 does not divide axis 0 of size 250 .*choose a block size that divides",
        ),
        ((8, 250), qjax.per_block(-1, 32), "block size 32 does not divide axis 1 of size 250"),
        ((8, 4), qjax.per_channel(2), r"per_channel axis 2 is out of range .* \[-2, 1\]"),
        ((8, 4), qjax.per_channel(-3), "per_channel axis -3 is out of range"),
        ((8, 4), qjax.per_block(5, 2), "per_block axis 5 is out of range"),
        ((8, 4), (2, 2, 2), "has 3 entries but the array has 2 dimensions"),
        ((8, 6), (3, -1), "block size 3 does not divide axis 0 of size 8"),
        ((8, 6), qjax.per_block(0, 2, channel_axis=0), "is the blocked axis"),
    ],
)
def test_granularity_that_does_not_fit_is_refused_on_use(shape, granularity, message):
    spec = qjax.QuantSpec("int8", granularity=granularity)
    x = jnp.ones(shape, jnp.float32)
    for op in (qjax.quantize, qjax.compute_qparams, qjax.fake_quant):
        with pytest.raises(ValueError, match=message):
            op(x, spec)


@pytest.mark.parametrize("shape", [(64,), (4, 32)])
def test_shorthand_per_block_that_does_not_fit_names_the_axis_it_chose(shape):
    # The user wrote no axis: the message says the shorthand blocks axis -2, and how to pick.
    for op in (qjax.quantize, qjax.compute_qparams, qjax.fake_quant):
        with pytest.raises(ValueError, match=r"so it blocks axis -2.*'int4:per_block:32:axis=-1'"):
            op(jnp.ones(shape, jnp.float32), "int4:per_block:32")
    qjax.quantize(jnp.ones(shape, jnp.float32), "int4:per_block:32:axis=-1")  # as suggested
    with pytest.raises(ValueError) as preset:  # a preset blocks its own axis: no such hint
        qjax.quantize(jnp.ones((64, 48), jnp.float32), "mxfp4")
    assert "shorthand" not in str(preset.value)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
def test_non_float_input_is_a_type_error(dtype):
    x = jnp.ones((4, 4), dtype)
    spec = qjax.QuantSpec("int8")
    for op in (qjax.quantize, qjax.compute_qparams, qjax.fake_quant):
        with pytest.raises(TypeError, match="expects a floating-point array, got dtype"):
            op(x, spec)


def test_dequantize_refuses_plain_arrays():
    with pytest.raises(TypeError, match="dequantize expects a QArray, got ndarray"):
        qjax.dequantize(np.ones(3, np.float32))


def test_qparams_of_the_wrong_shape_are_refused():
    x = jnp.ones((8, 4), jnp.float32)
    per_tensor = qjax.compute_qparams(x, qjax.QuantSpec("int8"))
    spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
    with pytest.raises(ValueError, match=r"qparams.scale must have shape \(1, 4\)"):
        qjax.quantize(x, spec, qparams=per_tensor)
    spec = qjax.QuantSpec("uint8", granularity=qjax.per_channel(-1))
    qp = qjax.compute_qparams(x, spec)._replace(zero_point=None)
    with pytest.raises(ValueError, match=r"qparams\.zero_point must have shape"):
        qjax.quantize(x, spec, qparams=qp)


def test_packing_where_it_cannot_apply_is_refused():
    with pytest.raises(ValueError, match="packed=True needs a sub-byte target"):
        qjax.quantize(jnp.ones(4, jnp.float32), qjax.QuantSpec("int8"), packed=True)
    with pytest.raises(ValueError, match="at least one dimension"):
        qjax.quantize(jnp.float32(1.0), qjax.QuantSpec("int4"), packed=True)
