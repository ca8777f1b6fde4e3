"""The host-memory regime a CPU benchmark runs in, and XLA's own copy as a second bound.

XLA:CPU takes every large buffer (a jitted function's 64 MiB output, say) fresh from the
C library's ``malloc``, which maps new 4 KiB pages for it; the first write to each page
then faults. NumPy asks the kernel for transparent huge pages (``madvise``) on large
arrays and pays about 1/512 of those faults. On a machine whose
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` (a common default), a
jitted copy of a 4096x4096 float32 array therefore takes about 4x ``np.copy`` of it,
whatever the copy computes. Starting Python with::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...

makes glibc's ``malloc`` ask for huge pages too (glibc >= 2.35), and XLA's copy then runs
at ``np.copy``'s speed. The copy-bound benchmarks print the regime and both bounds:
``np.copy`` and XLA's copy (a jitted negation: one read and one write of every value).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_pages_requested() -> bool:
    """True when ``GLIBC_TUNABLES`` asks glibc's malloc for huge pages."""
    tunables = os.environ.get("GLIBC_TUNABLES", "").replace(",", ":").split(":")
    return any(t.strip() in (HUGE_PAGES, "glibc.malloc.hugetlb=2") for t in tunables)


def describe() -> str:
    """One line: the transparent-huge-page mode and whether malloc asks for huge pages."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        mode = "unknown"
    asked = "set" if huge_pages_requested() else f"not set (rerun with GLIBC_TUNABLES={HUGE_PAGES})"
    return f"host memory: transparent huge pages {mode}; GLIBC_TUNABLES={HUGE_PAGES} {asked}"


xla_copy = jax.jit(jnp.negative)
"""XLA's copy of an array: one read and one write of each value, into a fresh buffer."""
