"""quantize / dequantize / fake_quant: the user-facing operations of the core."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax import granularity as gran
from qjax import packing, shard_fit
from qjax.affine import dequantize_stored, quantize_blocks, round_to_float_grid
from qjax.exact import round_to_scale_dtype
from qjax.qarray import QArray
from qjax.qparams import (
    QParams,
    blockwise_qparams,
    check_float_input,
    check_scale_holds,
    expand_qparams,
    overflows_scale_dtype,
)
from qjax.spec import QuantSpec, SpecLike, as_spec, check_shorthand_fits

__all__ = ["dequantize", "fake_quant", "quantize", "straight_through"]


def quantize(
    x: jax.typing.ArrayLike,
    spec: SpecLike,
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
      spec: the :class:`~qjax.QuantSpec`, or its shorthand text (:func:`~qjax.parse_spec`),
        e.g. ``"int8"`` or ``"int4:per_block:32"``. Under ``jax.jit``, close over the spec
        or mark it static (``static_argnames="spec"``): it is not an array.
      qparams: precomputed params (e.g. calibrated ranges), shape ``x.shape // block``;
        by default computed from ``x`` with :func:`~qjax.compute_qparams`. Only the
        fields the formulation uses are read (``scale``; ``zero_point`` or ``minval``).
        Their shapes and dtypes are always checked; their values where they are concrete
        (under ``jit`` they are traced): scales finite and at least the smallest normal
        float32, also in the spec's ``scale_dtype``; zero points whole numbers in
        ``[qmin, qmax]``; minvals finite; and every value the params can dequantize to
        finite in float32.
      packed: store sub-byte targets (4- and 2-bit) packed into bytes. Default: True
        for sub-byte targets of arrays with at least one dimension.

    Returns:
      A :class:`~qjax.QArray`. A 0-d array is quantized per tensor and stored unpacked.
      An empty array gives empty values; each empty block gets the eps scale.

    Raises:
      TypeError: for non-floating input, a spec that is neither a QuantSpec nor text,
        or arguments of the wrong type.
      ValueError: when the granularity does not fit ``x.shape``, or ``qparams`` do not
        have the block shape or hold values that cannot be used (named in the message).

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> x = jnp.array([-300.0, -1.0, 0.0, 2.5, 100.0])
      >>> qa = qjax.quantize(x, qjax.QuantSpec("int8"))
      >>> qa.values  # scale = 300 / 127.5
      Array([-127,    0,    0,    1,   42], dtype=int8)
      >>> qjax.dequantize(qa)
      Array([-298.82355  ,    0.       ,    0.       ,    2.3529413,
               98.82353  ], dtype=float32)

      Shorthand text works wherever a spec is taken:

      >>> qjax.quantize(x, "int8").values
      Array([-127,    0,    0,    1,   42], dtype=int8)

      It composes with ``jit`` and ``vmap`` (one QArray per row, stacked):

      >>> qs = jax.vmap(lambda r: qjax.quantize(r, qjax.QuantSpec("int4")))(jnp.ones((3, 4)))
      >>> qs.scale.shape, qs.shape
      ((3, 1), (3, 4))
    """
    given, spec = spec, as_spec(spec)
    x = _float_array(x, "quantize")
    check_shorthand_fits(given, spec, x.shape, "quantize")
    if qparams is None:
        check_scale_holds(x, spec, "quantize")
    target = spec.target
    if packed is None:
        packed = target.bits < 8 and x.ndim > 0
    elif not isinstance(packed, (bool, np.bool_)):
        raise TypeError(f"packed must be True, False or None (the default), got {packed!r}")
    if packed and (target.bits >= 8 or x.ndim == 0):
        raise ValueError(
            f"packed=True needs a sub-byte target and an array with at least one "
            f"dimension; got {target.name} and shape {x.shape}"
        )
    return _quantize(x, _user_qparams(qparams, x.shape, spec), spec, bool(packed))


@functools.partial(jax.jit, static_argnames=("spec", "packed"))
def _quantize(x: jax.Array, qparams: QParams | None, spec: QuantSpec, packed: bool) -> QArray:
    q, _, qp, layout = _quantize_values(x, qparams, spec)
    target = spec.target
    if packed:
        _check_whole_bytes_per_shard(x, target.packs)
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
        tensor_scale=qp.tensor_scale,
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
    q, in_range = quantize_blocks(xb, expand_qparams(qparams, layout), spec)
    return q, in_range, qparams, layout


def _explicit_shards(x: jax.Array) -> list[tuple[int, tuple[str, ...], int]]:
    """``(axis, mesh axis names, shard count)`` of each explicitly sharded axis of ``x``."""
    sharding = getattr(getattr(jax, "typeof", lambda _: None)(x), "sharding", None)
    mesh, pspec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    return [] if mesh is None else shard_fit.sharded_axes(mesh, pspec)


def _check_whole_bytes_per_shard(x: jax.Array, packs: int) -> None:
    """An explicitly sharded last axis, packed ``packs`` values per byte, must give each
    shard whole bytes (as :func:`qjax.orbax.abstract_quantized` requires)."""
    for axis, names, shards in _explicit_shards(x):
        if axis == x.ndim - 1:
            problem = shard_fit.split_byte_problem(axis, x.shape[axis], names, shards, packs)
            if problem:
                raise ValueError(problem)


def _check_blocks_fit_shards(x: jax.Array, blocks: tuple[int, ...], spec: QuantSpec) -> None:
    """Explicitly sharded axes must hold whole blocks: JAX cannot split them otherwise.

    (Under an Auto mesh, XLA instead gathers what a straddling block needs.)
    """
    for axis, names, shards in _explicit_shards(x):
        if blocks[axis]:
            count = x.shape[axis] // blocks[axis]
            problem = shard_fit.split_block_problem(
                axis, x.shape[axis], count, names, shards, spec.granularity
            )
            if problem:
                raise ValueError(
                    f"{problem}, or quantize under an Auto mesh, where XLA gathers what "
                    "straddling blocks need"
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
    x: jax.typing.ArrayLike, spec: SpecLike, *, qparams: QParams | None = None
) -> jax.Array:
    """``dequantize(quantize(x))`` in one pass, with straight-through gradients.

    The value equals ``dequantize(quantize(x, spec))`` bit for bit, in ``x``'s dtype.
    The derivative (forward and reverse mode) is 1 where ``x`` lands inside
    ``[qmin, qmax]`` after scaling and rounding, and 0 where it was clamped; the params
    are treated as constants. ``spec`` and ``qparams`` are taken (and checked) as by
    :func:`quantize`.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> spec = qjax.QuantSpec("int8", scheme="symmetric_with_clipping")
      >>> qp = qjax.compute_qparams(jnp.array([1.0]), spec)  # scale = 1/127
      >>> jax.grad(lambda x: qjax.fake_quant(x, spec, qparams=qp).sum())(
      ...     jnp.array([0.5, 1.0, 2.0]))
      Array([1., 1., 0.], dtype=float32)
      >>> qjax.fake_quant(jnp.array([0.25, -1.0]), "int4:symmetric_with_clipping")  # 1/7 steps
      Array([ 0.2857143, -1.       ], dtype=float32)
    """
    given, spec = spec, as_spec(spec)
    x = _float_array(x, "fake_quant")
    check_shorthand_fits(given, spec, x.shape, "fake_quant")
    if qparams is None:
        check_scale_holds(x, spec, "fake_quant")
    return _fake_quant(x, _user_qparams(qparams, x.shape, spec), spec)


@functools.partial(jax.jit, static_argnames="spec")
def _fake_quant(x: jax.Array, qparams: QParams | None, spec: QuantSpec) -> jax.Array:
    q, in_range, qp, layout = _quantize_values(jax.lax.stop_gradient(x), qparams, spec)
    qp = jax.lax.stop_gradient(qp)
    y = dequantize_stored(q, expand_qparams(qp, layout), spec, x.dtype).reshape(x.shape)
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


def _float_array(x: jax.typing.ArrayLike, what: str) -> jax.Array:
    """``x`` as a floating-point jax array; TypeError naming ``x`` for anything else."""
    if isinstance(x, QArray):
        raise TypeError(f"{what}: x is already a QArray; dequantize it first")
    array = _as_array(x)
    if array is None:
        raise TypeError(
            f"{what}: x must be a floating-point array (a JAX or NumPy array, or a nested "
            f"list of floats), got {type(x).__name__}"
        )
    return check_float_input(array, what)


def _as_array(value: object) -> jax.Array | None:
    """``jnp.asarray(value)``, or None where it is no array of numbers. Text is refused
    first: JAX would read some strings as dtype names."""
    leaves = jax.tree.leaves(value) if isinstance(value, (list, tuple)) else [value]
    if any(
        isinstance(v, (str, bytes)) or (isinstance(v, np.ndarray) and v.dtype.kind in "USO")
        for v in leaves
    ):
        return None
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):
        return None


def _user_qparams(
    qparams: QParams | None, shape: tuple[int, ...], spec: QuantSpec
) -> QParams | None:
    """Checks user-given params and returns them as the jitted code takes them.

    Only the fields the formulation uses are kept, each reshaped to the block shape (a
    scalar fits (1, 1)): the scale rounded to the spec's scale dtype, zero points as int32,
    minvals as float32. Shapes and dtypes are always checked, values where concrete.
    """
    if qparams is None:
        return None
    if not isinstance(qparams, QParams):
        raise TypeError(
            f"qparams must be a qjax.QParams (e.g. from qjax.compute_qparams), got "
            f"{type(qparams).__name__}"
        )
    params = gran.param_shape(shape, gran.block_shape(shape, spec.granularity))
    needed = ["scale"] + ([spec.formulation] if spec.formulation != "scale" else [])
    needed += ["tensor_scale"] if spec.tensor_scale else []
    shapes = {name: (1,) * len(shape) if name == "tensor_scale" else params for name in needed}
    used = {name: _param_array(getattr(qparams, name), name, shapes[name], spec) for name in needed}
    used["scale"] = round_to_scale_dtype(used["scale"], spec.scale_dtype)
    if "zero_point" in used:
        zero_point = used["zero_point"]
        if jnp.issubdtype(zero_point.dtype, jnp.floating):
            zero_point = jnp.round(zero_point)  # whole numbers, checked below where concrete
        used["zero_point"] = zero_point.astype(jnp.int32)
    for name in ("minval", "tensor_scale"):
        if name in used:
            used[name] = used[name].astype(jnp.float32)
    if not any(isinstance(getattr(qparams, name), jax.core.Tracer) for name in needed):
        given = {
            name: np.reshape(np.asarray(getattr(qparams, name)), shapes[name]) for name in needed
        }
        _check_param_values(given, {k: np.asarray(v) for k, v in used.items()}, spec)
    return QParams(
        used["scale"], used.get("zero_point"), used.get("minval"), used.get("tensor_scale")
    )


def _param_array(value: object, name: str, shape: tuple[int, ...], spec: QuantSpec) -> jax.Array:
    """One qparams field as a real-valued array of ``shape``, or a clear error."""
    needs = "tensor_scale=True" if name == "tensor_scale" else f"formulation {spec.formulation!r}"
    what = f"qparams.{name} (needed by {needs})"
    if value is None:
        raise ValueError(f"qparams.{name} must have shape {shape} (needed by {needs}), got None")
    with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf: refused below
        array = _as_array(value)
    if array is None or not (
        jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)
    ):
        kind = type(value).__name__ if array is None else f"dtype {array.dtype}"
        raise TypeError(f"{what} must be an array of real numbers, got {kind}")
    if array.size != math.prod(shape):
        of = "one per tensor" if name == "tensor_scale" else "x.shape // block shape for"
        raise ValueError(
            f"qparams.{name} must have shape {shape} ({of} {spec.granularity}), got "
            f"{tuple(array.shape)}"
        )
    return array.reshape(shape)


def _check_param_values(
    given: dict[str, np.ndarray], used: dict[str, np.ndarray], spec: QuantSpec
) -> None:
    """Concrete user params, as given and as used: usable scales, zero points and minvals,
    and a finite range of dequantized values."""
    scale, rounded = given["scale"].astype(np.float64), used["scale"].astype(np.float64)
    _refuse(
        ~(np.isfinite(scale) & (scale > 0)),
        given["scale"],
        "qparams.scale must be finite and > 0 (the step between quantized values)",
    )
    low, high = _scale_limits(spec.scale_dtype)
    # Cast the given scale the IEEE way: the jitted path would saturate it to the dtype's max.
    overflows = overflows_scale_dtype(_float32(given["scale"]), spec.scale_dtype)
    _refuse(
        overflows | ~(np.isfinite(rounded) & (rounded >= low) & (rounded <= high)),
        given["scale"],
        f"qparams.scale must be representable in the spec's scale_dtype {spec.scale_dtype}: "
        f"between {low:.8g} and {high:.8g}",
    )
    if "tensor_scale" in given:
        tensor_scale = used["tensor_scale"].astype(np.float64)
        _refuse(
            ~(np.isfinite(tensor_scale) & (tensor_scale > 0)),
            given["tensor_scale"],
            "qparams.tensor_scale must be finite and > 0 in float32",
        )
        rounded = _float32(rounded * tensor_scale)  # each block's step, as the maths uses it
        tiny = float(np.finfo(np.float32).tiny)
        _refuse(
            ~(rounded >= tiny),
            given["scale"],
            f"qparams.tensor_scale * qparams.scale (the step of a block) must be at least "
            f"{tiny:.8g}, the smallest normal float32 (tensor_scale is "
            f"{float(tensor_scale.reshape(-1)[0]):.8g})",
        )
    if "minval" in given:
        finite = np.isfinite(used["minval"])
        _refuse(~finite, given["minval"], "qparams.minval must be finite in float32")
        span = spec.qmax - spec.qmin
        top = _float32(_float32(rounded * span) + used["minval"])
        _refuse(
            ~np.isfinite(top),
            given["minval"],
            f"qparams.minval + scale * {span} (the top of the range) must be finite in float32 "
            f"(at most {np.finfo(np.float32).max:.8g})",
        )
        return
    zero_point = 0.0
    if "zero_point" in given:
        zero_point = given["zero_point"].astype(np.float64)
        _refuse(
            ~(np.isfinite(zero_point) & (zero_point == np.round(zero_point))),
            given["zero_point"],
            "qparams.zero_point must hold whole numbers (the quantized value of 0.0)",
        )
        _refuse(
            (zero_point < spec.qmin) | (zero_point > spec.qmax),
            given["zero_point"],
            f"qparams.zero_point must lie in [qmin, qmax] = [{spec.qmin}, {spec.qmax}] of {spec}",
        )
    reach = np.maximum(np.abs(spec.qmin - zero_point), np.abs(spec.qmax - zero_point))
    _refuse(
        ~np.isfinite(_float32(rounded * reach)),
        given["scale"],
        f"qparams.scale is too large: scale * {float(np.max(reach)):g} (the farthest quantized "
        f"value from the zero point) must be finite in float32 (at most "
        f"{np.finfo(np.float32).max:.8g})",
    )


def _scale_limits(scale_dtype: str) -> tuple[float, float]:
    """The smallest and largest scale a scale dtype holds that float32 maths can use: on
    CPUs and GPUs float32 subnormals are flushed to zero (e8m0 scales are applied through
    their bits, so all of theirs are usable)."""
    info = ml_dtypes.finfo(jnp.dtype(scale_dtype))
    if scale_dtype == "float8_e8m0fnu":
        return float(info.smallest_subnormal or info.tiny), float(info.max)
    return max(float(info.smallest_subnormal), float(np.finfo(np.float32).tiny)), float(info.max)


def _float32(v: np.ndarray) -> np.ndarray:
    """``v`` rounded to float32 and back to float64, inf where it overflows (no warning)."""
    with np.errstate(over="ignore"):
        return np.asarray(v, np.float64).astype(np.float32).astype(np.float64)


def _refuse(bad: np.ndarray, values: np.ndarray, message: str) -> None:
    """Raises ValueError with ``message``, the first bad value and how many blocks are bad."""
    bad = np.broadcast_to(bad, np.shape(values))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{message}; got {np.asarray(values)[index]!s} at block {index} "
            f"({int(bad.sum())} of {bad.size} blocks)"
        )
