"""qjax.host_memory: where XLA:CPU's large buffers come from, read back from glibc itself.

Each case runs in a fresh Python (malloc settings are process-wide and must be set before
JAX's first computation). The child jits a 4096x4096 float32 negation, keeps its 64 MiB
output alive, and reports glibc's ``mallinfo2``: ``hblkhd`` (bytes in ``mmap``-ed chunks)
and ``arena`` (bytes in malloc's heaps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qjax import host_memory

pytestmark = pytest.mark.skipif(
    host_memory._glibc() is None or not hasattr(host_memory._glibc(), "mallinfo2"),
    reason="glibc >= 2.33 only (mallopt and mallinfo2)",
)

OUTPUT_BYTES = 4096 * 4096 * 4

CHILD = textwrap.dedent(
    """
    import ctypes, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from qjax import host_memory

    mode = sys.argv[1]
    if mode == "call":
        assert host_memory.reuse_freed_buffers() is True
        assert host_memory.reuse_freed_buffers() is True  # a second call is harmless
    x = jnp.asarray(np.ones((4096, 4096), np.float32))
    negate = jax.jit(jnp.negative)
    negate(x).block_until_ready()  # a first output, freed: the heap keeps it
    y = negate(x).block_until_ready()
    if mode == "late":
        try:
            host_memory.reuse_freed_buffers()
        except RuntimeError as e:
            print(json.dumps({"error": str(e)}))
        sys.exit(0)

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        ).split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    assert float(y[0, 0]) == -1.0
    print(json.dumps({
        "mmapped": info.hblkhd, "heap": info.arena,
        "reusing": host_memory.reusing_freed_buffers(),
    }))
    """
)


def run_child(mode: str, tunables: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's too
    env.pop("GLIBC_TUNABLES", None)
    env["JAX_PLATFORMS"] = "cpu"
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_malloc_maps_large_outputs_fresh():
    """The problem the module exists for: glibc's default gives a 64 MiB output its own mmap."""
    info = run_child("default")
    assert info["mmapped"] >= OUTPUT_BYTES
    assert info["reusing"] is False


@pytest.mark.parametrize("how", ["call", "environment"])
def test_reuse_puts_large_outputs_on_the_heap(how):
    if how == "call":
        info = run_child("call")
    else:
        info = run_child("default", tunables=host_memory.GLIBC_TUNABLES)
    assert info["mmapped"] < OUTPUT_BYTES
    assert info["heap"] >= 2 * OUTPUT_BYTES  # the input and the live output, at least
    assert info["reusing"] is True


def test_environment_value_is_found_among_other_tunables():
    info = run_child(
        "default", tunables=f"glibc.malloc.tcache_count=7:{host_memory.GLIBC_TUNABLES}"
    )
    assert info["reusing"] is True
    assert info["mmapped"] < OUTPUT_BYTES


def test_calling_after_the_first_computation_says_what_to_do():
    info = run_child("late")
    assert "before the first JAX computation" in info["error"]
    assert host_memory.GLIBC_TUNABLES in info["error"]
