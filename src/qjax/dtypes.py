"""The target-dtype table: storage type, representable range and bit width of each target."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["TARGET_DTYPES", "TargetDType", "target_dtype"]


@dataclasses.dataclass(frozen=True)
class TargetDType:
    """What qjax needs to know about one quantization target.

    Attributes:
      name: canonical name, e.g. ``"int4"``.
      storage: the ``jnp`` dtype that holds one quantized value (an ml_dtypes type).
      qmin: smallest representable value (``iinfo.min`` or ``-finfo.max``).
      qmax: largest representable value.
      bits: bits each stored value takes: the storage type's (``int3`` / ``uint3`` values
        are held, and packed, as 4-bit codes).
      is_float: True for float8 / float4 targets (values are cast, not rounded to integers).
      emax: largest unbiased exponent of a normal value (float targets only); the
        power-of-two (e8m0) scale is ``2 ** (floor(log2(amax)) - emax)``.
      emin: smallest unbiased exponent of a normal value (float targets only).
      mantissa_bits: explicit mantissa bits (float targets only).
    """

    name: str
    storage: np.dtype
    qmin: float
    qmax: float
    bits: int
    is_float: bool
    emax: int | None
    emin: int | None = None
    mantissa_bits: int | None = None

    @property
    def is_signed(self) -> bool:
        """True where the range includes negative values."""
        return self.qmin < 0

    @property
    def packs(self) -> int:
        """How many values fit one byte when packed (1 for byte-sized types)."""
        return 8 // self.bits if self.bits < 8 else 1


def _int_target(name: str) -> TargetDType:
    info = ml_dtypes.iinfo(jnp.dtype(getattr(jnp, name)))
    return TargetDType(
        name=name,
        storage=jnp.dtype(getattr(jnp, name)),
        qmin=int(info.min),
        qmax=int(info.max),
        bits=int(info.bits),
        is_float=False,
        emax=None,
    )


def _narrow_int_target(name: str, bits: int, storage: str) -> TargetDType:
    """An integer target of ``bits`` bits that no ml_dtypes type has, held in ``storage``:
    ``[-2**(bits-1), 2**(bits-1) - 1]`` signed, ``[0, 2**bits - 1]`` unsigned."""
    signed = not name.startswith("u")
    store = jnp.dtype(getattr(jnp, storage))
    return TargetDType(
        name=name,
        storage=store,
        qmin=-(1 << (bits - 1)) if signed else 0,
        qmax=(1 << (bits - 1)) - 1 if signed else (1 << bits) - 1,
        bits=int(ml_dtypes.iinfo(store).bits),
        is_float=False,
        emax=None,
    )


def _float_target(name: str) -> TargetDType:
    info = ml_dtypes.finfo(jnp.dtype(getattr(jnp, name)))
    return TargetDType(
        name=name,
        storage=jnp.dtype(getattr(jnp, name)),
        qmin=-float(info.max),
        qmax=float(info.max),
        bits=int(info.bits),
        is_float=True,
        emax=int(info.maxexp) - 1,
        emin=int(info.minexp),
        mantissa_bits=int(info.nmant),
    )


TARGET_DTYPES: dict[str, TargetDType] = {
    **{n: _int_target(n) for n in ("int8", "uint8", "int4", "uint4")},
    "int3": _narrow_int_target("int3", 3, "int4"),
    "uint3": _narrow_int_target("uint3", 3, "uint4"),
    **{n: _int_target(n) for n in ("int2", "uint2")},
    **{n: _float_target(n) for n in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")},
}
"""Every supported target, by canonical name. Ranges come from ml_dtypes, not literals."""


def target_dtype(dtype: object) -> TargetDType:
    """Looks up a target by name or dtype.

    Args:
      dtype: a name such as ``"int4"`` or a dtype such as ``jnp.int4``.

    Returns:
      The :class:`TargetDType` row.

    Raises:
      ValueError: for a dtype qjax cannot quantize to.

    Examples:
      >>> from qjax.dtypes import target_dtype
      >>> t = target_dtype("uint4")
      >>> (t.qmin, t.qmax, t.bits)
      (0, 15, 4)
      >>> t = target_dtype("int3")  # held in int4 codes
      >>> (t.qmin, t.qmax, t.storage)
      (-4, 3, dtype(int4))
    """
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = jnp.dtype(dtype).name
        except (TypeError, ValueError):
            name = None
    if name not in TARGET_DTYPES:
        raise ValueError(
            f"unsupported target dtype {dtype!r}; choose one of {sorted(TARGET_DTYPES)} "
            "or a preset ('mxfp8', 'mxfp4', 'nvfp4')"
        )
    return TARGET_DTYPES[name]
