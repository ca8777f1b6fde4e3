"""Rules: which leaves of a parameter tree get which QuantSpec, and the spec shorthand."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Union

from qjax.dtypes import TARGET_DTYPES
from qjax.granularity import per_block, per_channel, per_tensor, per_token
from qjax.spec import FORMULATIONS, MX_BLOCK_SIZE, MX_PRESETS, SCALE_DTYPES, SCHEMES, QuantSpec

__all__ = ["Rule", "RulesLike", "default_rules", "parse_rules", "parse_spec"]

Rule = tuple[str, Union[QuantSpec, None]]
"""A regex matched with ``re.fullmatch`` on a leaf's path joined with ``/``, and the spec
for the leaves it matches (None keeps them float)."""

RulesLike = Union[Mapping[str, Union[QuantSpec, str, None]], Sequence[Union[Rule, str]]]

KEEP = ("keep", "float", "none")


def parse_spec(text: str) -> QuantSpec | None:
    """Parses the spec shorthand: ``"dtype[:token...]"``, or ``"keep"`` for float.

    Tokens, in any order after the dtype: a scheme (``symmetric``, ``asymmetric``,
    ``symmetric_with_clipping``), a formulation (``scale``, ``zero_point``, ``minval``),
    a granularity (``per_tensor``, ``per_channel``, ``per_token``, ``per_block`` followed by
    its block size), ``axis=N`` (default: -1 for per_channel and -2 for per_block, the Flax kernel
    layout) and ``scale=DTYPE``. The MX presets ``mxfp8`` / ``mxfp4`` take no granularity;
    ``axis=N`` moves their 32-blocks to another axis (``mxfp4:axis=-2`` for Flax kernels).

    Raises:
      ValueError: naming the token that is not understood.

    Examples:
      >>> from qjax.rules import parse_spec
      >>> print(parse_spec("int4:per_block:32"))
      int4:symmetric:scale:per_block(axis=-2, block_size=32)
      >>> print(parse_spec("uint8:asymmetric:per_channel:axis=0"))
      uint8:asymmetric:zero_point:per_channel(axis=0)
      >>> parse_spec("keep") is None
      True
    """
    tokens = [t.strip() for t in text.strip().split(":")]
    if tokens[0].lower() in KEEP and len(tokens) == 1:
        return None
    dtype, rest = tokens[0], tokens[1:]
    kwargs: dict[str, object] = {}
    kind, block_size, axis = None, None, None
    i = 0
    while i < len(rest):
        token = rest[i]
        if token in SCHEMES:
            kwargs["scheme"] = token
        elif token in FORMULATIONS:
            kwargs["formulation"] = token
        elif token in ("per_tensor", "per_channel", "per_token"):
            kind = token
        elif token == "per_block":
            kind = token
            if i + 1 >= len(rest) or not rest[i + 1].isdigit():
                raise ValueError(
                    f"spec {text!r}: per_block needs a block size after it, e.g. per_block:32"
                )
            block_size = int(rest[i + 1])
            i += 1
        elif token.startswith("axis="):
            axis = _int_token(text, token)
        elif token.startswith("scale=") and token[6:] in SCALE_DTYPES:
            kwargs["scale_dtype"] = token[6:]
        else:
            raise ValueError(
                f"spec {text!r}: cannot read {token!r}; expected a scheme {SCHEMES}, a "
                f"formulation {FORMULATIONS}, per_tensor, per_channel, per_token, per_block:SIZE, "
                f"axis=N or scale={'|'.join(SCALE_DTYPES)}"
            )
        i += 1
    if kind is not None and dtype in MX_PRESETS:
        raise ValueError(f"spec {text!r}: {dtype} sets its own blocks; drop {kind}")
    if dtype in MX_PRESETS and axis is not None:
        # MX blocks run along the contraction axis: the last one of a PyTorch [out, in]
        # weight (the default), axis=-2 for a Flax kernel [..., in, out].
        kwargs["granularity"] = per_block(axis, MX_BLOCK_SIZE, channel_axis="all")
    elif kind is None and axis is not None:
        raise ValueError(f"spec {text!r}: axis= needs per_channel or per_block")
    if kind == "per_tensor":
        kwargs["granularity"] = per_tensor()
    elif kind == "per_token":
        kwargs["granularity"] = per_token()
    elif kind == "per_channel":
        kwargs["granularity"] = per_channel(-1 if axis is None else axis)
    elif kind == "per_block":
        kwargs["granularity"] = per_block(-2 if axis is None else axis, block_size)
    try:
        return QuantSpec(dtype, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"spec {text!r}: {e}") from e


def _int_token(text: str, token: str) -> int:
    try:
        return int(token.split("=", 1)[1])
    except ValueError:
        raise ValueError(f"spec {text!r}: {token!r} needs an integer, e.g. axis=0") from None


def parse_rules(rules: RulesLike) -> list[Rule]:
    """Normalises rules to an ordered list of ``(compiled-checked regex, QuantSpec | None)``.

    Accepts a mapping ``{regex: spec}`` (insertion order is match order), a sequence of
    ``(regex, spec)`` pairs, or ``"REGEX=SPEC"`` strings (as on the command line). A spec
    is a :class:`~qjax.QuantSpec`, shorthand text (see :func:`parse_spec`) or None.

    Raises:
      ValueError: for an invalid regex or spec, naming the rule.

    Examples:
      >>> from qjax.rules import parse_rules
      >>> for pattern, spec in parse_rules({".*attention.*kernel": "int8",
      ...                                   ".*mlp.*kernel": "int4:per_block:32",
      ...                                   ".*": None}):
      ...     print(pattern, spec)
      .*attention.*kernel int8:symmetric:scale:per_tensor
      .*mlp.*kernel int4:symmetric:scale:per_block(axis=-2, block_size=32)
      .* None
    """
    items = rules.items() if isinstance(rules, Mapping) else rules
    out: list[Rule] = []
    for item in items:
        if isinstance(item, str):
            pattern, spec = _split_rule(item)
        else:
            pattern, spec = item
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rule {pattern!r}: invalid regex ({e})") from None
        if isinstance(spec, str):
            try:
                spec = parse_spec(spec)
            except ValueError as e:
                raise ValueError(f"rule {pattern!r}: {e}") from None
        elif spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(
                f"rule {pattern!r}: spec must be a QuantSpec, shorthand text or None, "
                f"got {type(spec).__name__}"
            )
        out.append((pattern, spec))
    return out


def _split_rule(text: str) -> tuple[str, str]:
    """Splits ``REGEX=SPEC`` at the ``=`` followed by a dtype name (specs hold ``=`` too)."""
    names = (*TARGET_DTYPES, *MX_PRESETS, *KEEP)
    for i, char in enumerate(text):
        if char == "=" and text[i + 1 :].split(":", 1)[0].strip().lower() in names:
            return text[:i], text[i + 1 :]
    raise ValueError(
        f"rule {text!r} must read REGEX=SPEC with SPEC starting with a dtype or 'keep', "
        "e.g. '.*kernel=int4:per_block:32'"
    )


def default_rules(dtype: str = "int8") -> list[Rule]:
    """Rules that know Flax layouts: kernels per output channel, embeddings per row.

    * ``.../kernel`` (Dense, DenseGeneral, Conv, ConvTranspose: ``[..., in, out]``):
      :func:`~qjax.per_channel` on axis -1;
    * ``.../embedding`` (Embed: ``[vocab, features]``): per-channel on axis 0;
    * everything else (biases, norm scales, ...) stays float.

    Examples:
      >>> from qjax.rules import default_rules
      >>> for pattern, spec in default_rules("int4"):
      ...     print(pattern, spec)
      (.*/)?kernel int4:symmetric:scale:per_channel(axis=-1)
      (.*/)?embedding int4:symmetric:scale:per_channel(axis=0)
      .* None
    """
    return [
        (r"(.*/)?kernel", QuantSpec(dtype, granularity=per_channel(-1))),
        (r"(.*/)?embedding", QuantSpec(dtype, granularity=per_channel(0))),
        (r".*", None),
    ]
