"""Calibration: range observers that turn data into quant params, block by block.

An observer looks at each block of ``x`` (the spec's granularity, through
:class:`~qjax.granularity.BlockLayout`, so every granularity takes the same path) and
reports a range ``(min_val, max_val)``; :func:`~qjax.qparams_from_minmax` turns the range
into a scale and offset with the spec's scheme formulae, exactly as
:func:`~qjax.compute_qparams` does for the plain min and max. The methods:

* ``"minmax"``: the block's min and max (what :func:`~qjax.compute_qparams` uses);
* ``"absmax"``: ``[-amax, amax]`` with ``amax = max |x|``; the same as ``"minmax"`` for
  symmetric schemes, a range centred on zero for asymmetric ones;
* ``"percentile"``: percentiles of the block, which clip outliers;
* ``"mse"``: the minmax range shrunk by the clip ratio that minimises the block's squared
  quantization error, found by a grid search.

:func:`moving_average_init`, :func:`moving_average_update` and
:func:`moving_average_qparams` track an exponential moving average of the ranges over
batches (static activation ranges), in the style of optax: pure functions over a
:class:`MovingAverage` NamedTuple.

Every function is pure and jit-compatible; the spec and the observer's options are static.
Calibrated params plug into ``quantize(x, spec, qparams=...)`` and ``fake_quant``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax import granularity as gran
from qjax.affine import dequantize_stored, quantize_blocks
from qjax.exact import unfused
from qjax.qparams import (
    QParams,
    block_minmax,
    check_float_input,
    qparams_from_minmax,
    refuse_float16_overflow,
)
from qjax.spec import QuantSpec, SpecLike, as_spec

__all__ = [
    "METHODS",
    "MovingAverage",
    "calibrate",
    "clip_ratios",
    "moving_average_init",
    "moving_average_qparams",
    "moving_average_update",
    "observe_range",
]

Method = Literal["absmax", "minmax", "percentile", "mse"]
METHODS = ("absmax", "minmax", "percentile", "mse")
"""The range observers :func:`calibrate` accepts."""


@dataclasses.dataclass(frozen=True)
class _Observer:
    """A validated, hashable set of observer options (a static jit argument)."""

    method: str
    percentile: float
    grid: int
    min_ratio: float


def _observer(method: str, percentile: float, grid: int, min_ratio: float) -> _Observer:
    """Checks the observer options; raises ValueError naming the bad value."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    if not _is_real(percentile) or not 0 < percentile <= 100:
        raise ValueError(
            f"percentile must be a number in (0, 100], got {percentile!r}; "
            "e.g. percentile=99.99 keeps all but the top 0.01% of each block"
        )
    if not _is_int(grid) or grid < 1:
        raise ValueError(
            f"grid must be a positive integer (the number of clip ratios searched), "
            f"got {grid!r}; grid=1 searches the ratio 1 only"
        )
    if not _is_real(min_ratio) or not 0 < min_ratio <= 1:
        raise ValueError(
            f"min_ratio must be a number in (0, 1], got {min_ratio!r}; it is the smallest "
            "fraction of the min-max range the MSE search tries, e.g. 0.5"
        )
    return _Observer(method, float(percentile), int(grid), float(min_ratio))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def clip_ratios(grid: int, min_ratio: float) -> np.ndarray:
    """The clip ratios the MSE search tries, largest (1) first, as float32.

    ``r_k = 1 - (1 - min_ratio) * k / (grid - 1)`` for ``k = 0, ..., grid - 1``, so
    ``r_0 = 1`` (the plain min-max range) and ``r_{grid-1} = min_ratio``; ``grid = 1``
    gives ``[1]``.

    Examples:
      >>> from qjax.calibration import clip_ratios
      >>> clip_ratios(5, 0.5)
      array([1.   , 0.875, 0.75 , 0.625, 0.5  ], dtype=float32)
      >>> clip_ratios(1, 0.5)
      array([1.], dtype=float32)
    """
    k = np.arange(grid, dtype=np.float64)
    return (1.0 - (1.0 - min_ratio) * k / max(grid - 1, 1)).astype(np.float32)


def observe_range(
    x: jax.typing.ArrayLike,
    spec: SpecLike,
    method: Method = "minmax",
    *,
    percentile: float = 99.99,
    grid: int = 100,
    min_ratio: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """The range ``(min_val, max_val)`` each block of ``x`` should be quantized with.

    Per block ``B`` (the spec's granularity):

    * ``"minmax"``: ``(min(B), max(B))``;
    * ``"absmax"``: ``(-amax, amax)`` with ``amax = max |B|``;
    * ``"percentile"``: ``(-P_p(|B|), P_p(|B|))`` for symmetric schemes and float targets,
      ``(P_{100-p}(B), P_p(B))`` for asymmetric ones, where ``P_p`` is the ``p``-th
      percentile with linear interpolation (NumPy's default); an empty block gives the
      empty min-max range;
    * ``"mse"``: ``(r* min(B), r* max(B))``, where ``r*`` minimises
      ``SSE(r) = sum_{x in B} (x - fake_quant(x; qparams_from_minmax(r min(B), r max(B))))**2``
      over the ratios of :func:`clip_ratios` (``1`` first). Each candidate is quantized
      and dequantized with qjax's own formulae, and a later ratio replaces the best so far
      only with a strictly lower SSE, so ties keep the larger ratio and the chosen SSE is
      never above that of the min-max range (up to float32 rounding of the sums). The
      candidates are visited one after another (``lax.scan``), so memory stays that of
      one pass over ``x``.

    Args:
      x: a floating-point array (bf16 / f16 are computed in float32).
      spec: the quantization spec; its granularity decides the blocks.
      method: ``"minmax"`` (default), ``"absmax"``, ``"percentile"`` or ``"mse"``.
      percentile: ``p`` in ``(0, 100]`` for ``"percentile"``.
      grid: the number of clip ratios ``"mse"`` searches (at least 1).
      min_ratio: the smallest clip ratio ``"mse"`` tries, in ``(0, 1]``.

    Returns:
      ``(min_val, max_val)``, float32, each with shape ``x.shape // block_shape``; pass
      them to :func:`~qjax.qparams_from_minmax` (that is what :func:`calibrate` does).

    Raises:
      ValueError: for an unknown method or an option out of range (every option is
        checked, whatever the method), or a granularity that does not fit ``x.shape``.
      TypeError: for non-floating input.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax.calibration import observe_range
      >>> x = jnp.array([[-1.0, 2.0], [0.5, 4.0]])
      >>> observe_range(x, qjax.QuantSpec("int8", granularity=qjax.per_channel(0)))
      (Array([[-1. ], [ 0.5]], dtype=float32), Array([[2.], [4.]], dtype=float32))
      >>> observe_range(x, qjax.QuantSpec("uint8", "asymmetric"), "absmax")
      (Array([[-4.]], dtype=float32), Array([[4.]], dtype=float32))
    """
    spec = as_spec(spec)
    observer = _observer(method, percentile, grid, min_ratio)
    return _observe_range(check_float_input(x, "observe_range"), spec, observer)


def calibrate(
    x: jax.typing.ArrayLike,
    spec: SpecLike,
    method: Method = "minmax",
    *,
    percentile: float = 99.99,
    grid: int = 100,
    min_ratio: float = 0.5,
) -> QParams:
    """Quant params of ``x`` from a range observer: ``qparams_from_minmax(observe_range(x))``.

    The scheme formulae are those of :func:`~qjax.compute_qparams` (e.g. a symmetric int4
    block gets ``scale = amax / 7.5``), applied to the range the observer reports (see
    :func:`observe_range` for the maths of each method). ``method="minmax"`` gives
    exactly :func:`~qjax.compute_qparams`; ``"absmax"`` does too for symmetric schemes.

    Args:
      x: a floating-point array (bf16 / f16 are computed in float32).
      spec: the quantization spec; its granularity decides the blocks.
      method: ``"minmax"`` (default), ``"absmax"``, ``"percentile"`` or ``"mse"``.
      percentile: ``p`` in ``(0, 100]`` for ``"percentile"``.
      grid: the number of clip ratios ``"mse"`` searches, from 1 down to ``min_ratio``.
      min_ratio: the smallest clip ratio ``"mse"`` tries, in ``(0, 1]``.

    Returns:
      :class:`~qjax.QParams`, each field with shape ``x.shape // block_shape``, ready for
      ``quantize(x, spec, qparams=...)`` and ``fake_quant(x, spec, qparams=...)``.

    Raises:
      ValueError: for an unknown method or an option out of range, or a granularity that
        does not fit ``x.shape``; with ``scale_dtype="float16"``, for a calibrated range
        whose scale float16 cannot hold (eager calls; under ``jit`` it saturates).
      TypeError: for non-floating input.

    Examples:
      One outlier in a normal tensor: the MSE search clips it to keep the resolution of
      the other values (int4 symmetric, ``scale = amax / 7.5``).

      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.calibration import calibrate
      >>> x = jax.random.normal(jax.random.key(0), (1024,)).at[0].set(20.0)
      >>> spec = qjax.QuantSpec("int4")
      >>> calibrate(x, spec).scale * 7.5  # minmax: amax = 20
      Array([20.], dtype=float32)
      >>> qp = calibrate(x, spec, "mse", grid=11, min_ratio=0.2)
      >>> qp.scale * 7.5  # the clip ratio 0.44 won: amax = 8.8
      Array([8.8], dtype=float32)
      >>> def sse(qp=None):
      ...     return float(jnp.sum((qjax.fake_quant(x, spec, qparams=qp) - x) ** 2))
      >>> round(sse(qp)), round(sse())
      (251, 558)

      The percentile observer clips harder; everything composes with jit:

      >>> f = jax.jit(lambda x: calibrate(x, spec, "percentile", percentile=99.0))
      >>> f(x).scale * 7.5  # the 99th percentile of |x|
      Array([2.6065814], dtype=float32)
    """
    spec = as_spec(spec)
    observer = _observer(method, percentile, grid, min_ratio)
    x = check_float_input(x, "calibrate")
    if spec.scale_dtype == "float16" and not isinstance(x, jax.core.Tracer):
        wide = dataclasses.replace(spec, scale_dtype="float32")
        refuse_float16_overflow(_calibrate(x, wide, observer).scale, spec, "calibrate")
    return _calibrate(x, spec, observer)


@functools.partial(jax.jit, static_argnames=("spec", "observer"))
def _calibrate(x: jax.Array, spec: QuantSpec, observer: _Observer) -> QParams:
    return qparams_from_minmax(*_observe_range(x, spec, observer), spec)


@functools.partial(jax.jit, static_argnames=("spec", "observer"))
def _observe_range(
    x: jax.Array, spec: QuantSpec, observer: _Observer
) -> tuple[jax.Array, jax.Array]:
    """Per-block range in the compact ``x.shape // block`` shape."""
    layout = gran.BlockLayout.of(x.shape, gran.block_shape(x.shape, spec.granularity))
    xb = layout.blockify(x.astype(jnp.float32))
    lo, hi = _block_range(xb, layout, spec, observer)
    return layout.compact(lo), layout.compact(hi)


def _block_range(
    xb: jax.Array, layout: gran.BlockLayout, spec: QuantSpec, observer: _Observer
) -> tuple[jax.Array, jax.Array]:
    """Per-block range of a blocked float32 array, in the layout's kept shape."""
    if observer.method == "minmax":
        return block_minmax(xb, layout)
    if observer.method == "absmax":
        lo, hi = block_minmax(xb, layout)
        amax = jnp.maximum(-lo, hi)
        return -amax, amax
    if observer.method == "percentile":
        return _percentile_range(xb, layout, spec, observer.percentile)
    return _mse_range(xb, layout, spec, observer)


def _percentile_range(
    xb: jax.Array, layout: gran.BlockLayout, spec: QuantSpec, p: float
) -> tuple[jax.Array, jax.Array]:
    """``(P_{100-p}, P_p)`` of each block (asymmetric), or ``-+P_p(|x|)`` (symmetric)."""
    if math.prod(layout.blocked[a] for a in layout.axes) == 0:
        return block_minmax(xb, layout)  # empty blocks: no percentile, zero range
    if spec.scheme == "asymmetric":
        sorted_xb = _sorted_blocks(xb, layout)
        lo, hi = (_percentile_of_sorted(sorted_xb, q) for q in (100.0 - p, p))
        return lo.reshape(layout.kept), hi.reshape(layout.kept)
    amax = _percentile_of_sorted(_sorted_blocks(jnp.abs(xb), layout), p).reshape(layout.kept)
    return -amax, amax


def _sorted_blocks(xb: jax.Array, layout: gran.BlockLayout) -> jax.Array:
    """The values of each block along one last axis, sorted: ``(n0, n1, ..., block size)``."""
    kept_axes = [i for i in range(xb.ndim) if i not in layout.axes]
    block_size = math.prod(layout.blocked[a] for a in layout.axes)
    rows = xb.transpose(kept_axes + list(layout.axes))
    return jnp.sort(rows.reshape(tuple(layout.blocked[i] for i in kept_axes) + (block_size,)))


def _percentile_of_sorted(rows: jax.Array, p: float) -> jax.Array:
    """NumPy's default (``"linear"``) percentile of each sorted row; NaN if a row has one.

    The position ``p / 100 * (n - 1)`` is a Python float, so the two neighbours and the
    weight ``t`` are constants, computed as NumPy does; the interpolation
    ``a + (b - a) * t`` (``b - (b - a) * (1 - t)`` for ``t >= 0.5``, NumPy's form) keeps
    its product apart from its sum, so XLA:CPU cannot contract them into one multiply-add
    (one rounding instead of two) that jit would use and eager mode would not.
    """
    n = rows.shape[-1]
    position = p / 100 * (n - 1)
    below = min(math.floor(position), n - 1)
    above = min(below + 1, n - 1)
    t = position - below
    a, b = rows[..., below], rows[..., above]
    if t == 0:
        value = a
    else:
        step = unfused((b - a) * jnp.float32(t if t < 0.5 else 1 - t))
        value = a + step if t < 0.5 else b - step
    has_nan = jnp.isnan(rows[..., 0]) | jnp.isnan(rows[..., -1])  # NaN sorts to an end
    return jnp.where(has_nan, jnp.float32(np.nan), value)


def _mse_range(
    xb: jax.Array, layout: gran.BlockLayout, spec: QuantSpec, observer: _Observer
) -> tuple[jax.Array, jax.Array]:
    """The minmax range times the clip ratio with the lowest per-block squared error."""
    lo, hi = block_minmax(xb, layout)
    unit = _error_unit(jnp.maximum(-lo, hi))

    def block_sse(ratio: jax.Array) -> jax.Array:
        qp = qparams_from_minmax(lo * ratio, hi * ratio, spec)
        err = (xb - dequantize_stored(quantize_blocks(xb, qp, spec)[0], qp, spec)) * unit
        return jnp.sum(err * err, axis=layout.axes, keepdims=True)

    def step(best, ratio):
        best_sse, best_ratio = best
        sse = block_sse(ratio)
        better = sse < best_sse  # strict: ties (and NaN blocks) keep the larger ratio
        return (jnp.where(better, sse, best_sse), jnp.where(better, ratio, best_ratio)), None

    ratios = clip_ratios(observer.grid, observer.min_ratio)
    one = jnp.ones(lo.shape, jnp.float32)
    best_ratio = one
    if observer.grid > 1:
        (_, best_ratio), _ = jax.lax.scan(step, (block_sse(one), one), jnp.asarray(ratios[1:]))
    return lo * best_ratio, hi * best_ratio


ERROR_UNIT_EXPONENT = 40
"""Blocks with ``max|x| < 2**41`` sum their squared errors as they are; larger ones in
units of a power of two, so that the sums cannot overflow float32."""


def _error_unit(amax: jax.Array) -> jax.Array:
    """``2**-k``, the factor a block's errors are scaled by before they are squared.

    ``k = max(floor(log2(amax)) - 40, 0)``, read off amax's exponent bits: 1 for every
    block below ``2**41`` (the sums are those of the plain errors, bit for bit), and for
    larger blocks (up to float32's max) a power of two that keeps each scaled error below
    ``2**42`` and the sum of squares finite. Scaling by a power of two is exact, so a
    block picks the ratio that the same block divided by ``2**k`` picks.
    """
    biased = (jax.lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF
    k = jnp.clip(biased - 127 - ERROR_UNIT_EXPONENT, 0, None)
    return jax.lax.bitcast_convert_type((127 - k) << 23, jnp.float32)


class MovingAverage(NamedTuple):
    """The state of a moving-average range observer, one entry per block.

    Attributes:
      min_val: the running minimum of each block, float32, shape ``x.shape // block``.
      max_val: the running maximum, same shape.
      count: how many batches have been observed (int32 scalar).
    """

    min_val: jax.Array
    max_val: jax.Array
    count: jax.Array


def moving_average_init(params_shape: Sequence[int]) -> MovingAverage:
    """An empty moving-average state for params of ``params_shape``.

    Args:
      params_shape: the shape of the quant params, ``x.shape // block_shape`` (e.g.
        ``qjax.granularity.param_shape(x.shape, qjax.block_shape(x.shape, granularity))``
        or ``calibrate(x, spec).scale.shape``).

    Returns:
      A :class:`MovingAverage` with zero ranges and ``count = 0``.

    Examples:
      >>> from qjax.calibration import moving_average_init
      >>> state = moving_average_init((1, 3))
      >>> state.min_val, state.count
      (Array([[0., 0., 0.]], dtype=float32), Array(0, dtype=int32))
    """
    zeros = jnp.zeros(tuple(int(d) for d in params_shape), jnp.float32)
    return MovingAverage(zeros, zeros, jnp.zeros((), jnp.int32))


def moving_average_update(
    state: MovingAverage,
    x: jax.typing.ArrayLike,
    spec: SpecLike,
    momentum: float = 0.9,
    method: Method = "minmax",
    *,
    percentile: float = 99.99,
    grid: int = 100,
    min_ratio: float = 0.5,
) -> MovingAverage:
    """Folds the per-block range of one batch ``x`` into the running range.

    With ``(lo, hi) = observe_range(x, spec, method)`` and ``m = momentum``:
    ``min_val <- m * min_val + (1 - m) * lo`` and likewise for ``max_val``; the first
    update (``count == 0``) takes ``(lo, hi)`` as they are.

    Args:
      state: the current :class:`MovingAverage` (from :func:`moving_average_init`).
      x: a batch, a floating-point array.
      spec: the quantization spec; its granularity decides the blocks.
      momentum: the weight of the running value, in ``[0, 1)``.
      method: the observer for each batch (see :func:`observe_range`).
      percentile: see :func:`observe_range`.
      grid: see :func:`observe_range`.
      min_ratio: see :func:`observe_range`.

    Returns:
      The new :class:`MovingAverage`.

    Raises:
      ValueError: for a momentum or observer option out of range, or a state whose shape
        is not the params shape of ``x`` under ``spec``.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax.calibration import (moving_average_init, moving_average_qparams,
      ...                             moving_average_update)
      >>> spec = qjax.QuantSpec("int8")
      >>> state = moving_average_init(())
      >>> state = moving_average_update(state, jnp.array(2.0), spec, momentum=0.5)
      >>> state = moving_average_update(state, jnp.array(-4.0), spec, momentum=0.5)
      >>> state.min_val, state.max_val  # first: (2, 2); then 0.5 * 2 + 0.5 * (-4) = -1
      (Array(-1., dtype=float32), Array(-1., dtype=float32))
      >>> float(moving_average_qparams(state, spec).scale * 127.5)  # amax = 1
      1.0
    """
    spec = as_spec(spec)
    if not _is_real(momentum) or not 0 <= momentum < 1:
        raise ValueError(
            f"momentum must be a number in [0, 1), got {momentum!r}; it is the weight of "
            "the running range, e.g. 0.9"
        )
    observer = _observer(method, percentile, grid, min_ratio)
    if not isinstance(state, MovingAverage):
        raise TypeError(
            f"state must be a MovingAverage (from moving_average_init), got {type(state).__name__}"
        )
    x = check_float_input(x, "moving_average_update")
    return _moving_average_update(state, x, spec, float(momentum), observer)


@functools.partial(jax.jit, static_argnames=("spec", "momentum", "observer"))
def _moving_average_update(
    state: MovingAverage, x: jax.Array, spec: QuantSpec, momentum: float, observer: _Observer
) -> MovingAverage:
    lo, hi = _observe_range(x, spec, observer)
    if jnp.shape(state.min_val) != lo.shape or jnp.shape(state.max_val) != lo.shape:
        raise ValueError(
            f"moving-average state has shape {jnp.shape(state.min_val)}, but x of shape "
            f"{x.shape} with granularity {spec.granularity} has params of shape {lo.shape}; "
            f"start from moving_average_init({lo.shape})"
        )
    first = state.count == 0
    return MovingAverage(
        ema(state.min_val, lo, momentum, first),
        ema(state.max_val, hi, momentum, first),
        state.count + 1,
    )


def ema(old: jax.Array, new: jax.Array, momentum: float, first: jax.Array) -> jax.Array:
    """``momentum * old + (1 - momentum) * new``, or ``new`` where ``first``; two roundings
    per product, the same under jit and op by op (see :func:`qjax.exact.unfused`)."""
    kept = unfused(jnp.float32(momentum) * old.astype(jnp.float32))
    return jnp.where(first, new, kept + unfused(jnp.float32(1.0 - momentum) * new))


def moving_average_qparams(state: MovingAverage, spec: SpecLike) -> QParams:
    """Quant params from the running range: ``qparams_from_minmax(min_val, max_val, spec)``.

    A state that saw no batch has a zero range, hence the eps scale. See
    :func:`moving_average_update` for an example.
    """
    spec = as_spec(spec)
    return _qparams_from_minmax(state.min_val, state.max_val, spec)


_qparams_from_minmax = jax.jit(qparams_from_minmax, static_argnames="spec")
