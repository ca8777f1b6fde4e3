"""Serving a deep QAT model: convert + served reproduce the QAT eval output bit for bit.

A tiny (width 16) but deep model: three embeddings summed (as BERT sums word, token-type
and position embeddings), then 12 residual blocks of two Dense layers: 27 quantized
layers, so a last-bit difference in any one of them moves activation codes further on.
Two causes of such differences are covered: integer dots in serving where QAT ran float
dots, and XLA:CPU fusing a dequantized ``scale * q`` into the add that consumes it (one
rounding, a fused multiply-add) in one graph and not in the other (the embedding sum).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.flax import linen as qlinen
from qjax.flax import serve

WIDTH, BLOCKS, VOCAB, LENGTH = 16, 12, 40, 8
W8 = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
A8_TOKEN = qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token()))
EMBED = {".*embedding": "int8:per_channel"}  # rows of each table: its Flax layout
RULES = {
    "weight-only": {**EMBED, ".*kernel": "int4:per_block:8"},
    "w8a8": {**EMBED, ".*kernel": qlinen.LayerQuant(weight=W8, act=A8_TOKEN)},
    "w8a8-integer-dot": {
        **EMBED,
        ".*kernel": qlinen.LayerQuant(weight=W8, act=A8_TOKEN, integer_dot=True),
    },
}


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(2 * WIDTH)(nn.LayerNorm()(x)))
        return x + nn.Dense(WIDTH)(h)


class Deep(nn.Module):
    @nn.compact
    def __call__(self, ids, kinds):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = nn.Embed(VOCAB, WIDTH)(ids) + nn.Embed(2, WIDTH)(kinds)
        x = x + nn.Embed(LENGTH, WIDTH)(positions)
        for _ in range(BLOCKS):
            x = Block()(x)
        return x


MODEL = Deep()
IDS = jax.random.randint(jax.random.key(0), (4, LENGTH), 0, VOCAB)
KINDS = jnp.zeros_like(IDS)  # one segment, as a single-sentence BERT input


@pytest.fixture(scope="module")
def variables():
    return MODEL.init(jax.random.key(1), IDS, KINDS)


def quantized_layers(rules) -> int:
    return len(qlinen.plan(MODEL, IDS, KINDS, rules=rules).quantized)


def test_the_model_is_deep():
    assert quantized_layers(RULES["weight-only"]) == 3 + 2 * BLOCKS >= 24


@pytest.mark.parametrize("name", sorted(RULES))
def test_served_model_is_bit_exact_with_the_qat_eval_model(variables, name):
    rules = RULES[name]
    qat = jax.jit(qlinen.intercepted(MODEL.apply, rules, strict=True))(variables, IDS, KINDS)
    converted = serve.convert(variables, rules, strict=True)
    got = jax.jit(serve.served(MODEL.apply, rules, strict=True))(converted, IDS, KINDS)
    np.testing.assert_array_equal(got, qat)
    assert not np.allclose(qat, MODEL.apply(variables, IDS, KINDS), atol=1e-3)


def test_integer_dots_are_used_exactly_where_qat_used_them(variables):
    """The default serves each layer as QAT ran it: int32 dots only for integer_dot=True."""
    counts = {}
    for name in ("w8a8", "w8a8-integer-dot"):
        converted = serve.convert(variables, RULES[name])
        jaxpr = jax.make_jaxpr(serve.served(MODEL.apply, RULES[name]))(converted, IDS, KINDS)
        counts[name] = str(jaxpr).count("preferred_element_type=int32")
    assert counts == {"w8a8": 0, "w8a8-integer-dot": 2 * BLOCKS}


def test_integer_dots_on_a_fake_quant_model_are_close_not_exact(variables):
    """integer_dots="auto" on layers trained with float dots: rounding differences only."""
    rules = RULES["w8a8"]
    qat = jax.jit(qlinen.intercepted(MODEL.apply, rules))(variables, IDS, KINDS)
    served = serve.served(MODEL.apply, rules, integer_dots="auto")
    got = jax.jit(served)(serve.convert(variables, rules), IDS, KINDS)
    np.testing.assert_allclose(got, qat, rtol=0, atol=0.05 * float(np.max(np.abs(qat))))


def test_dequantizing_runs_any_apply_on_packed_weights_bit_exact_with_qat(variables):
    rules = RULES["weight-only"]
    qat = jax.jit(qlinen.intercepted(MODEL.apply, rules))(variables, IDS, KINDS)
    converted = serve.convert(variables, rules)
    packed = [leaf for leaf in jax.tree.leaves(converted, is_leaf=qjax.QArray.__instancecheck__)
              if isinstance(leaf, qjax.QArray)]
    assert len(packed) == 3 + 2 * BLOCKS and all(q.data.dtype != jnp.float32 for q in packed)
    run = jax.jit(serve.dequantizing(MODEL.apply))  # the plain float apply, unaware of QArrays
    np.testing.assert_array_equal(run(converted, IDS, KINDS), qat)
    # Inside the jitted function: its inputs are the packed arrays, not float weights.
    arg_dtypes = {str(a.dtype) for a in jax.tree.leaves(run.lower(converted, IDS, KINDS).args_info)}
    assert "uint8" in arg_dtypes  # int4 codes, two a byte
    assert jax.tree.structure(jax.eval_shape(run, converted, IDS, KINDS)) == jax.tree.structure(
        qat
    )


def test_dequantizing_passes_non_qarray_arguments_through():
    def fn(a, *, b):
        return {"a": a, "b": b}

    q = qjax.quantize(jnp.arange(8.0).reshape(2, 4), qjax.QuantSpec("int8"))
    out = serve.dequantizing(fn)([q, 3], b="text")
    assert out["b"] == "text" and out["a"][1] == 3
    np.testing.assert_array_equal(out["a"][0], q.dequantize())
