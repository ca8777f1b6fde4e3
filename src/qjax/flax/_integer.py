"""Integer dots: when a layer's dot can run on int8 codes, and the scales that factor out.

Shared by serving (:mod:`qjax.flax.serve`, codes stored in QArrays) and by QAT with
``LayerQuant(integer_dot=True)`` (:mod:`qjax.flax.linen`, codes recovered from the
fake-quantized operands, with a straight-through float backward).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.exact import unfused
from qjax.spec import QuantSpec

__all__ = ["dense_contraction", "dot_scale", "drop_unit_axes", "qat_dot", "spec_reason"]


def spec_reason(what: str, spec: QuantSpec) -> str | None:
    """Why values of ``spec`` cannot enter an int8 dot as they are, or None."""
    target = spec.target
    if spec.is_float or not target.is_signed or target.bits > 8:
        return (
            f"the {what} spec {spec} is not a signed integer of at most 8 bits "
            "(use e.g. 'int8' or 'int4')"
        )
    if spec.scheme == "asymmetric" or spec.formulation == "minval":
        return (
            f"the {what} spec {spec} has a nonzero zero point or minval; integer dots need "
            "scheme 'symmetric' or 'symmetric_with_clipping' with formulation 'scale'"
        )
    return None


def dense_contraction(module: nn.Module, ndim: int) -> tuple[tuple, tuple] | str:
    """The (input, kernel) axes a Dense / DenseGeneral contracts."""
    if isinstance(module, nn.Dense):
        return (ndim - 1,), (0,)
    if module.batch_dims not in ((), None):
        return f"DenseGeneral with batch_dims={module.batch_dims}"
    axes = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
    return tuple(a % ndim for a in axes), tuple(range(len(axes)))


def dot_scale(
    act_scale: jax.Array, weight_scale: jax.Array, act_axes: tuple, weight_axes: tuple
) -> jax.Array | str:
    """Activation scale x weight scale over the dot's output (free input axes, then free
    kernel axes), or why the scales do not factor out of the contraction."""
    sa = drop_unit_axes(act_scale, act_axes)
    if sa is None:
        return (
            f"the activation scales (shape {tuple(act_scale.shape)}) vary along the "
            "contracted axis; use per_tensor or per_token activations"
        )
    sw = drop_unit_axes(weight_scale, weight_axes)
    if sw is None:
        return (
            f"the weight scales (shape {tuple(weight_scale.shape)}) vary along the "
            "contracted input axis (per_block?); use per_channel(-1) or per_tensor weights"
        )
    sa = sa.astype(jnp.float32).reshape(sa.shape + (1,) * sw.ndim)
    return sa * sw.astype(jnp.float32).reshape((1,) * (sa.ndim - sw.ndim) + sw.shape)


def drop_unit_axes(scale: jax.Array, axes: tuple) -> jax.Array | None:
    """``scale`` without ``axes``, or None if any of them is not of size 1."""
    if any(scale.shape[a] != 1 for a in axes):
        return None
    return scale.reshape(tuple(d for a, d in enumerate(scale.shape) if a not in axes))


def qat_dot(
    lhs: jax.Array,
    rhs: jax.Array,
    lhs_codes: jax.Array,
    rhs_codes: jax.Array,
    out_scale: jax.Array,
    dimension_numbers: tuple,
    precision: Any = None,
) -> jax.Array:
    """``dot_general`` of fake-quantized operands, run on their int8 codes into int32.

    ``lhs`` and ``rhs`` are the fake-quantized operands, ``lhs_codes`` and ``rhs_codes``
    their integer codes (``qjax.quantize`` of them with the same params gives exactly the
    codes, as they lie on the grid) and ``out_scale`` (:func:`dot_scale`) broadcasts
    against the dot's output. The codes' dot is exact in int32 and rounded once when it
    is scaled. The gradient is that of the float dot of ``lhs`` and ``rhs``: the same as
    without integer dots, so training sees the straight-through estimator unchanged.
    """
    return _qat_dot(dimension_numbers, precision, lhs, rhs, lhs_codes, rhs_codes, out_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qat_dot(dimension_numbers, precision, lhs, rhs, lhs_codes, rhs_codes, out_scale):
    del precision, rhs  # an integer dot is exact; rhs is a residual for the backward
    acc = jax.lax.dot_general(
        lhs_codes.astype(jnp.int8),
        rhs_codes.astype(jnp.int8),
        dimension_numbers,
        preferred_element_type=jnp.int32,
    )
    # unfused: the scaled sum is rounded on its own, as in serving, never fused into the
    # layer's bias add (see qjax.flax._common.rounded).
    return unfused(acc.astype(jnp.float32) * out_scale).astype(lhs.dtype)


def _qat_dot_fwd(dimension_numbers, precision, lhs, rhs, lhs_codes, rhs_codes, out_scale):
    out = _qat_dot(dimension_numbers, precision, lhs, rhs, lhs_codes, rhs_codes, out_scale)
    return out, (lhs, rhs)


def _qat_dot_bwd(dimension_numbers, precision, residuals, g):
    lhs, rhs = residuals

    def float_dot(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.dot_general(a, b, dimension_numbers, precision=precision)

    _, vjp = jax.vjp(float_dot, lhs, rhs)
    d_lhs, d_rhs = vjp(g.astype(jnp.result_type(lhs, rhs)))
    return d_lhs, d_rhs, None, None, None  # codes and scales take no gradient


_qat_dot.defvjp(_qat_dot_fwd, _qat_dot_bwd)
