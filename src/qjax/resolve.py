"""How rules resolve, tensor by tensor: layouts, defaults, fallbacks and plans.

:class:`RulePlan` is the one place that turns rules (:mod:`qjax.rules`) into what each
tensor gets, for :func:`~qjax.quantize_tree`, :func:`~qjax.plan`, the ``qjax`` command line
and the Flax adapters alike: it reads the tensor's layout from its name (Flax
``[..., in, out]`` kernels, PyTorch ``[out, in, ...]`` weights, embedding tables), gives a
shorthand spec without ``axis=`` the axes of that layout, applies ``min_size`` and the
per-channel fallback, and records which rules matched nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax.numpy as jnp

from qjax.granularity import Granularity, block_shape, per_block, per_channel, per_tensor
from qjax.palettize import TableFormat
from qjax.rules import (
    DEFAULT_MIN_SIZE,
    Calibration,
    Rule,
    RulesLike,
    default_rules,
    parse_rules,
)
from qjax.spec import QuantSpec

__all__ = [
    "LAYOUTS",
    "NAMED_DEFAULT",
    "Format",
    "LayoutReading",
    "Plan",
    "PlanRow",
    "QjaxRuleWarning",
    "Resolution",
    "RulePlan",
    "contraction_reading",
    "fit_to_shape",
    "gpt2_outputs_first_tree",
    "is_catch_all",
    "layout_reading",
    "report_unmatched",
    "with_layout_axes",
]

LAYOUTS = ("auto", "flax", "torch")
"""How tensors are read: from each name (``auto``), all Flax, or all PyTorch."""

_EMBEDDING = re.compile(
    r"(.*_)?embeddings?|embed(_tokens|_positions)?|wte|wpe|lm_head|shared|tok_embeddings"
)
"""Names of embedding tables (a Flax ``embedding`` leaf or a PyTorch module holding ``weight``)."""
_GPT2_CONV1D = ("c_attn", "c_proj", "c_fc", "q_attn")
"""Hugging Face GPT-2 ``Conv1D`` modules: their PyTorch ``weight`` is ``[in, out]``, not
``[out, in]``, and their Flax port's ``kernel`` ``[out, in]``, not ``[in, out]``."""
_ATTENTION_PROJECTIONS = ("query", "key", "value")
"""Flax ``MultiHeadDotProductAttention`` (Linen) / ``MultiHeadAttention`` (NNX) input
projections: DenseGeneral kernels ``[in, heads, head_dim]``."""


NAMED_DEFAULT = "[..., in, out]"
"""What :func:`layout_reading` calls a kernel its name tells nothing about."""


class QjaxRuleWarning(UserWarning):
    """A rule that matched nothing (an error instead with ``strict=True``)."""


# Layouts.


@dataclasses.dataclass(frozen=True)
class LayoutReading:
    """How one tensor is read: its layout, output-channel (row) axis and contraction axis.

    ``all_channels``: every axis but the contraction is an output axis (an attention
    projection ``[in, heads, head_dim]``): per-channel scales are one per output, per
    (head, head_dim). ``input_blocks``: a block holds inputs only, size 1 along every
    other axis (attention kernels), not whole along the axes that are neither the
    contraction nor the channel (a conv block spans all kernel positions).
    """

    layout: str
    channel: int
    contraction: int
    what: str
    all_channels: bool = False
    input_blocks: bool = False
    reduced: tuple[int, ...] = ()
    """Other contracted axes (a DenseGeneral over ``axis=(-2, -1)``): per-channel scales
    reduce them too, and blocks are size 1 along them."""


def layout_reading(
    parts: Sequence[str],
    shape: Sequence[int],
    layout: str,
    *,
    gpt2_outputs_first: bool | None = None,
) -> LayoutReading:
    """The reading of a tensor named ``parts`` (its path, split) of ``shape`` in ``layout``.

    ``gpt2_outputs_first``: whether the tree stores its GPT-2-named matrices (``c_attn``,
    ``c_fc``, ``c_proj``) outputs first, as :func:`gpt2_outputs_first_tree` tells:
    transformers' Flax ``FlaxConv1D`` kernels and PyTorch ``nn.Linear`` weights (GPTBigCode,
    Qwen-1) are ``[out, in]``; Flax Dense kernels of those names (nanoGPT ports) and
    Hugging Face GPT-2's PyTorch ``Conv1D`` weights are ``[in, out]``. None: decided from
    each matrix's shape where it tells (``c_attn`` and ``c_fc`` have more outputs than
    inputs, the MLP's ``c_proj`` fewer), else the name's usual layout (a Flax kernel
    ``[in, out]``, a PyTorch GPT-2 ``Conv1D`` weight ``[in, out]``).
    """
    ndim = len(shape)
    leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if layout == "auto":
        layout = _layout_of(leaf, parent)
    if ndim < 2:
        return LayoutReading(layout, -1, -1, f"{ndim}-D")
    embedding = _EMBEDDING.fullmatch(parent if leaf == "weight" else leaf) is not None
    if ndim == 2 and parent in _GPT2_CONV1D and leaf in ("weight", "kernel"):
        outputs_first = gpt2_outputs_first
        if outputs_first is None:
            outputs_first = _gpt2_outputs_first(parent, shape)
        if layout == "torch" and not outputs_first:  # None too: GPT-2's usual Conv1D
            return LayoutReading(layout, -1, -2, "GPT-2 Conv1D [in, out]")
        if layout != "torch" and outputs_first:
            return LayoutReading(layout, 0, 1, "GPT-2 FlaxConv1D [out, in]")
    if layout == "torch":
        what = "embedding [rows, features]" if embedding else "[out, in, ...]"
        return LayoutReading(layout, 0, 1, what)
    if embedding:
        return LayoutReading(layout, ndim - 2, ndim - 1, "embedding [rows, features]")
    if leaf == "kernel" and ndim == 3 and parent in _ATTENTION_PROJECTIONS and shape[0] >= shape[1]:
        # (fewer heads than inputs: a Dense stacked by nn.scan, [layers, in, out], has not)
        what = "attention projection [in, heads, head_dim]"
        return LayoutReading(layout, -1, 0, what, all_channels=True, input_blocks=True)
    if leaf == "kernel" and ndim == 3 and parent == "out":
        what = "attention output [heads, head_dim, out]"
        return LayoutReading(layout, -1, -2, what, input_blocks=True)
    return LayoutReading(layout, -1, -2, NAMED_DEFAULT)


def contraction_reading(
    contracted: Sequence[int], outputs: Sequence[int], ndim: int, what: str
) -> LayoutReading | None:
    """A kernel read from its contracted axes (a DenseGeneral's configuration, an Einsum's
    equation, or the dot that capture saw): one scale per output (and batch index), blocks
    of inputs along the last contracted axis. None for a plain ``[in, out]`` or where
    nothing is contracted.

    Examples:
      >>> r = contraction_reading([0], [1, 2], 3, "[in, heads, head_dim]")
      >>> r.contraction, r.channel, r.all_channels, r.input_blocks
      (-3, -1, True, True)
    """
    contracted, outputs = sorted(contracted), sorted(outputs)
    if not contracted or (ndim, contracted, outputs) == (2, [0], [1]):
        return None
    c = contracted[-1]
    return LayoutReading(
        "flax",
        (outputs[-1] if outputs else c) - ndim,
        c - ndim,
        f"{what}, contracted axes {tuple(contracted)}",
        all_channels=True,
        input_blocks=True,
        reduced=tuple(a - ndim for a in contracted[:-1]),
    )


def _layout_of(leaf: str, parent: str) -> str:
    """The layout a leaf's name tells: Flax ``kernel`` / ``embedding``; PyTorch ``weight``
    and its variants (``nn.MultiheadAttention``'s ``in_proj_weight``, weight norm's
    ``weight_v`` / ``weight_g``, pruning's ``weight_orig``, parametrizations'
    ``weight.original0`` / ``original1``); else ``"other"``."""
    if leaf in ("kernel", "embedding"):
        return "flax"
    if leaf == "weight" or leaf in _TORCH_WEIGHT_VARIANTS:
        return "torch"
    if parent == "weight" and leaf in ("original0", "original1"):
        return "torch"
    return "other"


_TORCH_WEIGHT_VARIANTS = frozenset(
    ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")  # MultiheadAttention
    + ("weight_v", "weight_g", "weight_orig")  # weight norm, pruning
)
"""PyTorch's names for ``[out, in, ...]`` weights other than ``weight`` (a name such as a
JAX model's ``router_weight`` tells nothing)."""


def _gpt2_outputs_first(parent: str, shape: Sequence[int]) -> bool | None:
    """Whether a GPT-2-named matrix's shape shows it stored ``[out, in]``; None where it
    cannot tell (a square ``c_proj``)."""
    rows, cols = shape
    if rows == cols:
        return None
    if parent in ("c_attn", "c_fc"):  # query, key and value; the MLP widens
        return rows > cols
    return rows < cols if parent == "c_proj" else None  # the MLP's projection narrows


def gpt2_outputs_first_tree(
    leaves: Sequence[tuple[str, Sequence[int]]], leaf: str = "kernel"
) -> bool | None:
    """Whether a tree of ``(path, shape)`` leaves stores its GPT-2-named matrices named
    ``leaf`` (``"kernel"``: Flax, ``"weight"``: PyTorch) ``[out, in]``, told by its
    ``c_attn`` of that name: query, key and value projected from ``d`` inputs (``[3 d,
    d]``, or ``[d + 2 kv, d]`` with grouped keys) if it has more rows; None: no such
    ``c_attn`` tells. Each framework is told apart, as the two store GPT-2 oppositely.

    Examples:
      >>> gpt2_outputs_first_tree([("h/0/attn/c_attn/kernel", (192, 64))])  # FlaxConv1D
      True
      >>> gpt2_outputs_first_tree([("h.0.attn.c_attn.weight", (64, 192))], "weight")  # Conv1D
      False
      >>> gpt2_outputs_first_tree([("h.0.attn.c_attn.weight", (96, 64))], "weight")  # BigCode
      True
    """
    for path, shape in leaves:
        parts = re.split(r"[./]", path)
        if len(parts) > 1 and parts[-2:] == ["c_attn", leaf]:
            if len(shape) == 2 and shape[0] != shape[1]:
                return shape[0] > shape[1]
    return None


Format = Union[QuantSpec, TableFormat]
"""What a rule gives a tensor: a QuantSpec, or a lookup-table format (LUTArray leaves)."""


def with_layout_axes(spec: Format, reading: LayoutReading, ndim: int) -> Format:
    """A template spec with the axes of ``reading``: a lookup table's NF4 blocks along the
    contraction axis, its k-means groups and scales along the output channels."""
    if isinstance(spec, TableFormat):
        if spec.axis is None:  # one k-means table per tensor: no axis
            return spec
        axis = reading.contraction if spec.kind == "nf4" else reading.channel
        return dataclasses.replace(spec, axis=axis)
    g = spec.granularity
    if g.kind == "per_channel" and reading.all_channels:  # one scale per output
        new: Granularity = _per_output(reading, reading.contraction, ndim)
    elif g.kind == "per_channel":
        new = per_channel(reading.channel)
    else:
        inputs_only = g.channel_axis == "all" or reading.input_blocks
        channel: Any = "all" if inputs_only else reading.channel
        auto = _auto_channel(reading.contraction, ndim)
        if channel != "all" and (auto is None or auto == channel % ndim):
            channel = "auto"
        new = per_block(reading.contraction, g.block_size, channel_axis=channel)
    return dataclasses.replace(spec, granularity=new)


def _per_output(reading: LayoutReading, axis: int, ndim: int) -> Granularity:
    """One scale per output: whole along ``axis`` and the reading's other contracted axes
    (``per_channel`` where a single axis is left, as a name's reading would write it)."""
    whole = {axis % ndim} | {r % ndim for r in reading.reduced}
    if len(whole) == ndim - 1:
        (kept,) = set(range(ndim)) - whole
        return per_channel(kept - ndim)
    return Granularity("explicit", explicit=tuple(-1 if i in whole else 1 for i in range(ndim)))


def _auto_channel(axis: int, ndim: int) -> int | None:
    """per_block's ``channel_axis="auto"``: the last axis, or the one before when blocked."""
    if ndim < 2:
        return None
    return ndim - 2 if axis % ndim == ndim - 1 else ndim - 1


def is_catch_all(pattern: str) -> bool:
    """True for a pattern that matches any path (``.*``, ``.+``, ...): it names no tensor.

    Examples:
      >>> from qjax.resolve import is_catch_all
      >>> is_catch_all(".*"), is_catch_all("params/.*"), is_catch_all(".*kernel")
      (True, False, False)
    """
    probe = "\x00catch-all probe/\x01.0"
    return re.fullmatch(pattern, probe) is not None


def fit_to_shape(
    path: str,
    shape: tuple[int, ...],
    spec: Format,
    reading: LayoutReading,
    fallback: str | None = "per_channel",
) -> tuple[Format, str]:
    """The spec once checked against a tensor's shape, and a note: where its block (or
    group) does not divide the blocked axis, with ``fallback="per_channel"`` the
    per-channel spec of the tensor's layout (``reading``) and a note saying so, with
    None a ``ValueError`` naming ``path`` and an axis that would fit.

    Examples:
      >>> from qjax.resolve import fit_to_shape, layout_reading
      >>> from qjax.rules import parse_spec
      >>> reading = layout_reading(["conv", "kernel"], (3, 3, 3, 16), "flax")
      >>> spec, note = fit_to_shape("conv/kernel", (3, 3, 3, 16),
      ...                           parse_spec("int4:per_block:16:axis=-2"), reading)
      >>> print(spec.granularity); print(note)
      per_channel(axis=-1)
      fallback per_channel(axis=-1): block 16 does not divide axis 2 (size 3)
    """
    try:
        _check_fits(shape, spec)
        return spec, ""
    except ValueError as e:
        misfit = _misfit(shape, spec)
        if misfit is None:
            raise ValueError(f"{path!r} (shape {shape}): {e}") from None
    axis, size = misfit
    table = isinstance(spec, TableFormat)
    unit = "group" if table and spec.kind == "kmeans" else "block"
    reason = f"{unit} {size} does not divide axis {axis} (size {shape[axis]})"
    table_fallback = _table_fallback(spec, shape[axis]) if table else None
    if fallback is None:
        fits = [i for i, d in enumerate(shape) if i != axis and d % size == 0]
        role = "output channel" if unit == "group" else "input"
        hint = (
            f"; it divides axis {fits[0]} (size {shape[fits[0]]}): if that is the {role} "
            f"axis, give axis={fits[0]} or the right layout"
            if fits
            else ""
        )
        instead = f"{table_fallback} with a rule" if table else "per_channel with a rule"
        raise ValueError(
            f"{path!r} (shape {shape}, read as {reading.layout} {reading.what}): {reason}"
            f"{hint}; or choose a {unit} size that divides {shape[axis]}, quantize it "
            f"{instead}, or pass fallback='per_channel'"
        )
    if isinstance(spec, TableFormat):
        return table_fallback, f"fallback {table_fallback}: {reason}"
    channel = spec.granularity.channel_axis
    if reading.all_channels:  # one scale per output
        g_all = _per_output(reading, axis, len(shape))
        return dataclasses.replace(spec, granularity=g_all), f"fallback {g_all}: {reason}"
    if channel in ("all", "auto"):  # the layout's channel axis, written as it writes it
        auto = _auto_channel(axis, len(shape))
        same = channel == "all" or auto == reading.channel % len(shape)
        channel = reading.channel if same else auto
    g: Granularity = per_tensor() if channel is None else per_channel(channel)
    return dataclasses.replace(spec, granularity=g), f"fallback {g}: {reason}"


_BIAS_OR_NORM = re.compile(r"(.*_)?(bias|scale|scale_inv)")
"""Leaf names of biases, norm scales and the scales of quantized weights
(``weight_scale_inv`` of float8 checkpoints, learned ``kernel_scale``), which rules that
do not name them leave float whatever their rank (stacked layers store biases
``[layers, features]``)."""


def _per_axis(spec: Format) -> bool:
    """Whether ``spec`` has scales per channel or per block (not one per tensor)."""
    return isinstance(spec, QuantSpec) and spec.granularity.kind in ("per_channel", "per_block")


def _from_the_end(spec: Format, ndim: int) -> Format:
    """``spec`` with its granularity's axes counted from the end of ``ndim`` axes."""
    if not isinstance(spec, QuantSpec):
        return spec
    g = spec.granularity
    changes = {}
    if isinstance(g.axis, int) and g.axis >= 0:
        changes["axis"] = g.axis - ndim
    if isinstance(g.channel_axis, int) and g.channel_axis >= 0:
        changes["channel_axis"] = g.channel_axis - ndim
    if not changes:
        return spec
    return dataclasses.replace(spec, granularity=dataclasses.replace(g, **changes))


def _matches_any_leaf(match: Callable[[str], Any], path: str) -> bool:
    """Whether a rule matching ``path`` would match any other leaf name in its place
    (``params/.*``, ``.*attention.*``): such a rule names a subtree, not the leaf."""
    heads = (p[: max(p.rfind("/"), p.rfind(".")) + 1] for p in (path, path.replace(".", "/")))
    return any(match(head + "\x00any leaf") is not None for head in heads)


# Resolution.


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What the rules give one tensor.

    Attributes:
      spec: the spec it gets, with its axes resolved for its layout: a QuantSpec, or a
        :class:`~qjax.palettize.TableFormat` (it becomes a LUTArray); None: it stays float.
      pattern: the rule pattern that matched, or None (no rule, or the built-in defaults).
      layout: ``"flax"``, ``"torch"`` or ``"other"``: how the tensor was read.
      note: why it stays float or what was changed, e.g. ``"1-D"``,
        ``"below min_size 1024"``, ``"fallback per_channel(axis=0): block 32 does not
        divide axis 1 (size 16)"``.
      calibration: how PTQ computes its params (None: min-max, as :func:`~qjax.quantize`).
      stack: the leading axes that stack copies of a layer (the rule's ``stack=N``): the
        spec, layout and note are one copy's, and each copy gets its own params.
    """

    spec: Format | None
    pattern: str | None
    layout: str
    note: str = ""
    calibration: Calibration | None = None
    stack: int = 0


class RulePlan:
    """Rules compiled once, resolved tensor by tensor: the one place of layouts and defaults.

    Args:
      rules: ordered rules, first ``re.fullmatch`` wins (see :func:`parse_rules`), matched
        against the tensor's path as given (``"params/Dense_0/kernel"`` or a PyTorch name
        ``"encoder.layer.0.attention.self.query.weight"``) and with every ``.`` turned to
        ``/``. None: :func:`default_rules`.
      layout: ``"auto"`` (default) reads each tensor from its name: Flax ``kernel``
        ``[..., in, out]`` and ``embedding`` ``[vocab, features]``; PyTorch ``weight``
        ``[out, in, ...]`` (Linear, Conv, embeddings, tied ``lm_head``; also
        ``in_proj_weight``, ``weight_v``, ``weight_g``, ``weight_orig`` and
        parametrizations' ``weight.original0/1``); Flax attention kernels (``query`` /
        ``key`` / ``value`` ``[in, heads, head_dim]``: one scale per output, blocks of
        inputs; ``out`` ``[heads, head_dim, out]``: blocks within each head); GPT-2-named
        matrices (``c_attn``, ``c_fc``, ``c_proj``) as the tree's ``c_attn`` shows
        (:meth:`read_tree`): Hugging Face GPT-2's PyTorch ``Conv1D`` weights ``[in, out]``
        and its Flax port's ``FlaxConv1D`` kernels ``[out, in]``, against ``nn.Linear``
        (GPTBigCode, Qwen-1) ``[out, in]`` and Flax Dense ``[in, out]``; other names as
        Flax kernels, reported as ``"other"``. ``"flax"`` or ``"torch"``
        reads every tensor in that layout.
        Shorthand without ``axis=`` is a template: per_channel takes the output channel
        (row) axis, per_block, the MX presets and NF4 block along the contraction (input
        or feature) axis, k-means tables group (and ``scaled`` scales) output channels.
        Explicit ``axis=``, QuantSpec and TableFormat objects are used as given.
      min_size: catch-all rules (a pattern that matches any path, such as ``.*``) and the
        default rules leave float the tensors with fewer elements (default 1024) and those
        with fewer than two dimensions (biases, norm scales). A rule that names a tensor
        (any other pattern) quantizes it whatever its size and rank.
      fallback: ``"per_channel"`` (default): a tensor whose blocked axis the block size
        does not divide is quantized per channel instead, with a note saying so (NF4: one
        block over the whole axis; k-means groups: one table per channel).
        None: that is a ``ValueError`` naming the tensor (and an axis that would fit).

    Examples:
      >>> from qjax.resolve import RulePlan
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

      Lookup tables follow the layouts too: NF4 blocks of 64 along the inputs.

      >>> plan = RulePlan({".*": "nf4"})
      >>> print(plan.resolve("Dense_0/kernel", (128, 64), "float32").spec)
      nf4:per_block:64:axis=-2
      >>> print(plan.resolve("fc.weight", (64, 128), "float32").spec)
      nf4:per_block:64:axis=1
      >>> plan.resolve("fc2.weight", (64, 96), "float32").note
      'fallback nf4:per_block:96:axis=1: block 64 does not divide axis 1 (size 96)'
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
        self._general = [r.general or is_catch_all(p) for p, r in self.rules]
        self._used = [False] * len(self.rules)
        self._quantized = 0
        self._skipped: dict[str, int] = {}
        self._kept = False  # a rule kept some tensor float on purpose
        self.gpt2_outputs_first: dict[str, bool | None] = {}
        """Whether the tree stores its GPT-2-named matrices ``[out, in]``, by leaf name
        (``kernel``, ``weight``; :meth:`read_tree` sets it); None or absent: each matrix's
        shape decides."""

    def read_tree(self, leaves: Sequence[tuple[str, Sequence[int]]]) -> None:
        """Reads what the whole tree of ``(path, shape)`` leaves tells about layouts
        before its tensors are resolved: whether GPT-2-named matrices are stored
        ``[out, in]`` (:func:`gpt2_outputs_first_tree`), which a square ``c_proj`` cannot
        tell on its own."""
        copies = [(path, tuple(shape)[self._stack_of(path) :]) for path, shape in leaves]
        self.gpt2_outputs_first = {
            leaf: gpt2_outputs_first_tree(copies, leaf) for leaf in ("kernel", "weight")
        }

    def _rule_index(self, path: str) -> int | None:
        """The index of the first rule matching ``path`` (as given, or with ``.`` read as
        ``/``), or None."""
        slashed = path.replace(".", "/")
        return next((i for i, m in enumerate(self._match) if m(path) or m(slashed)), None)

    def _stack_of(self, path: str) -> int:
        """The ``stack=N`` of the rule that matches ``path`` (0 without one)."""
        index = self._rule_index(path)
        return 0 if index is None else self.rules[index][1].stack

    def resolve(
        self,
        path: str,
        shape: Sequence[int],
        dtype: Any,
        *,
        contracted: Sequence[int] | None = None,
    ) -> Resolution:
        """The :class:`Resolution` of one tensor; records which rule it used.

        ``contracted``: the axes a captured dot contracts (calibration statistics'
        ``weight_axes``, one layer's; capture sees dots only, never convolutions): for a
        kernel whose name tells nothing (``[..., in, out]``), they decide its layout, as
        the layer's configuration does in QAT (a DenseGeneral with several output or
        contracted axes, an Einsum, a matrix used as ``x @ w.T``).

        Raises:
          ValueError: when the spec cannot fit the tensor (a block that does not divide
            its axis with ``fallback=None``, an axis out of range), naming the tensor.
        """
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, got {type(path).__name__} {path!r}")
        full = tuple(int(d) for d in shape)
        parts = re.split(r"[./]", path)
        index = self._rule_index(path)
        stack = 0 if index is None else self.rules[index][1].stack
        shape = full[stack:]  # one copy's
        ndim = len(shape)
        first = self.gpt2_outputs_first.get(parts[-1])
        reading = layout_reading(parts, shape, self.layout, gpt2_outputs_first=first)
        if contracted is not None and reading.what == NAMED_DEFAULT and ndim >= 2:
            axes = sorted(a % ndim for a in contracted)
            outputs = [a for a in range(ndim) if a not in axes]
            reading = contraction_reading(axes, outputs, ndim, "captured dot") or reading
        if index is None:
            return Resolution(None, None, reading.layout, "no rule matches")
        names_leaf = not (self._general[index] or _matches_any_leaf(self._match[index], path))
        self._used[index] = True
        pattern, rule = self.rules[index]
        shown = pattern if self.user_rules else None

        def stays(note: str, skipped: str | None = None) -> Resolution:
            if skipped is not None:
                self._skipped[skipped] = self._skipped.get(skipped, 0) + 1
            return Resolution(None, shown, reading.layout, note)

        kind = jnp.dtype(dtype)
        if not jnp.issubdtype(kind, jnp.floating):
            return stays(f"{kind.name} is not floating point", "not floating point")
        if rule.spec is None:
            self._kept = True
            return stays("kept float by the rule")
        copy = f" (one copy of stack={stack})" if stack else ""
        if not names_leaf and ndim < 2:
            return stays(f"{ndim}-D{copy}", "fewer than 2 dimensions")
        if not names_leaf and _BIAS_OR_NORM.fullmatch(parts[-1]):  # stacked: [layers, d]
            return stays(f"a {parts[-1]} (name it to quantize it)", "biases or norm scales")
        if self._general[index] and math.prod(full) < self.min_size:
            return stays(f"below min_size {self.min_size}", f"under min_size={self.min_size}")
        if stack and not shape:
            raise ValueError(
                f"{path!r} (shape {full}): its rule's stack={stack} leaves none of its axes "
                "to a layer; stack=N counts the leading axes that stack copies of a layer"
            )
        spec = with_layout_axes(rule.spec, reading, ndim) if rule.template else rule.spec
        spec, note = fit_to_shape(path, shape, spec, reading, self.fallback)
        if stack:  # axes counted from the end hold for one copy and for the stack alike
            spec = _from_the_end(spec, ndim)
            note = f"{note} (in one copy {shape})" if note else note
        elif ndim == 3 and reading.what == NAMED_DEFAULT and not note and _per_axis(spec):
            note = "axis 0 shares its scales (add stack=1 if it stacks layers or experts)"
        if note and isinstance(spec, TableFormat) and spec.kind == "nf4":
            stored = 0.5 + 4 / spec.block_size  # a 4-bit index, a float32 absmax per block
            if stored >= kind.itemsize:  # a depthwise conv's [out, 1, kh, kw]
                return stays(f"kept float: {note}, which would store more than {kind.name}")
        self._quantized += 1
        return Resolution(spec, shown, reading.layout, note, rule.calibration, stack)

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

    def check_unmatched(
        self, *, strict: bool, where: str, listing: str = "qjax.plan", stacklevel: int = 2
    ) -> None:
        """Warns (:class:`QjaxRuleWarning`), or raises with ``strict``, for unmatched rules.

        ``listing`` and ``stacklevel`` as for :func:`report_unmatched`, the latter counted
        from this method's caller.
        """
        report_unmatched(
            self.unmatched(),
            strict=strict,
            where=where,
            listing=listing,
            stacklevel=stacklevel + 1,
        )

    def check_quantized(self, *, strict: bool, where: str, stacklevel: int = 2) -> None:
        """Warns (:class:`QjaxRuleWarning`), or raises with ``strict``, when the rules
        matched tensors but quantized none of them, each left float for its size, rank,
        name or dtype (a catch-all on a small model), and no rule kept a tensor float on
        purpose. ``stacklevel`` as for :meth:`check_unmatched`.

        Examples:
          >>> from qjax.resolve import RulePlan
          >>> plan = RulePlan({".*": "int8"})
          >>> plan.resolve("params/Dense_0/kernel", (16, 8), "float32").note
          'below min_size 1024'
          >>> plan.check_quantized(strict=True, where="quantize_tree")
          Traceback (most recent call last):
            ...
          ValueError: quantize_tree: the rules quantized nothing: every tensor they matched ...
        """
        if self._quantized or self._kept or not self._skipped:
            return
        why = ", ".join(f"{n} {reason}" for reason, n in self._skipped.items())
        hints = {
            "under min_size": "catch-all rules ('.*') and the default rules skip tensors "
            "under min_size elements: pass min_size=0, or write a rule that names them "
            "(e.g. '.*kernel')",
            "fewer than 2": "rules that do not name a tensor ('.*', 'params/.*') skip 1-D "
            "ones: name them (e.g. '.*bias')",
            "biases or norm": "rules that do not name a tensor skip biases and norm scales: "
            "name them (e.g. '.*norm/scale')",
            "not floating": "qjax quantizes floating-point tensors only",
        }
        reasons = list(self._skipped)
        said = [hint for key, hint in hints.items() if any(r.startswith(key) for r in reasons)]
        message = (
            f"{where}: the rules quantized nothing: every tensor they matched stayed float "
            f"({why}); " + "; ".join(said)
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, QjaxRuleWarning, stacklevel=stacklevel + 1)


def _check_fits(shape: tuple[int, ...], spec: Format) -> None:
    """A ValueError when ``spec`` cannot quantize a tensor of ``shape``."""
    if isinstance(spec, TableFormat):
        spec.check(shape)
    else:
        block_shape(shape, spec.granularity)


def _misfit(shape: tuple[int, ...], spec: Format) -> tuple[int, int] | None:
    """``(axis, size)`` where ``spec`` has blocks (or table groups) of ``size`` along an axis in
    range that they do not divide (the axis counted from 0); else None."""
    if isinstance(spec, TableFormat):
        axis, size = spec.axis, spec.block_size or spec.group_size
    elif spec.granularity.kind == "per_block":
        axis, size = spec.granularity.axis, spec.granularity.block_size
    else:
        return None
    if axis is None or size is None or not -len(shape) <= axis < len(shape):
        return None
    return (axis % len(shape), size) if shape[axis] % size else None


def _table_fallback(spec: TableFormat, length: int) -> TableFormat:
    """A table format that fits where ``spec``'s blocks or groups do not divide the axis of
    ``length``: NF4 with one block over the whole axis, k-means with a table per channel."""
    if spec.kind == "nf4":
        return dataclasses.replace(spec, block_size=length)
    return dataclasses.replace(spec, group_size=1)


def report_unmatched(
    patterns: Sequence[str],
    *,
    strict: bool,
    where: str,
    listing: str = "qjax.plan",
    stacklevel: int = 2,
) -> None:
    """The one place of the "rule matched nothing" message: a warning, or an error.

    Args:
      patterns: the rule patterns that matched nothing (nothing happens when empty).
      strict: raise ``ValueError`` instead of warning with :class:`QjaxRuleWarning`.
      where: what took the rules, e.g. ``"quantize_tree"``, ``"intercept"``, ``"--rule"``.
      listing: what lists the paths the rules can match, named in the message:
        ``"qjax.plan"`` (trees), ``"qjax plan FILE"`` (the command line) or the Flax
        model plans.
      stacklevel: the frame the warning points at, as for ``warnings.warn`` called by
        the caller of this function: 2 (default) is the caller's caller.

    Examples:
      >>> from qjax.resolve import report_unmatched
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
        f"'encoder.layer.0.attention.self.query.weight': list the paths with {listing}"
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
    spec: Format | None
    pattern: str | None
    layout: str
    note: str = ""
    calibration: Calibration | None = None
    stack: int = 0

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
            resolution.stack,
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
                "float" if r.spec is None else _spec_text(r.spec, r.calibration, r.stack),
                r.pattern or ("-" if r.spec is None else "default"),
                r.note,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table
        )


def _spec_text(spec: Format, calibration: Calibration | None, stack: int = 0) -> str:
    """The spec as :func:`parse_spec` shorthand without defaults, its calibration and
    its ``stack=N``."""
    text = _spec_calibration_text(spec, calibration)
    return f"{text}:stack={stack}" if stack else text


def _spec_calibration_text(spec: Format, calibration: Calibration | None) -> str:
    if isinstance(spec, TableFormat):
        return str(spec)
    from qjax.report import short_spec  # qjax.report imports the tree layer, which imports this

    text = short_spec(str(spec))
    return text if calibration is None else f"{text}:{calibration}"
