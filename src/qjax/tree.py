"""Post-training quantization of whole parameter pytrees, leaf by leaf, by path rules."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.exact import unfused
from qjax.methods import AWQ, Method, MethodLike, as_method, calibrated_leaf, shared_awq_scales
from qjax.ops import quantize
from qjax.palettize import LUTArray, TableFormat
from qjax.qarray import QArray
from qjax.resolve import Format, Plan, PlanRow, Resolution, RulePlan
from qjax.rules import DEFAULT_MIN_SIZE, RulesLike
from qjax.spec import QuantSpec

__all__ = [
    "DEFAULT_MIN_SIZE",
    "FLOAT32_OVERFLOW",
    "count_nonfinite",
    "dequantize_tree",
    "dequantizing",
    "leaf_specs",
    "nonfinite_in_float32",
    "path_str",
    "plan",
    "quantize_leaf",
    "quantize_tree",
    "table_method_error",
]


def path_str(path: tuple) -> str:
    """A pytree key path joined with ``/``: ``params/Dense_0/kernel``, ``layers/3/w``.

    The ``.value`` attribute that ends the path of an NNX ``Variable`` (an ``nnx.State``
    leaf) is left out: ``attn/query/kernel``, as in the pure dict (``nnx.to_pure_dict``),
    so rules, layouts and statistics read the same names either way.

    Examples:
      >>> import jax
      >>> from flax import nnx
      >>> state = nnx.state(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
      >>> [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
      ['bias', 'kernel']
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def plan(
    params: Any,
    rules: RulesLike | None = None,
    *,
    layout: str = "auto",
    min_size: int = DEFAULT_MIN_SIZE,
    fallback: str | None = "per_channel",
    strict: bool = False,
) -> Plan:
    """What :func:`quantize_tree` would do to each leaf, without quantizing anything.

    The arguments are those of :func:`quantize_tree`; ``params`` may hold
    ``jax.ShapeDtypeStruct`` leaves (e.g. from ``jax.eval_shape``), as only shapes and
    dtypes are read. Each row gives the leaf's path (what rules match), shape, dtype, the
    layout it was read in, the spec it gets (or None), the rule that matched and a note:
    why it stays float, or a fallback.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
      >>> params = {"Dense_0": {"kernel": f32(64, 48), "bias": f32(48)},
      ...           "Dense_1": {"kernel": f32(48, 32)}, "head.weight": f32(16, 96)}
      >>> print(qjax.plan(params, {".*": "int4:per_block:32:mse"}))
      path            shape  dtype    layout  spec                           rule  note
      Dense_0/bias    48     float32  other   float                          .*    1-D
      Dense_0/kernel  64x48  float32  flax    int4:per_block:32:axis=-2:mse  .*
      Dense_1/kernel  48x32  float32  flax    int4:per_channel:axis=-1:mse   .*    fallback ...
      head.weight     16x96  float32  torch   int4:per_block:32:axis=1:mse   .*
      >>> qjax.plan(params, {".*": "int4:per_block:32"})[2].note
      'fallback per_channel(axis=-1): block 32 does not divide axis 0 (size 48)'
    """
    rule_plan = _rule_plan(params, rules, layout, min_size, fallback)
    rows = _plan_rows(params, rule_plan)
    rule_plan.check_unmatched(strict=strict, where="plan")
    return rows


def _rule_plan(
    params: Any, rules: RulesLike | None, layout: str, min_size: int, fallback: str | None
) -> RulePlan:
    """The rules compiled, having read what the whole tree tells of its layouts."""
    rule_plan = RulePlan(rules, layout=layout, min_size=min_size, fallback=fallback)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_quantized)[0]
    rule_plan.read_tree([(path_str(p), getattr(leaf, "shape", ())) for p, leaf in flat])
    return rule_plan


def _plan_rows(params: Any, rule_plan: RulePlan) -> Plan:
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_quantized)[0]:
        name = path_str(path)
        resolution = _resolve(rule_plan, name, leaf)
        dtype = getattr(leaf, "dtype", None)
        dtype = type(leaf).__name__ if dtype is None else jnp.dtype(dtype).name
        rows.append(PlanRow.of(name, getattr(leaf, "shape", ()), dtype, resolution))
    return Plan(tuple(rows))


def leaf_specs(
    params: Any,
    rules: RulesLike | None = None,
    *,
    layout: str = "auto",
    min_size: int = DEFAULT_MIN_SIZE,
    fallback: str | None = "per_channel",
    strict: bool = False,
) -> dict[str, Format | None]:
    """Which spec each leaf gets: ``{path: spec or None}``, without quantizing anything.

    The arguments are those of :func:`quantize_tree`; :func:`plan` gives the reasons too.
    A spec is a :class:`~qjax.QuantSpec`, or a :class:`~qjax.palettize.TableFormat` for a
    lookup-table rule.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> params = {"Dense_0": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)}}
      >>> {p: str(s) for p, s in qjax.leaf_specs(params, min_size=0).items()}
      {'Dense_0/bias': 'None', 'Dense_0/kernel': 'int8:symmetric:scale:per_channel(axis=-1)'}
      >>> str(qjax.leaf_specs(params, {".*kernel": "lut2:scaled"})["Dense_0/kernel"])
      'lut2:per_tensor:axis=-1:scaled'
    """
    rule_plan = _rule_plan(params, rules, layout, min_size, fallback)
    rows = _plan_rows(params, rule_plan)
    rule_plan.check_unmatched(strict=strict, where="leaf_specs")
    return {row.path: row.spec for row in rows}


def quantize_tree(
    params: Any,
    rules: RulesLike | None = None,
    *,
    layout: str = "auto",
    min_size: int = DEFAULT_MIN_SIZE,
    fallback: str | None = "per_channel",
    strict: bool = False,
    check_finite: bool = True,
    method: MethodLike = "rtn",
    statistics: Mapping[str, Any] | None = None,
) -> Any:
    """Quantizes the leaves of a parameter pytree that the rules select.

    Args:
      params: any pytree of arrays (Flax variables, an Optax-trained dict, a flat dict of
        PyTorch names, ...).
      rules: ordered rules, first match wins: a mapping ``{regex: spec}``, a list of
        ``(regex, spec)`` pairs or ``"REGEX=SPEC"`` strings; a spec is a
        :class:`~qjax.QuantSpec`, shorthand such as ``"int4:per_block:32"`` (optionally
        with a calibration: ``"int4:per_block:32:mse"``, ``":percentile=99.99"``,
        ``":minmax"``), a lookup table (``"nf4"``, ``"lut4:per_grouped_channel:16"``, a
        :class:`~qjax.palettize.TableFormat`: see :func:`~qjax.rules.parse_leaf_rule`),
        or None to keep the leaf float. Regexes are matched with
        ``re.fullmatch`` against the leaf's path joined with ``/`` (and its ``.``-separated
        names with ``.`` read as ``/``). Default: :func:`~qjax.default_rules` (int8 per
        output channel for Flax ``kernel`` / ``embedding`` and PyTorch ``weight`` leaves).
      layout: ``"auto"`` (default), ``"flax"`` or ``"torch"``: how leaves are read, which
        decides the axes of shorthand without ``axis=`` (see :class:`~qjax.RulePlan`).
      min_size: leaves with fewer elements stay float (default
        :data:`DEFAULT_MIN_SIZE` = 1024) under catch-all rules (patterns that match any
        path, e.g. ``.*``) and the default rules, which also leave 1-D leaves (biases,
        norm scales) float. A rule that names a leaf (any other pattern) quantizes it
        whatever its size and rank.
      fallback: ``"per_channel"`` (default): a leaf whose blocked axis the block size does
        not divide is quantized per channel (shown by :func:`plan`); None raises instead.
      strict: a rule that matches no leaf, or rules that quantize nothing (every leaf
        they match under ``min_size`` or 1-D), raise ``ValueError`` instead of a
        :class:`~qjax.QjaxRuleWarning`.
      check_finite: with concrete (not traced) leaves, refuse values that are NaN or inf
        once cast to float32, the precision quantization computes in (float64 values
        beyond float32's range included), with a ``ValueError`` naming the leaf and the
        count. Under ``jit`` the leaves are traced and cannot be checked here: call
        :func:`count_nonfinite` inside the jitted function and check its result outside.
      method: ``"rtn"`` (default): round to nearest, from the weights alone. ``"gptq"``,
        ``"awq"``, ``"smoothquant"`` or a :class:`~qjax.GPTQ` / :class:`~qjax.AWQ` /
        :class:`~qjax.SmoothQuant` with options: calibrated PTQ (:mod:`qjax.methods`) of
        every leaf the rules quantize, from ``statistics``.
      statistics: for a calibrated ``method``: the statistics of each layer's inputs,
        ``{path: InputStats}`` from :func:`qjax.capture.accumulate` run on calibration
        batches. Every leaf the rules quantize needs an entry (a ``ValueError`` names
        those without, e.g. embeddings, which no dot reads: give them their own rule).
        Stacked (scan) leaves get one result per layer. Lookup tables take no method:
        a rule that gives one is a ``ValueError``.

    Returns:
      A pytree of the same structure, with :class:`~qjax.QArray` leaves where quantized
      (:class:`~qjax.palettize.LUTArray` leaves for lookup-table rules). QArray and
      LUTArray leaves of ``params`` stay as they are.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> params = {"attention": {"kernel": jnp.ones((64, 64))},
      ...           "mlp": {"kernel": jnp.ones((64, 256)), "bias": jnp.zeros(256)}}
      >>> rules = {".*attention.*kernel": "int8", ".*mlp.*kernel": "int4:per_block:32"}
      >>> q = qjax.quantize_tree(params, rules)
      >>> q["mlp"]["kernel"].spec.dtype, q["mlp"]["bias"].dtype
      ('int4', dtype('float32'))

      PyTorch names work as they are: ``[out, in]`` weights are blocked along ``in``.

      >>> torch = {"encoder.dense.weight": jnp.ones((64, 96))}
      >>> qjax.quantize_tree(torch, {".*": "int4:per_block:32"})["encoder.dense.weight"].scale.shape
      (64, 3)

      Scan-stacked layers: ``vmap`` over the leading axis quantizes each layer on its own
      (per-channel scales per layer), exactly as a loop over the layers would.

      >>> stacked = {"layers": {"kernel": jnp.stack([jnp.ones((64, 64)), 2 * jnp.ones((64, 64))])}}
      >>> qs = jax.vmap(lambda p: qjax.quantize_tree(p))(stacked)
      >>> qs["layers"]["kernel"].scale.shape
      (2, 1, 64)

      Lookup tables: NF4 (absmax per 64 inputs) or k-means tables (here one per 16
      output channels), as :func:`qjax.palettize.nf4` and :func:`~qjax.palettize.palettize`
      would give with the axes of each leaf's layout.

      >>> w = jax.random.normal(jax.random.key(0), (128, 64))
      >>> q = qjax.quantize_tree({"a": {"kernel": w}, "b.weight": w.T},
      ...                        {".*kernel": "nf4", ".*": "lut4:per_grouped_channel:16"})
      >>> q["a"]["kernel"].scale.shape, q["b.weight"].table.shape
      ((2, 64), (4, 1, 16))
    """
    _check_bool("check_finite", check_finite)
    rule_plan = _rule_plan(params, rules, layout, min_size, fallback)
    calibrated = as_method(method)
    if calibrated is not None or statistics is not None:
        out = _quantize_calibrated(params, rule_plan, calibrated, statistics, check_finite)
    else:

        def quantize_one(path: tuple, leaf: Any) -> Any:
            name = path_str(path)
            resolution = _resolve(rule_plan, name, leaf)
            return quantize_leaf(name, leaf, resolution, check_finite=check_finite)

        out = jax.tree_util.tree_map_with_path(quantize_one, params, is_leaf=_is_quantized)
    rule_plan.check_unmatched(strict=strict, where="quantize_tree")
    rule_plan.check_quantized(strict=strict, where="quantize_tree")
    return out


def quantize_leaf(
    name: str,
    leaf: Any,
    resolution: Resolution,
    *,
    check_finite: bool = True,
    what: str = "parameter",
) -> Any:
    """Quantizes one tensor as its :class:`~qjax.Resolution` says (PTQ of one leaf).

    The leaf as it is where ``resolution.spec`` is None; a
    :class:`~qjax.palettize.LUTArray` where it is a :class:`~qjax.palettize.TableFormat`
    (:meth:`~qjax.palettize.TableFormat.quantize`); else :func:`~qjax.quantize` with the
    resolution's spec, with params from :func:`~qjax.calibrate` where the rule chose a
    calibration. Errors name the leaf.

    Args:
      name: the leaf's path or name, for error messages.
      leaf: the array.
      resolution: from :meth:`~qjax.RulePlan.resolve`.
      check_finite: refuse (unless traced) values that are NaN or inf in float32.
      what: how errors call the leaf (``"parameter"``; the command line says ``"tensor"``).

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax.tree import quantize_leaf
      >>> plan = qjax.RulePlan({".*": "int4:per_block:32:mse"})
      >>> w = jnp.linspace(-1, 1, 64 * 64).reshape(64, 64)
      >>> quantize_leaf("fc.weight", w, plan.resolve("fc.weight", w.shape, w.dtype)).scale.shape
      (64, 2)
    """
    _check_bool("check_finite", check_finite)
    if resolution.spec is None:
        return leaf
    if check_finite and not isinstance(leaf, jax.core.Tracer):
        _check_finite(name, leaf)
    calibration, spec = resolution.calibration, resolution.spec
    try:
        if isinstance(spec, TableFormat):
            return spec.quantize(leaf)

        def one(x: Any) -> QArray:
            qparams = None if calibration is None else calibration.qparams(x, spec)
            return quantize(x, spec, qparams=qparams)

        for _ in range(resolution.stack):  # one copy of a stacked layer at a time
            one = jax.vmap(one)
        return one(leaf)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{what} {name!r}: {e}") from None


def _one_level_apart(a: str, b: str) -> bool:
    """Whether two paths differ by their first level only (``params/up/kernel``,
    ``up/kernel``): the same leaf of a tree captured with or without its collection."""
    return a.partition("/")[2] == b or b.partition("/")[2] == a


_STATS_FIELDS = ("hessian", "abs_sum", "abs_max", "count", "mean_abs", "weight_axes", "stacked")


def _quantize_calibrated(
    params: Any,
    rule_plan: RulePlan,
    method: Method | None,
    statistics: Mapping[str, Any] | None,
    check_finite: bool,
) -> Any:
    """quantize_tree with a calibrated method: resolve every leaf, then quantize the chosen."""
    if method is None:
        raise ValueError(
            "statistics are read only by a calibrated method: pass method='gptq', 'awq' or "
            "'smoothquant' (or drop statistics for round to nearest)"
        )
    if not isinstance(statistics, Mapping):
        raise TypeError(
            f"method {type(method).__name__} needs statistics={{path: InputStats}} from "
            f"qjax.capture.accumulate on calibration batches, got {type(statistics).__name__}"
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_quantized)
    names = {path_str(path) for path, _ in flat}
    chosen: dict[str, tuple[Any, QuantSpec, Any]] = {}
    for path, leaf in flat:
        name = path_str(path)
        stats = statistics.get(name)
        if stats is not None and not all(hasattr(stats, a) for a in _STATS_FIELDS):
            raise TypeError(
                f"statistics[{name!r}] must be an InputStats from qjax.capture.accumulate, "
                f"got {type(stats).__name__}"
            )
        layer, contracted = leaf, None
        if stats is not None and hasattr(leaf, "shape") and not _is_quantized(leaf):
            layer = jax.ShapeDtypeStruct(tuple(leaf.shape)[stats.stacked :], leaf.dtype)
            contracted = [a - stats.stacked for a in stats.weight_axes]
        resolution = _resolve(rule_plan, name, layer, contracted)
        if resolution.spec is None:
            continue
        if resolution.stack:
            raise ValueError(
                f"parameter {name!r}: rule {resolution.pattern!r} has stack="
                f"{resolution.stack}, which is round to nearest's; a calibrated method reads "
                "the layers a scan stacks from the capture: drop stack= from the rule"
            )
        if isinstance(resolution.spec, TableFormat):
            raise ValueError(table_method_error(name, resolution.pattern, resolution.spec, method))
        if stats is None:
            near = [k for k in statistics if k not in names and _one_level_apart(name, k)]
            if near:
                raise ValueError(
                    f"parameter {name!r} matches rule {resolution.pattern!r}, but the "
                    f"statistics name it {near[0]!r}: capture the same tree you quantize "
                    "(the variables with their 'params' level, or both without it)"
                )
            raise ValueError(
                f"parameter {name!r} matches rule {resolution.pattern!r} "
                f"({resolution.spec}), but no statistics were captured for it: the function "
                "given to qjax.capture reads it with no matrix product (an embedding "
                "lookup, a norm, or a convolution: capture records dot_general only, so "
                "convolutions are not calibrated), or it was left out of `paths`. Keep it "
                "float with a rule of its own (PATTERN: None) or quantize it separately "
                "with method='rtn'"
            )
        if resolution.calibration is not None:
            raise ValueError(
                f"parameter {name!r}: rule {resolution.pattern!r} asks for calibration "
                f"{resolution.calibration.method!r}, which is round to nearest's; "
                f"{type(method).__name__} chooses its own params: drop it from the rule"
            )
        if check_finite and not isinstance(leaf, jax.core.Tracer):
            _check_finite(name, leaf)
        if check_finite:
            _check_finite_statistics(name, stats)
        chosen[name] = (leaf, resolution.spec, stats)
    shared = {}
    if isinstance(method, AWQ) and method.share_inputs:
        shared = shared_awq_scales(chosen, method)
    leaves = []
    for path, leaf in flat:
        name = path_str(path)
        if name in chosen:
            _, spec, stats = chosen[name]
            leaf = calibrated_leaf(name, leaf, spec, stats, method, shared.get(name))
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def table_method_error(
    name: str, pattern: str | None, spec: TableFormat, method: Method, what: str = "parameter"
) -> str:
    """The message for a lookup-table rule that reaches a calibrated method (GPTQ, AWQ,
    SmoothQuant), which computes integer params, not tables.

    Examples:
      >>> import qjax
      >>> from qjax.palettize import TableFormat
      >>> from qjax.tree import table_method_error
      >>> print(table_method_error("fc.weight", ".*", TableFormat("nf4"), qjax.GPTQ()))
      parameter 'fc.weight': rule '.*' gives the lookup table nf4:per_block:64:axis=-2, but GPTQ ...
    """
    rule = "the default rule" if pattern is None else f"rule {pattern!r}"
    kind = type(method).__name__
    return (
        f"{what} {name!r}: {rule} gives the lookup table {spec}, but {kind} computes "
        f"integer params, not tables: quantize the tables apart with method='rtn' (their "
        f"own quantize_tree call, or --method rtn), or give this {what} an integer spec for "
        f"{kind}, e.g. 'int4:per_block:64'"
    )


def dequantize_tree(tree: Any) -> Any:
    """Replaces every :class:`~qjax.QArray` (and :class:`~qjax.palettize.LUTArray`) leaf
    with its dequantized array.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> q = qjax.quantize_tree({"kernel": jnp.ones((32, 32))}, min_size=0)
      >>> qjax.dequantize_tree(q)["kernel"].dtype
      dtype('float32')
    """
    return jax.tree.map(_dequantized, tree, is_leaf=_is_quantized)


def _dequantized(leaf: Any) -> Any:
    """A QArray's values, rounded apart from the ops that consume them, else ``leaf``.

    Dequantized values are ``scale * q`` products; under ``jit`` XLA:CPU may contract one
    into a following add (one rounding instead of two) in one graph and not in another.
    :func:`qjax.exact.unfused` keeps them the values that :meth:`QArray.dequantize` and
    the QAT model's ``fake_quant`` give, bit for bit, whatever consumes them.
    """
    return unfused(leaf.dequantize()) if _is_quantized(leaf) else leaf


def dequantizing(fn: Callable) -> Callable:
    """``fn`` with every :class:`~qjax.QArray` in its arguments dequantized first.

    For code that wants float parameters and knows nothing of QArrays: third-party model
    wrappers (transformers' ``FlaxBertModel.__call__(..., params=...)``), ``model.apply``,
    evaluation loops. Jit the wrapper: the QArrays then enter the compiled function packed
    and are dequantized inside it, so only the packed weights stay resident between calls.
    Leaves that are not QArrays pass through unchanged; the floats are those of
    :func:`dequantize_tree` (the QAT model's fake-quantized weights, bit for bit).

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, qjax
      >>> model, x = nn.Dense(64), jnp.ones((2, 128))
      >>> variables = model.init(jax.random.key(0), x)
      >>> packed = qjax.quantize_tree(variables, {".*kernel": "int4:per_block:32"})
      >>> run = jax.jit(qjax.dequantizing(model.apply))
      >>> want = model.apply(qjax.dequantize_tree(packed), x)
      >>> bool(np.array_equal(run(packed, x), want))
      True
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = dequantize_tree((args, kwargs))
        return fn(*args, **kwargs)

    return wrapper


def count_nonfinite(params: Any) -> Any:
    """The number of values of each floating leaf that are NaN or inf once cast to float32.

    Quantization computes in float32, so float64 values beyond its range (about
    ``3.4e38``) count as inf; other leaves count 0. Jit-friendly.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, qjax
      >>> counts = jax.jit(qjax.count_nonfinite)({"w": jnp.array([1.0, jnp.nan])})
      >>> int(counts["w"])
      1
      >>> int(qjax.count_nonfinite({"w": np.array([1e39, 1.0])})["w"])
      1
    """

    def count(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray | np.generic) and np.issubdtype(leaf.dtype, np.floating):
            leaf = _as_float32(leaf)
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.int32(0)
        return jnp.sum(~jnp.isfinite(leaf.astype(jnp.float32)), dtype=jnp.int32)

    return jax.tree.map(count, params)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QArray | LUTArray)


def _resolve(
    rule_plan: RulePlan, name: str, leaf: Any, contracted: Sequence[int] | None = None
) -> Resolution:
    """The leaf's resolution; QArrays, LUTArrays and leaves without a dtype stay as they are.
    ``contracted``: the axes its captured dot contracts (see :meth:`RulePlan.resolve`)."""
    if _is_quantized(leaf):
        return Resolution(None, None, "other", "already quantized")
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
        return Resolution(None, None, "other", "not an array")
    try:
        return rule_plan.resolve(name, leaf.shape, leaf.dtype, contracted=contracted)
    except ValueError as e:
        raise ValueError(f"parameter {e}") from None


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` in float32, where values beyond its range become inf (without a warning)."""
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(np.float32)


FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
"""The smallest magnitude that a cast to float32 (round to nearest even) turns into inf."""


def nonfinite_in_float32(x: np.ndarray) -> int:
    """The number of values of a floating ``x`` that are NaN or inf once cast to float32.

    Exactly what the cast gives, without a float32 copy: values of wider types count when
    ``|x| >= 2**128 - 2**103`` (:data:`FLOAT32_OVERFLOW`) or NaN.

    Examples:
      >>> import numpy as np
      >>> from qjax.tree import nonfinite_in_float32
      >>> nonfinite_in_float32(np.array([3.4028235e38, 3.5e38, np.nan, 1.0]))
      2
    """
    x = np.asarray(x)
    if x.dtype.itemsize > 4:
        with np.errstate(invalid="ignore"):
            return int(np.count_nonzero(~(np.abs(x) < FLOAT32_OVERFLOW)))
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def _check_finite_statistics(name: str, stats: Any) -> None:
    """Refuses calibration statistics with NaN or inf values (concrete ones), naming the
    parameter: one non-finite activation would otherwise set a scale (SmoothQuant, AWQ)
    or break GPTQ's Hessian with a message that blames the row count."""
    fields = ("hessian", "abs_sum", "abs_max")  # mean_abs is abs_sum / count
    values = {f: getattr(stats, f) for f in fields}
    if any(isinstance(v, jax.core.Tracer) for v in (*values.values(), stats.count)):
        return
    count = np.asarray(stats.count)
    if np.any(count == 0):
        which = " in some of its stacked layers" if count.size > 1 else ""
        raise ValueError(
            f"statistics[{name!r}] saw no calibration rows{which} (count 0): the batches "
            "given to qjax.capture had no rows where they reach this parameter; capture on "
            f"batches with rows, or keep the parameter float with a rule like "
            f"({re.escape(name)!r}, None)"
        )
    present = {f: np.asarray(v) for f, v in values.items() if v is not None}  # hessian=False
    bad = [f for f, v in present.items() if not np.all(np.isfinite(v))]
    # Sums of |x| are NaN only when some x was; +inf there, or anything non-finite in the
    # Hessian alone, with every |x| finite, is the sums overflowing.
    nan = np.isnan(present["abs_sum"]).any() or not np.all(np.isfinite(present["abs_max"]))
    if bad and not nan:
        largest = float(np.max(present["abs_max"], initial=0.0))
        raise ValueError(
            f"statistics[{name!r}] overflow float32 ({', '.join(bad)}): the activations at "
            f"this parameter's input are finite (largest |x| = {largest:.3g}), but their "
            "sums over the calibration rows are not; scale those activations down (or "
            "calibrate on fewer rows per capture), or keep the parameter float with a rule "
            f"like ({re.escape(name)!r}, None)"
        )
    if bad:
        raise ValueError(
            f"statistics[{name!r}] hold NaN or inf ({', '.join(bad)}): a calibration batch "
            "had non-finite activations at this parameter's input; drop those batches (or "
            "fix the model's overflow) and capture again, or keep the parameter float with "
            f"a rule like ({re.escape(name)!r}, None)"
        )


def _check_finite(name: str, leaf: Any) -> None:
    """Refuses a leaf with values that are not finite in float32, naming it."""
    x = np.asarray(leaf)
    bad = nonfinite_in_float32(x)
    if bad:
        beyond = " (float64 values beyond float32's range count too)" if x.itemsize > 4 else ""
        raise ValueError(
            f"parameter {name!r} (shape {x.shape}) has {bad} NaN or inf values in float32, "
            f"the precision quantization computes in{beyond}; fix or drop them, or keep this "
            f"leaf float with a rule like ({re.escape(name)!r}, None)"
        )
