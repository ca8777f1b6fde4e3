"""Rules: which leaves of a parameter tree get which QuantSpec, read in which layout.

The rule language is the same everywhere rules are taken (:func:`~qjax.quantize_tree`,
:func:`~qjax.leaf_specs`, :func:`~qjax.plan`, the ``qjax`` command line): an ordered list of
``(regex, spec)`` rules, first ``re.fullmatch`` wins, where a spec is a
:class:`~qjax.QuantSpec`, shorthand text (:func:`parse_spec`), a :class:`LeafRule` or None
(keep float). :class:`RulePlan` turns rules into one :class:`Resolution` per tensor: the
spec with its axes resolved for the tensor's layout, the rule that matched, and why a
tensor stays float or what was changed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax.numpy as jnp

from qjax.calibration import METHODS
from qjax.dtypes import TARGET_DTYPES
from qjax.granularity import Granularity, block_shape, per_block, per_channel, per_tensor, per_token
from qjax.spec import FORMULATIONS, MX_BLOCK_SIZE, MX_PRESETS, SCALE_DTYPES, SCHEMES, QuantSpec

__all__ = [
    "DEFAULT_MIN_SIZE",
    "LAYOUTS",
    "Calibration",
    "LeafRule",
    "Plan",
    "PlanRow",
    "QjaxRuleWarning",
    "Resolution",
    "Rule",
    "RulePlan",
    "RulesLike",
    "default_rules",
    "parse_leaf_rule",
    "parse_rules",
    "parse_spec",
    "report_unmatched",
]

DEFAULT_MIN_SIZE = 1024
"""Catch-all and default rules leave floating tensors with fewer elements float."""

LAYOUTS = ("auto", "flax", "torch")
"""How tensors are read: from each name (``auto``), all Flax, or all PyTorch."""

KEEP = ("keep", "float", "none")
"""Shorthand for a spec of None: the tensor stays as it is."""

_GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_block")
_CALIBRATIONS = tuple(m for m in METHODS if m != "percentile")
_EMBEDDING = re.compile(
    r"(.*_)?embeddings?|embed(_tokens|_positions)?|wte|wpe|lm_head|shared|tok_embeddings"
)
"""Names of embedding tables (a Flax ``embedding`` leaf or a PyTorch module holding ``weight``)."""
_GPT2_CONV1D = ("c_attn", "c_proj", "c_fc", "q_attn")
"""Hugging Face GPT-2 ``Conv1D`` modules: their ``weight`` is ``[in, out]``, not ``[out, in]``."""


class QjaxRuleWarning(UserWarning):
    """A rule that matched nothing (an error instead with ``strict=True``)."""


# Rule values.


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How a rule's leaves get their quant params in PTQ: :func:`~qjax.calibrate`'s method.

    Attributes:
      method: ``"minmax"`` (what :func:`~qjax.quantize` does by itself), ``"absmax"``,
        ``"percentile"`` or ``"mse"``; shorthand tokens ``minmax``, ``absmax``, ``mse``,
        ``percentile=P``.
      percentile: ``P`` in ``(0, 100]`` for ``"percentile"``.

    Examples:
      >>> from qjax.rules import Calibration
      >>> print(Calibration("percentile", 99.9))
      percentile=99.9
    """

    method: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(
                f"calibration method must be one of {METHODS}, got {self.method!r}"
            )
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 100:
            raise ValueError(f"calibration percentile must be a number in (0, 100], got {p!r}")
        object.__setattr__(self, "percentile", float(p))

    def __str__(self) -> str:
        if self.method == "percentile":
            return f"percentile={self.percentile!r}"
        return self.method


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """What a rule gives the leaves it matches.

    Attributes:
      spec: the :class:`~qjax.QuantSpec`, or None to keep the leaves float.
      calibration: how PTQ computes the params (:class:`Calibration`); None is min-max,
        what :func:`~qjax.quantize` does by itself.
      template: True for shorthand that names a granularity without ``axis=`` (such as
        ``"int8:per_channel"``, ``"int4:per_block:32"``, ``"mxfp4"``): its axes come from
        each tensor's layout (see :class:`RulePlan`); ``spec`` holds :func:`parse_spec`'s
        reading of it.
      general: True for the built-in :func:`default_rules`: like a catch-all pattern, the
        rule leaves float the tensors with fewer than 2 dimensions or ``min_size`` elements.

    Examples:
      >>> from qjax.rules import parse_leaf_rule
      >>> print(parse_leaf_rule("int4:per_block:32:mse"))
      int4:symmetric:scale:per_block:32:mse
    """

    spec: QuantSpec | None
    calibration: Calibration | None = None
    template: bool = False
    general: bool = False

    def __post_init__(self):
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise TypeError(f"LeafRule.spec must be a QuantSpec or None, got {self.spec!r}")
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise TypeError(
                f"LeafRule.calibration must be a qjax.rules.Calibration or None, "
                f"got {self.calibration!r}"
            )
        if self.calibration is not None and self.spec is None:
            raise ValueError("LeafRule: a calibration needs a spec (it has no use on float leaves)")

    def __str__(self) -> str:
        if self.spec is None:
            return "keep"
        text = str(self.spec)
        g = self.spec.granularity
        if self.template and g.channel_axis != "all":  # MX presets print their axes
            short = "per_channel" if g.kind == "per_channel" else f"per_block:{g.block_size}"
            text = text.replace(str(g), short)
        return text if self.calibration is None else f"{text}:{self.calibration}"


Rule = tuple[str, LeafRule]
"""A regex matched with ``re.fullmatch`` on a tensor's path, and what its leaves get."""

RuleValue = Union[QuantSpec, LeafRule, str, None]
RulesLike = Union[Mapping[str, RuleValue], Sequence[Union[tuple[str, RuleValue], str]]]


# Parsing.


def parse_spec(text: str) -> QuantSpec | None:
    """Parses the spec shorthand: ``"dtype[:token...]"``, or ``"keep"`` for float.

    Tokens, in any order after the dtype, each at most once: a scheme (``symmetric``,
    ``asymmetric``, ``symmetric_with_clipping``), a formulation (``scale``, ``zero_point``,
    ``minval``), one granularity (``per_tensor``, ``per_channel``, ``per_token``, or
    ``per_block`` followed by its block size), ``axis=N`` (per_channel and per_block only;
    default -1 for per_channel and -2 for per_block, the Flax kernel layout) and
    ``scale=DTYPE``. The MX presets ``mxfp8`` / ``mxfp4`` take no granularity (blocks of 32
    along the last axis); ``axis=N`` moves their blocks (``mxfp4:axis=-2`` for Flax kernels).
    Whitespace around tokens is ignored; inside a token it is refused.

    Without ``axis=``, rules (:class:`RulePlan`) read per_channel, per_block and MX
    shorthand as a template whose axes follow each tensor's layout; the spec returned here
    is its reading for a Flax kernel (an MX preset's for a ``[out, in]`` weight).

    Raises:
      TypeError: when ``text`` is not a string.
      ValueError: naming the token that is not understood, repeated or contradictory.

    Examples:
      >>> from qjax.rules import parse_spec
      >>> print(parse_spec("int4:per_block:32"))
      int4:symmetric:scale:per_block(axis=-2, block_size=32)
      >>> print(parse_spec("uint8 : asymmetric : per_channel : axis=0"))
      uint8:asymmetric:zero_point:per_channel(axis=0)
      >>> parse_spec("keep") is None
      True
      >>> parse_spec("int8:per_channel:per_tensor")
      Traceback (most recent call last):
        ...
      ValueError: spec 'int8:per_channel:per_tensor': 'per_tensor' contradicts 'per_channel' ...
    """
    return _parse(text, "parse_spec: text", calibration=False).spec


def parse_leaf_rule(text: str) -> LeafRule:
    """Parses what a rule gives its leaves: :func:`parse_spec` shorthand plus calibration.

    A calibration token (``minmax``, ``absmax``, ``mse`` or ``percentile=P``) chooses how
    PTQ computes the params (:func:`~qjax.calibrate`), e.g. ``"int4:per_block:32:mse"``.

    Examples:
      >>> from qjax.rules import parse_leaf_rule
      >>> rule = parse_leaf_rule("int4:per_block:32:percentile=99.9")
      >>> rule.calibration, rule.template
      (Calibration(method='percentile', percentile=99.9), True)
    """
    return _parse(text, "spec", calibration=True)


def _parse(text: object, what: str, *, calibration: bool) -> LeafRule:
    if not isinstance(text, str):
        raise TypeError(
            f"{what} must be shorthand text such as 'int8:per_channel' or 'keep', "
            f"got {type(text).__name__} {text!r}"
        )
    tokens = [t.strip() for t in text.split(":")]
    for token in tokens:
        if not token:
            raise ValueError(
                f"spec {text!r}: empty token (a ':' at an end or two in a row); "
                "write e.g. 'int4:per_block:32'"
            )
        if any(c.isspace() for c in token):
            raise ValueError(
                f"spec {text!r}: token {token!r} contains whitespace; write it without "
                f"spaces, e.g. {''.join(token.split())!r}"
            )
    head, rest = tokens[0], tokens[1:]
    if head.lower() in KEEP:
        if rest:
            raise ValueError(
                f"spec {text!r}: {head!r} keeps the tensor float and takes no other "
                f"tokens; drop {rest[0]!r}"
            )
        return LeafRule(None)

    seen: dict[str, str] = {"dtype": head}
    kwargs: dict[str, Any] = {}
    kind = block_size = axis = None
    calib = None

    def claim(slot: str, token: str) -> None:
        if slot in seen:
            verb = "repeats" if seen[slot] == token else f"contradicts {seen[slot]!r}"
            raise ValueError(f"spec {text!r}: {token!r} {verb} (one {slot} per spec)")
        seen[slot] = token

    i = 0
    while i < len(rest):
        token = rest[i]
        if token in TARGET_DTYPES or token in MX_PRESETS:
            claim("dtype", token)
        elif token in SCHEMES:
            claim("scheme", token)
            kwargs["scheme"] = token
        elif token in FORMULATIONS:
            claim("formulation", token)
            kwargs["formulation"] = token
        elif token in _GRANULARITIES:
            claim("granularity", token)
            kind = token
            if token == "per_block":
                if i + 1 >= len(rest) or not re.fullmatch(r"[+-]?\d+", rest[i + 1]):
                    raise ValueError(
                        f"spec {text!r}: per_block needs a block size after it, e.g. per_block:32"
                    )
                i += 1
                block_size = int(rest[i])
                if block_size <= 0:
                    raise ValueError(
                        f"spec {text!r}: block size {rest[i]!r} must be a positive integer"
                    )
        elif token.startswith("axis="):
            claim("axis", token)
            axis = _int_token(text, token)
        elif token.startswith("scale="):
            claim("scale dtype", token)
            if token[6:] not in SCALE_DTYPES:
                raise ValueError(
                    f"spec {text!r}: {token!r} is not a scale dtype; use "
                    f"scale={'|'.join(SCALE_DTYPES)}"
                )
            kwargs["scale_dtype"] = token[6:]
        elif token in _CALIBRATIONS or token.split("=", 1)[0] == "percentile":
            if not calibration:
                raise ValueError(
                    f"spec {text!r}: {token!r} is a calibration method: it belongs in a "
                    "quantize_tree or command-line rule, not in a QuantSpec"
                )
            claim("calibration", token)
            calib = _calibration_token(text, token)
        else:
            raise ValueError(
                f"spec {text!r}: cannot read {token!r}; expected a scheme {SCHEMES}, a "
                f"formulation {FORMULATIONS}, per_tensor, per_channel, per_token, per_block:SIZE, "
                f"axis=N, scale={'|'.join(SCALE_DTYPES)}"
                + (f", or a calibration {_CALIBRATIONS} / percentile=P" if calibration else "")
            )
        i += 1
    if head in MX_PRESETS and kind is not None:
        raise ValueError(f"spec {text!r}: {head} sets its own blocks; drop {kind!r}")
    if axis is not None and kind in ("per_tensor", "per_token"):
        raise ValueError(
            f"spec {text!r}: {seen['axis']!r} has no meaning with {kind} (it has no axis); "
            "drop it, or use per_channel or per_block"
        )
    if axis is not None and kind is None and head not in MX_PRESETS:
        raise ValueError(f"spec {text!r}: {seen['axis']!r} needs per_channel or per_block")
    if head in MX_PRESETS and axis is not None:
        kwargs["granularity"] = per_block(axis, MX_BLOCK_SIZE, channel_axis="all")
    elif kind == "per_tensor":
        kwargs["granularity"] = per_tensor()
    elif kind == "per_token":
        kwargs["granularity"] = per_token()
    elif kind == "per_channel":
        kwargs["granularity"] = per_channel(-1 if axis is None else axis)
    elif kind == "per_block":
        kwargs["granularity"] = per_block(-2 if axis is None else axis, block_size)
    try:
        spec = QuantSpec(head, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"spec {text!r}: {e}") from None
    template = axis is None and (kind in ("per_channel", "per_block") or head in MX_PRESETS)
    return LeafRule(spec, calib, template=template)


def _int_token(text: str, token: str) -> int:
    try:
        return int(token.split("=", 1)[1])
    except ValueError:
        raise ValueError(f"spec {text!r}: {token!r} needs an integer, e.g. axis=0") from None


def _calibration_token(text: str, token: str) -> Calibration:
    if token in _CALIBRATIONS:
        return Calibration(token)
    value = token.partition("=")[2]
    try:
        return Calibration("percentile", float(value))
    except ValueError:
        raise ValueError(
            f"spec {text!r}: {token!r} needs a number in (0, 100], e.g. percentile=99.99"
        ) from None


def parse_rules(rules: RulesLike) -> list[Rule]:
    """Normalises rules to an ordered list of ``(regex, LeafRule)``.

    Accepts a mapping ``{regex: spec}`` (insertion order is match order), a list or tuple
    of ``(regex, spec)`` pairs or ``"REGEX=SPEC"`` strings (as on the command line; the
    SPEC starts at the first ``=`` followed by a dtype or ``keep``, and whitespace around
    that ``=`` is ignored). A spec is a :class:`~qjax.QuantSpec`, a :class:`LeafRule`,
    shorthand text (:func:`parse_leaf_rule`) or None.

    Raises:
      TypeError: for a container, pattern or spec of the wrong type, naming it.
      ValueError: for an invalid regex or spec, naming the rule.

    Examples:
      >>> from qjax.rules import parse_rules
      >>> for pattern, rule in parse_rules({".*attention.*kernel": "int8",
      ...                                   ".*mlp.*kernel": "int4:per_block:32:mse",
      ...                                   ".*": None}):
      ...     print(pattern, rule)
      .*attention.*kernel int8:symmetric:scale:per_tensor
      .*mlp.*kernel int4:symmetric:scale:per_block:32:mse
      .* keep
      >>> parse_rules([".*kernel = int8"])[0][0]
      '.*kernel'
    """
    if isinstance(rules, Mapping):
        items: Sequence[Any] = list(rules.items())
    elif isinstance(rules, (list, tuple)):
        items = rules
    elif isinstance(rules, str):
        raise TypeError(
            f"rules is one string {rules!r}; pass a list of 'REGEX=SPEC' strings, e.g. [{rules!r}]"
        )
    else:
        raise TypeError(
            "rules must be a mapping {regex: spec}, a list of (regex, spec) pairs or "
            f"'REGEX=SPEC' strings, or None for the defaults; got {type(rules).__name__}"
        )
    out: list[Rule] = []
    for item in items:
        if isinstance(item, str):
            pattern, value = _split_rule(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            pattern, value = item
        else:
            raise TypeError(
                f"rule {item!r} must be a (regex, spec) pair or a 'REGEX=SPEC' string"
                + (f", got {len(item)} items" if isinstance(item, (tuple, list)) else "")
            )
        out.append((_check_pattern(pattern), _as_leaf_rule(pattern, value)))
    return out


def _check_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise TypeError(
            f"rule pattern must be a str (a regex matched on tensor paths), got "
            f"{type(pattern).__name__} {pattern!r}"
            + ("; pass pattern.pattern" if isinstance(pattern, re.Pattern) else "")
        )
    if not pattern:
        raise ValueError("rule pattern is empty; write a regex such as '.*kernel' ('.*' for all)")
    if pattern != pattern.strip():
        raise ValueError(
            f"rule pattern {pattern!r} starts or ends with whitespace, which no tensor path "
            f"has; write {pattern.strip()!r}"
        )
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"rule {pattern!r}: invalid regex ({e})") from None
    return pattern


def _as_leaf_rule(pattern: object, value: object) -> LeafRule:
    if isinstance(value, LeafRule):
        return value
    if value is None or isinstance(value, QuantSpec):
        return LeafRule(value)
    if isinstance(value, str):
        try:
            return parse_leaf_rule(value)
        except ValueError as e:
            raise ValueError(f"rule {pattern!r}: {e}") from None
    raise TypeError(
        f"rule {pattern!r}: spec must be a QuantSpec, shorthand text or None (or a "
        f"qjax.rules.LeafRule), got {type(value).__name__} {value!r}"
    )


def _split_rule(text: str) -> tuple[str, str]:
    """Splits ``REGEX=SPEC`` at the ``=`` followed by a dtype name (specs hold ``=`` too)."""
    names = (*TARGET_DTYPES, *MX_PRESETS, *KEEP)
    for i, char in enumerate(text):
        if char == "=" and text[i + 1 :].split(":", 1)[0].strip().lower() in names:
            return text[:i].strip(), text[i + 1 :]
    if "=" in text:  # the spec's dtype is wrong: let the parser say how
        spec = text.partition("=")[2]
        try:
            parse_leaf_rule(spec)
        except ValueError as e:
            raise ValueError(f"rule {text!r}: {e}") from None
    raise ValueError(
        f"rule {text!r} must read REGEX=SPEC with SPEC starting with a dtype or 'keep', "
        "e.g. '.*kernel=int4:per_block:32'"
    )


def default_rules(dtype: str = "int8") -> list[Rule]:
    """The rules used when none are given: every weight matrix per output channel (row).

    One rule for Flax ``kernel`` and ``embedding`` leaves and PyTorch ``weight`` tensors,
    ``"{dtype}:per_channel"`` as a template: each tensor is scaled per output channel in
    its layout (Flax kernels on the last axis, PyTorch ``[out, in, ...]`` weights and
    embedding tables per row). Like catch-all rules, it leaves float the tensors with fewer
    than two dimensions (biases, norm scales) and those under ``min_size`` elements.
    Everything else stays float.

    Examples:
      >>> from qjax.rules import default_rules
      >>> for pattern, rule in default_rules("int4"):
      ...     print(pattern, rule)
      (.*[/.])?(kernel|embedding|weight) int4:symmetric:scale:per_channel
    """
    rule = parse_leaf_rule(f"{dtype}:per_channel")
    return [(r"(.*[/.])?(kernel|embedding|weight)", dataclasses.replace(rule, general=True))]


# Layouts.


@dataclasses.dataclass(frozen=True)
class _Reading:
    """How one tensor is read: its layout, output-channel (row) axis and contraction axis."""

    layout: str
    channel: int
    contraction: int
    what: str


def _read(parts: Sequence[str], ndim: int, layout: str) -> _Reading:
    """The reading of a tensor named ``parts`` with ``ndim`` dimensions in ``layout``."""
    leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if layout == "auto":
        layout = {"kernel": "flax", "embedding": "flax", "weight": "torch"}.get(leaf, "other")
    if ndim < 2:
        return _Reading(layout, -1, -1, f"{ndim}-D")
    embedding = _EMBEDDING.fullmatch(parent if leaf == "weight" else leaf) is not None
    if layout == "torch" and parent in _GPT2_CONV1D:
        return _Reading(layout, -1, -2, "GPT-2 Conv1D [in, out]")
    if layout == "torch":
        what = "embedding [rows, features]" if embedding else "[out, in, ...]"
        return _Reading(layout, 0, 1, what)
    if embedding:
        return _Reading(layout, ndim - 2, ndim - 1, "embedding [rows, features]")
    return _Reading(layout, -1, -2, "[..., in, out]")


def _template(spec: QuantSpec, reading: _Reading, ndim: int) -> QuantSpec:
    """A template spec with the axes of ``reading``."""
    g = spec.granularity
    if g.kind == "per_channel":
        new = per_channel(reading.channel)
    else:
        channel: Any = "all" if g.channel_axis == "all" else reading.channel
        auto = _auto_channel(reading.contraction, ndim)
        if channel != "all" and (auto is None or auto == channel % ndim):
            channel = "auto"
        new = per_block(reading.contraction, g.block_size, channel_axis=channel)
    return dataclasses.replace(spec, granularity=new)


def _auto_channel(axis: int, ndim: int) -> int | None:
    """per_block's ``channel_axis="auto"``: the last axis, or the one before when blocked."""
    if ndim < 2:
        return None
    return ndim - 2 if axis % ndim == ndim - 1 else ndim - 1


def _is_catch_all(pattern: str) -> bool:
    """True for a pattern that matches any path (``.*``, ``.+``, ...): it names no tensor."""
    probe = "\x00catch-all probe/\x01.0"
    return re.fullmatch(pattern, probe) is not None


# Resolution.


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What the rules give one tensor.

    Attributes:
      spec: the spec it gets, with its axes resolved for its layout; None: it stays float.
      pattern: the rule pattern that matched, or None (no rule, or the built-in defaults).
      layout: ``"flax"``, ``"torch"`` or ``"other"``: how the tensor was read.
      note: why it stays float or what was changed, e.g. ``"1-D"``,
        ``"below min_size 1024"``, ``"fallback per_channel(axis=0): block 32 does not
        divide axis 1 (size 16)"``.
      calibration: how PTQ computes its params (None: min-max, as :func:`~qjax.quantize`).
    """

    spec: QuantSpec | None
    pattern: str | None
    layout: str
    note: str = ""
    calibration: Calibration | None = None


class RulePlan:
    """Rules compiled once, resolved tensor by tensor: the one place of layouts and defaults.

    Args:
      rules: ordered rules, first ``re.fullmatch`` wins (see :func:`parse_rules`), matched
        against the tensor's path as given (``"params/Dense_0/kernel"`` or a PyTorch name
        ``"encoder.layer.0.attention.self.query.weight"``) and with every ``.`` turned to
        ``/``. None: :func:`default_rules`.
      layout: ``"auto"`` (default) reads each tensor from its name: Flax ``kernel``
        ``[..., in, out]`` and ``embedding`` ``[vocab, features]``; PyTorch ``weight``
        ``[out, in, ...]`` (Linear, Conv, embeddings, tied ``lm_head``; Hugging Face GPT-2
        ``Conv1D`` weights are ``[in, out]``); other names as Flax kernels, reported as
        ``"other"``. ``"flax"`` or ``"torch"`` reads every tensor in that layout.
        Shorthand without ``axis=`` is a template: per_channel takes the output channel
        (row) axis, per_block and the MX presets block along the contraction (input or
        feature) axis. Explicit ``axis=`` and QuantSpec objects are used as given.
      min_size: catch-all rules (a pattern that matches any path, such as ``.*``) and the
        default rules leave float the tensors with fewer elements (default 1024) and those
        with fewer than two dimensions (biases, norm scales). A rule that names a tensor
        (any other pattern) quantizes it whatever its size and rank.
      fallback: ``"per_channel"`` (default): a tensor whose blocked axis the block size
        does not divide is quantized per channel instead, with a note saying so.
        None: that is a ``ValueError`` naming the tensor (and an axis that would fit).

    Examples:
      >>> from qjax.rules import RulePlan
      >>> plan = RulePlan({".*": "int4:per_block:32"})
      >>> print(plan.resolve("params/Dense_0/kernel", (64, 128), "float32").spec)
      int4:symmetric:scale:per_block(axis=-2, block_size=32)
      >>> r = plan.resolve("bert.encoder.layer.0.output.dense.weight", (384, 1536), "float32")
      >>> print(r.layout, r.spec)
      torch int4:symmetric:scale:per_block(axis=1, block_size=32)
      >>> print(plan.resolve("conv1.weight", (64, 3, 7, 7), "float32").note)
      fallback per_channel(axis=0): block 32 does not divide axis 1 (size 3)
      >>> plan.resolve("dense.bias", (384,), "float32").note
      '1-D'
    """

    def __init__(
        self,
        rules: RulesLike | None = None,
        *,
        layout: str = "auto",
        min_size: int = DEFAULT_MIN_SIZE,
        fallback: str | None = "per_channel",
    ):
        if not isinstance(layout, str) or layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral):
            raise TypeError(
                f"min_size must be a non-negative int (elements), got "
                f"{type(min_size).__name__} {min_size!r}"
            )
        if min_size < 0:
            raise ValueError(f"min_size must be a non-negative int (elements), got {min_size}")
        if fallback not in ("per_channel", None):
            raise ValueError(f"fallback must be 'per_channel' or None, got {fallback!r}")
        self.layout = layout
        self.min_size = int(min_size)
        self.fallback = fallback
        self.user_rules = rules is not None
        """False when the rules are the built-in :func:`default_rules`."""
        parsed = default_rules() if rules is None else parse_rules(rules)
        self.rules: tuple[Rule, ...] = tuple(parsed)
        self._match = [re.compile(pattern).fullmatch for pattern, _ in self.rules]
        self._general = [r.general or _is_catch_all(p) for p, r in self.rules]
        self._used = [False] * len(self.rules)

    def resolve(self, path: str, shape: Sequence[int], dtype: Any) -> Resolution:
        """The :class:`Resolution` of one tensor; records which rule it used.

        Raises:
          ValueError: when the spec cannot fit the tensor (a block that does not divide
            its axis with ``fallback=None``, an axis out of range), naming the tensor.
        """
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, got {type(path).__name__} {path!r}")
        shape = tuple(int(d) for d in shape)
        ndim = len(shape)
        slashed = path.replace(".", "/")
        reading = _read(re.split(r"[./]", path), ndim, self.layout)
        index = next(
            (i for i, m in enumerate(self._match) if m(path) or m(slashed)),
            None,
        )
        if index is None:
            return Resolution(None, None, reading.layout, "no rule matches")
        self._used[index] = True
        pattern, rule = self.rules[index]
        shown = pattern if self.user_rules else None

        def stays(note: str) -> Resolution:
            return Resolution(None, shown, reading.layout, note)

        kind = jnp.dtype(dtype)
        if not jnp.issubdtype(kind, jnp.floating):
            return stays(f"{kind.name} is not floating point")
        if rule.spec is None:
            return stays("kept float by the rule")
        if self._general[index] and ndim < 2:
            return stays(f"{ndim}-D")
        if self._general[index] and math.prod(shape) < self.min_size:
            return stays(f"below min_size {self.min_size}")
        spec = _template(rule.spec, reading, ndim) if rule.template else rule.spec
        spec, note = self._fit(path, shape, spec, reading)
        return Resolution(spec, shown, reading.layout, note, rule.calibration)

    def _fit(
        self, path: str, shape: tuple[int, ...], spec: QuantSpec, reading: _Reading
    ) -> tuple[QuantSpec, str]:
        """The spec (or its fallback) once checked against the shape, and a note."""
        g = spec.granularity
        try:
            block_shape(shape, g)
            return spec, ""
        except ValueError as e:
            if not _misfit_block(shape, g):
                raise ValueError(f"{path!r} (shape {shape}): {e}") from None
        axis = g.axis % len(shape)
        reason = f"block {g.block_size} does not divide axis {axis} (size {shape[axis]})"
        if self.fallback is None:
            fits = [i for i, d in enumerate(shape) if i != axis and d % g.block_size == 0]
            hint = (
                f"; it divides axis {fits[0]} (size {shape[fits[0]]}): if that is the input "
                f"axis, give axis={fits[0]} or the right layout"
                if fits
                else ""
            )
            raise ValueError(
                f"{path!r} (shape {shape}, read as {reading.layout} {reading.what}): {reason}"
                f"{hint}; or choose a block size that divides {shape[axis]}, quantize it "
                "per_channel with a rule, or pass fallback='per_channel'"
            )
        channel = g.channel_axis
        if channel in ("all", "auto"):  # the layout's channel axis, written as it writes it
            auto = _auto_channel(axis, len(shape))
            same = channel == "all" or auto == reading.channel % len(shape)
            channel = reading.channel if same else auto
        fallback: Granularity = per_tensor() if channel is None else per_channel(channel)
        return dataclasses.replace(spec, granularity=fallback), f"fallback {fallback}: {reason}"

    def unmatched(self) -> list[str]:
        """The patterns of the given rules that no resolved tensor used so far.

        A tensor uses the first rule that matches its path, whatever the rule then gives
        it. Catch-all patterns (``.*``: "everything else") and the default rules are not
        listed: they name no tensor.
        """
        return [
            p
            for (p, _), used, general in zip(self.rules, self._used, self._general)
            if not used and not general
        ]

    def check_unmatched(self, *, strict: bool, where: str, stacklevel: int = 2) -> None:
        """Warns (:class:`QjaxRuleWarning`), or raises with ``strict``, for unmatched rules.

        ``stacklevel`` as for :func:`report_unmatched`, counted from this method's caller.
        """
        report_unmatched(self.unmatched(), strict=strict, where=where, stacklevel=stacklevel + 1)


def _misfit_block(shape: tuple[int, ...], g: Granularity) -> bool:
    """True when ``g`` is per_block with an axis in range that its block does not divide."""
    if g.kind != "per_block" or not -len(shape) <= g.axis < len(shape):
        return False
    return shape[g.axis] % g.block_size != 0


def report_unmatched(
    patterns: Sequence[str], *, strict: bool, where: str, stacklevel: int = 2
) -> None:
    """The one place of the "rule matched nothing" message: a warning, or an error.

    Args:
      patterns: the rule patterns that matched nothing (nothing happens when empty).
      strict: raise ``ValueError`` instead of warning with :class:`QjaxRuleWarning`.
      where: what took the rules, e.g. ``"quantize_tree"``, ``"intercept"``, ``"--rule"``.
      stacklevel: the frame the warning points at, as for ``warnings.warn`` called by
        the caller of this function: 2 (default) is the caller's caller.

    Examples:
      >>> from qjax.rules import report_unmatched
      >>> report_unmatched([".*kernal"], strict=True, where="quantize_tree")
      Traceback (most recent call last):
        ...
      ValueError: quantize_tree: rule '.*kernal' matched nothing (no path, or only paths ...
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    if not patterns:
        return
    listed = ", ".join(repr(p) for p in patterns)
    message = (
        f"{where}: rule{'s' if len(patterns) > 1 else ''} {listed} matched nothing (no "
        "path, or only paths an earlier rule took); rules are regexes matched with "
        "re.fullmatch on paths like 'params/Dense_0/kernel' or "
        "'encoder.layer.0.attention.self.query.weight': list the paths with qjax.plan"
    )
    if strict:
        raise ValueError(message)
    warnings.warn(message, QjaxRuleWarning, stacklevel=stacklevel + 1)


# Plans.


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One tensor of a :class:`Plan`: its path, shape and dtype, and its :class:`Resolution`."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: QuantSpec | None
    pattern: str | None
    layout: str
    note: str = ""
    calibration: Calibration | None = None

    @classmethod
    def of(cls, path: str, shape: Sequence[int], dtype: Any, resolution: Resolution) -> PlanRow:
        """The row of a tensor from its resolution (``dtype``: a dtype or its name)."""
        return cls(
            path,
            tuple(int(d) for d in shape),
            dtype if isinstance(dtype, str) else jnp.dtype(dtype).name,
            resolution.spec,
            resolution.pattern,
            resolution.layout,
            resolution.note,
            resolution.calibration,
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """What rules will do to each tensor: a sequence of :class:`PlanRow`, printed as a table."""

    rows: tuple[PlanRow, ...]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PlanRow:
        return self.rows[index]

    def __str__(self) -> str:
        header = ("path", "shape", "dtype", "layout", "spec", "rule", "note")
        table = [header] + [
            (
                r.path,
                "x".join(map(str, r.shape)) or "()",
                r.dtype,
                r.layout,
                "float" if r.spec is None else _spec_text(r.spec, r.calibration),
                r.pattern or ("-" if r.spec is None else "default"),
                r.note,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table
        )


def _spec_text(spec: QuantSpec, calibration: Calibration | None) -> str:
    """The spec as :func:`parse_spec` shorthand without defaults, and its calibration."""
    from qjax.report import short_spec  # qjax.report imports the tree layer, which imports this

    text = short_spec(str(spec))
    return text if calibration is None else f"{text}:{calibration}"
