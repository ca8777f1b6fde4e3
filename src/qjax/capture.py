"""Statistics of the inputs that each parameter leaf is contracted with, for calibrated PTQ.

GPTQ needs, for each quantized weight, the Hessian ``X^T X`` of the inputs ``X`` that the
weight multiplies; AWQ and SmoothQuant need per-input-channel magnitudes ``|x|``.
:func:`capture` records them for one call ``fn(params, *args)`` and :func:`accumulate`
sums them over calibration batches, in float32 whatever the activation dtype.

One mechanism serves Flax Linen (``model.apply``), Flax NNX (``nnx.merge`` inside the
function) and plain functions (``x @ w``, ``jnp.einsum``, ``lax.dot_general``): all of
them end in a ``dot_general`` with a parameter leaf as one operand. :func:`capture` traces
``fn`` with :func:`jax.make_jaxpr` and evaluates the jaxpr again, under :func:`jax.jit`,
with a small interpreter that, at each such ``dot_general``, records the statistics of the
other operand. Nothing global is patched, so the jit cache of the float function is never
touched.

A leaf is followed through the views that keep its values: ``convert_element_type``,
``copy``, ``transpose`` (the permutation is tracked, so :attr:`InputStats.weight_axes`
names the leaf's own axes) and sharding constraints; into and out of nested ``jit``,
``closed_call``, ``custom_jvp_call``, ``custom_vjp_call`` and ``checkpoint`` (remat); and
into ``lax.scan``: a stacked leaf ``[L, ...]`` scanned over its first axis (``nn.scan``,
scan over layers) gets stacked statistics ``[L, ...]`` with ``stacked=1``, while a leaf
passed to the scan whole sums its statistics over the iterations. Any other operation
(a reshape, a gather, ``cond``, ``while``) loses the leaf; a path asked for in ``paths``
that no ``dot_general`` reads is a ``ValueError`` naming what reads it.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qjax import capture
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x = jnp.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    >>> stats = capture.capture(lambda p, x: x @ p["w"], params, x)
    >>> s = stats["w"]
    >>> s.weight_axes, s.count.item(), s.abs_max.tolist()
    ((0,), 2.0, [1.0, 2.0, 3.0])
    >>> bool(jnp.allclose(s.hessian, x.T @ x))
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from qjax.tree import path_str

__all__ = ["InputStats", "accumulate", "capture"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["hessian", "abs_sum", "abs_max", "count"],
    meta_fields=["weight_axes", "stacked"],
)
@dataclasses.dataclass(frozen=True)
class InputStats:
    """Statistics of the inputs ``x`` that one parameter leaf is contracted with.

    ``x`` is seen as rows of ``k`` features, ``k`` the size of the contracted axes (their
    product, flattened in the order of the ``dot_general``'s dimension numbers); every
    other axis of ``x`` (batch, sequence) counts as rows. All arrays are float32.

    Attributes:
        hessian: ``[*stack, k, k]``, the sum over rows of ``x x^T`` (``X^T X``), or None
            when captured with ``hessian=False``.
        abs_sum: ``[*stack, k]``, the sum over rows of ``|x|``.
        abs_max: ``[*stack, k]``, the max over rows of ``|x|`` (0 before any row).
        count: ``[*stack]``, the rows seen.
        weight_axes: the axes of the parameter leaf contracted with ``x``, in the leaf's
            own layout counted from its first axis, stack axes included: ``(0,)`` for a
            Flax Dense kernel ``[in, out]``, ``(1,)`` for a PyTorch weight ``[out, in]``
            used as ``x @ w.T`` or for a scan-stacked kernel ``[L, in, out]``.
        stacked: the leading axes of the leaf that index layers (``lax.scan``), usually 0.

    Examples:
        >>> import jax.numpy as jnp
        >>> a = InputStats(None, jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0]),
        ...                jnp.array(1.0), weight_axes=(0,))
        >>> b = InputStats(None, jnp.array([3.0, 0.0]), jnp.array([3.0, 0.0]),
        ...                jnp.array(1.0), weight_axes=(0,))
        >>> m = a.merge(b)
        >>> m.abs_sum.tolist(), m.abs_max.tolist(), m.mean_abs.tolist()
        ([4.0, 2.0], [3.0, 2.0], [2.0, 1.0])
    """

    hessian: jax.Array | None
    abs_sum: jax.Array
    abs_max: jax.Array
    count: jax.Array
    weight_axes: tuple[int, ...] = (0,)
    stacked: int = 0

    @property
    def mean_abs(self) -> jax.Array:
        """``abs_sum / count``: the mean ``|x|`` of each input channel, ``[*stack, k]``."""
        return self.abs_sum / self.count[..., None]

    def merge(self, other: InputStats) -> InputStats:
        """The statistics of both inputs together: sums add, maxima take the max."""
        if (self.weight_axes, self.stacked) != (other.weight_axes, other.stacked):
            raise ValueError(
                "cannot merge InputStats of different leaves: weight_axes/stacked "
                f"{self.weight_axes}/{self.stacked} vs {other.weight_axes}/{other.stacked}"
            )
        if (self.hessian is None) != (other.hessian is None):
            raise ValueError(
                "cannot merge InputStats with and without a hessian: capture both with the "
                "same hessian= argument"
            )
        return dataclasses.replace(self, **_merge_stats(self._arrays(), other._arrays()))

    def _arrays(self) -> dict[str, jax.Array]:
        fields = ("hessian", "abs_sum", "abs_max", "count")
        return {k: getattr(self, k) for k in fields if getattr(self, k) is not None}


def capture(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    paths: Sequence[str] | str | None = None,
    hessian: bool = True,
    **kwargs: Any,
) -> dict[str, InputStats]:
    """Statistics of the inputs of every ``dot_general`` that reads a leaf of ``params``.

    Runs ``fn(params, *args, **kwargs)`` once, compiled with :func:`jax.jit` (it may also
    be called under an outer ``jit``). ``args`` are traced (arrays or pytrees of arrays);
    ``kwargs`` are passed as they are, so put static options (``train=False``) there.

    Args:
        fn: a function of ``(params, *args)``: ``model.apply``, a function that merges an
            NNX graph with ``params`` (a state), or any JAX function.
        params: the parameter pytree whose leaves are watched.
        *args: the calibration inputs.
        paths: the leaves to record, by :func:`qjax.tree.path_str` name
            (``"params/Dense_0/kernel"``); None records every float leaf that a
            ``dot_general`` reads.
        hessian: False skips ``X^T X`` (``k x k`` per leaf), which AWQ and SmoothQuant do
            not need.
        **kwargs: keyword arguments of ``fn``.

    Returns:
        ``{path: InputStats}`` in the order of the leaves of ``params``. A leaf read by
        several ``dot_general`` ops (weight tying) sums their statistics.

    Raises:
        ValueError: a path in ``paths`` that is not a float leaf of ``params`` or that no
            ``dot_general`` reads (the message says what reads it), a leaf contracted
            along different axes by different ops, or one read by a ``dot_general`` with
            batch dimensions on the weight's side.

    Examples:
        A Flax Dense kernel ``[in, out]`` and a PyTorch-layout weight ``[out, in]``:

        >>> import flax.linen as nn
        >>> import jax, jax.numpy as jnp
        >>> from qjax import capture
        >>> model = nn.Dense(3)
        >>> x = jnp.arange(8.0).reshape(2, 2, 2)  # (batch, seq, features)
        >>> variables = model.init(jax.random.key(0), x)
        >>> s = capture.capture(model.apply, variables, x)["params/kernel"]
        >>> s.hessian.shape, s.count.item(), s.weight_axes
        ((2, 2), 4.0, (0,))
        >>> torch_style = lambda p, x: x @ p["weight"].T
        >>> s = capture.capture(torch_style, {"weight": jnp.ones((3, 2))}, x, hessian=False)
        >>> s["weight"].weight_axes, s["weight"].hessian is None, s["weight"].abs_sum.tolist()
        ((1,), True, [12.0, 16.0])
    """
    wanted = _select(params, paths)
    bound = functools.partial(fn, **kwargs) if kwargs else fn
    run = functools.partial(_capture_traced, bound, wanted, hessian)
    return jax.jit(run)(params, args)


def accumulate(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    *,
    paths: Sequence[str] | str | None = None,
    hessian: bool = True,
) -> dict[str, InputStats]:
    """:func:`capture` summed over calibration batches, in one jitted step.

    The step ``(stats, params, batch) -> stats`` is compiled once (again only for a new
    batch shape) and the running statistics are donated to it, so memory holds the
    statistics and one batch, never all activations.

    Args:
        fn: as for :func:`capture`.
        params: as for :func:`capture`.
        batches: an iterable of batches; a tuple is the positional arguments after
            ``params``, anything else (an array, a dict) is the one argument.
        paths: as for :func:`capture`.
        hessian: as for :func:`capture`.

    Returns:
        ``{path: InputStats}``, the statistics of all batches together.

    Raises:
        ValueError: ``batches`` is empty, or as :func:`capture`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from qjax import capture
        >>> params = {"w": jnp.ones((2, 4))}
        >>> batches = [jnp.full((3, 2), 1.0), jnp.full((5, 2), -2.0)]
        >>> s = capture.accumulate(lambda p, x: x @ p["w"], params, batches)["w"]
        >>> s.count.item(), s.abs_max.tolist(), s.mean_abs.tolist(), s.hessian.tolist()
        (8.0, [2.0, 2.0], [1.625, 1.625], [[23.0, 23.0], [23.0, 23.0]])
    """
    wanted = _select(params, paths)
    run = functools.partial(_capture_traced, fn, wanted, hessian)

    def step(stats: dict[str, InputStats], p: Any, args: tuple) -> dict[str, InputStats]:
        new = run(p, args)
        return {name: stats[name].merge(new[name]) for name in new}

    jitted = jax.jit(step, donate_argnums=0)
    stats = None
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        if stats is None:
            shapes = jax.eval_shape(run, params, args)
            mesh = _concrete_mesh((params, args))
            stats = jax.tree.map(lambda s, m=mesh: _zeros_like(s, m), shapes)
        stats = jitted(stats, params, args)
    if stats is None:
        raise ValueError("batches is empty: pass at least one batch of calibration inputs")
    return stats


def _concrete_mesh(tree: Any) -> jax.sharding.Mesh | None:
    """The device mesh of the first leaf of ``tree`` sharded over one, or None."""
    for leaf in jax.tree.leaves(tree):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(mesh, jax.sharding.Mesh):
            return mesh
    return None


def _zeros_like(s: jax.ShapeDtypeStruct, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Zeros of ``s``'s shape and dtype, laid out over ``mesh`` as the trace sharded them:
    the step donates its statistics, and a donated buffer must be its output's size
    (explicitly sharded params give features-sharded statistics)."""
    zeros = jnp.zeros(s.shape, s.dtype)
    spec = getattr(getattr(s, "sharding", None), "spec", None)
    if mesh is None or spec is None:
        return zeros
    return jax.device_put(zeros, jax.sharding.NamedSharding(mesh, spec))


# --- the interpreter ------------------------------------------------------------------

# Ops whose output holds the same values as their input, axis for axis.
_VIEWS = frozenset(
    {"convert_element_type", "copy", "copy_p", "sharding_constraint", "mesh_cast", "reshard"}
)
# Ops that call a jaxpr once with their operands: evaluated inline, so leaves reach the
# dots inside them (and their outputs may still be leaves).
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
_READERS = {
    "gather": "gather (an embedding lookup or indexing)",
    "dynamic_slice": "dynamic_slice (indexing)",
    "reshape": "reshape (capture follows a leaf only through dtype casts and transposes)",
    "cond": "cond (capture does not look inside cond)",
    "while": "while (capture does not look inside while loops; use lax.scan)",
}


@dataclasses.dataclass(frozen=True)
class _Tag:
    """A value that is (a view of) parameter leaf ``leaf``.

    ``axes[i]`` is the leaf axis that the value's axis ``i`` is; ``stack`` holds, for each
    enclosing ``lax.scan`` that slices the leaf, ``(marker, leaf axis sliced)``.
    """

    leaf: int
    axes: tuple[int, ...]
    stack: tuple[tuple[object, int], ...] = ()


@dataclasses.dataclass
class _Record:
    weight_axes: tuple[int, ...]
    stack: tuple[tuple[object, int], ...]
    stats: dict[str, jax.Array]


@dataclasses.dataclass
class _Context:
    names: list[str]
    wanted: frozenset[int]
    hessian: bool
    readers: dict[int, list[str]] = dataclasses.field(default_factory=dict)

    def read_by(self, tag: _Tag, what: str) -> None:
        seen = self.readers.setdefault(tag.leaf, [])
        if what not in seen:
            seen.append(what)


def _leaves(params: Any) -> tuple[list[str], list[Any], list[bool]]:
    """The names, leaves and float-ness of the leaves of ``params``, in pytree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in flat]
    floating = [bool(jnp.issubdtype(jnp.result_type(leaf), jnp.floating)) for leaf in leaves]
    return [path_str(path) for path, _ in flat], leaves, floating


def _select(params: Any, paths: Sequence[str] | str | None) -> frozenset[int] | None:
    """The indices of the leaves named in ``paths`` (None for all), checked."""
    if paths is None:
        return None
    paths = (paths,) if isinstance(paths, str) else tuple(paths)
    if not all(isinstance(p, str) for p in paths):
        raise TypeError(
            f"paths must be strings (leaf names such as 'params/Dense_0/kernel'), "
            f"got {list(paths)!r}"
        )
    names, leaves, floating = _leaves(params)
    return frozenset(_leaf_index(p, names, leaves, floating) for p in paths)


def _capture_traced(
    fn: Callable[..., Any],
    selected: frozenset[int] | None,
    hessian: bool,
    params: Any,
    args: tuple,
) -> dict[str, InputStats]:
    """:func:`capture` as a traceable function; ``selected`` from :func:`_select`."""
    names, leaves, floating = _leaves(params)
    every = frozenset(i for i, f in enumerate(floating) if f)
    ctx = _Context(names, every if selected is None else selected, hessian)

    closed = jax.make_jaxpr(fn)(params, *args)
    tags = [
        _Tag(i, tuple(range(jnp.ndim(leaf)))) if floating[i] else None
        for i, leaf in enumerate(leaves)
    ]
    tags += [None] * (len(closed.jaxpr.invars) - len(tags))
    flat_args = leaves + jax.tree.leaves(args)
    _, _, records = _eval(ctx, closed.jaxpr, closed.consts, flat_args, tags)

    missing = sorted(selected - records.keys()) if selected is not None else []
    if missing:
        raise ValueError("; ".join(_unread_message(ctx, i) for i in missing))
    out = {}
    for i in sorted(records):
        rec = records[i]
        axes = [a for _, a in rec.stack]
        if axes != list(range(len(axes))):
            if selected is None:
                continue
            raise ValueError(
                f"leaf {names[i]!r} is sliced by lax.scan along its axes {axes}, not its "
                "leading axes: move the layer axis first"
            )
        out[names[i]] = InputStats(
            rec.stats.get("hessian"),
            rec.stats["abs_sum"],
            rec.stats["abs_max"],
            rec.stats["count"],
            weight_axes=rec.weight_axes,
            stacked=len(axes),
        )
    return out


def _leaf_index(path: str, names: list[str], leaves: list, floating: list[bool]) -> int:
    if path not in names:
        close = difflib.get_close_matches(path, names, n=3)
        hint = f"; did you mean {close}?" if close else f"; the leaves are {names[:20]}"
        raise ValueError(f"paths: {path!r} is not a leaf of params{hint}")
    i = names.index(path)
    if not floating[i]:
        raise ValueError(
            f"paths: leaf {path!r} has dtype {jnp.result_type(leaves[i])}, not a float "
            "dtype: capture records the inputs of float weights only"
        )
    return i


def _unread_message(ctx: _Context, i: int) -> str:
    readers = ctx.readers.get(i, [])
    name = ctx.names[i]
    if not readers:
        return (
            f"paths: leaf {name!r} is not read by any dot_general of fn (it is not used, "
            "or only after an op that capture does not follow)"
        )
    what = ", ".join(_READERS.get(r, r) for r in readers)
    return (
        f"paths: leaf {name!r} is not the operand of any dot_general that capture "
        f"records; it is read by {what}"
    )


def _eval(
    ctx: _Context,
    jaxpr: jcore.Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    tags: Sequence[_Tag | None],
) -> tuple[list[Any], list[_Tag | None], dict[int, _Record]]:
    """Evaluates ``jaxpr``, following tagged values; returns outputs, their tags, records."""
    env: dict[Any, Any] = {}
    tag_of: dict[Any, _Tag] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def tag(v: Any) -> _Tag | None:
        return None if isinstance(v, jcore.Literal) else tag_of.get(v)

    env.update(zip(jaxpr.constvars, consts))
    for v, x, t in zip(jaxpr.invars, args, tags):
        env[v] = x
        if t is not None:
            tag_of[v] = t
    records: dict[int, _Record] = {}
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        intags = [tag(v) for v in eqn.invars]
        if any(t is not None for t in intags):
            outs, outtags = _eval_tagged(ctx, eqn, invals, intags, records)
        else:
            outs, outtags = _bind(eqn, invals), [None] * len(eqn.outvars)
        for v, x, t in zip(eqn.outvars, outs, outtags):
            env[v] = x  # a dropped output (DropVar) is stored too, and never read
            if t is not None:
                tag_of[v] = t
    return [read(v) for v in jaxpr.outvars], [tag(v) for v in jaxpr.outvars], records


def _bind(eqn: jcore.JaxprEqn, invals: list[Any]) -> list[Any]:
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # jax < 0.9 returns (subfuns, params); later releases the params alone.
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _mapped_aval(size: int, axis: int, aval: Any) -> Any:
    """One iteration's slice of a scanned operand's abstract value.

    ``jax.extend.core.mapped_aval`` from jax 0.8.2, ``jax.core.mapped_aval`` before (the
    lowest jax qjax supports is 0.8.1).
    """
    mapped = getattr(jcore, "mapped_aval", None)
    if mapped is None:  # jax 0.8.1
        from jax import core as legacy_core

        mapped = legacy_core.mapped_aval
    return mapped(size, axis, aval)


def _eval_tagged(
    ctx: _Context,
    eqn: jcore.JaxprEqn,
    invals: list[Any],
    intags: list[_Tag | None],
    records: dict[int, _Record],
) -> tuple[list[Any], list[_Tag | None]]:
    name = eqn.primitive.name
    if name in _VIEWS and len(eqn.invars) == 1:
        return _bind(eqn, invals), intags
    if name == "transpose":
        t = intags[0]
        axes = tuple(t.axes[p] for p in eqn.params["permutation"])
        return _bind(eqn, invals), [dataclasses.replace(t, axes=axes)]
    if name == "dot_general":
        _record_dot(ctx, eqn, invals, intags, records)
        return _bind(eqn, invals), [None]
    if name in _CALLS:
        inner = eqn.params[_CALLS[name]]
        jaxpr, consts = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
        outs, outtags, inner_records = _eval(ctx, jaxpr, consts, invals, intags)
        _merge_records(ctx, records, inner_records)
        return outs, outtags
    if name == "scan":
        return _eval_scan(ctx, eqn, invals, intags, records)
    for t in intags:
        if t is not None:
            ctx.read_by(t, name)
    return _bind(eqn, invals), [None] * len(eqn.outvars)


def _record_dot(
    ctx: _Context,
    eqn: jcore.JaxprEqn,
    invals: list[Any],
    intags: list[_Tag | None],
    records: dict[int, _Record],
) -> None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    sides = ((intags[0], lc, lb, invals[1], rc), (intags[1], rc, rb, invals[0], lc))
    for t, w_contract, w_batch, x, x_contract in sides:
        if t is None:
            continue
        if w_batch:
            ctx.read_by(t, "dot_general with batch dimensions on the weight (not supported)")
            continue
        if t.leaf not in ctx.wanted:
            continue
        weight_axes = tuple(t.axes[d] for d in w_contract)
        rec = _Record(weight_axes, t.stack, _input_stats(x, tuple(x_contract), ctx.hessian))
        _merge_records(ctx, records, {t.leaf: rec})


def _input_stats(x: jax.Array, contract: tuple[int, ...], hessian: bool) -> dict[str, jax.Array]:
    """Float32 statistics of ``x`` with features ``contract`` (flattened in that order)."""
    rows = tuple(d for d in range(x.ndim) if d not in contract)
    # A reduction over ``rows`` keeps the contracted axes in increasing order.
    order = [sorted(contract).index(c) for c in contract]
    k = math.prod(x.shape[c] for c in contract)
    x32 = x.astype(jnp.float32)
    mag = jnp.abs(x32)
    stats = {
        "abs_sum": jnp.transpose(jnp.sum(mag, axis=rows), order).reshape(k),
        "abs_max": jnp.transpose(jnp.max(mag, axis=rows, initial=0.0), order).reshape(k),
        "count": jnp.asarray(math.prod(x.shape[d] for d in rows), jnp.float32),
    }
    if hessian:
        # Contracting the rows of x with themselves: a batch sharded over devices stays
        # where it is and XLA all-reduces the k x k result.
        xtx = lax.dot_general(
            x32,
            x32,
            ((rows, rows), ((), ())),
            precision=lax.Precision.HIGHEST,
            out_sharding=_replicated_if_explicit(x),
        )
        n = len(contract)
        stats["hessian"] = jnp.transpose(xtx, order + [n + o for o in order]).reshape(k, k)
    return stats


def _replicated_if_explicit(x: jax.Array) -> jax.sharding.NamedSharding | None:
    """Replicated, for an array sharded over explicit mesh axes (JAX asks where X^T X goes)."""
    sharding = jax.typeof(x).sharding
    spec = getattr(sharding, "spec", ())
    return sharding.update(spec=jax.P()) if any(s is not None for s in spec) else None


def _merge_records(ctx: _Context, into: dict[int, _Record], new: dict[int, _Record]) -> None:
    for leaf, rec in new.items():
        old = into.get(leaf)
        if old is None:
            into[leaf] = rec
            continue
        if old.weight_axes != rec.weight_axes:
            raise ValueError(
                f"leaf {ctx.names[leaf]!r} is contracted along axes {old.weight_axes} by one "
                f"dot_general and {rec.weight_axes} by another: pass paths= without it, or "
                "capture its uses in separate functions"
            )
        if [a for _, a in old.stack] != [a for _, a in rec.stack]:
            raise ValueError(
                f"leaf {ctx.names[leaf]!r} is read both inside and outside a lax.scan over "
                "its layers, so its statistics cannot be stacked: pass paths= without it"
            )
        into[leaf] = _Record(old.weight_axes, old.stack, _merge_stats(old.stats, rec.stats))


def _merge_stats(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Two inputs' statistics together: sums add, ``abs_max`` takes the max (one rule for
    batches, repeated uses of a leaf, scan iterations and :meth:`InputStats.merge`)."""
    return {k: jnp.maximum(a[k], b[k]) if k == "abs_max" else a[k] + b[k] for k in a}


def _scan_counts(params: dict[str, Any]) -> tuple[int, int]:
    """How many of a scan's operands are constants and how many carries.

    jax < 0.12 names them (``num_consts``, ``num_carry``); jax 0.12 gives the operands'
    groups as ``ft_in = (consts, carry, xs)`` (the body's inputs, in that order).
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()  # a FlatTree: iterating gives its leaves
    return len(list(consts)), len(list(carry))


def _eval_scan(
    ctx: _Context,
    eqn: jcore.JaxprEqn,
    invals: list[Any],
    intags: list[_Tag | None],
    records: dict[int, _Record],
) -> tuple[list[Any], list[_Tag | None]]:
    """A ``lax.scan`` whose body also returns the statistics of the leaves it reads."""
    p = eqn.params
    n_consts, n_carry = _scan_counts(p)
    body = p["jaxpr"]
    marker = object()
    consts, init, xs = (
        invals[:n_consts],
        invals[n_consts : n_consts + n_carry],
        invals[n_consts + n_carry :],
    )
    for t in intags[n_consts : n_consts + n_carry]:
        if t is not None:
            ctx.read_by(t, "scan (as its carry)")
    xs_tags = [
        None if t is None else _Tag(t.leaf, t.axes[1:], t.stack + ((marker, t.axes[0]),))
        for t in intags[n_consts + n_carry :]
    ]
    body_tags = list(intags[:n_consts]) + [None] * n_carry + xs_tags
    static: dict[int, _Record] = {}

    def body_fn(carry: list[Any], x: list[Any]) -> tuple[list[Any], dict[int, dict]]:
        outs, _, recs = _eval(ctx, body.jaxpr, body.consts, [*consts, *carry, *x], body_tags)
        static.clear()
        static.update(recs)
        return outs, {leaf: r.stats for leaf, r in recs.items()}

    # A leaf sliced by this scan gets one set of statistics per iteration (scan outputs); a
    # leaf that is the same every iteration sums them in the carry, so that memory holds
    # one set, not one per iteration.
    x_avals = [_mapped_aval(p["length"], 0, jax.typeof(x)) for x in xs]
    _, shapes = jax.eval_shape(body_fn, list(init), x_avals)
    summed = {
        leaf: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes[leaf])
        for leaf, rec in static.items()
        if not any(m is marker for m, _ in rec.stack)
    }

    def step(state: tuple, x: list[Any]) -> tuple[tuple, tuple]:
        carry, acc = state
        outs, stats = body_fn(carry, x)
        acc = {leaf: _merge_stats(acc[leaf], stats[leaf]) for leaf in acc}
        per_step = {leaf: v for leaf, v in stats.items() if leaf not in acc}
        return (outs[:n_carry], acc), (outs[n_carry:], per_step)

    (carry, acc), (ys, per_step) = lax.scan(
        step,
        (list(init), summed),
        list(xs),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    found = {
        leaf: _Record(rec.weight_axes, rec.stack, {**acc, **per_step}[leaf])
        for leaf, rec in static.items()
    }
    _merge_records(ctx, records, found)
    return [*carry, *ys], [None] * len(eqn.outvars)
