"""What the host CPU does fast, as far as :func:`qjax.kernels.choose_path` needs to know."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

__all__ = ["BF16_DOTS_ENV", "BF16_DOT_FLAGS", "native_bf16_dots"]

BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags (as ``/proc/cpuinfo`` names them) of instructions that multiply bfloat16
pairs and add them in float32: with either, XLA:CPU runs a bfloat16 dot summed in float32
at about 0.55x a float32 dot's time. Without them it emulates the products: on an
AVX2-only AMD EPYC a bfloat16 dot took 1.2-1.5x float32's time (one long dot) and
``"bf16_dot"``'s chunked W8A8 products 1.6-5x, ``"int8_dot"``'s 0.34-1.19x (measured
with ``benchmarks/bench_matmul.py --paths``)."""

BF16_DOTS_ENV = "QJAX_BF16_DOTS"
"""The environment variable that overrides :func:`native_bf16_dots`: ``1`` or ``0``."""


def native_bf16_dots() -> bool:
    """Whether this machine's CPU has native bfloat16 dot instructions, so that
    ``path="auto"`` takes ``"bf16_dot"`` where it measured faster (see
    :func:`qjax.kernels.choose_path`).

    True on Linux x86 CPUs that list one of :data:`BF16_DOT_FLAGS` in ``/proc/cpuinfo``
    (e.g. AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later); False on
    every other CPU, ARM included (not measured there), where ``path="auto"`` takes
    ``"int8_dot"``, the faster integer path on AVX2. The environment
    variable :data:`BF16_DOTS_ENV` (``QJAX_BF16_DOTS=1`` or ``0``) overrides the reading,
    e.g. on a machine whose CPU this function cannot read. The choice changes speed only:
    both integer paths give the same bits.

    Examples:
      >>> from qjax import kernels
      >>> isinstance(kernels.native_bf16_dots(), bool)
      True
    """
    given = os.environ.get(BF16_DOTS_ENV)
    if given is not None:
        if given.strip() not in ("0", "1"):
            raise ValueError(
                f"{BF16_DOTS_ENV} must be 1 (the CPU has native bfloat16 dots) or 0 (it has "
                f"not), got {given!r}; unset it to read the CPU's flags"
            )
        return given.strip() == "1"
    return _host_has_bf16_flags()


@functools.cache
def _host_has_bf16_flags() -> bool:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return has_bf16_dot_flags(text)


def has_bf16_dot_flags(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of a ``/proc/cpuinfo`` text lists one of
    :data:`BF16_DOT_FLAGS`.

    Examples:
      >>> from qjax.kernels._cpu import has_bf16_dot_flags
      >>> has_bf16_dot_flags("processor : 0\\nflags : fpu avx2 avx512f avx512_bf16\\n")
      True
      >>> has_bf16_dot_flags("flags : fpu avx2 fma\\n")
      False
    """
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return any(flag in value.split() for flag in BF16_DOT_FLAGS)
    return False
