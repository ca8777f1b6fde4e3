"""qjax.capture: input statistics of every dot_general that reads a parameter leaf.

Every expected value is computed in NumPy from a plain forward pass written out in the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import qjax
from qjax import capture


def rand(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of rows x [n, k], in float64 NumPy."""
    x = np.asarray(x, np.float64)
    return {
        "hessian": x.T @ x,
        "abs_sum": np.abs(x).sum(0),
        "abs_max": np.abs(x).max(0),
        "count": np.float64(x.shape[0]),
    }


def check(
    stats: capture.InputStats,
    x: np.ndarray,
    weight_axes: tuple[int, ...],
    stacked: int = 0,
    rtol: float = 1e-5,
) -> None:
    assert stats.weight_axes == weight_axes
    assert stats.stacked == stacked
    want = expected(x)
    for name, value in want.items():
        got = getattr(stats, name)
        assert got.dtype == jnp.float32, name
        np.testing.assert_allclose(got, value, rtol=rtol, atol=1e-4, err_msg=name)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


# --- plain functions -------------------------------------------------------------------


def test_plain_function_hessian_abs_and_count():
    params = {"w1": rand(0, (5, 7)), "w2": rand(1, (7, 3)), "b": rand(2, (7,))}
    x = rand(3, (2, 4, 5))  # (batch, seq, features): 8 rows

    def fn(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b"][None, None]) @ p["w2"]

    stats = capture.capture(fn, params, x)
    assert list(stats) == ["w1", "w2"]  # the bias is no dot operand
    h = relu(x @ params["w1"] + params["b"])
    check(stats["w1"], x.reshape(8, 5), (0,))
    check(stats["w2"], h.reshape(8, 7), (0,))
    np.testing.assert_allclose(stats["w1"].mean_abs, np.abs(x).reshape(8, 5).mean(0), rtol=1e-5)


def test_torch_layout_weight_transposed():
    params = {"weight": rand(0, (6, 4))}  # [out, in]
    x = rand(1, (3, 4))
    stats = capture.capture(lambda p, x: x @ p["weight"].T, params, x)
    check(stats["weight"], x, (1,))


def test_einsum_dot_and_dot_general_forms():
    w = rand(0, (6, 5))  # [out, in]
    x = rand(1, (2, 3, 5))
    forms = {
        "einsum": lambda p, x: jnp.einsum("btd,od->bto", x, p["w"]),
        "dot": lambda p, x: jnp.dot(x, p["w"].T),
        "dot_general": lambda p, x: lax.dot_general(x, p["w"], (((2,), (1,)), ((), ()))),
    }
    for name, fn in forms.items():
        stats = capture.capture(fn, {"w": w}, x)
        assert stats["w"].weight_axes == (1,), name
        check(stats["w"], x.reshape(6, 5), (1,))


def test_einsum_over_two_contracted_axes_flattens_in_weight_axes_order():
    w = rand(0, (3, 4, 5))  # [heads, head_dim, out]
    x = rand(1, (2, 6, 3, 4))  # (batch, seq, heads, head_dim)
    stats = capture.capture(lambda p, x: jnp.einsum("bshd,hdo->bso", x, p["w"]), {"w": w}, x)
    s = stats["w"]
    assert sorted(s.weight_axes) == [0, 1]
    # The features are x's heads/head_dim axes, flattened in the order of weight_axes.
    rows = x.reshape(12, 3, 4)
    if s.weight_axes == (1, 0):
        rows = rows.transpose(0, 2, 1)
    check(s, rows.reshape(12, 12), s.weight_axes)


def test_weight_used_twice_sums_both_inputs():
    params = {"w": rand(0, (4, 4), 0.5)}
    x = rand(1, (3, 4))

    def fn(p, x):
        return jnp.tanh(x @ p["w"]) @ p["w"]

    stats = capture.capture(fn, params, x)
    h = np.tanh(x @ params["w"])
    check(stats["w"], np.concatenate([x, h]), (0,))


def test_weight_contracted_along_different_axes_is_refused():
    params = {"w": rand(0, (4, 4))}
    with pytest.raises(ValueError, match=r"'w' is contracted along axes \(0,\).*\(1,\)"):
        capture.capture(lambda p, x: (x @ p["w"]) @ p["w"].T, params, rand(1, (2, 4)))
    # A stacked leaf read whole outside the scan as well as sliced inside it.
    stacked = {"w": rand(2, (2, 4, 4))}

    def both(p, x):
        h = lax.scan(lambda h, w: (h @ w, None), x, p["w"])[0]
        return jnp.einsum("bi,lio->blo", h, p["w"])

    with pytest.raises(ValueError, match=r"'w' is read both inside and outside a lax\.scan"):
        capture.capture(both, stacked, rand(1, (2, 4)))


def test_hessian_false_and_bf16_activations():
    params = {"w": rand(0, (8, 3))}
    x = jnp.asarray(rand(1, (5, 8), 3.0), jnp.bfloat16)

    def fn(p, x):  # as a Flax layer with dtype=bfloat16 does: the f32 kernel cast first
        return x @ p["w"].astype(jnp.bfloat16)

    stats = capture.capture(fn, params, x)
    x64 = np.asarray(x.astype(jnp.float32))  # the bf16 values, exactly
    check(stats["w"], x64, (0,))
    light = capture.capture(fn, params, x, hessian=False)["w"]
    assert light.hessian is None
    np.testing.assert_allclose(light.abs_sum, np.abs(x64).sum(0), rtol=1e-6)


def test_nested_jit_checkpoint_and_custom_vjp():
    @jax.custom_vjp
    def mm(x, w):
        return x @ w

    mm.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
    params = {"a": rand(0, (4, 5)), "b": rand(1, (5, 6)), "c": rand(2, (6, 2))}
    x = rand(3, (3, 4))

    def fn(p, x):
        h = jax.jit(lambda x, w: jnp.tanh(x @ w))(x, p["a"])
        h = jax.checkpoint(lambda h: jnp.sin(h @ p["b"]))(h)
        return mm(h, jax.jit(lambda w: w.astype(jnp.float32))(p["c"]))

    stats = capture.capture(fn, params, x)
    h1 = np.tanh(x @ params["a"])
    h2 = np.sin(h1 @ params["b"])
    check(stats["a"], x, (0,))
    check(stats["b"], h1, (0,))
    check(stats["c"], h2, (0,))


def test_capture_under_an_outer_jit_and_paths_subset():
    params = {"w1": rand(0, (4, 5)), "w2": rand(1, (5, 2))}
    x = rand(2, (3, 4))

    @jax.jit
    def run(p, x):
        return capture.capture(lambda p, x: (x @ p["w1"]) @ p["w2"], p, x, paths=["w2"])

    stats = run(params, x)
    assert list(stats) == ["w2"]
    check(stats["w2"], x @ params["w1"], (0,))


# --- accumulation ----------------------------------------------------------------------


def test_three_batches_equal_one_big_batch():
    params = {"w": rand(0, (5, 3)), "v": rand(1, (3, 2))}

    def fn(p, x, scale):
        return jnp.tanh(x @ p["w"]) * scale @ p["v"]

    batches = [(rand(10 + i, (n, 5)), np.float32(i + 1)) for i, n in enumerate((2, 4, 3))]
    summed = capture.accumulate(fn, params, batches)
    big_x = np.concatenate([x for x, _ in batches])
    big_h = np.concatenate([np.tanh(x @ params["w"]) * s for x, s in batches])
    check(summed["w"], big_x, (0,))
    check(summed["v"], big_h, (0,))
    # Plain array batches are the single argument.
    single = capture.accumulate(lambda p, x: x @ p["w"], params, iter([x for x, _ in batches]))
    check(single["w"], big_x, (0,))


def test_accumulate_traces_once_for_batches_of_one_shape_and_kwargs_stay_static():
    traces = []

    def fn(p, x, *, double=False):
        traces.append(x.shape)
        return (2 * x if double else x) @ p["w"]

    params = {"w": rand(0, (3, 2))}
    batches = [rand(i, (4, 3)) for i in range(4)]
    summed = capture.accumulate(fn, params, batches)
    assert len(traces) <= 2, traces  # the shapes of the stats, then the one step
    check(summed["w"], np.concatenate(batches), (0,))
    doubled = capture.capture(fn, params, batches[0], double=True)  # a Python bool in an `if`
    check(doubled["w"], 2 * batches[0], (0,))


def test_accumulate_refuses_empty_batches():
    with pytest.raises(ValueError, match="batches is empty"):
        capture.accumulate(lambda p, x: x @ p["w"], {"w": rand(0, (2, 2))}, [])


def test_merge_refuses_mismatched_stats():
    a = capture.InputStats(None, jnp.zeros(2), jnp.zeros(2), jnp.zeros(()), weight_axes=(0,))
    b = capture.InputStats(None, jnp.zeros(2), jnp.zeros(2), jnp.zeros(()), weight_axes=(1,))
    with pytest.raises(ValueError, match="different leaves"):
        a.merge(b)
    c = capture.InputStats(jnp.zeros((2, 2)), jnp.zeros(2), jnp.zeros(2), jnp.zeros(()))
    with pytest.raises(ValueError, match="with and without a hessian"):
        a.merge(c)


# --- Flax ------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(6, name="up")(x))
        return nn.Dense(3, name="down")(x)


def test_linen_mlp():
    x = rand(0, (2, 3, 4))
    model = MLP()
    variables = model.init(jax.random.key(0), x)
    stats = capture.capture(model.apply, variables, x)
    assert list(stats) == ["params/down/kernel", "params/up/kernel"]
    p = jax.tree.map(np.asarray, variables["params"])
    h = relu(x @ p["up"]["kernel"] + p["up"]["bias"])
    check(stats["params/up/kernel"], x.reshape(6, 4), (0,))
    check(stats["params/down/kernel"], h.reshape(6, 6), (0,))


def test_nnx_linear_stack():
    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](jnp.tanh(self.layers[0](x)))

    graphdef, state = nnx.split(Stack(nnx.Rngs(0)))
    x = rand(0, (3, 4))
    stats = capture.capture(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    # Keyed as quantize_tree names the State's leaves: no trailing Variable ".value".
    assert sorted(stats) == ["layers/0/kernel", "layers/1/kernel"]
    l0 = state["layers"][0]
    h = np.tanh(x @ np.asarray(l0["kernel"][...]) + np.asarray(l0["bias"][...]))
    check(stats["layers/0/kernel"], x, (0,))
    check(stats["layers/1/kernel"], h, (0,))


def test_nnx_state_quantizes_with_default_rules_and_attention_layouts():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(4, 64, decode=False, rngs=rngs)
            self.fc = nnx.Linear(64, 256, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.attn(x))

    graphdef, state = nnx.split(Block(nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    stats = capture.accumulate(fn, state, [rand(i, (2, 8, 64)) for i in range(2)])
    rtn = qjax.quantize_tree(state)  # default rules: every kernel, read by its layout
    gptq = qjax.quantize_tree(state, {".*": "int4:per_block:16"}, method="gptq", statistics=stats)
    for tree in (rtn, gptq):
        kernels = [tree["attn"][p]["kernel"] for p in ("query", "key", "value", "out")]
        assert all(isinstance(k.get_value(), qjax.QArray) for k in kernels + [tree["fc"]["kernel"]])
    query = gptq["attn"]["query"]["kernel"].get_value()  # [in 64, heads 4, head_dim 16]
    assert query.scale.shape == (4, 4, 16)  # blocks of 16 inputs, one per (head, head_dim)


# --- scan ------------------------------------------------------------------------------


def test_scan_stacked_layers_match_a_python_loop():
    params = {"layers": rand(0, (3, 4, 4), 0.5), "shared": rand(1, (4, 4), 0.5)}
    x = rand(2, (2, 4))

    def fn(p, x):
        def body(h, w):
            return jnp.tanh(h @ w) @ p["shared"], None

        return lax.scan(body, x, p["layers"])[0]

    stats = capture.capture(fn, params, x)
    s = stats["layers"]
    assert (s.stacked, s.weight_axes) == (1, (1,))
    assert s.hessian.shape == (3, 4, 4) and s.count.shape == (3,)
    h, shared_inputs = x, []
    for layer in range(3):
        check(jax.tree.map(lambda a, i=layer: a[i], s), h, (1,), stacked=1)
        shared_inputs.append(np.tanh(h @ params["layers"][layer]))
        h = shared_inputs[-1] @ params["shared"]
    # The shared weight (a scan const) sums over the iterations.
    check(stats["shared"], np.concatenate(shared_inputs), (0,))


def test_reverse_scan_keeps_statistics_in_layer_order():
    w = rand(0, (3, 4, 4), 0.5)
    x = rand(1, (2, 4))

    def fn(p, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"], reverse=True)[0]

    s = capture.capture(fn, {"w": w}, x)["w"]
    h = x
    for layer in (2, 1, 0):
        check(jax.tree.map(lambda a, i=layer: a[i], s), h, (1,), stacked=1)
        h = np.tanh(h @ w[layer])


def test_linen_nn_scan_and_nested_scan():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(4, use_bias=False)(h)), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            blocks = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )
            return blocks()(x, None)[0]

    x = rand(0, (2, 4))
    model = Scanned()
    variables = model.init(jax.random.key(0), x)
    s = capture.capture(model.apply, variables, x)["params/ScanBlock_0/Dense_0/kernel"]
    kernels = np.asarray(variables["params"]["ScanBlock_0"]["Dense_0"]["kernel"])
    h = x
    for layer in range(3):
        check(jax.tree.map(lambda a, i=layer: a[i], s), h, (1,), stacked=1)
        h = np.tanh(h @ kernels[layer])

    # A scan over groups of a scan over layers: [groups, layers, in, out].
    w = rand(1, (2, 3, 4, 4), 0.5)

    def nested(p, x):
        inner = lambda h, w: (jnp.tanh(h @ w), None)  # noqa: E731
        return lax.scan(lambda h, ws: (lax.scan(inner, h, ws)[0], None), x, p["w"])[0]

    s = capture.capture(nested, {"w": w}, x)["w"]
    assert (s.stacked, s.weight_axes, s.count.shape) == (2, (2,), (2, 3))
    h = x
    for g in range(2):
        for layer in range(3):
            check(jax.tree.map(lambda a, g=g, i=layer: a[g, i], s), h, (2,), stacked=2)
            h = np.tanh(h @ w[g, layer])


# --- errors ----------------------------------------------------------------------------


def test_errors_name_the_path_and_what_reads_it():
    params = {
        "embed": rand(0, (10, 4)),
        "w": rand(1, (4, 4)),
        "step": np.int32(3),
        "flat": rand(2, (16,)),
        "gate": rand(3, (4, 4)),
    }

    def fn(p, ids):
        h = p["embed"][ids]
        h = h @ p["w"] + (h @ p["flat"].reshape(4, 4))
        return lax.cond(ids[0] > 0, lambda h: h @ p["gate"], lambda h: h, h)

    ids = np.array([1, 2, 3])
    with pytest.raises(ValueError, match=r"'embed'.*read by gather \(an embedding lookup"):
        capture.capture(fn, params, ids, paths=["embed"])
    with pytest.raises(ValueError, match=r"'flat'.*read by reshape"):
        capture.capture(fn, params, ids, paths="flat")
    with pytest.raises(ValueError, match=r"'gate'.*read by cond \(capture does not look inside"):
        capture.capture(fn, params, ids, paths=["gate"])
    with pytest.raises(ValueError, match=r"'step' has dtype int32, not a float dtype"):
        capture.capture(fn, params, ids, paths=["step"])
    with pytest.raises(
        ValueError, match=r"'gates' is not a leaf of params; did you mean \['gate'\]"
    ):
        capture.capture(fn, params, ids, paths=["gates"])
    with pytest.raises(ValueError, match=r"'W' is not a leaf of params; the leaves are \['embed'"):
        capture.capture(fn, params, ids, paths=["W"])
    with pytest.raises(TypeError, match="paths must be strings"):
        capture.capture(fn, params, ids, paths=[0])
    # Without paths, what dots read directly is recorded and the rest left out.
    assert list(capture.capture(fn, params, ids)) == ["w"]


def test_batched_dot_on_the_weight_is_refused_when_asked_for():
    params = {"w": rand(0, (2, 4, 3)), "v": rand(1, (3, 3))}

    def fn(p, x):  # x [2, n, 4]: one weight per group, a dot_general batch dimension
        return jnp.einsum("gni,gio->gno", x, p["w"]) @ p["v"]

    x = rand(2, (2, 5, 4))
    with pytest.raises(ValueError, match=r"'w'.*batch dimensions on the weight"):
        capture.capture(fn, params, x, paths=["w"])
    assert list(capture.capture(fn, params, x)) == ["v"]


# --- jit cache and sharding ------------------------------------------------------------


def test_jit_cache_safe():
    params = {"w": rand(0, (4, 3))}
    x = rand(1, (2, 4))
    fn = jax.jit(lambda p, x: jnp.sin(x @ p["w"]))
    before = fn(params, x)  # the float function, compiled on its own
    first = capture.capture(fn, params, x)
    after = fn(params, x)
    again = capture.capture(fn, params, x)
    np.testing.assert_allclose(before, np.sin(x @ params["w"]), rtol=1e-5)
    np.testing.assert_array_equal(after, before)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    check(again["w"], x, (0,))
    # Capturing another function with the same jitted pieces sees its own inputs.
    other = capture.capture(lambda p, x: fn(p, 2 * x), params, x)
    check(other["w"], 2 * x, (0,))


SHARDED = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("error")
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from qjax import capture

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    p = {"w1": rng.standard_normal((8, 16)).astype(np.float32),
         "w2": rng.standard_normal((16, 4)).astype(np.float32)}
    x = rng.standard_normal((16, 4, 8)).astype(np.float32)
    p["layers"] = rng.standard_normal((3, 16, 16)).astype(np.float32) / 4
    p["mix"] = rng.standard_normal((16, 16)).astype(np.float32) / 4

    def fn(p, x):  # a scan over stacked layers between two plain weights
        h = jnp.tanh(x @ p["w1"])
        h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w @ p["mix"]), None), h,
                         p["layers"])[0]
        return h @ p["w2"]

    ref = capture.capture(fn, p, x)
    assert sorted(ref) == ["layers", "mix", "w1", "w2"], sorted(ref)
    assert (ref["layers"].stacked, ref["mix"].stacked) == (1, 0)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        run = jax.jit(lambda p, x: capture.capture(fn, p, x))
        got = run(p, xs)
        acc = capture.accumulate(fn, p, [xs, xs])
        for name in ref:
            for field, twice in (("hessian", 2), ("abs_sum", 2), ("abs_max", 1), ("count", 2)):
                a = getattr(ref[name], field)
                b, c = getattr(got[name], field), getattr(acc[name], field)
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)
                np.testing.assert_allclose(c, twice * a, rtol=1e-5, atol=1e-4)
        hlo = run.lower(p, xs).compile().as_text()
        assert "all-gather" not in hlo, axis_type
        assert "all-reduce" in hlo, axis_type
    print("CAPTURE SHARDING OK")
    """
)


def test_sharded_batch_accumulates_without_gathering():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CAPTURE SHARDING OK" in result.stdout
