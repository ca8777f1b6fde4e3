"""Argument checks and the contraction-first view shared by the calibrated algorithms."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax import granularity as gran
from qjax.qparams import check_float_input
from qjax.spec import QuantSpec, SpecLike, as_spec

AxisLike = int | Sequence[int]


def weight_spec(spec: SpecLike, shape: tuple[int, ...], what: str) -> QuantSpec:
    """``spec`` as a QuantSpec whose granularity fits a weight of ``shape``."""
    spec = as_spec(spec)
    if spec.granularity.kind == "per_token":
        raise ValueError(
            f"{what}: spec {spec} has granularity per_token, which is for activations "
            "(one scale per row of x, chosen at run time); give a weight granularity, e.g. "
            "qjax.per_channel(-1) or qjax.per_block(-2, 128)"
        )
    try:
        gran.block_shape(shape, spec.granularity)
    except ValueError as e:
        raise ValueError(f"{what}: spec does not fit the weight of shape {shape}: {e}") from None
    return spec


def float_weight(w: jax.typing.ArrayLike, what: str, name: str = "w") -> jax.Array:
    """``w`` as a floating-point array of rank >= 2."""
    if not hasattr(w, "dtype") and not isinstance(w, (list, tuple, np.ndarray)):
        raise TypeError(f"{what}: {name} must be a floating-point array, got {type(w).__name__}")
    w = check_float_input(w, f"{what}: {name}")
    if w.ndim < 2:
        raise ValueError(
            f"{what}: {name} must have rank >= 2 (an input axis and an output axis), "
            f"got shape {w.shape}"
        )
    return w


def contraction_axes(axis: AxisLike, ndim: int, what: str) -> tuple[int, ...]:
    """``axis`` (an int or a tuple of ints) as distinct non-negative axes, in order."""
    axes = (axis,) if _is_int(axis) else axis
    if not isinstance(axes, Sequence) or isinstance(axes, str) or not axes:
        raise TypeError(f"{what}: axis must be an int or a non-empty tuple of ints, got {axis!r}")
    out = []
    for a in axes:
        if not _is_int(a):
            raise TypeError(f"{what}: axis must be an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{what}: axis {a} is out of range for a weight of rank {ndim}; "
                f"use axes in [{-ndim}, {ndim - 1}]"
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out) or len(out) == ndim:
        raise ValueError(
            f"{what}: axis {axis!r} must name distinct axes and leave at least one output "
            f"axis of the rank-{ndim} weight"
        )
    return tuple(out)


def check_vector(v: jax.typing.ArrayLike, k: int, name: str, what: str) -> jax.Array:
    """A float32 vector of length ``k`` (per-input-channel statistics)."""
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.floating) or v.shape != (k,):
        raise ValueError(
            f"{what}: {name} must be a float array of shape ({k},) (one value per input "
            f"channel), got dtype {v.dtype} shape {v.shape}"
        )
    return v.astype(jnp.float32)


def check_hessian(h: jax.typing.ArrayLike, k: int, what: str) -> jax.Array:
    """A float32 ``[k, k]`` Hessian."""
    h = jnp.asarray(h)
    if not jnp.issubdtype(h.dtype, jnp.floating) or h.shape != (k, k):
        raise ValueError(
            f"{what}: hessian must be a float array of shape ({k}, {k}) (sum of x x^T over "
            f"calibration rows, k = the size of the contracted axis), got dtype {h.dtype} "
            f"shape {h.shape}"
        )
    return h.astype(jnp.float32)


def to_view(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` as ``[k, n]``: the contraction axes first (flattened in order), the rest after."""
    k = math.prod(x.shape[a] for a in axes)
    return jnp.moveaxis(x, axes, tuple(range(len(axes)))).reshape(k, -1)


def from_view(v: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`to_view` for an array of ``shape``."""
    moved = [shape[a] for a in axes] + [d for i, d in enumerate(shape) if i not in axes]
    return jnp.moveaxis(v.reshape(moved), tuple(range(len(axes))), axes)


def along(s: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """A ``[k]`` vector shaped to broadcast along the contraction ``axes`` of ``shape``
    (size 1 on every other axis)."""
    moved = [shape[a] for a in axes] + [1] * (len(shape) - len(axes))
    return jnp.moveaxis(s.reshape(moved), tuple(range(len(axes))), axes)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
