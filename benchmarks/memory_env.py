"""The host-memory regime a CPU benchmark runs in, and XLA's own copy as a second bound.

XLA:CPU takes every large buffer (a jitted function's 64 MiB output, say) fresh from the
C library's ``malloc``, which maps new 4 KiB pages for it; the first write to each page
then faults. NumPy asks the kernel for transparent huge pages (``madvise``) on large
arrays and pays about 1/512 of those faults. On a machine whose
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` (a common default), a
jitted copy of a 4096x4096 float32 array therefore takes about 3.5x ``np.copy`` of it,
whatever the copy computes. Two ways out, both process-wide:

* ``--reuse-host-buffers`` (any benchmark that takes it) calls
  :func:`qjax.host_memory.reuse_freed_buffers` first: glibc keeps freed buffers and hands
  them out again, so a jitted function's outputs land in pages already mapped;
* ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...`` makes glibc's ``malloc`` ask for
  huge pages (glibc >= 2.35): still fresh pages, 512 times fewer faults.

The copy-bound benchmarks print the regime and both bounds: ``np.copy`` and XLA's copy
(a jitted negation: one read and one write of every value).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from qjax import host_memory

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_pages_requested() -> bool:
    """True when ``GLIBC_TUNABLES`` asks glibc's malloc for huge pages."""
    tunables = os.environ.get("GLIBC_TUNABLES", "").replace(",", ":").split(":")
    return any(t.strip() in (HUGE_PAGES, "glibc.malloc.hugetlb=2") for t in tunables)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Give a benchmark the ``--reuse-host-buffers`` flag (apply it with :func:`apply`)."""
    parser.add_argument(
        "--reuse-host-buffers",
        action="store_true",
        help="run with qjax.host_memory.reuse_freed_buffers() (see benchmarks/memory_env.py)",
    )


def apply(args: argparse.Namespace) -> None:
    """Act on ``--reuse-host-buffers``: call it before the benchmark's first computation."""
    if args.reuse_host_buffers and not host_memory.reuse_freed_buffers():
        raise SystemExit("--reuse-host-buffers needs glibc (Linux); this C library is not")


def describe() -> str:
    """One line: the transparent-huge-page mode and how glibc's malloc was set up."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        mode = "unknown"
    if host_memory.reusing_freed_buffers():
        regime = "malloc reuses freed buffers (qjax.host_memory.reuse_freed_buffers)"
    elif huge_pages_requested():
        regime = f"GLIBC_TUNABLES={HUGE_PAGES} set"
    else:
        regime = "glibc's default malloc (rerun with --reuse-host-buffers)"
    return f"host memory: transparent huge pages {mode}; {regime}"


xla_copy = jax.jit(jnp.negative)
"""XLA's copy of an array: one read and one write of each value, into a fresh buffer."""
