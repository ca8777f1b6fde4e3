"""QArray: a quantized array as a pytree (stored values, scale, offset; static spec)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import granularity as gran
from qjax import packing
from qjax.affine import dequantize_blocks, saturate
from qjax.qparams import QParams, expand_qparams
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
      channel_scale: None, or a float32 multiplier applied after dequantization, one per
        input channel: same rank as :attr:`shape`, each dimension 1 or the full one (e.g.
        ``(in, 1)`` for a Flax Dense kernel ``[in, out]``). AWQ and SmoothQuant
        (:mod:`qjax.algorithms`) quantize ``w * s`` along the input axis and store
        ``1 / s`` here; serving multiplies the layer's input by it.
      tensor_scale: for specs with ``tensor_scale=True`` (NVFP4), the float32 scale of the
        whole array, shape ``(1,) * ndim`` (stacked QArrays: one per layer, e.g.
        ``(layers, 1, 1)``), that each block's ``scale`` multiplies; else None.
      spec: the :class:`~qjax.QuantSpec` used.
      float_dtype: the dtype :meth:`dequantize` returns (the input's dtype).
      packed: True when ``data`` holds packed sub-byte values.
      pad: packing padding at the end of the last axis.

    Building a QArray (directly or with ``dataclasses.replace``) checks its parts against
    each other and the spec and raises ``ValueError`` naming the field: ``float_dtype``,
    ``packed`` and ``pad`` always; the dtypes of ``data``, ``scale`` and ``offset``, the
    presence of ``offset`` and that ``scale`` has one entry per block whenever ``data`` and
    ``scale`` are arrays or abstract values. Where they are concrete arrays, ``scale`` must
    also have the shape the spec's granularity gives, possibly stacked along leading axes
    (as ``vmap`` and ``scan`` stack QArrays). Inside transformations JAX rebuilds QArrays
    from tracers, per-example slices or placeholders (``None``, sentinels); only what holds
    for those is checked there. :meth:`validate` checks everything, strictly.

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
    channel_scale: jax.Array | None = None
    tensor_scale: jax.Array | None = None
    float_dtype: str = dataclasses.field(default="float32", metadata={"static": True})
    packed: bool = dataclasses.field(default=False, metadata={"static": True})
    pad: int = dataclasses.field(default=0, metadata={"static": True})

    def __post_init__(self):
        _check_static(self)
        _check_leaves(self, strict=False)

    def validate(self) -> QArray:
        """Checks every part strictly and returns the QArray; for files and other trust borders.

        On top of the checks made when a QArray is built: ``data``, ``scale`` and ``offset``
        must be arrays (or abstract values) with exactly the dtypes the spec stores
        (``scale_dtype``; int32 zero points, float32 minvals), and ``scale`` must have the
        shape the spec's granularity gives, possibly stacked along leading axes.

        Raises:
          ValueError: naming the field that does not fit, and what it must be.

        Examples:
          >>> import dataclasses, jax.numpy as jnp, qjax
          >>> qa = qjax.quantize(jnp.ones((4, 8)), "int8:per_channel")
          >>> qa.validate() is qa
          True
          >>> dataclasses.replace(qa, scale=qa.scale.astype(jnp.bfloat16)).validate()
          Traceback (most recent call last):
            ...
          ValueError: QArray scale must be float32 (the spec's scale_dtype), got bfloat16
        """
        _check_leaves(self, strict=True)
        return self

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
        """Bytes actually held: stored values (packed where packed), scales, offsets, channel
        scales and tensor scales."""
        parts = (self.data, self.scale, self.offset, self.channel_scale, self.tensor_scale)
        # From shape and itemsize, so it also works on abstract values (jax.eval_shape).
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in parts if a is not None)

    @property
    def qparams(self) -> QParams:
        """The scale, offset and tensor scale as :class:`~qjax.QParams`."""
        offset = self.offset
        zero_point = offset if self.spec.formulation == "zero_point" else None
        minval = offset if self.spec.formulation == "minval" else None
        return QParams(self.scale, zero_point, minval, self.tensor_scale)

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
        qp = expand_qparams(self.qparams, layout)
        if self.channel_scale is None:
            return dequantize_blocks(codes, qp, self.spec, self.float_dtype).reshape(shape)
        values = dequantize_blocks(codes, qp, self.spec, jnp.float32).reshape(shape)
        scaled = values * self.channel_scale.astype(jnp.float32)
        return saturate(scaled, self.float_dtype).astype(self.float_dtype)

    def __getattr__(self, name: str) -> Any:
        if hasattr(type(self), name):  # a property that failed: its own error, again
            return object.__getattribute__(self, name)
        raise not_an_array(self, name)

    def __repr__(self) -> str:
        return (
            f"QArray(shape={self.shape}, spec={self.spec}, scale_shape="
            f"{tuple(self.scale.shape)}, packed={self.packed}, nbytes={self.nbytes})"
        )


jax.tree_util.register_dataclass(QArray)


def not_an_array(weight: object, name: str) -> AttributeError:
    """The error for an array attribute (``.T``, ``.astype``, ...) asked of a quantized
    weight: code that reads the weight outside its own layer, which serving cannot see
    (a tied language-model head reading the embedding table), gets the weight itself."""
    kind = type(weight).__name__
    if name.startswith("__"):
        return AttributeError(f"{kind!r} object has no attribute {name!r}")
    return AttributeError(
        f"{kind!r} object has no attribute {name!r}: a {kind} is a quantized weight, not an "
        "array. Its own layer reads it when served (qjax.flax.serve.served); code that "
        "reads it elsewhere, such as a tied language-model head taking the embedding "
        "table's transpose, gets the quantized weight itself. Keep that weight float (a "
        "rule naming it, such as '.*wte.*': None; QAT read it float there too), or run the tree "
        f"through qjax.dequantizing, or call .dequantize() for a {kind}'s float values"
    )


def _check_static(qa: QArray) -> None:
    """Checks (and canonicalises) the static fields: they are never placeholders."""
    if not isinstance(qa.spec, QuantSpec):
        raise TypeError(f"QArray spec must be a QuantSpec, got {type(qa.spec).__name__}")
    try:
        float_dtype = None if qa.float_dtype is None else jnp.dtype(qa.float_dtype)
    except TypeError:
        float_dtype = None
    if float_dtype is None or not jnp.issubdtype(float_dtype, jnp.floating):
        raise ValueError(
            "QArray float_dtype must name a floating-point dtype (the dtype dequantize "
            f"returns), e.g. 'float32' or 'bfloat16'; got {qa.float_dtype!r}"
        )
    object.__setattr__(qa, "float_dtype", float_dtype.name)
    if not isinstance(qa.packed, (bool, np.bool_)):
        raise ValueError(f"QArray packed must be True or False, got {qa.packed!r}")
    object.__setattr__(qa, "packed", bool(qa.packed))
    target = qa.spec.target
    if qa.packed and target.bits >= 8:
        raise ValueError(
            f"QArray packed=True needs a sub-byte target (4- or 2-bit), but the spec's "
            f"target is {target.name}"
        )
    pads = target.packs if qa.packed else 1
    if not isinstance(qa.pad, numbers.Integral) or isinstance(qa.pad, (bool, np.bool_)):
        raise ValueError(f"QArray pad must be an int, got {qa.pad!r}")
    if not 0 <= qa.pad < pads:
        raise ValueError(
            f"QArray pad must be in [0, {pads - 1}] "
            + (f"({pads} {target.name} values per byte)" if qa.packed else "(packed=False)")
            + f", got {qa.pad}"
        )
    object.__setattr__(qa, "pad", int(qa.pad))


def _check_leaves(qa: QArray, *, strict: bool) -> None:
    """Checks data, scale and offset against each other and the spec.

    Not strict, a part that is no array or abstract value (a placeholder JAX or the user
    put in the tree) skips the checks that need it, float0 (integer tangents) skips the
    dtype checks, and the granularity is checked only on concrete arrays.
    """
    spec, target = qa.spec, qa.spec.target
    data, scale = _aval(qa.data, "data", strict), _aval(qa.scale, "scale", strict)
    if data is None or scale is None:
        return
    stored = jnp.dtype(jnp.uint8) if qa.packed else target.storage
    _check_dtype("data", data[1], stored, exact=True, why=_storage(qa))
    if qa.packed and (not data[0] or (data[0][-1] == 0 and qa.pad)):
        raise ValueError(
            f"QArray data of shape {data[0]} cannot hold packed values with pad {qa.pad}; "
            "packed data needs at least one axis, and a byte for the padding"
        )
    scale_dtype = jnp.dtype(spec.scale_dtype)
    exact = strict or spec.power_of_two_scale  # e8m0 scales are read through their bits
    _check_dtype("scale", scale[1], scale_dtype, exact=exact, why="the spec's scale_dtype")
    shape = qa.shape
    where = f"{shape} (data {data[0]}, pad {qa.pad})" if qa.packed else str(shape)
    if len(scale[0]) != len(shape) or not all(
        (n == 0 and d == 0) or (n > 0 and d % n == 0) for n, d in zip(scale[0], shape)
    ):
        raise ValueError(
            f"QArray scale has shape {scale[0]}, which does not fit an array of shape {where}: "
            f"it needs one entry per block, shape // block shape, "
            f"{_expected_scale(shape, spec)} for {spec.granularity}"
        )
    if (strict or _concrete(qa.data, qa.scale)) and not _fits_granularity(
        shape, scale[0], spec.granularity
    ):
        raise ValueError(
            f"QArray scale has shape {scale[0]}, but {spec.granularity} on an array of shape "
            f"{where} gives {_expected_scale(shape, spec)} (or that shape stacked along "
            "leading axes)"
        )
    _check_offset(qa, scale[0], strict)
    _check_channel_scale(qa, shape, strict)
    _check_tensor_scale(qa, shape, strict)


def _check_tensor_scale(qa: QArray, shape: tuple[int, ...], strict: bool) -> None:
    """Present exactly where the spec has one: float32, ``(1,) * ndim`` after any stacked
    leading axes (those equal to the array's own)."""
    wanted = qa.spec.tensor_scale
    if qa.tensor_scale is None:
        if wanted:
            raise ValueError(
                f"QArray tensor_scale is missing: {qa.spec} scales its blocks by one float32 "
                f"scale per tensor, shape {(1,) * len(shape)}"
            )
        return
    found = _aval(qa.tensor_scale, "tensor_scale", strict)
    if not wanted:
        if strict or found is not None:
            raise ValueError(
                f"QArray tensor_scale must be None: {qa.spec} has no tensor scale "
                "(tensor_scale=False)"
            )
        return
    if found is None:
        return
    ts_shape, dtype = found
    # One scale per copy of the array stacked along leading axes (vmap): (layers, 1, 1).
    # Per layer, packed data has at least one axis; unpacked data may be 0-d.
    most = len(shape) - 1 if qa.packed else len(shape)
    stacked = len(ts_shape) == len(shape) and any(
        tuple(ts_shape[:k]) == tuple(shape[:k]) and all(d == 1 for d in ts_shape[k:])
        for k in range(most + 1)
    )
    if not stacked:
        raise ValueError(
            f"QArray tensor_scale has shape {ts_shape}, but an array of shape {shape} needs "
            f"{(1,) * len(shape)} (one scale per tensor), or that shape after stacked leading "
            "axes (e.g. (layers, 1, 1))"
        )
    _check_dtype("tensor_scale", dtype, jnp.dtype(jnp.float32), exact=strict, why="a float32 scale")


def _check_channel_scale(qa: QArray, shape: tuple[int, ...], strict: bool) -> None:
    """None, or float32 with the QArray's rank, each dimension 1 or the array's own."""
    if qa.channel_scale is None:
        return
    found = _aval(qa.channel_scale, "channel_scale", strict)
    if found is None:
        return
    cs_shape, dtype = found
    if len(cs_shape) != len(shape) or not all(c in (1, d) for c, d in zip(cs_shape, shape)):
        raise ValueError(
            f"QArray channel_scale has shape {cs_shape}, which does not broadcast along the "
            f"axes of an array of shape {shape}: it needs the same rank, each dimension 1 "
            "or the array's own (e.g. (in, 1) for a Dense kernel [in, out])"
        )
    _check_dtype("channel_scale", dtype, jnp.dtype(jnp.float32), exact=strict, why="multipliers")


def _check_offset(qa: QArray, scale_shape: tuple[int, ...], strict: bool) -> None:
    formulation = qa.spec.formulation
    if formulation == "scale":
        # Not strict, a placeholder (e.g. Orbax's restore target) where no offset exists
        # is what JAX and Orbax put in trees; an array there is a real mistake.
        if qa.offset is not None and (strict or _aval(qa.offset, "offset", False) is not None):
            raise ValueError(
                f"QArray offset must be None: formulation 'scale' ({qa.spec}) has no zero "
                "point or minval"
            )
        return
    what = "int32 zero points" if formulation == "zero_point" else "float32 minvals"
    if qa.offset is None:
        raise ValueError(
            f"QArray offset is missing: formulation {formulation!r} ({qa.spec}) needs {what}, "
            f"shaped like scale {scale_shape}"
        )
    offset = _aval(qa.offset, "offset", strict)
    if offset is None:
        return
    if offset[0] != scale_shape:
        raise ValueError(
            f"QArray offset must have the scale's shape {scale_shape} ({what}), got {offset[0]}"
        )
    expected = jnp.dtype(jnp.int32 if formulation == "zero_point" else jnp.float32)
    _check_dtype("offset", offset[1], expected, exact=strict, why=what)


def _aval(leaf: Any, field: str, strict: bool) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` of an array, tracer or abstract value; None for anything else."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if isinstance(shape, tuple) and isinstance(dtype, np.dtype):
        return tuple(int(d) for d in shape), dtype
    if strict:
        raise ValueError(f"QArray {field} must be an array, got {type(leaf).__name__}")
    return None


def _check_dtype(field: str, dtype: np.dtype, expected: np.dtype, exact: bool, why: str) -> None:
    """``expected`` exactly, or (not ``exact``) a dtype of its kind; float0 (the tangent
    type of integers) passes."""
    if dtype == jax.dtypes.float0:
        return
    kind = jnp.integer if jnp.issubdtype(expected, jnp.integer) else jnp.floating
    if dtype != expected if exact else not jnp.issubdtype(dtype, kind):
        must = expected.name if exact else f"{kind.__name__} (e.g. {expected.name})"
        raise ValueError(f"QArray {field} must be {must} ({why}), got {dtype.name}")


def _storage(qa: QArray) -> str:
    t = qa.spec.target
    return f"packed {t.name} bytes" if qa.packed else f"the spec's {t.name} values"


def _concrete(*leaves: Any) -> bool:
    """True for NumPy and JAX arrays; False for tracers and abstract values."""
    return all(
        isinstance(a, np.ndarray)
        or (isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer))
        for a in leaves
    )


def _param_shape(shape: tuple[int, ...], granularity: gran.Granularity) -> tuple[int, ...] | None:
    try:
        return gran.param_shape(shape, gran.block_shape(shape, granularity))
    except ValueError:
        return None


def _fits_granularity(
    shape: tuple[int, ...], scale_shape: tuple[int, ...], granularity: gran.Granularity
) -> bool:
    """True where ``scale_shape`` is the granularity's param shape for ``shape``, or for
    ``shape[k:]`` with one scale per index along the ``k`` leading (stacked) axes."""
    for k in range(len(shape) + 1):
        if scale_shape[:k] != shape[:k]:
            return False
        if _param_shape(shape[k:], granularity) == scale_shape[k:]:
            return True
    return False


def _expected_scale(shape: tuple[int, ...], spec: QuantSpec) -> str:
    expected = _param_shape(shape, spec.granularity)
    return "no shape (it does not fit)" if expected is None else str(expected)
