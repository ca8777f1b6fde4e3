"""Matmuls with quantized weights: ``y = x @ W`` for a :class:`~qjax.QArray` ``W`` [in, out].

One entry point, :func:`matmul`, with named paths that can be chosen and tested one by
one, and ``path="auto"``, which picks the fastest that can run the weight and activation
specs (:func:`choose_path`). Each path computes the same product, its own way:

* ``"dequant"``: the reference, ``x @ W.dequantize()``: the whole float32 weight is
  materialised, then one float dot.
* ``"dequant_chunked"``: the same weight-only product, dequantized a chunk of input rows
  at a time inside a ``lax.scan`` (about :data:`CHUNK_BYTES` of float32 per chunk, so it
  stays in cache), each chunk's partial product accumulated in float32. A packed weight
  is unpacked by position in its bytes (as :func:`qjax.packing.unpack_planes`, on 8-bit
  lanes for integer codes): one dot per plane of output columns ``i::per``, so the
  unpacking is a few shifts per byte with no interleaving, and the planes' results are
  interleaved at the end (``[rows, out]``, small). Where a chunk shares one scale per
  output column (formulation ``"scale"``, scales per channel or per block of input
  rows), the chunk's codes enter the dot as they are and the scale multiplies the
  partial product: ``(x @ q) * s``. XLA:CPU neither fuses a conversion into a dot nor
  loops fast over interleaved nibbles, and writing a whole float32 weight costs more
  than the dot that reads it.
* ``"int8_dot"``: W8A8 and W4A8. The activation is quantized per token (or per tensor)
  with :func:`qjax.quantize` (or comes quantized: ``x`` may be a QArray), the weight's
  codes (int8, or int4 / int2 planes unpacked to int8 inside the computation, side by
  side in one matrix) enter int8 x int8 -> int32 ``lax.dot_general`` calls, and the
  int32 sums are rescaled by activation scale x weight scale. Weight scales that vary
  along the contraction (``per_block(-2, B)``) split it into blocks, one ``lax.scan``
  step each: an int32 partial sum per block, scaled by that block's weight scales,
  summed in float32. Up to :data:`DECODE_ROWS` rows, a weight with one scale along the
  contraction is contracted a chunk at a time too (XLA:CPU would otherwise convert the
  whole weight to int32 for a matrix-vector product); the int32 sum is exact, so the
  result is the same.
* ``"bf16_dot"``: the same integer sums, bit for bit, from bfloat16 dots summed in
  float32: bfloat16 holds every int8 code exactly, each product of two codes is exact in
  float32, and a sum of at most :func:`exact_rows` products (2 ** 24 / (largest code x
  largest code): 1024 rows for int8 x int8) is an integer under 2 ** 24, which float32
  adds exactly in any order. The contraction runs in chunks of at most that many rows
  (each chunk's codes converted to bfloat16 inside a ``lax.scan``), their sums added as
  int32; per-block scales take one block per step as ``"int8_dot"`` does. Below
  :data:`PREFILL_ROWS` rows of ``x`` a chunk is kept small enough to be read from cache
  (:func:`bf16_chunk_rows`). On CPUs with native bfloat16 dot instructions
  (:func:`native_bf16_dots`), XLA:CPU's bfloat16 dots summed in float32 ran faster than
  its int8 dots from 9 rows up, and at every number of rows for 8-bit codes on weights
  of at least :data:`BF16_MIN_CODES` codes; ``path="auto"`` takes it only there. On
  others (AVX2) W8A8 on them ran at 1.6-5x float32's time, on ``"int8_dot"`` at
  0.34-0.53x (8 rows) to 0.88-1.19x (128 and 1024 rows).

A weight's ``channel_scale`` ([in, 1], from AWQ / SmoothQuant) multiplies ``x`` first
(``x * channel_scale[:, 0]`` in float32, rounded to ``x``'s dtype), as serving does; the
rest of the weight is read without it. The result has ``x``'s dtype.
"""

from qjax.kernels._cpu import BF16_DOT_FLAGS as BF16_DOT_FLAGS
from qjax.kernels._cpu import BF16_DOTS_ENV as BF16_DOTS_ENV
from qjax.kernels._cpu import native_bf16_dots as native_bf16_dots
from qjax.kernels._matmul import BF16_CHUNK_BYTES as BF16_CHUNK_BYTES
from qjax.kernels._matmul import BF16_MIN_CODES as BF16_MIN_CODES
from qjax.kernels._matmul import BF16_ROWS as BF16_ROWS
from qjax.kernels._matmul import BLOCKED_BF16_ROWS as BLOCKED_BF16_ROWS
from qjax.kernels._matmul import CHUNK_BYTES as CHUNK_BYTES
from qjax.kernels._matmul import DECODE_ROWS as DECODE_ROWS
from qjax.kernels._matmul import PATHS as PATHS
from qjax.kernels._matmul import PREFILL_ROWS as PREFILL_ROWS
from qjax.kernels._matmul import bf16_chunk_rows as bf16_chunk_rows
from qjax.kernels._matmul import choose_path as choose_path
from qjax.kernels._matmul import exact_rows as exact_rows
from qjax.kernels._matmul import matmul as matmul
from qjax.kernels._matmul import why_not as why_not

__all__ = [
    "BF16_CHUNK_BYTES",
    "BF16_DOTS_ENV",
    "BF16_DOT_FLAGS",
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
    "native_bf16_dots",
    "why_not",
]
