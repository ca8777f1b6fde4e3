"""quantize / dequantize / fake_quant: the user-facing operations of the core."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qjax import granularity as gran
from qjax import packing
from qjax.affine import dequantize_stored, quantize_blocks, round_to_float_grid
from qjax.exact import round_to_scale_dtype
from qjax.qarray import QArray
from qjax.qparams import QParams, blockwise_qparams, check_float_input, check_scale_holds
from qjax.spec import QuantSpec

__all__ = ["dequantize", "fake_quant", "quantize", "straight_through"]


def quantize(
    x: jax.typing.ArrayLike,
    spec: QuantSpec,
    *,
    qparams: QParams | None = None,
    packed: bool | None = None,
) -> QArray:
    """Quantizes a floating-point array.

    ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and its two siblings (the
    spec's formulae), blockwise per the spec's granularity; float targets are clamped to
    ``[-fmax, fmax]`` and then cast (round-to-nearest-even). Computed in float32.

    Args:
      x: floating-point array. bf16 / f16 are upcast to float32 for the maths.
      spec: the :class:`~qjax.QuantSpec`.
      qparams: precomputed params (e.g. calibrated ranges), shape ``x.shape // block``;
        by default computed from ``x`` with :func:`~qjax.compute_qparams`.
      packed: store sub-byte targets (4- and 2-bit) packed into bytes. Default: True
        for sub-byte targets of arrays with at least one dimension.

    Returns:
      A :class:`~qjax.QArray`. A 0-d array is quantized per tensor and stored unpacked.
      An empty array gives empty values; each empty block gets the eps scale.

    Raises:
      TypeError: for non-floating input.
      ValueError: when the granularity does not fit ``x.shape``, or ``qparams`` do not
        have the block shape.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> x = jnp.array([-300.0, -1.0, 0.0, 2.5, 100.0])
      >>> qa = qjax.quantize(x, qjax.QuantSpec("int8"))
      >>> qa.values  # scale = 300 / 127.5
      Array([-127,    0,    0,    1,   42], dtype=int8)
      >>> qjax.dequantize(qa)
      Array([-298.82355  ,    0.       ,    0.       ,    2.3529413,
               98.82353  ], dtype=float32)

      It composes with ``jit`` and ``vmap`` (one QArray per row, stacked):

      >>> qs = jax.vmap(lambda r: qjax.quantize(r, qjax.QuantSpec("int4")))(jnp.ones((3, 4)))
      >>> qs.scale.shape, qs.shape
      ((3, 1), (3, 4))
    """
    x = check_float_input(x, "quantize")
    if qparams is None:
        check_scale_holds(x, spec, "quantize")
    target = spec.target
    if packed is None:
        packed = target.bits < 8 and x.ndim > 0
    if packed and (target.bits >= 8 or x.ndim == 0):
        raise ValueError(
            f"packed=True needs a sub-byte target and an array with at least one "
            f"dimension; got {target.name} and shape {x.shape}"
        )
    return _quantize(x, qparams, spec, bool(packed))


@functools.partial(jax.jit, static_argnames=("spec", "packed"))
def _quantize(x: jax.Array, qparams: QParams | None, spec: QuantSpec, packed: bool) -> QArray:
    q, _, qp, layout = _quantize_values(x, qparams, spec)
    target = spec.target
    if packed:
        if target.is_float:
            codes = packing.float_codes(round_to_float_grid(q, target), target)
        else:
            codes = q.astype(jnp.int32)
        if packing.fits_layout(x.shape, layout.blocked, target.bits):
            # Packing in the blocked layout gives the same bytes without index arithmetic.
            data = packing.pack(codes, target.bits).reshape(
                packing.packed_shape(x.shape, target.bits)
            )
        else:
            data = packing.pack(codes.reshape(x.shape), target.bits)
    elif target.is_float and target.bits == 8:
        codes = packing.float_codes(round_to_float_grid(q, target), target)
        data = jax.lax.bitcast_convert_type(codes.astype(jnp.uint8), target.storage)
        data = data.reshape(x.shape)
    elif target.is_float:
        # Rounded before the cast: XLA on GPUs may drop a cast that is cast back later.
        data = round_to_float_grid(q, target).astype(target.storage).reshape(x.shape)
    else:
        data = q.astype(jnp.int32).astype(target.storage).reshape(x.shape)
    offset = {"zero_point": qp.zero_point, "minval": qp.minval}.get(spec.formulation)
    return QArray(
        data=data,
        scale=qp.scale,
        offset=offset,
        spec=spec,
        float_dtype=x.dtype.name,
        packed=packed,
        pad=packing.packed_pad(x.shape[-1], target.bits) if packed else 0,
    )


def _quantize_values(
    x: jax.Array, qparams: QParams | None, spec: QuantSpec
) -> tuple[jax.Array, jax.Array, QParams, gran.BlockLayout]:
    """Clamped values and the in-range mask (float32, blocked), the params and the layout."""
    blocks = gran.block_shape(x.shape, spec.granularity)
    _check_blocks_fit_shards(x, blocks, spec)
    layout = gran.BlockLayout.of(x.shape, blocks)
    xb = layout.blockify(x.astype(jnp.float32))
    if qparams is None:
        qparams = blockwise_qparams(xb, layout, spec)
    else:
        qparams = _check_qparams(qparams, layout.params, spec)
    q, in_range = quantize_blocks(xb, jax.tree.map(layout.expand, qparams), spec)
    return q, in_range, qparams, layout


def _check_blocks_fit_shards(x: jax.Array, blocks: tuple[int, ...], spec: QuantSpec) -> None:
    """Explicitly sharded axes must hold whole blocks: JAX cannot split them otherwise.

    (Under an Auto mesh, XLA instead gathers what a straddling block needs.)
    """
    sharding = getattr(getattr(jax, "typeof", lambda _: None)(x), "sharding", None)
    mesh, pspec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or not pspec:
        return
    for axis, names in enumerate(pspec):
        if names is None or not blocks[axis]:
            continue
        names = names if isinstance(names, tuple) else (names,)
        shards = math.prod(mesh.shape[name] for name in names)
        count = x.shape[axis] // blocks[axis]
        if count > 1 and count % shards:
            raise ValueError(
                f"axis {axis} (size {x.shape[axis]}) is sharded {shards} ways over mesh axes "
                f"{names}, but {spec.granularity} gives {count} blocks, which do not split "
                f"evenly over the shards; choose a block size that divides "
                f"{x.shape[axis] // shards} (the size of one shard), or quantize under an "
                "Auto mesh, where XLA gathers what straddling blocks need"
            )


def dequantize(qarray: QArray) -> jax.Array:
    """The float array a :class:`~qjax.QArray` stands for (same as ``qarray.dequantize()``).

    ``x' = scale * (q - zero_point)``, ``scale * q`` or ``scale * (q - qmin) + minval``,
    returned in the dtype that was quantized.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> qjax.dequantize(qjax.quantize(jnp.array([0.0, 0.5, 1.0]), qjax.QuantSpec("uint8")))
      Array([0.       , 0.5019608, 0.9960785], dtype=float32)
    """
    if not isinstance(qarray, QArray):
        raise TypeError(f"dequantize expects a QArray, got {type(qarray).__name__}")
    return _dequantize(qarray)


@jax.jit
def _dequantize(qarray: QArray) -> jax.Array:
    return qarray.dequantize()


def fake_quant(
    x: jax.typing.ArrayLike, spec: QuantSpec, *, qparams: QParams | None = None
) -> jax.Array:
    """``dequantize(quantize(x))`` in one pass, with straight-through gradients.

    The value equals ``dequantize(quantize(x, spec))`` bit for bit, in ``x``'s dtype.
    The derivative (forward and reverse mode) is 1 where ``x`` lands inside
    ``[qmin, qmax]`` after scaling and rounding, and 0 where it was clamped; the params
    are treated as constants.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> spec = qjax.QuantSpec("int8", scheme="symmetric_with_clipping")
      >>> qp = qjax.compute_qparams(jnp.array([1.0]), spec)  # scale = 1/127
      >>> jax.grad(lambda x: qjax.fake_quant(x, spec, qparams=qp).sum())(
      ...     jnp.array([0.5, 1.0, 2.0]))
      Array([1., 1., 0.], dtype=float32)
    """
    x = check_float_input(x, "fake_quant")
    if qparams is None:
        check_scale_holds(x, spec, "fake_quant")
    return _fake_quant(x, qparams, spec)


@functools.partial(jax.jit, static_argnames="spec")
def _fake_quant(x: jax.Array, qparams: QParams | None, spec: QuantSpec) -> jax.Array:
    q, in_range, qp, layout = _quantize_values(jax.lax.stop_gradient(x), qparams, spec)
    qp = jax.lax.stop_gradient(qp)
    y = dequantize_stored(q, jax.tree.map(layout.expand, qp), spec, x.dtype).reshape(x.shape)
    return straight_through(x, y, in_range.reshape(x.shape))


@jax.custom_jvp
def straight_through(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Returns ``y`` with the derivative of the identity on ``x`` where ``mask``, else 0.

    The straight-through estimator as a ``custom_jvp``, so both ``jax.jvp`` and
    ``jax.grad`` work. ``y`` and ``mask`` are treated as constants.
    """
    del x, mask
    return y


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    _, y, mask = primals
    tx, _, _ = tangents
    return y, tx * mask.astype(tx.dtype)


def _check_qparams(qparams: QParams, shape: tuple[int, ...], spec: QuantSpec) -> QParams:
    """Validates user-given params: reshaped to ``shape`` (a scalar fits (1, 1)), the
    scale cast to the spec's scale dtype."""
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")
    needed = ["scale"] + ([spec.formulation] if spec.formulation != "scale" else [])
    fixed = {}
    for name in needed:
        value = getattr(qparams, name)
        if value is None or jnp.size(value) != math.prod(shape):
            raise ValueError(
                f"qparams.{name} must have shape {shape} (x.shape // block shape for "
                f"{spec.granularity}), got "
                + ("None" if value is None else str(tuple(jnp.shape(value))))
            )
        fixed[name] = jnp.reshape(value, shape)
    fixed["scale"] = round_to_scale_dtype(fixed["scale"], spec.scale_dtype)
    return qparams._replace(**fixed)
