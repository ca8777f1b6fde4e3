"""Quantization-aware Flax Linen: QuantDense & co., and ``intercept`` for unmodified models.

One mechanism serves the layers and the interceptor. While a quantized module runs, the
parameters it reads (``kernel``, or ``embedding`` for Embed) are fake-quantized where
they are read, through a thin proxy in front of the module's variable scope, and its
input activation is fake-quantized before the layer sees it. That seam exists for every
Linen layer (Dense, DenseGeneral, Conv, ConvTranspose, Einsum, Embed), where the
``dot_general`` hooks exist only for some and do not say which operand is the weight.
The parameter tree stays identical to the float model's: a float checkpoint loads as is.

Static activation ranges live in the ``quant_stats`` collection (``act_min``,
``act_max`` of each quantized module). Applying with ``mutable=["quant_stats"]``
calibrates them with a moving average; applying without freezes them; a float
checkpoint without them quantizes activations dynamically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.flax._common import (
    ActQuant,
    FlaxRules,
    LayerQuant,
    ModelPlan,
    ModelPlanRow,
    Rule,
    Rules,
    RuleValue,
    activation_qparams,
    cannot_quantize,
    learned_activation,
    learned_input_init,
    learned_weight_init,
    plan_row,
    refuse_embed_activation,
    rounded,
)
from qjax.flax._common import (
    learned_input_qparams as learned_input_qparams_of,
)
from qjax.flax._integer import dense_contraction, dot_scale, qat_dot, spec_reason
from qjax.lsq import learned_qparams, learns_offset, lsq_fake_quant
from qjax.ops import fake_quant, quantize
from qjax.qparams import QParams, compute_qparams
from qjax.resolve import QjaxRuleWarning
from qjax.rules import Calibration
from qjax.spec import QuantSpec
from qjax.tree import path_str

__all__ = [
    "STATS",
    "ActQuant",
    "FlaxRules",
    "Layer",
    "LayerQuant",
    "ModelPlan",
    "ModelPlanRow",
    "QuantConv",
    "QuantConvTranspose",
    "QuantDense",
    "QuantDenseGeneral",
    "QuantEinsum",
    "RuleValue",
    "call_equation",
    "census",
    "intercept",
    "intercepted",
    "layer_rule",
    "learned_input_qparams",
    "learned_weight_qparams",
    "plan",
    "quantized_call",
    "swapped_attributes",
    "tracking_calls",
    "warn_detached",
    "weight_name",
]

STATS = "quant_stats"
"""The collection holding static activation ranges."""

WEIGHT_NAMES: dict[type, str] = {
    nn.Dense: "kernel",
    nn.DenseGeneral: "kernel",
    nn.Conv: "kernel",
    nn.ConvTranspose: "kernel",
    nn.Einsum: "kernel",
    nn.Embed: "embedding",
}
"""The parameter each quantizable layer type multiplies its input with."""


class _QuantizingScope:
    """Forwards everything to a Linen scope, fake-quantizing one parameter as it is read.

    The spec is ``spec``, or with a ``rule``, the rule's spec for that weight (shorthand
    templates take their axes from the weight's layout). ``weight_qparams`` holds the
    params it last used (None until the weight is read). With ``learn``, the scale (and
    offset) are parameters next to the weight, ``<name>_scale`` / ``<name>_offset``.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        spec: QuantSpec,
        rule: Rule | None,
        learn: bool,
        calibration: Calibration | None = None,
        equation: str | None = None,
    ):
        self._scope, self._name, self._spec = module.scope, name, spec
        self._module, self._rule, self._learn = module, rule, learn
        self._calibration, self._equation = calibration, equation
        self.weight_qparams: QParams | None = None

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._scope, attr)

    def param(self, name: str, init_fn: Callable, *args: Any, unbox: bool = True, **kw: Any):
        value = self._scope.param(name, init_fn, *args, unbox=unbox, **kw)
        if name != self._name or not isinstance(value, jax.Array | jnp.ndarray):
            return value
        path = "/".join(self._module.path)
        spec = self._spec
        if self._rule is not None:
            param_path = f"{path}/{name}" if path else name
            spec = self._rule.weight_spec(param_path, value.shape, self._module, self._equation)
        try:
            self.weight_qparams = compute_qparams(jax.lax.stop_gradient(value), spec)
        except ValueError as e:
            rule = f"quant={spec}" if self._rule is None else self._rule.pattern
            layer = type(self._module).__name__
            why = cannot_quantize(path, layer, name, value.shape, rule, str(e))
            raise ValueError(why) from None
        if not self._learn:
            return rounded(fake_quant(value, spec, qparams=self.weight_qparams))
        initial = functools.cache(lambda: learned_weight_init(value, spec, self._calibration))
        scale = _learned_param(self._module, f"{name}_scale", lambda: initial()[0], self._rule)
        offset = None
        if learns_offset(spec):
            offset = _learned_param(
                self._module, f"{name}_offset", lambda: initial()[1], self._rule
            )
        self.weight_qparams = learned_qparams(scale, offset, spec)
        return rounded(lsq_fake_quant(value, spec, scale, offset))


def _learned_param(
    module: nn.Module, name: str, init: Callable[[], jax.Array], rule: Rule | None
) -> jax.Array:
    """The learned scale or offset ``name`` in the module's params, created from ``init()``
    where it is missing and ``params`` are mutable (``model.init``, or an apply with
    ``mutable=["params"]``)."""
    scope = module.scope
    if not scope.has_variable("params", name) and not scope.is_mutable_collection("params"):
        path = "/".join(module.path)
        by = f"rule {rule.pattern!r}" if rule is not None else "its quant"
        raise ValueError(
            f"layer {path!r} learns its scales ({by}: learn_scale=True, ':lsq'), but its "
            f"params hold no {name!r}. Create the learned scales once, from the current "
            "weights and a batch: `_, new = model.apply(variables, x, mutable=['params'])` "
            "inside qjax.flax.linen.intercept(rules) (model.init under intercept creates "
            "them too), then train {**variables, 'params': new['params']}"
        )
    return scope.variable("params", name, init).value


def learned_input_qparams(module: nn.Module, x: jax.Array, act: ActQuant) -> QParams:
    """The learned params (``input_scale`` / ``input_offset`` in the module's ``params``)
    that a layer trained with ``learn_scale=True`` quantizes its input ``x`` with, as
    :class:`~qjax.QParams` of shape ``x.shape // block_shape`` (for serving's integer path).

    Raises:
      ValueError: where the module's params hold no learned input scale.
    """
    names = ["input_scale"] + (["input_offset"] if learns_offset(act.spec) else [])
    values = [module.scope.get_variable("params", name) for name in names]
    for name, value in zip(names, values):
        if value is None:
            path = "/".join(module.path)
            raise ValueError(
                f"{'/'.join(p for p in ('params', path, name) if p)} is missing: the rule "
                "learns this layer's input scale (learn_scale=True, ':lsq'), so the variables "
                "must be those QAT trained, learned scales included"
            )
    offset = values[1] if len(values) > 1 else None
    return learned_input_qparams_of(x, act, values[0], offset)


def learned_weight_qparams(
    params: Mapping[str, Any], module_path: str, weight: str, spec: QuantSpec
) -> QParams:
    """The learned params of a weight trained with ``learn_scale=True``, as
    :class:`~qjax.QParams` for :func:`qjax.quantize` (serving uses exactly these).

    Args:
      params: the model's (unboxed) ``params`` collection.
      module_path: the layer's path, ``"Block_0/Dense_1"``.
      weight: the weight's name, ``"kernel"`` or ``"embedding"``.
      spec: the weight's spec (the rule's, resolved for the weight's layout).

    Raises:
      ValueError: where ``params`` hold no ``<module_path>/<weight>_scale`` (or the
        ``_offset`` an asymmetric spec learns), nor, as NNX keeps them on the layer's
        :class:`~qjax.flax.nnx.QuantOp`, ``<module_path>/<op>/weight_scale``.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, qjax
      >>> from qjax.flax import linen as qlinen
      >>> model, rules = nn.Dense(4), {".*": "int4:per_channel:lsq"}
      >>> with qlinen.intercept(rules):
      ...     variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> sorted(variables["params"])
      ['bias', 'kernel', 'kernel_scale']
      >>> spec = qjax.parse_spec("int4:per_channel")
      >>> qp = qlinen.learned_weight_qparams(variables["params"], "", "kernel", spec)
      >>> kernel = variables["params"]["kernel"]
      >>> bool(np.array_equal(qjax.quantize(kernel, spec, qparams=qp).scale,
      ...                     qjax.compute_qparams(kernel, spec).scale))  # not trained yet
      True
    """
    layer: Any = params
    for key in module_path.split("/") if module_path else ():
        if isinstance(layer, Mapping):  # NNX's pure dicts key list items by int
            layer = layer.get(key, layer.get(int(key)) if key.isdigit() else None)
        else:
            layer = None
    names = [f"{weight}_scale"] + ([f"{weight}_offset"] if learns_offset(spec) else [])
    values = [layer.get(name) if isinstance(layer, Mapping) else None for name in names]
    if values[0] is None and isinstance(layer, Mapping):
        # NNX keeps them on the layer's QuantOp (layer/dot_general/weight_scale).
        ops = [op for op in layer.values() if isinstance(op, Mapping) and "weight_scale" in op]
        if len(ops) == 1:
            values = [ops[0].get(name.replace(weight, "weight", 1)) for name in names]
    for name, value in zip(names, values):
        if value is None:
            where = "/".join(p for p in ("params", module_path, name) if p)
            raise ValueError(
                f"{where} is missing: the rule learns the scales of "
                f"{module_path or 'the model'!r} (learn_scale=True, ':lsq'), so the variables "
                "must be those QAT trained, learned scales included"
            )
    return learned_qparams(values[0], values[1] if len(values) > 1 else None, spec)


def call_equation(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> str | None:
    """An Einsum's equation given at call time (``Einsum.__call__(inputs, einsum_str)``)."""
    if not isinstance(module, nn.Einsum):
        return None
    return kwargs.get("einsum_str", args[1] if len(args) > 1 else None)


@contextlib.contextmanager
def _weights_quantized(
    module: nn.Module, quant: LayerQuant, rule: Rule | None, equation: str | None
) -> Iterator[_QuantizingScope | None]:
    name = weight_name(module)
    if quant.weight is None or name is None:
        yield None
        return
    scope = _QuantizingScope(
        module, name, quant.weight, rule, quant.learn_scale, quant.calibration, equation
    )
    with swapped_attributes(module, {"scope": scope}):
        yield scope


@contextlib.contextmanager
def swapped_attributes(module: nn.Module, values: dict[str, Any]) -> Iterator[None]:
    """Sets attributes of a (frozen) module for the duration of the context."""
    old = {attr: getattr(module, attr) for attr in values}
    for attr, value in values.items():
        object.__setattr__(module, attr, value)
    try:
        yield
    finally:
        for attr, value in old.items():
            object.__setattr__(module, attr, value)


def weight_name(module: nn.Module | type) -> str | None:
    """The name of the parameter a quantizable layer multiplies with, or None."""
    layer = module if isinstance(module, type) else type(module)
    return next((WEIGHT_NAMES[cls] for cls in layer.__mro__ if cls in WEIGHT_NAMES), None)


def _quantize_activation(
    module: nn.Module, x: jax.Array, act: ActQuant, learn: bool, rule: Rule | None
) -> tuple[jax.Array, QParams]:
    """Fake-quantizes ``x``; static ranges live in the module's ``quant_stats``, learned
    params (``learn``) in its ``params`` as ``input_scale`` / ``input_offset``."""
    stored = module.has_variable(STATS, "act_min")
    mutable = module.is_mutable_collection(STATS)
    stats = (
        (module.get_variable(STATS, "act_min"), module.get_variable(STATS, "act_max"))
        if stored
        else None
    )
    calibrating = mutable and not module.is_initializing()
    qparams, stats = activation_qparams(x, act, stats, calibrating)
    if stats is not None and mutable:
        module.put_variable(STATS, "act_min", stats[0])
        module.put_variable(STATS, "act_max", stats[1])
    if not learn:
        return rounded(fake_quant(x, act.spec, qparams=qparams)), qparams
    initial = functools.cache(lambda: learned_input_init(x, act, stats))
    scale = _learned_param(module, "input_scale", lambda: initial()[0], rule)
    offset = None
    if learns_offset(act.spec):
        offset = _learned_param(module, "input_offset", lambda: initial()[1], rule)
    try:
        return learned_activation(x, act, scale, offset)
    except ValueError as e:
        raise ValueError(
            f"layer {'/'.join(module.path)!r} ({type(module).__name__}): {e}"
        ) from None


def quantized_call(
    module: nn.Module,
    fun: Callable,
    args: tuple,
    kwargs: dict,
    quant: LayerQuant,
    rule: Rule | None = None,
) -> Any:
    """Runs ``fun(*args, **kwargs)``, a method of ``module``, with ``quant`` applied.

    ``rule``: the rule that gave ``quant``: it resolves the weight spec for the weight's
    layout, and errors name it.
    """
    contraction = _integer_dot_contraction(module, args, quant) if quant.integer_dot else None
    act_qparams = None
    if quant.act is not None and args and jnp.issubdtype(jnp.asarray(args[0]).dtype, jnp.floating):
        x_q, act_qparams = _quantize_activation(module, args[0], quant.act, quant.learn_scale, rule)
        args = (x_q, *args[1:])
    with _weights_quantized(module, quant, rule, call_equation(module, args, kwargs)) as scope:
        if contraction is None:
            return fun(*args, **kwargs)
        hooks = {
            "dot_general": _integer_dot_general(quant, act_qparams, scope, contraction),
            "dot_general_cls": None,
        }
        with swapped_attributes(module, hooks):
            return fun(*args, **kwargs)


def _integer_dot_contraction(
    module: nn.Module, args: tuple, quant: LayerQuant
) -> tuple[tuple, tuple]:
    """The (input, kernel) axes of a layer that ``integer_dot=True`` may run on int8."""
    path = "/".join(module.path)
    reason = None
    if quant.act is None or quant.weight is None:
        reason = "integer dots need both a weight and an activation spec"
    else:
        reason = spec_reason("activation", quant.act.spec) or spec_reason("weight", quant.weight)
    if reason is None and not isinstance(module, nn.Dense | nn.DenseGeneral):
        reason = f"integer_dot is wired for Dense and DenseGeneral, not {type(module).__name__}"
    if reason is None and not (args and jnp.issubdtype(jnp.asarray(args[0]).dtype, jnp.floating)):
        reason = "its input is not a floating-point array"
    contraction = reason or dense_contraction(module, jnp.ndim(args[0]))
    if isinstance(contraction, str):
        raise ValueError(
            f"layer {path!r} ({type(module).__name__}) cannot use integer_dot=True: "
            f"{contraction}. Drop integer_dot from its rule to train it with fake-quantized "
            "floats"
        )
    return contraction


def _integer_dot_general(
    quant: LayerQuant,
    act_qparams: QParams,
    scope: _QuantizingScope,
    contraction: tuple[tuple, tuple],
) -> Callable:
    """A ``dot_general`` for the layer: its fake-quantized operands dotted as int8 codes."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del preferred_element_type  # the output keeps the input's dtype, as the float dot
        weight_qparams = scope.weight_qparams
        out_scale = dot_scale(act_qparams.scale, weight_qparams.scale, *contraction)
        if isinstance(out_scale, str):
            raise ValueError(f"integer_dot=True: {out_scale}")
        lhs_codes = quantize(lhs, quant.act.spec, qparams=act_qparams, packed=False).data
        rhs_codes = quantize(rhs, quant.weight, qparams=weight_qparams, packed=False).data
        return qat_dot(lhs, rhs, lhs_codes, rhs_codes, out_scale, dimension_numbers, precision)

    return dot_general


def _quantized_layer(base: type[nn.Module]) -> type[nn.Module]:
    class Quantized(base):
        quant: LayerQuant = LayerQuant()

        @nn.compact
        def __call__(self, *args, **kwargs):
            return quantized_call(
                self, functools.partial(base.__call__, self), args, kwargs, self.quant
            )

        def __repr__(self) -> str:
            return f"Quant{super().__repr__()}"

    # Linen names an unnamed submodule after ``type(module).__name__`` ("Dense_0"): the
    # float layer's name keeps a float checkpoint's tree, so swapping the class is the
    # only change. The qualified name (repr of the class, pickling) stays "QuantDense".
    Quantized.__name__ = base.__name__
    Quantized.__qualname__ = f"Quant{base.__name__}"
    Quantized.__doc__ = (
        f"Drop-in :class:`flax.linen.{base.__name__}` with fake-quantized weight and input.\n\n"
        "Same parameter names and shapes as the float layer, and the same automatic name\n"
        f"(``{base.__name__}_0``, not ``Quant{base.__name__}_0``): a float checkpoint loads as\n"
        "it is. ``quant`` is a :class:`LayerQuant`: the weight spec and an optional\n"
        ":class:`ActQuant`."
    )
    return Quantized


QuantDense = _quantized_layer(nn.Dense)
QuantDenseGeneral = _quantized_layer(nn.DenseGeneral)
QuantConv = _quantized_layer(nn.Conv)
QuantConvTranspose = _quantized_layer(nn.ConvTranspose)
QuantEinsum = _quantized_layer(nn.Einsum)


def layer_rule(module: nn.Module, rules: Rules, method: str) -> tuple[LayerQuant, Rule] | None:
    """The quantization of one intercepted call of ``module``, and the rule that gave it.

    None where the module is not a quantizable layer or no rule (or a None rule) matches.
    ``setup`` (where Embed reads its table) quantizes weights only.

    Raises:
      ValueError: an activation spec on an Embed, whose input is integer ids.
    """
    name = weight_name(module)
    if method == "__call__" and name is None and module.path:
        rules.saw_other("/".join(module.path), type(module).__name__)
    if method not in ("__call__", "setup") or name is None:
        return None
    path = "/".join(module.path)
    rule = rules.find(path, name)
    if rule is None or rule.quant is None:
        return None
    quant = rule.quant
    if isinstance(module, nn.Embed) and quant.act is not None:
        raise ValueError(refuse_embed_activation(path, rule.pattern))
    if method == "setup":
        learn = quant.learn_scale and quant.weight is not None
        calibration = quant.calibration if learn else None
        quant = LayerQuant(weight=quant.weight, learn_scale=learn, calibration=calibration)
    return quant, rule


def tracking_calls(intercept_method: Callable) -> Callable:
    """``intercept_method(next_fun, args, kwargs, context, detached)``, told whether the
    module runs detached from the model (:func:`warn_detached`), as a Linen interceptor.

    A detached layer is a quantizable layer with an empty module path that runs inside
    another module's call under a different scope: a layer applied on its own inside the
    model, such as Hugging Face's heads tied to the input embedding
    (``decoder.apply({"params": {"kernel": embedding.T}}, h)``). Its path says nothing
    about where it sits, and its weight is computed in the model, not one of its
    variables. (Lifted transforms, ``nn.scan`` and ``nn.remat``, also run under fresh
    scopes, but keep their layers' paths.)
    """
    outer: list[Any] = []  # the scopes of the calls running, outermost first

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        detached = not module.path and bool(outer) and module.scope is not outer[0]
        outer.append(module.scope)
        try:
            return intercept_method(next_fun, args, kwargs, context, detached)
        finally:
            outer.pop()

    return intercept


def warn_detached(module: nn.Module, rules: Rules, method: str) -> None:
    """Warns that a rule matches a detached layer (see :func:`tracking_calls`), which QAT,
    :func:`qjax.flax.serve.convert` and serving all leave float: convert could never store
    its weight quantized, so quantizing it in QAT would train what no served model runs."""
    name = weight_name(module)
    if method not in ("__call__", "setup") or name is None:
        return
    rule = rules.first_match("", name)
    if rule is None or rule.quant is None:
        return
    warnings.warn(
        f"a {type(module).__name__} applied on its own inside the model (an empty module "
        f"path; e.g. a head tied to the input embedding, run as "
        f"`.apply({{'params': {{'{name}': ...}}}}, x)`) matches rule {rule.pattern!r}, but "
        f"stays float: its {name} is computed inside the model, not one of its variables, "
        "so convert cannot store it quantized and serving runs it float too",
        QjaxRuleWarning,
        stacklevel=2,
    )


def _interceptor(rules: Rules) -> Callable:
    @tracking_calls
    def intercept_method(next_fun, args, kwargs, context, detached):
        if detached:
            warn_detached(context.module, rules, context.method_name)
            return next_fun(*args, **kwargs)
        found = layer_rule(context.module, rules, context.method_name)
        if found is None:
            return next_fun(*args, **kwargs)
        quant, rule = found
        return quantized_call(context.module, next_fun, args, kwargs, quant, rule)

    return intercept_method


@contextlib.contextmanager
def intercept(rules: FlaxRules, *, strict: bool = False) -> Iterator[None]:
    """Quantizes the layers of an unmodified Linen model while the context is active.

    Args:
      rules: ``{regex: LayerQuant | QuantSpec | shorthand | None}``, first match wins,
        on the layer's module path (``"Block_0/Dense_1"``) or its weight's path
        (``"Block_0/Dense_1/kernel"``): the rule language of :mod:`qjax.flax`, the same
        as :func:`qjax.quantize_tree`'s. A QuantSpec or shorthand quantizes weights
        only. Dense, DenseGeneral, Conv, ConvTranspose, Einsum and Embed are quantized
        where a rule matches them; other modules run unchanged. Shorthand ending in
        ``:lsq`` (``"int2:per_channel:lsq"``), or ``LayerQuant(learn_scale=True)``,
        learns the layer's scales (LSQ): ``model.init`` under the context creates them
        (``kernel_scale``, ``input_scale``, ... in ``params``); for float variables
        without them, apply once with ``mutable=["params"]`` to add them.
      strict: what happens to a rule that quantized no layer while the context was
        active, checked when the context exits without an error (inside ``jax.jit``: when
        the function is traced, not at each cached call): a
        :class:`~qjax.resolve.QjaxRuleWarning` naming it, or with ``strict=True`` a
        ``ValueError``.

    Raises:
      ValueError: (when a layer runs) a rule that reaches a weight its spec cannot
        quantize (e.g. an Embed table whose vocabulary no block divides), naming the
        layer's path; an activation spec on an Embed (its input is integer ids).

    Enter the context inside the function you jit (or wrap it with :func:`intercepted`):
    Linen's interceptors are Python state that JAX's jit cache does not see, so a
    function jitted outside the context would replay whichever version it traced first.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from qjax.flax import linen as qlinen
      >>> model = nn.Dense(4)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> @jax.jit
      ... def quantized_apply(variables, x):
      ...     with qlinen.intercept({".*kernel": "int4:per_channel"}, strict=True):
      ...         return model.apply(variables, x)
      >>> quantized_apply(variables, jnp.ones((1, 8))).shape
      (1, 4)
    """
    compiled = Rules(rules)
    with nn.intercept_methods(_interceptor(compiled)):
        yield
    # Frames up from here: contextlib's __exit__, then the code that entered the context.
    compiled.check(strict=strict, where="qjax.flax.linen.intercept", stacklevel=3)


def intercepted(fn: Callable, rules: FlaxRules, *, strict: bool = False) -> Callable:
    """``fn`` run inside :func:`intercept` ``(rules, strict=strict)``: a new function, safe
    to ``jax.jit``.

    The wrapper is a different function from ``fn``, so jitting both gives two cache
    entries: the float and the quantized versions never replay each other's trace.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from qjax.flax import linen as qlinen
      >>> model = nn.Dense(4)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> float_apply = jax.jit(model.apply)
      >>> int8_apply = jax.jit(qlinen.intercepted(model.apply, {".*": "int8"}))
      >>> bool(jnp.any(float_apply(variables, jnp.ones((1, 8)))
      ...               != int8_apply(variables, jnp.ones((1, 8)))))
      True
    """
    Rules(rules)  # invalid rules fail here, not at the first call

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with intercept(rules, strict=strict):
            return fn(*args, **kwargs)

    return wrapper


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer of a Linen model as :func:`census` saw it run.

    Attributes:
      module: the module (its type and configuration tell its weight's layout).
      weight_shape: its weight's shape as the layer reads it: one layer's, where
        ``nn.scan`` / ``nn.vmap`` stack copies of it; None for a layer with no weight.
      equation: an Einsum's call-time ``einsum_str``.
    """

    module: nn.Module
    weight_shape: tuple[int, ...] | None
    equation: str | None = None

    def stack_axes(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The axes of a stored weight of shape ``stored`` that stack copies of the layer:
        those whose removal leaves :attr:`weight_shape` (leading ones where several
        choices would, as ``variable_axes={"params": 0}`` stacks them).

        Examples:
          >>> import flax.linen as nn
          >>> Layer(nn.Dense(8), (16, 8)).stack_axes((16, 4, 8))  # variable_axes 1
          (1,)
          >>> Layer(nn.Dense(8), (8, 8)).stack_axes((3, 8, 8))
          (0,)
        """
        if self.weight_shape is None or len(stored) <= len(self.weight_shape):
            return ()
        extra = len(stored) - len(self.weight_shape)
        fits = [
            axes
            for axes in itertools.combinations(range(len(stored)), extra)
            if tuple(d for i, d in enumerate(stored) if i not in axes) == self.weight_shape
        ]
        return tuple(range(extra)) if tuple(range(extra)) in fits or not fits else fits[0]

    def plan_args(self) -> dict[str, Any]:
        shape = self.weight_shape
        return {"module": self.module, "einsum_str": self.equation, "layer_shape": shape}


def census(
    model: nn.Module, *args: Any, method: Callable | str | None = None, **kwargs: Any
) -> tuple[dict[str, Layer], Any]:
    """Every layer of ``model`` by module path, and the abstract params, from one abstract
    ``model.init`` (``jax.eval_shape``: no compute, no weights) on example inputs.

    Examples:
      >>> import flax.linen as nn, jax.numpy as jnp
      >>> from qjax.flax import linen as qlinen
      >>> class Block(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, _):
      ...         return nn.Dense(8, name="fc")(x), None
      >>> Stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
      ...                 length=3)
      >>> layers, params = qlinen.census(Stack(), jnp.ones((2, 8)), None)
      >>> layers["fc"].weight_shape, params["fc"]["kernel"].shape  # one layer's; stored
      ((8, 8), (3, 8, 8))
    """
    layers: dict[str, Layer] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module, path = context.module, "/".join(context.module.path)
        name = weight_name(module)
        weight = None
        if name is not None and module.scope is not None:
            weight = nn.meta.unbox(module.scope.get_variable("params", name))
        shape = None if weight is None else tuple(jnp.shape(weight))
        known = layers.get(path)
        if context.method_name == "__call__":  # an Einsum's equation may come with the call
            equation = call_equation(module, args, kwargs)
            if known is None or known.weight_shape is None or known.equation is None:
                layers[path] = Layer(module, shape or (known and known.weight_shape), equation)
        elif known is None or known.weight_shape is None:
            layers[path] = Layer(module, shape, None if known is None else known.equation)
        return out

    # Arrays (and ShapeDtypeStructs) enter eval_shape abstractly; other leaves, such as
    # deterministic=True, stay Python values the model may branch on.
    leaves, treedef = jax.tree.flatten((args, kwargs))
    arrays = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def init(*values: Any) -> Any:
        filled = list(leaves)
        for i, value in zip(arrays, values):
            filled[i] = value
        call_args, call_kwargs = jax.tree.unflatten(treedef, filled)
        with nn.intercept_methods(record):
            keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
            return model.init(keys, *call_args, method=method, **call_kwargs)

    shapes = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in arrays]
    variables = jax.eval_shape(init, *shapes)
    return layers, nn.meta.unbox(variables.get("params", {}))


def _is_array(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def plan(
    model: nn.Module,
    *args: Any,
    rules: FlaxRules,
    method: Callable | str | None = None,
    **kwargs: Any,
) -> ModelPlan:
    """What ``rules`` do to each parameter of a Linen model, without running it.

    Initializes the model abstractly (``jax.eval_shape`` of ``model.init``: no real
    compute, no memory for weights) on ``args`` / ``kwargs``, notes which layer type owns
    each parameter, and resolves the rules as :func:`intercept` and
    :func:`qjax.flax.serve.convert` would. A rule that would fail on a weight (a block
    that does not divide it, an activation spec on an Embed) is listed with the reason
    rather than raised, so one call shows every problem.

    Args:
      model: the Linen module (for a transformers ``FlaxPreTrainedModel``, its ``.module``).
      *args, **kwargs: example inputs for ``model.init`` (arrays or
        ``jax.ShapeDtypeStruct``); ``method`` as for ``init``.
      rules: as for :func:`intercept`.

    Returns:
      A :class:`ModelPlan`: ``rows`` of :class:`ModelPlanRow` (path, shape, dtype, layer
      type, rule, weight spec, activation spec, note), the ``unmatched`` rules, and as
      ``str()`` a table.

    Examples:
      >>> import flax.linen as nn, jax.numpy as jnp
      >>> from qjax.flax import linen as qlinen
      >>> model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
      >>> print(qlinen.plan(model, jnp.ones((1, 256)),
      ...                   rules={".*_1/kernel": None, ".*kernel": "int8:per_channel"}))
      path             shape      layer  rule        quantization
      layers_0/bias    (64,)      Dense  -           float (rules quantize Dense's kernel only)
      layers_0/kernel  (256, 64)  Dense  '.*kernel'  int8:symmetric:scale:per_channel(axis=-1)
      layers_2/bias    (10,)      Dense  -           float (rules quantize Dense's kernel only)
      layers_2/kernel  (64, 10)   Dense  '.*kernel'  int8:symmetric:scale:per_channel(axis=-1)
      rules that match no layer: '.*_1/kernel'
    """
    compiled = Rules(rules)
    layers, params = census(model, *args, method=method, **kwargs)
    rows = []
    for keys, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        param = path_str(keys)
        found = layers.get(param.rpartition("/")[0])
        if found is None:
            rows.append(plan_row(compiled, param, value, None, None))
            continue
        layer, extra = found.module, found.plan_args()
        rows.append(plan_row(compiled, param, value, type(layer), weight_name(layer), **extra))
    return ModelPlan(tuple(rows), tuple(compiled.unmatched()))
