"""Pallas kernels for quantized matmuls on GPUs (Triton), tested on CPU in interpret mode.

Three entry points (two kernels), each ``y = x @ W`` for a :class:`~qjax.QArray` ``W`` [in, out]:

* :func:`int4_matmul`: weight-only 4-bit, int4 (formulation ``"scale"``) or mxfp4
  (float4_e2m1fn codes, e8m0 scales), scales ``per_channel(-1)`` or ``per_block(-2, B)``
  (mxfp4 along the contraction: ``QuantSpec("mxfp4", granularity=per_block(-2, 32))``).
  The kernel reads the packed bytes (two values per byte along the output axis, the
  first in the low nibble), unpacks a tile with :func:`qjax.packing.unpack_planes`
  (float4 codes to their values with :func:`qjax.packing.float_values`), interleaves the
  two nibbles, dequantizes it with the spec's formula
  (:func:`qjax.affine.dequantize_blocks`, in float32: the bits of ``W.dequantize()``),
  casts it to ``x``'s dtype and accumulates ``x_tile @ w_tile`` in float32. Only the
  packed bytes and the scales are read from memory.
* :func:`int8_matmul`: W8A8 (and W4A8: a packed int4 weight is unpacked as above), an
  int8 x int8 -> int32 dot with per-channel weight scales. The activation is quantized per
  token by :func:`qjax.quantize` in a small XLA prologue inside the same ``jit`` (one
  reduction and one elementwise pass over ``x``), so its codes and scales are those of
  the XLA path bit for bit. qjax's quantization maths does not lower to Triton inside a
  kernel (jax 0.10.2): ``round`` (``lax.round_p``, half to even) has no Triton lowering,
  nor has the ``custom_vmap`` of :func:`qjax.exact.exact_divide` nor the ``reduce`` of
  :func:`qjax.compute_qparams`; quantizing in the kernel would also redo each row's work
  once per block of output columns. The kernel sums the int32 products
  and rescales as the XLA path does, ``sums * (act_scale * weight_scale)``: the result
  equals ``qjax.kernels.matmul(x, W, activation=..., path="int8_dot")`` exactly.
* :func:`float8_matmul`: the same kernel for float8_e4m3fn activations (per token) and
  weights (per channel): a float8 x float8 dot with float32 sums (Hopper's float8 tensor
  cores), rescaled the same way. XLA has no such path in :func:`qjax.kernels.matmul`; the
  reference is the float64 product of the dequantized operands.

Each program computes a ``[block_m, block_n]`` tile of the output, looping over the
contraction in steps of ``block_k`` (one scale row per step for per-block scales, so
``block_k`` must divide the scale block). ``x``'s rows are padded with zeros to a multiple
of ``block_m`` (Triton's dot needs tiles of at least 16 rows; decode has 1); ``in`` and
``out`` must be multiples of ``block_k`` and ``block_n`` (a ValueError names the shape and
the block). :func:`int4_matmul` can split the contraction over ``split_k`` programs, whose
float32 partial sums are added after the kernel: at decode shapes there are too few
output tiles to occupy every core otherwise.

``interpret=None`` runs the kernel in Pallas' interpreter when JAX's default backend is
the CPU (tests, CI), else compiles it with Triton. The tests also lower both kernels for
CUDA on a CPU-only machine (Pallas to Triton IR); Triton's compilation to PTX and the
speed are measured by ``benchmarks/gpu_matmul.py`` on a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from qjax import granularity as gran
from qjax import packing
from qjax.affine import dequantize_blocks
from qjax.kernels._matmul import float_input
from qjax.ops import quantize
from qjax.qarray import QArray
from qjax.qparams import QParams
from qjax.spec import QuantSpec

__all__ = ["ACTIVATION", "FLOAT8_ACTIVATION", "float8_matmul", "int4_matmul", "int8_matmul"]

ACTIVATION = QuantSpec("int8", granularity=gran.per_token())
"""The activation spec of :func:`int8_matmul`: int8, symmetric, one scale per token."""

FLOAT8_ACTIVATION = QuantSpec("float8_e4m3fn", granularity=gran.per_token())
"""The activation spec of :func:`float8_matmul`: float8_e4m3fn, one scale per token."""

_MIN_ROWS = 16
"""The fewest rows a Triton dot takes: ``block_m`` is at least this."""


def int4_matmul(
    x: jax.typing.ArrayLike,
    w: QArray,
    *,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:
    """``x @ w.dequantize()`` for a packed 4-bit weight, dequantized tile by tile in a kernel.

    Args:
      x: floating-point array ``[..., in]`` (bfloat16 for speed on GPUs; float32 works).
      w: a 2-D packed int4 or mxfp4 (float4_e2m1fn) :class:`~qjax.QArray` ``[in, out]``,
        formulation ``"scale"`` (symmetric), scales ``per_channel(-1)``,
        ``per_block(-2, B)`` or per tensor, no channel scale.
      block_m: rows of ``x`` per program, a power of two of at least 16; ``x``'s rows are
        padded with zeros to a multiple of it.
      block_n: output columns per program, an even power of two dividing ``out``.
      block_k: contraction rows per loop step, a power of two of at least 16 dividing
        ``in`` (and ``B`` for per-block scales; ``block_k`` larger than ``B`` is lowered
        to ``B``).
      split_k: programs sharing the contraction of one tile (their float32 partial sums
        are added after the kernel); must divide ``in / block_k``.
      num_warps, num_stages: Triton's launch parameters (ignored when interpreting).
      interpret: run in Pallas' interpreter; None: when the default backend is the CPU.

    Returns:
      ``[..., out]`` in ``x``'s dtype: each tile of the weight is ``w.dequantize()``'s
      float32 values cast to ``x``'s dtype, products summed in float32 (in another order
      than one XLA dot: equal up to float32 rounding).

    Raises:
      TypeError: ``x`` is no floating-point array or ``w`` no QArray.
      ValueError: a weight spec the kernel does not run, or shapes that do not fit the
        blocks (the message names both).

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.kernels import pallas
      >>> w = qjax.quantize(jax.random.normal(jax.random.key(0), (64, 32)),
      ...                   qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32)))
      >>> x = jax.random.normal(jax.random.key(1), (3, 64))
      >>> y = pallas.int4_matmul(x, w, block_n=32, block_k=32)
      >>> bool(jnp.allclose(y, x @ w.dequantize(), rtol=1e-5, atol=1e-5))
      True
      >>> pallas.int4_matmul(x, w, block_n=64)
      Traceback (most recent call last):
        ...
      ValueError: int4_matmul: out (32, w.shape (64, 32)) must be a multiple of block_n (64); ...
    """
    x = float_input(x, "int4_matmul")
    _check_weight(w, x.shape, "int4_matmul", ("int4", "float4_e2m1fn"))
    k = w.shape[0]
    group = _scale_rows(w)
    if block_k > group and (group < 16 or group & (group - 1)):
        raise ValueError(
            f"int4_matmul: the weight's scale blocks hold {group} rows of in (spec {w.spec}), "
            f"fewer than block_k ({block_k}), and a step must stay within one block: a "
            "power of two of at least 16 rows. Quantize with per_block(-2, B) for such a B "
            "(or per_channel(-1), per tensor)"
        )
    block_k = min(block_k, group)
    _check_blocks("int4_matmul", w.shape, block_m, block_n, block_k)
    if group % block_k:
        raise ValueError(
            f"int4_matmul: block_k ({block_k}) must divide the weight's scale block along "
            f"in ({group}, spec {w.spec}): choose block_k={group} or a power of two dividing it"
        )
    steps = k // block_k
    if split_k < 1 or steps % split_k:
        raise ValueError(
            f"int4_matmul: split_k ({split_k}) must divide in / block_k = {k} / {block_k} = {steps}"
        )
    blocks = _Blocks(block_m, block_n, block_k, split_k, num_warps, num_stages)
    if _no_rows(x):
        return jnp.zeros((*x.shape[:-1], w.shape[1]), x.dtype)
    return _int4_matmul(x, w, blocks, _interpret(interpret))


def int8_matmul(
    x: jax.typing.ArrayLike | QArray,
    w: QArray,
    *,
    block_m: int = 64,
    block_n: int = 128,
    block_k: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:
    """``x @ w`` with ``x`` quantized per token to int8: int8 x int8 -> int32 in a kernel.

    Args:
      x: floating-point array ``[..., in]``, quantized with :data:`ACTIVATION` by
        :func:`qjax.quantize` before the kernel (in the same jit); or an activation already
        quantized with that spec (a QArray, unpacked): its codes enter as they are.
      w: a 2-D :class:`~qjax.QArray` ``[in, out]``: int8 (unpacked) or packed int4,
        formulation ``"scale"``, scales ``per_channel(-1)`` or per tensor, no channel
        scale.
      block_m: rows per program, a power of two of at least 16 (``x`` is padded to it).
      block_n: output columns per program, a power of two dividing ``out`` (even for int4).
      block_k: contraction rows per loop step, a power of two of at least 16 dividing ``in``.
      num_warps, num_stages: Triton's launch parameters (ignored when interpreting).
      interpret: run in Pallas' interpreter; None: when the default backend is the CPU.

    Returns:
      ``[..., out]`` in ``x``'s float dtype: the exact int32 sums times
      ``act_scale * weight_scale``, the same bits as
      ``qjax.kernels.matmul(x, w, activation=ACTIVATION, path="int8_dot")``.

    Raises:
      TypeError: ``x`` is no floating-point array (or QArray) or ``w`` no QArray.
      ValueError: specs the kernel does not run, or shapes that do not fit the blocks.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax import kernels
      >>> from qjax.kernels import pallas
      >>> w = qjax.quantize(jax.random.normal(jax.random.key(0), (64, 32)), "int8:per_channel")
      >>> x = jax.random.normal(jax.random.key(1), (3, 64))
      >>> y = pallas.int8_matmul(x, w, block_n=32, block_k=32)
      >>> ref = kernels.matmul(x, w, activation=pallas.ACTIVATION, path="int8_dot")
      >>> bool((y == ref).all())
      True
    """
    blocks = _Blocks(block_m, block_n, block_k, 1, num_warps, num_stages)
    return _quantized("int8_matmul", x, w, ACTIVATION, ("int8", "int4"), blocks, interpret)


def float8_matmul(
    x: jax.typing.ArrayLike | QArray,
    w: QArray,
    *,
    block_m: int = 64,
    block_n: int = 128,
    block_k: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:
    """``x @ w`` with ``x`` quantized per token to float8_e4m3fn: a float8 x float8 dot
    with float32 sums in a kernel (as :func:`int8_matmul`, with
    :data:`FLOAT8_ACTIVATION` and a float8_e4m3fn weight).

    Args:
      x: floating-point array ``[..., in]``, quantized with :data:`FLOAT8_ACTIVATION` by
        :func:`qjax.quantize` before the kernel (in the same jit), or a QArray with that
        spec.
      w: a 2-D float8_e4m3fn :class:`~qjax.QArray` ``[in, out]``, scales
        ``per_channel(-1)`` or per tensor, no channel scale.
      block_m, block_n, block_k, num_warps, num_stages, interpret: as in
        :func:`int8_matmul`.

    Returns:
      ``[..., out]`` in ``x``'s float dtype: the float32 sums of the exact float8
      products times ``act_scale * weight_scale``.

    Raises:
      TypeError: ``x`` is no floating-point array (or QArray) or ``w`` no QArray.
      ValueError: specs the kernel does not run, or shapes that do not fit the blocks.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax
      >>> from qjax.kernels import pallas
      >>> w = qjax.quantize(jax.random.normal(jax.random.key(0), (64, 32)),
      ...                   qjax.QuantSpec("float8_e4m3fn", granularity=qjax.per_channel(-1)))
      >>> x = jax.random.normal(jax.random.key(1), (3, 64))
      >>> y = pallas.float8_matmul(x, w, block_n=32, block_k=32)
      >>> xq = qjax.quantize(x, pallas.FLOAT8_ACTIVATION)
      >>> bool(jnp.allclose(y, xq.dequantize() @ w.dequantize(), rtol=1e-5, atol=1e-5))
      True
    """
    blocks = _Blocks(block_m, block_n, block_k, 1, num_warps, num_stages)
    dtypes = ("float8_e4m3fn",)
    return _quantized("float8_matmul", x, w, FLOAT8_ACTIVATION, dtypes, blocks, interpret)


def _quantized(
    what: str,
    x: jax.typing.ArrayLike | QArray,
    w: QArray,
    act: QuantSpec,
    dtypes: tuple[str, ...],
    blocks: _Blocks,
    interpret: bool | None,
) -> jax.Array:
    """Checks the arguments of :func:`int8_matmul` (:func:`float8_matmul`), then runs it."""
    if isinstance(x, QArray):
        if x.spec != act or x.packed:
            raise ValueError(
                f"{what}: a quantized x must have spec {act} and be unpacked, got "
                f"{x.spec} (packed={x.packed}); pass x unquantized to quantize it per token"
            )
    else:
        x = float_input(x, what)
    _check_weight(w, x.shape, what, dtypes)
    if _scale_rows(w) != w.shape[0]:
        raise ValueError(
            f"{what}: weight scales must be per_channel(-1) or per tensor, got "
            f"{w.spec.granularity}; the kernel's sums need one scale along the whole contraction"
        )
    _check_blocks(what, w.shape, blocks.m, blocks.n, blocks.k)
    if _no_rows(x):
        dtype = x.float_dtype if isinstance(x, QArray) else x.dtype
        return jnp.zeros((*x.shape[:-1], w.shape[1]), dtype)
    if isinstance(x, QArray):
        return _quantized_matmul(x, w, blocks, _interpret(interpret))
    return _quantize_then_matmul(x, w, act, blocks, _interpret(interpret))


class _Blocks(NamedTuple):
    """Static kernel parameters (hashable, for jit)."""

    m: int
    n: int
    k: int
    split: int
    warps: int
    stages: int


def _no_rows(x: jax.Array | QArray) -> bool:
    """True for an ``x`` without rows: its product is empty, and no grid can cover it."""
    return math.prod(x.shape[:-1]) == 0


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def _check_weight(w: QArray, x_shape: tuple[int, ...], what: str, dtypes: tuple[str, ...]) -> None:
    if not isinstance(w, QArray):
        raise TypeError(f"{what}: w must be a qjax.QArray (qjax.quantize), got {type(w).__name__}")
    spec = w.spec
    target = spec.target
    if (
        target.name not in dtypes
        or spec.formulation != "scale"
        or w.ndim != 2
        or (target.bits < 8) != w.packed
        or w.pad
        or w.channel_scale is not None
    ):
        raise ValueError(
            f"{what}: w must be a 2-D QArray [in, out] of {' or '.join(dtypes)} with "
            "formulation 'scale' (symmetric), sub-byte values packed without padding and no "
            f"channel_scale; got spec {spec}, shape {w.shape}, packed={w.packed}, pad={w.pad}, "
            f"channel_scale {'set' if w.channel_scale is not None else 'None'}: use "
            "qjax.kernels.matmul for other weights"
        )
    if x_shape[-1] != w.shape[0]:
        raise ValueError(
            f"{what}: x's last axis ({x_shape[-1]}, shape {x_shape}) must equal w's input "
            f"axis ({w.shape[0]}, shape {w.shape})"
        )


def _scale_rows(w: QArray) -> int:
    """Weight rows per scale row: ``B`` for ``per_block(-2, B)``, ``in`` for per channel
    or per tensor.

    Raises ValueError for scales shared by some output columns but not all.
    """
    (k, n), (rows, cols) = w.shape, w.scale.shape
    if cols not in (1, n):
        raise ValueError(
            f"weight spec {w.spec}: the kernels need one scale per output column or one for "
            f"all (scale shape (rows, {n}) or (rows, 1)), got scale shape {(rows, cols)}; "
            "quantize with granularity per_tensor(), per_channel(-1) or per_block(-2, B)"
        )
    return k // rows


def _check_blocks(what: str, shape: tuple[int, int], bm: int, bn: int, bk: int) -> None:
    (k, n) = shape
    for name, value, least in (
        ("block_m", bm, _MIN_ROWS),
        ("block_n", bn, 16),
        ("block_k", bk, 16),
    ):
        if value < least or value & (value - 1):
            raise ValueError(
                f"{what}: {name} must be a power of two of at least {least}, got {value}"
            )
    for axis, size, name, block in (("in", k, "block_k", bk), ("out", n, "block_n", bn)):
        if size % block:
            raise ValueError(
                f"{what}: {axis} ({size}, w.shape {shape}) must be a multiple of {name} "
                f"({block}); choose a smaller {name} or pad the weight"
            )


def _pad_rows(a: jax.Array, rows: int) -> jax.Array:
    """``a`` [m, ...] with zero rows appended up to a multiple of ``rows``."""
    extra = -a.shape[0] % rows
    return jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)) if extra else a


def _weight_tile(data: jax.Array, w: QArray) -> jax.Array:
    """The values of a tile of ``w.data``: packed bytes unpacked and interleaved, int32
    codes (integer targets) or their exact float32 values (float4)."""
    if not w.packed:
        return data
    target = w.spec.target
    planes = packing.unpack_planes(data, target.bits, signed=not target.is_float)
    if target.is_float:
        planes = [packing.float_values(p, target) for p in planes]
    rows, width = data.shape
    return jnp.stack(planes, axis=-1).reshape(rows, width * len(planes))


def _scale_operand(w: QArray, *, as_bytes: bool = True) -> jax.Array:
    """The scales as the kernel reads them, one column per output column: float32, or with
    ``as_bytes`` e8m0 scales as their bytes (:func:`qjax.affine.times_power_of_two` reads
    the exponent off the byte)."""
    if w.spec.power_of_two_scale and as_bytes:
        scale = jax.lax.bitcast_convert_type(w.scale, jnp.uint8)
    else:
        scale = w.scale.astype(jnp.float32)
    return jnp.broadcast_to(scale, (scale.shape[0], w.shape[1]))


def _call(kernel, out_shape, grid, in_specs, out_specs, blocks: _Blocks, interpret: bool):
    params = None if interpret else pl_triton.CompilerParams(blocks.warps, blocks.stages)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=params,
    )


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _int4_matmul(x: jax.Array, w: QArray, blocks: _Blocks, interpret: bool) -> jax.Array:
    k, n = w.shape
    bm, bn, bk, split = blocks.m, blocks.n, blocks.k, blocks.split
    group = k // w.scale.shape[0]
    per = w.spec.target.packs
    x2 = x.reshape(-1, k)
    xp = _pad_rows(x2, bm)
    span = k // split  # contraction rows per program
    steps = span // bk

    def kernel(x_ref, w_ref, s_ref, o_ref):
        part = pl.program_id(2)

        def step(i, acc):
            row = part * span + i * bk
            q = _weight_tile(w_ref[pl.ds(row, bk), :], w)
            scale = s_ref[pl.ds(row // group, 1), :]
            qp = QParams(scale, None, None)  # factors inline: Triton cannot lower the division
            tile = dequantize_blocks(q, qp, w.spec, jnp.float32, once_per_block=False)
            xt = x_ref[:, pl.ds(row, bk)]
            return acc + jnp.dot(xt, tile.astype(x.dtype), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
        o_ref[...] = acc[None]

    grid = (xp.shape[0] // bm, n // bn, split)
    parts = _call(
        kernel,
        jax.ShapeDtypeStruct((split, xp.shape[0], n), jnp.float32),
        grid,
        [
            pl.BlockSpec((bm, k), lambda i, j, s: (i, 0)),
            pl.BlockSpec((k, bn // per), lambda i, j, s: (0, j)),
            pl.BlockSpec((k // group, bn), lambda i, j, s: (0, j)),
        ],
        pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j)),
        blocks,
        interpret,
    )(xp, w.data, _scale_operand(w))
    out = _times_tensor_scale(parts[0] if split == 1 else parts.sum(axis=0), w)
    return out[: x2.shape[0]].astype(x.dtype).reshape(*x.shape[:-1], n)


def _times_tensor_scale(out: jax.Array, w: QArray) -> jax.Array:
    """The float32 product times ``w``'s tensor scale (NVFP4's second level), if any: the
    same factor for every weight, applied once to the sums."""
    if w.tensor_scale is None:
        return out
    return out * w.tensor_scale.astype(jnp.float32).reshape(1, 1)


@functools.partial(jax.jit, static_argnames=("act", "blocks", "interpret"))
def _quantize_then_matmul(
    x: jax.Array, w: QArray, act: QuantSpec, blocks: _Blocks, interpret: bool
) -> jax.Array:
    return _quantized_matmul(quantize(x, act, packed=False), w, blocks, interpret)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _quantized_matmul(xq: QArray, w: QArray, blocks: _Blocks, interpret: bool) -> jax.Array:
    """Codes x codes in the kernel: int32 sums (integers) or float32 (float8), rescaled."""
    k, n = w.shape
    bm, bn, bk = blocks.m, blocks.n, blocks.k
    per = w.spec.target.packs if w.packed else 1
    sums_dtype = jnp.float32 if w.spec.is_float else jnp.int32
    codes = xq.data.reshape(-1, k)
    rows = codes.shape[0]
    scale = jnp.broadcast_to(xq.scale.astype(jnp.float32).reshape(-1, 1), (rows, 1))
    codes, scale = _pad_rows(codes, bm), _pad_rows(scale, bm)

    def kernel(x_ref, sa_ref, w_ref, sw_ref, o_ref):
        def step(i, acc):
            q = _weight_tile(w_ref[pl.ds(i * bk, bk), :], w).astype(codes.dtype)
            xt = x_ref[:, pl.ds(i * bk, bk)]
            return acc + jnp.dot(xt, q, preferred_element_type=sums_dtype)

        sums = jax.lax.fori_loop(0, k // bk, step, jnp.zeros((bm, bn), sums_dtype))
        o_ref[...] = sums.astype(jnp.float32) * (sa_ref[...] * sw_ref[...])

    out = _call(
        kernel,
        jax.ShapeDtypeStruct((codes.shape[0], n), jnp.float32),
        (codes.shape[0] // bm, n // bn),
        [
            pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
            pl.BlockSpec((k, bn // per), lambda i, j: (0, j)),
            pl.BlockSpec((1, bn), lambda i, j: (0, j)),
        ],
        pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        blocks,
        interpret,
    )(codes, scale, w.data, _scale_operand(w, as_bytes=False))
    out = _times_tensor_scale(out, w)
    return out[:rows].astype(xq.float_dtype).reshape(*xq.shape[:-1], n)
