"""Quantization-aware Flax NNX: ``quantize(model, rules)`` puts quantizing operators in place.

NNX has no interceptor, but its layers call their operator through an attribute:
``Linear.dot_general``, ``LinearGeneral.dot_general``, ``Conv.conv_general_dilated`` and
``Einsum.einsum_op``. :func:`quantize` replaces that attribute, on each layer a rule
matches, with a :class:`QuantOp`: a small ``nnx.Module`` that fake-quantizes the kernel
operand with the weight spec and the input operand with the activation spec, then calls
the original operator. The parameters are untouched (a float checkpoint loads as is) and
the numerics are those of :mod:`qjax.flax.linen`: the same rules, :class:`LayerQuant` and
:class:`ActQuant`, and the same activation maths (``qjax.flax._common``).

Static activation ranges are :class:`QuantStat` variables (``act_min``, ``act_max``) of
the :class:`QuantOp`, so they travel through ``nnx.jit``, ``nnx.split`` / ``nnx.merge``
and checkpoints, and an ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never sees them.
:func:`calibrate` switches the moving-average updates on and off.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from qjax.flax._common import (
    ActQuant,
    FlaxRules,
    LayerQuant,
    ModelPlan,
    ModelPlanRow,
    Rules,
    RuleValue,
    cannot_quantize,
    learned_activation,
    learned_input_init,
    learned_weight_init,
    plan_row,
    quantize_activation,
    rounded,
    weight_spec_problem,
)
from qjax.lsq import learns_offset, lsq_fake_quant
from qjax.ops import fake_quant

__all__ = [
    "HOOKS",
    "ActQuant",
    "FlaxRules",
    "LayerQuant",
    "ModelPlan",
    "ModelPlanRow",
    "QuantOp",
    "QuantStat",
    "RuleValue",
    "calibrate",
    "plan",
    "quantize",
]

M = TypeVar("M", bound=nnx.Module)


class Hook(NamedTuple):
    """Where a layer type calls its operator, and which operands are input and kernel."""

    attr: str
    input_arg: int
    kernel_arg: int
    default: Callable


HOOKS: dict[type, Hook] = {
    nnx.Linear: Hook("dot_general", 0, 1, jax.lax.dot_general),
    nnx.LinearGeneral: Hook("dot_general", 0, 1, jax.lax.dot_general),
    nnx.Conv: Hook("conv_general_dilated", 0, 1, jax.lax.conv_general_dilated),
    nnx.Einsum: Hook("einsum_op", 1, 2, jnp.einsum),
}
"""The quantizable layer types: the operator attribute, input and kernel positions."""

NO_HOOK: tuple[type, ...] = (nnx.ConvTranspose, nnx.Embed)
"""Layers with a weight that NNX reads without an operator hook: a rule cannot quantize them."""


def weight_name(layer: nnx.Module | type) -> str | None:
    """The parameter a layer multiplies with (``kernel``, ``embedding``), or None."""
    cls = layer if isinstance(layer, type) else type(layer)
    if issubclass(cls, nnx.Embed):
        return "embedding"
    return "kernel" if issubclass(cls, (*HOOKS, *NO_HOOK)) else None


class QuantStat(nnx.Variable):
    """A static activation range (``act_min`` / ``act_max``): state, but not a parameter.

    Uncalibrated, it holds the scalar ``+inf`` (``act_min``) or ``-inf`` (``act_max``) and
    the layer falls back to dynamic ranges. The first calibrating call gives it the shape
    of the activation's blocks, ``x.shape // block_shape``, less its leading unit axes:
    ``()`` per tensor (always), ``(features,)`` per channel of the last axis. It then fits
    inputs of any rank.
    """


class QuantOp(nnx.Module):
    """A layer's operator, with its kernel and input operands fake-quantized.

    :func:`quantize` installs one in place of a layer's ``dot_general``,
    ``conv_general_dilated`` or ``einsum_op``. Its configuration is static (part of the
    graph definition, so ``nnx.jit`` retraces when it changes); its state is the
    :class:`QuantStat` pair ``act_min`` / ``act_max`` when the activation is static, and
    with ``quant.learn_scale`` the learned scales, :class:`flax.nnx.Param` s that an
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains: ``weight_scale`` (and
    ``weight_offset`` for an asymmetric spec), from ``compute_qparams(kernel)`` (or
    ``qjax.calibrate(kernel, spec, method)`` with ``quant.calibration``), and
    ``input_scale`` (``input_offset``), empty until a calibrating call (see
    :func:`calibrate`) sets them from its batch: create the optimizer after that call.

    Attributes:
      op: the original operator, called with the quantized operands.
      quant: the :class:`LayerQuant`.
      input_arg: the position of the input operand (1 for ``einsum_op``, else 0).
      kernel_arg: the position of the kernel operand (2 for ``einsum_op``, else 1).
      calibrating: whether calls update the static ranges and learned input scales.

    ``stacked``: the leading axes of ``kernel`` that stack copies of the layer
    (``nnx.vmap`` / ``nnx.scan``): the static ranges and learned weight scales get them
    too, one per layer, which the lifted transform slices as it slices the kernel.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.flax import nnx as qnnx
      >>> op = qnnx.QuantOp(jax.lax.dot_general, qnnx.LayerQuant(weight=qjax.QuantSpec("int2")))
      >>> # int2 is [-2, 1] with scale 1 / 1.5: the kernel [1.0, 0.2] becomes [2/3, 0].
      >>> op(jnp.ones((1, 2)), jnp.array([[1.0], [0.2]]), (((1,), (0,)), ((), ())))
      Array([[0.6666667]], dtype=float32)
      >>> lsq = qnnx.LayerQuant(weight=qjax.QuantSpec("int2"), learn_scale=True)
      >>> op = qnnx.QuantOp(jax.lax.dot_general, lsq, kernel=jnp.array([[1.0], [0.2]]))
      >>> op.weight_scale[...]  # an nnx.Param, learned from here on
      Array([[0.6666667]], dtype=float32)
    """

    def __init__(
        self,
        op: Callable,
        quant: LayerQuant,
        *,
        input_arg: int = 0,
        kernel_arg: int = 1,
        kernel: jax.Array | None = None,
        stacked: int = 0,
    ):
        self.op = op
        self.quant = quant
        self.input_arg = input_arg
        self.kernel_arg = kernel_arg
        self.calibrating = False
        layers = () if kernel is None else tuple(jnp.shape(kernel)[:stacked])
        if quant.act is not None and quant.act.static:
            self.act_min = QuantStat(jnp.full(layers, jnp.inf, jnp.float32))
            self.act_max = QuantStat(jnp.full(layers, -jnp.inf, jnp.float32))
        if not quant.learn_scale:
            return
        if quant.weight is not None:
            if kernel is None:
                raise ValueError(
                    "QuantOp: learn_scale=True with a weight spec needs the layer's kernel "
                    "(kernel=...) to start the learned scale from"
                )
            init = functools.partial(
                learned_weight_init, spec=quant.weight, calibration=quant.calibration
            )
            for _ in range(stacked):  # one scale per stacked layer
                init = jax.vmap(init)
            scale, offset = init(kernel)
            self.weight_scale = nnx.Param(scale)
            if offset is not None:
                self.weight_offset = nnx.Param(offset)
        if quant.act is not None:
            self.input_scale = nnx.Param(jnp.zeros((0,), jnp.float32))
            if learns_offset(quant.act.spec):
                self.input_offset = nnx.Param(jnp.zeros((0,), jnp.float32))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls ``op`` with the input and kernel operands fake-quantized."""
        if len(args) <= max(self.input_arg, self.kernel_arg):
            raise TypeError(
                f"QuantOp expects the input at position {self.input_arg} and the kernel at "
                f"position {self.kernel_arg}, got {len(args)} positional arguments"
            )
        args = list(args)
        x, act = args[self.input_arg], self.quant.act
        if act is not None and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            args[self.input_arg] = self._quantize_input(x, act)
        weight = self.quant.weight
        if weight is not None and self.quant.learn_scale:
            offset = self.weight_offset[...] if learns_offset(weight) else None
            kernel = lsq_fake_quant(args[self.kernel_arg], weight, self.weight_scale[...], offset)
            args[self.kernel_arg] = rounded(kernel)
        elif weight is not None:
            args[self.kernel_arg] = rounded(fake_quant(args[self.kernel_arg], weight))
        return self.op(*args, **kwargs)

    def _quantize_input(self, x: jax.Array, act: ActQuant) -> jax.Array:
        stats = (self.act_min.get_value(), self.act_max.get_value()) if act.static else None
        x_q, _, stats = quantize_activation(x, act, stats, self.calibrating)
        if stats is not None and self.calibrating:
            self.act_min.set_value(stats[0])
            self.act_max.set_value(stats[1])
        if not self.quant.learn_scale:
            return x_q
        offset = learns_offset(act.spec)
        if self.calibrating:
            scale_value, offset_value = learned_input_init(x, act, stats)
            self.input_scale.set_value(scale_value)
            if offset:
                self.input_offset.set_value(offset_value)
        elif self.input_scale.get_value().shape == (0,):
            raise ValueError(
                "this layer learns its input scale (learn_scale=True, ':lsq'), which is not "
                "set yet: call the model once on a batch under qjax.flax.nnx.calibrate(model) "
                "(then calibrate(model, False)) before training, and create the optimizer "
                "after that call"
            )
        learned_offset = self.input_offset[...] if offset else None
        return learned_activation(x, act, self.input_scale[...], learned_offset)[0]

    def set_view(self, calibrating: bool | None = None) -> None:
        """Lets ``nnx.view(model, calibrating=True)`` give a calibrating view of a model."""
        if calibrating is not None:
            self.calibrating = calibrating


def _hook_of(module: nnx.Module) -> Hook | None:
    for cls in type(module).__mro__:
        if cls in HOOKS:
            return HOOKS[cls]
    return None


def _plan(
    module: nnx.Module, path: str, rules: Rules
) -> tuple[nnx.Module, Hook, LayerQuant | None, jax.Array | None] | None:
    """What :func:`quantize` does to ``module``: None, or (module, hook, quant, kernel)."""
    hook, name = _hook_of(module), weight_name(module)
    if name is None:
        return None
    rule = rules.find(path, name)
    if rule is None or (hook is None and rule.quant is None):
        return None
    quant, pattern = rule.quant, rule.pattern
    if hook is None:
        raise ValueError(
            f"rule {pattern!r} matches {path!r} ({type(module).__name__}), which NNX reads "
            f"without an operator hook, so qjax cannot quantize it; add {{{path!r}: None}} "
            "before that rule"
        )
    if quant is not None and quant.integer_dot:
        raise ValueError(
            f"rule {pattern!r}: integer_dot=True is implemented for Linen (intercept, "
            "QuantDense); NNX layers train with fake-quantized floats: drop integer_dot"
        )
    if getattr(module, "dot_general_cls", None) is not None:
        raise ValueError(
            f"layer {path!r} ({type(module).__name__}) uses dot_general_cls, which overrides "
            "the dot_general hook qjax quantizes through; build it with dot_general instead"
        )
    if quant is not None and quant.weight is not None:
        kernel = getattr(module, name).get_value()
        shape = jnp.shape(kernel)[_stacked_axes(module, jnp.ndim(kernel)) :]  # one layer's
        spec = rule.weight_spec(f"{path}/{name}" if path else name, shape, module)
        problem = weight_spec_problem(shape, jnp.result_type(kernel), spec)
        if problem is not None:
            layer = type(module).__name__
            raise ValueError(cannot_quantize(path, layer, name, shape, pattern, problem))
        quant = dataclasses.replace(quant, weight=spec)
        return module, hook, quant, kernel
    return module, hook, quant, None


def _install(
    module: nnx.Module, hook: Hook, quant: LayerQuant | None, kernel: jax.Array | None
) -> None:
    current = getattr(module, hook.attr)
    original = current.op if isinstance(current, QuantOp) else (current or hook.default)
    if quant is None:
        setattr(module, hook.attr, nnx.static(original))
        return
    stacked = 0 if kernel is None else _stacked_axes(module, jnp.ndim(kernel))
    op = QuantOp(
        original,
        quant,
        input_arg=hook.input_arg,
        kernel_arg=hook.kernel_arg,
        kernel=kernel,
        stacked=stacked,
    )
    setattr(module, hook.attr, nnx.data(op))


def _stacked_axes(module: nnx.Module, ndim: int) -> int:
    """The leading axes of a layer's kernel of rank ``ndim`` that stack copies of the layer
    (``nnx.vmap`` / ``nnx.scan`` over its constructor): the rank beyond one layer's."""
    if isinstance(module, nnx.Linear):
        rank = 2
    elif isinstance(module, nnx.Conv):
        rank = len(module.kernel_size) + 2
    elif isinstance(module, nnx.LinearGeneral):
        rank = len(module.batch_axis) + len(module.in_features) + len(module.out_features)
    elif isinstance(module, nnx.Einsum):
        rank = len(module.kernel_shape)
    else:
        return 0
    return max(ndim - rank, 0)


def quantize(model: M, rules: FlaxRules, *, strict: bool = False) -> M:
    """Quantizes the matched layers of an NNX model, in place.

    Each ``Linear``, ``LinearGeneral``, ``Conv`` and ``Einsum`` (or subclass) that a rule
    matches gets a :class:`QuantOp` as its operator. Unmatched modules stay as they are;
    a ``None`` rule puts back the float operator of a layer quantized before. Calling
    ``quantize`` again replaces the earlier configuration of the layers it matches, their
    calibrated ranges included.

    Where NNX's numerics differ from :func:`qjax.flax.linen.intercept`: the operands are
    quantized where the operator receives them, after the layer's dtype promotion, a
    ``Conv`` mask and padding (``CIRCULAR``, ``REFLECT``, ``CAUSAL``); with float32
    parameters, inputs and no mask, the results are the same.

    Args:
      model: an ``nnx.Module``.
      rules: ``{regex: LayerQuant | QuantSpec | shorthand | None}``, first match wins,
        on each layer's path (``"blocks/0/linear"``; the model itself is ``""``) or its
        weight's path (``"blocks/0/linear/kernel"``, as in ``nnx.state(model)``): the rule
        language of :mod:`qjax.flax`. A QuantSpec or shorthand quantizes weights only; a
        :class:`LayerQuant` may add an :class:`ActQuant`. Shorthand ending in ``:lsq``
        (or ``LayerQuant(learn_scale=True)``) learns the scales: ``nnx.Param`` s of the
        :class:`QuantOp` (a learned input scale is set by a first call under
        :func:`calibrate`).
      strict: a rule that matches no layer is a :class:`~qjax.resolve.QjaxRuleWarning`
        naming it, or with ``strict=True`` a ``ValueError`` (the model is then left as it
        was).

    Returns:
      ``model``, quantized.

    Raises:
      ValueError: for an invalid rule, naming it; for a matched ``ConvTranspose`` or
        ``Embed`` (NNX gives no operator hook to quantize them through: exclude them with
        a ``None`` rule before), a layer built with ``dot_general_cls``, or a kernel the
        rule's spec cannot quantize (naming the layer's path). The model is then left as
        it was.
      TypeError: for a rule value of the wrong type, naming the rule.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from qjax.flax import nnx as qnnx
      >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> float_out = model(jnp.ones((1, 8)))
      >>> model = qnnx.quantize(model, {"layers/0/kernel": "int4:per_channel"}, strict=True)
      >>> type(model.layers[0].dot_general).__name__, model.layers[2].dot_general.__name__
      ('QuantOp', 'dot_general')
      >>> bool(jnp.any(nnx.jit(lambda m, x: m(x))(model, jnp.ones((1, 8))) != float_out))
      True
    """
    compiled = Rules(rules, collection=None)
    plans = [
        _plan(module, "/".join(map(str, parts)), compiled)
        for parts, module in nnx.iter_modules(model)
    ]
    compiled.check(strict=strict, where="qjax.flax.nnx.quantize")
    for plan in plans:  # all checked first: an error leaves the model as it was
        if plan is not None:
            _install(*plan)
    return model


def calibrate(model: M, enabled: bool = True) -> M:
    """Switches the static activation ranges of ``model`` to calibrating, or freezes them.

    While calibrating, each call of a quantized layer with a static :class:`ActQuant`
    folds its input's per-block range into ``act_min`` / ``act_max`` with the moving
    average (the first call sets them); frozen, calls read them only. The flag is static:
    ``nnx.jit`` traces each mode once. ``nnx.view(model, calibrating=True)`` gives a
    calibrating view without changing ``model``.

    Args:
      model: a model quantized with :func:`quantize`.
      enabled: True to calibrate, False to freeze.

    Returns:
      ``model``, switched in place.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from flax import nnx
      >>> from qjax.flax import nnx as qnnx
      >>> act = qnnx.ActQuant(qjax.QuantSpec("int8"), static=True)
      >>> model = qnnx.quantize(nnx.Linear(2, 2, rngs=nnx.Rngs(0)),
      ...                       {".*": qnnx.LayerQuant(act=act)})
      >>> _ = qnnx.calibrate(model)(jnp.array([[-1.0, 3.0]]))
      >>> _ = qnnx.calibrate(model, False)(jnp.array([[-5.0, 5.0]]))  # frozen
      >>> model.dot_general.act_min[...], model.dot_general.act_max[...]
      (Array(-1., dtype=float32), Array(3., dtype=float32))
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, QuantOp):
            module.calibrating = enabled
    return model


def plan(model: nnx.Module, rules: FlaxRules) -> ModelPlan:
    """What :func:`quantize` ``(model, rules)`` would do to each parameter, without doing it.

    Lists every ``nnx.Param`` with its path, shape, the layer type that owns it, the rule
    that decides it and the weight / activation spec it gets, or why none (no rule, not a
    layer's weight, a spec that does not fit, a layer NNX gives no operator hook).
    Problems are listed, not raised, so one call shows them all.

    Returns:
      A :class:`ModelPlan` (``rows``, ``unmatched``; ``str()`` is a table).

    Examples:
      >>> from flax import nnx
      >>> from qjax.flax import nnx as qnnx
      >>> model = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(32, 10, rngs=nnx.Rngs(1)))
      >>> print(qnnx.plan(model, {".*2/kernel": None, ".*kernel": "int8:per_channel"}))
      path             shape     layer   rule          quantization
      layers/0/bias    (32,)     Linear  -             float (rules quantize Linear's kernel only)
      layers/0/kernel  (64, 32)  Linear  '.*kernel'    int8:symmetric:scale:per_channel(axis=-1)
      layers/2/bias    (10,)     Linear  -             float (rules quantize Linear's kernel only)
      layers/2/kernel  (32, 10)  Linear  '.*2/kernel'  float (the rule keeps it float)
    """
    compiled = Rules(rules, collection=None)
    modules = {"/".join(map(str, parts)): module for parts, module in nnx.iter_modules(model)}
    rows = []
    for parts, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path, value = "/".join(map(str, parts)), variable.get_value()
        module = modules.get(path.rpartition("/")[0])
        layer = None if module is None else type(module)
        name = None if layer is None else weight_name(layer)
        hookless = layer is not None and not any(issubclass(layer, cls) for cls in HOOKS)
        stacked = 0 if module is None else _stacked_axes(module, jnp.ndim(value))
        one = jnp.shape(value)[stacked:]
        rows.append(
            plan_row(compiled, path, value, layer, name, hookless, module=module, layer_shape=one)
        )
    return ModelPlan(tuple(rows), tuple(compiled.unmatched()))
