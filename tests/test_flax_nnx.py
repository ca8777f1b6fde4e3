"""qjax.flax.nnx: quantize(model, rules) on NNX models, against independent references."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx
from qjax.resolve import QjaxRuleWarning
from reference import reference

INT8 = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
INT4_BLOCK = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 8))
STATIC = qnnx.ActQuant(qjax.QuantSpec("int8"), static=True, momentum=0.5)
X = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.head = nnx.Linear(288, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv(x))
        return self.head(x.reshape(x.shape[0], -1))


class LinenCNN(nn.Module):
    """The same network in Linen, for the cross-check with qjax.flax.linen.intercept."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def float_out(model: CNN, x: jax.Array, conv_kernel=None, head_kernel=None) -> jax.Array:
    """The float model's output with kernels replaced: computed without qjax.flax."""
    clone = nnx.clone(model)
    if conv_kernel is not None:
        clone.conv.kernel[...] = conv_kernel
    if head_kernel is not None:
        clone.head.kernel[...] = head_kernel
    return clone(x)


def fq_ref(w: jax.Array, dtype: str, block: tuple[int, ...]) -> np.ndarray:
    """Symmetric fake-quant by the NumPy reference (not by qjax)."""
    return reference(np.asarray(w), dtype, "symmetric", "scale", block)["dequantized"]


def stats(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, qnnx.QuantStat))]


def test_quantized_cnn_equals_the_float_cnn_with_fake_quantized_kernels():
    model = CNN(nnx.Rngs(1))
    float_model = nnx.clone(model)
    qnnx.quantize(model, {"conv": INT8, "head": "int4:per_block:8"})
    conv_w = fq_ref(float_model.conv.kernel[...], "int8", (3, 3, 3, 1))
    head_w = fq_ref(float_model.head.kernel[...], "int4", (8, 1))
    expected = float_out(float_model, X, conv_w, head_w)
    np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, X), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model(X), float_model(X), atol=1e-4)


def test_params_are_the_float_params_and_unmatched_layers_are_unchanged():
    model = CNN(nnx.Rngs(1))
    float_model = nnx.clone(model)
    with pytest.warns(QjaxRuleWarning, match="'other' matched nothing"):
        qnnx.quantize(model, {"conv": qnnx.LayerQuant(weight=INT8, act=STATIC), "other": "int8"})
    float_params, params = nnx.state(float_model, nnx.Param), nnx.state(model, nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(float_params)
    jax.tree.map(np.testing.assert_array_equal, params, float_params)
    assert model.head.dot_general is jax.lax.dot_general
    assert isinstance(model.conv.conv_general_dilated, qnnx.QuantOp)
    x = jax.random.normal(jax.random.key(2), (2, 288))
    np.testing.assert_array_equal(model.head(x), float_model.head(x))
    # The only new state is the two QuantStat ranges, uncalibrated.
    assert [np.asarray(v).item() for v in stats(model)] == [-np.inf, np.inf]


@pytest.mark.parametrize("layer", ["Linear", "Einsum"])
def test_kernel_gradient_is_straight_through(layer):
    x = jax.random.normal(jax.random.key(0), (4, 16))
    if layer == "Linear":
        model = nnx.Linear(16, 8, use_bias=False, rngs=nnx.Rngs(1))
    else:
        model = nnx.Einsum("ab,bc->ac", (16, 8), None, rngs=nnx.Rngs(1))
    qnnx.quantize(model, {"": INT8})
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    # d/dW of sum((x @ W_q)^2) = x^T (2 x W_q), masked where W was clamped.
    ref = reference(np.asarray(model.kernel[...]), "int8", "symmetric", "scale", (16, 1))
    x_np = np.asarray(x)
    expected = x_np.T @ (2 * x_np @ ref["dequantized"]) * ref["mask"]
    assert 0 < ref["mask"].sum() < ref["mask"].size
    np.testing.assert_allclose(grads.kernel[...], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "tree"])
def test_static_activation_ranges_calibrate_then_freeze(graph):
    layer = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    qnnx.quantize(layer, {".*": qnnx.LayerQuant(weight=INT8, act=STATIC)})
    forward = nnx.jit(lambda m, x: m(x), graph=graph)
    x1 = jnp.linspace(-1.0, 2.0, 32).reshape(4, 8)
    x2 = jnp.linspace(-3.0, 1.0, 32).reshape(4, 8)
    w_q = qjax.fake_quant(layer.kernel[...], INT8)
    b = layer.bias[...][None, :]
    # Uncalibrated: dynamic ranges, and the ranges stay untouched.
    np.testing.assert_allclose(
        forward(layer, x2), qjax.fake_quant(x2, STATIC.spec) @ w_q + b, rtol=1e-6
    )
    op = layer.dot_general
    assert (op.act_min[...].item(), op.act_max[...].item()) == (np.inf, -np.inf)
    qnnx.calibrate(layer)
    forward(layer, x1)
    assert (op.act_min[...].item(), op.act_max[...].item()) == (-1.0, 2.0)
    forward(layer, x2)
    assert op.act_min[...].item() == -2.0  # 0.5 * -1 + 0.5 * -3
    assert op.act_max[...].item() == 1.5  # 0.5 * 2 + 0.5 * 1
    assert op.act_min[...].shape == ()  # per tensor: a scalar, whatever the input rank
    qnnx.calibrate(layer, False)
    # Frozen: x2 is quantized with the calibrated range [-2, 1.5], so -3 clamps to -2.
    y = forward(layer, x2)
    assert (op.act_min[...].item(), op.act_max[...].item()) == (-2.0, 1.5)
    qp = qjax.qparams_from_minmax(jnp.float32(-2.0), jnp.float32(1.5), STATIC.spec)
    x_q = qjax.fake_quant(x2, STATIC.spec, qparams=qp)
    np.testing.assert_allclose(y, x_q @ w_q + b, rtol=1e-6)


def test_per_channel_static_ranges_take_the_feature_shape():
    act = qnnx.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)), static=True)
    layer = qnnx.quantize(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), {"": qnnx.LayerQuant(act=act)})
    calibrating = nnx.view(layer, calibrating=True)  # shares the variables, not the flag
    calibrating(jnp.array([[[-1.0, 0.5, 2.0]]]))  # rank 3
    assert not layer.dot_general.calibrating
    np.testing.assert_array_equal(layer.dot_general.act_min[...], [-1.0, 0.5, 2.0])
    calibrating(jnp.array([[-3.0, 0.5, 2.0]]))  # rank 2 fits the same ranges
    np.testing.assert_allclose(layer.dot_general.act_min[...], [-1.2, 0.5, 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"has shape \(3,\), which does not fit"):
        layer.dot_general(jnp.ones((1, 4)), jnp.ones((4, 2)), (((1,), (0,)), ((), ())))


def test_training_with_nnx_jit_and_optimizer_leaves_quant_stats_alone():
    model = CNN(nnx.Rngs(1))
    act = qnnx.ActQuant(qjax.QuantSpec("int8"), static=True)
    rules = {
        "conv": qnnx.LayerQuant(weight=INT8, act=act),
        "head": qnnx.LayerQuant(weight=INT4_BLOCK, act=act),
    }
    qnnx.quantize(model, rules)
    forward = nnx.jit(lambda m, x: m(x))
    qnnx.calibrate(model)
    forward(model, X)
    qnnx.calibrate(model, False)
    calibrated = stats(model)
    assert all(np.isfinite(s).all() for s in calibrated)

    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    # The momentum covers the parameters and nothing else (adam fails strict promotion).
    opt_paths = [path[3:] for path, _ in nnx.to_flat_state(nnx.state(optimizer, nnx.OptVariable))]
    param_paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sorted(opt_paths) == sorted(param_paths)
    y = jax.random.normal(jax.random.key(3), (2, 10))

    @nnx.jit
    def step(model: CNN, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    for got, want in zip(stats(model), calibrated, strict=True):
        np.testing.assert_array_equal(got, want)


def test_same_output_as_linen_intercept_with_the_same_rules_and_weights():
    model = CNN(nnx.Rngs(1))
    variables = {
        "params": {
            name: {
                "kernel": getattr(model, name).kernel[...],
                "bias": getattr(model, name).bias[...],
            }
            for name in ("conv", "head")
        }
    }
    rules = {
        "conv": qnnx.LayerQuant(weight=INT8, act=STATIC),
        "head": qnnx.LayerQuant(
            weight=INT4_BLOCK,
            act=qnnx.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token())),
        ),
    }
    qnnx.quantize(model, rules)
    linen = LinenCNN()
    with qlinen.intercept(rules):
        variables[qlinen.STATS] = linen.init(jax.random.key(0), X)[qlinen.STATS]
        np.testing.assert_allclose(model(X), linen.apply(variables, X), rtol=1e-6, atol=1e-6)
        _, linen_stats = linen.apply(variables, X, mutable=[qlinen.STATS])
    qnnx.calibrate(model)(X)
    conv_stats = linen_stats[qlinen.STATS]["conv"]
    op = model.conv.conv_general_dilated
    np.testing.assert_array_equal(op.act_min[...], conv_stats["act_min"].reshape(()))
    np.testing.assert_array_equal(op.act_max[...], conv_stats["act_max"].reshape(()))
    x2 = 3 * X
    qnnx.calibrate(model, False)
    with qlinen.intercept(rules):
        want = linen.apply({**variables, **linen_stats}, x2)
    np.testing.assert_allclose(model(x2), want, rtol=1e-6, atol=1e-6)


def test_rules_are_reapplied_and_none_restores_float():
    model = CNN(nnx.Rngs(1))
    float_y = model(X)
    qnnx.quantize(model, {".*": "int2"})
    qnnx.quantize(model, {"head": "int8"})  # re-quantizes head over the original operator
    assert model.head.dot_general.op is jax.lax.dot_general
    assert model.head.dot_general.quant.weight == qjax.QuantSpec("int8")
    qnnx.quantize(model, {".*": None})
    assert model.conv.conv_general_dilated is jax.lax.conv_general_dilated
    assert model.head.dot_general is jax.lax.dot_general
    np.testing.assert_array_equal(model(X), float_y)


def test_linear_general_is_quantized_through_its_hook():
    layer = nnx.LinearGeneral(16, (2, 4), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 16))
    spec = qjax.QuantSpec("int4")
    float_layer = nnx.clone(layer)
    float_layer.kernel[...] = qjax.fake_quant(layer.kernel[...], spec)
    qnnx.quantize(layer, {"": spec})
    np.testing.assert_allclose(layer(x), float_layer(x), rtol=1e-5, atol=1e-6)


def test_invalid_rules_are_named():
    model = CNN(nnx.Rngs(1))
    with pytest.raises(ValueError, match="rule 'head': spec 'int5'"):
        qnnx.quantize(model, {"head": "int5"})
    with pytest.raises(TypeError, match="rule 'head': expected a LayerQuant"):
        qnnx.quantize(model, {"head": 3})
    with pytest.raises(ValueError, match=r"rule 'head\[': invalid regex"):
        qnnx.quantize(model, {"head[": "int8"})
    integer = qnnx.LayerQuant(weight=INT8, act=STATIC, integer_dot=True)
    with pytest.raises(ValueError, match="rule 'head': integer_dot=True is implemented for Linen"):
        qnnx.quantize(model, {"head": integer})
    embedder = nnx.Sequential(
        nnx.Embed(16, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match=r"rule '\.\*' matches 'layers/0' \(Embed\).*None\}"):
        qnnx.quantize(embedder, {".*": "int8"})
    assert embedder.layers[1].dot_general is jax.lax.dot_general  # the error changed nothing
    qnnx.quantize(embedder, {"layers/0": None, ".*": "int8"})
    assert isinstance(embedder.layers[1].dot_general, qnnx.QuantOp)
    general = nnx.LinearGeneral(4, 2, dot_general_cls=lambda: jax.lax.dot_general, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layer '' \(LinearGeneral\) uses dot_general_cls"):
        qnnx.quantize(general, {"": "int8"})


class _Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(32, 32, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.lin(x))


class _Stacked(nnx.Module):
    """Three blocks made by nnx.vmap and run by nnx.scan, as scanned transformers are."""

    def __init__(self):
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key):
            return _Block(nnx.Rngs(key))

        self.blocks = make(jax.random.split(jax.random.key(0), 3))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def _unstacked(stacked: _Stacked) -> list[_Block]:
    blocks = [_Block(nnx.Rngs(i)) for i in range(3)]
    for i, block in enumerate(blocks):
        block.lin.kernel[...] = stacked.blocks.lin.kernel[...][i]
        block.lin.bias[...] = stacked.blocks.lin.bias[...][i]
    return blocks


def test_stacked_layers_get_static_ranges_and_learned_scales_per_layer():
    act = qnnx.ActQuant(qjax.QuantSpec("int8"), static=True)
    static = {".*kernel": qnnx.LayerQuant(weight=qjax.parse_spec("int8:per_channel"), act=act)}
    x = jax.random.normal(jax.random.key(1), (4, 32))
    model = _Stacked()
    blocks = _unstacked(model)
    qnnx.quantize(model, static)
    for block in blocks:
        qnnx.quantize(block, static)
    assert model.blocks.lin.dot_general.act_min[...].shape == (3,)
    model(x)  # uncalibrated: dynamic ranges
    qnnx.calibrate(model)(x)
    y = x
    for block in blocks:
        y = qnnx.calibrate(block)(y)
    for i, block in enumerate(blocks):
        assert model.blocks.lin.dot_general.act_min[...][i] == block.lin.dot_general.act_min[...]
        assert model.blocks.lin.dot_general.act_max[...][i] == block.lin.dot_general.act_max[...]
    qnnx.calibrate(model, False)
    y = x
    for block in blocks:
        y = qnnx.calibrate(block, False)(y)
    np.testing.assert_allclose(model(x), y, rtol=1e-6, atol=1e-6)

    lsq = _Stacked()
    kernels = lsq.blocks.lin.kernel[...]
    qnnx.quantize(lsq, {".*kernel": "int4:per_channel:lsq"})
    scale = lsq.blocks.lin.dot_general.weight_scale[...]
    assert scale.shape == (3, 1, 32)
    for i in range(3):
        expected = qjax.compute_qparams(kernels[i], qjax.parse_spec("int4:per_channel")).scale
        np.testing.assert_array_equal(scale[i], expected)
    assert lsq(x).shape == (4, 32)
