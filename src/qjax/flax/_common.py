"""What the Linen and NNX adapters share: layer configs, rules and activation quantization."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp

from qjax.calibration import ema
from qjax.ops import fake_quant
from qjax.qparams import QParams, block_range, compute_qparams, qparams_from_minmax
from qjax.rules import parse_spec
from qjax.spec import QuantSpec

__all__ = [
    "ActQuant",
    "LayerQuant",
    "RuleValue",
    "activation_qparams",
    "as_layer_quant",
    "compile_rules",
    "quantize_activation",
]


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """How a layer's input activation is quantized.

    Attributes:
      spec: the QuantSpec. Dynamic quantization may use any granularity, e.g.
        :func:`~qjax.per_token`; static ranges need one whose block shape does not
        depend on the batch (per tensor, or per channel of the last axis).
      static: False: params computed from each call's activation (dynamic). True: params
        from calibrated ranges (a moving average of each block's min and max); until
        calibrated, the dynamic params are used.
      momentum: the moving-average weight of the old range during calibration.
    """

    spec: QuantSpec
    static: bool = False
    momentum: float = 0.9

    def __post_init__(self):
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """What a quantized layer does: a weight spec and an optional activation spec.

    ``integer_dot=True`` (Linen: :func:`qjax.flax.linen.intercept` and ``QuantDense``)
    runs a Dense / DenseGeneral forward as int8 x int8 -> int32, the way the served model
    and Qwix's QAT run it: weight and activation specs must be signed symmetric integers
    of at most 8 bits whose scales factor out of the contraction (per-tensor or per-token
    activations, per-tensor or per-channel(-1) weights). The output equals the
    fake-quant one up to float rounding (bit-exact with :mod:`qjax.flax.serve`'s integer
    path) and the gradients are unchanged. Off by default: fake-quant QAT is bit-exact
    with ``fake_quant`` everywhere.
    """

    weight: QuantSpec | None = None
    act: ActQuant | None = None
    integer_dot: bool = False


RuleValue = Union[LayerQuant, QuantSpec, str, None]


def as_layer_quant(value: RuleValue, where: str) -> LayerQuant | None:
    """A rule's value as a LayerQuant: a QuantSpec or shorthand quantizes weights only."""
    if value is None or isinstance(value, LayerQuant):
        return value
    if isinstance(value, QuantSpec):
        return LayerQuant(weight=value)
    if isinstance(value, str):
        try:
            spec = parse_spec(value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return None if spec is None else LayerQuant(weight=spec)
    raise TypeError(
        f"{where}: expected a LayerQuant, QuantSpec, shorthand text or None, "
        f"got {type(value).__name__}"
    )


def compile_rules(
    rules: Mapping[str, RuleValue],
) -> list[tuple[Callable[[str], Any], LayerQuant | None, str]]:
    """``(fullmatch, LayerQuant | None, pattern)`` per rule, in order; errors name the rule."""
    compiled = []
    for pattern, value in rules.items():
        where = f"rule {pattern!r}"
        try:
            match = re.compile(pattern).fullmatch
        except re.error as e:
            raise ValueError(f"{where}: invalid regular expression: {e}") from None
        compiled.append((match, as_layer_quant(value, where), pattern))
    return compiled


Stats = tuple[jax.Array, jax.Array]


def activation_qparams(
    x: jax.Array, act: ActQuant, stats: Stats | None, calibrating: bool
) -> tuple[QParams, Stats | None]:
    """The params an activation is quantized with; with static ranges, the updated ranges.

    Static ranges ``(act_min, act_max)`` have the activation's block-parameter shape less
    its leading unit axes: ``()`` per tensor, ``(features,)`` per channel of the last
    axis, so they fit inputs of any rank. ``+inf`` / ``-inf`` (or ``stats=None``) means
    uncalibrated: the call uses the dynamic range. While ``calibrating``, each call moves
    the ranges towards the block's min and max: ``new = momentum * old + (1 - momentum) *
    observed`` (the first observation is taken as it is).

    Returns:
      ``(params, stats)``: params of shape ``x.shape // block_shape``; stats are None for
      dynamic activations.
    """
    # The straight-through estimator passes no gradient through the range; without the
    # stop_gradient JAX would still differentiate the min / max reductions (a tree of
    # slices in the backward pass) only to drop the result.
    x = jax.lax.stop_gradient(x)
    if not act.static:
        return compute_qparams(x, act.spec), None
    lo, hi = block_range(x, act.spec)
    param_shape, shape = lo.shape, _drop_leading_ones(lo.shape)
    lo, hi = lo.reshape(shape), hi.reshape(shape)
    if stats is None:
        stats = (jnp.full(shape, jnp.inf, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32))
    act_min, act_max = (_fit(s, shape) for s in stats)
    if calibrating:
        fresh = jnp.isinf(act_min)
        act_min = ema(act_min, lo, act.momentum, fresh)
        act_max = ema(act_max, hi, act.momentum, fresh)
    calibrated = jnp.isfinite(act_min)
    qp = qparams_from_minmax(
        jnp.where(calibrated, act_min, lo), jnp.where(calibrated, act_max, hi), act.spec
    )
    return jax.tree.map(lambda p: p.reshape(param_shape), qp), (act_min, act_max)


def quantize_activation(
    x: jax.Array, act: ActQuant, stats: Stats | None, calibrating: bool
) -> tuple[jax.Array, QParams, Stats | None]:
    """Fake-quantizes an activation with :func:`activation_qparams`' params.

    Returns:
      ``(fake-quantized x, params, stats)``; stats are None for dynamic activations.
    """
    qp, stats = activation_qparams(x, act, stats, calibrating)
    return fake_quant(x, act.spec, qparams=qp), qp, stats


def _drop_leading_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    i = 0
    while i < len(shape) and shape[i] == 1:
        i += 1
    return shape[i:]


def _fit(stat: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    stat = jnp.asarray(stat, jnp.float32)
    if stat.shape == shape:
        return stat
    if stat.ndim == 0:  # an uncalibrated (or per-tensor) range fits any block shape
        return jnp.broadcast_to(stat, shape)
    raise ValueError(
        f"the calibrated activation range has shape {stat.shape}, which does not fit this "
        f"input's blocks {shape}; recalibrate with inputs of this shape"
    )
