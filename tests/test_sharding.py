"""Sharded leaves quantize in place on 8 CPU devices: no all-gather, same numbers.

The checks run in a subprocess, since the device count is fixed when JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import qjax

    assert jax.device_count() == 8, jax.devices()


    def placed(array, mesh, spec):
        return array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim)


    w = jax.random.normal(jax.random.key(0), (512, 1024))
    cases = [
        # (spec, how the kernel is sharded, expected sharding of data and of scale)
        (qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)), P(None, "model"),
         P(None, "model"), P(None, "model")),
        (qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32)), P("model", None),
         P("model", None), P("model", None)),
        (qjax.QuantSpec("uint4", "asymmetric", granularity=qjax.per_block(-2, 64)),
         P("model", None), P("model", None), P("model", None)),
        (qjax.QuantSpec("mxfp4"), P(None, "model"), P(None, "model"), P(None, "model")),
    ]
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,))
        for spec, where, data_spec, scale_spec in cases:
            sharded = jax.device_put(w, NamedSharding(mesh, where))
            quantize = jax.jit(lambda x, spec=spec: qjax.quantize(x, spec))
            qa = quantize(sharded)
            ref = qjax.quantize(w, spec)
            np.testing.assert_array_equal(qa.data, ref.data)
            np.testing.assert_array_equal(qa.scale, ref.scale)
            if qa.offset is not None:
                np.testing.assert_array_equal(qa.offset, ref.offset)
            assert placed(qa.data, mesh, data_spec), (spec, axis_type, qa.data.sharding)
            assert placed(qa.scale, mesh, scale_spec), (spec, axis_type, qa.scale.sharding)
            hlo = quantize.lower(sharded).compile().as_text()
            assert "all-gather" not in hlo, (spec, axis_type)

        # A whole tree, sharded leaf by leaf, under jit.
        params = {"attn": {"kernel": jax.device_put(w, NamedSharding(mesh, P(None, "model")))},
                  "mlp": {"kernel": jax.device_put(w, NamedSharding(mesh, P("model", None)))}}
        rules = {".*attn.*": "int8:per_channel", ".*mlp.*": "int4:per_block:32"}
        tree_fn = jax.jit(lambda p: qjax.quantize_tree(p, rules))
        qtree = tree_fn(params)
        assert placed(qtree["mlp"]["kernel"].data, mesh, P("model", None))
        assert placed(qtree["attn"]["kernel"].scale, mesh, P(None, "model"))
        assert "all-gather" not in tree_fn.lower(params).compile().as_text()

    # Blocks that straddle shards: 4 blocks of 128 over 8 shards of 64 rows.
    spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 128))
    auto = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    qa = jax.jit(lambda x: qjax.quantize(x, spec))(
        jax.device_put(w, NamedSharding(auto, P("model", None))))
    np.testing.assert_array_equal(qa.data, qjax.quantize(w, spec).data)  # right, gathered
    explicit = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Explicit,))
    try:
        jax.jit(lambda x: qjax.quantize(x, spec))(
            jax.device_put(w, NamedSharding(explicit, P("model", None))))
    except ValueError as e:
        assert "choose a block size that divides 64" in str(e), e
    else:
        raise AssertionError("straddling blocks on an explicit mesh must be refused")

    # Packed int4 whose shards would split a byte: 3 values per shard of 24 columns.
    narrow = jax.device_put(w[:, :24], NamedSharding(explicit, P(None, "model")))
    try:
        qjax.quantize(narrow, "int4:per_channel")
    except ValueError as e:
        assert "would split a byte across shards" in str(e), e
    else:
        raise AssertionError("packed bytes split across shards must be refused")

    # Calibration statistics of tensor-parallel params (features sharded) on an explicit
    # mesh: the same as unsharded (the donated statistics keep the traced sharding).
    grid = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    p = {"s": jnp.ones((64,)), "up": w[:64, :256], "down": w[256:512, :64]}
    fn = lambda p, x: jax.nn.gelu((x * p["s"]) @ p["up"]) @ p["down"]  # norm scale, MLP
    batches = [jax.random.normal(jax.random.key(i), (64, 64)) for i in range(2)]
    ref = qjax.capture.accumulate(fn, p, batches)
    last = lambda v: P(*([None] * (v.ndim - 1)), "model")  # tensor parallel: last axis
    tp = {k: jax.device_put(v, NamedSharding(grid, last(v))) for k, v in p.items()}
    got = qjax.capture.accumulate(fn, tp, batches)
    for name in ref:
        np.testing.assert_allclose(got[name].hessian, ref[name].hessian, rtol=1e-5)
        np.testing.assert_allclose(got[name].abs_max, ref[name].abs_max, rtol=1e-6)
    print("SHARDING OK")
    """
)


def test_sharded_leaves_quantize_without_gathering():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SHARDING OK" in result.stdout
