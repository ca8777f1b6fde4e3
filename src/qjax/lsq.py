"""Learned step size quantization (LSQ, LSQ+): fake quantization whose scale and offset train.

:func:`lsq_fake_quant` is :func:`qjax.fake_quant` with the params given, and with the
gradients of Esser et al. 2019, "Learned Step Size Quantization" (LSQ), for the scale, and
of Bhalgat et al. 2020, "LSQ+" (a learned offset), for the offset. Its value is
``fake_quant(x, spec, qparams=learned_qparams(scale, offset, spec))`` bit for bit: the
same formulae, computed by the same code.

Each formulation maps ``x`` onto a grid ``y = s * (clip(round(u), lo, hi) - c) + m`` with
``s`` the scale (clamped to :data:`qjax.qparams.EPS`):

* ``"scale"``: ``u = x / s``, ``[lo, hi] = [qmin, qmax]``, ``c = m = 0``;
* ``"zero_point"``: ``u = x / s``, ``[lo, hi] = [qmin - z, qmax - z]`` with ``z`` the
  zero point (learned where the scheme is asymmetric: a float, rounded and clipped to
  ``[qmin, qmax]`` in the forward), ``c = m = 0``;
* ``"minval"``: ``u = (x - m) / s``, ``[lo, hi] = [0, qmax - qmin]`` with ``m`` the
  minval (learned where the scheme is asymmetric: LSQ+'s offset ``beta``); symmetric
  schemes tie it to the scale, ``m = -s * c`` with ``c = (qmax - qmin) / 2``.

The derivatives (forward and reverse mode, per element, then summed over each block):

* ``dy/dx = 1`` where ``lo <= u <= hi``, else 0 (the straight-through estimator);
* ``dy/ds = round(u) - u`` where ``lo < u < hi``, ``lo - c`` where ``u <= lo`` and
  ``hi - c`` where ``u >= hi`` (LSQ's eq. 3);
* ``dy/dm = 0`` inside, ``1`` outside (minval, LSQ+); ``dy/dz = 0`` inside, ``-s`` outside
  (zero point: the same, as ``m = -s * z``);

and both param gradients are multiplied by ``grad_scale``, by default LSQ's
``g = 1 / sqrt(n * Q_P)``: ``n`` the number of elements sharing the param (a block),
``Q_P`` the number of grid steps above the zero point (``qmax`` for signed symmetric
specs, ``qmax - zero point`` for other symmetric ones, ``qmax - qmin`` where the offset is
learned). The scale is kept positive by a clamp: the forward uses ``max(s, EPS)``, and
its gradient passes straight through the clamp, so a scale pushed below EPS can come
back.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from qjax import granularity as gran
from qjax.exact import exact_divide, round_to_scale_dtype
from qjax.ops import fake_quant
from qjax.qparams import EPS, QParams, check_float_input
from qjax.spec import QuantSpec, SpecLike, as_spec

__all__ = [
    "LEARNED_NAMES",
    "check_learnable",
    "default_grad_scale",
    "learnable_params",
    "learned_qparams",
    "learns_offset",
    "lsq_fake_quant",
    "param_labels",
]

LEARNED_NAMES = frozenset(
    f"{owner}_{what}"
    for owner in ("kernel", "embedding", "input", "weight")
    for what in ("scale", "offset")
)
"""The names the Flax adapters give learned scales and offsets: Linen's ``kernel_scale``,
``embedding_scale``, ``input_scale`` (and ``_offset``), NNX's ``weight_scale``,
``input_scale`` (and ``_offset``)."""


def check_learnable(spec: SpecLike, what: str = "spec") -> QuantSpec:
    """The spec, if LSQ can learn its params; else a ValueError saying what to change.

    LSQ learns the step of a uniform integer grid: float targets (float8, float4, the
    MX presets with their power-of-two scales) have none.

    Examples:
      >>> from qjax.lsq import check_learnable
      >>> print(check_learnable("int2:per_channel"))
      int2:symmetric:scale:per_channel(axis=-1)
      >>> check_learnable("float8_e4m3fn")
      Traceback (most recent call last):
        ...
      ValueError: spec: learned scales (LSQ) need an integer target, got float8_e4m3fn...
    """
    spec = as_spec(spec, what)
    if spec.is_float:
        raise ValueError(
            f"{what}: learned scales (LSQ) need an integer target, got {spec.dtype}, whose "
            "grid is not uniform; use an integer dtype such as 'int4', or drop the learned "
            "scale (':lsq', learn_scale=True) to train it with fixed scales"
        )
    return spec


def learns_offset(spec: QuantSpec) -> bool:
    """Whether LSQ learns an offset for ``spec`` (LSQ+): asymmetric schemes, whose zero
    point or minval follows the data. Symmetric schemes have a fixed zero point.

    Examples:
      >>> import qjax
      >>> from qjax.lsq import learns_offset
      >>> learns_offset(qjax.QuantSpec("uint8", scheme="asymmetric")), learns_offset(
      ...     qjax.QuantSpec("int8"))
      (True, False)
    """
    return spec.scheme == "asymmetric"


def learned_qparams(
    scale: jax.typing.ArrayLike, offset: jax.typing.ArrayLike | None, spec: SpecLike
) -> QParams:
    """The :class:`~qjax.QParams` that learned values stand for: what ``fake_quant`` and
    ``quantize`` take to reproduce :func:`lsq_fake_quant`'s forward (and what serving a
    model trained with learned scales quantizes its weights with).

    The scale is clamped to :data:`qjax.qparams.EPS`. The offset (asymmetric specs only)
    is the zero point, rounded and clipped to ``[qmin, qmax]``, or the minval, as the
    formulation says. Symmetric specs take no offset: their zero point is fixed, and a
    ``"minval"`` formulation's minval is ``-scale * (qmax - qmin) / 2``.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax.lsq import learned_qparams
      >>> spec = qjax.QuantSpec("uint8", scheme="asymmetric")
      >>> qp = learned_qparams(jnp.float32(0.1), jnp.float32(3.7), spec)
      >>> float(qp.scale), float(qp.zero_point)
      (0.10000000149011612, 4.0)
    """
    spec = as_spec(spec)
    scale = jnp.maximum(jnp.asarray(scale, jnp.float32), jnp.float32(EPS))
    if learns_offset(spec):
        if offset is None:
            raise ValueError(f"spec {spec} learns an offset (LSQ+): give offset, got None")
        offset = jnp.asarray(offset, jnp.float32)
        if spec.formulation == "minval":
            return QParams(scale, None, offset)
        zero_point = jnp.clip(jnp.round(offset), spec.qmin, spec.qmax)
        return QParams(scale, zero_point, None)
    if offset is not None:
        raise ValueError(f"spec {spec} is symmetric: its offset is fixed, so offset must be None")
    if spec.formulation == "zero_point":
        return QParams(scale, jnp.full(scale.shape, spec.symmetric_zero_point, jnp.int32), None)
    if spec.formulation == "minval":
        half = jnp.float32((spec.qmax - spec.qmin) / 2)
        return QParams(scale, None, -(_used_scale(scale, spec) * half))
    return QParams(scale, None, None)


def learnable_params(qparams: QParams, spec: SpecLike) -> tuple[jax.Array, jax.Array | None]:
    """The learnable ``(scale, offset)`` that start from calibrated ``qparams`` (e.g. from
    :func:`qjax.compute_qparams`): float32 arrays; the offset (asymmetric specs only) is
    the zero point or the minval, as the formulation says, else None.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax.lsq import learnable_params
      >>> spec = qjax.QuantSpec("uint8", scheme="asymmetric", formulation="minval")
      >>> scale, offset = learnable_params(qjax.compute_qparams(jnp.array([-1.0, 2.0]), spec),
      ...                                  spec)
      >>> (scale * 255).tolist(), offset.tolist()  # one block: shape (1,)
      ([3.0], [-1.0])
    """
    spec = as_spec(spec)
    scale = jnp.asarray(qparams.scale).astype(jnp.float32)
    if not learns_offset(spec):
        return scale, None
    offset = qparams.minval if spec.formulation == "minval" else qparams.zero_point
    return scale, jnp.asarray(offset).astype(jnp.float32)


def default_grad_scale(numel: int, spec: SpecLike) -> float:
    """LSQ's gradient scale ``1 / sqrt(numel * Q_P)`` for ``numel`` elements per param.

    ``Q_P`` is the number of grid steps above the zero point: ``qmax`` for signed
    symmetric specs, ``qmax - zero point`` for other symmetric ones, ``qmax - qmin`` where
    the offset is learned (LSQ+'s unsigned grid).

    Examples:
      >>> from qjax.lsq import default_grad_scale
      >>> round(default_grad_scale(64, "int4"), 6)  # 1 / sqrt(64 * 7)
      0.047246
    """
    spec = as_spec(spec)
    if learns_offset(spec):
        levels = spec.qmax - spec.qmin
    else:
        levels = spec.qmax - spec.symmetric_zero_point
    return 1.0 / math.sqrt(max(int(numel), 1) * levels)


def lsq_fake_quant(
    x: jax.typing.ArrayLike,
    spec: SpecLike,
    scale: jax.typing.ArrayLike,
    offset: jax.typing.ArrayLike | None = None,
    *,
    grad_scale: float | None = None,
) -> jax.Array:
    """Fake-quantizes ``x`` with a learned scale (and offset), with LSQ / LSQ+ gradients.

    The value is ``qjax.fake_quant(x, spec, qparams=learned_qparams(scale, offset,
    spec))`` bit for bit, in ``x``'s dtype. The derivatives are the papers' (see
    :mod:`qjax.lsq`): straight-through for ``x`` inside the range, ``round(u) - u`` for
    the scale inside and the clip ends outside, the offset's where ``x`` is clipped, both
    params' scaled by ``grad_scale``. Works under ``jit``, ``vmap``, ``grad`` and ``jvp``.

    Args:
      x: a floating-point array.
      spec: a :class:`~qjax.QuantSpec` (or shorthand) with an integer target; its
        granularity gives one param per block.
      scale: the learned scale of each block, shape ``x.shape // block_shape`` (or any
        shape with that many elements); clamped to ``EPS`` in the forward.
      offset: asymmetric specs only: the learned zero point (formulation
        ``"zero_point"``, rounded in the forward) or minval (``"minval"``), same shape.
      grad_scale: the factor on the params' gradients; default LSQ's
        :func:`default_grad_scale` of the block size. For activations, the paper counts
        the elements of one example: pass ``default_grad_scale(block size / batch, spec)``.

    Raises:
      ValueError: a float target, a scale or offset of the wrong size, an offset where
        the spec has none (or none where it learns one), a grad_scale that is not a
        positive number.
      TypeError: a non-float ``x``.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.lsq import lsq_fake_quant
      >>> x, s = jnp.array([0.2, 0.45, 3.0]), jnp.float32(0.5)
      >>> lsq_fake_quant(x, "int2", s)  # int2 is [-2, 1]: 3.0 clips to 1 * 0.5
      Array([0. , 0.5, 0.5], dtype=float32)
      >>> # d/ds: round(u) - u inside (u = 0.4, 0.9), qmax outside; times 1/sqrt(3 * 1).
      >>> g = jax.grad(lambda s: lsq_fake_quant(x, "int2", s).sum())(s)
      >>> bool(jnp.isclose(g, (-0.4 + 0.1 + 1.0) / 3 ** 0.5))
      True
    """
    spec = check_learnable(spec)
    x = check_float_input(x, "lsq_fake_quant")
    shape = gran.param_shape(x.shape, gran.block_shape(x.shape, spec.granularity))
    scale = _param(scale, "scale", shape, spec)
    if learns_offset(spec):
        if offset is None:
            raise ValueError(
                f"lsq_fake_quant: {spec} is asymmetric, so it learns an offset (LSQ+): give "
                f"offset, the {spec.formulation} of each block (e.g. from "
                "qjax.lsq.learnable_params(qjax.compute_qparams(x, spec), spec))"
            )
        offset = _param(offset, "offset", shape, spec)
    elif offset is not None:
        raise ValueError(
            f"lsq_fake_quant: {spec} is symmetric, so its offset is fixed: pass offset=None"
        )
    if grad_scale is None:
        grad_scale = default_grad_scale(math.prod(x.shape) // max(math.prod(shape), 1), spec)
    elif (
        isinstance(grad_scale, bool)
        or not isinstance(grad_scale, numbers.Real)
        or not (np.isfinite(grad_scale) and grad_scale > 0)
    ):
        raise ValueError(
            f"lsq_fake_quant: grad_scale must be a positive number, got {grad_scale!r}"
        )
    return _lsq(x, scale, offset, spec, float(grad_scale))


def _param(value: object, name: str, shape: tuple[int, ...], spec: QuantSpec) -> jax.Array:
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"lsq_fake_quant: {name} must be a floating-point array (a trainable param), "
            f"got dtype {array.dtype}"
        )
    if array.size != math.prod(shape):
        raise ValueError(
            f"lsq_fake_quant: {name} must have shape {shape} (x.shape // block shape for "
            f"{spec.granularity}), got {tuple(array.shape)}"
        )
    return array.astype(jnp.float32).reshape(shape)


def _used_scale(scale: jax.Array, spec: QuantSpec) -> jax.Array:
    """The scale as the formulae use it: rounded to the spec's scale dtype, in float32."""
    return round_to_scale_dtype(scale, spec.scale_dtype).astype(jnp.float32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _lsq(
    x: jax.Array, scale: jax.Array, offset: jax.Array | None, spec: QuantSpec, grad_scale: float
) -> jax.Array:
    del grad_scale
    return fake_quant(x, spec, qparams=learned_qparams(scale, offset, spec))


@_lsq.defjvp
def _lsq_jvp(spec: QuantSpec, grad_scale: float, primals: tuple, tangents: tuple):
    x, scale, offset = primals
    dx, dscale, doffset = tangents
    y = _lsq(x, scale, offset, spec, grad_scale)
    layout = gran.BlockLayout.of(x.shape, gran.block_shape(x.shape, spec.granularity))
    inside, d_scale, d_offset = _derivatives(
        layout.blockify(x.astype(jnp.float32)), jax.tree.map(layout.expand, (scale, offset)), spec
    )
    dy = jnp.where(inside.reshape(x.shape), dx, jnp.zeros((), dx.dtype))
    d_params = d_scale * layout.expand(dscale)
    if offset is not None:
        d_params = d_params + d_offset * layout.expand(doffset)
    return y, dy + (grad_scale * d_params).reshape(x.shape).astype(dy.dtype)


def _derivatives(
    xb: jax.Array, params: tuple[jax.Array, jax.Array | None], spec: QuantSpec
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Per element of the blocked ``xb``: the in-range mask, ``dy/ds`` and ``dy/doffset``
    (None without a learned offset), as the module notes give them."""
    scale, offset = params
    qp = learned_qparams(scale, offset, spec)
    s = _used_scale(qp.scale, spec)
    c = 0.0
    if spec.formulation == "minval":
        u = exact_divide(xb - qp.minval, s)
        lo, hi = jnp.float32(0), jnp.float32(spec.qmax - spec.qmin)
        if not learns_offset(spec):
            c = (spec.qmax - spec.qmin) / 2
    else:
        u = exact_divide(xb, s)
        lo, hi = jnp.float32(spec.qmin), jnp.float32(spec.qmax)
        if spec.formulation == "zero_point":
            z = qp.zero_point.astype(jnp.float32)
            lo, hi = lo - z, hi - z
    below, above = u <= lo, u >= hi
    inside = (u >= lo) & (u <= hi)
    d_scale = jnp.where(below, lo - c, jnp.where(above, hi - c, jnp.round(u) - u))
    if not learns_offset(spec):
        return inside, d_scale, None
    outside = jnp.where(inside, jnp.float32(0), jnp.float32(1))
    d_offset = outside if spec.formulation == "minval" else -s * outside
    return inside, d_scale, d_offset


def param_labels(params: object, learned: str = "lsq", other: str = "other") -> object:
    """``params`` with each leaf replaced by ``learned`` (a learned scale or offset, see
    :data:`LEARNED_NAMES`) or ``other``: labels for ``optax.multi_transform``.

    LSQ's gradient scale is designed for SGD, as the papers train; Adam normalises it
    away and moves every parameter by about its learning rate per step, which is large
    next to a small step size. Training the learned params with their own optimizer
    (the digits benchmark: SGD with momentum 0.9 at 1e-2, the weights with Adam) keeps
    the papers' balance.

    Examples:
      >>> from qjax.lsq import param_labels
      >>> param_labels({"Dense_0": {"kernel": 1.0, "kernel_scale": 2.0, "input_scale": 3.0}})
      {'Dense_0': {'input_scale': 'lsq', 'kernel': 'other', 'kernel_scale': 'lsq'}}
    """

    def label(path: tuple, _: object) -> str:
        key = path[-1] if path else None
        name = getattr(key, "key", getattr(key, "name", None))
        return learned if name in LEARNED_NAMES else other

    return jax.tree_util.tree_map_with_path(label, params)
