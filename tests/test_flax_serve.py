"""qjax.flax.serve: QAT-trained float variables -> packed QArrays -> served apply."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.flax import linen as qlinen
from qjax.flax import serve

W8 = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
W4 = qjax.QuantSpec("int4", granularity=qjax.per_channel(-1))
A8_STATIC = qlinen.ActQuant(qjax.QuantSpec("int8"), static=True)
A8_DYNAMIC = qlinen.ActQuant(qjax.QuantSpec("int8"))
A8_TOKEN = qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token()))

INT8_RULES = {".*": qlinen.LayerQuant(weight=W8, act=A8_STATIC)}
INT4_WEIGHT_ONLY = {"conv": "int4:per_block:4", "head": "int4:per_block:32"}


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10, name="head")(x)


MODEL = CNN()
X = jax.random.normal(jax.random.key(0), (4, 6, 6, 4))


@pytest.fixture(scope="module")
def float_variables():
    return MODEL.init(jax.random.key(1), X)


def calibrated(variables, rules):
    """QAT variables: the float params plus static ranges from one calibration apply."""
    with qlinen.intercept(rules):
        stats = MODEL.init(jax.random.key(1), X).get(qlinen.STATS, {})
        _, stats = MODEL.apply({**variables, qlinen.STATS: stats}, X, mutable=[qlinen.STATS])
    return {**variables, **stats}


def qat_apply(variables, rules, x=X, jit=True):
    fn = qlinen.intercepted(MODEL.apply, rules)
    return (jax.jit(fn) if jit else fn)(variables, x)


def served_apply(variables, rules, x=X, jit=True, **kw):
    fn = serve.served(MODEL.apply, rules, **kw)
    return (jax.jit(fn) if jit else fn)(variables, x)


def assert_close_to_output_scale(got, want):
    """Equal within float rounding, relative to the output's magnitude."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.max(np.abs(want))))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize(
    "rules, integer_dots",
    [
        (INT4_WEIGHT_ONLY, "auto"),
        ({".*": W8}, "auto"),
        ({".*": qlinen.LayerQuant(weight=W8, act=A8_STATIC)}, "never"),
    ],
    ids=["int4-per-block", "int8-per-channel", "int8-act-never-integer"],
)
def test_dequantized_serving_is_bit_exact_with_qat(float_variables, rules, integer_dots, jit):
    variables = calibrated(float_variables, rules)
    served = serve.convert(variables, rules)
    want = qat_apply(variables, rules, jit=jit)
    got = served_apply(served, rules, jit=jit, integer_dots=integer_dots)
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(want, MODEL.apply(float_variables, X), atol=1e-6)


@pytest.mark.parametrize(
    "weight, act",
    [(W8, A8_STATIC), (W8, A8_DYNAMIC), (W4, A8_STATIC)],
    ids=["w8-a8-static", "w8-a8-dynamic", "w4-a8-static"],
)
def test_integer_serving_matches_qat_within_rounding(float_variables, weight, act):
    rules = {".*": qlinen.LayerQuant(weight=weight, act=act)}
    variables = calibrated(float_variables, rules)
    want = qat_apply(variables, rules)
    got = served_apply(serve.convert(variables, rules), rules, integer_dots="require")
    assert_close_to_output_scale(got, want)
    assert_close_to_output_scale(served_apply(serve.convert(variables, rules), rules), want)


def test_converted_tree_holds_packed_qarrays_and_keeps_the_rest(float_variables):
    variables = calibrated(float_variables, INT8_RULES)
    served = serve.convert(variables, INT8_RULES)
    params, kept = served["params"], variables["params"]
    for name, out in (("conv", 16), ("head", 10)):
        kernel = params[name]["kernel"]
        assert isinstance(kernel, qjax.QArray) and kernel.dtype == jnp.int8
        assert kernel.nbytes == kernel.size + 4 * out  # int8 values + float32 scales
        np.testing.assert_array_equal(params[name]["bias"], kept[name]["bias"])
    assert jax.tree.structure(served[qlinen.STATS]) == jax.tree.structure(variables[qlinen.STATS])
    for a, b in zip(
        jax.tree.leaves(served[qlinen.STATS]), jax.tree.leaves(variables[qlinen.STATS])
    ):
        np.testing.assert_array_equal(a, b)

    int4 = serve.convert(float_variables, INT4_WEIGHT_ONLY)["params"]
    conv, head = int4["conv"]["kernel"], int4["head"]["kernel"]
    assert conv.packed and head.packed and conv.data.dtype == jnp.uint8
    assert conv.nbytes == 3 * 3 * 4 * 16 // 2 + 4 * 16  # half a byte each + one scale per out
    assert head.nbytes == 576 * 10 // 2 + 4 * (576 // 32) * 10  # + one per block of 32


def test_integer_path_runs_an_int32_accumulating_dot_and_conv(float_variables):
    served = serve.convert(calibrated(float_variables, INT8_RULES), INT8_RULES)
    auto = serve.served(MODEL.apply, INT8_RULES, integer_dots="auto")
    jaxpr = str(jax.make_jaxpr(auto)(served, X))
    assert "dot_general[" in jaxpr and "conv_general_dilated[" in jaxpr
    assert jaxpr.count("preferred_element_type=int32") == 2
    hlo = jax.jit(auto).lower(served, X).as_text()
    # qjax.kernels contracts a decode-sized input a chunk of the 576 rows at a time
    assert re.search(r"tensor<4x\d+xi8>, tensor<\d+x10xi8>\) -> tensor<4x10xi32>", hlo)
    assert "tensor<3x3x4x16xi8>) -> tensor<4x6x6x16xi32>" in hlo
    never = serve.served(MODEL.apply, INT8_RULES, integer_dots="never")
    assert "preferred_element_type=int32" not in str(jax.make_jaxpr(never)(served, X))


@pytest.mark.parametrize("float_first", [True, False])
def test_jit_caches_keep_float_qat_and_served_apart(float_variables, float_first):
    variables = calibrated(float_variables, INT8_RULES)
    served = serve.convert(variables, INT8_RULES)
    want = {
        "float": MODEL.apply(variables, X),
        "qat": qat_apply(variables, INT8_RULES, jit=False),
        "served": served_apply(served, INT8_RULES, jit=False),
    }
    assert not np.allclose(want["float"], want["qat"], atol=1e-4)
    calls = [
        ("float", jax.jit(MODEL.apply), variables),
        ("qat", jax.jit(qlinen.intercepted(MODEL.apply, INT8_RULES)), variables),
        ("served", jax.jit(serve.served(MODEL.apply, INT8_RULES)), served),
    ]
    if not float_first:
        calls.reverse()
    for _ in range(2):
        for kind, fn, v in calls:
            np.testing.assert_array_equal(fn(v, X), want[kind])


@pytest.mark.parametrize(
    "layer, act, shape",
    [
        (nn.Dense(6), A8_TOKEN, (2, 3, 8)),
        (nn.DenseGeneral((2, 3), axis=(-2, -1)), A8_DYNAMIC, (5, 4, 8)),
        (nn.DenseGeneral(6, axis=-1), A8_TOKEN, (5, 4, 8)),
        (
            nn.Conv(8, (3,), strides=2, feature_group_count=2, padding="CIRCULAR"),
            A8_DYNAMIC,
            (3, 9, 4),
        ),
    ],
    ids=["dense-per-token", "dense-general-2-axes", "dense-general-per-token", "conv1d-grouped"],
)
def test_integer_layers_match_qat(layer, act, shape):
    x = jax.random.normal(jax.random.key(2), shape)
    variables = layer.init(jax.random.key(3), x)
    rules = {
        ".*": qlinen.LayerQuant(
            weight=qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)), act=act
        )
    }
    with qlinen.intercept(rules):
        want = layer.apply(variables, x)
    got = jax.jit(serve.served(layer.apply, rules, integer_dots="require"))(
        serve.convert(variables, rules), x
    )
    assert_close_to_output_scale(got, want)


def test_unservable_integer_rule_falls_back_or_refuses(float_variables):
    rules = {
        ".*": qlinen.LayerQuant(
            weight=qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 4)), act=A8_STATIC
        )
    }
    variables = calibrated(float_variables, rules)
    served = serve.convert(variables, rules)
    qat = qat_apply(variables, rules)
    np.testing.assert_array_equal(served_apply(served, rules), qat)
    # the Dense head's int4 blocks vary along its input: W4A8 through qjax.kernels' int8 dot
    assert_close_to_output_scale(served_apply(served, rules, integer_dots="require"), qat)
    zero_point = {
        ".*": qlinen.LayerQuant(
            weight=qjax.QuantSpec(
                "int4", formulation="zero_point", granularity=qjax.per_block(-2, 4)
            ),
            act=A8_STATIC,
        )
    }
    served = serve.convert(calibrated(float_variables, zero_point), zero_point)
    with pytest.raises(ValueError, match=r"'head' \(Dense\) cannot use an integer dot.*per_block"):
        served_apply(served, zero_point, integer_dots="require")
    asym = {
        ".*": qlinen.LayerQuant(
            weight=W8, act=qlinen.ActQuant(qjax.QuantSpec("int8", scheme="asymmetric"))
        )
    }
    with pytest.raises(ValueError, match="nonzero zero point"):
        served_apply(serve.convert(float_variables, asym), asym, integer_dots="require")


def test_errors_say_what_to_change(float_variables):
    with pytest.raises(ValueError, match=r"float array.*serve the tree that convert"):
        served_apply(float_variables, INT8_RULES)
    served = serve.convert(float_variables, INT4_WEIGHT_ONLY)
    with pytest.raises(ValueError, match=r"converted with int4.*but the rules give int8"):
        served_apply(served, {".*": "int8:per_channel"})
    with pytest.raises(ValueError, match="calibrate first"):
        serve.convert(float_variables, INT8_RULES)
    with pytest.raises(ValueError, match="integer_dots must be one of"):
        serve.served(MODEL.apply, INT8_RULES, integer_dots="always")


def test_a_custom_module_kernel_is_refused_with_the_rule_to_add():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.ones, (x.shape[-1], 2))

    x = jnp.ones((1, 4))
    variables = Custom().init(jax.random.key(0), x)
    served = serve.convert(variables, {".*": "int8"})
    with pytest.raises(ValueError, match=r"Custom is not a layer qjax quantizes.*rule ''"):
        serve.served(Custom().apply, {".*": "int8"})(served, x)


# weight_only="fast": Dense layers through qjax.kernels.matmul


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(256, name="up")(x))
        return nn.Dense(96, name="down")(h)


@pytest.mark.parametrize(
    "spec", ["int4:per_block:32", "int8:per_channel", "mxfp4", "uint4:asymmetric"]
)
def test_fast_weight_only_equals_exact_up_to_float_rounding(spec):
    model = MLP()
    x = jax.random.normal(jax.random.key(2), (5, 128))
    variables = model.init(jax.random.key(3), x)
    tree = qjax.quantize_tree(variables, {".*kernel": spec})
    rules = {"(up|down)": tree["params"]["up"]["kernel"].spec}
    exact = jax.jit(serve.served(model.apply, rules))
    fast = jax.jit(serve.served(model.apply, rules, weight_only="fast"))
    for rows in (x[:1], x):  # decode and a few tokens
        reference = model.apply(qjax.dequantize_tree(tree), rows)
        np.testing.assert_array_equal(np.asarray(exact(tree, rows)), np.asarray(reference))
        np.testing.assert_allclose(
            np.asarray(fast(tree, rows)), np.asarray(reference), rtol=1e-5, atol=1e-5
        )


def test_fast_weight_only_never_holds_a_float_copy_of_the_weights():
    x = jnp.ones((8, 1024))

    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1024, name="b")(jax.nn.relu(nn.Dense(1024, name="a")(x)))

    model = Wide()
    variables = model.init(jax.random.key(0), x)
    tree = qjax.quantize_tree(variables, {".*kernel": "int4:per_block:128"})
    rules = {"(a|b)": tree["params"]["a"]["kernel"].spec}
    float_weight = 1024 * 1024 * 4
    temp = {}
    for mode in ("exact", "fast"):
        compiled = jax.jit(serve.served(model.apply, rules, weight_only=mode)).lower(tree, x)
        temp[mode] = compiled.compile().memory_analysis().temp_size_in_bytes
    assert temp["exact"] >= float_weight  # the dequantized weight is materialised
    assert temp["fast"] < float_weight  # a chunk at a time, from the packed bytes


def test_fast_weight_only_applies_channel_scales():
    model = MLP()
    x = jax.random.normal(jax.random.key(4), (3, 128))
    variables = model.init(jax.random.key(5), x)
    tree = qjax.quantize_tree(variables, {".*kernel": "int4:per_block:32"})
    qa = tree["params"]["up"]["kernel"]
    m = jnp.linspace(0.5, 2.0, 128, dtype=jnp.float32).reshape(128, 1)
    tree["params"]["up"]["kernel"] = dataclasses.replace(qa, channel_scale=m)
    rules = {"(up|down)": qa.spec}
    fast = jax.jit(serve.served(model.apply, rules, weight_only="fast"))(tree, x)
    reference = model.apply(qjax.dequantize_tree(tree), x)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(reference), rtol=1e-5, atol=1e-5)


def test_weight_only_option_is_checked():
    with pytest.raises(ValueError, match=r"weight_only must be one of \('exact', 'fast'\)"):
        serve.served(MLP().apply, {}, weight_only="quick")


def test_fast_weight_only_dequantizes_a_small_weight_once_for_many_rows():
    model = MLP()
    x = jax.random.normal(jax.random.key(6), (512, 128))
    variables = model.init(jax.random.key(7), x)
    tree = qjax.quantize_tree(variables, {".*kernel": "int4:per_block:32"})
    core = tree["params"]["up"]["kernel"]
    rules = {"(up|down)": core.spec}
    exact = jax.jit(serve.served(model.apply, rules))
    fast = jax.jit(serve.served(model.apply, rules, weight_only="fast"))
    # decode reads the packed bytes a chunk at a time; 512 rows dequantize the small
    # weights once, the product of the exact path
    assert qjax.kernels.choose_path(core, rows=1) == "dequant_chunked"
    assert qjax.kernels.choose_path(core, rows=512) == "dequant"
    np.testing.assert_array_equal(np.asarray(fast(tree, x)), np.asarray(exact(tree, x)))
    np.testing.assert_allclose(
        np.asarray(fast(tree, x[:1])), np.asarray(exact(tree, x[:1])), rtol=1e-5, atol=1e-5
    )


def test_w4a8_with_int4_blocks_serves_through_the_int8_dot():
    model = MLP()
    x = jax.random.normal(jax.random.key(8), (6, 128))
    variables = model.init(jax.random.key(9), x)
    rules = {
        "(up|down)": qlinen.LayerQuant(
            weight=qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32)), act=A8_TOKEN
        )
    }
    qat = jax.jit(qlinen.intercepted(model.apply, rules))(variables, x)
    fn = jax.jit(serve.served(model.apply, rules, integer_dots="auto"))
    tree = serve.convert(variables, rules)
    assert_close_to_output_scale(fn(tree, x), qat)
    hlo = fn.lower(tree, x).as_text()
    assert re.search(r"dot_general.*tensor<[^>]*xi8>.*tensor<[^>]*xi8>.*-> tensor<[^>]*xi32>", hlo)
