"""Property tests for the core: range, error bound, idempotence, jit/vmap invariance,
granularity equivalences, fake_quant and packed storage.

Shapes come from a small fixed set so the number of jit compilations stays bounded (the
spec is a static jit argument, so most examples still compile once). Values are finite
float32 without subnormals (XLA:CPU flushes them to zero, NumPy does not), scaled by
``2**e`` with ``|e| <= 60`` (``-30 <= e <= 8`` for float16 scales) so that neither
``max - min`` of a block nor a float16 scale overflows; the formulae themselves overflow
near float32's max (e.g. asymmetric ``max_pos - min_neg``), which is out of scope here.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qjax

INT_TARGETS = ("int8", "uint8", "int4", "uint4", "int2", "uint2")
FLOAT_TARGETS = ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")
MX_TARGETS = ("mxfp8", "mxfp4")
ALL_TARGETS = INT_TARGETS + FLOAT_TARGETS + MX_TARGETS
SUB_BYTE_TARGETS = ("int4", "uint4", "int2", "uint2", "float4_e2m1fn", "mxfp4")

SHAPES = ((7,), (12,), (3, 5), (4, 6), (1, 8), (2, 3, 4), (2, 2, 3, 2))
"""Shapes for non-MX specs: 1-D to 4-D, last axes that do and do not fill whole bytes."""
MX_SHAPES = ((32,), (2, 32), (2, 1, 64), (1, 2, 2, 32))
"""Shapes for the MX presets, whose default blocks are 32 along the last axis."""

SCALE_DTYPES = ("float32", "float32", "bfloat16", "float16")
"""float32 twice: it is the default and the one with the strongest guarantees."""

F32_TINY = np.finfo(np.float32).tiny
ROUNDING_SLACK = 2.0**-20
"""Relative slack for float32 rounding in the reference checks (16 ulps)."""

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------- strategies


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def granularities(draw, shape: tuple[int, ...]):
    """Any granularity that fits ``shape``: per_tensor / per_channel / per_block / tuple."""
    ndim = len(shape)
    kind = draw(st.sampled_from(("per_tensor", "per_channel", "per_block", "explicit")))
    if kind == "per_tensor":
        return qjax.per_tensor()
    axis = draw(st.integers(-ndim, ndim - 1))
    if kind == "per_channel":
        return qjax.per_channel(axis)
    if kind == "per_block":
        size = draw(st.sampled_from(_divisors(shape[axis])))
        channel_axis = draw(st.sampled_from(("auto", "all")))
        return qjax.per_block(axis, size, channel_axis=channel_axis)
    return tuple(draw(st.sampled_from((-1, *_divisors(d)))) for d in shape)


@st.composite
def specs(draw, target: str, shape: tuple[int, ...]):
    """A valid QuantSpec for ``target`` whose granularity fits ``shape``."""
    if target in MX_TARGETS:
        return qjax.QuantSpec(target)  # preset blocks of 32 along the last axis, e8m0 scales
    granularity = draw(granularities(shape))
    if target in FLOAT_TARGETS:
        formulation = draw(st.sampled_from((None, "scale")))
        scale_dtype = draw(st.sampled_from((*SCALE_DTYPES, "float8_e8m0fnu")))
        return qjax.QuantSpec(target, "symmetric", formulation, granularity, scale_dtype)
    signed = target.startswith("int")
    schemes = ["symmetric", "asymmetric"]
    if signed:
        schemes.append("symmetric_with_clipping")
    scheme = draw(st.sampled_from(schemes))
    formulations = [None, "zero_point", "minval"]
    if signed and scheme != "asymmetric":
        formulations.append("scale")
    formulation = draw(st.sampled_from(formulations))
    scale_dtype = draw(st.sampled_from(SCALE_DTYPES))
    return qjax.QuantSpec(target, scheme, formulation, granularity, scale_dtype)


@st.composite
def float_arrays(draw, shape: tuple[int, ...], spec: qjax.QuantSpec):
    """Finite float32 values: uniform in [-1, 1] or a half-integer grid that spans the
    target's range (so rounding ties are common), times ``2**e``."""
    if spec.scale_dtype == "float16":
        exponent = draw(st.integers(-30, 8))  # keep amax / (qmax - qmin) inside float16
    else:
        exponent = draw(st.integers(-60, 60))
    if draw(st.booleans()):
        elements = st.floats(-1.0, 1.0, width=32)
        base = draw(hnp.arrays(np.float32, shape, elements=elements))
    else:
        half_range = int(spec.qmax - spec.qmin)  # grid step 1/2: up to +-(qmax - qmin) / 2
        ints = draw(hnp.arrays(np.int32, shape, elements=st.integers(-half_range, half_range)))
        base = ints.astype(np.float32) * np.float32(0.5)
    x = np.ldexp(base, exponent).astype(np.float32)
    return np.where(np.abs(x) < F32_TINY, np.float32(0.0) * x, x)  # flush, keep -0.0


@st.composite
def cases(draw, targets=ALL_TARGETS, batched: bool = False):
    """``(x, spec)``; with ``batched`` the spec fits ``x.shape[1:]`` (for vmap)."""
    target = draw(st.sampled_from(targets))
    shapes = MX_SHAPES if target in MX_TARGETS else SHAPES
    if batched:
        shapes = tuple(s for s in shapes if len(s) >= 2)
    shape = draw(st.sampled_from(shapes))
    spec = draw(specs(target, shape[1:] if batched else shape))
    return draw(float_arrays(shape, spec)), spec


# ------------------------------------------------------------------------------- helpers


def _bits(a) -> np.ndarray:
    """A NumPy view that compares bit for bit: float payloads as uint32, ints as int64."""
    a = np.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating):
        return a.astype(np.float32).view(np.uint32)  # exact for every float of <= 32 bits
    return a.astype(np.int64)


def assert_same(a, b, what: str) -> None:
    """``a`` and ``b`` have the same dtype, shape and bits (None only matches None)."""
    if a is None or b is None:
        assert a is None and b is None, f"{what}: {a!r} vs {b!r}"
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=what)


def assert_same_qarray(a: qjax.QArray, b: qjax.QArray, what: str, same_spec: bool = True) -> None:
    if same_spec:
        assert a.spec == b.spec, f"{what}: spec {a.spec} vs {b.spec}"
    assert (a.packed, a.pad, a.float_dtype) == (b.packed, b.pad, b.float_dtype), what
    assert_same(a.data, b.data, f"{what}: data")
    assert_same(a.scale, b.scale, f"{what}: scale")
    assert_same(a.offset, b.offset, f"{what}: offset")


def _broadcast_params(p, shape: tuple[int, ...]) -> np.ndarray:
    """Per-block params (``shape // block``) repeated to ``shape``, as float64."""
    p = np.asarray(p).astype(np.float64)
    for axis, (n, d) in enumerate(zip(p.shape, shape, strict=True)):
        p = np.repeat(p, d // n, axis=axis)
    return p


def _scaled_values(x: np.ndarray, qa: qjax.QArray) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, v)`` per element in float64: v is the unrounded, unclamped q."""
    spec = qa.spec
    x64 = x.astype(np.float64)
    scale = _broadcast_params(np.asarray(qa.scale).astype(np.float32), x.shape)
    if spec.formulation == "minval":
        return scale, (x64 - _broadcast_params(qa.offset, x.shape)) / scale + spec.qmin
    if spec.formulation == "zero_point":
        return scale, x64 / scale + _broadcast_params(qa.offset, x.shape)
    return scale, x64 / scale


# ---------------------------------------------------------------------------- properties


@SETTINGS
# An all-zero MX block once got the scale 2**-127, flushed to 0 by XLA:CPU: NaN values.
@example(case=(np.zeros(32, np.float32), qjax.QuantSpec("mxfp8")))
@given(case=cases())
def test_values_lie_in_target_range(case):
    """1. Every quantized value lies in [spec.qmin, spec.qmax], in the target's dtype."""
    x, spec = case
    qa = qjax.quantize(x, spec)
    assert qa.shape == x.shape
    assert qa.values.dtype == spec.target.storage
    assert qa.values.shape == x.shape
    values = np.asarray(qa.values).astype(np.float32)
    assert np.isfinite(values).all(), values
    assert values.min() >= spec.qmin and values.max() <= spec.qmax, (spec.qmin, spec.qmax, values)
    if not spec.is_float:
        codes = np.asarray(qa.codes())
        assert codes.dtype == np.int32
        np.testing.assert_array_equal(codes, values.astype(np.int32))


@SETTINGS
@given(case=cases(INT_TARGETS))
def test_integer_error_is_at_most_half_a_step(case):
    """2. |x - dequantize(quantize(x))| <= scale / 2 wherever x is representable.

    x is representable where its unrounded value ``v`` (x / scale + zero_point, or
    (x - minval) / scale + qmin; in float64 from the stored params) lies in
    [qmin - 0.5, qmax + 0.5]. With float32 scales computed from the data that is every
    element, for every scheme: symmetric gives |x / scale| <= (qmax - qmin) / 2 (so +amax
    of a signed type, at qmax + 0.5, is clamped by exactly half a step); asymmetric puts
    min_neg at qmin + frac and max_pos at qmax + frac with |frac| <= 0.5; minval maps
    [minval, minval + (qmax - qmin) * scale] onto [qmin, qmax]. Rounded scales (bf16,
    f16) can push the block's extremes past the clamp, so there only the representable
    elements are checked.
    """
    x, spec = case
    qa = qjax.quantize(x, spec)
    xd = np.asarray(qjax.dequantize(qa)).astype(np.float64)
    scale, v = _scaled_values(x, qa)
    x64 = x.astype(np.float64)
    err = np.abs(x64 - xd)
    span = scale * (spec.qmax - spec.qmin)
    bound = scale / 2 + ROUNDING_SLACK * (np.abs(x64) + np.abs(xd) + span)
    if spec.scale_dtype == "float32":
        checked = np.ones(x.shape, bool)
    else:
        checked = (v >= spec.qmin - 0.5) & (v <= spec.qmax + 0.5)
    bad = checked & ~(err <= bound)
    assert not bad.any(), (
        f"error above scale/2 at {np.argwhere(bad)[:5].tolist()}: x={x[bad][:5]}, "
        f"x'={xd[bad][:5]}, scale={scale[bad][:5]}, v={v[bad][:5]}"
    )


@SETTINGS
# A block below 2**-118 gets the e8m0 scale 2**-127, a float32 subnormal: dequantize
# must not flush it to zero (x' = 18 * 2**-127, not 0).
@example(case=(np.full(32, 1e-37, np.float32), qjax.QuantSpec("mxfp8")))
@given(case=cases(FLOAT_TARGETS + MX_TARGETS))
def test_float_error_is_at_most_half_an_ulp(case):
    """2b. Float targets: |x - x'| <= scale * ulp(x / scale) / 2 where |x / scale| <= fmax.

    The cast rounds to nearest; its half-ulp at |v| in binade 2**e is 2**(e - nmant - 1),
    and 2**(minexp - nmant - 1) among the subnormals. Power-of-two scales may put the
    block's amax above fmax (clamped, as in OCP MX), so only |v| <= fmax is checked.
    """
    x, spec = case
    qa = qjax.quantize(x, spec)
    xd = np.asarray(qjax.dequantize(qa)).astype(np.float64)
    scale, v = _scaled_values(x, qa)
    info = ml_dtypes.finfo(spec.target.storage)
    mag = np.abs(v) * (1 + ROUNDING_SLACK)  # a v rounded up into the next binade
    with np.errstate(divide="ignore"):
        binade = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    half_ulp = np.exp2(np.maximum(binade, info.minexp) - info.nmant - 1)
    x64 = x.astype(np.float64)
    err = np.abs(x64 - xd)
    bound = scale * half_ulp + ROUNDING_SLACK * (np.abs(x64) + np.abs(xd))
    checked = np.abs(v) <= float(info.max)
    bad = checked & ~(err <= bound)
    assert not bad.any(), (
        f"error above half an ulp at {np.argwhere(bad)[:5].tolist()}: x={x[bad][:5]}, "
        f"x'={xd[bad][:5]}, scale={scale[bad][:5]}, v={v[bad][:5]}"
    )


@settings(SETTINGS, max_examples=20)
@given(case=cases())
def test_requantizing_the_dequantized_array_is_the_identity(case):
    """3. quantize(dequantize(q), qparams=q's params) gives q back, bit for bit."""
    x, spec = case
    qa = qjax.quantize(x, spec)
    qp = qjax.compute_qparams(x, spec)
    assert_same(qp.scale, qa.scale, "compute_qparams vs quantize: scale")
    assert_same(qa.qparams.scale, qa.scale, "QArray.qparams.scale")
    offset = {"zero_point": qp.zero_point, "minval": qp.minval}.get(spec.formulation)
    assert_same(offset, qa.offset, "compute_qparams vs quantize: offset")
    again = qjax.quantize(qjax.dequantize(qa), spec, qparams=qa.qparams)
    assert_same_qarray(again, qa, "requantized")


@settings(SETTINGS, max_examples=8)  # eager runs op by op: about a second per example
# round(-0.0) + 0 is -0.0 under jit (x + 0 folded) but +0.0 eagerly.
@example(case=(np.full(7, -0.0, np.float32), qjax.QuantSpec("int8", formulation="zero_point")))
@given(case=cases())
def test_jit_equals_eager(case):
    """4. quantize, dequantize and fake_quant give the same bits under jit and eagerly.

    XLA rewrites a division by a broadcast into a multiplication by the reciprocal, which
    flips rounding ties; the grid values make ties common.
    """
    x, spec = case
    jitted = jax.jit(lambda x: qjax.quantize(x, spec))(x)
    deq_jitted = jax.jit(qjax.dequantize)(jitted)
    fake_jitted = jax.jit(lambda x: qjax.fake_quant(x, spec))(x)
    with jax.disable_jit():
        eager = qjax.quantize(x, spec)
        deq_eager = qjax.dequantize(eager)
        fake_eager = qjax.fake_quant(x, spec)
    assert_same_qarray(jitted, eager, "jit vs eager quantize")
    assert_same(deq_jitted, deq_eager, "jit vs eager dequantize")
    assert_same(fake_jitted, fake_eager, "jit vs eager fake_quant")


@settings(SETTINGS, max_examples=20)
# 1.5 / 127.5 once became 1.5 * (1 / 127.5) under vmap: the scale was one ulp off.
@example(case=(np.full((3, 5), 1.5, np.float32), qjax.QuantSpec("int8")))
@given(case=cases(batched=True))
def test_vmap_equals_a_loop_over_slices(case):
    """5. vmap of quantize over a leading axis equals quantizing each slice, with params
    computed per slice and with fixed params (near rounding ties, where a division turned
    into a multiplication by the reciprocal shows)."""
    x, spec = case

    def assert_mapped_equals_loop(mapped, rows, what):
        assert mapped.shape == x.shape
        assert (mapped.packed, mapped.pad) == (rows[0].packed, rows[0].pad)
        for field in ("data", "scale", "offset"):
            parts = [getattr(r, field) for r in rows]
            stacked = None if parts[0] is None else np.stack([np.asarray(p) for p in parts])
            assert_same(getattr(mapped, field), stacked, f"{what}: {field}")

    mapped = jax.vmap(lambda row: qjax.quantize(row, spec))(x)
    rows = [qjax.quantize(row, spec) for row in x]
    assert_mapped_equals_loop(mapped, rows, "vmap vs loop")
    deq = np.stack([np.asarray(qjax.dequantize(r)) for r in rows])
    assert_same(qjax.dequantize(mapped), deq, "vmap vs loop: dequantize")

    # Fixed params (as from calibration), closed over and so not batched.
    qp = qjax.compute_qparams(x[0], spec)
    scale = _broadcast_params(np.asarray(qp.scale).astype(np.float32), x.shape[1:])
    half_range = (spec.qmax - spec.qmin) // 2
    k = (np.arange(x.size).reshape(x.shape) * 7919) % (2 * half_range) - half_range
    if spec.formulation == "minval":  # v = (x - minval) / scale + qmin
        minval = _broadcast_params(qp.minval, x.shape[1:])
        near_ties = minval + (k + half_range + 0.5) * scale
    else:
        near_ties = (k + 0.5) * scale  # x / scale = k + 0.5, up to float32 rounding
    near_ties = near_ties.astype(np.float32)
    mapped = jax.vmap(lambda row: qjax.quantize(row, spec, qparams=qp))(near_ties)
    rows = [qjax.quantize(row, spec, qparams=qp) for row in near_ties]
    assert_mapped_equals_loop(mapped, rows, "vmap vs loop with fixed qparams")


@settings(SETTINGS, max_examples=15)
@given(case=cases())
def test_granularity_equivalences(case):
    """6. per_tensor == the whole tensor as one explicit block (x.shape or all -1), and
    per_channel / per_block equal their explicit block shapes."""
    x, spec = case
    ndim = x.ndim

    def quantize_with(granularity):
        return qjax.quantize(x, dataclasses.replace(spec, granularity=granularity))

    whole = quantize_with(qjax.per_tensor())
    assert whole.scale.shape == (1,) * ndim
    for explicit in (x.shape, (-1,) * ndim):
        same = quantize_with(explicit)
        assert_same_qarray(same, whole, f"per_tensor vs {explicit}", same_spec=False)
    g = spec.granularity
    if g.kind in ("per_channel", "per_block"):
        explicit = qjax.block_shape(x.shape, g)
        same = quantize_with(explicit)
        assert_same_qarray(same, qjax.quantize(x, spec), f"{g} vs {explicit}", same_spec=False)


@SETTINGS
# fake_quant once gave -0.0 where the stored integer 0 dequantizes to +0.0.
@example(case=(np.full(7, -5.9604645e-08, np.float32), qjax.QuantSpec("int8")))
@given(case=cases())
def test_fake_quant_equals_dequantize_of_quantize(case):
    """7. fake_quant(x) == dequantize(quantize(x)) bit for bit, also with given qparams."""
    x, spec = case
    expected = qjax.dequantize(qjax.quantize(x, spec))
    assert_same(qjax.fake_quant(x, spec), expected, "fake_quant")
    qp = qjax.compute_qparams(x, spec)
    assert_same(qjax.fake_quant(x, spec, qparams=qp), expected, "fake_quant with qparams")


@settings(SETTINGS, max_examples=20)
@given(case=cases(SUB_BYTE_TARGETS))
def test_packed_storage_round_trips(case):
    """8. Packed and unpacked storage hold the same values; packed data is uint8 with
    ceil(n_last * bits / 8) bytes per row, the first value in the lowest bits."""
    x, spec = case
    bits = spec.target.bits
    packed = qjax.quantize(x, spec, packed=True)
    unpacked = qjax.quantize(x, spec, packed=False)
    default = qjax.quantize(x, spec)
    assert default.packed and packed.packed and not unpacked.packed
    assert_same_qarray(default, packed, "default vs packed=True")

    row_bytes = math.ceil(x.shape[-1] * bits / 8)
    assert packed.data.dtype == jnp.uint8
    assert packed.data.shape == (*x.shape[:-1], row_bytes)
    assert packed.data.nbytes == math.prod(x.shape[:-1]) * row_bytes
    assert packed.nbytes == sum(
        int(a.nbytes) for a in (packed.data, packed.scale, packed.offset) if a is not None
    )
    assert packed.shape == unpacked.shape == x.shape
    assert packed.dtype == unpacked.dtype == spec.target.storage

    assert_same(packed.values, unpacked.values, "packed vs unpacked values")
    assert_same(packed.codes(), unpacked.codes(), "packed vs unpacked codes")
    assert_same(packed.scale, unpacked.scale, "packed vs unpacked scale")
    assert_same(packed.offset, unpacked.offset, "packed vs unpacked offset")
    assert_same(qjax.dequantize(packed), qjax.dequantize(unpacked), "dequantize")

    # The byte layout, rebuilt in NumPy from the unpacked values.
    values = unpacked.data
    if spec.is_float:
        values = jax.lax.bitcast_convert_type(values, jnp.uint4)
    codes = np.asarray(values).astype(np.int64) & ((1 << bits) - 1)
    per = 8 // bits
    pad = -x.shape[-1] % per
    codes = np.pad(codes, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    groups = codes.reshape((*x.shape[:-1], row_bytes, per))
    expected = sum(groups[..., i] << (i * bits) for i in range(per)).astype(np.uint8)
    assert_same(packed.data, expected, "packed byte layout")
