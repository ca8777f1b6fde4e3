"""Serving QAT-trained Linen models: packed QArray weights and integer dots, same model code.

The step after quantization-aware training with :func:`qjax.flax.linen.intercept`:

1. :func:`convert` turns the trained float variables into a served tree: the weight of
   every layer a rule quantizes becomes a packed :class:`~qjax.QArray`; biases, other
   parameters and the calibrated ``quant_stats`` stay as they are.
2. :func:`serving` (or :func:`served`) runs the unmodified model on that tree. Where a
   layer reads a QArray weight:

   * weight only (no activation spec), or a combination integer dots cannot express:
     the weight is dequantized where it is read. That is bit-exact with the QAT model,
     because ``fake_quant(w) == dequantize(quantize(w))`` bit for bit.
   * integer weights and activations with zero point 0 (signed, symmetric, at most 8
     bits) whose scales factor out of the contraction: Dense, DenseGeneral and Conv run
     ``lax.dot_general`` / ``lax.conv_general_dilated`` on int8 codes with
     ``preferred_element_type=int32``, then multiply by activation scale x weight scale.
     The result equals the fake-quant QAT output up to float rounding (the QAT model
     sums rounded float products; here the sum is exact and rounded once).

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
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax.flax._common import activation_qparams, compile_rules
from qjax.flax._integer import dense_contraction, dot_scale, spec_reason
from qjax.flax.linen import (
    STATS,
    WEIGHT_NAMES,
    ActQuant,
    LayerQuant,
    RuleValue,
    quantized_call,
    swapped_attributes,
    weight_name,
)
from qjax.ops import quantize
from qjax.qarray import QArray
from qjax.qparams import QParams
from qjax.spec import QuantSpec
from qjax.tree import path_str

__all__ = ["IntegerDots", "convert", "served", "serving"]

IntegerDots = Literal["auto", "require", "never"]
"""Where :func:`serving` uses integer dots: ``"auto"`` where the layer allows (else the
weight is dequantized), ``"require"`` (refuse a layer with an activation spec that cannot),
``"never"`` (always dequantize: bit-exact with the QAT model everywhere)."""

INTEGER_DOTS = ("auto", "require", "never")
WEIGHT_PARAMS = frozenset(WEIGHT_NAMES.values())
"""Names of the parameters a rule quantizes: ``kernel`` and ``embedding``."""

Compiled = list[tuple[Callable[[str], Any], Union[LayerQuant, None]]]


def convert(variables: Mapping[str, Any], rules: Mapping[str, RuleValue]) -> dict[str, Any]:
    """Turns QAT-trained float variables into the tree :func:`serving` runs.

    Args:
      variables: the model's variables: ``params`` (float), and ``quant_stats`` where
        rules have static activation ranges (calibrate first: apply the model under
        :func:`~qjax.flax.linen.intercept` with ``mutable=["quant_stats"]``).
      rules: the rules the model was trained with, as for
        :func:`~qjax.flax.linen.intercept`: ``{regex: LayerQuant | QuantSpec | shorthand |
        None}``, first match wins, ``re.fullmatch`` on the module path. The weight of a
        module, ``params/<module path>/kernel`` (or ``/embedding``), is quantized with its
        rule's weight spec.

    Returns:
      The same collections; in ``params`` each quantized weight is a
      :class:`~qjax.QArray` (sub-byte targets packed), everything else unchanged. Boxed
      parameters (``nn.Partitioned``) come back unboxed.

    Raises:
      ValueError: a weight to quantize holds NaN or inf, or a rule with static activation
        ranges has no calibrated ``quant_stats`` for its module.

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
    compiled = _compile(rules)
    if "params" not in variables:
        raise ValueError(
            f"variables have no 'params' collection (got {sorted(variables)}); pass what "
            "model.init / training returned, e.g. {'params': ..., 'quant_stats': ...}"
        )
    params = nn.meta.unbox(variables["params"])

    def convert_leaf(path: tuple, leaf: Any) -> Any:
        name = path_str(path)
        quant = _weight_rule(compiled, name)
        if quant is None or isinstance(leaf, QArray):
            return leaf
        _check_calibrated(variables, name, quant)
        if quant.weight is None:
            return leaf
        return _quantize_weight(leaf, quant.weight, f"params/{name}")

    converted = jax.tree_util.tree_map_with_path(convert_leaf, params, is_leaf=_is_qarray)
    return {**variables, "params": converted}


@contextlib.contextmanager
def serving(
    rules: Mapping[str, RuleValue], *, integer_dots: IntegerDots = "auto"
) -> Iterator[None]:
    """Runs an unmodified Linen model on the tree :func:`convert` made, while active.

    Args:
      rules: the same rules as for :func:`convert` and QAT. The weight specs must match
        the QArrays' (they are checked); the activation specs say how each layer's input
        is quantized.
      integer_dots: ``"auto"`` (default): integer dots where the layer and specs allow,
        dequantized weights elsewhere; ``"require"``: a layer whose rule has an
        activation spec and that cannot use an integer dot is a ``ValueError`` saying
        why; ``"never"``: dequantize every weight (bit-exact with QAT).

    An integer dot needs: a Dense, DenseGeneral (no ``batch_dims``) or Conv (no
    ``mask``); weight and activation specs with signed integer targets of at most 8 bits
    and zero point 0 (``symmetric`` or ``symmetric_with_clipping``, formulation
    ``scale`` or ``zero_point``); scales constant along the contracted axes: weights per
    tensor or per output channel (``per_channel(-1)``); activations per tensor (dynamic or
    static), or per token (dynamic) for Dense / DenseGeneral.

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
    _check_integer_dots(integer_dots)
    with nn.intercept_methods(_interceptor(_compile(rules), integer_dots)):
        yield


def served(
    fn: Callable, rules: Mapping[str, RuleValue], *, integer_dots: IntegerDots = "auto"
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
    _check_integer_dots(integer_dots)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with serving(rules, integer_dots=integer_dots):
            return fn(*args, **kwargs)

    return wrapper


def _check_integer_dots(integer_dots: Any) -> None:
    if integer_dots not in INTEGER_DOTS:
        raise ValueError(f"integer_dots must be one of {INTEGER_DOTS}, got {integer_dots!r}")


# Rules and the converted tree -------------------------------------------------------------


def _compile(rules: Mapping[str, RuleValue]) -> Compiled:
    return [(match, quant) for match, quant, _ in compile_rules(rules)]


def _match(compiled: Compiled, module_path: str) -> LayerQuant | None:
    return next((quant for match, quant in compiled if match(module_path)), None)


def _weight_rule(compiled: Compiled, param_path: str) -> LayerQuant | None:
    """The rule of the module owning ``param_path`` if it is a weight (kernel, embedding)."""
    module_path, _, leaf = param_path.rpartition("/")
    return _match(compiled, module_path) if leaf in WEIGHT_PARAMS else None


def _quantize_weight(leaf: Any, spec: QuantSpec, name: str) -> QArray:
    if not isinstance(leaf, jax.core.Tracer):
        bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
        if bad:
            raise ValueError(
                f"{name} (shape {tuple(np.shape(leaf))}) has {bad} NaN or inf values; the "
                "QAT model produced them: fix training, or keep the layer float with a "
                "rule mapping its module path to None"
            )
    try:
        return quantize(leaf, spec)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name}: {e}") from None


def _check_calibrated(variables: Mapping[str, Any], param_path: str, quant: LayerQuant) -> None:
    """A kernel's module with static activation ranges needs its ``quant_stats`` entry."""
    module_path, _, leaf = param_path.rpartition("/")
    if leaf != "kernel" or quant.act is None or not quant.act.static:
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


def _interceptor(compiled: Compiled, integer_dots: IntegerDots) -> Callable:
    def intercept_method(next_fun, args, kwargs, context):
        module = context.module
        name = weight_name(module)
        if context.method_name not in ("__call__", "setup"):
            return next_fun(*args, **kwargs)
        if name is None:
            _refuse_unknown_qarray(module)
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        quant = _match(compiled, path)
        stored = module.scope.get_variable("params", name)
        if stored is None:  # init: nothing converted yet, so behave as QAT does
            if quant is None:
                return next_fun(*args, **kwargs)
            return quantized_call(module, next_fun, args, kwargs, quant)
        _check_stored(_param_name(path, name), quant, stored)
        if quant is None:
            return next_fun(*args, **kwargs)
        if context.method_name == "setup" or isinstance(module, nn.Embed):
            quant = LayerQuant(weight=quant.weight)  # setup / integer ids: weights only
        return _served_call(module, next_fun, args, kwargs, quant, stored, integer_dots)

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


def _check_stored(name: str, quant: LayerQuant | None, stored: Any) -> None:
    spec = None if quant is None else quant.weight
    if isinstance(stored, QArray):
        if spec is None:
            raise ValueError(
                f"{name} is a QArray ({stored.spec}), but no rule quantizes it; serve "
                "with the rules that convert used"
            )
        if stored.spec != spec:
            raise ValueError(
                f"{name} was converted with {stored.spec}, but the rules give {spec}; "
                "serve with the rules that convert used"
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
) -> Any:
    """Runs one quantized layer: integer dot where planned, else dequantize on the fly."""
    name = weight_name(module)
    act = quant.act
    if act is not None and integer_dots != "never":
        if isinstance(weight, QArray):
            plan = _integer_plan(module, args, act, weight)
        else:
            plan = "its rule has no weight spec, so the weight stays float"
        if not isinstance(plan, str):
            qparams, hooks = plan
            codes = quantize(args[0], act.spec, qparams=qparams, packed=False).codes()
            with _weight_read(module, name, _codes_as_float), swapped_attributes(module, hooks):
                return fun(codes.astype(args[0].dtype), *args[1:], **kwargs)
        if integer_dots == "require":
            raise ValueError(
                f"layer {'/'.join(module.path)!r} ({type(module).__name__}) cannot use an "
                f"integer dot: {plan}. Change its rule accordingly, or serve with "
                "integer_dots='auto' to dequantize its weight on the fly (float dot, "
                "bit-exact with QAT)"
            )
    if isinstance(weight, QArray):
        with _weight_read(module, name, QArray.dequantize):
            return quantized_call(module, fun, args, kwargs, LayerQuant(act=act))
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


def _codes_as_float(weight: QArray) -> jax.Array:
    """The integer codes as exact floats, which the layer's dtype promotion leaves alone."""
    codes = weight.codes() if weight.packed else weight.data
    return codes.astype(weight.float_dtype)


# The integer path -------------------------------------------------------------------------


def _integer_plan(
    module: nn.Module, args: tuple, act: ActQuant, weight: QArray
) -> tuple[QParams, dict[str, Any]] | str:
    """Activation params and the module attributes of an integer dot, or why there is none."""
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
        qparams = _activation_qparams(module, x, act)
        scale = dot_scale(qparams.scale, weight.scale, *contracted)
        if isinstance(scale, str):
            return scale
        return qparams, {"dot_general": _integer_dot_general(scale), "dot_general_cls": None}
    if isinstance(module, nn.Conv):
        if module.mask is not None:
            return "a Conv with a mask multiplies the kernel by arbitrary floats"
        qparams = _activation_qparams(module, x, act)
        scale = _conv_scale(qparams.scale, weight.scale)
        if isinstance(scale, str):
            return scale
        hooks = {"conv_general_dilated": _integer_conv(scale), "conv_general_dilated_cls": None}
        return qparams, hooks
    return f"integer dots are wired for Dense, DenseGeneral and Conv, not {type(module).__name__}"


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


def _activation_qparams(module: nn.Module, x: jax.Array, act: ActQuant) -> QParams:
    """The activation's params, as :func:`qjax.flax.linen.intercept` computes them.

    Dynamic: from ``x``. Static: from the calibrated ``quant_stats`` range (frozen: never
    updated here); an uncalibrated (infinite) range falls back to ``x``'s, as in QAT.
    """
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
        return (acc.astype(jnp.float32) * scale).astype(lhs.dtype)

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
        return (acc.astype(jnp.float32) * scale.reshape(shape)).astype(lhs.dtype)

    return conv_general_dilated
