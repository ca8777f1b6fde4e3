"""QArray.channel_scale: the per-input-channel multiplier of AWQ and SmoothQuant.

Dequantizing applies it, ``nbytes`` counts it, the QArray checks its shape and dtype,
files keep it bit for bit (as format version 3), and transformations pass it through.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import qjax
from qjax import io as qio

RNG = np.random.default_rng(0)
W = RNG.normal(size=(64, 96)).astype(np.float32)
M = RNG.uniform(0.25, 4.0, size=(64, 1)).astype(np.float32)


@pytest.fixture(params=["int8:per_channel", "int4:per_block:16", "mxfp4", "uint4:asymmetric"])
def scaled(request) -> qjax.QArray:
    qa = qjax.quantize(jnp.asarray(W), request.param)
    return dataclasses.replace(qa, channel_scale=jnp.asarray(M))


def test_dequantize_multiplies_each_input_channel(scaled):
    plain = np.asarray(dataclasses.replace(scaled, channel_scale=None).dequantize())
    np.testing.assert_array_equal(np.asarray(scaled.dequantize()), plain * M)


def test_bfloat16_result_is_rounded_once_from_float32():
    qa = qjax.quantize(jnp.asarray(W, jnp.bfloat16), "int8:per_channel")
    scaled = dataclasses.replace(qa, channel_scale=jnp.asarray(M))
    core = np.asarray(dataclasses.replace(qa, float_dtype="float32").dequantize())
    got = scaled.dequantize()
    assert got.dtype == jnp.bfloat16
    expected = jnp.asarray(core * M).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


def test_nbytes_counts_the_multipliers(scaled):
    plain = dataclasses.replace(scaled, channel_scale=None)
    assert scaled.nbytes == plain.nbytes + M.size * 4


@pytest.mark.parametrize("shape", [(64,), (1, 64), (64, 96, 1), (2, 1)])
def test_shapes_that_do_not_broadcast_along_the_axes_are_refused(shape):
    qa = qjax.quantize(jnp.asarray(W), "int8")
    with pytest.raises(ValueError, match=r"channel_scale has shape .* same rank"):
        dataclasses.replace(qa, channel_scale=jnp.ones(shape))


def test_validate_wants_float32():
    qa = qjax.quantize(jnp.asarray(W), "int8")
    loose = dataclasses.replace(qa, channel_scale=jnp.asarray(M, jnp.bfloat16))
    with pytest.raises(ValueError, match="channel_scale must be float32"):
        loose.validate()
    with pytest.raises(ValueError, match="channel_scale must be floating"):
        dataclasses.replace(qa, channel_scale=jnp.ones((64, 1), jnp.int32))


def test_file_round_trip_is_bit_exact_and_version_3(tmp_path, scaled):
    path = str(tmp_path / "scaled.safetensors")
    qio.save(path, {"layer": {"kernel": scaled}, "bias": jnp.ones(3)})
    back = qio.load(path)["layer"]["kernel"]
    np.testing.assert_array_equal(np.asarray(back.channel_scale), M)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(scaled.dequantize()))
    with safe_open(path, "np") as f:
        assert json.loads(f.metadata()["qjax"])["version"] == 3
        assert "layer/kernel:channel_scale" in f.keys()


def test_trees_without_channel_scales_stay_version_2(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    qio.save(path, {"kernel": qjax.quantize(jnp.asarray(W), "int8")})
    with safe_open(path, "np") as f:
        assert json.loads(f.metadata()["qjax"])["version"] == 2
    assert qio.load(path)["kernel"].channel_scale is None


def test_jit_vmap_and_tree_map_carry_it(scaled):
    out = jax.jit(lambda q: q.dequantize())(scaled)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(scaled.dequantize()))
    assert len(jax.tree.leaves(scaled)) == len(jax.tree.leaves(dataclasses.replace(
        scaled, channel_scale=None))) + 1
    stacked = jnp.stack([jnp.asarray(W), 2 * jnp.asarray(W)])
    ms = jnp.stack([jnp.asarray(M), jnp.asarray(M[::-1])])

    def one(w, m):
        return dataclasses.replace(qjax.quantize(w, "int8:per_channel"), channel_scale=m)

    batched = jax.vmap(one)(stacked, ms)
    assert batched.channel_scale.shape == (2, 64, 1)
    loop = [one(stacked[i], ms[i]).dequantize() for i in range(2)]
    np.testing.assert_array_equal(np.asarray(batched.dequantize()), np.stack(loop))


def test_dequantize_tree_and_report_see_the_effective_weight(scaled):
    tree = {"kernel": scaled}
    np.testing.assert_array_equal(
        np.asarray(qjax.dequantize_tree(tree)["kernel"]), np.asarray(scaled.dequantize())
    )
