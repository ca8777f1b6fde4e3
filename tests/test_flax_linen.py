"""qjax.flax.linen: quantized layers and the interceptor, against independent references."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.flax import linen as qlinen
from qjax.flax import serve
from reference import reference

INT8 = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
INT4_BLOCK = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 8))
ACT = qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token()))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10, name="head")(x)


def fq_ref(w, spec_args, block):
    """Fake-quant by the NumPy reference (not by qjax)."""
    return reference(np.asarray(w), *spec_args, block)["dequantized"]


def test_quant_dense_has_the_float_params_and_quantized_numerics():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    float_layer = nn.Dense(8)
    quant_layer = qlinen.QuantDense(8, quant=qlinen.LayerQuant(weight=INT4_BLOCK, act=ACT))
    variables = float_layer.init(jax.random.key(1), x)
    assert jax.tree.structure(quant_layer.init(jax.random.key(1), x)) == jax.tree.structure(
        variables
    )
    y = quant_layer.apply(variables, x)
    kernel = variables["params"]["kernel"]
    w = fq_ref(kernel, ("int4", "symmetric", "scale"), (8, 1))
    a = reference(np.asarray(x), "int8", "symmetric", "scale", (1, 16))["dequantized"]
    expected = a @ w + np.asarray(variables["params"]["bias"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_intercept_quantizes_an_unmodified_model():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    model = CNN()
    variables = model.init(jax.random.key(1), x)
    with qlinen.intercept({"conv": INT8, "head": "int8:per_channel"}):
        quantized_variables = model.init(jax.random.key(1), x)
        y = model.apply(variables, x)
    assert jax.tree.structure(quantized_variables) == jax.tree.structure(variables)
    params = variables["params"]
    conv_w = fq_ref(params["conv"]["kernel"], ("int8", "symmetric", "scale"), (3, 3, 3, 1))
    head_w = fq_ref(params["head"]["kernel"], ("int8", "symmetric", "scale"), (288, 1))
    manual = {
        "params": {
            "conv": {"kernel": conv_w, "bias": params["conv"]["bias"]},
            "head": {"kernel": head_w, "bias": params["head"]["bias"]},
        }
    }
    np.testing.assert_allclose(y, model.apply(manual, x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, model.apply(variables, x), atol=1e-6)


def test_gradient_is_straight_through_inside_the_range():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    layer = nn.Dense(8, use_bias=False)
    variables = layer.init(jax.random.key(1), x)
    kernel = variables["params"]["kernel"]
    spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
    qp = qjax.compute_qparams(kernel * 0.7, spec)  # clamp the largest weights

    def loss(params, quantized):
        if quantized:
            params = {"kernel": qjax.fake_quant(params["kernel"], spec, qparams=qp)}
        return jnp.sum(layer.apply({"params": params}, x) ** 2)

    def loss_intercepted(params):
        with qlinen.intercept({".*": qlinen.LayerQuant(weight=spec)}):
            return jnp.sum(layer.apply({"params": params}, x) ** 2)

    # Reference: d/dW of sum((x @ W_q)^2) = x^T (2 x W_q), masked where W was clamped.
    x_np, k_np, scale = np.asarray(x), np.asarray(kernel), np.asarray(qp.scale)
    v = np.round(k_np / scale)
    inside = (v >= -128) & (v <= 127)
    w_used = np.clip(v, -128, 127) * scale
    expected = x_np.T @ (2 * x_np @ w_used) * inside
    assert 0 < inside.sum() < inside.size
    got = jax.grad(loss)(variables["params"], True)["kernel"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    # Through the interceptor, with params from the kernel itself (the reference's mask).
    ref = reference(k_np, "int8", "symmetric", "scale", (16, 1))
    expected = x_np.T @ (2 * x_np @ ref["dequantized"]) * ref["mask"]
    got = jax.grad(loss_intercepted)(variables["params"])["kernel"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("float_first", [True, False])
def test_jit_cache_keeps_float_and_quantized_apart(float_first):
    model = CNN()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    variables = model.init(jax.random.key(1), x)
    rules = {".*": "int2"}
    expected_float = model.apply(variables, x)
    with qlinen.intercept(rules):
        expected_quant = model.apply(variables, x)
    assert not np.allclose(expected_float, expected_quant, atol=1e-3)

    float_apply = jax.jit(model.apply)
    quant_apply = jax.jit(qlinen.intercepted(model.apply, rules))

    @jax.jit
    def quant_inside(v, x):
        with qlinen.intercept(rules):
            return model.apply(v, x)

    calls = [("float", float_apply), ("quant", quant_apply), ("quant", quant_inside)]
    if not float_first:
        calls.reverse()
    for _ in range(2):
        for kind, fn in calls:
            want = expected_float if kind == "float" else expected_quant
            np.testing.assert_allclose(fn(variables, x), want, rtol=1e-6, atol=1e-6)


def test_static_activation_ranges_calibrate_then_freeze():
    act = qlinen.ActQuant(qjax.QuantSpec("int8"), static=True, momentum=0.5)
    layer = qlinen.QuantDense(4, quant=qlinen.LayerQuant(weight=INT8, act=act))
    x1 = jnp.linspace(-1.0, 2.0, 32).reshape(4, 8)
    x2 = jnp.linspace(-3.0, 1.0, 32).reshape(4, 8)
    variables = layer.init(jax.random.key(0), x1)
    assert np.asarray(variables[qlinen.STATS]["act_min"]).item() == np.inf
    _, stats = layer.apply(variables, x1, mutable=[qlinen.STATS])
    assert np.asarray(stats[qlinen.STATS]["act_min"]).item() == -1.0
    assert np.asarray(stats[qlinen.STATS]["act_max"]).item() == 2.0
    variables = {**variables, **stats}
    _, stats = layer.apply(variables, x2, mutable=[qlinen.STATS])
    assert np.asarray(stats[qlinen.STATS]["act_min"]).item() == -2.0  # 0.5 * -1 + 0.5 * -3
    assert np.asarray(stats[qlinen.STATS]["act_max"]).item() == 1.5  # 0.5 * 2 + 0.5 * 1
    frozen = {**variables, **stats}
    # Frozen: x2 is quantized with the calibrated range [-2, 1.5], so -3 clamps to -2.
    y = layer.apply(frozen, x2)
    qp = qjax.qparams_from_minmax(jnp.float32(-2.0), jnp.float32(1.5), act.spec)
    x_q = qjax.fake_quant(x2, act.spec, qparams=qp)
    w_q = qjax.fake_quant(frozen["params"]["kernel"], INT8)
    np.testing.assert_allclose(y, x_q @ w_q + frozen["params"]["bias"][None, :], rtol=1e-6)


@pytest.mark.parametrize(
    ("module", "x_shape"),
    [
        (nn.DenseGeneral((2, 4), axis=-1), (3, 16)),
        (nn.ConvTranspose(4, (3, 3)), (1, 5, 5, 8)),
        (nn.Einsum((8, 6), "ab,bc->ac"), (5, 8)),
    ],
    ids=["DenseGeneral", "ConvTranspose", "Einsum"],
)
def test_intercept_covers_other_layers(module, x_shape):
    x = jax.random.normal(jax.random.key(0), x_shape)
    variables = module.init(jax.random.key(1), x)
    spec = qjax.QuantSpec("int4")
    with qlinen.intercept({".*": spec}):
        y = module.apply(variables, x)
    kernel = variables["params"]["kernel"]
    manual = {"params": {**variables["params"], "kernel": qjax.fake_quant(kernel, spec)}}
    np.testing.assert_allclose(y, module.apply(manual, x), rtol=1e-5, atol=1e-6)


def test_intercept_quantizes_embed_tables_when_asked():
    embed = nn.Embed(16, 8)
    ids = jnp.array([[1, 5, 7]])
    variables = embed.init(jax.random.key(0), ids)
    spec = qjax.QuantSpec("int4", granularity=qjax.per_channel(0))
    with qlinen.intercept({".*": spec}):
        y = embed.apply(variables, ids)
    table = qjax.fake_quant(variables["params"]["embedding"], spec)
    np.testing.assert_array_equal(y, table[ids])


def test_invalid_rules_are_named():
    with (
        pytest.raises(ValueError, match="rule 'head': spec 'int5'"),
        qlinen.intercept({"head": "int5"}),
    ):
        pass
    with (
        pytest.raises(TypeError, match="rule 'head': expected a LayerQuant"),
        qlinen.intercept({"head": 3}),
    ):
        pass
    with pytest.raises(ValueError, match="momentum must be in"):
        qlinen.ActQuant(qjax.QuantSpec("int8"), momentum=1.0)


def test_static_activations_without_stats_fall_back_to_dynamic():
    # A float checkpoint (no quant_stats) applies as is, with dynamic activation ranges.
    act = qlinen.ActQuant(qjax.QuantSpec("int8"), static=True)
    layer = qlinen.QuantDense(4, quant=qlinen.LayerQuant(weight=INT8, act=act))
    x = jnp.linspace(-1.0, 2.0, 32).reshape(4, 8)
    params = nn.Dense(4).init(jax.random.key(0), x)["params"]
    y = layer.apply({"params": params}, x)
    expected = qjax.fake_quant(x, act.spec) @ qjax.fake_quant(params["kernel"], INT8)
    np.testing.assert_allclose(y, expected + params["bias"][None, :], rtol=1e-6)


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="fc")(x))
        return nn.DenseGeneral(10, name="head")(x)


@pytest.mark.parametrize("act", [ACT, qlinen.ActQuant(qjax.QuantSpec("int8"))])
def test_integer_dot_qat_runs_int8_forward_with_the_same_gradients(act):
    """integer_dot=True: the forward is an s8 x s8 -> s32 dot within float rounding of the
    fake-quant one, bit-exact with serving; a single layer's gradients are unchanged."""
    x = jax.random.normal(jax.random.key(0), (8, 16))
    model = TwoDense()
    variables = model.init(jax.random.key(1), x)
    fake = {".*": qlinen.LayerQuant(weight=INT8, act=act)}
    integer = {".*": qlinen.LayerQuant(weight=INT8, act=act, integer_dot=True)}
    apply_fake = jax.jit(qlinen.intercepted(model.apply, fake))
    apply_integer = jax.jit(qlinen.intercepted(model.apply, integer))
    out_fake, out_integer = apply_fake(variables, x), apply_integer(variables, x)
    np.testing.assert_allclose(out_integer, out_fake, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(out_integer, out_fake)  # a different summation, really run
    hlo = jax.jit(qlinen.intercepted(model.apply, integer)).lower(variables, x).as_text()
    assert "xi8>, tensor<" in hlo and "-> tensor<8x32xi32>" in hlo

    served = jax.jit(serve.served(model.apply, integer, integer_dots="require"))
    np.testing.assert_array_equal(served(serve.convert(variables, integer), x), out_integer)

    layer, layer_vars = nn.Dense(8), nn.Dense(8).init(jax.random.key(2), x)
    weights = jax.random.normal(jax.random.key(3), (8, 8))

    def loss(params, rules):
        with qlinen.intercept(rules):
            return jnp.sum(layer.apply(params, x) * weights)

    grads = [jax.jit(jax.grad(lambda p, r=r: loss(p, r)))(layer_vars) for r in (fake, integer)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_integer_dot_refuses_what_int8_cannot_express():
    x = jnp.ones((2, 16))
    variables = TwoDense().init(jax.random.key(0), x)
    for rule, words in [
        (qlinen.LayerQuant(weight=INT4_BLOCK, act=ACT, integer_dot=True), "per_block"),
        (qlinen.LayerQuant(weight=INT8, integer_dot=True), "activation spec"),
        (
            qlinen.LayerQuant(weight=qjax.QuantSpec("float8_e4m3fn"), act=ACT, integer_dot=True),
            "signed integer",
        ),
    ]:
        with pytest.raises(ValueError, match=words), qlinen.intercept({".*": rule}):
            TwoDense().apply(variables, x)
    cnn_vars = CNN().init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    conv_rule = {"conv": qlinen.LayerQuant(weight=INT8, act=ACT, integer_dot=True)}
    with pytest.raises(ValueError, match="Dense and DenseGeneral, not Conv"):
        with qlinen.intercept(conv_rule):
            CNN().apply(cnn_vars, jnp.ones((1, 8, 8, 1)))
