"""Packing of sub-byte values (int4, uint4, float4, int2, uint2) into bytes, and back.

Layout: values are packed along the last axis, ``8 // bits`` per byte, the first value
in the lowest bits. A last axis that is not a multiple of the group is padded with zero
codes; the number of padding values is kept so the logical shape can be restored. The
byte layout equals that of the flattened row-major array when no padding is needed.

Lookup-table indices (:mod:`qjax.palettize`) also take 3- and 6-bit codes, which cross
byte boundaries: :func:`pack_codes` puts ``lcm(8, bits) / bits`` codes into
``lcm(8, bits) / 8`` bytes (8 three-bit codes in 3 bytes, 4 six-bit codes in 3 bytes). In
every width the bytes read as one little-endian bit stream: code ``i`` of a row occupies
bits ``i * bits`` to ``(i + 1) * bits - 1``, so 1-, 2-, 4- and 8-bit codes are packed
exactly as :func:`pack` packs them.

Packing uses integer shifts and ORs: on XLA:CPU that costs about a memory copy, while
a float32 -> int4 convert costs many times more.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.dtypes import TargetDType

__all__ = [
    "CODE_BITS",
    "code_group",
    "float_values",
    "pack",
    "pack_codes",
    "packed_pad",
    "unpack",
    "unpack_codes",
    "unpack_planes",
]

CODE_BITS = (1, 2, 3, 4, 6, 8)
"""The index widths :func:`pack_codes` stores."""


def packed_pad(last_dim: int, bits: int) -> int:
    """Number of padding values needed to pack an axis of ``last_dim`` values."""
    per = 8 // bits
    return -last_dim % per


def packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """The uint8 shape that holds an array of ``shape`` packed."""
    per = 8 // bits
    return (*shape[:-1], -(-shape[-1] // per))


def fits_layout(shape: tuple[int, ...], blocked: tuple[int, ...], bits: int) -> bool:
    """True where packing along the last axis of ``blocked`` (a reshape of ``shape``) gives
    the same bytes as packing along the last axis of ``shape``: no padding is needed and
    no byte straddles a row of either shape."""
    per = 8 // bits
    return bool(blocked) and shape[-1] % per == 0 and blocked[-1] % per == 0


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Packs integer codes (any int dtype; only the low ``bits`` bits are kept) into uint8.

    Args:
      codes: integer array with at least one dimension.
      bits: 1, 2 or 4.

    Returns:
      uint8 array of shape ``codes.shape[:-1] + (ceil(codes.shape[-1] * bits / 8),)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.packing import pack, unpack
      >>> p = pack(jnp.array([-8, 7, 1], jnp.int32), 4)
      >>> p, unpack(p, 4, signed=True, pad=1)
      (Array([120,   1], dtype=uint8), Array([-8,  7,  1], dtype=int32))
    """
    per = 8 // bits
    mask = (1 << bits) - 1
    codes = codes.astype(jnp.int32) & mask
    pad = packed_pad(codes.shape[-1], bits)
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    groups = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per, per))
    shifts = (jnp.arange(per, dtype=jnp.int32) * bits).reshape((1,) * codes.ndim + (per,))
    # One OR-reduction over each byte's values rather than strided slices ORed together:
    # fused with a reshape that follows (blocks along the last axis, as in mxfp4), the
    # slices made XLA:CPU's loop over the bytes 5x slower (mxfp4 of 4096x4096 float32).
    out = jax.lax.reduce(groups << shifts, jnp.int32(0), jax.lax.bitwise_or, (groups.ndim - 1,))
    return out.astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, *, signed: bool, pad: int) -> jax.Array:
    """Inverse of :func:`pack`: int32 codes, sign-extended when ``signed``."""
    per = 8 // bits
    mask = (1 << bits) - 1
    shifts = (jnp.arange(per, dtype=jnp.int32) * bits).reshape((1,) * packed.ndim + (per,))
    codes = (packed.astype(jnp.int32)[..., None] >> shifts) & mask
    codes = codes.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))
    if pad:
        codes = codes[..., : codes.shape[-1] - pad]
    if signed:
        sign = 1 << (bits - 1)
        codes = (codes ^ sign) - sign
    return codes


def unpack_planes(packed: jax.Array, bits: int, *, signed: bool) -> list[jax.Array]:
    """:func:`unpack` split by position in the byte: plane ``i`` holds the int32 codes at
    positions ``i, i + per, i + 2 * per, ...`` of the last axis (``per = 8 // bits``), in
    the packed array's own shape.

    Each plane is a few shifts of the bytes, with no interleaving, so XLA:CPU loops over
    them as fast as over the bytes themselves; a consumer that can take the columns of
    each plane separately (a matmul: one dot per plane) never needs the interleaved layout.

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.packing import pack, unpack_planes
      >>> [p.tolist() for p in unpack_planes(pack(jnp.array([-8, 7, 1, -1]), 4), 4, signed=True)]
      [[-8, 1], [7, -1]]
    """
    per = 8 // bits
    values = packed.astype(jnp.int32)
    if signed:  # the wanted bits to the top of the int32, then an arithmetic shift back
        return [(values << (32 - bits * (i + 1))) >> (32 - bits) for i in range(per)]
    mask = (1 << bits) - 1
    return [(values >> (bits * i)) & mask for i in range(per)]


def float_codes(v: jax.Array, target: TargetDType) -> jax.Array:
    """The bit patterns (int32) of float32 values on a float target's grid.

    ``v`` must already be rounded onto the grid and clamped to ``[-fmax, fmax]``
    (:func:`qjax.affine.round_to_float_grid`); the result equals the target's bits of
    ``v.astype(target)``. A few integer ops instead of XLA:CPU's emulated float8 / float4
    converts (2-20x slower than a copy): normal values re-bias the float32 exponent and
    keep the top mantissa bits, values below the smallest normal are whole multiples of
    the subnormal step. NaN maps to the all-ones magnitude (NaN in float8; 6.0 in
    float4_e2m1fn, which has no NaN).
    """
    mantissa_bits, emin = target.mantissa_bits, target.emin
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    magnitude = bits & 0x7FFFFFFF
    normal = (magnitude - ((126 + emin) << 23)) >> (23 - mantissa_bits)
    subnormal = (jnp.abs(v) * float(2 ** (mantissa_bits - emin))).astype(jnp.int32)
    code = jnp.where(magnitude < ((127 + emin) << 23), subnormal, normal)
    # NaN gets the all-ones magnitude: NaN in both float8 formats (float4 has no NaN).
    code = jnp.where(jnp.isnan(v), (1 << (target.bits - 1)) - 1, code)
    return code | ((bits >> 31) & (1 << (target.bits - 1)))


def float_values(codes: jax.Array, target: TargetDType) -> jax.Array:
    """The float32 values of a float target's bit patterns (int32 codes, the low
    ``target.bits`` bits read): the inverse of :func:`float_codes`, equal to
    ``codes.astype(uint8).view(target).astype(float32)`` bit for bit.

    A few integer ops instead of XLA:CPU's emulated float8 / float4 converts (about twice
    as fast for float4): the exponent is re-biased to float32's and the mantissa moved
    to its top bits; exponent field 0 holds whole multiples of the subnormal step. The
    patterns the format reserves (NaN in float8_e4m3fn; inf and NaN in float8_e5m2) are
    read off ml_dtypes.

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.dtypes import target_dtype
      >>> from qjax.packing import float_values
      >>> float_values(jnp.array([1, 7, 9, 15]), target_dtype("float4_e2m1fn")).tolist()
      [0.5, 6.0, -0.5, -6.0]
    """
    mantissa_bits, emin, bits = target.mantissa_bits, target.emin, target.bits
    magnitude = codes & ((1 << (bits - 1)) - 1)
    exponent, mantissa = magnitude >> mantissa_bits, magnitude & ((1 << mantissa_bits) - 1)
    normal = ((exponent + (emin - 1 + 127)) << 23) | (mantissa << (23 - mantissa_bits))
    subnormal = mantissa.astype(jnp.float32) * float(2.0 ** (emin - mantissa_bits))
    value = jnp.where(exponent == 0, subnormal, jax.lax.bitcast_convert_type(normal, jnp.float32))
    magnitudes = np.arange(1 << (bits - 1), dtype=np.uint8).view(target.storage).astype(np.float32)
    reserved = np.flatnonzero(~np.isfinite(magnitudes))
    for code in reserved:  # at most a few, at the top of the range
        value = jnp.where(magnitude == int(code), jnp.float32(magnitudes[code]), value)
    return jnp.where(((codes >> (bits - 1)) & 1) == 1, -value, value)


def code_group(bits: int) -> tuple[int, int]:
    """``(codes, bytes)``: how many ``bits``-wide codes :func:`pack_codes` puts in how many
    bytes, the smallest whole number of both.

    Examples:
      >>> from qjax.packing import code_group
      >>> [code_group(b) for b in (1, 2, 3, 4, 6, 8)]
      [(8, 1), (4, 1), (8, 3), (2, 1), (4, 3), (1, 1)]
    """
    if bits not in CODE_BITS or isinstance(bits, bool):
        raise ValueError(f"index bits must be one of {CODE_BITS}, got {bits!r}")
    nbytes = math.lcm(8, bits) // 8
    return 8 * nbytes // bits, nbytes


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Packs unsigned ``bits``-wide codes (only the low ``bits`` bits are kept) into uint8.

    Codes go along the last axis into one little-endian bit stream per row (see the module
    notes); a last axis that is not a multiple of :func:`code_group`'s codes is padded with
    zero codes. 1-, 2-, 4- and 8-bit codes give exactly :func:`pack`'s bytes.

    Args:
      codes: integer array with at least one dimension.
      bits: one of 1, 2, 3, 4, 6, 8.

    Returns:
      uint8 array of shape ``codes.shape[:-1] + (bytes * ceil(n / codes_per_group),)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.packing import pack_codes, unpack_codes
      >>> p = pack_codes(jnp.arange(8), 3)  # 8 three-bit codes in 3 bytes
      >>> p
      Array([136, 198, 250], dtype=uint8)
      >>> unpack_codes(p, 3, pad=0).tolist()
      [0, 1, 2, 3, 4, 5, 6, 7]
    """
    per, nbytes = code_group(bits)
    if nbytes == 1:
        return pack(codes, bits)
    codes = codes.astype(jnp.int32) & ((1 << bits) - 1)
    pad = -codes.shape[-1] % per
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    groups = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per, per))
    shifts = (jnp.arange(per, dtype=jnp.int32) * bits).reshape((1,) * codes.ndim + (per,))
    word = jax.lax.reduce(groups << shifts, jnp.int32(0), jax.lax.bitwise_or, (groups.ndim - 1,))
    out = jnp.stack([(word >> (8 * j)) & 0xFF for j in range(nbytes)], axis=-1)
    return out.reshape(codes.shape[:-1] + (-1,)).astype(jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int, *, pad: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: int32 codes in ``[0, 2**bits)``, the last ``pad``
    (padding) codes of each row dropped."""
    per, nbytes = code_group(bits)
    if nbytes == 1:
        return unpack(packed, bits, signed=False, pad=pad)
    if packed.shape[-1] % nbytes:
        raise ValueError(
            f"{bits}-bit codes are packed {per} to {nbytes} bytes, but the last axis holds "
            f"{packed.shape[-1]} bytes, not a multiple of {nbytes}"
        )
    b = packed.astype(jnp.int32).reshape(packed.shape[:-1] + (-1, nbytes))
    word = b[..., 0]
    for j in range(1, nbytes):
        word = word | (b[..., j] << (8 * j))
    shifts = (jnp.arange(per, dtype=jnp.int32) * bits).reshape((1,) * word.ndim + (per,))
    codes = (word[..., None] >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(packed.shape[:-1] + (-1,))
    return codes[..., : codes.shape[-1] - pad] if pad else codes
