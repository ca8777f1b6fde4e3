"""GPTQ (Frantar et al. 2022): quantize a weight one input row at a time, each row's
rounding error spread over the rows not yet quantized, weighted by the inverse Hessian.

The weight is viewed as ``W [k, n]``: its contraction (input) axes first, flattened in
order, the other axes flattened after. ``H = sum x x^T`` over calibration rows (``[k, k]``)
measures how inputs co-vary; GPTQ minimises ``||X W - X W_hat||^2`` row by row. Every value
goes through qjax's own grid (:mod:`qjax.affine`), with params from
:func:`qjax.compute_qparams`, so the result is what :func:`qjax.quantize` gives for the
updated weights and the chosen params, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax import granularity as gran
from qjax.affine import dequantize_stored, quantize_blocks
from qjax.algorithms._common import (
    AxisLike,
    check_hessian,
    contraction_axes,
    float_weight,
    from_view,
    to_view,
    weight_spec,
)
from qjax.ops import quantize
from qjax.qarray import QArray
from qjax.qparams import QParams, compute_qparams
from qjax.spec import QuantSpec, SpecLike

__all__ = ["GPTQRows", "gptq", "gptq_rows"]

HIGHEST = jax.lax.Precision.HIGHEST


class GPTQRows(NamedTuple):
    """What the GPTQ loop chose, in the weight's own layout.

    Attributes:
      weights: float32, each input row as it was when it was quantized (the original row
        plus the error spread onto it from the rows before it); ``quantize(weights, spec,
        qparams=qparams)`` gives GPTQ's codes.
      dequantized: float32, the quantized rows dequantized by the loop.
      qparams: the params chosen, shape ``w.shape // block_shape``.
    """

    weights: jax.Array
    dequantized: jax.Array
    qparams: QParams


def gptq(
    w: jax.typing.ArrayLike,
    hessian: jax.typing.ArrayLike,
    spec: SpecLike,
    *,
    axis: AxisLike = -2,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    count: int | None = None,
) -> QArray:
    """Quantizes one weight with GPTQ, given the Hessian of its inputs.

    Inputs are processed in order (``act_order=False``) or by decreasing ``diag(H)``
    (``act_order=True``), ``block_size`` rows at a time: the error of each row updates the
    rest of its chunk of 16 rows, each chunk's error the rest of its block (one matmul),
    and each block's error the later blocks (one matmul). The loop is jit-compiled once
    per shape, spec and option set; blocks are unrolled, so the lazy updates cost the
    triangular ``k^2 n`` multiply-adds and no more.

    Quant params: a block of the spec's granularity that spans all ``k`` inputs (per
    tensor, per output channel) gets its params up front from the whole weight. A block
    shorter than ``k`` along the inputs (``per_block`` along the input axis, MX, per input
    channel) gets them when GPTQ reaches its first row, from that block's rows as they were
    when their lazy block began (the reference's ``find_params`` on ``W``, which only the
    earlier lazy blocks have updated); blocks that are not contiguous in the flattened
    input order (a conv kernel blocked along its channel axis only) are processed one
    after the other.
    With ``act_order=True`` the blocks are no longer contiguous in processing order, so
    their params come from the original weight up front ("static groups").

    Inputs never seen (``H_ii == 0``) get ``H_ii = 1`` and their weight row is set to 0.
    ``damp * mean(diag(H))`` is added to the diagonal before inverting, in float32.

    Args:
      w: a float weight of rank >= 2 (bf16 gives a QArray whose ``float_dtype`` is bf16).
      hessian: ``[k, k]`` float32, ``sum x x^T`` over calibration rows, where ``k`` is the
        size of ``axis`` (the product of the sizes for a tuple of axes, flattened in order).
      spec: a :class:`~qjax.QuantSpec` or its shorthand; granularity on ``w``'s own axes.
      axis: the contraction (input) axis of ``w``, or a tuple of them (``(0, 1, 2)`` for a
        conv kernel ``[kh, kw, in, out]``).
      block_size: rows per lazy update (rounded to a multiple of the chunk and of the
        quant block length along the inputs).
      damp: fraction of the mean diagonal added to it.
      act_order: process inputs by decreasing ``diag(H)``.
      count: calibration rows behind ``hessian``, if known (for the error message).

    Returns:
      ``qjax.quantize(rows.weights, spec, qparams=rows.qparams)`` for ``rows =``
      :func:`gptq_rows`, in ``w``'s dtype.

    Raises:
      ValueError: when the damped Hessian is not positive definite (its Cholesky fails),
        and for arguments that do not fit, naming them. Under ``jit`` or ``vmap`` the
        check cannot run and such a Hessian gives NaN params. The fallbacks: more
        calibration rows (at least ``k``), a larger ``damp`` (0.1 or 1.0), or plain
        round-to-nearest with :func:`qjax.quantize`.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.algorithms import gptq
      >>> x = jax.random.normal(jax.random.key(0), (256, 64))
      >>> w = jax.random.normal(jax.random.key(1), (64, 32))
      >>> spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32))
      >>> qa = gptq(w, x.T @ x, spec)
      >>> qa.shape, qa.scale.shape
      ((64, 32), (2, 32))
      >>> def err(q):
      ...     return float(jnp.linalg.norm(x @ w - x @ q.dequantize()))
      >>> err(qa) < err(qjax.quantize(w, spec))
      True
    """
    rows = gptq_rows(
        w,
        hessian,
        spec,
        axis=axis,
        block_size=block_size,
        damp=damp,
        act_order=act_order,
        count=count,
    )
    spec = weight_spec(spec, rows.weights.shape, "gptq")
    qa = quantize(rows.weights, spec, qparams=rows.qparams)
    dtype = jnp.asarray(w).dtype
    return qa if dtype == jnp.float32 else dataclasses.replace(qa, float_dtype=dtype.name)


def gptq_rows(
    w: jax.typing.ArrayLike,
    hessian: jax.typing.ArrayLike,
    spec: SpecLike,
    *,
    axis: AxisLike = -2,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    count: int | None = None,
) -> GPTQRows:
    """The GPTQ loop of :func:`gptq`: updated weights, dequantized rows and chosen params.

    Same arguments as :func:`gptq`.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.algorithms import gptq_rows
      >>> x = jax.random.normal(jax.random.key(0), (128, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> rows = gptq_rows(w, x.T @ x, "int4:per_channel")
      >>> qa = qjax.quantize(rows.weights, "int4:per_channel", qparams=rows.qparams)
      >>> bool((qa.dequantize() == rows.dequantized).all())
      True
    """
    what = "gptq"
    w = float_weight(w, what)
    axes = contraction_axes(axis, w.ndim, what)
    spec = weight_spec(spec, w.shape, what)
    if spec.tensor_scale:
        raise ValueError(
            f"{what}: spec {spec} has a tensor scale (NVFP4), which GPTQ does not choose "
            "yet: its block scales would each be relative to a different tensor scale. Use "
            "a spec without one (e.g. mxfp4 or int4 blocks), or round to nearest with "
            "qjax.quantize / method=None for this weight"
        )
    k = math.prod(w.shape[a] for a in axes)
    hessian = check_hessian(hessian, k, what)
    block_size = _positive_int(block_size, "block_size", what)
    damp = _damp(damp, what)
    if not isinstance(act_order, (bool, np.bool_)):
        raise TypeError(f"{what}: act_order must be True or False, got {act_order!r}")
    weights, dequantized, qparams, finite = _gptq(
        w, hessian, jnp.float32(damp), spec, axes, block_size, bool(act_order)
    )
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        raise ValueError(_not_positive_definite(k, damp, count))
    return GPTQRows(weights, dequantized, qparams)


def _not_positive_definite(k: int, damp: float, count: int | None) -> str:
    seen = ""
    if count is not None:
        seen = f" It was built from {int(count)} calibration rows for k = {k} inputs"
        seen += "; fewer rows than k leave it singular." if int(count) < k else "."
    return (
        f"gptq: the damped Hessian (k = {k}, damp = {damp:g}) is not positive definite: its "
        f"Cholesky factorisation failed in float32.{seen} Calibrate on more rows (at least "
        f"{k}), pass a larger damp (e.g. 0.1 or 1.0), or quantize this weight without GPTQ "
        "(round to nearest: qjax.quantize(w, spec))"
    )


def _positive_int(value: object, name: str, what: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what}: {name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{what}: {name} must be a positive int, got {value}")
    return int(value)


def _damp(value: object, what: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what}: damp must be a float >= 0, got {value!r}")
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{what}: damp must be a finite float >= 0, got {value}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How quant blocks map onto the ``[k, n]`` view (all static NumPy)."""

    group: int  # rows per quant block along the inputs (k when a block spans them all)
    groups: int  # quant blocks along the inputs
    columns: np.ndarray  # [n]: each view column's param index among the output-side params
    block_of_row: np.ndarray  # [k]: each input row's quant block index
    group_order: np.ndarray | None  # [k]: a permutation making blocks contiguous, or None
    k_blocks: tuple[int, ...]  # the quant block's size along each contraction axis
    k_counts: tuple[int, ...]  # quant blocks along each contraction axis
    rest_counts: tuple[int, ...]  # quant blocks along each other axis

    @property
    def rest(self) -> int:
        return math.prod(self.rest_counts)


@functools.cache
def _layout(shape: tuple[int, ...], axes: tuple[int, ...], spec: QuantSpec) -> _Layout:
    blocks = gran.block_shape(shape, spec.granularity)
    others = tuple(i for i in range(len(shape)) if i not in axes)

    def block_index(dims: list[int]) -> np.ndarray:
        """The flat block index of each flat position over ``dims`` (C order)."""
        sizes = [shape[a] for a in dims]
        counts = [shape[a] // blocks[a] for a in dims]
        coords = np.indices(sizes).reshape(len(dims), -1)
        per_axis = [c // blocks[a] for c, a in zip(coords, dims)]
        return np.ravel_multi_index(per_axis, counts).astype(np.int32)

    block_of_row = block_index(list(axes))
    order = np.argsort(block_of_row, kind="stable")
    identity = np.array_equal(order, np.arange(order.size))
    return _Layout(
        group=math.prod(blocks[a] for a in axes),
        groups=math.prod(shape[a] // blocks[a] for a in axes),
        columns=block_index(list(others)),
        block_of_row=block_of_row,
        group_order=None if identity else order.astype(np.int32),
        k_blocks=tuple(blocks[a] for a in axes),
        k_counts=tuple(shape[a] // blocks[a] for a in axes),
        rest_counts=tuple(shape[a] // blocks[a] for a in others),
    )


def _expand(p: jax.Array | None, columns: np.ndarray) -> jax.Array | None:
    """Output-side params ``[..., R]`` expanded to the view's ``n`` columns."""
    if p is None:
        return None
    if p.shape[-1] == columns.size:  # one param per column, in order
        return p
    if p.shape[-1] == 1:
        return jnp.broadcast_to(p, (*p.shape[:-1], columns.size))
    return jnp.take(p, columns, axis=-1)


def _params_to_view(qp: QParams, axes: tuple[int, ...], layout: _Layout) -> QParams:
    """Params in the weight's layout as ``[groups, R]``."""
    return jax.tree.map(lambda p: to_view(p, axes).reshape(layout.groups, layout.rest), qp)


def _params_from_view(
    qp: QParams, shape: tuple[int, ...], axes: tuple[int, ...], layout: _Layout
) -> QParams:
    """``[groups, R]`` params back in the weight's layout."""
    pshape = [1] * len(shape)
    for a, c in zip(axes, layout.k_counts):
        pshape[a] = c
    others = [i for i in range(len(shape)) if i not in axes]
    for a, c in zip(others, layout.rest_counts):
        pshape[a] = c
    return jax.tree.map(lambda p: from_view(p, tuple(pshape), axes), qp)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _gptq(
    w: jax.Array,
    hessian: jax.Array,
    damp: jax.Array,
    spec: QuantSpec,
    axes: tuple[int, ...],
    block_size: int,
    act_order: bool,
) -> tuple[jax.Array, jax.Array, QParams, jax.Array]:
    shape = w.shape
    layout = _layout(shape, axes, spec)
    k = hessian.shape[0]
    wv = to_view(w.astype(jnp.float32), axes)
    diag = jnp.diagonal(hessian)
    dead = diag == 0
    h = hessian + jnp.diag(jnp.where(dead, 1.0, 0.0))
    wv = jnp.where(dead[:, None], 0.0, wv)
    static = act_order or layout.groups == 1
    if act_order:
        order = jnp.argsort(-jnp.diagonal(h), stable=True)
    elif layout.group_order is not None:
        order = jnp.asarray(layout.group_order)
    else:
        order = None
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=jnp.float32)
    # Static params come from the whole (dead-zeroed) weight, up front.
    full = compute_qparams(from_view(wv, shape, axes), spec) if static else None
    if order is not None:
        h, wv = h[order][:, order], wv[order]
    lower = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=jnp.float32))
    upper = jnp.linalg.cholesky(hinv, upper=True)
    finite = jnp.all(jnp.isfinite(upper))

    g = layout.group
    chunk, step = _steps(k, g, static, block_size)
    n = wv.shape[1]
    if static:
        table = jax.tree.map(
            lambda p: _expand(p, layout.columns), _params_to_view(full, axes, layout)
        )
        row_block = jnp.asarray(layout.block_of_row)
        if order is not None:
            row_block = row_block[order]
    else:
        group_spec = dataclasses.replace(
            spec, granularity=gran.block_shape(shape, spec.granularity)
        )

    def group_params(rows: jax.Array) -> QParams:
        """Params of one quant block along the inputs, from its current rows: ``[R]``."""
        moved = [*layout.k_blocks] + [shape[i] for i in range(len(shape)) if i not in axes]
        block = jnp.moveaxis(rows.reshape(moved), tuple(range(len(axes))), axes)
        qp = compute_qparams(block, group_spec)
        return jax.tree.map(lambda p: p.reshape(layout.rest), qp)

    def start_group(at, rows, current, picked):
        """At the first row ``at`` (block-relative) of a quant block: its params from
        ``rows``, recorded in ``picked``; elsewhere ``current``."""

        def new():
            qp = group_params(jax.lax.dynamic_slice_in_dim(rows, 0, g))
            recorded = jax.tree.map(lambda all_, p: all_.at[at // g].set(p), picked, qp)
            return jax.tree.map(lambda p: _expand(p, layout.columns), qp), recorded

        return jax.lax.cond(at % g == 0, new, lambda: (current, picked))

    def run_block(block_w, u_block, first):
        """GPTQ on one block of rows (current values), ``chunk`` rows per inner step; the
        error of each chunk updates the rest of the block with one matmul.

        A quant block's params come from its rows as they were when this block started,
        before the errors of the rows quantized inside it, as in the GPTQ reference
        (IST-DASLab's ``gptq.py``: ``find_params(W[:, i:i + groupsize])`` reads ``W``,
        which only the blocks before have updated). From the updated rows, each error
        rounded inside the block would widen the range of the groups after it.
        """
        b = block_w.shape[0]
        at_start = block_w
        columns = jnp.arange(b)

        def one_chunk(j, state):
            block_w, errors, dqs, current, picked = state
            lo = j * chunk
            rows = jax.lax.dynamic_slice_in_dim(block_w, lo, chunk)
            u_rows = jax.lax.dynamic_slice_in_dim(u_block, lo, chunk)  # [chunk, b]
            u_chunk = jax.lax.dynamic_slice_in_dim(u_rows, lo, chunk, axis=1)
            d, strict = jnp.diagonal(u_chunk), jnp.triu(u_chunk, 1)
            if not static and g >= chunk:
                tail = jax.lax.dynamic_slice_in_dim(at_start, lo, g)
                current, picked = start_group(lo, tail, current, picked)

            def one_row(r, c):
                w1, e1, d1, current, picked = c
                if static:
                    qp = jax.tree.map(lambda t: t[row_block[first + lo + r]], table)
                else:
                    if g < chunk:
                        rest = jax.lax.dynamic_slice_in_dim(at_start, lo + r, g)
                        current, picked = start_group(lo + r, rest, current, picked)
                    qp = current
                row = w1[r]
                q, _ = quantize_blocks(row, qp, spec)
                dq = dequantize_stored(q, qp, spec)
                err = (row - dq) / d[r]
                w1 = w1 - strict[r][:, None] * err[None, :]
                return w1, e1.at[r].set(err), d1.at[r].set(dq), current, picked

            zeros = jnp.zeros((chunk, n), jnp.float32)
            rows, e1, d1, current, picked = jax.lax.fori_loop(
                0, chunk, one_row, (rows, zeros, zeros, current, picked)
            )
            later = jnp.where(columns[None, :] >= lo + chunk, u_rows, 0.0)
            block_w = block_w - jnp.matmul(later.T, e1, precision=HIGHEST)
            block_w = jax.lax.dynamic_update_slice_in_dim(block_w, rows, lo, 0)
            errors = jax.lax.dynamic_update_slice_in_dim(errors, e1, lo, 0)
            dqs = jax.lax.dynamic_update_slice_in_dim(dqs, d1, lo, 0)
            return block_w, errors, dqs, current, picked

        if static:
            current = picked = None
        else:
            empty = jax.eval_shape(group_params, jnp.zeros((g, n), jnp.float32))
            current = jax.tree.map(lambda s: jnp.zeros((n,), s.dtype), empty)
            picked = jax.tree.map(lambda s: jnp.zeros((b // g, *s.shape), s.dtype), empty)
        zeros = jnp.zeros((b, n), jnp.float32)
        block_w, errors, dqs, _, picked = jax.lax.fori_loop(
            0, b // chunk, one_chunk, (block_w, zeros, zeros, current, picked)
        )
        return block_w, errors, dqs, picked

    rest = wv
    done, dequantized, chosen = [], [], []
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        b = i2 - i1
        w1, e1, d1, picked = run_block(rest[:b], upper[i1:i2, i1:i2], i1)
        done.append(w1)
        dequantized.append(d1)
        chosen.append(picked)
        if i2 < k:
            rest = rest[b:] - jnp.matmul(upper[i1:i2, i2:].T, e1, precision=HIGHEST)

    weights = _unorder(jnp.concatenate(done), order)
    dq = _unorder(jnp.concatenate(dequantized), order)
    if not static:
        stacked = jax.tree.map(lambda *ps: jnp.concatenate(ps), *chosen)
        full = _params_from_view(stacked, shape, axes, layout)
    return from_view(weights, shape, axes), from_view(dq, shape, axes), full, finite


CHUNK = 16
"""Rows per inner step: each row's error updates the rest of its chunk, and each chunk's
the rest of its block with one matmul, so the sequential loop touches few rows."""


def _steps(k: int, group: int, static: bool, block_size: int) -> tuple[int, int]:
    """``(chunk, block)`` row counts that divide into ``k`` and respect quant blocks.

    A quant block whose params are chosen during the loop (not ``static``) must start at a
    chunk (when it spans chunks) or lie inside one (when shorter), and lie inside a block.
    """
    if static:
        chunk = _largest_divisor(k, CHUNK)
    elif group >= CHUNK:
        chunk = _largest_divisor(group, CHUNK)
    else:
        chunk = group * _largest_divisor(k // group, CHUNK // group)
    unit = chunk if static else max(chunk, group)
    return chunk, unit * max(1, block_size // unit)


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _unorder(v: jax.Array, order: jax.Array | None) -> jax.Array:
    """Rows in processing order back in input order."""
    if order is None:
        return v
    return jnp.zeros_like(v).at[order].set(v)
