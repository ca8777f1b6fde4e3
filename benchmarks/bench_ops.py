"""Benchmark: jitted ``qjax.quantize`` against a NumPy copy of the same array.

For a square float32 array (random normal, fixed seed, placed on the device once), times
the jitted quantize of each spec below and, interleaved with it so that machine noise
hits both alike, ``np.copy`` of the host array. Prints the medians, the ratio
quantize / copy and, where one exists, the target ratio and whether it is met.

Run it with::

    python benchmarks/bench_ops.py [--repeats 20] [--size 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import qjax

# (row name, spec, target ratio quantize / copy or None)
CASES: list[tuple[str, qjax.QuantSpec, float | None]] = [
    ("per-tensor int8", qjax.QuantSpec("int8"), None),
    ("per-channel int8 (axis -1)", qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)), 2.0),
    ("per-block(32) int4 packed", qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32)), 1.5),
    (
        "per-block(128) int4 packed",
        qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 128)),
        1.5,
    ),
    ("per-tensor float8_e4m3fn", qjax.QuantSpec("float8_e4m3fn"), 2.5),
    ("mxfp4", qjax.QuantSpec("mxfp4"), None),
]


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_case(
    spec: qjax.QuantSpec, x_host: np.ndarray, x_dev: jax.Array, repeats: int
) -> tuple[float, float]:
    """Median seconds of (jitted quantize, np.copy), measured alternately."""
    quantize = jax.jit(lambda x: qjax.quantize(x, spec))
    jax.block_until_ready(quantize(x_dev))  # compile and warm up
    np.copy(x_host)
    q_times, c_times = [], []
    for _ in range(repeats):
        c_times.append(_seconds(lambda: np.copy(x_host)))
        q_times.append(_seconds(lambda: jax.block_until_ready(quantize(x_dev))))
    return statistics.median(q_times), statistics.median(c_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per row")
    parser.add_argument("--size", type=int, default=4096, help="array is size x size")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((args.size, args.size), dtype=np.float32)
    x_dev = jax.block_until_ready(jnp.asarray(x_host))

    print(
        f"qjax.quantize vs np.copy: {args.size}x{args.size} float32, "
        f"median of {args.repeats}, device {jax.devices()[0].device_kind}"
    )
    header = f"{'spec':<28} {'quantize ms':>11} {'copy ms':>9} {'ratio':>7} {'target':>8}  met"
    print(header)
    print("-" * len(header))
    for name, spec, target in CASES:
        q, c = bench_case(spec, x_host, x_dev, args.repeats)
        ratio = q / c
        tgt = f"<={target:.1f}x" if target is not None else "-"
        met = ("yes" if ratio <= target else "NO") if target is not None else "-"
        print(f"{name:<28} {q * 1e3:>11.2f} {c * 1e3:>9.2f} {ratio:>6.2f}x {tgt:>8}  {met}")


if __name__ == "__main__":
    main()
