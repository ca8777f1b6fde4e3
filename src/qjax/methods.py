"""Calibrated PTQ methods for :func:`qjax.quantize_tree`: GPTQ, AWQ and SmoothQuant.

Round to nearest (``method="rtn"``, the default) needs nothing but the weights. The
methods here also read statistics of each layer's inputs, captured on calibration batches
by :func:`qjax.capture.accumulate`, and quantize a weight so that the layer's *output*
on those inputs moves as little as possible:

* :class:`GPTQ`: rounds the weight's input rows one at a time and spreads each row's
  rounding error over the rows not yet rounded, weighted by the inputs' Hessian
  ``XᵀX`` (Frantar et al., 2022). Any qjax target and granularity; the codes are
  :func:`qjax.quantize`'s with the parameters GPTQ chose.
* :class:`AWQ`: scales each input channel by ``s = mean|x| ** alpha`` before rounding, the
  ``alpha`` (grid search) that minimises the output error on the calibration inputs
  (Lin et al., 2023). The QArray keeps ``1 / s`` as its ``channel_scale``; fold it into
  the op that makes the layer's input with :func:`fold_channel_scales`, or let
  :func:`qjax.dequantize` / :mod:`qjax.flax.serve` apply it.
* :class:`SmoothQuant`: for W8A8, moves activation outliers into the weight:
  ``s = max|x| ** alpha / max|w| ** (1 - alpha)`` per input channel (Xiao et al., 2022);
  served layers quantize ``x / s`` per token and run int8 x int8 -> int32.

The algorithms themselves are pure functions on one weight in :mod:`qjax.algorithms`.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from qjax import algorithms
from qjax.ops import quantize
from qjax.qarray import QArray
from qjax.spec import QuantSpec

__all__ = ["AWQ", "GPTQ", "Method", "MethodLike", "SmoothQuant", "as_method", "fold_channel_scales"]


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """GPTQ: error-compensated rounding, one input row at a time.

    Attributes:
      block_size: rows updated together before the error reaches later rows (lazy batch
        updates; 128 is the paper's). Any positive int; it changes speed, not results
        beyond float rounding.
      damp: added to the Hessian's diagonal, as a fraction of its mean (0.01). Raise it
        if GPTQ reports a Hessian that is not positive definite (too few calibration
        rows for the layer's input size).
      act_order: round the inputs with the largest ``XᵀX`` diagonal first. Groups along
        the input axis (per_block) then take their params from the unrounded weight.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self):
        _check_int("GPTQ block_size", self.block_size, 1)
        _check_real("GPTQ damp", self.damp, 0.0, None)
        if not isinstance(self.act_order, bool):
            raise TypeError(f"GPTQ act_order must be True or False, got {self.act_order!r}")


@dataclasses.dataclass(frozen=True)
class AWQ:
    """AWQ: activation-aware per-input-channel scales, searched on the calibration inputs.

    Attributes:
      grid: how many ``alpha`` in ``[0, 1]`` to try (20). ``alpha = 0`` is plain round to
        nearest, so the calibration error is never above RTN's.
      share_inputs: layers that read the same input (equal captured statistics, e.g. the
        query, key and value projections after one LayerNorm) search one scale together,
        so that it can be folded into that input's producer (:func:`fold_channel_scales`).
    """

    grid: int = 20
    share_inputs: bool = True

    def __post_init__(self):
        _check_int("AWQ grid", self.grid, 1)
        if not isinstance(self.share_inputs, bool):
            raise TypeError(f"AWQ share_inputs must be True or False, got {self.share_inputs!r}")


@dataclasses.dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant: migrate activation outliers into the weights, for W8A8.

    Attributes:
      alpha: how much of the activation range moves into the weight, in ``[0, 1]``
        (0.5, the paper's default for most models).
    """

    alpha: float = 0.5

    def __post_init__(self):
        _check_real("SmoothQuant alpha", self.alpha, 0.0, 1.0)


Method = Union[GPTQ, AWQ, SmoothQuant]
MethodLike = Union[Method, str, None]
_BY_NAME = {"gptq": GPTQ, "awq": AWQ, "smoothquant": SmoothQuant}


def as_method(method: MethodLike) -> Method | None:
    """A method object from a name (``"rtn"``, ``"gptq"``, ``"awq"``, ``"smoothquant"``)
    or an object; None for round to nearest.

    Examples:
      >>> from qjax.methods import as_method
      >>> as_method("gptq"), as_method("rtn")
      (GPTQ(block_size=128, damp=0.01, act_order=False), None)
    """
    if method is None or isinstance(method, (GPTQ, AWQ, SmoothQuant)):
        return method
    if isinstance(method, str) and method.strip().lower() in ("rtn", *_BY_NAME):
        name = method.strip().lower()
        return None if name == "rtn" else _BY_NAME[name]()
    raise ValueError(
        f"method must be 'rtn', 'gptq', 'awq', 'smoothquant' or a qjax.GPTQ / qjax.AWQ / "
        f"qjax.SmoothQuant, got {method!r}"
    )


# One leaf ----------------------------------------------------------------------------------


def per_layer_axes(stats: Any, shape: tuple[int, ...], name: str) -> int | tuple[int, ...]:
    """The weight's contraction axes within one (unstacked) layer, checked against the
    statistics' sizes."""
    stacked = stats.stacked
    axes = tuple(a - stacked for a in stats.weight_axes)
    layer = shape[stacked:]
    k = int(np.prod([layer[a] for a in axes]))
    if stats.abs_sum.shape[-1] != k or tuple(stats.abs_sum.shape[:-1]) != shape[:stacked]:
        raise ValueError(
            f"parameter {name!r} of shape {shape}: its statistics (abs_sum "
            f"{tuple(stats.abs_sum.shape)}, stacked {stacked}) were captured for another "
            "shape; capture them again with these parameters"
        )
    return axes[0] if len(axes) == 1 else axes


def calibrated_leaf(
    name: str, leaf: jax.Array, spec: QuantSpec, stats: Any, method: Method, shared: Any = None
) -> QArray:
    """Quantizes one weight with a calibrated method; vmapped over stacked layers.

    ``shared`` is an AWQ scale searched together with other layers (see :class:`AWQ`).
    """
    if 0 in leaf.shape:  # no weight to calibrate: round to nearest gives the empty QArray
        return quantize(leaf, spec)
    axis = per_layer_axes(stats, tuple(leaf.shape), name)
    _check_hessian(name, stats, method)
    if isinstance(method, GPTQ):
        count = None if stats.stacked else _concrete_int(stats.count)
        options = dict(
            axis=axis,
            block_size=method.block_size,
            damp=method.damp,
            act_order=method.act_order,
            count=count,
        )
        if stats.stacked:
            return _stacked_gptq(name, leaf, spec, stats, options)

        def one(w, h, _mean, _max, _s):
            return algorithms.gptq(w, h, spec, **options)

    elif isinstance(method, AWQ):

        def one(w, h, mean, _max, s):
            if s is None:
                s = algorithms.awq_search(w, h, mean, spec, axis=axis, grid=method.grid).scale
            return algorithms.scaled(w, s, spec, axis=axis)
    else:

        def one(w, _h, _mean, maximum, _s):
            return algorithms.smoothquant(w, maximum, spec, axis=axis, alpha=method.alpha)

    for _ in range(stats.stacked):
        one = jax.vmap(one)
    try:
        out = one(leaf, stats.hessian, stats.mean_abs, stats.abs_max, shared)
    except (ValueError, TypeError) as e:
        raise type(e)(f"parameter {name!r}: {e}") from None
    return out


def _stacked_gptq(
    name: str, leaf: jax.Array, spec: QuantSpec, stats: Any, options: dict[str, Any]
) -> QArray:
    """GPTQ vmapped over stacked layers. Under vmap the Cholesky check cannot raise, so
    the rows are checked afterwards: a layer whose factorisation failed has NaN rows."""

    def rows_of(w, h):
        return algorithms.gptq_rows(w, h, spec, **options)

    def quantized(rows):
        return quantize(rows.weights, spec, qparams=rows.qparams)

    for _ in range(stats.stacked):
        rows_of, quantized = jax.vmap(rows_of), jax.vmap(quantized)
    try:
        rows = rows_of(leaf, stats.hessian)
    except (ValueError, TypeError) as e:
        raise type(e)(f"parameter {name!r}: {e}") from None
    if not _all_finite(rows.weights):
        raise ValueError(
            f"parameter {name!r}: GPTQ failed on some of its stacked layers: the Hessian of "
            "their inputs is not positive definite. Capture more calibration rows (at least "
            f"the {stats.abs_sum.shape[-1]} inputs), or raise GPTQ(damp=...)"
        )
    qa = quantized(rows)
    dtype = jnp.dtype(leaf.dtype)
    return qa if dtype == jnp.float32 else dataclasses.replace(qa, float_dtype=dtype.name)


def _concrete_int(x: Any) -> int | None:
    return None if isinstance(x, jax.core.Tracer) else int(np.asarray(x))


def _all_finite(x: Any) -> bool:
    if isinstance(x, jax.core.Tracer):
        return True  # traced: checked where the values are concrete
    return bool(np.all(np.isfinite(np.asarray(x, np.float32))))


def _check_hessian(name: str, stats: Any, method: Method) -> None:
    if isinstance(method, (GPTQ, AWQ)) and stats.hessian is None:
        raise ValueError(
            f"parameter {name!r}: {type(method).__name__} needs the inputs' Hessian, but it "
            "was captured with hessian=False; capture again with hessian=True"
        )


def shared_awq_scales(
    leaves: Mapping[str, tuple[jax.Array, QuantSpec, Any]], method: AWQ
) -> dict[str, jax.Array]:
    """One AWQ scale per group of leaves that read the same input (equal statistics)."""
    groups: list[list[str]] = []
    for name, (_, _, stats) in leaves.items():
        _check_hessian(name, stats, method)
        for group in groups:
            if _same_input(leaves[group[0]][2], stats):
                group.append(name)
                break
        else:
            groups.append([name])
    scales = {}
    for group in groups:
        if len(group) == 1:
            continue
        weights = [leaves[n][0] for n in group]
        specs = [leaves[n][1] for n in group]
        stats = leaves[group[0]][2]
        axes = [per_layer_axes(leaves[n][2], tuple(leaves[n][0].shape), n) for n in group]
        if len(set(axes)) != 1:
            continue  # different layouts: each searches its own scale

        def search(ws, h, mean, specs=specs, axis=axes[0]):
            return algorithms.awq_search(ws, h, mean, specs, axis=axis, grid=method.grid).scale

        for _ in range(stats.stacked):
            search = jax.vmap(search)
        scale = search(weights, stats.hessian, stats.mean_abs)
        scales.update({n: scale for n in group})
    return scales


def _same_input(a: Any, b: Any) -> bool:
    return (
        a.stacked == b.stacked
        and a.abs_sum.shape == b.abs_sum.shape
        and bool(np.array_equal(np.asarray(a.abs_sum), np.asarray(b.abs_sum)))
        and bool(np.array_equal(np.asarray(a.abs_max), np.asarray(b.abs_max)))
        and bool(np.array_equal(np.asarray(a.count), np.asarray(b.count)))
    )


# Folding -----------------------------------------------------------------------------------


def fold_channel_scales(tree: Any, into: Mapping[str, Sequence[str]]) -> Any:
    """Folds QArrays' channel scales into the parameters that produce their inputs.

    A layer whose QArray weight has a ``channel_scale`` ``m`` (from :class:`AWQ` or
    :class:`SmoothQuant`) computes ``(x * m) @ dequantize(core)``. Where ``x`` comes out of
    an affine op whose output features can be scaled, e.g. a LayerNorm
    (``x = scale * normalised + bias``), multiplying that op's ``scale`` and ``bias`` by
    ``m`` gives the same ``x * m`` for free: the weight then drops its channel scale.

    Args:
      tree: a parameter pytree with QArray leaves.
      into: ``{weight path: [paths of the leaves to multiply]}``: each listed leaf is
        multiplied by ``m`` along its last axis (so it must end in the input size).
        Weights that share a producer must carry equal channel scales (AWQ with
        ``share_inputs=True`` gives them that).

    Returns:
      The tree with the listed weights' ``channel_scale`` removed and the producers scaled.

    Raises:
      ValueError: a path that is missing, a weight without a channel scale, a producer
        whose last axis does not fit, or producers shared by unequal scales.

    Examples:
      >>> import dataclasses, jax.numpy as jnp, qjax
      >>> w = qjax.quantize(jnp.ones((4, 3)), "int8")
      >>> w = dataclasses.replace(w, channel_scale=jnp.full((4, 1), 0.5))
      >>> tree = {"norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)}, "dense": {"kernel": w}}
      >>> folded = qjax.fold_channel_scales(
      ...     tree, {"dense/kernel": ["norm/scale", "norm/bias"]})
      >>> folded["norm"]["scale"].tolist(), folded["dense"]["kernel"].channel_scale
      ([0.5, 0.5, 0.5, 0.5], None)
    """
    from qjax.tree import path_str

    if not isinstance(into, Mapping):
        raise TypeError(
            f"into must be a mapping {{weight path: [producer paths]}}, got {type(into).__name__}"
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qarray)
    names = [path_str(path) for path, _ in flat]
    leaves = dict(zip(names, (leaf for _, leaf in flat)))
    factors: dict[str, tuple[str, np.ndarray]] = {}
    for weight_path, producers in into.items():
        weight = leaves.get(weight_path)
        if not isinstance(weight, QArray) or weight.channel_scale is None:
            what = "no such leaf" if weight is None else "it has no channel_scale"
            raise ValueError(f"cannot fold the channel scale of {weight_path!r}: {what}")
        if isinstance(producers, str):
            raise TypeError(f"into[{weight_path!r}] must be a list of paths, got a string")
        m = np.asarray(weight.channel_scale, np.float32)
        vector = _input_vector(m, weight_path)
        for producer in producers:
            if producer not in leaves or isinstance(leaves[producer], QArray):
                raise ValueError(
                    f"cannot fold into {producer!r}: it is "
                    + ("not a leaf of the tree" if producer not in leaves else "a QArray")
                )
            if producer in factors and not np.array_equal(factors[producer][1], vector):
                raise ValueError(
                    f"{weight_path!r} and {factors[producer][0]!r} read {producer!r} but "
                    "carry different channel scales; quantize them with AWQ(share_inputs="
                    "True), or keep the scales explicit"
                )
            if np.shape(leaves[producer])[-1:] != vector.shape[-1:]:
                raise ValueError(
                    f"cannot fold the channel scale of {weight_path!r} ({vector.shape[-1]} "
                    f"inputs) into {producer!r} of shape {np.shape(leaves[producer])}: its "
                    "last axis must be the input size"
                )
            factors[producer] = (weight_path, vector)
        leaves[weight_path] = dataclasses.replace(weight, channel_scale=None)
    for producer, (_, vector) in factors.items():
        leaf = leaves[producer]
        leaves[producer] = (jnp.asarray(leaf, jnp.float32) * vector).astype(leaf.dtype)
    return jax.tree_util.tree_unflatten(treedef, [leaves[n] for n in names])


def _input_vector(m: np.ndarray, path: str) -> np.ndarray:
    """A channel scale as the vector of its one non-unit axis (stack axes kept leading)."""
    wide = [i for i, d in enumerate(m.shape) if d != 1]
    if len(wide) > 1 and wide[-1] - wide[0] != len(wide) - 1:
        raise ValueError(f"the channel scale of {path!r} (shape {m.shape}) spans several axes")
    keep = [d for d in m.shape if d != 1] or [1]
    return m.reshape(keep)


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_real(name: str, value: object, low: float, high: float | None) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and value >= low and (high is None or value <= high)
    if not ok:
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")
