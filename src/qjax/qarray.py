"""QArray: a quantized array as a pytree (stored values, scale, offset; static spec)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qjax import granularity as gran
from qjax import packing
from qjax.affine import dequantize_blocks
from qjax.qparams import QParams
from qjax.spec import QuantSpec

__all__ = ["QArray"]


@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array. Build one with :func:`qjax.quantize`.

    A registered pytree: ``data``, ``scale`` and ``offset`` are leaves, the rest is
    static, so a QArray passes through ``jit``, ``vmap`` and ``tree_map``. Vmapping
    :func:`qjax.quantize` over a leading axis stacks QArrays along that axis.

    Attributes:
      data: the stored values: the target's ml_dtypes type (e.g. ``int8``,
        ``float8_e4m3fn``), or uint8 holding ``8 // bits`` sub-byte values per byte along
        the last axis when ``packed``.
      scale: one scale per block, shape ``shape // block_shape``.
      offset: int32 zero points (formulation ``"zero_point"``), float32 minvals
        (``"minval"``), or None (``"scale"``).
      spec: the :class:`~qjax.QuantSpec` used.
      float_dtype: the dtype :meth:`dequantize` returns (the input's dtype).
      packed: True when ``data`` holds packed sub-byte values.
      pad: packing padding at the end of the last axis.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> qa = qjax.quantize(jnp.linspace(-1, 1, 8).reshape(2, 4),
      ...                    qjax.QuantSpec("int4", granularity=qjax.per_channel(0)))
      >>> qa.shape, qa.dtype, qa.nbytes  # 8 int4 values in 4 bytes + 2 float32 scales
      ((2, 4), dtype(int4), 12)
      >>> qa.values
      Array([[-7, -5, -3, -1],
             [1, 3, 5, 7]], dtype=int4)
    """

    data: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    spec: QuantSpec = dataclasses.field(metadata={"static": True})
    float_dtype: str = dataclasses.field(default="float32", metadata={"static": True})
    packed: bool = dataclasses.field(default=False, metadata={"static": True})
    pad: int = dataclasses.field(default=0, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape (of the unquantized array)."""
        if not self.packed:
            return tuple(self.data.shape)
        last = self.data.shape[-1] * self.spec.target.packs - self.pad
        return tuple(self.data.shape[:-1]) + (last,)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> jnp.dtype:
        """The quantized element type, e.g. ``int4`` (also when stored packed)."""
        return self.spec.target.storage

    @property
    def nbytes(self) -> int:
        """Bytes actually held: stored values (packed where packed), scales and offsets."""
        parts = (self.data, self.scale, self.offset)
        # From shape and itemsize, so it also works on abstract values (jax.eval_shape).
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in parts if a is not None)

    @property
    def qparams(self) -> QParams:
        """The scale and offset as :class:`~qjax.QParams`."""
        offset = self.offset
        zero_point = offset if self.spec.formulation == "zero_point" else None
        minval = offset if self.spec.formulation == "minval" else None
        return QParams(self.scale, zero_point, minval)

    def codes(self) -> jax.Array:
        """The quantized values as int32 integers (integer targets) or the storage type."""
        t = self.spec.target
        if not self.packed:
            return self.data.astype(jnp.int32) if not t.is_float else self.data
        codes = packing.unpack(
            self.data, t.bits, signed=t.is_signed and not t.is_float, pad=self.pad
        )
        if t.is_float:
            return jax.lax.bitcast_convert_type(codes.astype(jnp.uint4), t.storage)
        return codes

    @property
    def values(self) -> jax.Array:
        """The quantized values in their ml_dtypes type (unpacked if stored packed)."""
        if not self.packed:
            return self.data
        return self.codes().astype(self.spec.target.storage)

    def dequantize(self) -> jax.Array:
        """The float array these values stand for, in :attr:`float_dtype`."""
        shape = self.shape
        blocks = tuple(d // n if n else 1 for d, n in zip(shape, self.scale.shape))
        layout = gran.BlockLayout.of(shape, blocks)
        t = self.spec.target
        if self.packed and not t.is_float and packing.fits_layout(shape, layout.blocked, t.bits):
            # Unpack straight into the blocked layout: same values, no index arithmetic.
            blocked_bytes = (*layout.blocked[:-1], layout.blocked[-1] // t.packs)
            codes = packing.unpack(
                self.data.reshape(blocked_bytes), t.bits, signed=t.is_signed, pad=0
            )
        else:
            codes = layout.blockify(self.codes())
        qp = jax.tree.map(layout.expand, self.qparams)
        return dequantize_blocks(codes, qp, self.spec, self.float_dtype).reshape(shape)

    def __repr__(self) -> str:
        return (
            f"QArray(shape={self.shape}, spec={self.spec}, scale_shape="
            f"{tuple(self.scale.shape)}, packed={self.packed}, nbytes={self.nbytes})"
        )


jax.tree_util.register_dataclass(QArray)
