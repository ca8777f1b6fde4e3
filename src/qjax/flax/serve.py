"""Serving QAT-trained Linen models: packed QArray weights and integer dots, same model code.

The step after quantization-aware training with :func:`qjax.flax.linen.intercept`:

1. :func:`convert` turns the trained float variables into a served tree: the weight of
   every layer a rule quantizes becomes a packed :class:`~qjax.QArray`; biases, other
   parameters and the calibrated ``quant_stats`` stay as they are.
2. :func:`serving` (or :func:`served`) runs the unmodified model on that tree. Where a
   layer reads a QArray weight:

   * by default (``integer_dots="as_trained"``) each layer computes what it computed in
     QAT, so the served model is bit-exact with the QAT eval model however deep it is:
     a layer trained with fake-quantized floats (``LayerQuant.integer_dot=False``, the
     default) dequantizes its weight where it is read (``fake_quant(w) ==
     dequantize(quantize(w))`` bit for bit) and runs the float dot; a layer trained with
     ``integer_dot=True`` runs the integer dot below, as its QAT forward did.
   * integer dots (``integer_dots="auto"`` / ``"require"``, or ``integer_dot=True``):
     integer weights and activations with zero point 0 (signed, symmetric, at most 8
     bits) whose scales factor out of the contraction: Dense, DenseGeneral and Conv run
     ``lax.dot_general`` / ``lax.conv_general_dilated`` on int8 codes with
     ``preferred_element_type=int32``, then multiply by activation scale x weight scale.
     For a layer trained with fake-quantized floats the result equals the QAT output up
     to float rounding only (QAT sums rounded float products; here the sum is exact and
     rounded once), and through many layers those last-bit differences can move the
     next layer's activation codes: that is why it is not the default.

:func:`dequantizing` is the other way to run a converted tree: any function that wants
float parameters (third-party wrappers such as transformers' ``FlaxBertModel(params=...)``)
gets them dequantized inside the function you jit.

How a layer is rerouted, without copying it: while it runs, the layer's variable scope
sits behind a thin proxy that returns the weight (dequantized, or its integer codes as
floats) where the layer reads it, and, on the integer path, the layer's ``dot_general``
or ``conv_general_dilated`` attribute is set to an integer version for the duration of
the call. The layer still does its own reshapes, padding and bias. Codes travel as
exact floats through the layer's dtype promotion; the integer dot casts them to int8
(XLA folds the int8 -> float -> int8 round trip of the weight away).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax import kernels
from qjax.flax._common import Rules, activation_qparams, rounded
from qjax.flax._integer import dense_contraction, dot_scale, spec_reason
from qjax.flax.linen import (
    STATS,
    WEIGHT_NAMES,
    ActQuant,
    FlaxRules,
    Layer,
    LayerQuant,
    call_equation,
    census,
    layer_rule,
    learned_input_qparams,
    learned_weight_qparams,
    quantized_call,
    swapped_attributes,
    tracking_calls,
    warn_detached,
    weight_name,
)
from qjax.ops import quantize
from qjax.qarray import QArray
from qjax.qparams import QParams
from qjax.spec import QuantSpec
from qjax.tree import dequantizing, path_str

__all__ = ["IntegerDots", "WeightOnly", "convert", "dequantizing", "served", "serving"]

WeightOnly = Literal["exact", "fast"]
"""How :func:`serving` runs a Dense layer with a quantized weight and no activation spec:
``"exact"`` (default) dequantizes the whole weight where it is read, as QAT's fake quant
did (bit-exact with the QAT / PTQ model through any depth); ``"fast"`` calls
:func:`qjax.kernels.matmul`, whose :func:`~qjax.kernels.choose_path` picks per call shape:
at decode sizes it dequantizes a chunk of input rows at a time into the dot, reading the
packed weight and never a float copy (several times faster; equal up to float rounding),
and where materialising a small weight once wins (long prefills) it does that."""
WEIGHT_ONLY = ("exact", "fast")

IntegerDots = Literal["as_trained", "auto", "require", "never"]
"""Where :func:`serving` uses integer dots: ``"as_trained"`` (default) where the rule says
``integer_dot=True``, as QAT did (bit-exact with the QAT model), ``"auto"`` wherever the
layer allows (else the weight is dequantized), ``"require"`` (refuse a layer with an
activation spec that cannot), ``"never"`` (always dequantize)."""

INTEGER_DOTS = ("as_trained", "auto", "require", "never")
WEIGHT_PARAMS = frozenset(WEIGHT_NAMES.values())
"""Names of the parameters a rule quantizes: ``kernel`` and ``embedding``."""


def convert(
    variables: Mapping[str, Any],
    rules: FlaxRules,
    model: nn.Module | None = None,
    *args: Any,
    strict: bool = False,
    method: Callable | str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Turns QAT-trained float variables into the tree :func:`serving` runs.

    With the ``model`` and example inputs (as for :func:`~qjax.flax.linen.plan`), each
    weight is read as QAT read it, from one abstract run of the model
    (:func:`~qjax.flax.linen.census`): the copies of a layer stacked by ``nn.scan`` /
    ``nn.vmap`` are quantized each on its own, a layer's configuration tells its layout
    (a DenseGeneral with several output axes, an Einsum, a ConvTranspose with
    ``transpose_kernel``), and the kernels of layers QAT leaves float (transformers'
    ``FlaxConv1D``, ``ConvLocal``) stay float. Without them, weights are read from their
    names alone (``kernel [..., in, out]``, attention projections, embeddings): enough for
    Dense, Conv, Embed and Flax attention, and :func:`serving` refuses a weight whose
    spec then differs from QAT's.

    Args:
      variables: the model's variables: ``params`` (float), and ``quant_stats`` where
        rules have static activation ranges (calibrate first: apply the model under
        :func:`~qjax.flax.linen.intercept` with ``mutable=["quant_stats"]``).
      rules: the rules the model was trained with, as for
        :func:`~qjax.flax.linen.intercept`: ``{regex: LayerQuant | QuantSpec | shorthand |
        None}`` (the rule language of :mod:`qjax.flax`). The weight of each matched
        layer, ``params/<module path>/kernel`` (or ``/embedding``), is quantized with its
        rule's weight spec.
      model: the Linen module QAT trained (for a transformers ``FlaxPreTrainedModel``, its
        ``.module``); None: read weights from their names.
      *args, **kwargs: example inputs for ``model.init`` (arrays or
        ``jax.ShapeDtypeStruct``); ``method`` as for ``init``.
      strict: a rule that matches no weight is a :class:`~qjax.resolve.QjaxRuleWarning`,
        or with ``strict=True`` a ``ValueError``.

    Returns:
      The same collections; in ``params`` each quantized weight is a
      :class:`~qjax.QArray` (sub-byte targets packed), everything else unchanged. Boxed
      parameters (``nn.Partitioned``) come back unboxed.

    Raises:
      ValueError: a weight to quantize holds NaN or inf or does not fit its rule's spec
        (naming its path and the rule), or a rule with static activation ranges has no
        calibrated ``quant_stats`` for its module.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from qjax.flax import serve
      >>> model = nn.Dense(64)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 128)))
      >>> served_vars = serve.convert(variables, {".*": "int4:per_block:32"})
      >>> kernel = served_vars["params"]["kernel"]
      >>> kernel.shape, kernel.packed, kernel.nbytes  # 4096 + 1024 bytes, not 32768
      ((128, 64), True, 5120)
    """
    compiled = Rules(rules)
    if "params" not in variables:
        raise ValueError(
            f"variables have no 'params' collection (got {sorted(variables)}); pass what "
            "model.init / training returned, e.g. {'params': ..., 'quant_stats': ...}"
        )
    params = nn.meta.unbox(variables["params"])
    layers = None
    if model is not None:
        layers, abstract = census(model, *args, method=method, **kwargs)
        _check_matches_model(abstract, params)

    def convert_leaf(path: tuple, leaf: Any) -> Any:
        name = path_str(path)
        module_path, _, leaf_name = name.rpartition("/")
        layer = Layer(None, np.shape(leaf)) if layers is None else layers.get(module_path)
        if layers is not None and (layer is None or weight_name(layer.module) != leaf_name):
            if layer is not None and weight_name(layer.module) is None and module_path:
                compiled.saw_other(module_path, type(layer.module).__name__)
            return leaf  # not a layer's weight: QAT leaves it float
        rule = compiled.find(module_path, leaf_name) if leaf_name in WEIGHT_PARAMS else None
        if rule is None or rule.quant is None or isinstance(leaf, QArray):
            return leaf
        _check_calibrated(variables, name, rule.quant)
        stack_axes = layer.stack_axes(np.shape(leaf))
        if stack_axes != tuple(range(len(stack_axes))):
            raise ValueError(
                f"params/{name} {np.shape(leaf)} stacks copies of its layer along axes "
                f"{stack_axes} (nn.scan / nn.vmap with variable_axes other than 0); a "
                "QArray stacks layers along leading axes only: stack the params along axis "
                f"0, or keep the layer float with the rule {re.escape(module_path)!r}: None"
            )
        one = layer.weight_shape if stack_axes else np.shape(leaf)
        spec = rule.weight_spec(name, one, layer.module, layer.equation)
        if spec is None:
            return leaf
        qparams = None
        if rule.quant.learn_scale:  # LSQ: the scales QAT learned, not fresh ones
            qparams = learned_weight_qparams(params, module_path, leaf_name, spec)
        return _quantize_weight(leaf, spec, f"params/{name}", rule.pattern, qparams, stack_axes)

    converted = jax.tree_util.tree_map_with_path(convert_leaf, params, is_leaf=_is_qarray)
    compiled.check(strict=strict, where="qjax.flax.serve.convert")
    return {**variables, "params": converted}


def _check_matches_model(abstract: Any, params: Any) -> None:
    """Refuses params that are not the ``model``'s: every weight would stay float."""

    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qarray)[0]
        return {path_str(keys): tuple(np.shape(leaf)) for keys, leaf in flat}

    expected, got = shapes(abstract), shapes(params)
    missing = [name for name in expected if name not in got]
    differ = [name for name in expected if name in got and got[name] != expected[name]]
    if not missing and not differ:
        return
    if missing:
        example = next(iter(got), None)
        found = f"the variables have e.g. params/{example}" if example else "params is empty"
        problem = f"{len(missing)} of its params are missing, e.g. params/{missing[0]} ({found})"
    else:
        name = differ[0]
        problem = (
            f"{len(differ)} of its params differ in shape, e.g. params/{name}: "
            f"{got[name]} in the variables, {expected[name]} from the model"
        )
    raise ValueError(
        f"serve.convert: the variables do not fit the model run on the example inputs: "
        f"{problem}. Pass the model the variables were trained with (for a transformers "
        "model, its .module) and example inputs of the shapes it was trained on"
    )


@contextlib.contextmanager
def serving(
    rules: FlaxRules,
    *,
    integer_dots: IntegerDots = "as_trained",
    weight_only: WeightOnly = "exact",
    strict: bool = False,
) -> Iterator[None]:
    """Runs an unmodified Linen model on the tree :func:`convert` made, while active.

    Args:
      rules: the same rules as for :func:`convert` and QAT. The weight specs must match
        the QArrays' (they are checked); the activation specs say how each layer's input
        is quantized.
      integer_dots: ``"as_trained"`` (default): integer dots exactly where the rule has
        ``integer_dot=True`` (a ``ValueError`` if such a layer cannot use one), dequantized
        weights elsewhere: each layer computes what QAT computed, so the output is
        bit-exact with the QAT model's. ``"auto"``: integer dots wherever the layer and
        specs allow (equal to fake-quant QAT up to float rounding per layer), dequantized
        weights elsewhere; ``"require"``: as ``"auto"``, and a layer whose rule has an
        activation spec and that cannot use an integer dot is a ``ValueError`` saying
        why; ``"never"``: dequantize every weight.
      weight_only: ``"exact"`` (default) or ``"fast"``: how a Dense layer with a
        quantized weight and no activation spec runs (see :data:`WeightOnly`).
      strict: a rule that quantized no layer while the context was active (checked on
        exit, as :func:`~qjax.flax.linen.intercept` does) is a
        :class:`~qjax.resolve.QjaxRuleWarning`, or with ``strict=True`` a ``ValueError``.

    An integer dot needs: a Dense, DenseGeneral (no ``batch_dims``) or Conv (no
    ``mask``); weight and activation specs with signed integer targets of at most 8 bits
    and zero point 0 (``symmetric`` or ``symmetric_with_clipping``, formulation
    ``scale`` or ``zero_point``); scales constant along the contracted axes: weights per
    tensor or per output channel (``per_channel(-1)``); activations per tensor (dynamic or
    static), or per token (dynamic) for Dense / DenseGeneral. With ``"auto"`` and
    ``"require"``, a ``nn.Dense`` with a 2-D weight runs through
    :func:`qjax.kernels.matmul`'s integer paths wherever its ``"int8_dot"`` path can
    (formulation ``scale``, activations per tensor or per token), taking ``"int8_dot"``
    or ``"bf16_dot"`` (the same integer sums) as :func:`qjax.kernels.choose_path` says
    for the rows: they also take weights whose scales vary along the input axis
    (``per_block(-2, B)``, e.g. W4A8 with int4 blocks: one integer partial sum per
    block, scaled by that block's weight scales), and contract the weight a chunk at a
    time. Its result equals the QAT
    model's up to float rounding; a layer trained with ``integer_dot=True`` keeps QAT's
    own integer dot, bit for bit.

    Enter the context inside the function you jit, or wrap it with :func:`served`: Linen's
    interceptors are Python state that JAX's jit cache does not see.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, qjax
      >>> from qjax.flax import linen as qlinen, serve
      >>> model, x = nn.Dense(8), jnp.linspace(-1.0, 1.0, 32).reshape(2, 16)
      >>> variables = model.init(jax.random.key(0), x)
      >>> rules = {".*": qlinen.LayerQuant(
      ...     weight=qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)),
      ...     act=qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token())))}
      >>> with qlinen.intercept(rules):  # the QAT model, float weights
      ...     y_qat = model.apply(variables, x)
      >>> served_vars = serve.convert(variables, rules)
      >>> @jax.jit
      ... def serve_apply(variables, x):
      ...     with serve.serving(rules, integer_dots="require"):  # int8 x int8 -> int32
      ...         return model.apply(variables, x)
      >>> bool(np.allclose(serve_apply(served_vars, x), y_qat, rtol=1e-5, atol=1e-6))
      True
    """
    _check_options(integer_dots, weight_only)
    compiled = Rules(rules)
    with nn.intercept_methods(_interceptor(compiled, integer_dots, weight_only)):
        yield
    compiled.check(strict=strict, where="qjax.flax.serve.serving", stacklevel=3)


def served(
    fn: Callable,
    rules: FlaxRules,
    *,
    integer_dots: IntegerDots = "as_trained",
    weight_only: WeightOnly = "exact",
    strict: bool = False,
) -> Callable:
    """``fn`` run inside :func:`serving` ``(rules)``: a new function, safe to ``jax.jit``.

    The wrapper is a different function from ``fn`` (and from
    :func:`~qjax.flax.linen.intercepted`'s), so jitting each gives its own cache entry:
    the float, QAT and served versions never replay each other's trace.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
      >>> from qjax.flax import linen as qlinen, serve
      >>> model, x = nn.Dense(4), jnp.ones((1, 8))
      >>> variables = model.init(jax.random.key(0), x)
      >>> rules = {".*": "int4:per_channel"}  # weight only: bit-exact with QAT
      >>> qat = jax.jit(qlinen.intercepted(model.apply, rules))(variables, x)
      >>> out = jax.jit(serve.served(model.apply, rules))(serve.convert(variables, rules), x)
      >>> bool(np.array_equal(out, qat))
      True
    """
    _check_options(integer_dots, weight_only)
    Rules(rules)  # invalid rules fail here, not at the first call

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with serving(rules, integer_dots=integer_dots, weight_only=weight_only, strict=strict):
            return fn(*args, **kwargs)

    return wrapper


def _check_options(integer_dots: Any, weight_only: Any) -> None:
    if integer_dots not in INTEGER_DOTS:
        raise ValueError(f"integer_dots must be one of {INTEGER_DOTS}, got {integer_dots!r}")
    if weight_only not in WEIGHT_ONLY:
        raise ValueError(f"weight_only must be one of {WEIGHT_ONLY}, got {weight_only!r}")


# Rules and the converted tree -------------------------------------------------------------


def _quantize_weight(
    leaf: Any,
    spec: QuantSpec,
    name: str,
    rule: str,
    qparams: QParams | None = None,
    stack_axes: tuple[int, ...] = (),
) -> QArray:
    """``leaf`` quantized with ``spec``; with leading ``stack_axes`` (copies of a layer
    stacked by ``nn.scan`` / ``nn.vmap``, learned scales stacked alike), each copy on its
    own, as QAT saw it."""
    if not isinstance(leaf, jax.core.Tracer):
        bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
        if bad:
            raise ValueError(
                f"{name} (shape {tuple(np.shape(leaf))}) has {bad} NaN or inf values; the "
                "QAT model produced them: fix training, or keep the layer float with a "
                "rule mapping its module path to None"
            )

    def one(x: jax.Array, qparams: QParams | None) -> QArray:
        return quantize(x, spec, qparams=qparams)

    for _ in stack_axes:  # leading axes
        one = jax.vmap(one)
    try:
        return one(leaf, qparams)
    except (ValueError, TypeError) as e:
        module_path = name.removeprefix("params/").rpartition("/")[0]
        raise type(e)(
            f"rule {rule!r} reaches {name} {tuple(np.shape(leaf))}, which it cannot quantize: "
            f"{e}. Give that layer its own rule before {rule!r}: a spec that fits, or "
            f"{{{re.escape(module_path)!r}: None}} to keep it float"
        ) from None


def _check_calibrated(variables: Mapping[str, Any], param_path: str, quant: LayerQuant) -> None:
    """A kernel's module with static activation ranges needs its ``quant_stats`` entry."""
    module_path, _, leaf = param_path.rpartition("/")
    if leaf != "kernel" or quant.act is None or not quant.act.static or quant.learn_scale:
        return
    node: Any = variables.get(STATS, {})
    for key in module_path.split("/") if module_path else ():
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
    if not (isinstance(node, Mapping) and "act_min" in node and "act_max" in node):
        raise ValueError(
            f"the rule for module {module_path!r} has static activation ranges, but the "
            f"variables hold no {STATS}/{module_path}/act_min: calibrate first, e.g. "
            f"`_, stats = model.apply(variables, x, mutable=[{STATS!r}])` inside "
            "linen.intercept(rules), then convert({**variables, **stats}, rules)"
        )


def _param_name(module_path: str, name: str) -> str:
    """``params/<module path>/<name>``, as the parameter sits in the variables."""
    return "/".join(part for part in ("params", module_path, name) if part)


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


# The interceptor --------------------------------------------------------------------------


def _interceptor(compiled: Rules, integer_dots: IntegerDots, weight_only: WeightOnly) -> Callable:
    @tracking_calls
    def intercept_method(next_fun, args, kwargs, context, detached):
        module = context.module
        name = weight_name(module)
        if context.method_name not in ("__call__", "setup"):
            return next_fun(*args, **kwargs)
        if detached:  # float, as in QAT (see qjax.flax.linen.tracking_calls)
            warn_detached(module, compiled, context.method_name)
            return next_fun(*args, **kwargs)
        if name is None:
            _refuse_unknown_qarray(module)
            if context.method_name == "__call__" and module.path:
                compiled.saw_other("/".join(module.path), type(module).__name__)
            return next_fun(*args, **kwargs)
        quant, rule = layer_rule(module, compiled, context.method_name) or (None, None)
        stored = module.scope.get_variable("params", name)
        if stored is None:  # init: nothing converted yet, so behave as QAT does
            if quant is None:
                return next_fun(*args, **kwargs)
            return quantized_call(module, next_fun, args, kwargs, quant, rule)
        path, equation = "/".join(module.path), call_equation(module, args, kwargs)
        shape = np.shape(stored)
        spec = None if rule is None else rule.weight_spec(f"{path}/{name}", shape, module, equation)
        _check_stored(_param_name(path, name), spec, stored)
        if quant is None:
            return next_fun(*args, **kwargs)
        return _served_call(
            module, next_fun, args, kwargs, quant, stored, integer_dots, weight_only
        )

    return intercept_method


def _refuse_unknown_qarray(module: nn.Module) -> None:
    scope = getattr(module, "scope", None)
    for name in sorted(WEIGHT_PARAMS):
        if scope is not None and isinstance(scope.get_variable("params", name), QArray):
            path = "/".join(module.path)
            layers = ", ".join(sorted(cls.__name__ for cls in WEIGHT_NAMES))
            raise ValueError(
                f"{_param_name(path, name)} is a QArray, but {type(module).__name__} is not a "
                f"layer qjax quantizes ({layers}), so QAT left it float: add the rule "
                f"{re.escape(path)!r}: None before the one that matched it, and convert "
                "the float variables again"
            )


def _check_stored(name: str, spec: QuantSpec | None, stored: Any) -> None:
    if isinstance(stored, QArray):
        if spec is None:
            raise ValueError(
                f"{name} is a QArray ({stored.spec}), but no rule quantizes it; serve "
                "with the rules that convert used"
            )
        if stored.spec != spec:
            raise ValueError(
                f"{name} was converted with {stored.spec}, but the rules give {spec} for "
                "its layer; serve with the rules that convert used, and pass the model to "
                "convert (convert(variables, rules, model, *example_inputs)) so that it "
                "reads each layer as QAT did"
            )
    elif spec is not None:
        raise ValueError(
            f"{name} is a float array, but the rules quantize it with {spec}: serve the "
            "tree that convert(variables, rules) returns, not the float variables"
        )


def _served_call(
    module: nn.Module,
    fun: Callable,
    args: tuple,
    kwargs: dict,
    quant: LayerQuant,
    weight: Any,
    integer_dots: IntegerDots,
    weight_only: WeightOnly = "exact",
) -> Any:
    """Runs one quantized layer: integer dot where planned, else dequantize on the fly."""
    name = weight_name(module)
    act = quant.act
    read_float = _dequantized
    if isinstance(weight, QArray) and weight.channel_scale is not None:
        # (x * m) @ core == x @ (m * core): the activation is quantized after the scaling
        # (SmoothQuant), and the weight is read without it.
        args = (_scaled_input(module, args, weight), *args[1:])
        read_float = _dequantized_core
    required = integer_dots == "require" or (integer_dots == "as_trained" and quant.integer_dot)
    qat_dot = quant.integer_dot or integer_dots == "as_trained"
    if act is not None and (required or integer_dots == "auto"):
        if isinstance(weight, QArray):
            plan = _integer_plan(
                module, args, act, weight, as_trained=qat_dot, learned=quant.learn_scale
            )
        else:
            plan = "its rule has no weight spec, so the weight stays float"
        if callable(plan):
            return plan(fun, args, kwargs)
        if required:
            raise ValueError(
                f"layer {'/'.join(module.path)!r} ({type(module).__name__}) cannot use an "
                f"integer dot (integer_dots={integer_dots!r}, integer_dot="
                f"{quant.integer_dot}): {plan}. Change its rule accordingly, or serve with "
                "integer_dots='never' to dequantize its weight on the fly"
            )
    if isinstance(weight, QArray) and act is None and weight_only == "fast":
        if isinstance(module, nn.Dense) and weight.ndim == 2:
            core = dataclasses.replace(weight, channel_scale=None)
            return _kernel_call(module, fun, args, kwargs, core)
    if isinstance(weight, QArray):
        with _weight_read(module, name, read_float):
            act_only = LayerQuant(act=act, learn_scale=quant.learn_scale and act is not None)
            return quantized_call(module, fun, args, kwargs, act_only)
    return quantized_call(module, fun, args, kwargs, quant)


# Reading the weight -----------------------------------------------------------------------


class _ServingScope:
    """Forwards everything to a Linen scope, serving one QArray parameter as it is read."""

    def __init__(self, scope: Any, name: str, read: Callable[[QArray], jax.Array]):
        self._scope, self._name, self._read = scope, name, read

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._scope, attr)

    def param(self, name: str, init_fn: Callable, *args: Any, unbox: bool = True, **kw: Any):
        stored = self._scope.get_variable("params", name) if name == self._name else None
        if not isinstance(stored, QArray):
            return self._scope.param(name, init_fn, *args, unbox=unbox, **kw)
        self._scope.reserve(name, "params")
        expected = nn.meta.unbox(jax.eval_shape(lambda: init_fn(jax.random.key(0), *args, **kw)))
        if tuple(expected.shape) != stored.shape:
            raise ValueError(
                f"{_param_name(self._scope.path_text.strip('/'), name)} has shape {stored.shape}, "
                f"but the module expects {tuple(expected.shape)}: the variables belong to "
                "a different model configuration"
            )
        return self._read(stored)


def _weight_read(module: nn.Module, name: str, read: Callable[[QArray], jax.Array]):
    """While active, the module reads its stored QArray weight ``name`` through ``read``."""
    return swapped_attributes(module, {"scope": _ServingScope(module.scope, name, read)})


def _dequantized(leaf: Any) -> Any:
    """A QArray's values as the QAT model's fake-quantized weight (bit for bit), else
    ``leaf``."""
    return rounded(leaf.dequantize()) if isinstance(leaf, QArray) else leaf


def _dequantized_core(leaf: QArray) -> jax.Array:
    """The weight without its channel scale, which the layer's input then carries."""
    return _dequantized(dataclasses.replace(leaf, channel_scale=None))


def _scaled_input(module: nn.Module, args: tuple, weight: QArray) -> jax.Array:
    """The layer's input times the weight's channel scale (one per input feature)."""
    path = "/".join(module.path)
    if not args or not hasattr(args[0], "shape"):
        raise ValueError(f"layer {path!r}: its weight has channel scales but no input array")
    x = args[0]
    axes = 1
    if isinstance(module, nn.DenseGeneral):
        given = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        axes = len(given)
        if sorted(a % x.ndim for a in given) != list(range(x.ndim - axes, x.ndim)):
            axes = 0
    elif not isinstance(module, nn.Dense | nn.Conv):
        axes = 0
    features = x.shape[x.ndim - axes :] if axes else None
    if features is None or math.prod(features) != weight.channel_scale.size:
        raise ValueError(
            f"layer {path!r} ({type(module).__name__}): its weight has channel scales "
            f"(shape {tuple(weight.channel_scale.shape)}), which serving applies to the "
            "trailing input features of Dense, DenseGeneral and Conv layers only; fold them "
            "into the op before with qjax.fold_channel_scales, or run the model through "
            "qjax.dequantizing"
        )
    m = weight.channel_scale.astype(jnp.float32).reshape((1,) * (x.ndim - axes) + features)
    return (x.astype(jnp.float32) * m).astype(x.dtype)


def _placeholder(weight: QArray) -> jax.Array:
    """What the layer reads as its weight when a kernel computes the product from the
    QArray itself: a broadcast zero that no op uses, so XLA drops it."""
    return jnp.zeros(weight.shape, weight.float_dtype)


def _kernel_dot_general(
    weight: QArray, act: QuantSpec | None = None, act_qparams: QParams | None = None
) -> Callable:
    """A Dense layer's ``dot_general`` computed by :func:`qjax.kernels.matmul`: weight-only
    (``act`` None, the path :func:`~qjax.kernels.choose_path` picks) or, with ``act``, on
    the input quantized with ``act_qparams`` through an integer path (``"int8_dot"`` or
    ``"bf16_dot"``, whichever is faster for the rows: the same exact integer sums)."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        del rhs, precision, kw  # the product comes from the QArray
        (lhs_contract, rhs_contract), batch = dimension_numbers
        if tuple(rhs_contract) != (0,) or tuple(lhs_contract) != (lhs.ndim - 1,) or any(batch):
            raise RuntimeError(f"expected a Dense contraction, got {dimension_numbers}")
        if act is None:
            out = kernels.matmul(lhs, weight)
        else:
            xq = quantize(lhs, act, qparams=act_qparams, packed=False)
            path = kernels.choose_path(weight, act, math.prod(lhs.shape[:-1]))
            integer = path if path in ("int8_dot", "bf16_dot") else "int8_dot"  # same sums
            out = kernels.matmul(xq, weight, path=integer).astype(lhs.dtype)
        return out if preferred_element_type is None else out.astype(preferred_element_type)

    return dot_general


def _codes_as_float(weight: QArray) -> jax.Array:
    """The integer codes as exact floats, which the layer's dtype promotion leaves alone."""
    codes = weight.codes() if weight.packed else weight.data
    return codes.astype(weight.float_dtype)


# The integer path -------------------------------------------------------------------------


def _integer_plan(
    module: nn.Module,
    args: tuple,
    act: ActQuant,
    weight: QArray,
    as_trained: bool,
    learned: bool = False,
) -> Callable[[Callable, tuple, dict], Any] | str:
    """How to run the layer on an integer dot (a function of the layer's ``fun, args,
    kwargs``), or why it cannot.

    ``as_trained``: the dot QAT's ``integer_dot=True`` ran (bit-exact with it); else a 2-D
    Dense kernel goes through :func:`qjax.kernels.matmul`'s integer paths wherever its
    ``"int8_dot"`` path runs the specs (the same integer sums, and faster)."""
    reason = spec_reason("activation", act.spec) or spec_reason("weight", weight.spec)
    if reason:
        return reason
    if not args or not jnp.issubdtype(jnp.asarray(args[0]).dtype, jnp.floating):
        return "its input is not a floating-point array"
    x = args[0]
    if isinstance(module, nn.Dense | nn.DenseGeneral):
        contracted = dense_contraction(module, x.ndim)
        if isinstance(contracted, str):
            return contracted
        qparams = _activation_qparams(module, x, act, learned)
        kernel = None if as_trained else _kernel_integer_plan(module, weight, act, qparams)
        scale = dot_scale(qparams.scale, weight.scale, *contracted)
        if kernel is not None or isinstance(scale, str):
            return kernel or scale
        hooks = {"dot_general": _integer_dot_general(scale), "dot_general_cls": None}
        return _codes_plan(module, act, qparams, hooks)
    if isinstance(module, nn.Conv):
        if module.mask is not None:
            return "a Conv with a mask multiplies the kernel by arbitrary floats"
        qparams = _activation_qparams(module, x, act, learned)
        scale = _conv_scale(qparams.scale, weight.scale)
        if isinstance(scale, str):
            return scale
        hooks = {"conv_general_dilated": _integer_conv(scale), "conv_general_dilated_cls": None}
        return _codes_plan(module, act, qparams, hooks)
    return f"integer dots are wired for Dense, DenseGeneral and Conv, not {type(module).__name__}"


def _codes_plan(
    module: nn.Module, act: ActQuant, qparams: QParams, hooks: dict[str, Any]
) -> Callable:
    """Runs the layer on the activation's integer codes (as exact floats) and the weight's,
    with ``hooks`` (an integer ``dot_general`` / ``conv_general_dilated``) swapped in."""
    name = weight_name(module)

    def run(fun: Callable, args: tuple, kwargs: dict) -> Any:
        codes = quantize(args[0], act.spec, qparams=qparams, packed=False).codes()
        with _weight_read(module, name, _codes_as_float), swapped_attributes(module, hooks):
            return fun(codes.astype(args[0].dtype), *args[1:], **kwargs)

    return run


def _kernel_integer_plan(
    module: nn.Module, weight: QArray, act: ActQuant, qparams: QParams
) -> Callable | None:
    """W8A8 / W4A8 on a 2-D Dense kernel (any weight scales, per-block too): the layer's
    product from :func:`qjax.kernels.matmul`'s ``"int8_dot"`` path, or None where it
    cannot run."""
    core = dataclasses.replace(weight, channel_scale=None)
    if not isinstance(module, nn.Dense) or weight.ndim != 2:
        return None
    if kernels.why_not("int8_dot", core, act.spec) is not None:
        return None

    def run(fun: Callable, args: tuple, kwargs: dict) -> Any:
        return _kernel_call(module, fun, args, kwargs, core, act.spec, qparams)

    return run


def _kernel_call(
    module: nn.Module,
    fun: Callable,
    args: tuple,
    kwargs: dict,
    weight: QArray,
    act: QuantSpec | None = None,
    act_qparams: QParams | None = None,
) -> Any:
    """Runs a Dense layer with its product computed by :func:`qjax.kernels.matmul` from the
    QArray ``weight`` (no channel scale), the input quantized with ``act`` if given."""
    hooks = {"dot_general": _kernel_dot_general(weight, act, act_qparams), "dot_general_cls": None}
    with _weight_read(module, weight_name(module), _placeholder), swapped_attributes(module, hooks):
        return fun(*args, **kwargs)


def _conv_scale(act_scale: jax.Array, weight_scale: jax.Array) -> jax.Array | str:
    """Activation scale x weight scale per output feature, shape ``(features,)``."""
    if act_scale.size != 1:
        return (
            f"the activation scales (shape {tuple(act_scale.shape)}) are not per tensor, "
            "and a convolution sums over pixels and channels; use per_tensor activations"
        )
    if math.prod(weight_scale.shape[:-1]) != 1:
        return (
            f"the weight scales (shape {tuple(weight_scale.shape)}) vary along the "
            "contracted axes; use per_channel(-1) or per_tensor weights"
        )
    sw = weight_scale.astype(jnp.float32).reshape(-1)
    return act_scale.astype(jnp.float32).reshape(()) * sw


def _activation_qparams(
    module: nn.Module, x: jax.Array, act: ActQuant, learned: bool = False
) -> QParams:
    """The activation's params, as :func:`qjax.flax.linen.intercept` computes them.

    Learned (LSQ): the layer's ``input_scale`` / ``input_offset`` params. Dynamic: from
    ``x``. Static: from the calibrated ``quant_stats`` range (frozen: never updated here);
    an uncalibrated (infinite) range falls back to ``x``'s, as in QAT.
    """
    if learned:
        return learned_input_qparams(module, x, act)
    if not act.static:
        return activation_qparams(x, act, None, calibrating=False)[0]
    act_min, act_max = (module.get_variable(STATS, name) for name in ("act_min", "act_max"))
    if act_min is None or act_max is None:
        path = "/".join(module.path)
        raise ValueError(
            f"layer {path!r} has static activation ranges but the variables hold no "
            f"{STATS}/{path}/act_min: pass the calibrated {STATS!r} collection along with "
            "the converted params"
        )
    return activation_qparams(x, act, (act_min, act_max), calibrating=False)[0]


def _as_int8(x: jax.Array) -> jax.Array:
    """Codes held as exact floats (or int4 / int2 ones) as int8: the dot's operand type."""
    return x.astype(jnp.int8)


def _integer_dot_general(scale: jax.Array) -> Callable:
    """A ``dot_general`` for the layer: int8 x int8 -> int32, then times ``scale``."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        del precision, preferred_element_type  # an integer dot is exact
        acc = jax.lax.dot_general(
            _as_int8(lhs), _as_int8(rhs), dimension_numbers, preferred_element_type=jnp.int32, **kw
        )
        if acc.ndim != scale.ndim:
            raise RuntimeError(f"dot output {acc.shape} does not match scales {scale.shape}")
        return rounded(acc.astype(jnp.float32) * scale).astype(lhs.dtype)

    return dot_general


def _integer_conv(scale: jax.Array) -> Callable:
    """A ``conv_general_dilated`` for the layer: int8 x int8 -> int32, then times ``scale``
    (one per output feature)."""

    def conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
    ):
        del precision, preferred_element_type  # an integer convolution is exact
        dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if dn.rhs_spec[0] != rhs.ndim - 1:
            raise RuntimeError(f"expected the kernel's output features last, got {dn}")
        acc = jax.lax.conv_general_dilated(
            _as_int8(lhs),
            _as_int8(rhs),
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dn,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            preferred_element_type=jnp.int32,
        )
        shape = [1] * acc.ndim
        shape[dn.out_spec[1]] = scale.shape[0]
        return rounded(acc.astype(jnp.float32) * scale.reshape(shape)).astype(lhs.dtype)

    return conv_general_dilated
