"""Rules: the rule language that says which tensors get which QuantSpec or lookup table.

The same everywhere rules are taken (:func:`~qjax.quantize_tree`, :func:`~qjax.plan`,
the ``qjax`` command line, the Flax adapters): an ordered list of ``(regex, spec)`` rules,
first ``re.fullmatch`` wins, where a spec is a :class:`~qjax.QuantSpec`, shorthand text
(:func:`parse_spec`, plus a calibration token: :func:`parse_leaf_rule`), a
:class:`LeafRule` or None (keep float). PTQ rules also take lookup tables (NF4 and
k-means palettization: ``"nf4"``, ``"lut4:per_grouped_channel:16"``, a
:class:`~qjax.palettize.TableFormat`); the Flax QAT adapters refuse them. How a rule then
applies to one tensor (its layout, ``min_size``, fallbacks) is
:class:`qjax.resolve.RulePlan`'s job.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax

from qjax.calibration import METHODS, calibrate
from qjax.dtypes import TARGET_DTYPES
from qjax.granularity import per_block, per_channel, per_tensor, per_token
from qjax.packing import CODE_BITS
from qjax.palettize import NF4_BLOCK_SIZE, TableFormat
from qjax.qparams import QParams
from qjax.spec import FORMULATIONS, PRESETS, SCALE_DTYPES, SCHEMES, QuantSpec

__all__ = [
    "DEFAULT_MIN_SIZE",
    "TABLES",
    "Calibration",
    "LeafRule",
    "Rule",
    "RulesLike",
    "default_rules",
    "parse_leaf_rule",
    "parse_rules",
    "parse_spec",
    "rule_items",
]

DEFAULT_MIN_SIZE = 1024
"""Catch-all and default rules leave floating tensors with fewer elements float."""


KEEP = ("keep", "float", "none")
"""Shorthand for a spec of None: the tensor stays as it is."""

TABLES = ("nf4", *(f"lut{bits}" for bits in CODE_BITS))
"""Shorthand heads of lookup-table formats (:class:`~qjax.palettize.TableFormat`): ``nf4``
(QLoRA) and ``lutN``, k-means tables of ``N``-bit indices (:func:`~qjax.palettize.palettize`)."""

_GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_block")
_CALIBRATIONS = tuple(m for m in METHODS if m != "percentile")


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
      >>> import jax.numpy as jnp, qjax
      >>> x = jnp.array([-4.0, 0.1, 0.2, 0.3])  # one outlier
      >>> spec = qjax.QuantSpec("int4")
      >>> bool(Calibration("mse").qparams(x, spec).scale < Calibration().qparams(x, spec).scale)
      True
    """

    method: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 100:
            raise ValueError(f"calibration percentile must be a number in (0, 100], got {p!r}")
        object.__setattr__(self, "percentile", float(p))

    def __str__(self) -> str:
        if self.method == "percentile":
            return f"percentile={self.percentile!r}"
        return self.method

    def qparams(self, x: jax.typing.ArrayLike, spec: QuantSpec) -> QParams:
        """``x``'s params under ``spec`` by this method (:func:`~qjax.calibrate`): what a
        rule with this calibration quantizes with, in PTQ and as a learned scale's start."""
        return calibrate(x, spec, self.method, percentile=self.percentile)


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """What a rule gives the leaves it matches.

    Attributes:
      spec: the :class:`~qjax.QuantSpec`; a lookup-table format
        (:class:`~qjax.palettize.TableFormat`, from shorthand such as ``"nf4"`` or
        ``"lut4:per_grouped_channel:16"``): the leaves become
        :class:`~qjax.palettize.LUTArray` s; or None to keep the leaves float.
      calibration: how PTQ computes the params (:class:`Calibration`); None is min-max,
        what :func:`~qjax.quantize` does by itself. Lookup tables take none.
      template: True for shorthand that names a granularity without ``axis=`` (such as
        ``"int8:per_channel"``, ``"int4:per_block:32"``, ``"mxfp4"``, ``"nf4"``,
        ``"lut4:per_grouped_channel:16"``): its axes come from each tensor's layout (see
        :class:`RulePlan`); ``spec`` holds the shorthand's reading of it for a Flax kernel.
      general: True for the built-in :func:`default_rules`: like a catch-all pattern, the
        rule leaves float the tensors with fewer than 2 dimensions or ``min_size`` elements.
      stack: the number of leading axes that stack copies of a layer (``nn.scan`` layers
        ``[layers, in, out]``, fused MoE experts ``[experts, in, out]``; shorthand
        ``stack=N``): each copy gets its own params, as if quantized one at a time, and
        the spec and layout are those of one copy. 0: the tensor is one layer's.

    Examples:
      >>> from qjax.rules import parse_leaf_rule
      >>> print(parse_leaf_rule("int4:per_block:32:mse"))
      int4:symmetric:scale:per_block:32:mse
      >>> print(parse_leaf_rule("nf4"), parse_leaf_rule("lut4:per_grouped_channel:16:axis=0"))
      nf4:per_block:64 lut4:per_grouped_channel:16:axis=0
    """

    spec: QuantSpec | TableFormat | None
    calibration: Calibration | None = None
    template: bool = False
    general: bool = False
    stack: int = 0

    def __post_init__(self):
        if isinstance(self.stack, bool) or not isinstance(self.stack, int) or self.stack < 0:
            raise TypeError(f"LeafRule.stack must be a non-negative int, got {self.stack!r}")
        if self.stack and not isinstance(self.spec, QuantSpec):
            raise ValueError(
                f"LeafRule: stack={self.stack} needs a QuantSpec (lookup tables and 'keep' "
                "take none)"
            )
        if self.spec is not None and not isinstance(self.spec, QuantSpec | TableFormat):
            raise TypeError(
                "LeafRule.spec must be a QuantSpec or None (or a qjax.palettize.TableFormat "
                f"for lookup tables), got {self.spec!r}"
            )
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise TypeError(
                f"LeafRule.calibration must be a qjax.rules.Calibration or None, "
                f"got {self.calibration!r}"
            )
        if self.calibration is not None and self.spec is None:
            raise ValueError("LeafRule: a calibration needs a spec (it has no use on float leaves)")
        if self.calibration is not None and isinstance(self.spec, TableFormat):
            raise ValueError(
                f"LeafRule: calibration {str(self.calibration)!r} does not apply to the lookup "
                f"table {self.spec}: {_TABLE_PARAMS[self.spec.kind]}; drop it"
            )

    def __str__(self) -> str:
        if self.spec is None:
            return "keep"
        if isinstance(self.spec, TableFormat):
            return self.spec.shorthand(axis=not self.template)
        text = str(self.spec)
        g = self.spec.granularity
        if self.template and g.channel_axis != "all":  # presets print their axes
            short = "per_channel" if g.kind == "per_channel" else f"per_block:{g.block_size}"
            text = text.replace(str(g), short)
        text = text if self.calibration is None else f"{text}:{self.calibration}"
        return f"{text}:stack={self.stack}" if self.stack else text


_TABLE_PARAMS = {
    "nf4": "nf4 scales each block by its absmax",
    "kmeans": "k-means fits the table to the values",
}
"""How each kind of lookup table gets its values: no calibration method applies."""


Rule = tuple[str, LeafRule]
"""A regex matched with ``re.fullmatch`` on a tensor's path, and what its leaves get."""

RuleValue = Union[QuantSpec, TableFormat, LeafRule, str, None]
RulesLike = Union[Mapping[str, RuleValue], Sequence[Union[tuple[str, RuleValue], str]]]


# Parsing.


def parse_spec(text: str) -> QuantSpec | None:
    """Parses the spec shorthand: ``"dtype[:token...]"``, or ``"keep"`` for float.

    Tokens, in any order after the dtype, each at most once: a scheme (``symmetric``,
    ``asymmetric``, ``symmetric_with_clipping``), a formulation (``scale``, ``zero_point``,
    ``minval``), one granularity (``per_tensor``, ``per_channel``, ``per_token``, or
    ``per_block`` followed by its block size), ``axis=N`` (per_channel and per_block only;
    default -1 for per_channel and -2 for per_block, the Flax kernel layout) and
    ``scale=DTYPE``, and ``tensor_scale`` (two-level scaling, with ``scale=float8_e4m3fn``).
    The presets ``mxfp8`` / ``mxfp4`` (blocks of 32) and ``nvfp4`` (blocks of 16, e4m3
    scales and a tensor scale) take no granularity: their blocks run along the last axis,
    and ``axis=N`` moves them (``nvfp4:axis=-2`` for Flax kernels).
    Whitespace around tokens is ignored; inside a token it is refused. Lookup-table
    shorthand (``nf4``, ``lut4``, ...: :func:`parse_leaf_rule`) is no QuantSpec and is
    refused here, with a message that says where it goes.

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
      >>> spec = parse_spec("nvfp4:axis=-2")  # blocks of 16 along the in axis of a Dense kernel
      >>> print(spec.granularity, spec.scale_dtype, spec.tensor_scale)
      per_block(axis=-2, block_size=16, channel_axis='all') float8_e4m3fn True
      >>> parse_spec("int8:per_channel:per_tensor")
      Traceback (most recent call last):
        ...
      ValueError: spec 'int8:per_channel:per_tensor': 'per_tensor' contradicts 'per_channel' ...
    """
    return _parse(text, "parse_spec: text", calibration=False, tables=False).spec


def parse_leaf_rule(text: str) -> LeafRule:
    """Parses what a rule gives its leaves: :func:`parse_spec` shorthand plus calibration,
    or a lookup-table format.

    A calibration token (``minmax``, ``absmax``, ``mse`` or ``percentile=P``) chooses how
    PTQ computes the params (:func:`~qjax.calibrate`), e.g. ``"int4:per_block:32:mse"``.
    ``stack=N`` says the first ``N`` axes stack copies of a layer (``nn.scan`` layers,
    fused MoE experts ``[experts, in, out]``): each copy is quantized on its own, its
    layout read without them (:attr:`LeafRule.stack`), e.g.
    ``"int4:per_block:32:stack=1"``.

    Lookup tables (:class:`~qjax.palettize.TableFormat`; the leaves become
    :class:`~qjax.palettize.LUTArray` s), tokens in any order after the head, each at
    most once:

    * ``nf4``: QLoRA's NF4 (:func:`~qjax.palettize.nf4`), 16 fixed levels and an absmax
      per block of 64 values along the contraction axis; ``per_block:SIZE`` sets the block,
      ``axis=N`` the blocked axis.
    * ``lutN`` (``N`` in 1, 2, 3, 4, 6, 8): a table of ``2**N`` entries fitted by k-means
      (:func:`~qjax.palettize.palettize`): ``per_tensor`` (the default) or
      ``per_grouped_channel:SIZE`` (one table per SIZE output channels), ``scaled`` (each
      output channel divided by its absmax first), ``axis=N`` (the output-channel axis of
      the groups and scales).

    Without ``axis=`` they are templates too: NF4 blocks run along the contraction axis,
    groups and scales along the output channels of each tensor's layout. Lookup tables take
    no calibration, scheme, formulation or scale dtype.

    Raises:
      TypeError: when ``text`` is not a string.
      ValueError: naming the token that is not understood, repeated or contradictory.

    Examples:
      >>> from qjax.rules import parse_leaf_rule
      >>> rule = parse_leaf_rule("int4:per_block:32:percentile=99.9")
      >>> rule.calibration, rule.template
      (Calibration(method='percentile', percentile=99.9), True)
      >>> rule = parse_leaf_rule("lut4:per_grouped_channel:16:scaled")
      >>> rule.spec.kind, rule.spec.group_size, rule.spec.scaled, rule.template
      ('kmeans', 16, True, True)
      >>> parse_leaf_rule("nf4:per_block:128:axis=1").spec.block_size
      128
      >>> parse_leaf_rule("nf4:mse")
      Traceback (most recent call last):
        ...
      ValueError: spec 'nf4:mse': calibration 'mse' does not apply to lookup tables (nf4 scales ...
    """
    return _parse(text, "spec", calibration=True, tables=True)


_LUT_HEAD = re.compile(r"lut\d+")


def _is_table(head: str) -> bool:
    """True for the head of lookup-table shorthand (``nf4``, ``lut4``; ``lut5`` included, so
    that its error is about bits)."""
    return head == "nf4" or _LUT_HEAD.fullmatch(head) is not None


def _tokens(text: object, what: str) -> list[str]:
    """The ``:``-separated tokens of shorthand text, stripped; errors name the text."""
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
    return tokens


def _claim(seen: dict[str, str], text: str, slot: str, token: str) -> None:
    """Records ``token`` in ``slot``, or a ValueError when the slot is taken."""
    if slot in seen:
        verb = "repeats" if seen[slot] == token else f"contradicts {seen[slot]!r}"
        raise ValueError(f"spec {text!r}: {token!r} {verb} (one {slot} per spec)")
    seen[slot] = token


def _size_token(text: str, rest: list[str], i: int, noun: str) -> int:
    """The positive size after ``rest[i]`` (``per_block:32``, ``per_grouped_channel:16``)."""
    if i + 1 >= len(rest) or not re.fullmatch(r"[+-]?\d+", rest[i + 1]):
        raise ValueError(
            f"spec {text!r}: {rest[i]} needs a {noun} size after it, e.g. {rest[i]}:32"
        )
    size = int(rest[i + 1])
    if size <= 0:
        raise ValueError(f"spec {text!r}: {noun} size {rest[i + 1]!r} must be a positive integer")
    return size


def _parse(text: object, what: str, *, calibration: bool, tables: bool) -> LeafRule:
    tokens = _tokens(text, what)
    head, rest = tokens[0], tokens[1:]
    if head.lower() in KEEP:
        if rest:
            raise ValueError(
                f"spec {text!r}: {head!r} keeps the tensor float and takes no other "
                f"tokens; drop {rest[0]!r}"
            )
        return LeafRule(None)
    if _is_table(head):
        if not tables:
            raise ValueError(
                f"spec {text!r} is a lookup-table format (qjax.palettize.TableFormat), not "
                "a QuantSpec: the rules of qjax.quantize_tree, qjax.plan and 'qjax quantize' "
                "take it; for one array call qjax.palettize.nf4 or palettize, and for QAT "
                "qjax.palettize.fake_nf4 or fake_palettize on the weight"
            )
        return _parse_table(text, head, rest)

    seen: dict[str, str] = {"dtype": head}
    kwargs: dict[str, Any] = {}
    kind = block_size = axis = None
    calib = None
    stack = 0

    def claim(slot: str, token: str) -> None:
        _claim(seen, text, slot, token)

    i = 0
    while i < len(rest):
        token = rest[i]
        if token in TARGET_DTYPES or token in PRESETS:
            claim("dtype", token)
        elif token == "tensor_scale":
            claim("tensor scale", token)
            kwargs["tensor_scale"] = True
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
                block_size = _size_token(text, rest, i, "block")
                i += 1
        elif token.startswith("axis="):
            claim("axis", token)
            axis = _int_token(text, token)
        elif token.startswith("stack=") and calibration:
            claim("stack", token)
            stack = _int_token(text, token)
            if stack <= 0:
                raise ValueError(
                    f"spec {text!r}: {token!r} must count 1 or more leading axes (stack=1: "
                    "the first axis stacks layers or experts)"
                )
        elif token.startswith("stack="):
            raise ValueError(
                f"spec {text!r}: {token!r} says which axes stack layers: it belongs in a "
                "quantize_tree or command-line rule, not in a QuantSpec"
            )
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
                f"axis=N, scale={'|'.join(SCALE_DTYPES)}, tensor_scale"
                + (
                    f", stack=N, or a calibration {_CALIBRATIONS} / percentile=P"
                    if calibration
                    else ""
                )
            )
        i += 1
    if head in PRESETS and kind is not None:
        raise ValueError(f"spec {text!r}: {head} sets its own blocks; drop {kind!r}")
    if axis is not None and kind in ("per_tensor", "per_token"):
        raise ValueError(
            f"spec {text!r}: {seen['axis']!r} has no meaning with {kind} (it has no axis); "
            "drop it, or use per_channel or per_block"
        )
    if axis is not None and kind is None and head not in PRESETS:
        raise ValueError(f"spec {text!r}: {seen['axis']!r} needs per_channel or per_block")
    if head in PRESETS and axis is not None:
        kwargs["granularity"] = per_block(axis, PRESETS[head].block_size, channel_axis="all")
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
    template = axis is None and (kind in ("per_channel", "per_block") or head in PRESETS)
    return LeafRule(spec, calib, template=template, stack=stack)


def _parse_table(text: str, head: str, rest: list[str]) -> LeafRule:
    """A lookup-table rule (``nf4...``, ``lutN...``: see :func:`parse_leaf_rule`)."""
    nf4 = head == "nf4"
    bits = 4 if nf4 else int(head[3:])
    if bits not in CODE_BITS:
        raise ValueError(
            f"spec {text!r}: lookup tables take {', '.join(TABLES[1:])} ({head!r} would "
            f"need {bits}-bit indices)"
        )
    granularities = ("per_block",) if nf4 else ("per_tensor", "per_grouped_channel")
    seen: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if token in granularities:
            _claim(seen, text, "granularity", token)
            if token != "per_tensor":
                noun = "block" if nf4 else "group"
                kwargs[f"{noun}_size"] = _size_token(text, rest, i, noun)
                i += 1
        elif token.startswith("axis="):
            _claim(seen, text, "axis", token)
            kwargs["axis"] = _int_token(text, token)
        elif token == "scaled" and not nf4:
            _claim(seen, text, "scaled", token)
            kwargs["scaled"] = True
        else:
            raise ValueError(f"spec {text!r}: {_table_token_error(head, token)}")
        i += 1
    if not nf4 and "axis" in seen and not ("group_size" in kwargs or "scaled" in kwargs):
        raise ValueError(
            f"spec {text!r}: {seen['axis']!r} has no meaning for one table per tensor; drop "
            f"it, or use per_grouped_channel:SIZE or scaled (their output-channel axis)"
        )
    fmt = TableFormat("nf4" if nf4 else "kmeans", bits, **kwargs)
    return LeafRule(fmt, template="axis" not in seen and fmt.axis is not None)


def _table_token_error(head: str, token: str) -> str:
    """Why ``token`` does not fit lookup table ``head``, and what to write instead."""
    nf4 = head == "nf4"
    if token in _CALIBRATIONS or token.split("=", 1)[0] == "percentile":
        return (
            f"calibration {token!r} does not apply to lookup tables "
            f"({_TABLE_PARAMS['nf4' if nf4 else 'kmeans']}); drop it"
        )
    if (
        token in SCHEMES
        or token in FORMULATIONS
        or token == "tensor_scale"
        or token.startswith("scale=")
    ):
        return (
            f"{token!r} is an option of integer and float specs; a lookup table has none: drop it"
        )
    if token in TARGET_DTYPES or token in PRESETS or _is_table(token):
        return f"{token!r} is a second format after {head!r}; give one"
    if re.fullmatch(r"[+-]?\d+", token):
        size = "per_block" if nf4 else "per_grouped_channel"
        return f"a size follows its granularity: write {head}:{size}:{token}"
    if nf4 and token == "scaled":
        return "nf4 always scales its blocks by their absmax; drop 'scaled'"
    if nf4 and token in (*_GRANULARITIES, "per_grouped_channel"):
        return (
            f"nf4 scales blocks along the contraction axis: write nf4:per_block:SIZE "
            f"({NF4_BLOCK_SIZE} by default), not {token!r}"
        )
    if token == "per_channel":
        return f"one table per output channel is {head}:per_grouped_channel:1"
    if token in _GRANULARITIES:
        return (
            f"{head} has per_tensor or per_grouped_channel:SIZE tables (groups of output "
            f"channels), not {token!r}; blocks scaled by their absmax are nf4:per_block:SIZE"
        )
    takes = (
        "per_block:SIZE, axis=N" if nf4 else "per_tensor, per_grouped_channel:SIZE, scaled, axis=N"
    )
    return f"cannot read {token!r}; {head} takes {takes}"


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
    that ``=`` is ignored). A spec is a :class:`~qjax.QuantSpec`, a
    :class:`~qjax.palettize.TableFormat`, a :class:`LeafRule`, shorthand text
    (:func:`parse_leaf_rule`, lookup tables such as ``"nf4"`` included) or None.

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
      >>> print(parse_rules([".*mlp.*=nf4", ".*=lut4:per_grouped_channel:16"])[1][1])
      lut4:per_grouped_channel:16
    """
    return [(pattern, _as_leaf_rule(pattern, value)) for pattern, value in rule_items(rules)]


def rule_items(rules: RulesLike, *, allow_empty: bool = False) -> list[tuple[str, Any]]:
    """The ``(regex, value)`` pairs of rules given in any form :func:`parse_rules` accepts,
    in match order, each pattern checked (a str, a valid regex, no surrounding
    whitespace; not empty unless ``allow_empty``: a Flax model's root layer has the empty
    path); the values are left for the caller to read.

    Examples:
      >>> from qjax.rules import rule_items
      >>> rule_items([".*kernel=int8", (".*", None)])
      [('.*kernel', 'int8'), ('.*', None)]
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
    out: list[tuple[str, Any]] = []
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
        out.append((_check_pattern(pattern, allow_empty), value))
    return out


def _check_pattern(pattern: object, allow_empty: bool = False) -> str:
    if not isinstance(pattern, str):
        raise TypeError(
            f"rule pattern must be a str (a regex matched on tensor paths), got "
            f"{type(pattern).__name__} {pattern!r}"
            + ("; pass pattern.pattern" if isinstance(pattern, re.Pattern) else "")
        )
    if not pattern and not allow_empty:
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
    if value is None or isinstance(value, QuantSpec | TableFormat):
        return LeafRule(value)
    if isinstance(value, str):
        try:
            return parse_leaf_rule(value)
        except ValueError as e:
            raise ValueError(f"rule {pattern!r}: {e}") from None
    raise TypeError(
        f"rule {pattern!r}: spec must be a QuantSpec, shorthand text or None (or a "
        f"qjax.palettize.TableFormat or qjax.rules.LeafRule), got {type(value).__name__} "
        f"{value!r}"
    )


def _split_rule(text: str) -> tuple[str, str]:
    """Splits ``REGEX=SPEC`` at the ``=`` followed by a dtype name (specs hold ``=`` too)."""
    names = (*TARGET_DTYPES, *PRESETS, *KEEP)
    for i, char in enumerate(text):
        head = text[i + 1 :].split(":", 1)[0].strip()
        if char == "=" and (head.lower() in names or _is_table(head)):
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
    embedding tables per row). A lookup table (``dtype`` in :data:`TABLES`) is taken
    with its defaults instead: ``"nf4"`` blocks along each tensor's contraction axis,
    ``"lut4"`` fits one table per tensor. Like catch-all rules, it leaves float the tensors
    with fewer than two dimensions (biases, norm scales) and those under ``min_size``
    elements. Everything else stays float.

    Examples:
      >>> from qjax.rules import default_rules
      >>> for pattern, rule in default_rules("int4") + default_rules("nf4"):
      ...     print(pattern, rule)
      (.*[/.])?(kernel|embedding|weight) int4:symmetric:scale:per_channel
      (.*[/.])?(kernel|embedding|weight) nf4:per_block:64
    """
    rule = parse_leaf_rule(dtype if dtype in TABLES else f"{dtype}:per_channel")
    return [(r"(.*[/.])?(kernel|embedding|weight)", dataclasses.replace(rule, general=True))]
