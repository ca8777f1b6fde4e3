"""quantize_tree / dequantize_tree: rules by path, defaults, vmap over stacked layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax


def params_like_a_flax_model():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(512, 64)(tokens)
            x = nn.Conv(32, (3,))(x)
            x = nn.LayerNorm()(x)
            x = nn.Dense(128, name="mlp_in")(x)
            return nn.Dense(64, name="mlp_out")(x)

    return Model().init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def test_default_rules_know_flax_layouts():
    params = params_like_a_flax_model()
    q = qjax.quantize_tree(params)
    p = q["params"]
    assert isinstance(p["Embed_0"]["embedding"], qjax.QArray)
    assert p["Embed_0"]["embedding"].scale.shape == (512, 1)  # one scale per row
    assert p["Conv_0"]["kernel"].scale.shape == (1, 1, 32)  # one per output channel
    assert p["mlp_in"]["kernel"].scale.shape == (1, 128)
    assert p["mlp_out"]["kernel"].scale.shape == (1, 64)
    for leaf in (p["mlp_in"]["bias"], p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"]):
        assert not isinstance(leaf, qjax.QArray)
    # Structure is unchanged, and dequantization gives arrays of the same shapes.
    deq = qjax.dequantize_tree(q)
    assert jax.tree.structure(deq) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(deq), jax.tree.leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_rules_first_match_wins_and_none_keeps_float():
    params = params_like_a_flax_model()
    rules = {
        ".*mlp_out.*": None,
        ".*mlp.*kernel": "int4:per_block:32",
        ".*kernel": qjax.QuantSpec("uint8", scheme="asymmetric", granularity=qjax.per_channel(-1)),
    }
    q = qjax.quantize_tree(params, rules)["params"]
    assert not isinstance(q["mlp_out"]["kernel"], qjax.QArray)
    assert q["mlp_in"]["kernel"].spec == qjax.parse_spec("int4:per_block:32")
    assert q["mlp_in"]["kernel"].scale.shape == (1, 128)  # kernel (32, 128)
    assert q["Conv_0"]["kernel"].spec.dtype == "uint8"
    assert not isinstance(q["Embed_0"]["embedding"], qjax.QArray)  # no rule matches


def test_quantized_leaves_equal_quantize_on_the_leaf():
    params = params_like_a_flax_model()
    spec = qjax.parse_spec("int4:per_block:32")
    q = qjax.quantize_tree(params, {".*mlp_in/kernel": spec})
    expected = qjax.quantize(params["params"]["mlp_in"]["kernel"], spec)
    got = q["params"]["mlp_in"]["kernel"]
    np.testing.assert_array_equal(got.data, expected.data)
    np.testing.assert_array_equal(got.scale, expected.scale)


def test_min_size_and_non_float_leaves_stay():
    params = {
        "small": jnp.ones((8, 8)),
        "big": jnp.ones((64, 64)),
        "ids": jnp.ones((64, 64), jnp.int32),
    }
    q = qjax.quantize_tree(params, {".*": "int8"}, min_size=100)
    assert not isinstance(q["small"], qjax.QArray)
    assert isinstance(q["big"], qjax.QArray)
    assert q["ids"].dtype == jnp.int32
    assert isinstance(qjax.quantize_tree(params, {".*": "int8"}, min_size=0)["small"], qjax.QArray)


def test_works_under_jit_and_matches_eager():
    params = params_like_a_flax_model()
    rules = {".*kernel": "int4:per_block:32", ".*embedding": "int8:per_channel:axis=0"}
    eager = qjax.quantize_tree(params, rules, min_size=0)
    jitted = jax.jit(lambda p: qjax.quantize_tree(p, rules, min_size=0))(params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)


def test_vmap_over_stacked_layers_equals_a_loop():
    key = jax.random.key(1)
    stacked = {
        "blocks": {
            "attn": {"kernel": jax.random.normal(key, (6, 64, 64))},
            "mlp": {
                "kernel": 3 * jax.random.normal(key, (6, 64, 256)),
                "bias": jnp.zeros((6, 256)),
            },
        }
    }
    rules = {".*attn.*": "int8", ".*mlp/kernel": "int4:per_block:32"}
    vmapped = jax.jit(jax.vmap(lambda p: qjax.quantize_tree(p, rules, min_size=0)))(stacked)
    for layer in range(6):
        one = jax.tree.map(lambda a, i=layer: a[i], stacked)
        expected = qjax.quantize_tree(one, rules, min_size=0)
        got = jax.tree.map(lambda a, i=layer: a[i], vmapped)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)
    # Each layer has its own per-tensor scale.
    assert vmapped["blocks"]["attn"]["kernel"].scale.shape == (6, 1, 1)


def test_non_finite_leaf_is_named():
    params = {"encoder": {"kernel": jnp.ones((64, 64)).at[3, 4].set(jnp.nan).at[0, 0].set(jnp.inf)}}
    with pytest.raises(ValueError, match=r"'encoder/kernel' \(shape \(64, 64\)\) has 2 NaN"):
        qjax.quantize_tree(params, {".*": "int8"}, min_size=0)
    counts = jax.jit(qjax.count_nonfinite)(params)
    assert int(counts["encoder"]["kernel"]) == 2


def test_leaf_errors_name_the_leaf():
    # Without the per-channel fallback (the default), a block that does not fit is an error
    # naming the leaf and the axis that would fit.
    params = {"w": jnp.ones((30, 64))}
    with pytest.raises(
        ValueError, match=r"parameter 'w' .*block 32 does not divide axis 0 .*divides axis 1"
    ):
        qjax.quantize_tree(params, {".*": "int4:per_block:32"}, fallback=None)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({".*": "int4:per_block"}, "per_block needs a block size"),
        ({".*": "int4:wide"}, "cannot read 'wide'"),
        ({".*": "int9"}, "unsupported target dtype 'int9'"),
        ({"(": "int8"}, "invalid regex"),
        (["kernel"], "must read REGEX=SPEC"),
        ({".*": 8}, "spec must be a QuantSpec, shorthand text or None"),
        ({".*": "mxfp4:per_channel"}, "sets its own blocks"),
    ],
)
def test_invalid_rules_name_the_rule(rules, message):
    with pytest.raises((ValueError, TypeError), match=message):
        qjax.quantize_tree({"w": jnp.ones((64, 64))}, rules)


def test_command_line_style_rules():
    rules = qjax.parse_rules([".*kernel=int4:per_block:32:axis=0", ".*=keep"])
    assert rules[0][1].spec.granularity == qjax.per_block(0, 32)
    assert rules[1] == (".*", qjax.LeafRule(None))


def test_mx_shorthand_can_block_along_the_flax_contraction_axis():
    spec = qjax.parse_spec("mxfp4:axis=-2")
    assert spec.scale_dtype == "float8_e8m0fnu"
    assert spec.granularity.block_shape((64, 16)) == (32, 1)
    with pytest.raises(ValueError, match="sets its own blocks"):
        qjax.parse_spec("mxfp4:per_channel")


def test_dequantize_tree_of_bfloat16_leaves_under_strict_promotion():
    # unfused() once selected a float32 NaN into a bfloat16 product: a promotion error.
    w = jnp.linspace(-1, 1, 64 * 32, dtype=jnp.bfloat16).reshape(64, 32)
    tree = qjax.quantize_tree({"kernel": w}, {".*": "int4:asymmetric:minval:per_block:16"})
    out = qjax.dequantize_tree(tree)["kernel"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(out, np.float32), np.asarray(tree["kernel"].dequantize(), np.float32)
    )
