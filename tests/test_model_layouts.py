"""Weights of third-party model code read in their real layouts, and layers that must stay
float, the same way in PTQ, QAT and serving.

* Flax's ``MultiHeadDotProductAttention``: its query / key / value DenseGeneral kernels are
  ``[in, heads, head_dim]`` (one scale per (head, head_dim) output, blocks of inputs) and
  its output kernel ``[heads, head_dim, out]`` (blocks of ``head_dim`` inputs, not blocks
  spanning every head).
* transformers' Flax GPT-2: ``FlaxConv1D`` stores its ``kernel`` as ``[out, in]``; a Flax
  Dense of the same name (the nanoGPT ports) stores ``[in, out]``.
* transformers' tied heads (``decoder.apply({"params": {"kernel": embedding.T}}, h)``):
  a layer applied on its own inside the model, whose weight is not one of the model's
  variables; QAT and serving both leave it float, with a warning.

Expected values come from ``tests/reference.py`` (plain NumPy) on the block shape each
layout implies.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import (
    BertConfig,
    FlaxBertForMaskedLM,
    FlaxGPT2LMHeadModel,
    FlaxGPT2Model,
    GPT2Config,
)

import qjax
from qjax.flax import linen as qlinen
from qjax.flax import serve
from qjax.resolve import QjaxRuleWarning
from reference import reference

HEADS, HEAD_DIM, FEATURES = 4, 32, 128


@contextlib.contextmanager
def third_party():
    """transformers' Flax code relies on JAX's standard promotions, which the suite's
    conftest makes strict for qjax's own code."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x)


@pytest.fixture(scope="module")
def attention():
    model, x = Attention(), jax.random.normal(jax.random.key(1), (2, 8, FEATURES))
    variables = model.init(jax.random.key(0), x)
    # Heads of different magnitudes, as trained ones are: a scale shared across heads
    # would show.
    kernel = variables["params"]["attn"]["query"]["kernel"]
    gains = jnp.array([1.0, 4.0, 0.25, 2.0])[None, :, None]
    variables["params"]["attn"]["query"]["kernel"] = kernel * gains
    return model, variables, x


def _check(qa: qjax.QArray, w: jax.Array, name: str, block: tuple[int, ...]) -> None:
    ref = reference(np.asarray(w), name, "symmetric", "scale", block)
    assert qa.scale.shape == ref["scale"].shape
    np.testing.assert_array_equal(np.asarray(qa.scale), ref["scale"])
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), ref["dequantized"])


@pytest.mark.parametrize(
    "rule, name, query_block, out_block",
    [
        ("int8:per_channel", "int8", (FEATURES, 1, 1), (HEADS, HEAD_DIM, 1)),
        ("int4:per_block:32", "int4", (32, 1, 1), (1, 32, 1)),
    ],
)
def test_attention_kernels_are_read_as_attention(attention, rule, name, query_block, out_block):
    _, variables, _ = attention
    q = qjax.quantize_tree(variables, {".*kernel": rule})["params"]["attn"]
    w = variables["params"]["attn"]
    for proj in ("query", "key", "value"):
        _check(q[proj]["kernel"], w[proj]["kernel"], name, query_block)
    _check(q["out"]["kernel"], w["out"]["kernel"], name, out_block)


def test_attention_blocks_stay_on_the_inputs_when_they_divide_the_heads():
    # 32 heads: a block of 32 divides the heads axis too; it must still block the inputs.
    w = jax.random.normal(jax.random.key(2), (256, 32, 8))
    q = qjax.quantize_tree({"attn": {"query": {"kernel": w}}}, {".*": "int4:per_block:32"})
    _check(q["attn"]["query"]["kernel"], w, "int4", (32, 1, 1))


def test_a_scan_stacked_dense_named_query_stays_a_dense():
    # nn.scan stacks a Dense "query" as [layers, in, out]: its first axis is the shorter,
    # so it is no attention projection [in, heads, head_dim], and reads as before.
    w = jax.random.normal(jax.random.key(4), (3, 64, 48))
    q = qjax.quantize_tree({"layer": {"query": {"kernel": w}}}, {".*": "int4:per_block:32"})
    _check(q["layer"]["query"]["kernel"], w, "int4", (3, 32, 1))


@pytest.mark.parametrize("rule", ["int8:per_channel", "int4:per_block:32"])
def test_attention_qat_ptq_and_serving_agree(attention, rule):
    model, variables, x = attention
    rules = {".*kernel": rule}
    qat = jax.jit(qlinen.intercepted(model.apply, rules))(variables, x)
    ptq = qjax.dequantizing(model.apply)(qjax.quantize_tree(variables, rules), x)
    served = jax.jit(serve.served(model.apply, rules))(serve.convert(variables, rules), x)
    np.testing.assert_array_equal(qat, ptq)
    np.testing.assert_array_equal(served, qat)
    assert not np.array_equal(qat, model.apply(variables, x))


GPT2_CONFIG = {"n_embd": 64, "n_layer": 1, "n_head": 2, "vocab_size": 100, "n_positions": 16}


@pytest.fixture(scope="module")
def gpt2_params():
    with third_party():
        return FlaxGPT2LMHeadModel(GPT2Config(**GPT2_CONFIG), seed=0).params


def _gpt2_kernels(params) -> dict[str, jax.Array]:
    block = params["transformer"]["h"]["0"]
    return {
        "attn/c_attn": block["attn"]["c_attn"]["kernel"],
        "attn/c_proj": block["attn"]["c_proj"]["kernel"],
        "mlp/c_fc": block["mlp"]["c_fc"]["kernel"],
        "mlp/c_proj": block["mlp"]["c_proj"]["kernel"],
    }


@pytest.mark.parametrize(
    "rule, name", [("int8:per_channel", "int8"), ("int4:per_block:32", "int4")]
)
def test_flax_gpt2_conv1d_kernels_are_out_by_in(gpt2_params, rule, name):
    kernels = _gpt2_kernels(gpt2_params)
    assert kernels["attn/c_attn"].shape == (192, 64)  # FlaxConv1D: [out, in]
    q = _gpt2_kernels(qjax.quantize_tree(gpt2_params, {".*c_.*/kernel": rule}))
    for key, w in kernels.items():
        block = (1, w.shape[1]) if name == "int8" else (1, 32)  # per output row, along in
        _check(q[key], w, name, block)


def test_dense_layers_with_gpt2_names_stay_in_out():
    # A nanoGPT-style Flax port: nn.Dense layers named c_attn, c_proj, c_fc, [in, out].
    keys = jax.random.split(jax.random.key(3), 4)
    shapes = {"c_attn": (64, 192), "c_proj": (64, 64), "c_fc": (64, 256), "mlp_proj": (256, 64)}
    kernels = {k: jax.random.normal(key, s) for (k, s), key in zip(shapes.items(), keys)}
    tree = {
        "attn": {"c_attn": {"kernel": kernels["c_attn"]}, "c_proj": {"kernel": kernels["c_proj"]}},
        "mlp": {"c_fc": {"kernel": kernels["c_fc"]}, "c_proj": {"kernel": kernels["mlp_proj"]}},
    }
    q = qjax.quantize_tree(tree, {".*": "int4:per_block:32"})
    _check(q["attn"]["c_attn"]["kernel"], kernels["c_attn"], "int4", (32, 1))
    _check(q["attn"]["c_proj"]["kernel"], kernels["c_proj"], "int4", (32, 1))
    _check(q["mlp"]["c_fc"]["kernel"], kernels["c_fc"], "int4", (32, 1))
    _check(q["mlp"]["c_proj"]["kernel"], kernels["mlp_proj"], "int4", (32, 1))


class TiedHead(nn.Module):
    """An embedding, a Dense, and a head tied to the embedding as transformers ties it."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Dense(32, name="proj")(nn.Embed(64, 32, name="embed")(ids))
        table = self.variables["params"]["embed"]["embedding"]
        head = nn.Dense(64, use_bias=False, parent=None)
        return head.apply({"params": {"kernel": table.T}}, h)


def test_a_tied_head_stays_float_in_qat_and_serving():
    model, ids = TiedHead(), jnp.arange(12).reshape(2, 6)
    variables = model.init(jax.random.key(0), ids)
    rules = {".*kernel": "int8:per_channel"}
    with pytest.warns(QjaxRuleWarning, match="applied on its own inside the model"):
        qat = jax.jit(qlinen.intercepted(model.apply, rules))(variables, ids)
    # Only proj is quantized: the head reads the float table.
    quantized_proj = {".*proj/kernel": "int8:per_channel"}
    expected = qlinen.intercepted(model.apply, quantized_proj)(variables, ids)
    np.testing.assert_array_equal(qat, expected)
    converted = serve.convert(variables, rules)
    with pytest.warns(QjaxRuleWarning, match="applied on its own inside the model"):
        served = jax.jit(serve.served(model.apply, rules))(converted, ids)
    np.testing.assert_array_equal(served, qat)


def test_a_quantized_tied_table_read_outside_its_layer_says_what_to_do():
    model, ids = TiedHead(), jnp.arange(12).reshape(2, 6)
    variables = model.init(jax.random.key(0), ids)
    rules = {".*embed.*": "int8:per_channel"}
    converted = serve.convert(variables, rules)
    with pytest.raises(AttributeError, match=r"attribute 'T'.*tied.*Keep that weight float"):
        serve.served(model.apply, rules)(converted, ids)
    dequantized = qjax.dequantizing(model.apply)(converted, ids)  # the way that works
    np.testing.assert_array_equal(dequantized, model.apply(qjax.dequantize_tree(converted), ids))


def test_a_rule_for_only_the_tied_head_matches_no_layer():
    model, ids = TiedHead(), jnp.arange(12).reshape(2, 6)
    variables = model.init(jax.random.key(0), ids)
    rules = {"kernel": "int8:per_channel"}
    assert qlinen.plan(model, ids, rules=rules).unmatched == ("kernel",)
    with pytest.warns(QjaxRuleWarning) as record:
        out = qlinen.intercepted(model.apply, rules)(variables, ids)
    messages = [str(w.message) for w in record]
    assert any("applied on its own" in m for m in messages)
    assert any("'kernel' matched nothing" in m for m in messages)
    np.testing.assert_array_equal(out, model.apply(variables, ids))


def test_transformers_tied_decoder_serves_as_trained():
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=200,
        max_position_embeddings=16,
    )
    with third_party():
        model = FlaxBertForMaskedLM(config, seed=0)
        ids = np.arange(16, dtype=np.int32).reshape(2, 8) + 3
        zeros, positions = np.zeros_like(ids), np.broadcast_to(np.arange(8), ids.shape)

        def apply(variables, ids):
            return model.module.apply(variables, ids, jnp.ones_like(ids), zeros, positions, None)[0]

        variables, rules = {"params": model.params}, {".*kernel": "int8:per_channel"}
        with pytest.warns(QjaxRuleWarning, match="applied on its own"):
            qat = jax.jit(qlinen.intercepted(apply, rules))(variables, ids)
        with pytest.warns(QjaxRuleWarning, match="applied on its own"):
            served = jax.jit(serve.served(apply, rules))(serve.convert(variables, rules), ids)
    np.testing.assert_array_equal(served, qat)


# Layers whose configuration, not their name, tells the layout; layers stacked by nn.scan.


def _configured_layers():
    """(layer, input, an output axis of its kernel, the block of one scale per output for
    int8:per_channel, the block of int4:per_block:8) for kernels whose name says nothing."""
    x3 = jax.random.normal(jax.random.key(1), (2, 5, 32))
    x4 = x3[:, :, None, :8].repeat(5, axis=2)
    return [
        (nn.DenseGeneral((4, 16), name="proj"), x3, 1, (32, 1, 1), (8, 1, 1)),  # [in, h, d]
        # [h, d, out]: both contracted
        (
            nn.DenseGeneral(8, axis=(-2, -1), name="proj"),
            x3.reshape(2, 5, 4, 8),
            2,
            (4, 8, 1),
            (1, 8, 1),
        ),
        # [batch, in, out]
        (nn.DenseGeneral(24, batch_dims=(0,), name="proj"), x3[:, 0], 2, (1, 32, 1), (1, 8, 1)),
        (nn.Einsum((4, 32, 16), "btd,ndh->btnh", name="proj"), x3, 0, (1, 32, 1), (1, 8, 1)),
        # [kh, kw, out, in]
        (
            nn.ConvTranspose(16, (3, 3), transpose_kernel=True, name="proj"),
            x4,
            2,
            (3, 3, 1, 8),
            (3, 3, 1, 8),
        ),
    ]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("rule, name", [("int8:per_channel", "int8"), ("int4:per_block:8", "int4")])
def test_configured_layouts_per_output_in_qat_and_serving(case, rule, name):
    layer, x, out_axis, channel_block, input_block = _configured_layers()[case]
    variables = layer.init(jax.random.key(0), x)
    kernel = variables["params"]["kernel"]
    gains = jnp.array([1.0, 8.0, 0.25, 3.0]).repeat(kernel.shape[out_axis] // 4)
    kernel = kernel * gains.reshape([-1 if i == out_axis else 1 for i in range(kernel.ndim)])
    variables = {"params": {**variables["params"], "kernel": kernel}}
    block = channel_block if name == "int8" else input_block
    ref = reference(np.asarray(kernel), name, "symmetric", "scale", block)["dequantized"]
    expected = layer.apply({"params": {**variables["params"], "kernel": ref}}, x)
    rules = {".*": rule}
    qat = jax.jit(qlinen.intercepted(layer.apply, rules))(variables, x)
    np.testing.assert_array_equal(qat, expected)
    converted = serve.convert(variables, rules, layer, x)
    _check(converted["params"]["kernel"], kernel, name, block)
    np.testing.assert_array_equal(jax.jit(serve.served(layer.apply, rules))(converted, x), qat)
    (row,) = [r for r in qlinen.plan(layer, x, rules=rules).rows if r.path == "kernel"]
    assert row.spec == converted["params"]["kernel"].spec


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(32, name="fc")(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
        return stack(name="layers")(x, None)[0]


@pytest.mark.parametrize(
    "rule, name", [("int8:per_channel", "int8"), ("int4:per_block:16", "int4")]
)
def test_scanned_layers_convert_and_serve_one_layer_at_a_time(rule, name):
    model, x = Scanned(), jax.random.normal(jax.random.key(1), (3, 32))
    variables = model.init(jax.random.key(0), x)
    kernels = variables["params"]["layers"]["fc"]["kernel"]  # [4, 32, 32]
    variables["params"]["layers"]["fc"]["kernel"] = kernels * jnp.arange(1.0, 5.0)[:, None, None]
    rules = {".*": rule}
    qat = jax.jit(qlinen.intercepted(model.apply, rules))(variables, x)
    converted = serve.convert(variables, rules, model, x)
    stored = converted["params"]["layers"]["fc"]["kernel"]
    block = (32, 1) if name == "int8" else (16, 1)
    for i in range(4):
        one = jax.tree.map(lambda a, i=i: a[i], stored)
        _check(one, variables["params"]["layers"]["fc"]["kernel"][i], name, block)
    np.testing.assert_array_equal(jax.jit(serve.served(model.apply, rules))(converted, x), qat)


def test_convert_leaves_float_what_qat_left_float(gpt2_params):
    # transformers' FlaxConv1D is no layer qjax quantizes: QAT runs it float, so must
    # convert (else dequantizing() would serve a model QAT never saw).
    ids = jnp.arange(8).reshape(1, 8)
    inputs = (ids, jnp.ones_like(ids), jnp.arange(8)[None])  # ids, attention mask, positions
    variables = {"params": gpt2_params["transformer"]}  # no tied head, which QAT reads float
    rules = {".*": "int8:per_channel"}
    with third_party():
        model = FlaxGPT2Model(GPT2Config(**GPT2_CONFIG), _do_init=False)
        qat = jax.jit(qlinen.intercepted(model.module.apply, rules))(variables, *inputs)
        converted = serve.convert(variables, rules, model.module, *inputs)
        leaves = jax.tree_util.tree_leaves_with_path(
            converted, is_leaf=lambda v: isinstance(v, qjax.QArray)
        )
        quantized = {p[-1].key for p, leaf in leaves if isinstance(leaf, qjax.QArray)}
        assert quantized == {"embedding"}
        served = qjax.dequantizing(model.module.apply)(converted, *inputs)
    np.testing.assert_array_equal(served.last_hidden_state, qat.last_hidden_state)


@pytest.mark.parametrize("kind", ["LinearGeneral", "Einsum"])
def test_nnx_configured_layouts_per_output(kind):
    from flax import nnx

    from qjax.flax import nnx as qnnx

    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    if kind == "LinearGeneral":  # [in, heads, head_dim]
        layer, block, head_axis = nnx.LinearGeneral(32, (4, 16), rngs=rngs), (32, 1, 1), 1
    else:  # [heads, in, head_dim]
        layer = nnx.Einsum("btd,ndh->btnh", (4, 32, 16), rngs=rngs)
        block, head_axis = (1, 32, 1), 0
    gains = jnp.array([1.0, 8.0, 0.25, 3.0]).reshape(
        [-1 if i == head_axis else 1 for i in range(3)]
    )
    layer.kernel.set_value(layer.kernel.get_value() * gains)
    ref = reference(np.asarray(layer.kernel.get_value()), "int8", "symmetric", "scale", block)
    float_kernel = layer.kernel.get_value()
    layer.kernel.set_value(jnp.asarray(ref["dequantized"]))
    expected = layer(x)
    layer.kernel.set_value(float_kernel)
    qnnx.quantize(layer, {".*": "int8:per_channel"})
    np.testing.assert_array_equal(layer(x), expected)


# DenseGeneral over heads; Einsum (AWQ's channel scales serve on Dense-like layers only)
@pytest.mark.parametrize("case, method", [(0, "gptq"), (0, "awq"), (3, "gptq")])
def test_calibrated_ptq_reads_configured_layouts_from_the_captured_dot(case, method):
    # quantize_tree has no layer, only names; the statistics' contracted axes tell it what
    # the layer's configuration tells QAT, so the calibrated tree serves like QAT's.
    layer, x, _, _, _ = _configured_layers()[case]
    variables = layer.init(jax.random.key(0), x)
    rules = {".*kernel": "int4:per_block:8"}
    stats = qjax.capture.accumulate(layer.apply, variables, [x])
    tree = qjax.quantize_tree(variables, rules, method=method, statistics=stats)
    (row,) = [r for r in qlinen.plan(layer, x, rules=rules).rows if r.path == "kernel"]
    assert tree["params"]["kernel"].spec == row.spec
    served = jax.jit(serve.served(layer.apply, rules))(tree, x)
    np.testing.assert_array_equal(served, layer.apply(qjax.dequantize_tree(tree), x))


class CallTimeEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):  # the equation given with the call; the layer keeps its bias
        return nn.Einsum((4, 32, 16), name="proj")(x, "btd,ndh->btnh")


def test_call_time_einsum_equation_reaches_plan_and_convert():
    model, x = CallTimeEinsum(), jax.random.normal(jax.random.key(1), (2, 5, 32))
    variables = model.init(jax.random.key(0), x)
    rules = {".*": "int4:per_block:8"}
    qat = jax.jit(qlinen.intercepted(model.apply, rules))(variables, x)
    converted = serve.convert(variables, rules, model, x)
    kernel = variables["params"]["proj"]["kernel"]
    _check(converted["params"]["proj"]["kernel"], kernel, "int4", (1, 8, 1))
    (row,) = [r for r in qlinen.plan(model, x, rules=rules).rows if r.path == "proj/kernel"]
    assert row.spec == converted["params"]["proj"]["kernel"].spec
    np.testing.assert_array_equal(jax.jit(serve.served(model.apply, rules))(converted, x), qat)


class ScannedAlongAxisOne(nn.Module):
    @nn.compact
    def __call__(self, x):  # MaxText's param_scan_axis=1
        stack = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=4)
        return stack(name="layers")(x, None)[0]


def test_layers_stacked_along_another_axis_are_refused_by_convert():
    model, x = ScannedAlongAxisOne(), jax.random.normal(jax.random.key(1), (3, 32))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"along axes \(1,\).*leading axes only"):
        serve.convert(variables, {".*": "int8:per_channel"}, model, x)


def test_convert_refuses_variables_of_another_model():
    model, x = ScannedAlongAxisOne(), jax.random.normal(jax.random.key(1), (3, 32))
    variables = nn.Dense(8).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"2 of its params are missing, e\.g\. params/layers/fc/"):
        serve.convert(variables, {".*": "int8:per_channel"}, model, x)
    narrower = nn.Dense(8).init(jax.random.key(0), jnp.ones((3, 16)))  # other inputs
    with pytest.raises(ValueError, match=r"differ in shape.*\(16, 8\) in the variables"):
        serve.convert(narrower, {".*": "int8:per_channel"}, nn.Dense(8), x)


@pytest.mark.parametrize(
    "layer, x, block",
    [  # contracted over (heads, head_dim); a matrix stored [out, in] and used as x @ w.T
        (nn.Einsum((4, 8, 32), "btnh,nhd->btd"), jnp.ones((2, 5, 4, 8)), (1, 8, 1)),
        (nn.Einsum((16, 32), "btd,hd->bth"), jnp.ones((2, 5, 32)), (1, 8)),
    ],
)
def test_calibrated_ptq_reads_every_captured_contraction(layer, x, block):
    x = x * jax.random.normal(jax.random.key(2), x.shape)
    variables = layer.init(jax.random.key(0), x)
    rules = {".*kernel": "int4:per_block:8"}
    stats = qjax.capture.accumulate(layer.apply, variables, [x])
    tree = qjax.quantize_tree(variables, rules, method="gptq", statistics=stats)
    qa = tree["params"]["kernel"]
    assert qa.scale.shape == tuple(d // b for d, b in zip(qa.shape, block))
    (row,) = [r for r in qlinen.plan(layer, x, rules=rules).rows if r.path == "kernel"]
    assert qa.spec == row.spec
    np.testing.assert_array_equal(
        jax.jit(serve.served(layer.apply, rules))(tree, x),
        layer.apply(qjax.dequantize_tree(tree), x),
    )
