"""Range observers (qjax.calibration) against NumPy references written from the formulae.

minmax / absmax equal compute_qparams; percentile matches np.percentile on blocks cut in
NumPy; the MSE search equals a brute-force NumPy search and is never worse than minmax;
the moving average matches a hand-written EMA; jit, eager and vmap agree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qjax
from qjax.calibration import (
    METHODS,
    MovingAverage,
    calibrate,
    moving_average_init,
    moving_average_qparams,
    moving_average_update,
    observe_range,
)
from reference import FLOAT_TARGETS, blocks_view, dtype_range

EPS = np.float32(np.finfo(np.float32).eps)

SPECS = [
    qjax.QuantSpec("int8"),
    qjax.QuantSpec("uint8"),
    qjax.QuantSpec("int4", "asymmetric", "minval"),
    qjax.QuantSpec("uint4", "asymmetric"),
    qjax.QuantSpec("int2", "symmetric_with_clipping", "zero_point"),
    qjax.QuantSpec("float8_e4m3fn"),
    qjax.QuantSpec("float4_e2m1fn", scale_dtype="bfloat16"),
    qjax.QuantSpec("float8_e5m2", scale_dtype="float8_e8m0fnu"),
]

# (shape, granularity, block shape worked out by hand)
GRANULARITIES = [
    ((8, 12), qjax.per_tensor(), (8, 12)),
    ((8, 12), qjax.per_channel(-1), (8, 1)),
    ((8, 12), qjax.per_block(-2, 4), (4, 1)),
    ((8, 12), qjax.per_block(-1, 4, channel_axis="all"), (1, 4)),
    ((2, 6, 4), (2, -1, 2), (2, 6, 2)),
    ((2, 3, 8, 4), qjax.per_block(-2, 4), (2, 3, 4, 1)),
]


def with_granularity(spec: qjax.QuantSpec, granularity) -> qjax.QuantSpec:
    return qjax.QuantSpec(spec.dtype, spec.scheme, spec.formulation, granularity, spec.scale_dtype)


def normal_data(shape, seed=0, outliers=0, outlier_size=8.0) -> np.ndarray:
    """Standard normal float32 values, with ``outliers`` of them set to +-outlier_size."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    where = rng.choice(x.size, outliers, replace=False)
    x.flat[where] = np.float32(outlier_size) * rng.choice(np.float32([-1, 1]), outliers)
    return x


def assert_same_qparams(a: qjax.QParams, b: qjax.QParams) -> None:
    for name in ("scale", "zero_point", "minval"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(
                np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=name
            )


def sse(x: np.ndarray, spec: qjax.QuantSpec, qparams=None) -> float:
    """Squared error of fake_quant, summed in float64."""
    y = np.asarray(qjax.fake_quant(x, spec, qparams=qparams), np.float64)
    return float(np.sum((y - x.astype(np.float64)) ** 2))


# ----------------------------------------------------------------------- NumPy reference


def np_block_reduce(x: np.ndarray, block: tuple[int, ...], fn) -> np.ndarray:
    """``fn(values, axis=block_axes)`` per block; shape ``x.shape // block``."""
    return fn(blocks_view(x, block), axis=tuple(range(1, 2 * x.ndim, 2)))


def np_qparams(lo: np.ndarray, hi: np.ndarray, spec: qjax.QuantSpec):
    """The scheme formulae of design notes section 1, in NumPy float32."""
    qmin, qmax = dtype_range(spec.dtype, spec.scheme)
    min_neg = np.minimum(lo, np.float32(0)).astype(np.float32)
    max_pos = np.maximum(hi, np.float32(0)).astype(np.float32)
    if spec.scheme == "asymmetric":
        scale = np.maximum((max_pos - min_neg) / np.float32(qmax - qmin), EPS)
        zero_point = np.clip(qmin - np.round(min_neg / scale), qmin, qmax)
        return scale, zero_point, min_neg
    amax = np.maximum(-min_neg, max_pos)
    scale = np.maximum(amax / np.float32((qmax - qmin) / 2), EPS)
    return scale, np.full_like(amax, math.floor((qmax + qmin + 1) / 2)), -amax


def np_fake_quant(xb: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: qjax.QuantSpec):
    """Dequantized blocked values ``(n0, b0, n1, b1, ...)``, params from the range."""
    scale, zero_point, minval = (p[:, None, :, None] for p in np_qparams(lo, hi, spec))
    qmin, qmax = dtype_range(spec.dtype, spec.scheme)
    if spec.dtype in FLOAT_TARGETS:
        storage = np.dtype(getattr(ml_dtypes, spec.dtype))
        return np.clip(xb / scale, qmin, qmax).astype(storage).astype(np.float32) * scale
    if spec.formulation == "minval":
        q = np.clip(np.round((xb - minval) / scale) + np.float32(qmin), qmin, qmax)
        return scale * (q - np.float32(qmin)) + minval
    zp = zero_point if spec.formulation == "zero_point" else np.float32(0)
    return scale * (np.clip(np.round(xb / scale) + zp, qmin, qmax) - zp)


def np_mse_search(x: np.ndarray, block: tuple[int, int], spec, grid: int, min_ratio: float):
    """Brute force over r_k = 1 - (1 - min_ratio) k / (grid - 1): the best range per block."""
    xb = blocks_view(x, block)
    lo, hi = xb.min(axis=(1, 3)), xb.max(axis=(1, 3))
    errors, ranges = [], []
    for k in range(grid):
        r = np.float32(1 - (1 - min_ratio) * k / max(grid - 1, 1))
        deq = np_fake_quant(xb, lo * r, hi * r, spec)
        errors.append(np.sum((deq.astype(np.float64) - xb) ** 2, axis=(1, 3)))
        ranges.append((lo * r, hi * r))
    best = np.argmin(np.stack(errors), axis=0)  # the first (largest ratio) on ties
    pick = np.take_along_axis
    best_lo = pick(np.stack([r[0] for r in ranges]), best[None], 0)[0]
    best_hi = pick(np.stack([r[1] for r in ranges]), best[None], 0)[0]
    return best_lo, best_hi


# ------------------------------------------------------------------------ minmax, absmax


# Each spec with a third of the granularities (one compile per case keeps the file fast).
SPEC_GRANULARITIES = [(s, *g) for i, s in enumerate(SPECS) for g in GRANULARITIES[i % 3 :: 3]]


@pytest.mark.parametrize("spec, shape, granularity, block", SPEC_GRANULARITIES, ids=str)
def test_minmax_equals_compute_qparams(spec, shape, granularity, block):
    spec = with_granularity(spec, granularity)
    x = normal_data(shape, seed=1, outliers=2)
    expected = qjax.compute_qparams(x, spec)
    assert expected.scale.shape == tuple(d // b for d, b in zip(shape, block))
    assert_same_qparams(calibrate(x, spec), expected)  # the default method is minmax
    if spec.scheme != "asymmetric":
        assert_same_qparams(calibrate(x, spec, "absmax"), expected)


@pytest.mark.parametrize("shape, granularity, block", GRANULARITIES[:4], ids=str)
def test_absmax_centres_the_asymmetric_range(shape, granularity, block):
    spec = qjax.QuantSpec("uint8", "asymmetric", granularity=granularity)
    x = normal_data(shape, seed=2) + np.float32(1.0)  # mostly positive: centring matters
    amax = np_block_reduce(np.abs(x), block, np.max)
    lo, hi = observe_range(x, spec, "absmax")
    np.testing.assert_array_equal(lo, -amax)
    np.testing.assert_array_equal(hi, amax)
    scale, zero_point, _ = np_qparams(-amax, amax, spec)
    qp = calibrate(x, spec, "absmax")
    np.testing.assert_array_equal(qp.scale, scale)  # (2 amax) / 255
    np.testing.assert_array_equal(qp.zero_point, zero_point)  # 128 (or 127 by rounding)


# ---------------------------------------------------------------------------- percentile


PERCENTILE_SPECS = [
    qjax.QuantSpec("int8"),
    qjax.QuantSpec("uint4", "asymmetric"),
    qjax.QuantSpec("float8_e4m3fn"),
]


def np_percentile_range(x: np.ndarray, block, spec: qjax.QuantSpec, p: float):
    """``(P_{100-p}, P_p)`` per block (asymmetric) or ``-+P_p(|x|)``, with np.percentile."""
    if spec.scheme == "asymmetric":
        lo = np_block_reduce(x, block, lambda v, axis: np.percentile(v, 100 - p, axis))
        return lo, np_block_reduce(x, block, lambda v, axis: np.percentile(v, p, axis))
    amax = np_block_reduce(np.abs(x), block, lambda v, axis: np.percentile(v, p, axis))
    return -amax, amax


@pytest.mark.parametrize(
    "spec, shape, granularity, block",
    [(PERCENTILE_SPECS[i % 3], *g) for i, g in enumerate(GRANULARITIES)],
    ids=str,
)
def test_percentile_matches_numpy_on_blocks(spec, shape, granularity, block):
    spec = with_granularity(spec, granularity)
    x = normal_data(shape, seed=3, outliers=3, outlier_size=30.0)
    for p in (90.0, 99.5):
        lo, hi = observe_range(x, spec, "percentile", percentile=p)
        expected_lo, expected_hi = np_percentile_range(x, block, spec, p)
        # NumPy interpolates in float64, qjax in float32: a few ulps of the neighbours' gap.
        np.testing.assert_allclose(lo, expected_lo, rtol=1e-5, err_msg=str(p))
        np.testing.assert_allclose(hi, expected_hi, rtol=1e-5, err_msg=str(p))
    qp = calibrate(x, spec, "percentile", percentile=99.5)
    assert_same_qparams(qp, qjax.qparams_from_minmax(lo, hi, spec))


@pytest.mark.parametrize("spec", PERCENTILE_SPECS, ids=str)
def test_percentile_100_is_the_max(spec):
    spec = with_granularity(spec, qjax.per_channel(0))
    x = normal_data((4, 16), seed=4, outliers=2, outlier_size=30.0)
    assert_same_qparams(
        calibrate(x, spec, "percentile", percentile=100),
        calibrate(x, spec, "absmax" if spec.scheme != "asymmetric" else "minmax"),
    )


def test_percentile_clips_outliers():
    x = normal_data((4, 256), seed=4)
    x[:, 7] = 100.0  # one outlier per channel
    spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(0))
    clipped = np.asarray(calibrate(x, spec, "percentile", percentile=99.0).scale) * 127.5
    assert np.all(clipped < 5.0), clipped  # the normal bulk, not the outliers at 100


# ------------------------------------------------------------------------------- MSE


@pytest.mark.parametrize(
    "spec, grid, min_ratio",
    [
        (qjax.QuantSpec("int4"), 25, 0.1),
        (qjax.QuantSpec("int4"), 1, 0.5),
        (qjax.QuantSpec("uint4", "asymmetric"), 7, 0.4),
        (qjax.QuantSpec("int8", "asymmetric", "minval"), 25, 0.1),
        (qjax.QuantSpec("int4", "symmetric_with_clipping", "zero_point"), 7, 0.4),
        (qjax.QuantSpec("float8_e4m3fn"), 25, 0.1),
        (qjax.QuantSpec("float4_e2m1fn"), 7, 0.4),
    ],
    ids=str,
)
def test_mse_equals_brute_force_numpy_search(spec, grid, min_ratio):
    x = normal_data((8, 32), seed=5, outliers=6, outlier_size=6.0)
    spec = with_granularity(spec, qjax.per_block(-1, 16, channel_axis="all"))
    lo, hi = np_mse_search(x, (1, 16), spec, grid, min_ratio)
    scale, zero_point, minval = np_qparams(lo, hi, spec)
    qp = calibrate(x, spec, "mse", grid=grid, min_ratio=min_ratio)
    np.testing.assert_array_equal(qp.scale, scale)
    if not spec.is_float:
        np.testing.assert_array_equal(qp.zero_point, zero_point)
        np.testing.assert_array_equal(qp.minval, minval)
    if grid == 1:
        assert_same_qparams(qp, qjax.compute_qparams(x, spec))


@pytest.mark.parametrize(
    "granularity", [qjax.per_tensor(), qjax.per_channel(0), qjax.per_block(-1, 128)], ids=str
)
def test_mse_is_strictly_better_on_heavy_tails_int4(granularity):
    x = normal_data((8, 512), seed=6)
    x[:, 7] = 9.0  # one outlier per row
    spec = qjax.QuantSpec("int4", granularity=granularity)
    mse_error = sse(x, spec, calibrate(x, spec, "mse"))
    minmax_error = sse(x, spec)
    assert mse_error < 0.95 * minmax_error, (mse_error, minmax_error)


INT_TARGETS = ("int8", "uint8", "int4", "uint4", "int2", "uint2")
SHAPES = ((12,), (4, 6), (2, 3, 4))


@st.composite
def granularities(draw, shape):
    kind = draw(st.sampled_from(("per_tensor", "per_channel", "per_block", "explicit")))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    divisors = [d for d in range(1, shape[axis] + 1) if shape[axis] % d == 0]
    if kind == "per_tensor":
        return qjax.per_tensor()
    if kind == "per_channel":
        return qjax.per_channel(axis)
    if kind == "per_block":
        return qjax.per_block(axis, draw(st.sampled_from(divisors)))
    return tuple(draw(st.sampled_from((-1, 1, d))) for d in shape)


@st.composite
def mse_cases(draw):
    """(x, spec, grid, min_ratio): any target, scheme, formulation, granularity; heavy tails."""
    target = draw(st.sampled_from(INT_TARGETS + tuple(FLOAT_TARGETS) + ("mxfp4",)))
    if target == "mxfp4":
        shape, spec = (2, 64), qjax.QuantSpec("mxfp4")
    else:
        shape = draw(st.sampled_from(SHAPES))
        granularity = draw(granularities(shape))
        if target in FLOAT_TARGETS:
            scale_dtype = draw(st.sampled_from(("float32", "bfloat16", "float8_e8m0fnu")))
            spec = qjax.QuantSpec(target, granularity=granularity, scale_dtype=scale_dtype)
        else:
            schemes = ["symmetric", "asymmetric"]
            schemes += ["symmetric_with_clipping"] if target.startswith("int") else []
            scheme = draw(st.sampled_from(schemes))
            formulation = draw(st.sampled_from((None, "zero_point", "minval")))
            scale_dtype = draw(st.sampled_from(("float32", "float16")))
            spec = qjax.QuantSpec(target, scheme, formulation, granularity, scale_dtype)
    base = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    tail = draw(hnp.arrays(np.bool_, shape))
    x = (
        base
        * np.where(tail, np.float32(16), np.float32(1))
        * np.float32(2.0 ** draw(st.integers(-8, 8)))
    )
    x = np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)  # no subnormals
    grid = draw(st.integers(1, 12))
    min_ratio = draw(st.sampled_from((0.05, 0.3, 0.5, 0.9, 1.0)))
    return x.astype(np.float32), spec, grid, min_ratio


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(case=(np.zeros((4, 6), np.float32), qjax.QuantSpec("uint4", "asymmetric"), 5, 0.5))
@given(case=mse_cases())
def test_mse_is_never_worse_than_minmax(case):
    x, spec, grid, min_ratio = case
    qp = calibrate(x, spec, "mse", grid=grid, min_ratio=min_ratio)
    mse_error, minmax_error = sse(x, spec, qp), sse(x, spec)
    # Candidates are compared by float32 sums; allow their rounding (1e-6 relative).
    assert mse_error <= minmax_error * (1 + 1e-6), (mse_error, minmax_error, str(spec))


# ----------------------------------------------------------------------- moving average


@pytest.mark.parametrize("method", ["minmax", "percentile"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_moving_average_matches_numpy_ema(method, momentum):
    spec = qjax.QuantSpec("uint8", "asymmetric", granularity=qjax.per_channel(-1))
    batches = [normal_data((16, 3), seed=s) * np.float32(s + 1) for s in range(4)]
    state = moving_average_init((1, 3))
    expected_lo = expected_hi = None
    for i, x in enumerate(batches):
        state = moving_average_update(state, x, spec, momentum, method, percentile=95.0)
        if method == "minmax":
            lo, hi = x.min(axis=0, keepdims=True), x.max(axis=0, keepdims=True)
        else:
            lo = np.percentile(x, 5.0, axis=0, keepdims=True).astype(np.float32)
            hi = np.percentile(x, 95.0, axis=0, keepdims=True).astype(np.float32)
        if i == 0:  # the first update takes the batch's range as it is
            expected_lo, expected_hi = lo, hi
        else:  # float32 products and sum, each rounded once: exact for minmax
            m, rest = np.float32(momentum), np.float32(1 - momentum)
            expected_lo = m * expected_lo + rest * lo
            expected_hi = m * expected_hi + rest * hi
        rtol = 0 if method == "minmax" else 1e-5  # NumPy interpolates in float64
        np.testing.assert_allclose(state.min_val, expected_lo, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(state.max_val, expected_hi, rtol=rtol, atol=rtol)
        assert int(state.count) == i + 1
    assert_same_qparams(
        moving_average_qparams(state, spec),
        qjax.qparams_from_minmax(state.min_val, state.max_val, spec),
    )
    if momentum == 0.0:  # no memory: the last batch's params
        assert_same_qparams(
            moving_average_qparams(state, spec),
            calibrate(batches[-1], spec, method, percentile=95.0),
        )


def test_moving_average_first_update_is_exact_and_jit_equals_eager():
    spec = qjax.QuantSpec("int8", granularity=qjax.per_block(-1, 4, channel_axis="all"))
    x = normal_data((2, 8), seed=7)
    update = jax.jit(lambda s, x: moving_average_update(s, x, spec, 0.3, "absmax"))
    state = update(moving_average_init((2, 2)), x)
    assert isinstance(state, MovingAverage)
    lo, hi = observe_range(x, spec, "absmax")
    np.testing.assert_array_equal(state.min_val, lo)
    np.testing.assert_array_equal(state.max_val, hi)
    x2 = normal_data((2, 8), seed=8)
    state2 = update(state, x2)
    with jax.disable_jit():  # the EMA's products and sum are not fused under jit either
        eager = moving_average_update(state, x2, spec, 0.3, "absmax")
    for name in ("min_val", "max_val", "count"):
        np.testing.assert_array_equal(getattr(state2, name), getattr(eager, name), err_msg=name)
    empty = moving_average_qparams(moving_average_init((2, 2)), spec)
    np.testing.assert_array_equal(empty.scale, np.full((2, 2), EPS))


# ------------------------------------------------------------- jit, eager, vmap, edge cases


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "spec, eager",
    [
        (qjax.QuantSpec("int4", "asymmetric", "minval", (4, 1)), True),
        (qjax.QuantSpec("mxfp4"), False),  # op by op, e8m0 maths compiles many small ops
    ],
    ids=str,
)
def test_jit_equals_eager(spec, eager, method):
    """Bit for bit: the percentile interpolation is kept from fusing into an FMA under jit."""
    x = normal_data((4, 32), seed=8, outliers=4)
    kwargs = {"grid": 3, "min_ratio": 0.3, "percentile": 97.0}
    result = calibrate(x, spec, method, **kwargs)
    jitted = jax.jit(lambda x: calibrate(x, spec, method, **kwargs))(x)
    assert_same_qparams(jitted, result)
    if eager and method in ("percentile", "mse"):  # the others are plain min / max
        with jax.disable_jit():
            assert_same_qparams(calibrate(x, spec, method, **kwargs), result)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_rows_equals_per_channel(method):
    x = normal_data((4, 64), seed=9, outliers=3)
    spec_row = qjax.QuantSpec("uint4", "asymmetric")
    spec_channel = with_granularity(spec_row, qjax.per_channel(0))
    rows = jax.vmap(lambda r: calibrate(r, spec_row, method, grid=10))(jnp.asarray(x))
    whole = calibrate(x, spec_channel, method, grid=10)
    for name in ("scale", "zero_point", "minval"):
        np.testing.assert_array_equal(getattr(rows, name), getattr(whole, name), err_msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_nan_spoils_only_its_block(method):
    spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(0))
    x = normal_data((3, 16), seed=10)
    clean = calibrate(x, spec, method, grid=5)
    x[1, 3] = np.nan
    dirty = calibrate(x, spec, method, grid=5)
    assert np.isnan(np.asarray(dirty.scale)[1]).all()
    np.testing.assert_array_equal(np.asarray(dirty.scale)[[0, 2]], np.asarray(clean.scale)[[0, 2]])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(0, 4), (3,), ()], ids=str)
def test_empty_scalar_and_bf16_inputs(method, shape):
    spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(0) if len(shape) else None)
    x = jnp.asarray(
        normal_data(shape, seed=11) if math.prod(shape) else np.zeros(shape), jnp.bfloat16
    )
    qp = calibrate(x, spec, method, grid=4)
    expected = qjax.compute_qparams(x, spec)
    assert qp.scale.shape == expected.scale.shape
    assert np.all(np.isfinite(np.asarray(qp.scale)))
    if method in ("minmax", "absmax") or math.prod(shape) == 0:
        assert_same_qparams(qp, expected)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "max"}, "unknown calibration method 'max'"),
        (
            {"method": "percentile", "percentile": 0},
            "percentile must be a number in .0, 100., got 0",
        ),
        ({"method": "percentile", "percentile": 100.5}, "got 100.5"),
        ({"method": "percentile", "percentile": float("nan")}, "got nan"),
        ({"method": "mse", "grid": 0}, "grid must be a positive integer .*got 0"),
        ({"method": "mse", "grid": 2.5}, "got 2.5"),
        ({"method": "mse", "min_ratio": 0.0}, "min_ratio must be a number in .0, 1., got 0.0"),
        ({"method": "mse", "min_ratio": 1.5}, "got 1.5"),
    ],
    ids=str,
)
def test_bad_options_are_value_errors(kwargs, message):
    x = jnp.ones((4,))
    with pytest.raises(ValueError, match=message):
        calibrate(x, qjax.QuantSpec("int8"), **kwargs)
    with pytest.raises(ValueError, match=message):
        moving_average_update(moving_average_init((1,)), x, qjax.QuantSpec("int8"), **kwargs)


@pytest.mark.parametrize("momentum", [1.0, -0.1, 2])
def test_bad_momentum_is_a_value_error(momentum):
    with pytest.raises(ValueError, match=rf"momentum must be a number in \[0, 1\), got {momentum}"):
        moving_average_update(
            moving_average_init((1,)), jnp.ones((4,)), qjax.QuantSpec("int8"), momentum
        )


def test_state_of_the_wrong_shape_is_a_value_error():
    spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
    with pytest.raises(ValueError, match=r"state has shape \(3,\).*params of shape \(1, 4\)"):
        moving_average_update(moving_average_init((3,)), jnp.ones((2, 4)), spec)


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="calibrate expects a floating-point array"):
        calibrate(jnp.ones((4,), jnp.int32), qjax.QuantSpec("int8"))
