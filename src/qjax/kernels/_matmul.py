"""The paths of :func:`qjax.kernels.matmul` (see the package notes)."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from qjax import granularity as gran
from qjax import packing
from qjax.affine import dequantize_blocks
from qjax.exact import unfused
from qjax.kernels._cpu import native_bf16_dots
from qjax.ops import fake_quant, quantize
from qjax.qarray import QArray
from qjax.qparams import QParams
from qjax.spec import QuantSpec, SpecLike, as_spec

__all__ = [
    "BF16_CHUNK_BYTES",
    "BF16_MIN_CODES",
    "BF16_ROWS",
    "BLOCKED_BF16_ROWS",
    "CHUNK_BYTES",
    "DECODE_ROWS",
    "PATHS",
    "PREFILL_ROWS",
    "bf16_chunk_rows",
    "choose_path",
    "exact_rows",
    "matmul",
    "why_not",
]

Path = Literal["auto", "dequant", "dequant_chunked", "int8_dot", "bf16_dot"]

PATHS = ("auto", "dequant", "dequant_chunked", "int8_dot", "bf16_dot")
"""The values ``path`` takes: ``"auto"`` and the named paths (see :mod:`qjax.kernels`)."""

DECODE_ROWS = 8
"""Up to this many rows of ``x`` (tokens), ``"int8_dot"`` contracts a chunk of the weight
at a time (see :func:`_int_sums`)."""

TINY_DOT = 256
"""An integer-path dot contracting ``k`` rows into ``n`` columns with ``k * n`` below this
runs on int32 operands (a block of a few rows: no speed to lose, a miscompile to avoid)."""

CHUNK_BYTES = 1 << 21
"""Float32 bytes of one dequantized chunk of the weight on ``"dequant_chunked"`` (more
for many rows of ``x``: see :func:`_dequant_chunked`)."""

BF16_ROWS = 1024
"""At most this many rows of the weight per bfloat16 chunk on ``"bf16_dot"`` (fewer where
:func:`exact_rows` says so, and below :data:`PREFILL_ROWS` rows of ``x``: see
:func:`bf16_chunk_rows`)."""

BF16_MIN_CODES = 1 << 23
"""Up to :data:`DECODE_ROWS` rows of ``x``, ``"bf16_dot"`` runs 8-bit codes with one scale
along the contraction from this many codes (8 MiB of int8; more rows take it at any
size). Measured (``bench_matmul.py --shapes 1024x1024,2048x2048,4096x1024 --ms 1,8
--paths``, W8A8 on a quantized activation): at 8 rows the two paths tie on 4M codes
(0.53-0.56x float32's time) and ``"int8_dot"`` wins on 1M (0.76x against 0.81x); at one
row they split. On 4096 x 4096 and larger, ``"bf16_dot"`` wins at every row count."""

PREFILL_ROWS = 512
"""From this many rows of ``x``, ``"bf16_dot"`` takes chunks of up to :data:`BF16_ROWS`
weight rows: the dots are long enough that the bfloat16 copy of each chunk costs little
beside them. Below it, smaller chunks (:data:`BF16_CHUNK_BYTES`)."""

BF16_CHUNK_BYTES = 8 << 20
"""Below :data:`PREFILL_ROWS` rows of ``x``, a ``"bf16_dot"`` chunk's bfloat16 codes take at
most about this many bytes (and at most half of :data:`BF16_ROWS` rows, at least 128):
the dot then reads them from cache while they are still there."""

BLOCKED_BF16_ROWS = 64
"""From this many rows of ``x``, ``path="auto"`` takes ``"bf16_dot"`` for a weight with
scales per block of the contraction (see :func:`choose_path`)."""

_INTEGER_PATHS = ("int8_dot", "bf16_dot")


def matmul(
    x: jax.typing.ArrayLike,
    w: QArray,
    *,
    activation: SpecLike | None = None,
    path: Path = "auto",
) -> jax.Array:
    """``x @ w`` for a quantized weight ``w`` of shape [in, out] (a Flax Dense kernel).

    Args:
      x: floating-point array ``[..., in]``, or one already quantized (a QArray, e.g.
        from ``qjax.quantize(x, QuantSpec("int8", granularity=per_token()))``): its codes
        then enter the integer dot as they are (``activation`` must be None).
      w: a 2-D :class:`~qjax.QArray`, any spec; packed int4 stays packed in memory and is
        unpacked inside the computation.
      activation: None (weight-only: ``x`` enters as it is), or the spec ``x`` is quantized
        with, per token (dynamic), inside the computation, e.g.
        ``QuantSpec("int8", granularity=per_token())``.
      path: ``"auto"`` (default: :func:`choose_path` for the rows of ``x``), or a named
        path: ``"dequant"``, ``"dequant_chunked"``, ``"int8_dot"``, ``"bf16_dot"`` (see
        :mod:`qjax.kernels`). On the float paths a given ``activation`` is applied with
        :func:`qjax.fake_quant`.

    Returns:
      ``[..., out]`` in ``x``'s dtype. The integer paths are exact up to their final
      rescale, and give the same bits as each other; the float paths round as float32
      dots do (``"dequant_chunked"`` sums in another order than ``"dequant"``). An
      empty contraction (``in`` = 0) gives zeros, as ``x @ w`` does.

    Raises:
      TypeError: ``x`` is no floating-point array or ``w`` no QArray.
      ValueError: shapes that do not fit, an unknown path, or a path that cannot run the
        weight or activation spec (the message names both and why).

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax import kernels
      >>> w = qjax.quantize(jax.random.normal(jax.random.key(0), (64, 48)),
      ...                   qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32)))
      >>> x = jax.random.normal(jax.random.key(1), (3, 64))
      >>> act = qjax.QuantSpec("int8", granularity=qjax.per_token())
      >>> y = kernels.matmul(x, w, activation=act)  # W4A8: int8 dots, int32 partial sums
      >>> y.shape, y.dtype, kernels.choose_path(w, act, rows=3)
      ((3, 48), dtype('float32'), 'int8_dot')
      >>> bool((kernels.matmul(x, w, activation=act, path="bf16_dot") == y).all())
      True
      >>> ref = kernels.matmul(x, w, path="dequant")
      >>> bool(jnp.allclose(kernels.matmul(x, w, path="dequant_chunked"), ref, atol=1e-4))
      True
      >>> kernels.matmul(x, qjax.quantize(w.dequantize(), "uint8:asymmetric"),
      ...                activation=act, path="int8_dot")
      Traceback (most recent call last):
        ...
      ValueError: path 'int8_dot' cannot run weight spec uint8:asymmetric:zero_point:per_tensor ...
    """
    if isinstance(x, QArray):
        if activation is not None:
            raise ValueError(
                f"matmul: x is already quantized (a QArray, spec {x.spec}); pass activation=None"
            )
        if w.channel_scale is not None:
            raise ValueError(
                "matmul: w has channel scales, which multiply x before it is quantized; "
                "quantize x * w.channel_scale[:, 0] and pass w without them "
                "(dataclasses.replace(w, channel_scale=None)), or pass x unquantized"
            )
        activation = x.spec
    else:
        x = float_input(x)
    _check_weight(w, x.shape)
    act = None if activation is None else as_spec(activation, "activation")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        reason = why_not(path, w, act)
        if reason is not None:
            raise ValueError(
                f"path {path!r} cannot run weight spec {w.spec}"
                + (f" with activation spec {act}" if act is not None else "")
                + f": {reason}"
            )
    if 0 in x.shape or 0 in w.shape:  # an empty contraction sums to 0; or nothing to do
        dtype = x.float_dtype if isinstance(x, QArray) else x.dtype
        return jnp.zeros((*x.shape[:-1], w.shape[1]), dtype)
    if path == "auto":
        path = choose_path(w, act, math.prod(x.shape[:-1]))
    if isinstance(x, QArray):
        return _matmul_quantized(x, w, path)
    return _matmul(x, w, act, path)


def why_not(path: Path, w: QArray, activation: QuantSpec | None = None) -> str | None:
    """Why ``path`` cannot run weight ``w`` with ``activation`` (a QuantSpec or None), or
    None where it can. ``"auto"`` always can.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax import kernels
      >>> w = qjax.quantize(jnp.ones((32, 16)), "float8_e4m3fn")
      >>> kernels.why_not("int8_dot", w, qjax.QuantSpec("int8", granularity=qjax.per_token()))
      "the weight spec is not a signed integer of at most 8 bits with formulation 'scale' ..."
    """
    if path in ("auto", "dequant", "dequant_chunked"):
        return None
    if path not in _INTEGER_PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    activation = None if activation is None else as_spec(activation, "activation")
    if activation is None:
        return (
            "an integer dot quantizes the activation: pass activation=, e.g. "
            "QuantSpec('int8', granularity=per_token())"
        )
    for what, spec in (("weight", w.spec), ("activation", activation)):
        target = spec.target
        if spec.is_float or not target.is_signed or target.bits > 8 or spec.formulation != "scale":
            return (
                f"the {what} spec is not a signed integer of at most 8 bits with formulation "
                "'scale' (zero point 0): use e.g. 'int8' or 'int4', scheme 'symmetric' or "
                "'symmetric_with_clipping', or path='dequant'"
            )
    if activation.granularity.kind not in ("per_token", "per_tensor"):
        return (
            f"the activation scales ({activation.granularity}) would vary along the "
            "contracted axis; use per_token() or per_tensor()"
        )
    block = w.shape[0] // w.scale.shape[0]
    if path == "bf16_dot" and w.scale.shape[0] > 1 and block > exact_rows(w, activation):
        return (
            f"the weight's scale blocks of {block} rows are longer than the "
            f"{exact_rows(w, activation)} rows whose integer sums float32 holds exactly; "
            "use path='int8_dot'"
        )
    return None


def choose_path(
    w: QArray,
    activation: QuantSpec | None = None,
    rows: int = 1,
    *,
    bf16_dots: bool | None = None,
) -> str:
    """The path ``path="auto"`` takes for ``rows`` rows of ``x`` (tokens: the product of
    its leading axes, static under jit): the fastest on XLA:CPU that can run the specs.

    ``bf16_dots``: whether the CPU has native bfloat16 dot instructions; None (default,
    what ``path="auto"`` uses) reads this machine's (:func:`native_bf16_dots`). Without
    them ``"bf16_dot"`` is never taken: with an integer activation, ``"int8_dot"`` from
    two rows (W8A8 on an AVX2-only CPU: 0.34-0.53x float32's time at 8 rows, 0.88-1.19x
    at 128 and 1024, where ``"bf16_dot"`` took 1.6-2.6x), and for one row ``"dequant_chunked"``
    with the activation fake-quantized.

    Measured with ``benchmarks/bench_matmul.py`` (K, N in {4096, 11008}) on a CPU with
    native bfloat16 dots:

    * Weight-only (no ``activation``, or one without integer codes on both sides):
      ``"dequant_chunked"``; ``"dequant"`` was slower at every ``rows`` on these weights,
      prefill (1024 rows) included, and holds the whole float32 weight. Except for more
      than :data:`DECODE_ROWS` rows on a weight of at most :data:`CHUNK_BYTES` in float32
      (one chunk): ``"dequant"``, which writes that small weight once and runs one dot
      (``benchmarks/bench_serve.py``: the byte LM's 256-wide layers prefill 1024 tokens
      1.5-2.3x slower chunked, and decode 8 tokens 1.8x faster).
    * An integer activation (:func:`why_not` allows ``"int8_dot"``) and one weight scale
      along the contraction (per channel): ``"bf16_dot"`` above :data:`DECODE_ROWS`
      rows, where the input size splits into chunks of at least 128 rows
      (:func:`bf16_chunk_rows`); XLA:CPU runs its int8 dots slower than bfloat16 ones
      summed in float32. Up to :data:`DECODE_ROWS` rows, the same for 8-bit codes on a
      weight of at least :data:`BF16_MIN_CODES` codes, one row included (XLA:CPU converts
      an int8 matrix-vector product to int32). Otherwise ``"int8_dot"``, and for one row
      ``"dequant_chunked"`` (the activation is fake-quantized, so the result is the
      integer paths' up to float rounding): packed codes (int4, int2) cost more to unpack
      into a bfloat16 chunk than an int8 dot saves at a few rows.
    * With scales per block of the contraction (W4A8 ``per_block(-2, 128)``): one row
      ``"dequant_chunked"``, ``"int8_dot"`` below :data:`BLOCKED_BF16_ROWS` rows,
      ``"bf16_dot"`` from there (where its blocks fit :func:`exact_rows`).

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax import kernels
      >>> w = qjax.quantize(jnp.ones((64, 32)), "int4:per_block:32")
      >>> act = qjax.QuantSpec("int8", granularity=qjax.per_token())
      >>> [kernels.choose_path(w, act, rows, bf16_dots=True) for rows in (1, 8, 128)]
      ['dequant_chunked', 'int8_dot', 'bf16_dot']
      >>> [kernels.choose_path(w, act, rows, bf16_dots=False) for rows in (1, 8, 128)]
      ['dequant_chunked', 'int8_dot', 'int8_dot']
      >>> w8 = qjax.quantize(jnp.ones((4096, 2048)), "int8")
      >>> [kernels.choose_path(w8, act, rows, bf16_dots=True) for rows in (1, 2)]
      ['bf16_dot', 'bf16_dot']
      >>> small = qjax.quantize(jnp.ones((64, 32)), "int8")
      >>> [kernels.choose_path(small, act, rows, bf16_dots=True) for rows in (1, 2, 1024)]
      ['dequant_chunked', 'int8_dot', 'bf16_dot']
      >>> kernels.choose_path(w), kernels.choose_path(w, None, 1024)  # a small weight
      ('dequant_chunked', 'dequant')
    """
    if bf16_dots is not None and not isinstance(bf16_dots, bool):
        raise TypeError(f"choose_path: bf16_dots must be True, False or None, got {bf16_dots!r}")
    if 0 in w.shape:
        return "dequant"  # nothing to contract or to write: matmul returns zeros
    activation = None if activation is None else as_spec(activation, "activation")
    if activation is None or why_not("int8_dot", w, activation) is not None:
        small = 4 * math.prod(w.shape) <= CHUNK_BYTES
        return "dequant" if small and rows > DECODE_ROWS else "dequant_chunked"
    if bf16_dots is None:
        bf16_dots = native_bf16_dots()
    blocked = w.scale.shape[0] > 1
    bytewide = not blocked and not w.packed  # 8-bit codes, one scale along the contraction
    if rows == 1 and not (bytewide and bf16_dots):
        return "dequant_chunked"
    if bf16_dots and why_not("bf16_dot", w, activation) is None:
        if blocked:
            if rows >= BLOCKED_BF16_ROWS:
                return "bf16_dot"
        elif rows > DECODE_ROWS or (bytewide and math.prod(w.shape) >= BF16_MIN_CODES):
            k = w.shape[0]  # an input size with no divisor near BF16_ROWS: chunks too small
            if bf16_chunk_rows(k, w.shape[1], exact_rows(w, activation), rows) >= min(128, k // 2):
                return "bf16_dot"
    return "dequant_chunked" if rows == 1 else "int8_dot"


def bf16_chunk_rows(k: int, n: int, exact: int, rows: int) -> int:
    """The weight rows per chunk of ``"bf16_dot"`` for ``rows`` rows of ``x``, on a ``[k,
    n]`` weight with one scale along the contraction: a divisor of ``k``, at most ``exact``
    (:func:`exact_rows`) and, where that leaves two chunks or more, at most ``k // 2``.

    Each chunk's codes are converted to bfloat16, then read by the dot. From
    :data:`PREFILL_ROWS` rows of ``x`` up to :data:`BF16_ROWS` rows per chunk: long dots.
    Below, the dot reads its chunk about once, so the chunk should still be in cache:
    about :data:`BF16_CHUNK_BYTES` of bfloat16 codes, at most ``BF16_ROWS // 2`` rows, at
    least 128. Measured (``bench_matmul.py --ms 1,8,32,128 --reuse-host-buffers``, W8A8 on
    a quantized activation, 4096 x 11008), against 1024-row chunks from 9 rows up and
    ``"int8_dot"`` / ``"dequant_chunked"`` below: 0.56x float32's time at 128 rows (from
    0.61x), 0.52x at 32 (from 0.79x), 0.43x at 8 (from 0.99x), 0.60x at 1 (from 1.11x).

    Examples:
      >>> from qjax.kernels import bf16_chunk_rows
      >>> bf16_chunk_rows(4096, 11008, 1024, rows=8), bf16_chunk_rows(4096, 11008, 1024, rows=512)
      (256, 1024)
    """
    for name, value, least in (("k", k, 1), ("n", n, 1), ("exact", exact, 1), ("rows", rows, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            kind = "a positive" if least else "a non-negative"
            raise ValueError(f"bf16_chunk_rows: {name} must be {kind} int, got {value!r}")
    limit = min(BF16_ROWS, exact)
    if rows < PREFILL_ROWS:
        limit = min(limit, BF16_ROWS // 2, max(128, BF16_CHUNK_BYTES // (2 * max(n, 1))))
    return _chunk_rows(k, 1, limit)


def float_input(x: jax.typing.ArrayLike, what: str = "matmul") -> jax.Array:
    """``x`` as a floating-point jax array with at least one axis; a TypeError names ``what``."""
    try:
        x = jnp.asarray(x)
    except TypeError:
        raise TypeError(
            f"{what}: x must be a floating-point array, got {type(x).__name__}"
        ) from None
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
        raise TypeError(
            f"{what}: x must be a floating-point array with at least one axis, got dtype "
            f"{x.dtype} and shape {x.shape}"
        )
    return x


def _check_weight(w: QArray, x_shape: tuple[int, ...]) -> None:
    if not isinstance(w, QArray):
        raise TypeError(f"matmul: w must be a qjax.QArray (qjax.quantize), got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(
            f"matmul: w must be 2-D [in, out] (a Dense kernel), got shape {w.shape}; vmap "
            "over stacked layers, or reshape the weight"
        )
    if x_shape[-1] != w.shape[0]:
        raise ValueError(
            f"matmul: x's last axis ({x_shape[-1]}, shape {x_shape}) must equal w's input "
            f"axis ({w.shape[0]}, shape {w.shape})"
        )
    cs = w.channel_scale
    if cs is not None and tuple(cs.shape) not in ((w.shape[0], 1), (1, 1)):
        raise ValueError(
            f"matmul: w.channel_scale has shape {tuple(cs.shape)}; it must hold one "
            f"multiplier per input channel, shape ({w.shape[0]}, 1), which scales x"
        )


@functools.partial(jax.jit, static_argnames=("act", "path"))
def _matmul(x: jax.Array, w: QArray, act: QuantSpec | None, path: str) -> jax.Array:
    if w.channel_scale is not None:
        m = w.channel_scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        x = (x.astype(jnp.float32) * m).astype(x.dtype)
        w = dataclasses.replace(w, channel_scale=None)
    if path in _INTEGER_PATHS:
        return _integer_product(x, w, act, path)
    if act is not None:
        x = fake_quant(x, act)
    if path == "dequant":
        return jnp.matmul(x, w.dequantize().astype(x.dtype))
    out = _dequant_chunked(x.reshape(-1, w.shape[0]), w)
    return out.astype(x.dtype).reshape(*x.shape[:-1], w.shape[1])


def _integer_product(x: jax.Array, w: QArray, act: QuantSpec, path: str) -> jax.Array:
    """``x`` quantized with ``act``, times ``w`` on an integer path; differentiated as the
    float paths are (the straight-through estimator of :func:`qjax.fake_quant`, through
    the dequantized weight), so the gradient does not depend on the path ``"auto"``
    picks for the rows."""

    @jax.custom_jvp
    def product(x: jax.Array, w: QArray) -> jax.Array:
        return _matmul_quantized(quantize(x, act, packed=False), w, path)

    @product.defjvp
    def _(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
        def fake_quantized(x: jax.Array, w: QArray) -> jax.Array:
            return _matmul(x, w, act, "dequant")

        return product(*primals), jax.jvp(fake_quantized, primals, tangents)[1]

    return product(x, w)


@functools.partial(jax.jit, static_argnames="path")
def _matmul_quantized(xq: QArray, w: QArray, path: str) -> jax.Array:
    """The product for an activation already quantized (``w`` has no channel scale)."""
    if path not in _INTEGER_PATHS:
        return _matmul(xq.dequantize(), w, None, path)
    k, n = w.shape
    codes = xq.values.astype(jnp.int8).reshape(-1, k)
    scale = xq.scale.astype(jnp.float32)  # per token, or one per tensor (or per stacked one)
    if scale.size != 1:
        scale = jnp.broadcast_to(scale, (*xq.shape[:-1], 1))
    scale = scale.reshape(-1, 1)
    out = _integer_dot(codes, scale, w, xq.spec, path)
    return out.astype(xq.float_dtype).reshape(*xq.shape[:-1], n)


class _Planes(NamedTuple):
    """A weight as ``per`` planes: plane ``i`` holds output columns ``i::per``.

    A packed weight splits into the values at each position of its bytes
    (:func:`qjax.packing.unpack_planes`): one dot per plane, and no interleaved
    unpacking. Other weights are one plane, their stored values.
    """

    per: int
    scales: tuple[jax.Array, ...]
    offsets: tuple[jax.Array | None, ...]

    @classmethod
    def of(cls, w: QArray) -> _Planes:
        n = w.shape[1]
        per = w.spec.target.packs if w.packed and w.pad == 0 else 1
        if per > 1 and _plane_param(w.scale, n, per, 0) is None:
            per = 1  # scale blocks that straddle the planes' columns: unpack as a whole
        params = [
            (_plane_param(w.scale, n, per, i), _plane_param(w.offset, n, per, i))
            for i in range(per)
        ]
        return cls(per, *(tuple(p) for p in zip(*params)))

    def values(self, data: jax.Array, w: QArray) -> list[jax.Array]:
        """The values of each plane of ``data`` (rows of ``w.data``): int32 codes or the
        stored integers (integer targets), exact float32 values (float targets)."""
        target = w.spec.target
        signed = target.is_signed and not target.is_float
        if self.per > 1 and not target.is_float:
            return _byte_planes(data, target.bits, signed=signed)
        if self.per > 1:
            codes = packing.unpack_planes(data, target.bits, signed=signed)
        elif w.packed:
            codes = [packing.unpack(data, target.bits, signed=signed, pad=w.pad)]
        elif target.is_float and jnp.issubdtype(data.dtype, jnp.floating):
            return [data.astype(jnp.float32)]  # unpacked float4: no byte to read it from
        elif target.is_float:  # float8 values as their bytes (see _bytes)
            codes = [data.astype(jnp.int32)]
        else:
            return [data]
        if target.is_float:
            return [packing.float_values(c, target) for c in codes]
        return codes


def _byte_planes(packed: jax.Array, bits: int, *, signed: bool) -> list[jax.Array]:
    """:func:`qjax.packing.unpack_planes` in bytes: int8 (signed) or uint8 codes.

    Shifts on 8-bit lanes: XLA:CPU unpacks four times as many codes per vector op as on
    int32, and the dots take the bytes (or convert them) as they are.
    """
    per = 8 // bits
    if signed:  # the wanted bits to the top of the byte, then an arithmetic shift back
        b = packed.astype(jnp.int8)
        return [(b << (8 - bits * (i + 1))) >> (8 - bits) for i in range(per)]
    mask = (1 << bits) - 1
    return [(packed >> (bits * i)) & mask for i in range(per)]


def _dequantize(
    values: jax.Array, scale: jax.Array, offset: jax.Array | None, spec: QuantSpec
) -> jax.Array:
    """Plane values (:meth:`_Planes.values`) dequantized blockwise by the core's formula
    (as :meth:`qjax.QArray.dequantize`), in float32."""
    shape = values.shape
    layout = gran.BlockLayout.of(shape, tuple(d // p for d, p in zip(shape, scale.shape)))
    qp = QParams(
        scale,
        offset if spec.formulation == "zero_point" else None,
        offset if spec.formulation == "minval" else None,
    )
    qp = jax.tree.map(layout.expand, qp)
    return dequantize_blocks(layout.blockify(values), qp, spec, jnp.float32).reshape(shape)


def _plane_param(param: jax.Array | None, n: int, per: int, i: int) -> jax.Array | None:
    """The scales (or offsets) of plane ``i`` of ``per``: the same blocks where each spans
    whole groups of ``per`` columns, every ``per``-th column where each covers one; None
    for blocks that straddle (or for no param)."""
    if param is None or per == 1:
        return param
    group = n // param.shape[1]
    if group % per == 0:
        return param
    if group == 1:
        return param[:, i::per]
    return None


def _interleave(planes: list[jax.Array]) -> jax.Array:
    """``[rows, n / per]`` results of each plane as the ``[rows, n]`` result."""
    if len(planes) == 1:
        return planes[0]
    return jnp.stack(planes, axis=-1).reshape(planes[0].shape[0], -1)


def _chunks(leaf: jax.Array | None, count: int) -> jax.Array | None:
    """Rows of ``leaf`` split into ``count`` chunks along a new leading axis."""
    return None if leaf is None else leaf.reshape(count, -1, leaf.shape[-1])


def _dequant_chunked(x: jax.Array, w: QArray) -> jax.Array:
    """``x @ w.dequantize()`` for ``x`` [m, k], dequantized a chunk of rows at a time.

    Where the chunk's values all share one scale per output column (formulation
    ``"scale"``, one scale block of rows per chunk, or one for all rows), the scale
    multiplies the chunk's partial product instead of each weight: ``(x @ q) * s``, one
    multiply per output rather than per weight, and the same up to float rounding. A
    tensor scale (NVFP4's second level) multiplies the sum the same way.
    """
    k, n = w.shape
    planes = _Planes.of(w)
    blocks = w.scale.shape[0]  # scale rows: the chunks hold whole ones, or share the one
    # Each chunk adds its partial product to the float32 [m, n] sum: chunks of at least m
    # rows keep those additions a small part of the dot's work.
    unit = k // blocks if blocks > 1 else 1
    rows = _chunk_rows(k, unit, max(CHUNK_BYTES // (4 * n), x.shape[0]))
    count = k // rows
    xs = x.reshape(-1, count, rows).transpose(1, 0, 2)
    spec = w.spec
    factored = spec.formulation == "scale" and not spec.power_of_two_scale
    factored = factored and (blocks == 1 or rows * blocks == k)
    width = n // planes.per

    def params(leaves: tuple) -> tuple:
        if blocks == 1:
            return (None,) * len(leaves)
        return tuple(_chunks(_bytes(p), count) for p in leaves)

    def step(acc: tuple, chunk: tuple) -> tuple[tuple, None]:
        xc, data, scales, offsets = chunk
        scales = [
            s if c is None else jax.lax.bitcast_convert_type(c, s.dtype)
            for s, c in zip(planes.scales, scales)
        ]
        offsets = [o if c is None else c for o, c in zip(planes.offsets, offsets)]
        out = []
        for a, values, scale, offset in zip(
            acc, planes.values(data, w), scales, offsets, strict=True
        ):
            if factored:
                part = jnp.matmul(xc, values.astype(x.dtype), preferred_element_type=jnp.float32)
                if blocks > 1:
                    part = part * _columns(scale, width)
            else:
                wc = _dequantize(values, scale, offset, w.spec).astype(x.dtype)
                part = jnp.matmul(xc, wc, preferred_element_type=jnp.float32)
            out.append(a + part)
        return tuple(out), None

    init = tuple(jnp.zeros((x.shape[0], width), jnp.float32) for _ in range(planes.per))
    chunks = (xs, _chunks(_bytes(w.data), count), params(planes.scales), params(planes.offsets))
    acc, _ = jax.lax.scan(step, init, chunks)
    if factored and blocks == 1:
        acc = [a * _columns(s, width) for a, s in zip(acc, planes.scales)]
    if w.tensor_scale is not None:  # NVFP4: one more factor, the same for every weight
        acc = [a * w.tensor_scale.reshape(1, 1) for a in acc]
    return _interleave(list(acc))


def _columns(scale: jax.Array, width: int) -> jax.Array:
    """Scales ``[r, c]`` as float32, each repeated along its columns: ``[r, width]``."""
    scale = scale.astype(jnp.float32)
    return jnp.repeat(scale, width // scale.shape[1], axis=1)


def _bytes(leaf: jax.Array | None) -> jax.Array | None:
    """A float8 array (values, e8m0 scales) as its uint8 bytes, else as it is: XLA:CPU
    slices float8 arrays inside a loop many times slower than bytes."""
    if leaf is None or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return leaf
    if jnp.finfo(leaf.dtype).bits != 8:  # wider floats, or float4 that no byte holds
        return leaf
    return jax.lax.bitcast_convert_type(leaf, jnp.uint8)


def _chunk_rows(k: int, unit: int, limit: int) -> int:
    """Rows per chunk: the most that are a multiple of ``unit``, divide ``k`` and are at
    most ``limit`` (at least ``unit``), and at most ``k / 2`` where that leaves whole units.
    """
    limit = max(limit, unit)
    fits = [r for r in range(unit, k + 1, unit) if k % r == 0]
    # At least two chunks where the blocks allow: XLA removes a loop of one iteration, and
    # its scheduler then dequantizes every layer's weight before the first layer runs
    # (all float copies live at once: measured with benchmarks/bench_serve.py).
    split = [r for r in fits if r <= min(limit, k // 2)]
    return max(split) if split else max(r for r in fits if r <= limit)


def _integer_dot(x8: jax.Array, sa: jax.Array, w: QArray, act: QuantSpec, path: str) -> jax.Array:
    """int8 codes ``x8`` [m, k] with scales ``sa`` [m or 1, 1] times ``w``: exact integer
    sums of the codes (:func:`_partial`), one per block of the contraction, each rescaled.

    The planes of a packed weight are side by side in one ``[rows, out]`` matrix of codes
    (plane ``i``'s columns at ``i * out / per``): one dot per chunk, not one per plane.
    """
    k, n = w.shape
    planes = _Planes.of(w)
    width = n // planes.per
    sw = jnp.concatenate([_columns(s, width) for s in planes.scales], axis=1)
    blocks = w.scale.shape[0]

    def codes(data: jax.Array) -> jax.Array:
        return jnp.concatenate(planes.values(data, w), axis=1)

    if blocks == 1:  # one scale along the contraction: as serving's integer dot rescales
        total = _int_sums(x8, w, codes, path, exact_rows(w, act)).astype(jnp.float32)
        return _deinterleave(unfused(total * (sa * sw)), planes.per)
    xs = x8.reshape(-1, blocks, k // blocks).transpose(1, 0, 2)

    def step(acc: jax.Array, chunk: tuple) -> tuple[jax.Array, None]:
        xc, data, s = chunk
        part = _partial(xc, codes(data), path).astype(jnp.float32)
        return acc + unfused(part * s.reshape(1, -1)), None

    init = jnp.zeros((x8.shape[0], n), jnp.float32)
    acc, _ = jax.lax.scan(step, init, (xs, _chunks(w.data, blocks), sw))
    return _deinterleave(unfused(acc * sa), planes.per)


def _deinterleave(out: jax.Array, per: int) -> jax.Array:
    """``[rows, n]`` results with the planes side by side as the ``[rows, n]`` result."""
    return _interleave(jnp.split(out, per, axis=1))


def _partial(xc: jax.Array, values: jax.Array, path: str) -> jax.Array:
    """The integer sums ``xc @ values`` of codes, exact: int32 from an int8 x int8 ->
    int32 dot (``"int8_dot"``), or float32 from a bfloat16 dot summed in float32
    (``"bf16_dot"``), which holds the codes exactly and, with every sum an integer under
    2 ** 24 (at most :func:`exact_rows` rows), adds them exactly in any order."""
    dims = (((1,), (0,)), ((), ()))
    if xc.shape[-1] * values.shape[-1] < TINY_DOT:
        # jax 0.8's XLA:CPU emits invalid LLVM IR for such a dot of int8 or bfloat16
        # operands inside a loop; int32 operands give the same exact sums.
        sums = jax.lax.dot_general(xc.astype(jnp.int32), values.astype(jnp.int32), dims)
        return sums if path == "int8_dot" else sums.astype(jnp.float32)
    if path == "bf16_dot":
        x, v = xc.astype(jnp.bfloat16), values.astype(jnp.bfloat16)
        return jax.lax.dot_general(x, v, dims, preferred_element_type=jnp.float32)
    v = values.astype(jnp.int8)
    return jax.lax.dot_general(xc, v, dims, preferred_element_type=jnp.int32)


def exact_rows(w: QArray, activation: QuantSpec) -> int:
    """The most rows of the contraction whose integer sums ``"bf16_dot"`` adds exactly in
    float32: every partial sum of products of codes stays within 2 ** 24.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax import kernels
      >>> act = qjax.QuantSpec("int8", granularity=qjax.per_token())
      >>> kernels.exact_rows(qjax.quantize(jnp.ones((64, 8)), "int8"), act)  # 2**24 / 128**2
      1024
      >>> kernels.exact_rows(qjax.quantize(jnp.ones((64, 8)), "int4"), act)
      16384
    """
    if not isinstance(w, QArray):
        raise TypeError(f"exact_rows: w must be a qjax.QArray, got {type(w).__name__}")
    activation = as_spec(activation, "exact_rows activation")
    largest = [max(-int(s.target.qmin), int(s.target.qmax)) for s in (w.spec, activation)]
    return (1 << 24) // (largest[0] * largest[1])


def _int_sums(x8: jax.Array, w: QArray, codes: Callable, path: str, exact: int) -> jax.Array:
    """The int32 sums of ``x8 @ codes(w.data)`` over the whole contraction.

    ``"int8_dot"`` contracts the whole weight at once, except up to :data:`DECODE_ROWS`
    rows on a weight whose int32 copy exceeds :data:`CHUNK_BYTES`: there XLA:CPU turns an
    int8 dot into an int32 one over a converted copy of the whole weight, so the
    contraction runs a chunk of rows at a time and only a chunk is converted.
    ``"bf16_dot"`` runs chunks of at most ``exact`` rows (a bfloat16 copy of each chunk),
    their exact float32 sums added as int32. The integer sum is exact either way, so the
    results are the same.
    """
    k, n = w.shape
    if path == "int8_dot" and (x8.shape[0] > DECODE_ROWS or 4 * k * n <= CHUNK_BYTES):
        # Many rows, or a weight whose int32 copy is no bigger than a chunk: one dot. (A
        # loop over a small weight's chunks would gain nothing, and jax 0.8's XLA:CPU
        # miscompiles a tiny int8 dot inside one.)
        return _partial(x8, codes(w.data), path)
    if path == "int8_dot":
        rows = _chunk_rows(k, 1, max(CHUNK_BYTES // (4 * n), x8.shape[0]))
    else:
        rows = bf16_chunk_rows(k, n, exact, x8.shape[0])  # as in choose_path
    count = k // rows
    xs = x8.reshape(-1, count, rows).transpose(1, 0, 2)

    def step(acc: jax.Array, chunk: tuple) -> tuple[jax.Array, None]:
        xc, data = chunk
        return acc + _partial(xc, codes(data), path).astype(jnp.int32), None

    init = jnp.zeros((x8.shape[0], n), jnp.int32)
    acc, _ = jax.lax.scan(step, init, (xs, _chunks(w.data, count)))
    return acc
