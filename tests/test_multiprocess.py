"""Two real JAX processes on localhost: quantize where the shards live, save with Orbax.

Each process (2 CPU devices) joins ``jax.distributed`` through a local coordinator, builds
a tree whose shards are spread over the 4 devices of both, quantizes it under ``jit`` with
``quantize_tree`` (no collective in the compiled program), checks every shard it holds
against a one-process run bit for bit, and saves the tree with Orbax, each process writing
its own shards. This process then restores the checkpoint alone and checks it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

import qjax
import qjax.orbax as qo

RULES = {
    ".*attn.*": "int8:per_channel",
    ".*mlp.*": "int4:per_block:32",
    ".*packed.*": "int2:per_channel",
}
"""Per output channel along a sharded output axis, per block along a sharded input axis,
and 2-bit values packed along a sharded axis (32 per shard, 8 bytes)."""


def params() -> dict[str, dict[str, np.ndarray]]:
    """The float tree, the same in every process."""
    rng = np.random.default_rng(0)
    shapes = {"attn": (64, 256), "mlp": (256, 64), "packed": (32, 128)}
    return {k: {"kernel": rng.normal(size=s).astype(np.float32)} for k, s in shapes.items()}


WORKER = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    process_id, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    import qjax, qjax.orbax as qo
    from test_multiprocess import RULES, params

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    mesh = jax.make_mesh((4,), ("m",))
    where = {"attn": P(None, "m"), "mlp": P("m", None), "packed": P(None, "m")}
    floats = params()
    sharded = {k: {"kernel": jax.make_array_from_callback(
                   v["kernel"].shape, NamedSharding(mesh, where[k]),
                   lambda index, v=v: v["kernel"][index])}
               for k, v in floats.items()}
    quantize = jax.jit(lambda p: qjax.quantize_tree(p, RULES))
    hlo = quantize.lower(sharded).compile().as_text()
    assert not any(c in hlo for c in ("all-gather", "all-reduce", "all-to-all")), hlo
    quantized = quantize(sharded)

    # Every shard this process holds, against one process quantizing the whole arrays.
    reference = qjax.quantize_tree(floats, RULES)
    abstract = qo.abstract_quantized(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                     sharded), RULES)
    held = 0
    for name in floats:
        got, want = quantized[name]["kernel"], reference[name]["kernel"]
        for part in ("data", "scale"):
            array, full = getattr(got, part), np.asarray(getattr(want, part))
            assert array.sharding.is_equivalent_to(
                getattr(abstract[name]["kernel"], part).sharding, array.ndim), (name, part)
            assert not array.is_fully_addressable
            for shard in array.addressable_shards:
                assert shard.device.process_index == process_id
                np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
                held += 1
    assert quantized["packed"]["kernel"].packed
    qo.save(path, quantized)
    print(f"PROCESS {process_id} OK: {held} shards checked", flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_quantize_their_shards_and_save_them(tmp_path):
    path = tmp_path / "ckpt"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(
            filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])
        ),
    )
    port = str(_free_port())
    start = time.perf_counter()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), port, str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=120)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    report = "\n".join(f"--- process {i}:\n{out}" for i, out in enumerate(outputs))
    assert all(w.returncode == 0 for w in workers), report
    for i in range(2):
        assert f"PROCESS {i} OK" in outputs[i], report
    seconds = time.perf_counter() - start
    # Each process wrote its own shards.
    assert sorted(p.name for p in path.glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    restored = qo.restore(path)  # here: one process, one device
    reference = qjax.quantize_tree(params(), RULES)
    for name, leaf in reference.items():
        got = restored[name]["kernel"]
        assert (got.spec, got.packed) == (leaf["kernel"].spec, leaf["kernel"].packed)
        for part in ("data", "scale"):
            want = np.asarray(getattr(leaf["kernel"], part))
            np.testing.assert_array_equal(np.asarray(getattr(got, part)), want, err_msg=name)
    print(f"2 processes: {seconds:.1f} s")
