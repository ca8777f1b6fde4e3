"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weight.

``s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)`` per input channel ``j``; the weight is
quantized as ``W * s`` and the input is multiplied by ``1 / s`` (``channel_scale``), so
the activation's per-channel range is flattened before W8A8 quantizes it per token.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from qjax.algorithms._common import (
    AxisLike,
    check_vector,
    contraction_axes,
    float_weight,
    to_view,
    weight_spec,
)
from qjax.algorithms.awq import scaled
from qjax.qarray import QArray
from qjax.spec import SpecLike

__all__ = ["smoothquant", "smoothquant_scale"]

SCALE_RANGE = (1e-5, 1e5)
"""``s`` is clipped to this range."""


def smoothquant_scale(
    w: jax.typing.ArrayLike,
    abs_max: jax.typing.ArrayLike,
    *,
    axis: AxisLike = -2,
    alpha: float = 0.5,
) -> jax.Array:
    """SmoothQuant's per-input-channel scale ``s`` ``[k]``, float32.

    ``s_j = abs_max_j ** alpha / max|W_j| ** (1 - alpha)``, where ``W_j`` is input row ``j``
    of ``w`` (all values that input ``j`` multiplies), clipped to ``[1e-5, 1e5]``. A
    channel whose activation or weight maximum is 0 keeps ``s_j = 1``.

    Args:
      w: a float weight of rank >= 2.
      abs_max: ``[k]``, ``max |x|`` per input channel over the calibration rows.
      axis: the contraction axis, or a tuple of them (flattened in order).
      alpha: migration strength in ``[0, 1]``: 0 leaves the weight alone (``s`` from the
        weight only), 1 moves all of the activation's range into the weight.

    Examples:
      >>> import jax.numpy as jnp
      >>> from qjax.algorithms import smoothquant_scale
      >>> w = jnp.array([[1.0, -4.0], [1.0, 1.0]])
      >>> smoothquant_scale(w, jnp.array([16.0, 1.0])).tolist()  # sqrt(16) / sqrt(4), 1 / 1
      [2.0, 1.0]
    """
    what = "smoothquant"
    w = float_weight(w, what)
    axes = contraction_axes(axis, w.ndim, what)
    k = math.prod(w.shape[a] for a in axes)
    abs_max = check_vector(abs_max, k, "abs_max", what)
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, (bool, np.bool_)):
        raise TypeError(f"{what}: alpha must be a float in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{what}: alpha must be in [0, 1] (migration strength), got {alpha}")
    w_max = jnp.max(jnp.abs(to_view(w.astype(jnp.float32), axes)), axis=1)
    a_max = jnp.abs(abs_max)
    used = (a_max > 0) & (w_max > 0)
    safe_a, safe_w = jnp.where(used, a_max, 1.0), jnp.where(used, w_max, 1.0)
    s = jnp.power(safe_a, jnp.float32(alpha)) / jnp.power(safe_w, jnp.float32(1.0 - alpha))
    return jnp.where(used, jnp.clip(s, *SCALE_RANGE), 1.0)


def smoothquant(
    w: jax.typing.ArrayLike,
    abs_max: jax.typing.ArrayLike,
    spec: SpecLike,
    *,
    axis: AxisLike = -2,
    alpha: float = 0.5,
) -> QArray:
    """Quantizes ``w * s`` with ``channel_scale = 1 / s``, ``s`` from :func:`smoothquant_scale`.

    Serving multiplies the input by ``channel_scale`` (``x / s``: the smoothed activation,
    whose per-channel range is flatter) before quantizing it per token, and contracts it
    with the quantized ``W * s``; ``dequantize()`` stands for ``w``.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.algorithms import smoothquant
      >>> x = jax.random.normal(jax.random.key(0), (64, 16)).at[:, 3].multiply(50.0)
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> qa = smoothquant(w, jnp.abs(x).max(0), "int8:per_channel")
      >>> smooth = x * qa.channel_scale.T  # the input the served layer quantizes
      >>> def spread(a):
      ...     m = jnp.abs(a).max(0)
      ...     return float(m.max() / m.min())
      >>> spread(smooth) < spread(x)
      True
    """
    s = smoothquant_scale(w, abs_max, axis=axis, alpha=alpha)
    weight_spec(spec, jnp.shape(w), "smoothquant")
    return scaled(w, s, spec, axis=axis)
