"""int3 / uint3: 3-bit integer targets ([-4, 3] / [0, 7]) held and packed as 4-bit codes.

Checked bit for bit, under ``jit``, against the spec's formulae in plain NumPy float32
(design notes section 1) with the 3-bit ranges written out here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax

RANGES = {
    ("int3", "symmetric"): (-4, 3),
    ("int3", "symmetric_with_clipping"): (-3, 3),
    ("int3", "asymmetric"): (-4, 3),
    ("uint3", "symmetric"): (0, 7),
    ("uint3", "asymmetric"): (0, 7),
}
EPS = np.finfo(np.float32).eps


def reference(x: np.ndarray, scheme: str, formulation: str, qmin: int, qmax: int):
    """Per-row (per_channel(0)) codes and dequantized values."""
    lo = np.minimum(x.min(1, keepdims=True), np.float32(0))
    hi = np.maximum(x.max(1, keepdims=True), np.float32(0))
    if scheme == "asymmetric":
        scale = np.maximum((hi - lo) / np.float32(qmax - qmin), EPS)
        zero_point = np.clip(qmin - np.round(lo / scale), qmin, qmax)
        minval = lo
    else:
        amax = np.maximum(-lo, hi)
        scale = np.maximum(amax / np.float32((qmax - qmin) / 2), EPS)
        zero_point = np.full_like(scale, (qmax + qmin + 1) // 2)
        minval = -amax
    if formulation == "minval":
        q = np.clip(np.round((x - minval) / scale) + qmin, qmin, qmax)
        return q, scale * (q - qmin) + minval
    if formulation == "zero_point":
        q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
        return q, scale * (q - zero_point)
    q = np.clip(np.round(x / scale), qmin, qmax)
    return q, scale * q


CASES = [
    (name, scheme, formulation)
    for (name, scheme) in RANGES
    for formulation in ("scale", "zero_point", "minval")
    if not (formulation == "scale" and (name == "uint3" or scheme == "asymmetric"))
]


@pytest.mark.parametrize(("name", "scheme", "formulation"), CASES)
def test_codes_and_values_match_the_formulae(name, scheme, formulation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 10)).astype(np.float32)
    x[1] = np.arange(-5, 5) / np.float32(2)  # grid values: ties at .5 steps
    x[2] = 0.0
    x[3] = np.abs(x[3])
    spec = qjax.QuantSpec(name, scheme, formulation, qjax.per_channel(0))
    qmin, qmax = RANGES[(name, scheme)]
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    qa = jax.jit(lambda v: qjax.quantize(v, spec))(x)
    q, y = reference(x, scheme, formulation, qmin, qmax)
    assert (
        qa.packed
        and qa.data.shape == (6, 5)
        and qa.dtype == (jnp.int4 if name == "int3" else jnp.uint4)
    )
    np.testing.assert_array_equal(np.asarray(qa.values).astype(np.int32), q.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(qa)), y.astype(np.float32))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda v: qjax.fake_quant(v, spec))(x)), y.astype(np.float32)
    )
    assert qa.nbytes == 6 * 5 + 6 * 4 * (1 + (formulation != "scale"))


def test_shorthand_and_gradient():
    spec = qjax.parse_spec("int3:per_block:4:axis=-1")
    assert spec.dtype == "int3" and spec.granularity == qjax.per_block(-1, 4)
    x = jnp.array([[-1.0, 0.2, 0.5, 1.0, 3.0, -2.0, 0.0, 0.1]])
    qp = qjax.QParams(jnp.full((1, 2), 0.25), None, None)
    grad = jax.grad(lambda v: qjax.fake_quant(v, spec, qparams=qp).sum())(x)
    # in range where -4 <= round(x / 0.25) <= 3
    np.testing.assert_array_equal(grad, [[1, 1, 1, 0, 0, 0, 1, 1]])
    with pytest.raises(
        ValueError, match=r"qparams.zero_point must lie in \[qmin, qmax\] = \[0, 7\]"
    ):
        qjax.quantize(x, "uint3", qparams=qjax.QParams(jnp.float32(1), jnp.int32(8), None))
