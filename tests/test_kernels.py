"""qjax.kernels.matmul: every path against dequantize-then-dot computed in NumPy float64.

The reference reads the stored bytes and scales and computes everything else in NumPy:
nibbles unpacked by hand, float4/float8 codes through ml_dtypes, e8m0 scales from their
exponent bits. The integer path is checked against the exact int64 product of the codes
(the activation's from qjax.quantize, which the path must use), rescaled in float64.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax import kernels, packing
from qjax.kernels import _cpu
from qjax.kernels import _matmul as kernel_module
from reference import reference

ACT = qjax.QuantSpec("int8", granularity=qjax.per_token())
K, N, BLOCK = 96, 40, 32  # not powers of two; K holds three blocks

WEIGHT_SPECS = {
    "int8-channel": (qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)), (K, N)),
    "int4-block": (qjax.QuantSpec("int4", granularity=qjax.per_block(-2, BLOCK)), (K, N)),
    "int4-channel": (qjax.QuantSpec("int4", granularity=qjax.per_channel(-1)), (K, N)),
    "int2-block": (qjax.QuantSpec("int2", granularity=qjax.per_block(-2, BLOCK)), (K, N)),
    "uint4-asym-block": (
        qjax.QuantSpec("uint4", scheme="asymmetric", granularity=qjax.per_block(-2, BLOCK)),
        (K, N),
    ),
    "float8-channel": (
        qjax.QuantSpec("float8_e4m3fn", granularity=qjax.per_channel(-1)),
        (K, N),
    ),
    "mxfp4": (qjax.QuantSpec("mxfp4"), (48, 96)),
    "nvfp4": (qjax.QuantSpec("nvfp4"), (48, 96)),  # e4m3 block scales x a tensor scale
    # Scale blocks of 5 output columns straddle the two nibbles of a byte, and an odd
    # width needs a padding nibble: both unpack whole instead of by position in the byte.
    "int4-straddle": (qjax.QuantSpec("int4", granularity=(BLOCK, 5)), (K, N)),
    "int4-odd-width": (qjax.QuantSpec("int4", granularity=qjax.per_channel(-1)), (K, 39)),
}
INTEGER_SPECS = (
    "int8-channel",
    "int4-block",
    "int4-channel",
    "int2-block",
    "int4-straddle",
    "int4-odd-width",
)
ROWS = (1, 3, 17)  # up to and past kernels.DECODE_ROWS


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of one scale block (or one row) so the scans run several steps."""
    monkeypatch.setattr(kernel_module, "CHUNK_BYTES", 1)
    kernel_module._matmul.clear_cache()
    kernel_module._matmul_quantized.clear_cache()
    yield
    kernel_module._matmul.clear_cache()
    kernel_module._matmul_quantized.clear_cache()


def _weight(name: str, seed: int = 0) -> qjax.QArray:
    spec, shape = WEIGHT_SPECS[name]
    w = jax.random.normal(jax.random.key(seed), shape) / np.sqrt(shape[0])
    return qjax.quantize(w, spec)


def _x(rows: int, k: int, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (rows, k))


def _codes(qa: qjax.QArray) -> np.ndarray:
    """The stored values as int64 (integers) or float64 (float targets), from the bytes."""
    target = qa.spec.target
    data = np.asarray(qa.data)
    if qa.packed:
        per = 8 // target.bits
        fields = [
            (data.astype(np.int64) >> (target.bits * i)) & ((1 << target.bits) - 1)
            for i in range(per)
        ]
        data = np.stack(fields, axis=-1).reshape(*data.shape[:-1], -1)[..., : qa.shape[-1]]
        if target.is_float:
            return data.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
        if target.is_signed:
            data = np.where(data >= 1 << (target.bits - 1), data - (1 << target.bits), data)
        return data
    if target.is_float:
        return data.astype(np.float64)
    return data.astype(np.int64)


def _expanded(param: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(param, shape[0] // param.shape[0], 0), shape[1] // param.shape[1], 1)


def _scale(qa: qjax.QArray) -> np.ndarray:
    scale = np.asarray(qa.scale)
    if qa.spec.scale_dtype == "float8_e8m0fnu":
        scale = np.ldexp(1.0, scale.view(np.uint8).astype(np.int64) - 127)
    return _expanded(scale.astype(np.float64), qa.shape)


def _reference_weight(qa: qjax.QArray) -> np.ndarray:
    """Dequantized in float64 from the stored codes, scales and zero points."""
    codes = _codes(qa)
    if qa.offset is not None:  # zero points
        codes = codes - _expanded(np.asarray(qa.offset, np.int64), qa.shape)
    if qa.tensor_scale is not None:
        return codes * _scale(qa) * np.asarray(qa.tensor_scale, np.float64).reshape(())
    return codes * _scale(qa)


def _close(y: jax.Array, ref: np.ndarray, x: np.ndarray, w: np.ndarray, rtol: float) -> None:
    """Within ``rtol`` of the sum of magnitudes each output adds up (float32 dots)."""
    bound = rtol * (np.abs(x) @ np.abs(w)) + 1e-30
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= bound), f"max error / bound {np.max(err / bound):.3g}"


@pytest.mark.parametrize("name", WEIGHT_SPECS)
@pytest.mark.parametrize("path", ["dequant", "dequant_chunked"])
def test_weight_only_paths_match_float64_reference(name, path):
    w = _weight(name)
    ref_w = _reference_weight(w)
    fn = jax.jit(lambda x, w: kernels.matmul(x, w, path=path))
    for rows in ROWS:
        x = _x(rows, w.shape[0])
        x64 = np.asarray(x, np.float64)
        _close(fn(x, w), x64 @ ref_w, x64, ref_w, rtol=1e-5)


def test_chunked_with_default_chunks_equals_small_chunks_closely(monkeypatch):
    w, x = _weight("int4-block"), _x(3, K)
    small = kernels.matmul(x, w, path="dequant_chunked")
    monkeypatch.setattr(kernel_module, "CHUNK_BYTES", 1 << 20)
    kernel_module._matmul.clear_cache()
    whole = kernels.matmul(x, w, path="dequant_chunked")
    ref_w = _reference_weight(w)
    x64 = np.asarray(x, np.float64)
    _close(whole, x64 @ ref_w, x64, ref_w, rtol=1e-5)
    np.testing.assert_allclose(small, whole, rtol=1e-5, atol=1e-5)


def _integer_reference(x: jax.Array, w: qjax.QArray) -> np.ndarray:
    """Exact int64 sums per block of the contraction, rescaled in float64."""
    xq = qjax.quantize(x, ACT)
    xc = np.asarray(xq.data, np.int64)
    sa = np.asarray(xq.scale, np.float64)  # [rows, 1]
    wc = _codes(w)
    blocks = w.scale.shape[0]
    sw = np.repeat(np.asarray(w.scale, np.float64), w.shape[1] // w.scale.shape[1], 1)
    step = w.shape[0] // blocks
    total = sum(
        (xc[:, b * step : (b + 1) * step] @ wc[b * step : (b + 1) * step]).astype(np.float64)
        * sw[b]
        for b in range(blocks)
    )
    return total * sa


@pytest.mark.parametrize("name", INTEGER_SPECS)
def test_integer_paths_equal_exact_integer_product_rescaled(name):
    w = _weight(name)
    for rows in ROWS:
        x = _x(rows, w.shape[0])
        ref = _integer_reference(x, w)
        results = []
        for path in ("int8_dot", "bf16_dot"):
            dynamic = jax.jit(lambda x, w, p=path: kernels.matmul(x, w, activation=ACT, path=p))
            pre = jax.jit(lambda xq, w, p=path: kernels.matmul(xq, w, path=p))
            y = dynamic(x, w)
            np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-6, atol=1e-6)
            # Pre-quantized codes give the same bits.
            np.testing.assert_array_equal(pre(qjax.quantize(x, ACT), w), y)
            results.append(y)
        # The bfloat16 dots sum the same integers exactly: the same bits.
        np.testing.assert_array_equal(results[0], results[1])


def test_bf16_dot_is_exact_where_sums_pass_two_to_the_24():
    # Codes near +127 on both sides: a sum over 2304 rows reaches ~3.4e7 > 2**24, where
    # float32 rounds odd integers. Chunks of at most exact_rows keep every sum exact.
    k = 2304
    w = qjax.quantize(
        jax.random.uniform(jax.random.key(0), (k, 8), minval=0.9, maxval=1.0),
        qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)),
    )
    x = jax.random.uniform(jax.random.key(1), (3, k), minval=0.9, maxval=1.0)
    assert kernels.exact_rows(w, ACT) == 2**24 // (128 * 128)
    xq = qjax.quantize(x, ACT)
    sums = np.asarray(xq.data, np.int64) @ np.asarray(w.data, np.int64)
    assert sums.min() > 2**24 and np.any(sums % 2 == 1)
    y = kernels.matmul(x, w, activation=ACT, path="bf16_dot")
    np.testing.assert_array_equal(y, kernels.matmul(x, w, activation=ACT, path="int8_dot"))
    expected = sums * np.asarray(xq.scale, np.float64) * np.asarray(w.scale, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-6)


def test_exact_rows_bound_the_products_of_codes():
    w8, w4, w2 = (qjax.quantize(jnp.ones((64, 8)), t) for t in ("int8", "int4", "int2"))
    assert [kernels.exact_rows(w, ACT) for w in (w8, w4, w2)] == [
        2**24 // (128 * 128),
        2**24 // (8 * 128),
        2**24 // (2 * 128),
    ]
    four_bit_act = qjax.QuantSpec("int4", granularity=qjax.per_token())
    assert kernels.exact_rows(w8, four_bit_act) == 2**24 // (128 * 8)


def _hlo(path: str, w: qjax.QArray, x: jax.Array, activation=ACT) -> str:
    fn = jax.jit(lambda x, w: kernels.matmul(x, w, activation=activation, path=path))
    return fn.lower(x, w).as_text()


INTEGER_DOT = r"dot_general.*\(tensor<[0-9x]*xi8>, tensor<[0-9x]*xi8>\) -> tensor<[0-9x]*xi32>"
BF16_DOT = r"dot_general.*\(tensor<[0-9x]*xbf16>, tensor<[0-9x]*xbf16>\) -> tensor<[0-9x]*xf32>"


@pytest.mark.parametrize("name", ["int8-channel", "int4-block"])
def test_hlo_has_the_dot_each_integer_path_claims(name):
    w, x = _weight(name), _x(17, K)
    int8_text = _hlo("int8_dot", w, x)
    assert re.search(INTEGER_DOT, int8_text), int8_text[-2000:]
    assert not re.search(BF16_DOT, int8_text)
    bf16_text = _hlo("bf16_dot", w, x)
    assert re.search(BF16_DOT, bf16_text), bf16_text[-2000:]
    assert not re.search(INTEGER_DOT, bf16_text)
    float_text = _hlo("dequant", w, x, activation=None)
    assert not re.search(INTEGER_DOT, float_text) and not re.search(BF16_DOT, float_text)


def test_auto_path_by_weight_activation_and_rows_with_native_bf16_dots(monkeypatch):
    # Up to DECODE_ROWS rows, bf16_dot takes 8-bit codes from BF16_MIN_CODES codes
    # (4096 x 2048 and up): here these small weights stand for such.
    monkeypatch.setattr(kernel_module, "BF16_MIN_CODES", K * N)
    blocked, channel = _weight("int4-block"), _weight("int8-channel")
    packed_channel = _weight("int4-channel")
    rules = [
        (blocked, 1, "dequant_chunked"),
        (blocked, kernels.DECODE_ROWS, "int8_dot"),
        (blocked, kernels.BLOCKED_BF16_ROWS - 1, "int8_dot"),
        (blocked, kernels.BLOCKED_BF16_ROWS, "bf16_dot"),
        (channel, 1, "bf16_dot"),  # 8-bit codes: bfloat16 dots at every row count
        (channel, 2, "bf16_dot"),
        (channel, kernels.DECODE_ROWS + 1, "bf16_dot"),
        (packed_channel, 1, "dequant_chunked"),
        (packed_channel, 2, "int8_dot"),
        (packed_channel, kernels.DECODE_ROWS, "int8_dot"),
        (packed_channel, kernels.DECODE_ROWS + 1, "bf16_dot"),
    ]
    for w, rows, path in rules:
        assert kernels.choose_path(w, ACT, rows, bf16_dots=True) == path, (w.spec, rows)
        assert kernels.choose_path(w, None, rows) == "dequant_chunked"
    float8 = _weight("float8-channel")
    assert kernels.choose_path(float8, ACT, 128) == "dequant_chunked"  # no integer codes
    # Blocks longer than exact_rows rule out bf16_dot.
    long_blocks = qjax.quantize(jnp.ones((4096, 8)), qjax.QuantSpec("int8", granularity=(2048, 1)))
    assert kernels.choose_path(long_blocks, ACT, 128, bf16_dots=True) == "int8_dot"
    # An input size with no divisor near BF16_ROWS (a prime) would run 1-row chunks.
    prime = qjax.quantize(jnp.ones((1031, 8)), "int8")
    assert kernels.choose_path(prime, ACT, 128, bf16_dots=True) == "int8_dot"
    assert kernels.choose_path(prime, ACT, 1, bf16_dots=True) == "dequant_chunked"
    divisible = qjax.quantize(jnp.ones((1032, 8)), "int8")
    assert kernels.choose_path(divisible, ACT, 128, bf16_dots=True) == "bf16_dot"
    # Up to DECODE_ROWS rows, weights smaller than BF16_MIN_CODES keep int8_dot.
    smaller = qjax.quantize(jnp.ones((K, N - 1)), "int8:per_channel")
    assert [kernels.choose_path(smaller, ACT, rows, bf16_dots=True) for rows in (1, 2, 9)] == [
        "dequant_chunked",
        "int8_dot",
        "bf16_dot",
    ]
    # auto counts the rows of every leading axis of x (the CPU's own answer for bf16_dots).
    monkeypatch.setenv(kernels.BF16_DOTS_ENV, "1")
    for shape, path in [((3, K), "int8_dot"), ((4, 16, K), "bf16_dot")]:
        assert kernels.choose_path(blocked, ACT, math.prod(shape[:-1])) == path
        x = jax.random.normal(jax.random.key(2), shape)
        np.testing.assert_array_equal(
            kernels.matmul(x, blocked, activation=ACT),
            kernels.matmul(x, blocked, activation=ACT, path=path),
        )


def test_auto_path_without_native_bf16_dots_takes_int8_dots(monkeypatch):
    # bf16_dot emulated (AVX2) ran 1.6-5x float32's time: never taken; int8_dot from 2 rows.
    monkeypatch.setattr(kernel_module, "BF16_MIN_CODES", K * N)
    for name in ("int4-block", "int8-channel", "int4-channel"):
        w = _weight(name)
        assert kernels.choose_path(w, ACT, 1, bf16_dots=False) == "dequant_chunked", name
        for rows in (2, kernels.DECODE_ROWS, kernels.BLOCKED_BF16_ROWS, 1024):
            assert kernels.choose_path(w, ACT, rows, bf16_dots=False) == "int8_dot", (name, rows)
        assert kernels.choose_path(w, None, 1024, bf16_dots=False) == "dequant_chunked"
    # The default reads the machine, which the environment variable overrides.
    w = _weight("int8-channel")
    monkeypatch.setenv(kernels.BF16_DOTS_ENV, "0")
    assert not kernels.native_bf16_dots()
    assert kernels.choose_path(w, ACT, 64) == "int8_dot"
    x = _x(64, K)
    np.testing.assert_array_equal(
        kernels.matmul(x, w, activation=ACT),
        kernels.matmul(x, w, activation=ACT, path="bf16_dot"),
    )
    monkeypatch.setenv(kernels.BF16_DOTS_ENV, "1")
    assert kernels.native_bf16_dots()
    assert kernels.choose_path(w, ACT, 64) == "bf16_dot"
    monkeypatch.setenv(kernels.BF16_DOTS_ENV, "yes")
    with pytest.raises(ValueError, match=r"QJAX_BF16_DOTS must be 1 .* or 0 .*, got 'yes'"):
        kernels.choose_path(w, ACT, 64)
    with pytest.raises(TypeError, match="bf16_dots must be True, False or None, got 1"):
        kernels.choose_path(w, ACT, 64, bf16_dots=1)
    with pytest.raises(TypeError, match="bf16_dots must be True, False or None, got 'no'"):
        kernels.choose_path(w, None, 64, bf16_dots="no")


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n", True),
        ("flags\t\t: fpu amx_bf16 amx_tile\n", True),
        ("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni\n", False),  # no bf16
        ("Features\t: fp asimd bf16\n", False),  # aarch64 names: not read
        ("", False),
    ],
)
def test_bf16_dot_flags_are_read_from_cpuinfo(cpuinfo, expected):
    assert _cpu.has_bf16_dot_flags(cpuinfo) is expected


@pytest.mark.parametrize(
    "k, n, exact, rows, expected",
    [
        (4096, 11008, 1024, 8, 256),  # 8 MiB / (2 * 11008): 381 rows; 256 divides 4096
        (4096, 11008, 1024, 128, 256),
        (4096, 4096, 1024, 8, 512),  # 1024 rows fit 8 MiB; at most BF16_ROWS // 2 = 512
        (4096, 32768, 1024, 8, 128),
        (4096, 1 << 20, 1024, 8, 128),  # never under 128 rows
        (11008, 4096, 1024, 8, 344),  # 11008 = 2**8 * 43: 344 = 8 * 43
        (4096, 11008, 64, 8, 64),  # exact_rows caps it
        (4096, 11008, 1024, 511, 256),
        (4096, 11008, 1024, 512, 1024),  # prefill: BF16_ROWS
        (1024, 64, 1024, 512, 512),  # two chunks at least
        (1031, 8, 1024, 8, 1),  # a prime input size: choose_path takes int8_dot
    ],
)
def test_bf16_chunk_rows(k, n, exact, rows, expected):
    assert kernels.PREFILL_ROWS == 512 and kernels.BF16_CHUNK_BYTES == 8 << 20
    assert kernels.BF16_ROWS == 1024
    assert kernels.bf16_chunk_rows(k, n, exact, rows) == expected


def test_bf16_dot_chunks_as_chunk_rows_says():
    """Decode-sized inputs take smaller chunks than prefill-sized ones; the sums are
    int8_dot's either way."""
    w = qjax.quantize(jax.random.normal(jax.random.key(3), (2048, 8)), "int8:per_channel")
    exact = kernels.exact_rows(w, ACT)
    for rows, chunk in [(2, 512), (kernels.PREFILL_ROWS, 1024)]:
        assert kernels.bf16_chunk_rows(2048, 8, exact, rows) == chunk
        x = _x(rows, 2048)
        bf16 = jax.jit(lambda x: kernels.matmul(x, w, activation=ACT, path="bf16_dot"))
        hlo = bf16.lower(x).as_text()
        assert f"tensor<{chunk}x8xbf16>" in hlo and f"tensor<{2048 // chunk}x{chunk}x8xi8>" in hlo
        np.testing.assert_array_equal(
            bf16(x), kernels.matmul(x, w, activation=ACT, path="int8_dot")
        )


@pytest.mark.parametrize("path", kernels.PATHS)
@pytest.mark.parametrize("k, n, rows", [(16, 0, 3), (0, 8, 3), (0, 8, 600), (16, 8, 0)])
def test_empty_weights_and_inputs_give_numpys_product(path, k, n, rows):
    """An empty contraction sums to zero, and nothing to compute gives an empty result:
    every path, on a float or a pre-quantized input, as NumPy's x @ w."""
    w = qjax.quantize(jnp.ones((k, n)), "int8:per_channel")
    x = np.ones((rows, k), np.float32)
    want = x @ np.ones((k, n), np.float32)
    for a in (x, qjax.quantize(jnp.asarray(x), ACT)):
        out = kernels.matmul(
            a, w, activation=None if isinstance(a, qjax.QArray) else ACT, path=path
        )
        assert out.shape == want.shape and out.dtype == jnp.float32
        np.testing.assert_array_equal(out, want)
    if 0 in (k, n):
        assert kernels.choose_path(w, ACT, max(rows, 1)) == "dequant"


def test_float_paths_fake_quantize_the_activation():
    w, x = _weight("float8-channel"), _x(3, K)
    ref_w = _reference_weight(w)
    xq = np.asarray(qjax.fake_quant(x, ACT), np.float64)
    for path in ("dequant", "dequant_chunked"):
        _close(kernels.matmul(x, w, activation=ACT, path=path), xq @ ref_w, xq, ref_w, 1e-5)


@pytest.mark.parametrize("path", ["dequant", "dequant_chunked", "int8_dot", "bf16_dot"])
def test_vmap_over_inputs_and_stacked_weights(path):
    act = ACT if path in ("int8_dot", "bf16_dot") else None
    ws = jax.vmap(
        lambda s: qjax.quantize(
            jax.random.normal(jax.random.key(s), (K, N)), WEIGHT_SPECS["int4-block"][0]
        )
    )(jnp.arange(2))
    xs = jax.random.normal(jax.random.key(5), (2, 3, K))
    mm = lambda x, w: kernels.matmul(x, w, activation=act, path=path)  # noqa: E731
    batched = jax.jit(jax.vmap(mm))(xs, ws)
    for i in range(2):
        w_i = jax.tree.map(lambda leaf, i=i: leaf[i], ws)
        np.testing.assert_allclose(batched[i], mm(xs[i], w_i), rtol=1e-6, atol=1e-6)
    # Leading axes of x are rows: [2, 3, K] against one weight.
    w0 = jax.tree.map(lambda leaf: leaf[0], ws)
    np.testing.assert_allclose(mm(xs, w0), jax.vmap(lambda x: mm(x, w0))(xs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["dequant", "dequant_chunked", "int8_dot", "bf16_dot"])
def test_channel_scale_multiplies_the_input(path):
    w = _weight("int4-block")
    m = jnp.linspace(0.5, 2.0, K).reshape(K, 1)
    scaled = dataclasses.replace(w, channel_scale=m)
    x = _x(3, K)
    act = ACT if path in ("int8_dot", "bf16_dot") else None
    x_scaled = x * m.reshape(1, K)
    np.testing.assert_array_equal(
        kernels.matmul(x, scaled, activation=act, path=path),
        kernels.matmul(x_scaled, w, activation=act, path=path),
    )
    ref_w = _reference_weight(w)
    x64 = np.asarray(x_scaled, np.float64)
    if act is None:
        _close(kernels.matmul(x, scaled, path=path), x64 @ ref_w, x64, ref_w, 1e-5)


def test_bfloat16_input_gives_bfloat16():
    w, x = _weight("int8-channel"), _x(3, K).astype(jnp.bfloat16)
    for path in ("dequant", "dequant_chunked"):
        assert kernels.matmul(x, w, path=path).dtype == jnp.bfloat16
    assert kernels.matmul(x, w, activation=ACT).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("weight", "activation", "message"),
    [
        ("float8-channel", ACT, "path 'int8_dot' cannot run weight spec float8_e4m3fn"),
        ("uint4-asym-block", ACT, "path 'int8_dot' cannot run weight spec uint4"),
        ("int4-block", None, "pass activation="),
        (
            "int4-block",
            qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)),
            "vary along the contracted axis",
        ),
        ("int4-block", qjax.QuantSpec("uint8"), "the activation spec is not a signed integer"),
    ],
)
@pytest.mark.parametrize("path", ["int8_dot", "bf16_dot"])
def test_integer_paths_refuse_specs_they_cannot_run(weight, activation, message, path):
    with pytest.raises(ValueError, match=re.escape(message.replace("int8_dot", path))):
        kernels.matmul(_x(3, K), _weight(weight), activation=activation, path=path)


def test_bf16_dot_refuses_blocks_longer_than_its_exact_sums():
    w = qjax.quantize(jnp.ones((4096, 8)), qjax.QuantSpec("int8", granularity=(2048, 1)))
    message = "scale blocks of 2048 rows are longer than the 1024 rows"
    assert message in kernels.why_not("bf16_dot", w, ACT)
    with pytest.raises(ValueError, match=message):
        kernels.matmul(_x(1, 4096), w, activation=ACT, path="bf16_dot")
    assert kernels.why_not("int8_dot", w, ACT) is None


def test_clear_errors_for_bad_arguments():
    w, x = _weight("int8-channel"), _x(3, K)
    with pytest.raises(ValueError, match="path must be one of"):
        kernels.matmul(x, w, path="fast")
    with pytest.raises(TypeError, match=r"w must be a qjax\.QArray"):
        kernels.matmul(x, np.ones((K, N), np.float32))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        kernels.matmul(jnp.ones((3, K), jnp.int32), w)
    with pytest.raises(ValueError, match=r"x's last axis \(40"):
        kernels.matmul(_x(3, N), w)
    with pytest.raises(ValueError, match="w must be 2-D"):
        kernels.matmul(x, qjax.quantize(jnp.ones((2, K, N)), "int8"))
    with pytest.raises(ValueError, match="x is already quantized"):
        kernels.matmul(qjax.quantize(x, ACT), w, activation=ACT)
    with pytest.raises(ValueError, match="w has channel scales"):
        scaled = dataclasses.replace(w, channel_scale=jnp.ones((K, 1)))
        kernels.matmul(qjax.quantize(x, ACT), scaled)
    with pytest.raises(ValueError, match="one multiplier per input channel"):
        kernels.matmul(x, dataclasses.replace(w, channel_scale=jnp.ones((1, N))))


@pytest.mark.parametrize("unpack", [packing.unpack_planes, kernel_module._byte_planes])
def test_unpack_planes_match_numpy(unpack):
    rng = np.random.default_rng(0)
    for bits in (2, 4):
        codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (5, 24))
        per = 8 // bits
        packed = packing.pack(jnp.asarray(codes, jnp.int32), bits)
        for i, plane in enumerate(unpack(packed, bits, signed=True)):
            np.testing.assert_array_equal(plane, codes[:, i::per])
        for i, plane in enumerate(unpack(packed, bits, signed=False)):
            np.testing.assert_array_equal(plane, codes[:, i::per] & ((1 << bits) - 1))


def test_pack_matches_numpy_bytes_on_odd_lengths():
    rng = np.random.default_rng(1)
    for bits in (1, 2, 4):
        per = 8 // bits
        for shape in [(7,), (3, 5), (2, 3, 9), (4, 16)]:
            codes = rng.integers(-(2**10), 2**10, shape)
            padded = np.pad(
                codes & ((1 << bits) - 1), [(0, 0)] * (len(shape) - 1) + [(0, -shape[-1] % per)]
            )
            groups = padded.reshape(*padded.shape[:-1], -1, per)
            expected = sum(groups[..., i] << (bits * i) for i in range(per)).astype(np.uint8)
            got = jax.jit(packing.pack, static_argnums=1)(jnp.asarray(codes, jnp.int32), bits)
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["float4_e2m1fn", "float8_e4m3fn", "float8_e5m2"])
def test_float_values_are_the_ml_dtypes_values_of_every_code(name):
    target = qjax.target_dtype(name)
    codes = np.arange(1 << target.bits)
    got = np.asarray(packing.float_values(jnp.asarray(codes, jnp.int32), target))
    expected = codes.astype(np.uint8).view(target.storage).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(got[finite].view(np.uint32), expected[finite].view(np.uint32))


def test_chained_layers_never_hold_every_float_weight_at_once():
    # A weight that fits one chunk used to run a loop of one iteration, which XLA removed;
    # its scheduler then dequantized all layers' weights before the first layer ran.
    weights = [
        qjax.quantize(jax.random.normal(jax.random.key(i), (512, 512)), "int4:per_block:128")
        for i in range(8)
    ]

    def chain(x, weights):
        for w in weights:
            x = jax.nn.relu(kernels.matmul(x, w))
        return x

    compiled = jax.jit(chain).lower(jnp.ones((8, 512)), weights).compile()
    one_float_weight = 512 * 512 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 2 * one_float_weight


def test_unpacked_float4_weights_run_every_float_path():
    w = jax.random.normal(jax.random.key(0), (K, N)) / np.sqrt(K)
    qa = qjax.quantize(
        w, qjax.QuantSpec("float4_e2m1fn", granularity=qjax.per_channel(-1)), packed=False
    )
    assert not qa.packed and qa.data.dtype == ml_dtypes.float4_e2m1fn
    ref_w = _reference_weight(qa)
    for rows in ROWS:
        x = _x(rows, K)
        x64 = np.asarray(x, np.float64)
        for path in ("auto", "dequant", "dequant_chunked"):
            _close(kernels.matmul(x, qa, path=path), x64 @ ref_w, x64, ref_w, rtol=1e-6)


@pytest.mark.parametrize("path", ["int8_dot", "bf16_dot", "auto"])
def test_integer_paths_take_activations_quantized_per_tensor_under_vmap(path):
    w = _weight("int8-channel")
    x = jax.random.normal(jax.random.key(2), (2, 3, K))
    xq = jax.vmap(lambda r: qjax.quantize(r, "int8"))(x)  # one scale per stacked tensor
    assert xq.scale.shape == (2, 1, 1)
    sums = np.asarray(xq.values, np.int64) @ _codes(w)
    ref = sums * np.asarray(xq.scale, np.float64) * _scale(w)[0]
    np.testing.assert_allclose(np.asarray(kernels.matmul(xq, w, path=path)), ref, rtol=2e-6)


def test_gradients_are_straight_through_on_every_path():
    # sum(fake_quant(x) @ W): d/dx is W's row sums where x / scale lies in [qmin, qmax]
    # (each row's largest positive value lands on 127.5: clipped), whichever path computes
    # the product.
    w = _weight("int8-channel")
    x = _x(3, K)
    mask = reference(np.asarray(x), "int8", "symmetric", "scale", (1, K))["mask"]
    assert 0 < np.count_nonzero(~mask) <= 3
    expected = np.where(mask, _reference_weight(w).sum(axis=1), 0.0)
    for path in ("dequant", "dequant_chunked", "int8_dot", "bf16_dot", "auto"):
        grad = jax.grad(lambda x, p=path: kernels.matmul(x, w, activation=ACT, path=p).sum())(x)
        np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=1e-5, atol=1e-6)


def test_path_helpers_take_spec_text_and_refuse_bad_arguments():
    w = _weight("int8-channel")
    assert kernels.why_not("int8_dot", w, "int8") is None
    assert kernels.choose_path(w, "int8", 4) == kernels.choose_path(w, qjax.QuantSpec("int8"), 4)
    with pytest.raises(TypeError, match="exact_rows activation must be a QuantSpec"):
        kernels.exact_rows(w, None)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        kernels.bf16_chunk_rows(0, 8, 1024, 1)
    with pytest.raises(ValueError, match="rows must be a non-negative int"):
        kernels.bf16_chunk_rows(64, 8, 1024, -1)
