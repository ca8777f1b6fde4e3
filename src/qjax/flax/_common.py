"""What the Linen and NNX adapters share: layer configs, rules and activation quantization.

The rule language (module path or weight path, first match wins, layout-following
shorthand, unmatched rules reported) is described once, in :mod:`qjax.flax`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from qjax import granularity as gran
from qjax.calibration import ema
from qjax.exact import unfused
from qjax.lsq import (
    check_learnable,
    default_grad_scale,
    learnable_params,
    learned_qparams,
    lsq_fake_quant,
)
from qjax.ops import fake_quant
from qjax.palettize import TableFormat
from qjax.qparams import QParams, block_range, compute_qparams, qparams_from_minmax
from qjax.resolve import (
    NAMED_DEFAULT,
    LayoutReading,
    QjaxRuleWarning,
    contraction_reading,
    fit_to_shape,
    is_catch_all,
    layout_reading,
    report_unmatched,
    with_layout_axes,
)
from qjax.rules import Calibration, LeafRule, parse_leaf_rule, parse_spec, rule_items
from qjax.spec import QuantSpec, as_spec

__all__ = [
    "ActQuant",
    "FlaxRules",
    "LayerQuant",
    "ModelPlan",
    "ModelPlanRow",
    "Rule",
    "RuleValue",
    "Rules",
    "activation_qparams",
    "as_layer_quant",
    "layer_reading",
    "learned_activation",
    "learned_input_init",
    "learned_input_qparams",
    "learned_weight_init",
    "quantize_activation",
    "split_lsq",
    "weight_spec_problem",
]


def activation_spec(value: QuantSpec | str, where: str) -> QuantSpec:
    """An activation's spec: shorthand ``per_block`` without ``axis=`` blocks the last
    axis, the features a layer contracts (a weight's shorthand blocks a kernel's inputs,
    axis -2).

    Examples:
      >>> print(activation_spec("int8:per_block:32", "act").granularity)
      per_block(axis=-1, block_size=32)
    """
    spec = as_spec(value, where)
    g = spec.granularity
    if isinstance(value, str) and g.kind == "per_block" and "axis=" not in value:
        spec = dataclasses.replace(spec, granularity=gran.per_block(-1, g.block_size))
    return spec


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
        object.__setattr__(self, "spec", activation_spec(self.spec, "ActQuant spec"))
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """What a quantized layer does: a weight spec and an optional activation spec.

    Both take shorthand text: a weight's follows the weight's layout (per output channel,
    blocks along the inputs), an activation's ``per_block`` blocks its last axis, the
    features the layer contracts (:func:`activation_spec`).

    ``integer_dot=True`` (Linen: :func:`qjax.flax.linen.intercept` and ``QuantDense``)
    runs a Dense / DenseGeneral forward as int8 x int8 -> int32, the way the served model
    and Qwix's QAT run it: weight and activation specs must be signed symmetric integers
    of at most 8 bits whose scales factor out of the contraction (per-tensor or per-token
    activations, per-tensor or per-channel(-1) weights). The output equals the
    fake-quant one up to float rounding (bit-exact with :mod:`qjax.flax.serve`'s integer
    path) and the gradients are unchanged. Off by default: fake-quant QAT is bit-exact
    with ``fake_quant`` everywhere.

    ``learn_scale=True`` (shorthand suffix ``:lsq``, e.g. ``"int2:per_channel:lsq"``)
    trains the scales as parameters, with LSQ's gradients (:func:`qjax.lsq.lsq_fake_quant`):
    the weight's scale (and for an asymmetric spec its offset, LSQ+) and, with an
    activation spec, the input's. They start from the usual calibration: the weight's
    :func:`~qjax.compute_qparams` (min-max), the input's dynamic params of the first batch
    (or its calibrated static range). Linen keeps them in the layer's ``params`` as
    ``kernel_scale`` / ``kernel_offset`` (``embedding_...`` for an Embed) and
    ``input_scale`` / ``input_offset``; NNX as :class:`flax.nnx.Param` s of the
    :class:`~qjax.flax.nnx.QuantOp`. The specs must have integer targets, and a learned
    input scale needs blocks that span every axis but the last (per tensor, or per
    channel of the last axis): one value per block whatever the batch.

    ``calibration`` (with ``learn_scale=True`` only; shorthand: a calibration token next
    to ``lsq``, e.g. ``"int2:per_channel:mse:lsq"``) starts the learned weight scale from
    :func:`~qjax.calibrate` by that method instead of min-max. At 2 and 3 bits min-max
    scales clip nothing, so the largest weights set the step and most weights share the
    few levels near zero; in a short fine-tune LSQ's steps do not get far from them, and
    an MSE-calibrated start matters more than the learning (the README's LSQ section
    measures both on a language model).

    Examples:
      >>> import qjax
      >>> from qjax.flax.linen import LayerQuant
      >>> LayerQuant(weight=qjax.QuantSpec("mxfp4"), learn_scale=True)
      Traceback (most recent call last):
        ...
      ValueError: LayerQuant weight: learned scales (LSQ) need an integer target, ...
      >>> LayerQuant(weight=qjax.QuantSpec("int2"), calibration=qjax.Calibration("mse"))
      Traceback (most recent call last):
        ...
      ValueError: LayerQuant: calibration 'mse' sets where a learned weight scale starts, ...
    """

    weight: QuantSpec | None = None
    act: ActQuant | None = None
    integer_dot: bool = False
    learn_scale: bool = False
    calibration: Calibration | None = None
    weight_text: str | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )
    """The shorthand the weight spec was given as (its axes then follow each weight's
    layout, as a rule's shorthand does), or None."""

    def __post_init__(self):
        if isinstance(self.weight, str):
            object.__setattr__(self, "weight_text", self.weight)
        if self.weight is not None:
            object.__setattr__(self, "weight", as_spec(self.weight, "LayerQuant weight"))
        if self.act is not None and not isinstance(self.act, ActQuant):
            if not isinstance(self.act, QuantSpec | str):
                raise TypeError(
                    "LayerQuant act must be an ActQuant, a QuantSpec or shorthand text "
                    f"(dynamic ranges), or None, got {type(self.act).__name__}"
                )
            object.__setattr__(self, "act", ActQuant(activation_spec(self.act, "LayerQuant act")))
        if self.calibration is not None:
            if not isinstance(self.calibration, Calibration):
                raise TypeError(
                    "LayerQuant.calibration must be a qjax.Calibration or None, got "
                    f"{self.calibration!r}"
                )
            if not self.learn_scale or self.weight is None:
                raise ValueError(
                    f"LayerQuant: calibration {str(self.calibration)!r} sets where a learned "
                    "weight scale starts, so it needs a weight spec and learn_scale=True "
                    "(shorthand ':lsq'). Without learned scales, QAT recomputes min-max "
                    "scales from the weight at every step: drop the calibration, or add "
                    "learn_scale=True"
                )
        if not self.learn_scale:
            return
        if self.weight is None and self.act is None:
            raise ValueError(
                "LayerQuant: learn_scale=True needs a weight or an activation spec to learn "
                "the scales of"
            )
        if self.weight is not None:
            check_learnable(self.weight, "LayerQuant weight")
        if self.act is not None:
            check_learnable(self.act.spec, "LayerQuant act")
            if self.act.spec.granularity.kind == "per_token":
                raise ValueError(
                    "LayerQuant act: a learned input scale is one parameter per block, but "
                    "per_token blocks change with the batch; use per_tensor() or "
                    "per_channel(-1) activations, or learn_scale=False"
                )


LEARNED_NOTE = "learned scales, LSQ"
"""The plan note of a weight whose rule learns its scales."""


def learned_note(quant: LayerQuant) -> str:
    """The plan note of a layer: :data:`LEARNED_NOTE` (with the calibration the learned
    weight scale starts from, if not min-max), or empty where nothing is learned."""
    if not quant.learn_scale:
        return ""
    return LEARNED_NOTE + (f", from {quant.calibration}" if quant.calibration else "")


LSQ_TOKEN = "lsq"
"""The shorthand token (``"int2:per_channel:lsq"``) that sets ``learn_scale=True``."""


def learned_weight_init(
    weight: jax.Array, spec: QuantSpec, calibration: Calibration | None
) -> tuple[jax.Array, jax.Array | None]:
    """The ``(scale, offset)`` a learned weight scale starts from: the weight's min-max
    params (``calibration`` None), or :func:`~qjax.calibrate`'s by ``calibration``."""
    weight = jax.lax.stop_gradient(weight)
    if calibration is None:
        return learnable_params(compute_qparams(weight, spec), spec)
    return learnable_params(calibration.qparams(weight, spec), spec)


def split_lsq(text: str) -> tuple[str, bool]:
    """Shorthand without its ``lsq`` token, and whether it had one.

    Examples:
      >>> from qjax.flax._common import split_lsq
      >>> split_lsq("int2:per_channel:lsq"), split_lsq("int8")
      (('int2:per_channel', True), ('int8', False))
    """
    tokens = [token.strip() for token in text.split(":")]
    learned = tokens.count(LSQ_TOKEN)
    if learned > 1:
        raise ValueError(f"spec {text!r}: token {LSQ_TOKEN!r} is repeated; give it once")
    if learned and tokens.index(LSQ_TOKEN) == 0:
        raise ValueError(
            f"spec {text!r}: {LSQ_TOKEN!r} follows a spec, e.g. 'int2:per_channel:lsq'"
        )
    return ":".join(t for t in tokens if t != LSQ_TOKEN), bool(learned)


RuleValue = Union[LayerQuant, QuantSpec, str, None]
FlaxRules = Union[Mapping[str, RuleValue], Sequence[Union[tuple[str, RuleValue], str]]]
"""Rules as :func:`qjax.rules.parse_rules` takes them (a mapping ``{regex: value}``, a
list of pairs or of ``"REGEX=SPEC"`` strings), with :class:`LayerQuant` values too."""


def as_layer_quant(value: RuleValue, where: str) -> LayerQuant | None:
    """A rule's value as a LayerQuant: a QuantSpec or shorthand quantizes weights only."""
    if value is None or isinstance(value, LayerQuant):
        return value
    if isinstance(value, QuantSpec):
        return LayerQuant(weight=value)
    if isinstance(value, str):
        try:
            text, learn = split_lsq(value)
            spec, calibration = _qat_shorthand(text, learn)
            if spec is None and learn:
                raise ValueError(
                    f"spec {value!r} keeps the layer float, so it has no scale to learn: "
                    f"drop {LSQ_TOKEN!r}"
                )
            if spec is None:
                return None
            return LayerQuant(weight=spec, learn_scale=learn, calibration=calibration)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    raise TypeError(
        f"{where}: expected a LayerQuant, QuantSpec, shorthand text or None, "
        f"got {type(value).__name__}"
    )


def _qat_shorthand(text: str, learn: bool) -> tuple[QuantSpec | None, Calibration | None]:
    """The spec of a QAT rule's shorthand (its ``lsq`` token removed) and, with ``learn``,
    the calibration its learned weight scale starts from (``"int2:per_channel:mse"``)."""
    leaf = parse_leaf_rule(text)
    if isinstance(leaf.spec, TableFormat):
        parse_spec(text)  # raises: a lookup table is no QuantSpec (the error says what is)
    if leaf.stack:
        raise ValueError(
            f"spec {text!r}: stack={leaf.stack} is for parameter trees and files; QAT, "
            "convert and serving see the layers nn.scan / nn.vmap stack from the model: "
            "drop it"
        )
    if leaf.calibration is not None and not learn:
        calibration = str(leaf.calibration)
        raise ValueError(
            f"spec {text!r}: calibration {calibration!r} in a QAT rule sets where a learned "
            f"weight scale starts, so it needs {LSQ_TOKEN!r} too ('{text}:lsq'); without "
            f"learned scales QAT recomputes min-max scales at every step: drop {calibration!r}"
        )
    return leaf.spec, leaf.calibration


def _weight_shorthand(value: RuleValue) -> LeafRule | None:
    """The parsed shorthand of a rule's weight spec (text, or a LayerQuant's
    ``weight_text``), else None (a QuantSpec: used as given)."""
    if isinstance(value, LayerQuant):
        value = value.weight_text
    if not isinstance(value, str):
        return None
    return parse_leaf_rule(split_lsq(value)[0])


@dataclasses.dataclass(frozen=True)
class Rule:
    """One compiled rule: its regex, its value as a LayerQuant (None: stays float).

    ``shorthand``: the parsed text where the weight spec was given as shorthand (the
    rule's value, or a LayerQuant's ``weight``). Without ``axis=`` (``"int8:per_channel"``,
    ``"int4:per_block:32"``, ``"mxfp4"``) its axes follow each weight's layout as in
    :class:`qjax.resolve.RulePlan`: a kernel ``[..., in, out]`` is scaled per output
    channel (-1) and blocked along its inputs (-2), an Embed table ``[vocab, features]``
    per row and along its features; with or without, a block that does not divide the
    weight falls back to per-channel scales, as in PTQ.
    """

    pattern: str
    quant: LayerQuant | None
    fullmatch: Callable[[str], Any]
    shorthand: LeafRule | None = None

    def weight_spec(
        self, param_path: str, shape: tuple[int, ...], layer: Any = None, einsum_str: Any = None
    ) -> QuantSpec | None:
        """The weight spec for the weight at ``param_path`` (``".../kernel"``) of ``shape``;
        ``layer`` (and an Einsum's call-time ``einsum_str``): the layer that owns it, whose
        configuration tells its layout where the name does not (:func:`layer_reading`)."""
        return self.weight_spec_note(param_path, shape, layer, einsum_str)[0]

    def weight_spec_note(
        self, param_path: str, shape: tuple[int, ...], layer: Any = None, einsum_str: Any = None
    ) -> tuple[QuantSpec | None, str]:
        """:meth:`weight_spec`, and a note where shorthand falls back: its axes follow the
        weight's layout, and a block that does not divide the weight's input axis (a
        3-channel input conv) gives per-channel scales, as :func:`qjax.quantize_tree`
        does (:func:`~qjax.resolve.fit_to_shape`). An explicit QuantSpec is used as given.

        Without the ``layer`` (:func:`qjax.flax.serve.convert` given no model) the layout
        comes from the name alone, which may be wrong (a DenseGeneral's ``[in, heads,
        head_dim]``): there a block that does not divide is a ``ValueError`` saying to
        pass the model, not a silent fallback."""
        if self.quant is None or self.quant.weight is None or self.shorthand is None:
            return (None if self.quant is None else self.quant.weight), ""
        reading = layer_reading(layer, param_path, shape, einsum_str)
        spec = self.quant.weight
        if self.shorthand.template:
            spec = with_layout_axes(self.shorthand.spec, reading, len(shape))
        try:
            fitted, note = fit_to_shape(param_path, shape, spec, reading)
        except ValueError:  # an axis out of range: the caller says so, naming the layer
            return spec, ""
        if note and layer is None:
            raise ValueError(
                f"rule {self.pattern!r} on params/{param_path} {tuple(shape)}, read from its "
                f"name as {reading.what}: {note.partition(': ')[2]}. Pass the model "
                "(serve.convert(variables, rules, model, *example_inputs)): its layers tell "
                "the layout, and a block that does not divide falls back per channel as in QAT"
            )
        return fitted, note


def layer_reading(
    layer: Any, param_path: str, shape: tuple[int, ...], einsum_str: Any = None
) -> LayoutReading:
    """How a layer's weight is read: from the layer's configuration where its name tells
    nothing more than ``[..., in, out]``, else from the name
    (:func:`~qjax.resolve.layout_reading`: attention projections, GPT-2, embeddings).

    The configuration tells: a DenseGeneral / LinearGeneral with batch dims, several
    contracted axes or several output axes (``[batch..., in..., out...]``), an Einsum by
    its equation, a ConvTranspose with ``transpose_kernel=True`` (``[..., out, in]``).
    Such kernels get one scale per output (per batch index too), and blocks of inputs
    along the innermost contracted axis. ``einsum_str``: an Einsum's call-time equation.

    Examples:
      >>> import flax.linen as nn
      >>> r = layer_reading(nn.DenseGeneral((4, 16)), "proj/kernel", (32, 4, 16))
      >>> r.contraction, r.all_channels
      (-3, True)
      >>> layer_reading(nn.Dense(8), "fc/kernel", (32, 8)).what
      '[..., in, out]'
    """
    named = layout_reading(param_path.split("/"), shape, "flax")
    if layer is None or named.what != NAMED_DEFAULT or len(shape) < 2:
        return named
    return _configured_reading(layer, len(shape), einsum_str) or named


def _configured_reading(layer: Any, ndim: int, einsum_str: Any) -> LayoutReading | None:
    """The reading a layer's configuration gives, or None where it is ``[..., in, out]``."""
    if isinstance(layer, nn.ConvTranspose | nnx.ConvTranspose) and layer.transpose_kernel:
        return LayoutReading("flax", -2, -1, "ConvTranspose(transpose_kernel) [..., out, in]")
    if isinstance(layer, nn.DenseGeneral):
        batch, inputs = len(layer.batch_dims), len(_as_tuple(layer.axis))
    elif isinstance(layer, nnx.LinearGeneral):
        batch, inputs = len(layer.batch_axis), len(layer.in_features)
    elif isinstance(layer, nn.Einsum | nnx.Einsum):
        return _einsum_reading(einsum_str or layer.einsum_str, ndim)
    else:
        return None
    contracted = list(range(batch, batch + inputs))
    outputs = list(range(batch + inputs, ndim))
    return contraction_reading(contracted, outputs, ndim, type(layer).__name__)


def _einsum_reading(equation: Any, ndim: int) -> LayoutReading | None:
    """The reading of an Einsum kernel (the equation's second operand), or None where the
    equation is not ``"lhs,kernel->out"`` with one label per kernel axis."""
    if not isinstance(equation, str):
        return None
    operands, _, out = equation.replace(" ", "").partition("->")
    parts = operands.split(",")
    if len(parts) != 2 or "." in parts[1] or len(parts[1]) != ndim:
        return None
    lhs, kernel = parts
    contracted = [i for i, c in enumerate(kernel) if c not in out]
    outputs = [i for i, c in enumerate(kernel) if c in out and c not in lhs]
    return contraction_reading(contracted, outputs, ndim, f"Einsum {kernel!r}")


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,)


WEIGHT_LIKE = (None, "kernel", "embedding", "weight")
"""What a rule may name in a layer qjax does not quantize: the layer, or a weight-like
parameter of it."""


class Rules:
    """Compiled rules, first match wins, remembering which rules won a layer.

    Args:
      rules: ``{regex: LayerQuant | QuantSpec | shorthand | None}``.
      collection: the variable collection the weights live in (``"params"`` for Linen),
        also tried as a prefix of the weight's path; None for NNX.

    Examples:
      >>> from qjax.flax._common import Rules
      >>> rules = Rules({".*head.*": None, ".*kernel": "int8", "unused": "int4"})
      >>> rules.find("Block_0/Dense_0", "kernel").pattern
      '.*kernel'
      >>> rules.find("head", "kernel").quant is None
      True
      >>> rules.unmatched()
      ['unused']
    """

    def __init__(self, rules: FlaxRules, *, collection: str | None = "params"):
        if rules is None:
            raise TypeError(
                "rules must be given: the Flax adapters have no default rules; e.g. "
                "{'.*': 'int8:per_channel'} for every layer's weight"
            )
        self.rules = [
            Rule(
                pattern,
                as_layer_quant(value, f"rule {pattern!r}"),
                re.compile(pattern).fullmatch,
                _weight_shorthand(value),
            )
            for pattern, value in rule_items(rules, allow_empty=True)
        ]
        self.collection = collection
        self._won: set[str] = set()
        self._others: dict[str, str] = {}  # path -> type of the layers qjax does not quantize

    def names(self, module_path: str, weight: str | None) -> tuple[str, ...]:
        """The names a rule may match for a layer: its path, its weight's path(s)."""
        if weight is None:
            return (module_path,)
        param = f"{module_path}/{weight}" if module_path else weight
        if self.collection is None:
            return module_path, param
        return module_path, param, f"{self.collection}/{param}"

    def find(self, module_path: str, weight: str | None) -> Rule | None:
        """The first rule matching the layer at ``module_path`` (reading ``weight``)."""
        rule = self.first_match(module_path, weight)
        if rule is not None:
            self._won.add(rule.pattern)
        return rule

    def first_match(self, module_path: str, weight: str | None) -> Rule | None:
        """As :meth:`find`, without counting the rule as one that won a layer."""
        names = self.names(module_path, weight)
        return next((r for r in self.rules if any(r.fullmatch(n) for n in names)), None)

    def saw_other(self, module_path: str, kind: str) -> None:
        """Notes a layer (of type ``kind``) that qjax does not quantize, so that a rule
        naming only such layers can say so."""
        self._others.setdefault(module_path, kind)

    def unmatched(self) -> list[str]:
        """The patterns that have won no layer so far, in rule order; catch-alls (``.*``:
        "every other layer") name no layer and are not listed."""
        return [
            rule.pattern
            for rule in self.rules
            if rule.pattern not in self._won and not is_catch_all(rule.pattern)
        ]

    def check(self, *, strict: bool, where: str, stacklevel: int = 2) -> None:
        """Warns (or with ``strict``, raises ValueError) about the rules that won no layer.

        ``stacklevel`` as for ``warnings.warn`` called where ``check`` is called.
        """
        unmatched, others = [], []
        for pattern in self.unmatched():
            rule = next(r for r in self.rules if r.pattern == pattern)
            named = [
                (path, kind)
                for path, kind in self._others.items()
                if any(rule.fullmatch(n) for w in WEIGHT_LIKE for n in self.names(path, w))
            ]
            (others if named else unmatched).append((pattern, named))
        report_unmatched(
            [pattern for pattern, _ in unmatched],
            strict=strict,
            where=where,
            listing="qjax.flax.linen.plan or qjax.flax.nnx.plan",
            stacklevel=stacklevel + 1,
        )
        for pattern, named in others:
            layers = ", ".join(f"{p!r} ({k})" for p, k in named[:3])
            message = (
                f"{where}: rule {pattern!r} matched only layers qjax does not quantize: "
                f"{layers}{', ...' if len(named) > 3 else ''}; they stay float (qjax "
                "quantizes Dense, DenseGeneral, Conv, ConvTranspose, Einsum and Embed "
                "layers and their subclasses)"
            )
            if strict:
                raise ValueError(message)
            warnings.warn(message, QjaxRuleWarning, stacklevel=stacklevel + 1)


def weight_spec_problem(shape: tuple[int, ...], dtype: Any, spec: QuantSpec) -> str | None:
    """Why ``spec`` cannot quantize a weight of this shape and dtype, or None (no compute)."""
    try:
        jax.eval_shape(
            functools.partial(compute_qparams, spec=spec), jax.ShapeDtypeStruct(shape, dtype)
        )
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def cannot_quantize(path: str, layer: str, weight: str, shape: tuple, rule: str, why: str) -> str:
    """The error text for a rule that reaches a weight it cannot quantize."""
    return (
        f"rule {rule!r} reaches layer {path!r} ({layer}), whose {weight} {tuple(shape)} it "
        f"cannot quantize: {why}. Give that layer its own rule before {rule!r}: a spec that "
        f"fits, or {{{re.escape(path)!r}: None}} to keep it float"
    )


def refuse_embed_activation(path: str, rule: str) -> str:
    """The error text for an activation spec on an Embed (its input is integer ids)."""
    return (
        f"rule {rule!r} gives layer {path!r} (Embed) an activation spec, but an Embed's "
        "input is integer ids, which qjax does not quantize: add a rule with a weight spec "
        f"only for it before {rule!r}, e.g. {{{re.escape(path)!r}: 'int8:per_channel'}}"
    )


@dataclasses.dataclass(frozen=True)
class ModelPlanRow:
    """One parameter of a model, and what the rules do to it.

    Attributes:
      path: its path in the parameter tree, ``"Block_0/Dense_0/kernel"``.
      shape: its shape.
      dtype: its dtype's name.
      layer: the type of the layer that owns it (``"Dense"``), or None if unknown.
      pattern: the rule that decides it, or None.
      spec: the weight spec it is quantized with, or None (stays float).
      act: the activation spec of its layer's input, or None.
      note: why it stays float, or why the rule fails on it (then ``spec`` is None).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    layer: str | None
    pattern: str | None
    spec: QuantSpec | None
    act: ActQuant | None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """What a set of rules does to each parameter of a model; ``str()`` is a table.

    Attributes:
      rows: one :class:`ModelPlanRow` per parameter, in tree order.
      unmatched: the rules that win no layer.
    """

    rows: tuple[ModelPlanRow, ...]
    unmatched: tuple[str, ...]

    @property
    def quantized(self) -> dict[str, QuantSpec]:
        """``{param path: weight spec}`` of the parameters the rules quantize."""
        return {row.path: row.spec for row in self.rows if row.spec is not None}

    @property
    def errors(self) -> dict[str, str]:
        """``{param path: why}`` of the weights a rule reaches but cannot quantize."""
        return {row.path: row.note for row in self.rows if row.note.startswith("error")}

    def __str__(self) -> str:
        table = [("path", "shape", "layer", "rule", "quantization")]
        for row in self.rows:
            what = str(row.spec) if row.spec is not None else f"float ({row.note})"
            if row.act is not None and row.spec is not None:
                what += f", input {row.act.spec}{' static' if row.act.static else ''}"
            if row.spec is not None and row.note:
                what += f" ({row.note})"
            pattern = "-" if row.pattern is None else repr(row.pattern)
            table.append((row.path, str(row.shape), row.layer or "-", pattern, what))
        widths = [max(len(r[i]) for r in table) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in table]
        if self.unmatched:
            lines.append(f"rules that match no layer: {', '.join(map(repr, self.unmatched))}")
        return "\n".join(line.rstrip() for line in lines)


def plan_row(
    rules: Rules,
    param: str,
    value: Any,
    layer: type | None,
    weight: str | None,
    hookless: bool = False,
    *,
    module: Any = None,
    einsum_str: Any = None,
    layer_shape: tuple[int, ...] | None = None,
) -> ModelPlanRow:
    """The :class:`ModelPlanRow` of one parameter; ``weight`` names the layer's weight parameter.

    ``hookless``: the layer type is one qjax cannot quantize (NNX ConvTranspose, Embed).
    ``module`` (and an Einsum's call-time ``einsum_str``): the layer, whose configuration
    tells its weight's layout (:func:`layer_reading`); ``layer_shape``: one layer's weight
    shape where the value stacks copies of the layer (the spec is one layer's).
    """
    shape, dtype = tuple(value.shape), jnp.dtype(value.dtype).name
    layer_name = None if layer is None else layer.__name__
    module_path, _, name = param.rpartition("/")
    row = functools.partial(ModelPlanRow, param, shape, dtype, layer_name)
    if weight is None or name != weight:
        if weight:
            why = f"rules quantize {layer_name}'s {weight} only"
        else:
            why = "no layer" if layer is None else f"{layer_name} is not a layer qjax quantizes"
        return row(None, None, None, why)
    rule = rules.find(module_path, weight)
    if rule is None:
        return row(None, None, None, "no rule matches")
    quant = rule.quant
    if quant is None or (quant.weight is None and quant.act is None):
        return row(rule.pattern, None, None, "the rule keeps it float")
    if hookless:
        return row(rule.pattern, None, None, f"error: NNX gives {layer_name} no operator hook")
    if quant.act is not None and weight == "embedding":
        why = refuse_embed_activation(module_path, rule.pattern)
        return row(rule.pattern, None, None, "error: " + why)
    one = shape if layer_shape is None else tuple(layer_shape)
    spec, fallback = rule.weight_spec_note(param, one, module, einsum_str)
    if spec is None:
        return row(rule.pattern, None, quant.act, "the rule quantizes only the input")
    problem = weight_spec_problem(one, value.dtype, spec)
    if problem is not None:
        why = cannot_quantize(module_path, layer_name, name, shape, rule.pattern, problem)
        return row(rule.pattern, None, None, "error: " + why)
    notes = [note for note in (fallback, learned_note(quant)) if note]
    return row(rule.pattern, spec, quant.act, "; ".join(notes))


def rounded(values: jax.Array) -> jax.Array:
    """Fake-quantized or dequantized values, kept apart from the ops that consume them.

    Both are ``scale * q`` products. Under jit, XLA:CPU contracts a product that feeds an
    add into one fused multiply-add (one rounding instead of two) wherever its fusion
    decisions allow, and those differ between the QAT graph (``fake_quant(w)``) and the
    served one (``dequantize(qarray)``): an Embed table whose rows are summed with other
    embeddings, or a bias added to a product, then differ in the last bit, and through
    many quantized layers such bits move activation codes. :func:`qjax.exact.unfused`
    rounds the product on its own in both, so they agree bit for bit (and equal the
    op-by-op result).
    """
    return unfused(values)


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


def learned_activation(
    x: jax.Array, act: ActQuant, scale: jax.Array, offset: jax.Array | None
) -> tuple[jax.Array, QParams]:
    """Fake-quantizes an activation with its learned scale (and offset), LSQ's gradients.

    The params are stored without the leading unit axes of ``x.shape // block_shape``
    (``()`` per tensor, ``(features,)`` per channel of the last axis), as static ranges
    are, so they fit inputs of any rank. The gradient scale counts one example's elements
    per block (the block without its leading, batch, axis), as LSQ does for activations.

    Returns:
      ``(fake-quantized x, the learned params as qjax.QParams)``.

    Raises:
      ValueError: where the spec's blocks do not span every axis but the last.
    """
    scale, offset, blocks = _learned_input_params(x, act, scale, offset)
    per_example = math.prod(blocks[1:]) if len(blocks) > 1 else math.prod(blocks)
    grad_scale = default_grad_scale(per_example, act.spec)
    x_q = lsq_fake_quant(x, act.spec, scale, offset, grad_scale=grad_scale)
    return rounded(x_q), learned_qparams(scale, offset, act.spec)


def learned_input_qparams(
    x: jax.Array, act: ActQuant, scale: jax.Array, offset: jax.Array | None
) -> QParams:
    """The :class:`~qjax.QParams` of learned input params (as :func:`learned_activation`
    stores them) for the input ``x``: what its forward quantizes ``x`` with."""
    scale, offset, _ = _learned_input_params(x, act, scale, offset)
    return learned_qparams(scale, offset, act.spec)


def _learned_input_params(
    x: jax.Array, act: ActQuant, scale: jax.Array, offset: jax.Array | None
) -> tuple[jax.Array, jax.Array | None, tuple[int, ...]]:
    """Stored learned input params reshaped to ``x``'s param shape, and the block shape."""
    blocks = gran.block_shape(x.shape, act.spec.granularity)
    if tuple(blocks[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(
            f"a learned input scale needs blocks that span every axis but the last, but "
            f"{act.spec.granularity} gives blocks {blocks} for input shape {x.shape}; use "
            "per_tensor() or per_channel(-1) activations"
        )
    shape = gran.param_shape(x.shape, blocks)
    for name, value in (("scale", scale), ("offset", offset)):
        if value is not None and math.prod(jnp.shape(value)) != math.prod(shape):
            raise ValueError(
                f"the learned input {name} has shape {jnp.shape(value)}, which does not fit "
                f"this input's blocks {_drop_leading_ones(shape)} (input shape {x.shape})"
            )
    offset = None if offset is None else jnp.reshape(offset, shape)
    return jnp.reshape(scale, shape), offset, blocks


def learned_input_init(
    x: jax.Array, act: ActQuant, stats: Stats | None
) -> tuple[jax.Array, jax.Array | None]:
    """The values a learned input scale (and offset) start from: the calibrated static
    range where there is one, else ``x``'s dynamic params; in the stored shape of
    :func:`learned_activation`."""
    qp, _ = activation_qparams(x, act, stats, calibrating=False)
    scale, offset = learnable_params(qp, act.spec)
    shape = _drop_leading_ones(scale.shape)
    return scale.reshape(shape), None if offset is None else offset.reshape(shape)


def quantize_activation(
    x: jax.Array, act: ActQuant, stats: Stats | None, calibrating: bool
) -> tuple[jax.Array, QParams, Stats | None]:
    """Fake-quantizes an activation with :func:`activation_qparams`' params.

    Returns:
      ``(fake-quantized x, params, stats)``; stats are None for dynamic activations.
    """
    qp, stats = activation_qparams(x, act, stats, calibrating)
    return rounded(fake_quant(x, act.spec, qparams=qp)), qp, stats


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
