"""AWQ (Lin et al. 2023): scale the weight's input channels by ``s = mean|x| ** alpha``
before rounding, so the channels that see large inputs get finer steps, and undo the
scale on the input side (``channel_scale = 1 / s``).

``alpha`` is searched on a grid, each candidate scored by the layer's output error on
the calibration rows, ``trace(D^T H D) = ||X W - X W_hat||^2`` with ``D = W - W_hat`` and
``H = sum x x^T``: no activations are needed, only their statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax.algorithms._common import (
    AxisLike,
    along,
    check_hessian,
    check_vector,
    contraction_axes,
    float_weight,
    to_view,
    weight_spec,
)
from qjax.ops import fake_quant, quantize
from qjax.qarray import QArray
from qjax.spec import QuantSpec, SpecLike

__all__ = ["AWQResult", "awq", "awq_search", "scaled"]

HIGHEST = jax.lax.Precision.HIGHEST

Weights = jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike]


class AWQResult(NamedTuple):
    """The outcome of :func:`awq_search` (a pytree of arrays, so it vmaps).

    Attributes:
      scale: ``[k]`` float32, the chosen per-input-channel scale ``s`` (all ones at
        ``alpha = 0``).
      alpha: the chosen exponent.
      loss: ``trace(D^T H D)`` of the chosen scale, summed over the weights.
      rtn_loss: the same at ``alpha = 0``: plain round to nearest. ``loss <= rtn_loss``.
    """

    scale: jax.Array
    alpha: jax.Array
    loss: jax.Array
    rtn_loss: jax.Array


def awq_search(
    w: Weights,
    hessian: jax.typing.ArrayLike,
    mean_abs: jax.typing.ArrayLike,
    spec: SpecLike | Sequence[SpecLike],
    *,
    axis: AxisLike = -2,
    grid: int = 20,
) -> AWQResult:
    """Searches AWQ's per-input-channel scale for one weight, or several sharing one input.

    For each ``alpha`` in ``linspace(0, 1, grid)``: ``s = mean_abs ** alpha``, normalised
    by ``sqrt(max(s) * min(s))`` (channels with ``mean_abs == 0`` take the smallest
    positive mean); ``W_hat = fake_quant(W * s) / s`` (round to nearest with qjax);
    ``loss = trace((W - W_hat)^T H (W - W_hat))`` in the ``[k, n]`` view. The lowest loss
    wins, ties going to the smaller ``alpha``; ``alpha = 0`` gives ``s = 1`` exactly, so
    the result is never worse than round to nearest on the calibration loss.

    Args:
      w: a float weight of rank >= 2, or a list of weights that read the same input
        (q/k/v projections after one LayerNorm): one scale for all, losses summed.
      hessian: ``[k, k]``, ``sum x x^T`` over calibration rows.
      mean_abs: ``[k]``, ``mean |x|`` per input channel.
      spec: a :class:`~qjax.QuantSpec` (or shorthand), or one per weight of a list.
      axis: the contraction axis of each weight, or a tuple of them (flattened in order).
      grid: the number of ``alpha`` values tried, at least 1 (1 tries only ``alpha = 0``).

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.algorithms import awq_search
      >>> x = jax.random.normal(jax.random.key(0), (256, 64)) * jnp.linspace(0.1, 4.0, 64)[None, :]
      >>> w = jax.random.normal(jax.random.key(1), (64, 32))
      >>> found = awq_search(w, x.T @ x, jnp.abs(x).mean(0), "int4:per_block:32")
      >>> found.scale.shape, bool(found.loss <= found.rtn_loss)
      ((64,), True)
    """
    what = "awq_search"
    ws = list(w) if isinstance(w, (list, tuple)) else [w]
    if not ws:
        raise ValueError(f"{what}: w is an empty list; give at least one weight")
    many = isinstance(w, (list, tuple))
    names = [f"w[{i}]" if many else "w" for i in range(len(ws))]
    ws = [float_weight(x, what, name) for x, name in zip(ws, names)]
    specs = _specs(spec, len(ws), what)
    axes = [contraction_axes(axis, x.ndim, f"{what} ({name})") for x, name in zip(ws, names)]
    sizes = [math.prod(x.shape[a] for a in ax) for x, ax in zip(ws, axes)]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"{what}: the weights of a list must share one input, but their input sizes "
            f"along axis {axis!r} differ: {sizes}"
        )
    k = sizes[0]
    specs = [weight_spec(s, x.shape, f"{what} ({n})") for s, x, n in zip(specs, ws, names)]
    hessian = check_hessian(hessian, k, what)
    mean_abs = check_vector(mean_abs, k, "mean_abs", what)
    if not isinstance(grid, numbers.Integral) or isinstance(grid, (bool, np.bool_)):
        raise TypeError(f"{what}: grid must be an int >= 1, got {grid!r}")
    if grid < 1:
        raise ValueError(f"{what}: grid must be >= 1 (the number of alphas tried), got {grid}")
    return _search(tuple(ws), hessian, mean_abs, tuple(specs), tuple(axes), int(grid))


def awq(
    w: Weights,
    hessian: jax.typing.ArrayLike,
    mean_abs: jax.typing.ArrayLike,
    spec: SpecLike | Sequence[SpecLike],
    *,
    axis: AxisLike = -2,
    grid: int = 20,
) -> QArray | list[QArray]:
    """Quantizes ``w`` (or a list sharing one input) with the scale :func:`awq_search` finds.

    Returns :func:`scaled` of each weight: the QArray of ``W * s`` with
    ``channel_scale = 1 / s``, so ``dequantize()`` gives ``dequant(Q) / s``. A list in
    gives a list out.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.algorithms import awq
      >>> x = jax.random.normal(jax.random.key(0), (256, 64)) * jnp.linspace(0.1, 4.0, 64)[None, :]
      >>> w = jax.random.normal(jax.random.key(1), (64, 32))
      >>> qa = awq(w, x.T @ x, jnp.abs(x).mean(0), "int4:per_block:32")
      >>> qa.channel_scale.shape
      (64, 1)
    """
    found = awq_search(w, hessian, mean_abs, spec, axis=axis, grid=grid)
    if not isinstance(w, (list, tuple)):
        return scaled(w, found.scale, spec, axis=axis)
    specs = _specs(spec, len(w), "awq")
    return [scaled(x, found.scale, s, axis=axis) for x, s in zip(w, specs)]


def scaled(
    w: jax.typing.ArrayLike, s: jax.typing.ArrayLike, spec: SpecLike, *, axis: AxisLike = -2
) -> QArray:
    """``quantize(w * s along axis)`` with ``channel_scale = 1 / s``.

    The served layer multiplies its input by ``channel_scale`` (or that factor is folded
    into the layer before it), so ``dequantize()`` stands for ``w``. ``channel_scale`` has
    ``w``'s rank, the input sizes on ``axis`` and 1 elsewhere.

    Args:
      w: a float weight of rank >= 2; the QArray keeps its dtype as ``float_dtype``.
      s: ``[k]`` positive float scales, one per input channel (flattened over ``axis``).
      spec: a :class:`~qjax.QuantSpec` or its shorthand.
      axis: the contraction axis, or a tuple of them.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax.algorithms import scaled
      >>> w = jnp.array([[1.0, 2.0, 3.0], [4.0, 8.0, 12.0]])
      >>> qa = scaled(w, jnp.array([2.0, 0.5]), "int8:per_channel")
      >>> qa.channel_scale.tolist()
      [[0.5], [2.0]]
      >>> qa.dequantize().round(1).tolist()  # W * s quantized, times 1 / s: close to w
      [[1.0, 2.0, 3.0], [4.0, 8.0, 12.0]]
    """
    what = "scaled"
    w = float_weight(w, what)
    axes = contraction_axes(axis, w.ndim, what)
    spec = weight_spec(spec, w.shape, what)
    k = math.prod(w.shape[a] for a in axes)
    s = check_vector(s, k, "s", what)
    if not isinstance(s, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(s) & (s > 0))):
        raise ValueError(f"{what}: s must be finite and > 0 (a multiplier per input channel)")
    s = along(s, w.shape, axes)
    qa = quantize(w.astype(jnp.float32) * s, spec)
    return dataclasses.replace(qa, channel_scale=1.0 / s, float_dtype=w.dtype.name)


def _specs(spec: object, count: int, what: str) -> list[SpecLike]:
    if isinstance(spec, (list, tuple)):
        if len(spec) != count:
            raise ValueError(
                f"{what}: spec is a list of {len(spec)} specs for {count} weights; give one "
                "spec, or one per weight"
            )
        return list(spec)
    return [spec] * count


def awq_scale(mean_abs: jax.Array, alpha: jax.Array) -> jax.Array:
    """``mean_abs ** alpha / sqrt(max * min)`` (zeros take the smallest positive mean),
    computed as ``exp(alpha * ...)`` so that ``alpha = 0`` gives exactly 1."""
    positive = mean_abs > 0
    big = jnp.float32(np.inf)
    lo = jnp.min(jnp.where(positive, mean_abs, big))
    hi = jnp.max(jnp.where(positive, mean_abs, 0.0))
    lo, hi = jnp.where(jnp.any(positive), lo, 1.0), jnp.where(jnp.any(positive), hi, 1.0)
    logs = jnp.log(jnp.where(positive, mean_abs, lo))
    return jnp.exp(alpha * (logs - 0.5 * (jnp.log(hi) + jnp.log(lo))))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _search(
    ws: tuple[jax.Array, ...],
    hessian: jax.Array,
    mean_abs: jax.Array,
    specs: tuple[QuantSpec, ...],
    axes: tuple[tuple[int, ...], ...],
    grid: int,
) -> AWQResult:
    alphas = jnp.linspace(0.0, 1.0, grid, dtype=jnp.float32)  # grid=1: [0.0]

    def loss(alpha: jax.Array) -> jax.Array:
        s = awq_scale(mean_abs, alpha)
        total = jnp.float32(0)
        for w, spec, ax in zip(ws, specs, axes):
            w = w.astype(jnp.float32)
            sw = along(s, w.shape, ax)
            w_hat = fake_quant(w * sw, spec) * (1.0 / sw)
            d = to_view(w - w_hat, ax)
            total = total + jnp.sum(d * jnp.matmul(hessian, d, precision=HIGHEST))
        return total

    losses = jax.lax.map(loss, alphas)
    best = jnp.argmin(losses)
    return AWQResult(awq_scale(mean_abs, alphas[best]), alphas[best], losses[best], losses[0])
