"""qjax.orbax: abstract quantized trees, Orbax checkpoints of QArray trees, qjax file interop.

Single-device checks run here; the sharded ones (8 CPU devices, restore onto 2) run in a
subprocess, since the device count is fixed when JAX starts.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
import qjax.orbax as qo
from test_io import FORMULATIONS, GRANULARITIES, SUB_BYTE

SHAPE = (64, 128)
"""Tiny, and every granularity below fits it sharded 2 x 4 (see the subprocess)."""


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8)


def _cases() -> dict[str, tuple[qjax.QuantSpec, bool | None]]:
    """Every target x formulation, cycling the granularities as tests/test_io.py does (MX
    presets: their own), sub-byte targets packed and not."""
    out = {}
    for i, (dtype, pairs) in enumerate(FORMULATIONS.items()):
        for j, (scheme, formulation) in enumerate(pairs):
            g = (i + j) % len(GRANULARITIES)
            granularity = None if dtype.startswith("mx") else GRANULARITIES[g]
            spec = qjax.QuantSpec(dtype, scheme, formulation, granularity)
            for packed in (True, False) if dtype in SUB_BYTE else (None,):
                if packed is False and dtype in ("uint4", "uint2"):
                    continue  # refused: see test_unpacked_uint4_is_refused_by_name
                out[f"{dtype}-{formulation}-{g}-{packed}"] = (spec, packed)
    return out


@pytest.fixture(scope="module")
def tree():
    x = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))
    qarrays = {}
    for i, (name, (spec, packed)) in enumerate(_cases().items()):
        source = x.astype(jnp.bfloat16) if i % 3 == 0 else x
        qarrays[name] = qjax.quantize(source, spec, packed=packed)
    s = jnp.linspace(0.5, 2.0, SHAPE[0], dtype=jnp.float32)
    qarrays["channel_scale"] = qjax.algorithms.scaled(x, s, "int4:per_block:16")
    return {"q": qarrays, "plain": [x[0], (jnp.arange(3, dtype=jnp.int32),)], "none": None}


def _assert_same(got, want, where="root"):
    """Same statics, same leaves bit for bit (containers compared by their leaves)."""
    is_q = lambda x: isinstance(x, qjax.QArray)  # noqa: E731
    got_leaves = jax.tree.leaves(got, is_leaf=is_q)
    want_leaves = jax.tree.leaves(want, is_leaf=is_q)
    assert len(got_leaves) == len(want_leaves), where
    for a, b in zip(got_leaves, want_leaves):
        if is_q(b):
            assert is_q(a), where
            assert (a.spec, a.float_dtype, a.packed, a.pad) == (
                b.spec,
                b.float_dtype,
                b.packed,
                b.pad,
            ), where
            for part in ("data", "scale", "offset", "channel_scale"):
                pa, pb = getattr(a, part), getattr(b, part)
                assert (pa is None) == (pb is None), (where, part)
                if pb is not None:
                    assert pa.dtype == pb.dtype and pa.shape == pb.shape, (where, part)
                    np.testing.assert_array_equal(_bits(pa), _bits(pb), err_msg=f"{where}:{part}")
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, where
            np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=where)


def test_cases_cover_every_target_formulation_and_packing(tree):
    qarrays = tree["q"].values()
    assert {(name.split("-")[0], qa.spec.formulation) for name, qa in tree["q"].items()} == {
        (d, f) for d, pairs in FORMULATIONS.items() for _, f in pairs
    } | {("channel_scale", "scale")}
    assert {str(qa.spec.granularity) for qa in qarrays} >= {
        str(qjax.QuantSpec("int8", granularity=g).granularity) for g in GRANULARITIES
    }
    assert {qa.packed for qa in qarrays if qa.spec.dtype in SUB_BYTE} == {True, False}
    assert any(qa.channel_scale is not None for qa in qarrays)


def test_save_restore_is_bit_exact_for_every_target_and_granularity(tree, tmp_path):
    path = tmp_path / "ckpt"
    qo.save(path, tree)
    _assert_same(qo.restore(path), tree)
    # The target from the model's side: jax.tree.map of ShapeDtypeStructs over the tree.
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    restored = qo.restore(path, target)
    assert type(restored["plain"][1]) is tuple
    _assert_same(restored, tree)


def test_packed_data_is_stored_packed(tmp_path):
    """An int4 kernel is stored as its packed uint8 bytes: half a byte per value."""
    import orbax.checkpoint as ocp

    w = jnp.asarray(np.random.default_rng(2).normal(size=(1024, 1024)).astype(np.float32))
    qo.save(tmp_path / "ckpt", {"w": qjax.quantize(w, "int4:per_block:128")})
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(tmp_path / "ckpt").item_metadata.tree["w"]["data"]
    assert (stored.shape, stored.dtype) == ((1024, 512), np.uint8)
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    # 2**20 int4 values in 512 KiB, 8 x 1024 float32 scales in 32 KiB, metadata: at most that
    # (Orbax's zstd compression takes a little off), and far under 4 MiB of float32.
    assert 2**18 < size < 2**19 + 2**15 + 2**14, size


def test_parts_and_from_parts_work_with_a_checkpoint_manager(tree, tmp_path):
    """The documented CheckpointManager recipe: async saves of parts, statics in metadata."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        for step in (1, 2):
            manager.save(
                step, args=ocp.args.StandardSave(qo.parts(tree)), custom_metadata=qo.metadata(tree)
            )
        manager.wait_until_finished()
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
        restored = manager.restore(2, args=ocp.args.StandardRestore(qo.parts(target)))
        custom = manager.metadata(2).custom_metadata
    assert manager.all_steps() == [1, 2]
    _assert_same(qo.from_parts(restored, target), tree)
    # The item lies in <step>/default; the statics are the step's custom metadata.
    item = tmp_path / "run" / "2" / "default"
    _assert_same(qo.restore(item, qo.checkpoint_target(item, custom_metadata=custom)), tree)


def test_orbax_to_safetensors_writes_what_qjax_save_writes(tree, tmp_path):
    qo.save(tmp_path / "ckpt", tree)
    qo.orbax_to_safetensors(tmp_path / "ckpt", tmp_path / "from_orbax.safetensors")
    # checkpoint_target lists containers as Orbax does (tuples as lists): save that tree.
    like = qo.restore(tmp_path / "ckpt")
    qjax.save(tmp_path / "direct.safetensors", like)
    written = (tmp_path / "from_orbax.safetensors").read_bytes()
    assert written == (tmp_path / "direct.safetensors").read_bytes()
    _assert_same(qjax.load(tmp_path / "from_orbax.safetensors"), tree)


def test_safetensors_to_orbax_round_trips(tree, tmp_path):
    qjax.save(tmp_path / "model.safetensors", tree)
    qo.safetensors_to_orbax(tmp_path / "model.safetensors", tmp_path / "ckpt")
    _assert_same(qo.restore(tmp_path / "ckpt"), tree)
    qo.orbax_to_safetensors(tmp_path / "ckpt", tmp_path / "back.safetensors")
    _assert_same(qjax.load(tmp_path / "back.safetensors"), tree)


def test_safetensors_to_orbax_refuses_a_corrupted_file(tree, tmp_path):
    path = tmp_path / "model.safetensors"
    qjax.save(path, {"w": tree["q"]["int8-scale-0-None"]})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="fail the CRC-32 check"):
        qo.safetensors_to_orbax(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_unpacked_uint4_is_refused_by_name(tmp_path):
    qa = qjax.quantize(jnp.ones((8, 8)), qjax.QuantSpec("uint4", "asymmetric"), packed=False)
    with pytest.raises(ValueError, match=r"'layers/0/w': unpacked uint4 .* packed=True"):
        qo.save(tmp_path / "ckpt", {"layers": [{"w": qa}]})


def test_checkpoint_target_needs_qjax_metadata(tmp_path):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "plain", {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"not written by qjax\.orbax\.save: pass the target"):
        qo.checkpoint_target(tmp_path / "plain")


def test_abstract_quantized_matches_a_real_run():
    """Same tree, shapes, dtypes and statics as quantize_tree on concrete params."""
    rng = np.random.default_rng(3)
    params = {
        "embed": {"embedding": rng.normal(size=(256, 64)).astype(np.float32)},
        "mlp": {
            "kernel": rng.normal(size=(64, 256)).astype(jnp.bfloat16),
            "bias": np.zeros(256, np.float32),
        },
        "head": {"kernel": rng.normal(size=(256, 32)).astype(np.float32)},
    }
    rules = {".*mlp.*kernel": "int4:per_block:32", ".*head.*": "uint4:asymmetric:minval"}
    real = qjax.quantize_tree(params, rules)
    abstract = qo.abstract_quantized(jax.tree.map(jax.typeof, params), rules)
    is_q = lambda x: isinstance(x, qjax.QArray)  # noqa: E731
    assert jax.tree.structure(abstract, is_leaf=is_q) == jax.tree.structure(real, is_leaf=is_q)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (r.shape, r.dtype)
    mlp = abstract["mlp"]["kernel"]
    # By hand: 64 x 256 int4 packed two per byte; one scale per 32 inputs of each output.
    assert (mlp.data.shape, mlp.data.dtype, mlp.scale.shape) == ((64, 128), jnp.uint8, (2, 256))
    assert mlp.float_dtype == "bfloat16" and mlp.packed
    # A serving function lowers against it: packed weights in, float out.
    lowered = jax.jit(lambda t: t["mlp"]["kernel"].dequantize()).lower(abstract)
    assert (lowered.out_info.shape, lowered.out_info.dtype) == ((64, 256), jnp.bfloat16)
    head = abstract["head"]["kernel"]
    assert head.spec == real["head"]["kernel"].spec and head.offset.dtype == jnp.float32


def test_abstract_quantized_passes_errors_and_warnings_through():
    params = {"w": jax.ShapeDtypeStruct((48, 48), jnp.float32)}
    with pytest.raises(ValueError, match="'w'"):
        qo.abstract_quantized(params, {".*": "int4:per_block:32"}, fallback=None)
    with pytest.warns(qjax.QjaxRuleWarning, match="nothing"):
        qo.abstract_quantized(params, {"nothing": "int8", ".*": "int8"})


SCRIPT = textwrap.dedent(
    """
    import resource, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import qjax, qjax.orbax as qo
    from test_orbax import SHAPE, _cases

    assert jax.device_count() == 8, jax.devices()
    path = sys.argv[1]

    # 1. A 100M-parameter abstract model: nothing is materialised.
    big = {f"layer{i}": {"kernel": jax.ShapeDtypeStruct((4096, 3072), jnp.bfloat16)}
           for i in range(8)}
    assert sum(np.prod(l.shape) for l in jax.tree.leaves(big)) > 100e6
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    abstract = qo.abstract_quantized(big, {".*": "int4:per_block:128"})
    seconds = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert seconds < 10 and grown_mib < 64, (seconds, grown_mib)
    assert abstract["layer0"]["kernel"].data.shape == (4096, 1536)
    print(f"ABSTRACT 100M params: {seconds:.2f} s, peak RSS +{grown_mib:.0f} MiB")

    # 2. Every case quantized under jit on a 2 x 4 mesh (the packed axis 4 ways), saved.
    cases = _cases()
    x = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    mesh8 = jax.make_mesh((2, 4), ("a", "b"))
    spec8 = P("a", "b")
    params = {name: jax.device_put(x, NamedSharding(mesh8, spec8)) for name in cases}
    # quantize_tree has no per-leaf packed flag: quantize each leaf under one jit.
    quantized = jax.jit(lambda p: {n: qjax.quantize(p[n], s, packed=k)
                                   for n, (s, k) in cases.items()})(params)
    reference = {n: qjax.quantize(jnp.asarray(x), s, packed=k) for n, (s, k) in cases.items()}
    abstract8 = {n: qo._shard_qarray(n, jax.eval_shape(lambda: reference[n]),
                                     NamedSharding(mesh8, spec8)) for n in cases}
    for n, qa in quantized.items():
        for part in ("data", "scale", "offset"):
            got, want = getattr(qa, part), getattr(reference[n], part)
            if want is None:
                continue
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=n)
            if part == "offset":
                continue  # constant zero points come out replicated; values checked above
            where = getattr(abstract8[n], part).sharding
            assert got.sharding.is_equivalent_to(where, got.ndim), (n, part, got.sharding, where)
    assert any(qa.packed and qa.spec.target.bits == 2 for qa in quantized.values())
    qo.save(path, quantized)

    # 3. Restored onto 2 devices with another PartitionSpec, bit for bit, where asked.
    mesh2 = jax.make_mesh((2,), ("x",), devices=jax.devices()[6:])
    cols = NamedSharding(mesh2, P(None, "x"))
    target = {n: qo._shard_qarray(n, jax.eval_shape(lambda: reference[n]), cols) for n in cases}
    restored = qo.restore(path, target)
    for n, qa in restored.items():
        for part in ("data", "scale", "offset"):
            got, want = getattr(qa, part), getattr(reference[n], part)
            if want is None:
                continue
            assert got.sharding == getattr(target[n], part).sharding, (n, part)
            assert {d.id for d in got.sharding.device_set} <= {6, 7}
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=n)
    print(f"RESTORED {len(restored)} QArrays from a 2x4 mesh onto 2 devices")

    # 4. abstract_quantized from sharded float params: scales along the same mesh axes.
    mesh = jax.make_mesh((8,), ("m",))
    def sds(shape, spec):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))
    floats = {"rows": sds((256, 64), P("m", None)), "cols": sds((64, 256), P(None, "m")),
              "bias": sds((256,), P("m"))}
    t = qo.abstract_quantized(floats, {"rows": "int4:per_block:32", "cols": "int8:per_channel"})
    assert t["rows"].data.sharding.spec == P("m", None)
    assert t["rows"].scale.shape == (8, 64) and t["rows"].scale.sharding.spec == P("m", None)
    assert t["cols"].scale.shape == (1, 256) and t["cols"].scale.sharding.spec == P(None, "m")
    assert t["bias"].sharding.spec == P("m")
    per_channel_rows = qo.abstract_quantized({"w": sds((256, 64), P("m", None))},
                                             {"w": "int8:per_channel"})
    assert per_channel_rows["w"].scale.sharding.spec == P(None, None)  # (1, 64): replicated

    # 5. Shardings that would split a packed byte or a block are refused, naming them.
    for floats, rule, words in [
        ({"w": sds((64, 24), P(None, "m"))}, "int4:per_channel",
         ["'w'", "axis 1", "packing 2 values per byte", "8 ways", "divides 12"]),
        ({"w": sds((64, 40), P(None, "m"))}, "int2:per_channel",
         ["'w'", "axis 1", "packing 4 values per byte", "5 values per shard"]),
    ]:
        try:
            qo.abstract_quantized(floats, {".*": rule})
        except ValueError as e:
            assert all(w in str(e) for w in words), (str(e), words)
        else:
            raise AssertionError(rule)
    auto = jax.make_mesh((8,), ("m",), axis_types=(jax.sharding.AxisType.Auto,))
    straddle = {"w": jax.ShapeDtypeStruct((128, 16), jnp.float32,
                                          sharding=NamedSharding(auto, P("m", None)))}
    try:
        qo.abstract_quantized(straddle, {".*": "int8:per_block:32"})
    except ValueError as e:
        assert "'w'" in str(e) and "axis 0" in str(e) and "8 ways" in str(e), e
        assert "4 blocks of 32" in str(e) and "shards of 16" in str(e), e
    else:
        raise AssertionError("a block split across shards must be refused")
    try:
        qo.abstract_quantized({"w": sds((64, 48), P(None, "m"))}, {".*": "nf4"})
    except ValueError as e:
        assert "'w'" in str(e) and "LUTArray" in str(e) and "replicate" in str(e), e
    else:
        raise AssertionError("a split lookup-table target must be refused, not dropped")
    print("SHARDED ORBAX OK")
    """
)


def test_sharded_save_restores_onto_another_mesh_bit_for_bit(tmp_path):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SHARDED ORBAX OK" in result.stdout
    print(result.stdout)


def test_restore_keeps_64_bit_leaves_bit_for_bit(tmp_path):
    """Without x64, int64 / float64 leaves come back as the NumPy arrays saved, as qjax.load
    gives them (JAX would truncate them to 32 bits)."""
    assert not jax.config.jax_enable_x64
    step = np.array([2**40 + 7, -(2**35)], np.int64)
    mean = np.array([1 / 3, 1e300], np.float64)
    w = qjax.quantize(jnp.linspace(-1, 1, 256).reshape(8, 32), "int4")
    tree = {"step": step, "stats": [mean], "w": w}
    qo.save(tmp_path / "ckpt", tree)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    for restored in (qo.restore(tmp_path / "ckpt"), qo.restore(tmp_path / "ckpt", target)):
        assert isinstance(restored["step"], np.ndarray) and restored["step"].dtype == np.int64
        np.testing.assert_array_equal(restored["step"], step)
        assert restored["stats"][0].dtype == np.float64
        np.testing.assert_array_equal(_bits(restored["stats"][0]), _bits(mean))
        assert isinstance(restored["w"].data, jax.Array)
        np.testing.assert_array_equal(_bits(restored["w"].data), _bits(w.data))
    qo.orbax_to_safetensors(tmp_path / "ckpt", tmp_path / "back.safetensors")
    back = qjax.load(tmp_path / "back.safetensors")
    np.testing.assert_array_equal(back["step"], step)
    assert back["step"].dtype == np.int64


def test_save_refuses_keys_orbax_would_join_into_one_name(tmp_path):
    """Orbax names arrays by their key paths joined with '.': a collision is refused, naming
    both paths, before anything is written (a QArray's parts count as keys)."""
    with pytest.raises(ValueError, match=r"\['a'\]\['b'\] and \['a\.b'\] .* 'a\.b'"):
        qo.save(tmp_path / "ckpt", {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}})
    assert not (tmp_path / "ckpt").exists()
    qa = qjax.quantize(jnp.ones((4, 8)), "int8")
    with pytest.raises(ValueError, match=r"\['w'\]\['scale'\] and \['w\.scale'\]"):
        qo.save(tmp_path / "ckpt", {"w": qa, "w.scale": jnp.ones(2)})
    assert not (tmp_path / "ckpt").exists()
    qjax.save(tmp_path / "f.safetensors", {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}})
    with pytest.raises(ValueError, match=r"would both be stored as 'a\.b'"):
        qo.safetensors_to_orbax(tmp_path / "f.safetensors", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    # A dotted key that collides with nothing is fine.
    qo.save(tmp_path / "ckpt", {"a.b": np.ones(2, np.float32), "a": {"c": np.zeros(2, np.float32)}})
    restored = qo.restore(tmp_path / "ckpt")
    np.testing.assert_array_equal(restored["a.b"], np.ones(2, np.float32))
    np.testing.assert_array_equal(restored["a"]["c"], np.zeros(2, np.float32))


def _assert_same_lut(got, want):
    assert isinstance(got, qjax.palettize.LUTArray), type(got)
    assert (got.bits, got.pad, got.float_dtype) == (want.bits, want.pad, want.float_dtype)
    for part in ("indices", "table", "scale"):
        a, b = getattr(got, part), getattr(want, part)
        assert (a is None) == (b is None), part
        if b is not None:
            assert (a.dtype, a.shape) == (b.dtype, b.shape), part
            np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=part)


def test_lut_arrays_round_trip_through_orbax_and_the_file_interop(tmp_path):
    from qjax.palettize import nf4, palettize

    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 48)).astype(np.float32)
    tree = {
        "nf4": nf4(jnp.asarray(x)),  # with scales
        "lut3": palettize(jnp.asarray(x[:, :40]), 3),  # 3-bit codes, padded, no scale
        "q": qjax.quantize(jnp.asarray(x), "int8"),
    }
    assert tree["nf4"].scale is not None and tree["lut3"].scale is None
    qo.save(tmp_path / "ckpt", tree)
    restored = qo.restore(tmp_path / "ckpt")
    for name in ("nf4", "lut3"):
        _assert_same_lut(restored[name], tree[name])
        np.testing.assert_array_equal(restored[name].dequantize(), tree[name].dequantize())
    _assert_same(restored["q"], tree["q"])
    # safetensors -> Orbax -> safetensors: LUTArrays stay LUTArrays, the file as qjax.save's.
    qjax.save(tmp_path / "model.safetensors", tree)
    qo.safetensors_to_orbax(tmp_path / "model.safetensors", tmp_path / "ckpt2")
    for name in ("nf4", "lut3"):
        _assert_same_lut(qo.restore(tmp_path / "ckpt2")[name], tree[name])
    qo.orbax_to_safetensors(tmp_path / "ckpt2", tmp_path / "back.safetensors", batch_bytes=1)
    back = qjax.load(tmp_path / "back.safetensors")
    for name in ("nf4", "lut3"):
        _assert_same_lut(back[name], tree[name])
    # Dict entries in key order, as Orbax lists them: what qjax.save writes for the restore.
    qjax.save(tmp_path / "direct.safetensors", qo.restore(tmp_path / "ckpt2"))
    assert (tmp_path / "back.safetensors").read_bytes() == (
        tmp_path / "direct.safetensors"
    ).read_bytes()
    # An abstract target on one device: LUTArrays of ShapeDtypeStructs.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    floats = {"w": jax.ShapeDtypeStruct((64, 48), jnp.float32, sharding=one)}
    abstract = qo.abstract_quantized(floats, {".*": "nf4"})["w"]
    assert isinstance(abstract, qjax.palettize.LUTArray)
    assert abstract.indices.shape == tree["nf4"].indices.shape
    assert abstract.indices.sharding == one


def test_file_interop_keeps_original_tensor_names(tmp_path):
    x = np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 1000
    tree = {"Dense_0": {"kernel": qjax.quantize(jnp.asarray(x), "int8"), "bias": x[0]}}
    names = {"Dense_0/kernel": "Dense_0.kernel", "Dense_0/bias": "Dense_0.bias"}
    qjax.save(tmp_path / "q.safetensors", tree, names=names)
    qo.safetensors_to_orbax(tmp_path / "q.safetensors", tmp_path / "ckpt")
    qo.orbax_to_safetensors(tmp_path / "ckpt", tmp_path / "back.safetensors")
    assert sorted(qjax.load_tensors(tmp_path / "back.safetensors")) == [
        "Dense_0.bias",
        "Dense_0.kernel",
    ]
    qjax.save(tmp_path / "direct.safetensors", qo.restore(tmp_path / "ckpt"), names=names)
    assert (tmp_path / "back.safetensors").read_bytes() == (
        tmp_path / "direct.safetensors"
    ).read_bytes()
