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
