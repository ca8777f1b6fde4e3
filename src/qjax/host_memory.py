"""Host memory for XLA:CPU: reuse freed buffers instead of faulting in fresh pages.

XLA:CPU takes every buffer a jitted function writes (a dequantized weight, a matmul's
output) from the C library's ``malloc``. With glibc's defaults, a buffer above 32 MiB
(and any buffer that one of XLA's worker threads allocates above its 64 MiB arena) is a
fresh ``mmap``, returned to the kernel on free. Every call then faults in each of its
4 KiB pages anew. On a 2-core machine, a jitted copy of a 4096x4096 float32 array takes
about 3.5x ``np.copy`` of it (NumPy asks for huge pages, XLA's ``malloc`` does not), and
dequantizing a packed int4 or NF4 weight of that size costs what the copy does: the
unpacking is not the bottleneck, the page faults are.

:func:`reuse_freed_buffers` changes three of glibc's ``malloc`` settings for the whole
process, so that freed buffers are kept and handed out again:

* no ``mmap`` below 1 GiB (``mmap_threshold``);
* no returning of freed heap memory to the kernel below 2 GiB (``trim_threshold``);
* one arena for all threads (``arena_max=1``): large buffers come from the main heap.

After the first call of a jitted function, its outputs land in pages that are already
mapped, and the copy runs at ``np.copy``'s speed or faster. The price: the process's
resident memory does not shrink after a peak (freed memory stays for reuse), and threads
that call ``malloc`` at the same time share one lock. Where weights and activations are
tens of MiB, it pays (serving a 4096-wide int4 Dense stack with whole weights
dequantized: 5.4x to 2.0x the float model's time); where a step is many tiny operations
(decoding a model with 1 MiB weights), the shared lock can cost more than the faults it
saves. Measure your workload both ways (the README's "CPU memory" section).

glibc reads the same settings from the environment at start-up; :data:`GLIBC_TUNABLES`
is the value to give it, for programs that cannot call Python first::

    export GLIBC_TUNABLES=$(python -c "import qjax; print(qjax.host_memory.GLIBC_TUNABLES)")
    python serve.py

Example:
    >>> import qjax
    >>> for setting in qjax.host_memory.GLIBC_TUNABLES.split(":"):
    ...     print(setting)
    glibc.malloc.mmap_threshold=1073741824
    glibc.malloc.trim_threshold=2147483647
    glibc.malloc.arena_max=1

In a program, call ``qjax.host_memory.reuse_freed_buffers()`` right after the imports,
before the first JAX computation (JAX's CPU threads pick their ``malloc`` arena when they
first allocate, and keep it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["GLIBC_TUNABLES", "reuse_freed_buffers", "reusing_freed_buffers"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
"""``mallopt`` parameter numbers, from glibc's ``malloc.h``."""

_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int takes
_SETTINGS = (
    ("mmap_threshold", _M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
    ("trim_threshold", _M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
    ("arena_max", _M_ARENA_MAX, 1),
)

GLIBC_TUNABLES = ":".join(f"glibc.malloc.{name}={value}" for name, _, value in _SETTINGS)
"""The environment value that makes glibc start with :func:`reuse_freed_buffers`'s settings."""

_applied = False


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has ``mallopt``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def _jax_has_started() -> bool:
    """Whether JAX has created its backends (and with them its CPU threads) in this process."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def reuse_freed_buffers() -> bool:
    """Make glibc's ``malloc`` keep freed buffers for reuse, for the whole process.

    Call it once, before the first JAX computation. See the module docstring for why it
    speeds up XLA:CPU and what it costs.

    Returns:
      True when the settings were applied (or already were); False when the C library
      is not glibc (macOS, musl), where there is nothing to change this way.

    Raises:
      RuntimeError: JAX has already run a computation in this process: its CPU threads
        hold their own ``malloc`` arenas, which would keep mapping fresh pages. Call it
        earlier, or start the process with ``GLIBC_TUNABLES`` set to
        :data:`GLIBC_TUNABLES`.
      OSError: glibc refused one of the settings.
    """
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    if _jax_has_started():
        raise RuntimeError(
            "qjax.host_memory.reuse_freed_buffers() must run before the first JAX "
            "computation in this process (JAX's CPU threads already hold their own malloc "
            "arenas). Call it right after the imports, or start Python with "
            f"GLIBC_TUNABLES={GLIBC_TUNABLES}"
        )
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    for name, param, value in _SETTINGS:
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc's mallopt refused {name}={value}")
    _applied = True
    return True


def reusing_freed_buffers() -> bool:
    """Whether this process runs with :func:`reuse_freed_buffers`'s settings.

    True after :func:`reuse_freed_buffers` returned True, or when the process started with
    ``GLIBC_TUNABLES`` carrying all three settings (other tunables may sit beside them).
    """
    if _applied:
        return True
    given = os.environ.get("GLIBC_TUNABLES", "").split(":")
    return all(f"glibc.malloc.{name}={value}" in given for name, _, value in _SETTINGS)
