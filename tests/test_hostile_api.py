"""Hostile inputs to the core API: every bad argument gets a TypeError / ValueError that
names it and says what it accepts; good ones (shorthand text, user qparams, QArrays under
transformations) keep working bit for bit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.spec import as_spec

X = jnp.linspace(-1.0, 1.0, 32, dtype=jnp.float32).reshape(4, 8)


def _same(a: qjax.QArray, b: qjax.QArray) -> None:
    """Bit-for-bit equal parts and equal static fields."""
    assert a.spec == b.spec and (a.float_dtype, a.packed, a.pad) == (b.float_dtype, b.packed, b.pad)
    for left, right in ((a.data, b.data), (a.scale, b.scale), (a.offset, b.offset)):
        assert (left is None) == (right is None)
        if left is not None:
            assert left.dtype == right.dtype and left.shape == right.shape
            np.testing.assert_array_equal(
                np.asarray(left).reshape(-1).view(np.uint8),
                np.asarray(right).reshape(-1).view(np.uint8),
            )


# Shorthand text wherever a spec is taken.

SHORTHANDS = [
    ("int8", qjax.QuantSpec("int8")),
    ("uint8:asymmetric", qjax.QuantSpec("uint8", scheme="asymmetric")),
    ("int4:per_channel", qjax.QuantSpec("int4", granularity=qjax.per_channel(-1))),
    ("int4:per_block:2", qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 2))),
    ("uint4:asymmetric:minval:per_channel:axis=0",
     qjax.QuantSpec("uint4", scheme="asymmetric", formulation="minval",
                    granularity=qjax.per_channel(0))),
    ("int2:symmetric_with_clipping", qjax.QuantSpec("int2", scheme="symmetric_with_clipping")),
    ("float8_e4m3fn:per_channel",
     qjax.QuantSpec("float8_e4m3fn", granularity=qjax.per_channel(-1))),
    ("int8:per_tensor:scale=bfloat16", qjax.QuantSpec("int8", scale_dtype="bfloat16")),
]


@pytest.mark.parametrize(("text", "spec"), SHORTHANDS, ids=[t for t, _ in SHORTHANDS])
def test_shorthand_text_equals_the_quantspec(text, spec):
    assert as_spec(text) == spec
    _same(qjax.quantize(X, text), qjax.quantize(X, spec))
    np.testing.assert_array_equal(qjax.fake_quant(X, text), qjax.fake_quant(X, spec))


def test_shorthand_text_works_under_jit_and_vmap():
    spec = qjax.QuantSpec("int4", granularity=qjax.per_channel(-1))
    _same(jax.jit(lambda x: qjax.quantize(x, "int4:per_channel"))(X), qjax.quantize(X, spec))
    rows = jax.vmap(lambda r: qjax.quantize(r, "int8"))(X)
    assert rows.scale.shape == (4, 1)
    np.testing.assert_array_equal(
        jax.grad(lambda x: qjax.fake_quant(x, "int8").sum())(X), jnp.ones_like(X)
    )


@pytest.mark.parametrize(
    "bad", [None, 3, 3.5, True, b"int8", ["int8"], {"dtype": "int8"}, object(), jnp.int8]
)
@pytest.mark.parametrize("op", [qjax.quantize, qjax.fake_quant, as_spec])
def test_spec_of_the_wrong_type_is_a_type_error_naming_spec(op, bad):
    with pytest.raises(TypeError, match=r"spec must be a QuantSpec or shorthand text"):
        op(X, bad) if op is not as_spec else op(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keep", "means 'stay float'"),
        ("float", "means 'stay float'"),
        ("int5", "unsupported target dtype 'int5'"),
        ("", "empty token"),
        ("int8:per_galaxy", "cannot read 'per_galaxy'"),
        ("int8:per_block", "per_block needs a block size"),
        ("int8:per_block:0", "block size '0' must be a positive integer"),
        ("uint8:scale", "needs a zero point of 0"),
        ("mxfp4:per_channel", "sets its own blocks"),
    ],
)
@pytest.mark.parametrize("op", [qjax.quantize, qjax.fake_quant])
def test_bad_shorthand_text_is_a_value_error_naming_spec(op, text, message):
    with pytest.raises(ValueError, match=message) as info:
        op(X, text)
    assert "spec" in str(info.value)


def test_as_spec_names_the_argument_it_is_given():
    with pytest.raises(TypeError, match=r"^weight_spec must be"):
        as_spec(1, "weight_spec")
    with pytest.raises(ValueError, match=r"^weight_spec"):
        as_spec("int5", "weight_spec")


# A spec passed to jax.jit as an ordinary (traced) argument.


@pytest.mark.parametrize("op", [qjax.quantize, qjax.fake_quant])
@pytest.mark.parametrize("spec", [qjax.QuantSpec("int8"), qjax.QuantSpec("int4")])
def test_jit_with_a_traced_spec_says_to_close_over_it_or_mark_it_static(op, spec):
    with pytest.raises(TypeError, match=r"spec is a traced value.*static_argnames='spec'"):
        jax.jit(op)(X, spec)


@pytest.mark.parametrize("spec", ["int8", qjax.QuantSpec("uint4", scheme="asymmetric")])
def test_jit_with_a_static_spec_works(spec):
    _same(jax.jit(qjax.quantize, static_argnames="spec")(X, spec), qjax.quantize(X, spec))
    np.testing.assert_array_equal(
        jax.jit(qjax.fake_quant, static_argnames="spec")(X, spec), qjax.fake_quant(X, spec)
    )


# QuantSpec fields of the wrong type or value.


@pytest.mark.parametrize("dtype", [None, 42, True, 2.5, ["int8"], object(), np.ones(2)])
def test_quantspec_dtype_of_the_wrong_type(dtype):
    with pytest.raises(TypeError, match=r"QuantSpec dtype must be a dtype name"):
        qjax.QuantSpec(dtype)


@pytest.mark.parametrize(
    "dtype",
    ["float64", jnp.float64, np.float32, "complex64", jnp.complex64, "bool", jnp.bool_, "int5",
     "int32", jnp.int32, "INT8", "", "mxfp6", float, int],
)
def test_quantspec_dtype_that_is_no_target(dtype):
    with pytest.raises(ValueError, match=r"unsupported target dtype .*choose one of"):
        qjax.QuantSpec(dtype)


@pytest.mark.parametrize(
    "dtype", ["int4", jnp.int4, np.dtype(jnp.int4), jnp.dtype("int4")]
)
def test_quantspec_dtype_as_a_name_or_a_dtype(dtype):
    assert qjax.QuantSpec(dtype) == qjax.QuantSpec("int4")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scheme": 1}, TypeError, r"QuantSpec scheme must be one of"),
        ({"scheme": None}, TypeError, r"QuantSpec scheme must be one of"),
        ({"scheme": ["symmetric"]}, TypeError, r"QuantSpec scheme must be one of"),
        ({"scheme": "Symmetric"}, ValueError, r"unknown scheme 'Symmetric'"),
        ({"formulation": 0}, TypeError, r"QuantSpec formulation must be one of"),
        ({"formulation": ("scale",)}, TypeError, r"QuantSpec formulation must be one of"),
        ({"formulation": "offset"}, ValueError, r"unknown formulation 'offset'"),
        ({"scale_dtype": 3}, TypeError, r"QuantSpec scale_dtype must be a dtype name"),
        ({"scale_dtype": True}, TypeError, r"QuantSpec scale_dtype must be a dtype name"),
        ({"scale_dtype": "int8"}, ValueError, r"unsupported scale_dtype 'int8'"),
        ({"scale_dtype": jnp.float64}, ValueError, r"unsupported scale_dtype 'float64'"),
        ({"granularity": "per_channel"}, TypeError, r"granularity must be"),
        ({"granularity": 3}, TypeError, r"granularity must be"),
        ({"granularity": {"axis": 0}}, TypeError, r"granularity must be"),
        ({"granularity": (4, True)}, ValueError, r"block shape .* has entry True"),
        ({"granularity": (4, 2.5)}, ValueError, r"block shape .* has entry 2.5"),
    ],
)
def test_quantspec_fields_of_the_wrong_type_or_value(kwargs, error, message):
    with pytest.raises(error, match=message):
        qjax.QuantSpec("int8", **kwargs)


def test_quantspec_accepts_dtype_objects_for_scale_dtype():
    assert qjax.QuantSpec("int8", scale_dtype=jnp.bfloat16).scale_dtype == "bfloat16"


# Granularity garbage.


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: qjax.per_block(axis="x", block_size=32), TypeError, r"per_block axis must be"),
        (lambda: qjax.per_block(None, 32), TypeError, r"per_block axis must be an int"),
        (lambda: qjax.per_block(1.0, 32), TypeError, r"per_block axis must be an int"),
        (lambda: qjax.per_block(True, 32), TypeError, r"per_block axis must be an int"),
        (lambda: qjax.per_block(-2, 0), ValueError, r"block_size must be a positive .*got 0"),
        (lambda: qjax.per_block(-2, -1), ValueError, r"block_size must be a positive .*got -1"),
        (lambda: qjax.per_block(-2, True), TypeError, r"block_size must be a positive .*got True"),
        (lambda: qjax.per_block(-2, False), TypeError, r"block_size must be a positive integer"),
        (lambda: qjax.per_block(-2, 2.5), TypeError, r"block_size must be a positive integer"),
        (lambda: qjax.per_block(-2, 32.0), TypeError, r"block_size must be a positive integer"),
        (lambda: qjax.per_block(-2, "32"), TypeError, r"block_size must be a positive integer"),
        (lambda: qjax.per_block(-2, None), TypeError, r"block_size must be a positive integer"),
        (lambda: qjax.per_block(-2, 32, channel_axis="first"), ValueError, r"channel_axis must"),
        (lambda: qjax.per_block(-2, 32, channel_axis=1.5), TypeError, r"channel_axis must be"),
        (lambda: qjax.per_block(-2, 32, channel_axis=None), TypeError, r"channel_axis must be"),
        (lambda: qjax.per_channel(None), TypeError, r"per_channel axis must be an int, got None"),
        (lambda: qjax.per_channel(axis="0"), TypeError, r"per_channel axis must be an int"),
        (lambda: qjax.per_channel(1.5), TypeError, r"per_channel axis must be an int"),
        (lambda: qjax.per_channel(False), TypeError, r"per_channel axis must be an int"),
        (lambda: qjax.per_channel([0]), TypeError, r"per_channel axis must be an int"),
        (lambda: qjax.Granularity("per_row"), ValueError, r"unknown granularity kind 'per_row'"),
        (lambda: qjax.Granularity("per_channel"), TypeError, r"per_channel axis must be an int"),
        (lambda: qjax.Granularity("explicit"), TypeError, r"explicit block shape must be a tuple"),
        (lambda: qjax.Granularity("explicit", explicit="44"), TypeError, r"must be a tuple"),
        (lambda: qjax.block_shape((4, 8), (4, 0)), ValueError, r"each entry must be a positive"),
        (lambda: qjax.block_shape((4, 8), (-2, 8)), ValueError, r"has entry -2"),
        (lambda: qjax.block_shape((4, 8), "per_tensor"), TypeError, r"granularity must be"),
    ],
)
def test_granularity_garbage_is_refused_naming_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_granularity_on_a_0d_array_says_to_use_per_tensor():
    spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
    with pytest.raises(ValueError, match=r"per_channel axis -1 cannot apply to a 0-d array"):
        qjax.quantize(jnp.float32(1.0), spec)


def test_numpy_integers_are_accepted_as_python_ints():
    assert qjax.per_block(np.int64(-2), np.int32(2)) == qjax.per_block(-2, 2)
    assert qjax.per_channel(np.int8(0)) == qjax.per_channel(0)
    assert qjax.QuantSpec("int8", granularity=(np.int64(2), -1)).granularity.explicit == (2, -1)
    assert hash(qjax.per_block(np.int64(-2), np.int32(2))) == hash(qjax.per_block(-2, 2))


@pytest.mark.parametrize("dtype", [["int8"], {"a": 1}, None, 3])
def test_target_dtype_of_garbage_is_a_value_error(dtype):
    with pytest.raises(ValueError, match="unsupported target dtype"):
        qjax.target_dtype(dtype)


# x of the wrong type.


@pytest.mark.parametrize(
    "x",
    [object(), "abc", "a", b"\x00", None, {"x": 1.0}, [1.0, "a"], [[1.0], [1.0, 2.0]],
     np.array([1.0, None], dtype=object), np.array(["1.0"]), qjax.per_tensor()],
)
@pytest.mark.parametrize("op", [qjax.quantize, qjax.fake_quant])
def test_x_that_is_no_array_is_a_type_error_naming_x(op, x):
    with pytest.raises(TypeError, match=r"x must be a floating-point array"):
        op(x, "int8")


@pytest.mark.parametrize(
    "x", [1, True, [1, 2], [True], np.arange(4), jnp.ones(3, jnp.complex64), np.ones(2, np.uint8)]
)
@pytest.mark.parametrize("op", [qjax.quantize, qjax.fake_quant])
def test_x_that_is_not_floating_is_a_type_error(op, x):
    with pytest.raises(TypeError, match=r"expects a floating-point array, got dtype"):
        op(x, "int8")


def test_x_that_is_a_qarray_says_to_dequantize_it():
    qa = qjax.quantize(X, "int8")
    with pytest.raises(TypeError, match="x is already a QArray; dequantize it first"):
        qjax.quantize(qa, "int8")


@pytest.mark.parametrize(
    "x", [[0.5, -1.0, 0.25], 0.75, np.float32(0.5), np.array([0.5], np.float64)]
)
def test_python_floats_and_numpy_arrays_quantize_as_jax_arrays(x):
    _same(qjax.quantize(x, "int8"), qjax.quantize(jnp.asarray(x), "int8"))


@pytest.mark.parametrize("packed", ["yes", 1, 0, "True", [True], 1.0])
def test_packed_of_the_wrong_type_is_refused(packed):
    with pytest.raises(TypeError, match="packed must be True, False or None"):
        qjax.quantize(X, "int4", packed=packed)


def test_packed_accepts_numpy_bools():
    _same(qjax.quantize(X, "int4", packed=np.True_), qjax.quantize(X, "int4", packed=True))
    _same(qjax.quantize(X, "int4", packed=np.False_), qjax.quantize(X, "int4", packed=False))


# User qparams.

U8 = qjax.QuantSpec("uint8", granularity=qjax.per_channel(-1))
U8_QP = qjax.compute_qparams(X, U8)
MINVAL = qjax.QuantSpec("uint8", scheme="asymmetric", formulation="minval")
MINVAL_QP = qjax.compute_qparams(X, MINVAL)


def _set(values, index, value):
    return jnp.asarray(values).at[index].set(value)


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (0.0, "qparams.scale must be finite and > 0"),
        (-0.01, "qparams.scale must be finite and > 0"),
        (-0.0, "qparams.scale must be finite and > 0"),
        (float("nan"), "qparams.scale must be finite and > 0"),
        (float("inf"), "qparams.scale must be finite and > 0"),
        (float("-inf"), "qparams.scale must be finite and > 0"),
        (1e-40, "must be representable in the spec's scale_dtype float32"),
        (1e37, r"qparams.scale is too large: scale \* 128"),
    ],
)
@pytest.mark.parametrize("op", [qjax.quantize, qjax.fake_quant])
def test_unusable_user_scales_are_refused(op, scale, message):
    qp = U8_QP._replace(scale=_set(U8_QP.scale, (0, 3), scale))
    with pytest.raises(ValueError, match=message) as info:
        op(X, U8, qparams=qp)
    assert "at block (0, 3) (1 of 8 blocks)" in str(info.value)


def test_a_tiny_scale_given_in_float64_is_refused_with_its_value():
    with pytest.raises(ValueError, match=r"representable .* float32.*got 1e-50"):
        qjax.quantize(X, "int8", qparams=qjax.QParams(np.float64(1e-50), None, None))


@pytest.mark.parametrize(
    ("scale_dtype", "scale", "message"),
    [
        ("float16", 1e5, r"representable in the spec's scale_dtype float16: .* and 65504"),
        ("float16", 1e-9, r"representable in the spec's scale_dtype float16"),
        ("bfloat16", 3.4e38, r"representable in the spec's scale_dtype bfloat16"),
    ],
)
def test_scales_the_scale_dtype_cannot_hold_are_refused(scale_dtype, scale, message):
    spec = qjax.QuantSpec("int8", scale_dtype=scale_dtype)
    with pytest.raises(ValueError, match=message):
        qjax.quantize(X, spec, qparams=qjax.QParams(jnp.float32(scale), None, None))


def test_float_target_scale_that_overflows_float32_is_refused():
    spec = qjax.QuantSpec("float8_e4m3fn")
    with pytest.raises(ValueError, match=r"qparams.scale is too large: scale \* 448"):
        qjax.quantize(X, spec, qparams=qjax.QParams(jnp.float32(1e36), None, None))


@pytest.mark.parametrize(
    ("zero_point", "message"),
    [
        (128.7, r"qparams.zero_point must hold whole numbers.*got 128.7"),
        (0.5, r"qparams.zero_point must hold whole numbers"),
        (float("nan"), r"qparams.zero_point must hold whole numbers"),
        (float("inf"), r"qparams.zero_point must hold whole numbers"),
        (256, r"qparams.zero_point must lie in \[qmin, qmax\] = \[0, 255\]"),
        (-1, r"qparams.zero_point must lie in \[qmin, qmax\] = \[0, 255\]"),
        (1e9, r"qparams.zero_point must lie in \[qmin, qmax\]"),
    ],
)
@pytest.mark.parametrize("op", [qjax.quantize, qjax.fake_quant])
def test_unusable_user_zero_points_are_refused(op, zero_point, message):
    zp = jnp.asarray(U8_QP.zero_point, jnp.float32).at[0, 5].set(zero_point)
    with pytest.raises(ValueError, match=message):
        op(X, U8, qparams=U8_QP._replace(zero_point=zp))


def test_int4_zero_point_range_is_the_targets():
    spec = qjax.QuantSpec("uint4", scheme="asymmetric")
    qp = qjax.compute_qparams(X, spec)
    with pytest.raises(ValueError, match=r"\[qmin, qmax\] = \[0, 15\].*got 16"):
        qjax.quantize(X, spec, qparams=qp._replace(zero_point=jnp.int32(16)))


@pytest.mark.parametrize(
    ("minval", "scale", "message"),
    [
        (float("nan"), None, r"qparams.minval must be finite in float32"),
        (float("-inf"), None, r"qparams.minval must be finite in float32"),
        (-1e39, None, r"qparams.minval must be finite in float32"),
        (-3e38, 1e37, r"qparams.minval \+ scale \* 255 \(the top of the range\) must be finite"),
        (3e38, 1e36, r"qparams.minval \+ scale \* 255"),
    ],
)
def test_unusable_user_minvals_are_refused(minval, scale, message):
    qp = MINVAL_QP._replace(minval=np.float64(minval))
    if scale is not None:
        qp = qp._replace(scale=jnp.float32(scale))
    with pytest.raises(ValueError, match=message):
        qjax.quantize(X, MINVAL, qparams=qp)


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("scale", "0.1", TypeError, r"qparams.scale .* must be an array of real numbers, got str"),
        ("scale", True, TypeError, r"qparams.scale .*real numbers, got dtype bool"),
        ("scale", jnp.ones((1, 8), jnp.complex64), TypeError, r"qparams.scale .*complex64"),
        ("scale", object(), TypeError, r"qparams.scale .*real numbers, got object"),
        ("scale", jnp.ones((8, 1)) * 0.01, None, None),  # same size: reshaped, as before
        ("scale", jnp.ones((2, 8)), ValueError, r"qparams.scale must have shape \(1, 8\)"),
        ("scale", None, ValueError, r"qparams.scale must have shape \(1, 8\).*got None"),
        ("zero_point", None, ValueError, r"qparams.zero_point must have shape \(1, 8\)"),
        ("zero_point", jnp.ones((1, 8), bool), TypeError, r"qparams.zero_point .*dtype bool"),
        ("zero_point", jnp.ones(3, jnp.int32), ValueError, r"qparams.zero_point must have shape"),
        ("zero_point", ["1"] * 8, TypeError, r"qparams.zero_point .*real numbers, got list"),
    ],
)
def test_user_qparams_of_the_wrong_type_or_shape(field, value, error, message):
    qp = U8_QP._replace(**{field: value})
    if error is None:
        qjax.quantize(X, U8, qparams=qp)
        return
    with pytest.raises(error, match=message):
        qjax.quantize(X, U8, qparams=qp)


@pytest.mark.parametrize("qparams", [(0.1, 128, None), {"scale": 0.1}, 0.1, jnp.ones(8)])
def test_qparams_that_are_no_qparams_are_a_type_error(qparams):
    with pytest.raises(TypeError, match=r"qparams must be a qjax\.QParams"):
        qjax.quantize(X, U8, qparams=qparams)


def test_user_qparams_are_checked_for_shape_under_jit_and_for_value_outside():
    # Under jit the values are traced: the shape is still checked.
    bad_shape = U8_QP._replace(scale=jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"qparams.scale must have shape \(1, 8\)"):
        jax.jit(lambda x, qp: qjax.quantize(x, U8, qparams=qp))(X, bad_shape)
    zero = U8_QP._replace(scale=jnp.zeros((1, 8)))
    with pytest.raises(ValueError, match=r"qparams\.scale must be finite and > 0"):
        qjax.quantize(X, U8, qparams=zero)


SPECS = [
    qjax.QuantSpec("int8"),
    qjax.QuantSpec("uint8", scheme="asymmetric", granularity=qjax.per_channel(0)),
    qjax.QuantSpec("uint4", scheme="asymmetric", formulation="minval",
                   granularity=qjax.per_block(-1, 4)),
    qjax.QuantSpec("int4", granularity=qjax.per_channel(-1), scale_dtype="float16"),
    qjax.QuantSpec("float8_e5m2", granularity=qjax.per_channel(-1)),
    qjax.QuantSpec(
        "float4_e2m1fn",
        granularity=qjax.per_block(-1, 4, channel_axis="all"),
        scale_dtype="float8_e8m0fnu",
    ),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_computed_params_given_back_give_the_same_qarray_bit_for_bit(spec):
    qp = qjax.compute_qparams(X, spec)
    _same(qjax.quantize(X, spec, qparams=qp), qjax.quantize(X, spec))
    np.testing.assert_array_equal(qjax.fake_quant(X, spec, qparams=qp), qjax.fake_quant(X, spec))


def test_user_params_follow_the_formula_computed_in_numpy():
    # uint8 zero_point formulation: q = clip(round(x / s) + zp, 0, 255), zero point as float.
    x = np.linspace(-3.0, 3.0, 32, dtype=np.float32).reshape(4, 8)
    scale = np.float32(0.03)
    qa = qjax.quantize(x, "uint8", qparams=qjax.QParams(np.float64(0.03), 100.0, None))
    expected = np.clip(np.round(x / scale) + 100, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(qa.values), expected)
    assert qa.offset.dtype == jnp.int32 and int(qa.offset.reshape(())) == 100
    np.testing.assert_array_equal(
        np.asarray(qa.dequantize()), scale * (expected.astype(np.float32) - np.float32(100))
    )


def test_a_whole_float_zero_point_equals_the_integer_one():
    as_float = U8_QP._replace(zero_point=U8_QP.zero_point.astype(jnp.float32))
    _same(qjax.quantize(X, U8, qparams=as_float), qjax.quantize(X, U8, qparams=U8_QP))


def test_unused_qparams_fields_are_ignored():
    spec = qjax.QuantSpec("int8")
    qp = qjax.QParams(jnp.float32(1 / 127.5), "ignored", object())
    _same(qjax.quantize(X, spec, qparams=qp), qjax.quantize(X, spec))


# QArray fields replaced with inconsistent ones.

QA8 = qjax.quantize(X, U8)
QA4 = qjax.quantize(X[:, :7], qjax.QuantSpec("int4", granularity=qjax.per_channel(-1)))
QAM = qjax.quantize(X, MINVAL)


@pytest.mark.parametrize(
    ("qa", "changes", "message"),
    [
        (QA8, {"float_dtype": "int32"}, r"QArray float_dtype must name a floating-point dtype"),
        (QA8, {"float_dtype": jnp.int8}, r"QArray float_dtype must name a floating-point"),
        (QA8, {"float_dtype": None}, r"QArray float_dtype must name a floating-point"),
        (QA8, {"float_dtype": "floatish"}, r"QArray float_dtype must name a floating-point"),
        (QA8, {"float_dtype": "bool"}, r"QArray float_dtype must name a floating-point"),
        (QA8, {"scale": jnp.ones(8)}, r"QArray scale has shape \(8,\), which does not fit"),
        (QA8, {"scale": jnp.ones((1, 3))}, r"QArray scale has shape \(1, 3\), which does not"),
        (QA8, {"scale": jnp.ones((1, 4))}, r"QArray scale has shape \(1, 4\), but per_channel"),
        (QA8, {"scale": jnp.ones((2, 8))}, r"QArray scale has shape \(2, 8\), but per_channel"),
        (QA8, {"scale": jnp.ones((8, 1))}, r"QArray scale has shape \(8, 1\)"),
        (QA8, {"scale": jnp.ones((1, 8), jnp.int32)}, r"QArray scale must be floating"),
        (QA8, {"offset": None}, r"QArray offset is missing: formulation 'zero_point'"),
        (QA8, {"offset": jnp.zeros((1, 4), jnp.int32)}, r"QArray offset must have the scale's"),
        (QA8, {"offset": jnp.zeros((1, 8))}, r"QArray offset must be integer"),
        (QA8, {"data": QA8.data.astype(jnp.int8)}, r"QArray data must be uint8 .*got int8"),
        (QA8, {"data": QA8.data.astype(jnp.float32)}, r"QArray data must be uint8"),
        (QA8, {"packed": True}, r"QArray packed=True needs a sub-byte target"),
        (QA8, {"packed": "yes"}, r"QArray packed must be True or False"),
        (QA8, {"pad": 1}, r"QArray pad must be in \[0, 0\] \(packed=False\), got 1"),
        (QA8, {"pad": -1}, r"QArray pad must be in"),
        (QA8, {"pad": True}, r"QArray pad must be an int"),
        (QA8, {"pad": "0"}, r"QArray pad must be an int"),
        (QA8, {"spec": qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))},
         r"QArray data must be int8"),
        (QA8, {"spec": qjax.QuantSpec("uint8", granularity=qjax.per_channel(0))},
         r"QArray scale has shape \(1, 8\), but per_channel\(axis=0\)"),
        (QA8, {"spec": qjax.QuantSpec("uint8", formulation="minval")}, r"QArray scale has shape"),
        (QA4, {"packed": False, "pad": 0}, r"QArray data must be int4 .*got uint8"),
        (QA4, {"pad": 0}, r"QArray scale has shape \(1, 7\), which does not fit .*pad 0"),
        (QA4, {"pad": 2}, r"QArray pad must be in \[0, 1\] \(2 int4 values per byte\)"),
        (QA4, {"data": QA4.data[:, :3]}, r"QArray scale has shape \(1, 7\)"),
        (QA4, {"data": QA4.data[0, 0]}, r"cannot hold packed values"),
        (QA4, {"offset": jnp.zeros((1, 7), jnp.int32)}, r"QArray offset must be None"),
        (QA4, {"spec": qjax.QuantSpec("float4_e2m1fn", granularity=qjax.per_channel(-1))},
         None),  # same storage: a legitimate relabelling
        (QAM, {"offset": QAM.offset.astype(jnp.int32)}, r"QArray offset must be floating"),
        (QAM, {"offset": None}, r"QArray offset is missing: formulation 'minval'"),
        (QAM, {"scale": jnp.ones((), jnp.float32)}, r"QArray scale has shape \(\)"),
    ],
)
def test_inconsistent_qarray_fields_are_refused_naming_the_field(qa, changes, message):
    if message is None:
        dataclasses.replace(qa, **changes).validate()
        return
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(qa, **changes)


@pytest.mark.parametrize("spec", [None, "int8", object()])
def test_qarray_spec_must_be_a_quantspec(spec):
    with pytest.raises(TypeError, match="QArray spec must be a QuantSpec"):
        dataclasses.replace(QA8, spec=spec)


def test_qarray_canonicalises_equivalent_static_fields():
    qa = dataclasses.replace(QA8, float_dtype=jnp.float32, packed=np.False_, pad=np.int64(0))
    assert (qa.float_dtype, qa.packed, qa.pad) == ("float32", False, 0)
    assert type(qa.packed) is bool and type(qa.pad) is int
    assert jax.tree.structure(qa) == jax.tree.structure(QA8)


@pytest.mark.parametrize(
    ("qa", "changes", "message"),
    [
        (QA8, {"scale": QA8.scale.astype(jnp.bfloat16)}, r"QArray scale must be float32"),
        (QA8, {"offset": QA8.offset.astype(jnp.int8)}, r"QArray offset must be int32"),
        (QAM, {"offset": QAM.offset.astype(jnp.bfloat16)}, r"QArray offset must be float32"),
    ],
)
def test_validate_is_strict_about_dtypes_that_construction_lets_pass(qa, changes, message):
    loose = dataclasses.replace(qa, **changes)  # dequantizes the same: allowed on build
    with pytest.raises(ValueError, match=message):
        loose.validate()


@pytest.mark.parametrize(
    ("field", "leaf"), [("data", None), ("scale", 0.5), ("scale", object()), ("offset", [0] * 8)]
)
def test_validate_needs_arrays(field, leaf):
    qa = dataclasses.replace(QA8, **{field: leaf})  # a placeholder: allowed on build
    with pytest.raises(ValueError, match=f"QArray {field} must be an array"):
        qa.validate()


def test_validate_refuses_a_tracer_qarray_of_the_wrong_granularity():
    qa = qjax.quantize(X, "int8:per_channel")

    def rebuild(scale):
        return dataclasses.replace(qa, scale=scale).validate().dequantize()

    np.testing.assert_array_equal(jax.jit(rebuild)(qa.scale), qa.dequantize())
    with pytest.raises(ValueError, match=r"QArray scale has shape \(2, 8\), but per_channel"):
        jax.jit(rebuild)(jnp.ones((2, 8)))  # divides the shape: only validate() can tell


# QArrays under transformations: JAX rebuilds them from tracers and placeholders.

ALL = [QA8, QA4, QAM, qjax.quantize(X, SPECS[-1]), qjax.quantize(jnp.float32(2.0), "int8")]


@pytest.mark.parametrize("qa", ALL, ids=range(len(ALL)))
def test_qarrays_pass_through_jit_tree_map_and_eval_shape(qa):
    _same(jax.jit(lambda q: q)(qa), qa)
    _same(jax.tree.map(lambda a: a, qa), qa)
    np.testing.assert_array_equal(jax.jit(qjax.dequantize)(qa), qa.dequantize())
    for placeholder in (None, object(), 0, "leaf"):
        assert jax.tree.map(lambda _, p=placeholder: p, qa).spec == qa.spec
    treedef = jax.tree.structure(qa)
    assert treedef.unflatten([None] * treedef.num_leaves).spec == qa.spec
    abstract = jax.eval_shape(lambda: qa)
    assert abstract.data.shape == qa.data.shape and abstract.shape == qa.shape
    qa.validate()
    jax.tree.map(jnp.zeros_like, qa).validate()


@pytest.mark.parametrize("qa", ALL[:4], ids=range(4))
def test_stacked_qarrays_from_vmap_and_scan_are_valid(qa):
    stacked = jax.tree.map(lambda a: jnp.stack([a, a, a]), qa)
    assert stacked.shape == (3, *qa.shape)
    stacked.validate()
    np.testing.assert_array_equal(
        jax.vmap(qjax.dequantize)(stacked), jnp.stack([qa.dequantize()] * 3)
    )
    _, rows = jax.lax.scan(lambda c, q: (c, q.dequantize()), 0, stacked)
    np.testing.assert_array_equal(rows[1], qa.dequantize())


@pytest.mark.parametrize("qa", [QA4, QAM], ids=range(2))
def test_qarrays_made_under_vmap_are_valid_stacks(qa):
    made = jax.vmap(lambda x: qjax.quantize(x, qa.spec))(jnp.stack([X[:, : qa.shape[-1]]] * 2))
    made.validate()
    _same(jax.tree.map(lambda a: a[1], made), qa)


def test_vmap_with_qarray_in_axes_placeholders():
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), QA8)
    in_axes = dataclasses.replace(QA8, data=0, scale=0, offset=0)  # ints, not arrays
    out = jax.vmap(qjax.dequantize, in_axes=(in_axes,))(stacked)
    np.testing.assert_array_equal(out[1], QA8.dequantize())
    out_axes = dataclasses.replace(QA8, data=0, scale=0, offset=0)
    made = jax.vmap(lambda x: qjax.quantize(x, U8), out_axes=out_axes)(jnp.stack([X, X]))
    _same(jax.tree.map(lambda a: a[0], made), QA8)


def test_grad_through_qarrays_and_fake_quant():
    # Gradient with respect to the scale, through a QArray rebuilt from tracers.
    def loss(scale):
        return dataclasses.replace(QA8, scale=scale).dequantize().sum()

    expected = (np.asarray(QA8.values, np.float32) - np.asarray(QA8.offset, np.float32)).sum(0)
    np.testing.assert_allclose(jax.grad(loss)(QA8.scale), expected[None], rtol=1e-6)
    # With respect to the whole QArray: the int8 leaves get float0 cotangents.
    grads = jax.grad(lambda q: q.dequantize().sum(), allow_int=True)(QA8)
    assert grads.data.dtype == jax.dtypes.float0 and grads.scale.shape == (1, 8)
    # fake_quant: straight-through inside the range.
    g = jax.grad(lambda x: qjax.fake_quant(x, U8, qparams=U8_QP).sum())(X * 0.5)
    np.testing.assert_array_equal(g, jnp.ones_like(X))


def test_array_attributes_of_quantized_weights_say_what_to_do():
    qa = qjax.quantize(jnp.ones((8, 8)), qjax.QuantSpec("int8"))
    lut = qjax.quantize_tree({"w": jnp.ones((64, 64))}, {"w": "nf4"})["w"]
    for weight in (qa, lut):
        with pytest.raises(AttributeError, match=r"no attribute 'T'.*not an array.*dequantiz"):
            _ = weight.T
        assert not hasattr(weight, "__jax_array__") and getattr(weight, "astype", None) is None
    broken = jax.tree.map(lambda a: a.sharding, qa)  # fields that are not arrays
    with pytest.raises(AttributeError, match="Sharding' object has no attribute 'shape'"):
        _ = broken.shape  # the property's own error, not the advice about tied heads
