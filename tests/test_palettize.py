"""Lookup-table weights (qjax.palettize): NF4, k-means palettization, n-bit index packing.

Every expected value comes from plain NumPy written here (the NF4 levels from normal
quantiles, nearest-level assignment, Lloyd iterations, bit-stream packing, STE
gradients), on tiny arrays.
"""

from __future__ import annotations

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import packing
from qjax.palettize import (
    NF4_LEVELS,
    LUTArray,
    fake_nf4,
    fake_palettize,
    kmeans_table,
    nf4,
    palettize,
    per_grouped_channel,
    quantize_to_table,
)

RNG = np.random.default_rng(20261130)


# --- NumPy references ----------------------------------------------------------------------


def nf4_levels_from_quantiles() -> np.ndarray:
    """QLoRA's construction: 8 positive and 7 negative normal quantiles between
    ``offset = 0.9677083`` and 0.5, an exact zero, scaled to [-1, 1]."""
    offset = 0.9677083
    ppf = statistics.NormalDist().inv_cdf
    positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array([*positive, 0.0, *negative]))
    return values / values.max()


def nearest_np(v: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of a sorted float32 table: the number of float32
    midpoints strictly below ``v`` (a value on a midpoint takes the lower entry)."""
    table = np.asarray(table, np.float32)
    mids = (table[1:] + table[:-1]) * np.float32(0.5)
    return (np.asarray(v, np.float32)[..., None] > mids).sum(-1)


def nf4_np(x: np.ndarray, axis: int, block: int):
    """Codes, absmax (param shape) and dequantized values, blocks along ``axis``."""
    x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    xb = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))
    absmax = np.abs(xb).max(-1, keepdims=True)
    normalized = xb / np.where(absmax == 0, np.float32(1), absmax)
    codes = nearest_np(normalized, NF4_LEVELS)
    values = NF4_LEVELS[codes] * absmax

    def back(a):
        return np.moveaxis(a.reshape(x.shape[:-1] + (-1,)), -1, axis)

    return back(codes), back(absmax), back(values)


def weighted_init_np(v: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """The documented init: the smallest value whose cumulative weight reaches
    ``(j + 1/2) / k`` of the total."""
    order = np.argsort(v, kind="stable")
    v, cw = v[order], np.cumsum(w[order], dtype=np.float32)
    targets = (2 * np.arange(k, dtype=np.float32) + 1) * cw[-1]
    position = np.searchsorted(cw * np.float32(2 * k), targets, side="left")
    return v[np.minimum(position, len(v) - 1)]


def lloyd_np(v: np.ndarray, w: np.ndarray, k: int, iters: int) -> np.ndarray:
    """Lloyd's algorithm in NumPy (means in float64), from the documented init."""
    v, w = np.asarray(v, np.float32).ravel(), np.asarray(w, np.float32).ravel()
    table = weighted_init_np(v, w, k)
    for _ in range(iters):
        codes = nearest_np(v, table)
        sums = np.bincount(codes, weights=w.astype(np.float64) * v, minlength=k)
        mass = np.bincount(codes, weights=w, minlength=k)
        new = np.where(mass > 0, sums / np.where(mass > 0, mass, 1), table).astype(np.float32)
        if np.array_equal(new, table):
            break
        table = new
    return table


def pack_np(codes: np.ndarray, bits: int) -> np.ndarray:
    """Rows of codes as little-endian bit streams, padded to whole groups of bytes."""
    group = np.lcm(8, bits)
    rows = []
    for row in codes.reshape(-1, codes.shape[-1]):
        stream = [(int(c) >> b) & 1 for c in row for b in range(bits)]
        stream += [0] * (-len(stream) % group)
        rows.append(np.packbits(np.array(stream, np.uint8), bitorder="little"))
    return np.stack(rows).reshape(codes.shape[:-1] + (-1,))


# --- NF4 ----------------------------------------------------------------------------------


def test_nf4_levels_are_qloras_normal_quantiles():
    np.testing.assert_allclose(NF4_LEVELS, nf4_levels_from_quantiles(), rtol=0, atol=2e-7)
    assert NF4_LEVELS.dtype == np.float32 and NF4_LEVELS[7] == 0.0


@pytest.mark.parametrize(("shape", "axis"), [((128, 24), -2), ((6, 128), -1), ((2, 64, 3), 1)])
def test_nf4_matches_numpy(shape, axis):
    x = RNG.standard_normal(shape).astype(np.float32)
    codes, absmax, values = nf4_np(x, axis, 64)
    la = jax.jit(nf4, static_argnums=(1,))(jnp.asarray(x), axis)
    np.testing.assert_array_equal(la.codes(), codes)
    np.testing.assert_array_equal(la.scale, absmax)
    np.testing.assert_array_equal(la.dequantize(), values)
    np.testing.assert_array_equal(fake_nf4(jnp.asarray(x), axis), values)
    assert la.indices.dtype == jnp.uint8 and la.indices.shape[-1] == -(-shape[-1] // 2)
    assert la.nbytes == la.indices.size + 4 * absmax.size + 4 * 16
    assert la.bits_per_weight == 8 * la.nbytes / x.size


def test_nf4_ties_take_the_lower_level_and_zero_blocks_stay_zero():
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) * np.float32(0.5)
    block = np.concatenate([[1.0], mids, np.zeros(64 - 1 - 15)]).astype(np.float32)
    x = np.stack([block, np.zeros(64, np.float32)])  # absmax 1: each midpoint is a tie
    la = nf4(jnp.asarray(x), axis=-1)
    codes = np.asarray(la.codes())
    np.testing.assert_array_equal(codes[0, 1:16], np.arange(15))  # the lower of each pair
    np.testing.assert_array_equal(codes[1], np.full(64, 7))  # level 0.0
    np.testing.assert_array_equal(la.scale, [[1.0], [0.0]])
    np.testing.assert_array_equal(la.dequantize()[1], np.zeros(64))


def test_nf4_keeps_bfloat16():
    x = jnp.asarray(RNG.standard_normal((64, 4)), jnp.bfloat16)
    _, _, values = nf4_np(np.asarray(x, np.float32), -2, 64)
    out = nf4(x).dequantize()
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, values.astype(jnp.bfloat16))


def test_nf4_vmap_stacks_lutarrays():
    x = jnp.asarray(RNG.standard_normal((3, 64, 8)), jnp.float32)
    stacked = jax.vmap(nf4)(x)
    assert stacked.shape == (3, 64, 8) and stacked.scale.shape == (3, 1, 8)
    for i in range(3):
        np.testing.assert_array_equal(stacked.dequantize()[i], nf4_np(np.asarray(x[i]), -2, 64)[2])


# --- packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", packing.CODE_BITS)
@pytest.mark.parametrize("length", [1, 7, 13, 33])
def test_pack_codes_is_a_little_endian_bit_stream(bits, length):
    codes = RNG.integers(0, 2**bits, (3, length))
    packed = packing.pack_codes(jnp.asarray(codes), bits)
    np.testing.assert_array_equal(packed, pack_np(codes, bits))
    per, _ = packing.code_group(bits)
    back = packing.unpack_codes(packed, bits, pad=-length % per)
    np.testing.assert_array_equal(back, codes)
    if 8 % bits == 0:  # the existing packing's widths give its bytes
        np.testing.assert_array_equal(packed, packing.pack(jnp.asarray(codes), bits))


def test_code_widths_outside_the_list_are_refused():
    with pytest.raises(ValueError, match=r"index bits must be one of \(1, 2, 3, 4, 6, 8\), got 5"):
        packing.pack_codes(jnp.zeros(8, jnp.int32), 5)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        packing.unpack_codes(jnp.zeros(4, jnp.uint8), 3, pad=0)


# --- k-means ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_kmeans_per_tensor_matches_numpy_lloyd(bits):
    x = RNG.standard_normal((24, 10)).astype(np.float32)
    table, iterations = kmeans_table(jnp.asarray(x), bits, iters=50)
    expected = lloyd_np(x, np.ones_like(x), 2**bits, 50)
    np.testing.assert_allclose(table.reshape(-1), expected, rtol=1e-5, atol=1e-6)
    assert table.shape == (1, 1, 2**bits) and 1 <= int(iterations) < 50
    la = palettize(jnp.asarray(x), bits, iters=50)
    np.testing.assert_array_equal(la.codes(), nearest_np(x, np.asarray(la.table).ravel()))
    np.testing.assert_array_equal(la.dequantize(), np.asarray(la.table).ravel()[la.codes()])


def test_kmeans_grouped_channels_and_importance_match_numpy():
    x = RNG.standard_normal((16, 12)).astype(np.float32)  # Flax kernel [in, out]
    importance = RNG.uniform(0.1, 3.0, (16, 1)).astype(np.float32)  # a diagonal Hessian
    w = np.broadcast_to(importance, x.shape)
    table, _ = kmeans_table(jnp.asarray(x), 2, per_grouped_channel(-1, 4), importance, iters=50)
    assert table.shape == (1, 3, 4)
    for g in range(3):
        cols = slice(4 * g, 4 * g + 4)
        expected = lloyd_np(x[:, cols], w[:, cols], 4, 50)
        np.testing.assert_allclose(table[0, g], expected, rtol=1e-5, atol=1e-6)
    la = palettize(jnp.asarray(x), 2, per_grouped_channel(-1, 4), importance, iters=50)
    for g in range(3):
        cols = slice(4 * g, 4 * g + 4)
        np.testing.assert_array_equal(la.codes()[:, cols], nearest_np(x[:, cols], la.table[0, g]))


def test_per_channel_scale_clusters_the_quotients_weighted_by_absmax_squared():
    x = RNG.standard_normal((20, 6)).astype(np.float32) * np.float32([0.1, 1, 3, 0.5, 2, 1])
    la = palettize(jnp.asarray(x), 2, per_channel_scale=-1, iters=50)
    absmax = np.abs(x).max(0, keepdims=True)
    np.testing.assert_array_equal(la.scale, absmax)
    quotients = x / absmax
    weights = np.broadcast_to(np.square(absmax), x.shape)
    table = np.asarray(la.table).ravel()
    np.testing.assert_allclose(table, lloyd_np(quotients, weights, 4, 50), rtol=1e-5, atol=1e-6)
    codes = nearest_np(quotients, table)
    np.testing.assert_array_equal(la.codes(), codes)
    np.testing.assert_array_equal(la.dequantize(), table[codes] * absmax)
    fake = fake_palettize(jnp.asarray(x), la.table, scale=la.scale)
    np.testing.assert_array_equal(fake, table[codes] * absmax)
    with pytest.raises(ValueError, match="per_channel_scale must be an axis"):
        palettize(jnp.asarray(x), 2, per_channel_scale=2)


def test_importance_moves_the_table_to_the_weighted_mean():
    x = jnp.array([0.0, 1.0, 10.0, 11.0])
    plain, _ = kmeans_table(x, 1)
    weighted, _ = kmeans_table(x, 1, importance=jnp.array([1.0, 3.0, 1.0, 1.0]))
    np.testing.assert_allclose(plain[0], [0.5, 10.5])
    np.testing.assert_allclose(weighted[0], [np.average([0, 1], weights=[1, 3]), 10.5])


def test_fewer_distinct_values_than_entries_still_give_a_valid_table():
    x = jnp.array([[2.0, 2.0, -1.0, 2.0]])
    la = palettize(x, 3).validate()
    assert bool(jnp.all(jnp.diff(la.table[0, 0]) > 0))
    np.testing.assert_array_equal(la.dequantize(), x)


def test_palettize_jit_and_vmap():
    x = jnp.asarray(RNG.standard_normal((2, 32, 8)), jnp.float32)
    stacked = jax.vmap(lambda k: palettize(k, 2))(x)
    jitted = jax.jit(lambda k: palettize(k, 2))(x[1])
    assert stacked.table.shape == (2, 1, 1, 4)
    for i in range(2):
        single = palettize(x[i], 2)
        np.testing.assert_array_equal(stacked.dequantize()[i], single.dequantize())
    np.testing.assert_array_equal(jitted.dequantize(), palettize(x[1], 2).dequantize())


@pytest.mark.parametrize("bits", [3, 6])
def test_odd_widths_round_trip_through_lutarray(bits):
    x = RNG.standard_normal((5, 11)).astype(np.float32)
    la = palettize(jnp.asarray(x), bits)
    per, nbytes = packing.code_group(bits)
    assert la.shape == (5, 11) and la.pad == -11 % per
    assert la.indices.shape == (5, nbytes * -(-11 // per))
    assert la.nbytes == la.indices.size + 4 * 2**bits
    np.testing.assert_array_equal(la.dequantize(), np.asarray(la.table).ravel()[la.codes()])


def test_quantize_to_table_keeps_the_tables_order():
    table = np.array([[[1.0, -1.0, 0.0]], [[5.0, 3.0, 4.0]]], np.float32)  # per row
    x = np.array([[0.4, -3.0, 0.6], [3.6, 9.0, 3.4]], np.float32)
    la = quantize_to_table(jnp.asarray(x), jnp.asarray(table))
    np.testing.assert_array_equal(la.codes(), [[2, 1, 0], [2, 0, 1]])
    np.testing.assert_array_equal(la.dequantize(), [[0.0, -1.0, 1.0], [4.0, 5.0, 3.0]])
    assert la.bits == 2 and la.validate() is la


# --- straight-through gradients -----------------------------------------------------------


def test_fake_palettize_gradients():
    x = RNG.standard_normal((6, 4)).astype(np.float32)
    upstream = RNG.standard_normal((6, 4)).astype(np.float32)
    table = np.array([-1.0, -0.2, 0.3, 1.1], np.float32)
    codes = nearest_np(x, table)

    def loss(w, t):
        return jnp.sum(fake_palettize(w, t, learn_table=True) * upstream)

    np.testing.assert_array_equal(fake_palettize(jnp.asarray(x), jnp.asarray(table)), table[codes])
    gw, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(table))
    np.testing.assert_array_equal(gw, upstream)
    np.testing.assert_allclose(gt, np.bincount(codes.ravel(), upstream.ravel(), 4), rtol=1e-6)
    frozen = jax.grad(lambda t: jnp.sum(fake_palettize(jnp.asarray(x), t) * upstream))(table)
    np.testing.assert_array_equal(frozen, np.zeros(4))


def test_fake_nf4_gradient_is_the_upstream_gradient():
    x = jnp.asarray(RNG.standard_normal((64, 3)), jnp.float32)
    upstream = jnp.asarray(RNG.standard_normal((64, 3)), jnp.float32)
    g = jax.grad(lambda w: jnp.sum(fake_nf4(w) * upstream))(x)
    np.testing.assert_array_equal(g, upstream)


# --- bad input ----------------------------------------------------------------------------


def test_lutarray_validate_refuses_bad_parts():
    la = palettize(jnp.arange(12.0).reshape(3, 4), 2)
    with pytest.raises(ValueError, match=r"table \(0, 0\) has duplicate entries \[1.0\]"):
        dataclasses.replace(la, table=jnp.array([[[0.0, 1.0, 1.0, 2.0]]])).validate()
    short = dataclasses.replace(la, table=jnp.array([[[0.0, 1.0, 2.0]]]))  # 3 entries
    codes = np.zeros((3, 4), np.int32)
    codes[1, 2] = 3
    with pytest.raises(ValueError, match=r"indices hold 3 at \(1, 2\), out of range of its table"):
        dataclasses.replace(short, indices=packing.pack_codes(jnp.asarray(codes), 2)).validate()
    with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 3, 4, 6, 8\), got 5"):
        dataclasses.replace(la, bits=5)
    with pytest.raises(ValueError, match="table has shape"):
        dataclasses.replace(la, table=jnp.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match="indices must be uint8"):
        dataclasses.replace(la, indices=la.indices.astype(jnp.int32))
    with pytest.raises(ValueError, match="non-finite"):
        dataclasses.replace(la, table=jnp.array([[[0.0, 1.0, 2.0, jnp.nan]]])).validate()


def test_bad_arguments_are_refused_clearly():
    x = jnp.zeros((48, 10))
    with pytest.raises(ValueError, match="group_size 4 does not divide axis -1 of size 10"):
        palettize(x, 2, per_grouped_channel(-1, 4))
    with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 3, 4, 6, 8\), got 5"):
        palettize(x, 5)
    with pytest.raises(ValueError, match="nf4 block_size 64 does not divide axis -2 of size 48"):
        nf4(x)
    with pytest.raises(ValueError, match="nf4 axis -3 is out of range"):
        nf4(x, axis=-3)
    with pytest.raises(TypeError, match="needs a float array, got dtype int32"):
        palettize(jnp.zeros((4, 4), jnp.int32), 2)
    with pytest.raises(ValueError, match="importance must be finite and non-negative"):
        palettize(x, 2, importance=-jnp.ones((48, 1)))
    with pytest.raises(ValueError, match=r"importance of shape \(3,\) does not broadcast"):
        palettize(x, 2, importance=jnp.ones(3))
    with pytest.raises(ValueError, match="granularity must be"):
        palettize(x, 2, qjax.per_channel(-1))
    with pytest.raises(ValueError, match=r"table \(0, 0\) has duplicate entries \[0.5\]"):
        quantize_to_table(x, jnp.array([0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="does not fit an array of shape"):
        fake_palettize(x, jnp.zeros((5, 1, 4)))


def test_lutarray_is_a_pytree_with_static_format():
    la = palettize(jnp.asarray(RNG.standard_normal((8, 4)), jnp.float32), 2)
    leaves, treedef = jax.tree.flatten(la)
    assert len(leaves) == 2  # indices, table (no scale)
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, LUTArray) and back.bits == 2
    np.testing.assert_array_equal(back.dequantize(), la.dequantize())


def test_a_one_entry_table_maps_every_value_to_it():
    w = jnp.asarray(RNG.standard_normal((4, 6)), jnp.float32)
    table = jnp.array([0.5], jnp.float32)
    la = quantize_to_table(w, table)
    np.testing.assert_array_equal(la.dequantize(), np.full((4, 6), 0.5, np.float32))
    np.testing.assert_array_equal(fake_palettize(w, table), np.full((4, 6), 0.5, np.float32))


@pytest.mark.parametrize("shape", [(0, 64), (64, 0)])
def test_empty_arrays_give_empty_lookup_arrays(shape):
    x = jnp.zeros(shape, jnp.float32)
    for la in (nf4(x, axis=0 if shape[0] == 0 else -1), palettize(x, 2)):
        assert isinstance(la, LUTArray) and la.shape == shape
        assert la.dequantize().shape == shape


def test_bools_are_no_axes_or_block_sizes():
    w = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(TypeError, match="nf4 axis must be an int, got bool"):
        nf4(w, axis=True)
    with pytest.raises(ValueError, match="nf4 block_size must be a positive integer, got True"):
        nf4(w, axis=-1, block_size=True)
    with pytest.raises(TypeError, match="per_channel_scale must be an int axis or None"):
        palettize(w, 2, per_channel_scale=True)
