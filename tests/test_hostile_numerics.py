"""Hostile numerics (issue 11, items 1, 2 and 7): extreme finite inputs stay finite and right.

Every expected value comes from an exact reference written here from the formulae alone:
Python fractions for the arithmetic, rounded to float32's grid (nearest even, exponent
unbounded above, which is what "correct to the formula" means where an intermediate of
the formula leaves float32's range), ml_dtypes casts for float targets and NumPy float32
division (IEEE) for quotients. Nothing is copied from qjax.

* Finite in, finite out: every target, scheme and formulation on inputs holding the
  dtype's largest values (float32, bfloat16, float16): the codes are the formula's, the
  dequantized values are the formula's saturated to the dtype's finite range (so
  ``-amax`` under a symmetric spec comes back as ``-finfo.max``), ``fake_quant`` agrees.
* Range overflow: asymmetric / minval ranges wider than float32 max, float16 / bfloat16 /
  e8m0 scales that cannot hold a range (refused eagerly, saturated under jit).
* Exact division: the GPU correction (``round_quotient``) on operands anywhere in the
  finite range, subnormal and overflowing quotients included.
* Reports: every figure finite for such tensors.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax import exact
from qjax.report import leaf_row, report, totals

F32_MAX = float(np.finfo(np.float32).max)
EPS = Fraction(2) ** -23
FLOAT16_SCALE_MAX = 65504
S = qjax.QuantSpec
ROWS = qjax.per_channel(0)
"""Each row of the (rows, 32) test arrays is one block, one hostile case."""


# --- the exact reference -------------------------------------------------------------


def round_f32(v: Fraction) -> Fraction:
    """``v`` rounded to nearest even on float32's grid; no upper exponent limit."""
    if v == 0:
        return Fraction(0)
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1  # now 2**e <= a < 2**(e + 1)
    ulp = Fraction(2) ** (max(e, -126) - 23)
    return (1 if v > 0 else -1) * round(a / ulp) * ulp


def f32(v: Fraction) -> float:
    """The IEEE float32 result of an exact value: inf past float32's overflow threshold."""
    r = round_f32(v)
    return math.copysign(math.inf, r) if abs(r) > F32_MAX else float(r)


def half_even(v: float) -> float:
    return float(np.round(np.float64(v)))


def saturated(v: Fraction, dtype: np.dtype) -> float:
    limit = min(float(ml_dtypes.finfo(dtype).max), F32_MAX)
    return float(min(max(v, Fraction(-limit)), Fraction(limit)))


def np_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name, None) or name)


def target_range(name: str, scheme: str) -> tuple[float, float]:
    dtype = np_dtype(name)
    if name.startswith("float"):
        fmax = float(ml_dtypes.finfo(dtype).max)
        return -fmax, fmax
    info = ml_dtypes.iinfo(dtype)
    lo = -int(info.max) if scheme == "symmetric_with_clipping" else int(info.min)
    return lo, int(info.max)


def reference_block(row: np.ndarray, spec: qjax.QuantSpec, out: np.dtype):
    """(codes, dequantized in ``out``) of one block, from the formulae."""
    xs = [Fraction(float(v)) for v in row.astype(np.float32)]
    qmin, qmax = target_range(spec.dtype, spec.scheme)
    min_neg, max_pos = min(min(xs), Fraction(0)), max(max(xs), Fraction(0))
    if spec.scale_dtype == "float8_e8m0fnu":
        return _reference_mx(xs, spec, max(-min_neg, max_pos), out)
    if spec.scheme == "asymmetric":
        scale = Fraction(max(f32(round_f32(max_pos - min_neg) / (qmax - qmin)), float(EPS)))
        zero_point = int(np.clip(qmin - half_even(f32(min_neg / scale)), qmin, qmax))
        minval = min_neg
    else:
        amax = max(-min_neg, max_pos)
        scale = Fraction(max(f32(amax / (Fraction(qmax - qmin) / 2)), float(EPS)))
        zero_point, minval = (qmax + qmin + 1) // 2, -amax
    if spec.scale_dtype != "float32":
        stored = np.float32(float(scale)).astype(np_dtype(spec.scale_dtype))
        scale = Fraction(float(stored))
    codes, deq = [], []
    for x in xs:
        if spec.is_float:
            v = float(np.clip(f32(x / scale), qmin, qmax))
            q = float(np.float32(v).astype(np_dtype(spec.dtype)))
            y = round_f32(scale * Fraction(q))
        elif spec.formulation == "minval":
            q = np.clip(half_even(f32(round_f32(x - minval) / scale)) + qmin, qmin, qmax)
            y = round_f32(round_f32(scale * Fraction(int(q) - qmin)) + minval)
        else:
            zp = zero_point if spec.formulation == "zero_point" else 0
            q = np.clip(half_even(f32(x / scale)) + zp, qmin, qmax)
            y = round_f32(scale * Fraction(int(q) - zp))
        codes.append(float(q))
        deq.append(saturated(y, out))
    return codes, deq


def _reference_mx(xs, spec, amax, out):
    t = spec.target
    e = amax.numerator.bit_length() - amax.denominator.bit_length() if amax else -200
    if amax and Fraction(2) ** e > amax:
        e -= 1
    scale = Fraction(2) ** int(np.clip(e - t.emax, -127, 127))
    codes = [
        float(np.float32(np.clip(float(x / scale), t.qmin, t.qmax)).astype(t.storage))
        for x in xs
    ]
    return codes, [saturated(scale * Fraction(c), out) for c in codes]


def reference(x: np.ndarray, spec: qjax.QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Row-blocked reference: (codes as float32, dequantized in x's dtype)."""
    pairs = [reference_block(row, spec, x.dtype) for row in x]
    codes = np.array([c for c, _ in pairs], np.float32)
    deq = np.array([d for _, d in pairs], np.float64).astype(np.float32).astype(x.dtype)
    return codes, deq


# --- class 1: finite in, finite out ---------------------------------------------------


def hostile_rows(dtype: np.dtype) -> np.ndarray:
    """Eight blocks of 32 values around the dtype's largest finite value ``m``."""
    m = float(ml_dtypes.finfo(dtype).max)
    rng = np.random.default_rng(0)
    rows = np.zeros((8, 32), np.float64)
    rows[0] = np.linspace(-m, m, 32)
    rows[0, :8] = [-m, m, 0, 1, -1, m / 3, -m / 7, m / 2]
    rows[1, 0] = -m  # only the negative extreme: symmetric specs map it to qmin
    rows[2, :3] = [m, m / 255, -m / 1000]
    rows[3] = -m  # a constant block at the extreme
    rows[4] = rng.uniform(-m, m, 32)
    rows[5, :4] = [-m / 2, m, m * 0.999, -1.5]  # asymmetric: range past float32 max
    rows[6, :4] = [m, -m, m * 0.75, -m * 0.25]
    rows[7] = -rng.uniform(0, m, 32)  # all negative
    return rows.astype(dtype)


CLASS1_SPECS = [
    S("int8", granularity=ROWS),
    S("int8", formulation="minval", granularity=ROWS),
    S("int8", "asymmetric", "minval", granularity=ROWS),
    S("uint8", granularity=ROWS),
    S("uint8", "asymmetric", "minval", granularity=ROWS),
    S("int4", "symmetric_with_clipping", granularity=ROWS),
    S("int4", "asymmetric", "minval", granularity=ROWS),
    S("uint4", "asymmetric", granularity=ROWS),
    S("int2", formulation="zero_point", granularity=ROWS),
    S("uint2", "asymmetric", granularity=ROWS),
    S("float8_e4m3fn", granularity=ROWS),
    S("float8_e5m2", scale_dtype="bfloat16", granularity=ROWS),
    S("float4_e2m1fn", granularity=ROWS),
    S("mxfp8"),
    S("mxfp4"),
]
INPUT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


@pytest.mark.parametrize(
    ("spec", "narrow"),
    [(spec, INPUT_DTYPES[1 + i % 2]) for i, spec in enumerate(CLASS1_SPECS)],
    ids=lambda v: str(v) if isinstance(v, qjax.QuantSpec) else v.name,
)
def test_extreme_inputs_dequantize_to_finite_formula_values(spec, narrow):
    """8 blocks in float32 and in bfloat16 or float16 (alternately, to bound the compile
    time) per spec: codes, dequantize (QArray.dequantize) and fake_quant."""

    @jax.jit
    def run(*xs):
        out = []
        for x in xs:
            qa = qjax.quantize(x, spec)
            codes = qa.values.astype(jnp.float32)
            out.append((codes, qjax.dequantize(qa), qjax.fake_quant(x, spec)))
        return out

    inputs = [hostile_rows(INPUT_DTYPES[0]), hostile_rows(narrow)]
    for x, (codes, deq, fq) in zip(inputs, run(*inputs)):
        want_codes, want = reference(x, spec)
        for got in (deq, fq):
            assert got.dtype == x.dtype
            got = np.asarray(got).astype(np.float32)
            assert np.all(np.isfinite(got)), (x.dtype, spec)
            np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=str(x.dtype))
        np.testing.assert_array_equal(np.asarray(codes), want_codes, err_msg=str(x.dtype))


@pytest.mark.parametrize(
    ("dtype", "name"), [(np.float16, "int8"), (np.float32, "int4"), (ml_dtypes.bfloat16, "int2")]
)
def test_minus_amax_comes_back_as_minus_the_dtype_max(name, dtype):
    """The issue's case, eagerly: -max maps to qmin, one step past -amax, which used to
    dequantize to -inf; now exactly -finfo(dtype).max."""
    m = float(ml_dtypes.finfo(dtype).max)
    x = np.array([-m, 0.0, m / 2, 1.0], dtype)
    dtype = x.dtype
    spec = S(name)
    qa = qjax.quantize(x, spec)
    assert int(np.asarray(qa.values)[0]) == int(ml_dtypes.iinfo(np_dtype(name)).min)
    for got in (qjax.dequantize(qa), qjax.fake_quant(x, spec), qa.dequantize()):
        assert got.dtype == dtype
        assert float(np.asarray(got)[0].astype(np.float64)) == -min(m, F32_MAX)


# --- class 2: range overflow ------------------------------------------------------------


WIDE_ROWS = np.array(
    [
        [-3e38, 3e38, 0.0, 1e38, -1e38, 2.9e38, -2.9e38, 1.0],
        [-F32_MAX, F32_MAX, F32_MAX / 2, -F32_MAX / 2, 1e37, -1e37, 0.0, -1.0],
        [-1e38, F32_MAX, 3e38, 2e38, 1.5e38, 0.0, -5e37, 1e-30],
        [-F32_MAX, 1e30, -3e38, 1e38, 0.0, 1.0, -1.0, 2.0],
    ],
    np.float32,
)


@pytest.mark.parametrize(
    "spec",
    [
        S("uint8", "asymmetric", granularity=ROWS),
        S("int8", "asymmetric", "minval", granularity=ROWS),
        S("uint2", "asymmetric", "minval", granularity=ROWS),
        S("int2", "asymmetric", scale_dtype="bfloat16", granularity=ROWS),
        S("uint8", formulation="minval", granularity=ROWS),
    ],
    ids=str,
)
def test_ranges_wider_than_float32_max_are_finite_and_exact(spec):
    """All NaN before: max_pos - min_neg and x - minval overflowed."""
    qa = qjax.quantize(WIDE_ROWS, spec)
    scale = np.asarray(qa.scale, np.float32)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    want_codes, want = reference(WIDE_ROWS, spec)
    np.testing.assert_array_equal(np.asarray(qa.values).astype(np.float32), want_codes)
    got = np.asarray(qjax.dequantize(qa))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(qjax.fake_quant(WIDE_ROWS, spec)), want)


@pytest.mark.parametrize("name", ["uint8", "int4", "uint2"])
def test_asymmetric_scale_is_the_plain_float32_formula_where_it_does_not_overflow(name):
    """The halved range (max/2 - min/2) / (levels/2) keeps every bit of the plain formula,
    subnormal and tiny ranges included (NumPy float32 is IEEE and keeps subnormals; XLA:CPU
    flushes them, which the eps floor hides)."""
    rng = np.random.default_rng(7)
    n = 4000
    exponents = rng.integers(-149, 126, (2, n))
    mags = np.ldexp(rng.uniform(1, 2, (2, n)), exponents).astype(np.float32)
    lo, hi = -mags[0], mags[1]
    lo[:200], hi[:200] = -(2.0**-126), 2.0**-126  # the subnormal corner
    lo[200:400] = np.float32(0)
    spec = S(name, "asymmetric")
    qmin, qmax = target_range(name, "asymmetric")
    qp = jax.jit(lambda a, b: qjax.qparams_from_minmax(a, b, spec))(lo, hi)
    plain = np.maximum((hi - lo) / np.float32(qmax - qmin), np.float32(EPS))
    np.testing.assert_array_equal(np.asarray(qp.scale).view(np.int32), plain.view(np.int32))
    with np.errstate(over="ignore"):
        zero_point = np.clip(qmin - np.round(lo / plain), qmin, qmax)
    np.testing.assert_array_equal(np.asarray(qp.zero_point), zero_point)


F16 = "float16"
LIMITS = [  # spec, the largest |x| (or range) a float16 scale holds: 65504 * levels
    (S("int8", scale_dtype=F16), 65504 * 127.5),
    (S("uint8", "asymmetric", scale_dtype=F16), 65504 * 255),
    (S("int4", scale_dtype=F16), 65504 * 7.5),
    (S("int8", "symmetric_with_clipping", scale_dtype=F16), 65504 * 127),
    (S("float8_e4m3fn", scale_dtype=F16), 65504 * 448),
]


CALLS = {
    "quantize": qjax.quantize,
    "fake_quant": qjax.fake_quant,
    "compute_qparams": qjax.compute_qparams,
    "calibrate": qjax.calibrate,
}


@pytest.mark.parametrize(
    ("spec", "limit", "what"),
    [(spec, limit, list(CALLS)[i % 4]) for i, (spec, limit) in enumerate(LIMITS)]
    + [(LIMITS[0][0], LIMITS[0][1], what) for what in list(CALLS)[1:]],
    ids=str,
)
def test_float16_scale_refuses_what_it_cannot_hold_and_names_the_limit(spec, limit, what):
    x = np.array([-1e7, 3e38, 0.0], np.float32)
    with pytest.raises(ValueError, match="float16") as info:
        CALLS[what](x, spec)
    message = str(info.value)
    assert what in message and f"{limit:.0f}" in message and "65504" in message


@pytest.mark.parametrize(("spec", "limit"), LIMITS[:3], ids=lambda v: str(v))
def test_float16_scale_at_its_limit_is_accepted_and_exact(spec, limit):
    """Up to where the scale rounds to 65504 the input is taken; one step on, refused."""
    levels = limit / FLOAT16_SCALE_MAX
    edge = np.float32(65519.99 * levels)  # its scale rounds down to 65504
    x = np.array([-edge, edge] if spec.scheme != "asymmetric" else [0.0, edge], np.float32)
    qa = qjax.quantize(x, spec)
    assert qa.scale.item() == FLOAT16_SCALE_MAX
    assert np.all(np.isfinite(np.asarray(qjax.dequantize(qa))))
    with pytest.raises(ValueError, match=f"{limit:.0f}"):
        qjax.quantize(x * np.float32(65520.5 / 65519.99), spec)


F16_INT8 = S("int8", scale_dtype=F16)
_jit_quantize = jax.jit(lambda v: qjax.quantize(v, F16_INT8))
_jit_fake_quant = jax.jit(lambda v: qjax.fake_quant(v, F16_INT8))
_jit_compute_qparams = jax.jit(lambda v: qjax.compute_qparams(v, F16_INT8))


@pytest.mark.parametrize("value", [1e7, 1e20, F32_MAX])
def test_float16_scale_under_jit_saturates(value):
    """Traced values cannot be refused: the scale saturates to 65504, values clamp."""
    x = np.array([-value, value, 1.0, 0.0], np.float32)
    qa = _jit_quantize(x)
    assert qa.scale.item() == FLOAT16_SCALE_MAX
    np.testing.assert_array_equal(np.asarray(qa.values)[:2], [-128, 127])
    want = [-128 * 65504.0, 127 * 65504.0, 0.0, 0.0]
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(qa)), want)
    np.testing.assert_array_equal(np.asarray(_jit_fake_quant(x)), want)
    qp = _jit_compute_qparams(x)
    assert qp.scale.item() == FLOAT16_SCALE_MAX


@pytest.mark.parametrize(
    ("spec", "given", "stored"),
    [
        (S("int8", scale_dtype=F16), 1e6, 65504.0),
        (S("int8", scale_dtype="bfloat16"), F32_MAX, float(ml_dtypes.finfo(jnp.bfloat16).max)),
        (S("float8_e4m3fn", scale_dtype="float8_e8m0fnu"), 3e38, 2.0**127),
    ],
    ids=str,
)
def test_user_scales_past_the_scale_dtype_saturate_under_jit(spec, given, stored):
    """A float32 scale cast to a narrower scale dtype used to become inf (NaN in e8m0).

    Eagerly such a scale is refused where it enters (``qparams.scale``); under ``jit`` its
    value is traced and cannot be checked, so it saturates to the scale dtype's max.
    """
    x = np.array([1.0, -2.0], np.float32)
    zero_point = None if spec.is_float else np.array(0, np.int32)
    qp = qjax.QParams(np.array(given, np.float32), zero_point, None)
    with pytest.raises(ValueError, match=r"qparams\.scale"):
        qjax.quantize(x, spec, qparams=qp)
    qa = jax.jit(lambda x, qp: qjax.quantize(x, spec, qparams=qp))(x, qp)
    assert np.asarray(qa.scale, np.float32).item() == stored
    assert np.all(np.isfinite(np.asarray(qjax.dequantize(qa))))


# --- class 3: exact division on every finite operand -----------------------------------


def _nearby(expected: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Quotients ``steps`` ulp from ``expected`` on its own grid (toward zero for
    negative steps), never past inf: what a 2-ulp hardware division returns."""
    bits = expected.view(np.int32)
    magnitude = (bits & 0x7FFFFFFF).astype(np.int64) + steps
    magnitude = np.clip(magnitude, 0, 0x7F800000)
    sign = bits.astype(np.int64) & (1 << 31)
    return (magnitude | sign).astype(np.uint32).view(np.float32)


def _check_round_quotient(num: np.ndarray, den: np.ndarray) -> None:
    num, den = np.asarray(num, np.float32), np.asarray(den, np.float32)
    with np.errstate(all="ignore"):
        expected = num / den  # NumPy float32 division is IEEE, subnormals kept
    f = jax.jit(exact.round_quotient)
    for step in (-2, -1, 0, 1, 2):
        approx = _nearby(expected, np.full(num.shape, step))
        approx = np.where(num == 0, expected, approx)  # 0 / x: IEEE hardware is exact
        got = np.asarray(f(num, den, approx))
        np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


def test_round_quotient_on_random_bit_patterns_across_the_finite_range():
    rng = np.random.default_rng(11)
    n = 100_000
    num, den = (
        (
            rng.integers(1, 0x7F800000, n).astype(np.int64)
            | (rng.integers(0, 2, n).astype(np.int64) << 31)
        )
        .astype(np.uint32)
        .view(np.float32)
        for _ in range(2)
    )
    with np.errstate(all="ignore"):
        expected = num / den
    approx = _nearby(expected, rng.integers(-2, 3, n))
    got = np.asarray(jax.jit(exact.round_quotient)(num, den, approx))
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


def test_round_quotient_tiny_scales_the_issue_case():
    """amax 1e-17 gives an int8 scale of 7.8e-20: quotients near every code and tie."""
    scale = np.float32(1e-17) / np.float32(127.5)
    k = np.arange(-128, 128, 0.5, dtype=np.float64)
    num = (k * float(scale)).astype(np.float32)  # the nearest float32 to a tie's numerator
    num = np.concatenate([num, np.nextafter(num, np.float32(1)), np.nextafter(num, np.float32(-1))])
    _check_round_quotient(num, np.full(num.shape, scale))
    _check_round_quotient(np.float32([1e-17, -1e-17, 3e-20]), np.float32([127.5, 127.5, 7.5]))


def test_round_quotient_subnormal_operands_and_quotients():
    tiny = np.float32(2.0**-149)
    num = np.float32([1e-40, 1e-45, tiny, 3 * tiny, 5 * tiny, 1e-40, 1.0, 1e-38, 2.0**-126])
    den = np.float32([1e-40, 3.0, 0.5, 2.0, 2.0, 7.0, 1e-40, 3e-39, 3.0])
    _check_round_quotient(num, den)  # 3 * tiny / 2: a tie on the subnormal grid, to even
    _check_round_quotient(-num, den)
    _check_round_quotient(num, -den)


def test_round_quotient_near_float32_max_and_overflow():
    m = np.float32(F32_MAX)
    num = np.float32([m, m, m, -m, 3e38, 1e38, m, 2.0**-126, 1e-38, m])
    den = np.float32([1.0, 0.5, 1 - 2.0**-24, 1 + 2.0**-23, 2.9e38, 1e-38, m, 2.0**127, 1e38, 3.0])
    _check_round_quotient(num, den)


def test_gpu_division_path_under_jit_for_extreme_operands():
    """``_corrected_divide`` is what non-CPU backends run; here on normal operands
    anywhere in the range (XLA:CPU flushes subnormal inputs to its own division)."""
    rng = np.random.default_rng(12)
    e_num = rng.integers(-125, 127, 50_000)
    e_den = np.clip(e_num - rng.integers(-100, 101, 50_000), -125, 126)
    num, den = np.ldexp(rng.uniform(1, 2, (2, 50_000)), [e_num, e_den]).astype(np.float32)
    got = np.asarray(jax.jit(exact._corrected_divide)(num, den))
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(got.view(np.int32), (num / den).view(np.int32))


# --- class 4: report figures --------------------------------------------------------------


def test_report_of_extreme_tensors_is_finite_and_right():
    """Was "math domain error": -inf dequantized values made the noise infinite."""
    specs = {"a": S("int8"), "b": S("int4", "asymmetric", "minval"), "c": S("int2")}
    params = dict(zip(specs, (hostile_rows(dtype) for dtype in INPUT_DTYPES[::-1])))
    qtree = {k: qjax.quantize(params[k], spec) for k, spec in specs.items()}
    rep = report(params, qtree)
    signals, noises = [], []
    for row, (path, spec) in zip(rep.rows, specs.items()):
        x = params[path]
        xs = x.astype(np.float64)
        y = reference_whole(x, spec).astype(np.float64)
        signal, noise = float(np.sum(xs * xs)), float(np.sum((xs - y) ** 2))
        signals.append(signal)
        noises.append(noise)
        for key in ("sqnr_db", "max_abs_error", "signal", "noise"):
            assert math.isfinite(row[key]), (row["path"], key)
        assert row["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
        assert row["max_abs_error"] == float(np.max(np.abs(xs - y)))
    assert all(math.isfinite(v) for v in rep.totals.values() if isinstance(v, float))
    pooled = 10 * math.log10(math.fsum(signals) / math.fsum(noises))
    assert rep.totals["sqnr_db"] == pytest.approx(pooled, rel=1e-9)
    json.dumps(rep.as_dicts(), allow_nan=False, default=str)
    assert "total" in str(rep)


def reference_whole(x: np.ndarray, spec: qjax.QuantSpec) -> np.ndarray:
    """Per-tensor reference (one block: the whole array)."""
    _, deq = reference_block(x.reshape(-1), spec, x.dtype)
    return np.array(deq, np.float64).astype(np.float32).astype(x.dtype).reshape(x.shape)


@pytest.mark.parametrize(
    ("signal", "noise"), [(1e300, 1e-300), (1e-300, 1e300), (1e308, 1e-308), (5e-324, 1.0)]
)
def test_pooled_sqnr_of_extreme_sums_is_finite(signal, noise):
    """signal / noise overflows (or underflows to 0: log10 domain error) in float64."""
    row = {"bytes_before": 4, "bytes_after": 1, "quantized": True, "max_abs_error": 1.0}
    t = totals([row | {"signal": signal, "noise": noise}])
    want = 10 * (math.log10(signal) - math.log10(noise))
    assert math.isfinite(t["sqnr_db"]) and t["sqnr_db"] == pytest.approx(want, rel=1e-12)


def test_leaf_row_of_float16_minus_max():
    x = np.array([[-65504.0, 0.0, 1.0, 65504.0]], np.float16)
    row = leaf_row("w", x, qjax.quantize(x, S("int8")))
    y = reference_whole(x, S("int8")).astype(np.float64)
    assert y[0, 0] == -65504.0
    assert row["max_abs_error"] == float(np.max(np.abs(x.astype(np.float64) - y)))
    assert math.isfinite(row["sqnr_db"])


@pytest.mark.parametrize(
    "spec", [S("int4", granularity=ROWS), S("uint4", "asymmetric", granularity=ROWS)], ids=str
)
def test_mse_calibration_of_huge_blocks_picks_the_same_clip_as_small_ones(spec):
    """Quantization commutes with scaling by a power of two, so x * 2**100 must get the
    scale of x times 2**100. Its squared errors (~1e62) overflowed float32, every ratio
    tied at inf and the search kept the unclipped range."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 1024)).astype(np.float32)
    x[:, 0] = 20.0  # an outlier the search clips
    small = qjax.calibrate(x, spec, "mse", grid=11, min_ratio=0.2)
    big = qjax.calibrate(x * np.float32(2.0**100), spec, "mse", grid=11, min_ratio=0.2)
    plain = np.asarray(qjax.compute_qparams(x, spec).scale)
    assert np.all(np.asarray(small.scale) < plain)  # the search clipped
    np.testing.assert_array_equal(np.asarray(big.scale), np.asarray(small.scale) * 2.0**100)
    if spec.scheme == "asymmetric":
        np.testing.assert_array_equal(np.asarray(big.zero_point), np.asarray(small.zero_point))
