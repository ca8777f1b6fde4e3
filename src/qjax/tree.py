"""Post-training quantization of whole parameter pytrees, leaf by leaf, by path rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.ops import quantize
from qjax.qarray import QArray
from qjax.rules import Rule, RulesLike, default_rules, parse_rules
from qjax.spec import QuantSpec

__all__ = [
    "DEFAULT_MIN_SIZE",
    "count_nonfinite",
    "dequantize_tree",
    "leaf_specs",
    "path_str",
    "quantize_tree",
]

DEFAULT_MIN_SIZE = 1024
"""Leaves with fewer elements stay float: their bytes are negligible next to the big
matrices, and per-channel scales would eat much of the saving. (coremltools skips
weights under 2048 elements; 1024 keeps the 32x32 kernels of small models in play.)"""


def path_str(path: tuple) -> str:
    """A pytree key path joined with ``/``: ``params/Dense_0/kernel``, ``layers/3/w``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaf_specs(
    params: Any, rules: RulesLike | None = None, *, min_size: int = DEFAULT_MIN_SIZE
) -> dict[str, QuantSpec | None]:
    """Which spec each leaf gets: ``{path: spec or None}``, without quantizing anything.

    A leaf gets the spec of the first rule whose regex ``re.fullmatch``-es its path.
    Leaves that are not floating point, have fewer than ``min_size`` elements, or match
    no rule (or a rule with spec None) get None and stay as they are.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> params = {"Dense_0": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)}}
      >>> {p: str(s) for p, s in qjax.leaf_specs(params, min_size=0).items()}
      {'Dense_0/bias': 'None', 'Dense_0/kernel': 'int8:symmetric:scale:per_channel(axis=-1)'}
    """
    compiled = _compile(rules)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qarray)[0]
    return {path_str(p): _spec_for(path_str(p), leaf, compiled, min_size) for p, leaf in leaves}


def quantize_tree(
    params: Any,
    rules: RulesLike | None = None,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    check_finite: bool = True,
) -> Any:
    """Quantizes the leaves of a parameter pytree that the rules select.

    Args:
      params: any pytree of arrays (Flax variables, an Optax-trained dict, ...).
      rules: ordered rules, first match wins: a mapping ``{regex: spec}``, a sequence of
        ``(regex, spec)`` pairs or ``"REGEX=SPEC"`` strings; a spec is a
        :class:`~qjax.QuantSpec`, shorthand such as ``"int4:per_block:32"``, or None to
        keep the leaf float. Regexes are matched with ``re.fullmatch`` against the leaf's
        path joined with ``/``. Default: :func:`~qjax.default_rules` (int8 per output
        channel for Flax ``kernel`` and per row for ``embedding``).
      min_size: leaves with fewer elements stay float (default
        :data:`DEFAULT_MIN_SIZE` = 1024).
      check_finite: with concrete (not traced) leaves, refuse NaN or inf in a leaf to be
        quantized with a ``ValueError`` naming the leaf and the count. Under ``jit`` the
        leaves are traced and cannot be checked here: call :func:`count_nonfinite`
        inside the jitted function and check its result outside.

    Returns:
      A pytree of the same structure, with :class:`~qjax.QArray` leaves where quantized.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> params = {"attention": {"kernel": jnp.ones((64, 64))},
      ...           "mlp": {"kernel": jnp.ones((64, 256)), "bias": jnp.zeros(256)}}
      >>> rules = {".*attention.*kernel": "int8", ".*mlp.*kernel": "int4:per_block:32"}
      >>> q = qjax.quantize_tree(params, rules, min_size=0)
      >>> q["mlp"]["kernel"].spec.dtype, q["mlp"]["bias"].dtype
      ('int4', dtype('float32'))

      Scan-stacked layers: ``vmap`` over the leading axis quantizes each layer on its own
      (per-channel scales per layer), exactly as a loop over the layers would.

      >>> stacked = {"layers": {"kernel": jnp.stack([jnp.ones((64, 64)), 2 * jnp.ones((64, 64))])}}
      >>> qs = jax.vmap(lambda p: qjax.quantize_tree(p, min_size=0))(stacked)
      >>> qs["layers"]["kernel"].scale.shape
      (2, 1, 64)
    """
    compiled = _compile(rules)

    def quantize_leaf(path: tuple, leaf: Any) -> Any:
        name = path_str(path)
        spec = _spec_for(name, leaf, compiled, min_size)
        if spec is None:
            return leaf
        if check_finite and not isinstance(leaf, jax.core.Tracer):
            bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
            if bad:
                raise ValueError(
                    f"parameter {name!r} (shape {tuple(np.shape(leaf))}) has {bad} NaN or "
                    "inf values; fix or drop them, or keep this leaf float with a rule "
                    f"like ({re.escape(name)!r}, None)"
                )
        try:
            return quantize(leaf, spec)
        except (ValueError, TypeError) as e:
            raise type(e)(f"parameter {name!r}: {e}") from None

    return jax.tree_util.tree_map_with_path(quantize_leaf, params, is_leaf=_is_qarray)


def dequantize_tree(tree: Any) -> Any:
    """Replaces every :class:`~qjax.QArray` leaf with its dequantized array.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> q = qjax.quantize_tree({"kernel": jnp.ones((32, 32))}, min_size=0)
      >>> qjax.dequantize_tree(q)["kernel"].dtype
      dtype('float32')
    """
    return jax.tree.map(
        lambda leaf: leaf.dequantize() if isinstance(leaf, QArray) else leaf,
        tree,
        is_leaf=_is_qarray,
    )


def count_nonfinite(params: Any) -> Any:
    """The number of NaN / inf values of each floating leaf (0 for others); jit-friendly.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> counts = jax.jit(qjax.count_nonfinite)({"w": jnp.array([1.0, jnp.nan])})
      >>> int(counts["w"])
      1
    """

    def count(leaf: Any) -> Any:
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.int32(0)
        return jnp.sum(~jnp.isfinite(leaf), dtype=jnp.int32)

    return jax.tree.map(count, params)


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _compile(rules: RulesLike | None) -> list[tuple[Callable[[str], Any], QuantSpec | None]]:
    parsed: list[Rule] = default_rules() if rules is None else parse_rules(rules)
    return [(re.compile(pattern).fullmatch, spec) for pattern, spec in parsed]


def _spec_for(name: str, leaf: Any, compiled: list, min_size: int) -> QuantSpec | None:
    if isinstance(leaf, QArray) or not hasattr(leaf, "dtype"):
        return None
    if not jnp.issubdtype(leaf.dtype, jnp.floating) or np.size(leaf) < min_size:
        return None
    for match, spec in compiled:
        if match(name):
            return spec
    return None
