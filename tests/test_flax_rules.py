"""One rule language for the Flax adapters: parameter-path rules, unmatched rules, plans,
layers a rule cannot quantize, and drop-in layers that keep the float layer's names."""

from __future__ import annotations

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx
from qjax.flax import serve
from qjax.resolve import QjaxRuleWarning
from reference import reference

INT8 = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
A8 = qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token()))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


class Tagger(nn.Module):
    """An Embed whose vocabulary (30) no block of 8 divides, then a Dense."""

    @nn.compact
    def __call__(self, ids):
        return nn.Dense(4, name="out")(nn.Embed(30, 16, name="embed")(ids))


X = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
IDS = jnp.array([[0, 5, 29], [7, 7, 1]])


@pytest.fixture(scope="module")
def cnn_variables():
    return CNN().init(jax.random.key(1), X)


@pytest.fixture(scope="module")
def tagger_variables():
    return Tagger().init(jax.random.key(1), IDS)


def linen_apply(variables, rules, model=None, x=X, **kw):
    model = model or CNN()
    return jax.jit(qlinen.intercepted(model.apply, rules, **kw))(variables, x)


# Parameter-path rules work wherever rules are taken ---------------------------------------


@pytest.mark.parametrize("rule", [".*kernel", "params/.*/kernel", "(conv|head)/kernel"])
def test_parameter_path_rules_quantize_in_intercept(cnn_variables, rule):
    want = linen_apply(cnn_variables, {"conv|head": INT8})
    assert not np.allclose(want, CNN().apply(cnn_variables, X), atol=1e-5)
    np.testing.assert_array_equal(linen_apply(cnn_variables, {rule: INT8}), want)


def test_parameter_path_rules_convert_and_serve(cnn_variables):
    converted = serve.convert(cnn_variables, {".*kernel": INT8})
    for name in ("conv", "head"):
        assert isinstance(converted["params"][name]["kernel"], qjax.QArray)
        assert not isinstance(converted["params"][name]["bias"], qjax.QArray)
    got = jax.jit(serve.served(CNN().apply, {".*kernel": INT8}))(converted, X)
    np.testing.assert_array_equal(got, linen_apply(cnn_variables, {"conv|head": INT8}))


def test_parameter_path_rules_quantize_nnx_layers():
    x = jax.random.normal(jax.random.key(0), (3, 8))

    def model():
        layers = (nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
        return nnx.Sequential(*layers)

    by_module = qnnx.quantize(model(), {"layers/0": INT8})
    with pytest.warns(QjaxRuleWarning, match=r"'\.\*1/bias' matched nothing") as record:
        by_param = qnnx.quantize(model(), {"layers/0/kernel": INT8, ".*1/bias": INT8})
    assert record[0].filename == __file__  # the warning points at the caller
    assert isinstance(by_param.layers[0].dot_general, qnnx.QuantOp)
    assert not isinstance(by_param.layers[1].dot_general, qnnx.QuantOp)  # a bias is no weight
    np.testing.assert_array_equal(by_param(x), by_module(x))
    assert not np.allclose(by_param(x), model()(x), atol=1e-6)


# A rule that matches nothing ---------------------------------------------------------------


def test_intercept_warns_about_unmatched_rules_once_per_trace(cnn_variables):
    rules = {"conv": INT8, ".*kernal": INT8, "conv|head": INT8}  # typo; shadowed for conv
    fn = jax.jit(qlinen.intercepted(CNN().apply, rules))
    with pytest.warns(QjaxRuleWarning, match=r"'\.\*kernal'") as record:
        fn(cnn_variables, X)
    assert len(record) == 1 and "'conv'" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(cnn_variables, X)  # cached: not traced again, no second warning


def test_strict_unmatched_rules_raise_everywhere(cnn_variables):
    rules = {"conv": INT8, "nothing": INT8}
    with pytest.raises(ValueError, match="'nothing' matched nothing"):
        linen_apply(cnn_variables, rules, strict=True)
    with pytest.raises(ValueError, match=r"'nothing' matched nothing.*qjax\.flax\.linen\.plan"):
        with qlinen.intercept(rules, strict=True):
            CNN().apply(cnn_variables, X)
    with pytest.warns(QjaxRuleWarning, match="'nothing'") as record:
        with qlinen.intercept(rules):
            CNN().apply(cnn_variables, X)
    assert record[0].filename == __file__
    with pytest.raises(ValueError, match="'nothing' matched nothing"):
        serve.convert(cnn_variables, rules, strict=True)
    with pytest.warns(QjaxRuleWarning, match="'nothing'") as record:
        converted = serve.convert(cnn_variables, rules)
    assert record[0].filename == __file__
    with pytest.raises(ValueError, match="'nothing' matched nothing"):
        serve.served(CNN().apply, rules, strict=True)(converted, X)


def test_shorthand_falls_back_per_channel_where_its_block_does_not_divide(cnn_variables):
    rules = {".*kernel": "int4:per_block:16"}  # conv (3, 3, 3, 8): 3 inputs; head 288 = 18 × 16
    conv = np.asarray(cnn_variables["params"]["conv"]["kernel"])
    ptq = qjax.quantize_tree(cnn_variables, rules)["params"]["conv"]["kernel"]
    amax = np.abs(conv).reshape(-1, 8).max(axis=0)
    np.testing.assert_array_equal(np.asarray(ptq.scale).reshape(-1), amax / np.float32(7.5))
    rows = {row.path: row for row in qlinen.plan(CNN(), X, rules=rules).rows}
    assert rows["conv/kernel"].spec == ptq.spec
    assert rows["conv/kernel"].note.startswith("fallback per_channel(axis=-1): block 16")
    assert rows["head/kernel"].spec.granularity.block_size == 16
    converted = serve.convert(cnn_variables, rules, CNN(), X)
    assert converted["params"]["conv"]["kernel"].spec == ptq.spec
    np.testing.assert_array_equal(converted["params"]["conv"]["kernel"].codes(), ptq.codes())
    np.testing.assert_array_equal(
        jax.jit(serve.served(CNN().apply, rules))(converted, X), linen_apply(cnn_variables, rules)
    )
    explicit = {".*kernel": qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 16))}
    with pytest.raises(ValueError, match="block size 16 does not divide axis 2 of size 3"):
        linen_apply(cnn_variables, explicit)  # a QuantSpec is used as given


def test_activation_shorthand_blocks_the_features_not_the_tokens():
    model, x = nn.Dense(16), jax.random.normal(jax.random.key(2), (2, 40, 128))  # 40 tokens
    variables = model.init(jax.random.key(0), x)
    features = qjax.QuantSpec("int8", granularity=qjax.per_block(-1, 32))
    shorthand = {"": qlinen.LayerQuant(weight="int8:per_channel", act="int8:per_block:32")}
    explicit = {"": qlinen.LayerQuant(weight="int8:per_channel", act=features)}
    np.testing.assert_array_equal(
        linen_apply(variables, shorthand, model, x), linen_apply(variables, explicit, model, x)
    )
    assert qlinen.ActQuant("int8:per_block:32").spec == features


class OwnProjection(nn.Module):
    """A layer qjax does not know (transformers' FlaxConv1D: self.param + jnp.dot)."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], 8))


class WithOwnProjection(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="head")(OwnProjection(name="proj")(x))


def test_a_rule_naming_only_unknown_layers_says_they_stay_float():
    model, x = WithOwnProjection(), jnp.ones((2, 16))
    variables = model.init(jax.random.key(0), x)
    rules = {".*proj/kernel": "int8:per_channel", ".*": "int8:per_channel"}
    expected = r"'\.\*proj/kernel' matched only layers qjax does not quantize: 'proj' \(OwnProj"
    with pytest.warns(QjaxRuleWarning, match=expected):
        linen_apply(variables, rules, model, x)
    with pytest.raises(ValueError, match=expected):
        serve.convert(variables, rules, model, x, strict=True)
    converted = serve.convert(variables, {".*": "int8:per_channel"}, model, x)
    assert not isinstance(converted["params"]["proj"]["kernel"], qjax.QArray)


def test_layer_quant_shorthand_follows_the_layout_and_falls_back_like_rules(
    tagger_variables, cnn_variables
):
    for text in ("int8:per_channel", "int4:per_block:2"):
        as_rule = linen_apply(tagger_variables, {"embed": text}, Tagger(), IDS)
        as_layer = linen_apply(
            tagger_variables, {"embed": qlinen.LayerQuant(weight=text)}, Tagger(), IDS
        )
        np.testing.assert_array_equal(as_layer, as_rule)  # per row, blocks along features
    explicit_axis = {".*kernel": "int4:per_block:16:axis=-2"}  # conv (3, 3, 3, 8): 3 inputs
    ptq = qjax.quantize_tree(cnn_variables, explicit_axis)["params"]["conv"]["kernel"]
    converted = serve.convert(cnn_variables, explicit_axis, CNN(), X)
    assert converted["params"]["conv"]["kernel"].spec == ptq.spec
    linen_apply(cnn_variables, explicit_axis)  # falls back as PTQ does


def test_convert_by_names_refuses_a_fallback_it_cannot_check():
    model, x = nn.DenseGeneral((4, 16), name="proj"), jnp.ones((2, 64))
    variables = model.init(jax.random.key(0), x)
    rules = {".*kernel": "int4:per_block:16"}  # [in, heads, head_dim] read as [..., in, out]
    with pytest.raises(ValueError, match=r"does not divide axis 1 \(size 4\)\. Pass the model"):
        serve.convert(variables, rules)
    converted = serve.convert(variables, rules, model, x)  # blocks of 16 inputs per output
    assert converted["params"]["kernel"].scale.shape == (4, 4, 16)


def test_flax_rules_must_be_given():
    with pytest.raises(TypeError, match="no default rules"):
        qlinen.intercepted(CNN().apply, None)


def test_a_catch_all_fallback_is_no_unmatched_rule(cnn_variables):
    rules = {".*kernel": INT8, ".*": None}  # "everything else float": nothing else here
    reference_out = linen_apply(cnn_variables, {".*kernel": INT8}, strict=True)
    np.testing.assert_array_equal(linen_apply(cnn_variables, rules, strict=True), reference_out)
    converted = serve.convert(cnn_variables, rules, strict=True)
    serve.served(CNN().apply, rules, strict=True)(converted, X)
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    qnnx.quantize(model, {".*kernel": INT8, ".*": None}, strict=True)


def test_rules_in_every_form_ptq_takes(cnn_variables):
    expected = linen_apply(cnn_variables, {"conv": "int8", "head": None})
    for rules in (["conv=int8", "head=keep"], [("conv", "int8"), ("head", None)]):
        np.testing.assert_array_equal(linen_apply(cnn_variables, rules, strict=True), expected)
    with pytest.raises(ValueError, match="starts or ends with whitespace"):
        linen_apply(cnn_variables, {"conv ": "int8"})
    with pytest.raises(TypeError, match="rules is one string"):
        linen_apply(cnn_variables, "conv=int8")


def test_nnx_strict_unmatched_rule_raises_and_leaves_the_model_as_it_was():
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'blocks/\.\*' matched nothing"):
        qnnx.quantize(model, {".*kernel": INT8, "blocks/.*": INT8}, strict=True)
    assert model.dot_general is jax.lax.dot_general
    with pytest.warns(QjaxRuleWarning, match="'blocks/.*'"):
        qnnx.quantize(model, {".*kernel": INT8, "blocks/.*": INT8})
    assert isinstance(model.dot_general, qnnx.QuantOp)


# Listing what rules do --------------------------------------------------------------------


def test_linen_plan_lists_layers_paths_shapes_and_specs_without_compute():
    rules = {"head": None, ".*kernel": "int4:per_block:3", "never": "int8"}
    # A ShapeDtypeStruct as the input: the model is only traced abstractly.
    plan = qlinen.plan(CNN(), jax.ShapeDtypeStruct(X.shape, X.dtype), rules=rules)
    rows = {row.path: row for row in plan.rows}
    assert set(rows) == {"conv/kernel", "conv/bias", "head/kernel", "head/bias"}
    conv = rows["conv/kernel"]
    assert (conv.shape, conv.layer, conv.pattern) == ((3, 3, 3, 8), "Conv", ".*kernel")
    assert conv.spec == qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 3))
    assert rows["head/kernel"].spec is None and rows["head/kernel"].pattern == "head"
    assert rows["head/kernel"].shape == (288, 10)
    assert rows["conv/bias"].spec is None and rows["conv/bias"].layer == "Conv"
    assert plan.unmatched == ("never",)
    text = str(plan)
    assert "conv/kernel" in text and "(288, 10)" in text and "'never'" in text


def test_plan_lists_problems_instead_of_raising(tagger_variables):
    rules = {
        "embed": qlinen.LayerQuant(weight=INT8, act=A8),
        ".*": qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 8)),
    }
    plan = qlinen.plan(Tagger(), IDS, rules=rules)
    assert set(plan.errors) == {"embed/embedding"}
    assert "activation" in plan.errors["embed/embedding"]
    rules = {".*": qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 8))}
    plan = qlinen.plan(Tagger(), IDS, rules=rules)
    assert set(plan.errors) == {"embed/embedding"} and "'embed'" in plan.errors["embed/embedding"]
    assert plan.quantized == {"out/kernel": rules[".*"]}


def test_nnx_plan_names_paths_layers_and_hookless_layers():
    class Model(nnx.Module):
        def __init__(self):
            self.embed = nnx.Embed(10, 8, rngs=nnx.Rngs(0))
            self.proj = nnx.Linear(8, 16, rngs=nnx.Rngs(1))

    plan = qnnx.plan(Model(), {"proj/kernel": "int8:per_channel", ".*": None, "x": "int8"})
    rows = {row.path: row for row in plan.rows}
    assert rows["proj/kernel"].spec == INT8 and rows["proj/kernel"].layer == "Linear"
    assert rows["embed/embedding"].spec is None and rows["embed/embedding"].pattern == ".*"
    assert plan.unmatched == ("x",)
    plan = qnnx.plan(Model(), {".*": "int8"})
    assert set(plan.errors) == {"embed/embedding"} and "hook" in plan.errors["embed/embedding"]


# Layers a rule reaches but cannot quantize ------------------------------------------------


def test_a_catch_all_that_cannot_quantize_an_embed_names_its_path(tagger_variables):
    rules = {".*": qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 8))}
    with pytest.raises(ValueError, match=r"layer 'embed' \(Embed\).*embedding \(30, 16\)"):
        linen_apply(tagger_variables, rules, model=Tagger(), x=IDS)
    with pytest.raises(ValueError, match=re.escape("params/embed/embedding (30, 16)")):
        serve.convert(tagger_variables, rules)


def test_an_activation_spec_on_an_embed_is_refused(tagger_variables):
    rules = {".*": qlinen.LayerQuant(weight=INT8, act=A8)}
    with pytest.raises(ValueError, match=r"'embed' \(Embed\) an activation spec"):
        linen_apply(tagger_variables, rules, model=Tagger(), x=IDS)
    converted = serve.convert(tagger_variables, rules)
    with pytest.raises(ValueError, match=r"'embed' \(Embed\) an activation spec"):
        serve.served(Tagger().apply, rules)(converted, IDS)


def test_shorthand_on_an_embed_follows_its_layout(tagger_variables):
    """Rows are an embedding's channels, blocks run along its features (as quantize_tree)."""
    table = np.asarray(tagger_variables["params"]["embed"]["embedding"])
    for text, block in (("int8:per_channel", (1, 16)), ("int4:per_block:8", (1, 8))):
        name = text.split(":")[0]
        rules = {"embed": text}
        got = linen_apply(tagger_variables, rules, model=Tagger(), x=IDS, strict=True)
        w = reference(table, name, "symmetric", "scale", block)["dequantized"]
        out = jax.tree.map(np.asarray, tagger_variables["params"]["out"])
        want = np.asarray(w)[np.asarray(IDS)] @ out["kernel"] + out["bias"]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_mxfp4_shorthand_blocks_a_kernel_along_its_inputs():
    model, x = nn.Dense(16), jnp.ones((1, 64))
    plan = qlinen.plan(model, x, rules={".*": "mxfp4"})
    spec = plan.quantized["kernel"]
    assert spec.granularity.axis % 2 == 0 and spec.granularity.block_size == 32


# Drop-in layers keep the float layer's names ----------------------------------------------


def test_quant_layers_keep_the_float_layers_automatic_names():
    quant = qlinen.LayerQuant(weight=INT8)

    class Net(nn.Module):
        dense: type = nn.Dense
        conv: type = nn.Conv

        @nn.compact
        def __call__(self, x):
            x = self.conv(4, (3, 3), **self.extra())(x)
            x = nn.Conv(4, (1, 1))(x)  # a float layer between: shares the name counter
            x = self.dense(8, **self.extra())(x.reshape(x.shape[0], -1))
            return nn.Dense(2)(x)

        def extra(self):
            return {} if self.dense is nn.Dense else {"quant": quant}

    float_net = Net()
    quant_net = Net(dense=qlinen.QuantDense, conv=qlinen.QuantConv)
    float_vars = float_net.init(jax.random.key(0), X)
    assert set(float_vars["params"]) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
    quant_vars = quant_net.init(jax.random.key(0), X)
    assert jax.tree.structure(quant_vars) == jax.tree.structure(float_vars)
    # A float checkpoint loads as it is, and the quantized layers use it.
    out = quant_net.apply(float_vars, X)
    assert not np.allclose(out, float_net.apply(float_vars, X), atol=1e-6)
    assert qlinen.QuantDense.__qualname__ == "QuantDense"
    assert repr(qlinen.QuantDense(3)).startswith("QuantDense(")
