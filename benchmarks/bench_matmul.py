"""Quantized matmuls against float32 at decode and prefill shapes: one command, one table.

    python benchmarks/bench_matmul.py            # M in {1, 8, 128, 1024} x three (K, N)
    python benchmarks/bench_matmul.py --quick    # M in {1, 8, 128}, (4096, 4096), 5 rounds
    python benchmarks/bench_matmul.py --paths    # also every explicit path, as ratios
    python benchmarks/bench_matmul.py --shapes 1024x1024 --ms 8,128   # other shapes, rows

Each cell is ``y = x @ W`` jitted, ``x`` float32 ``[M, K]``, ``W`` ``[K, N]`` (a Flax Dense
kernel), through :func:`qjax.kernels.matmul` with ``path="auto"`` for the quantized
columns (the path it picked for each M is listed under the table). The fastest of
interleaved rounds (every variant of a shape once per round, the bfloat16 column last;
on a shared machine other work only ever adds time, so the minimum is the least
disturbed) is given as a ratio to float32's, whose milliseconds are in the first column;
in brackets the ratio of the median CPU time of the process (all threads, spin-waits
included): the work each does, which other jobs on a shared machine disturb far less
than the wall time, where a variant whose dots XLA splits over both cores gains on one
it runs on one. The load average is printed before and after; the targets are marked on
the wall-time ratio.

* W8A8: int8 per-channel(-1) weights, activations int8 per token: "dyn" quantizes them
  inside the jitted function, "pre" passes codes quantized before (the dot and rescale).
* W4A8: int4 per_block(-2, 128) weights (packed), activations as for W8A8.
* weight-only: int8 per-channel(-1), int4 per_block(-2, 128) packed, float8_e4m3fn
  per-channel(-1), mxfp4 (OCP: blocks of 32 along the last axis, e8m0 scales); ``x`` enters
  as it is.

Targets (issue 13, as ratios to float32 in one run): W8A8 <= 0.6x and W4A8 <= 0.7x at
M >= 128; weight-only int4 <= 0.8x at M <= 8.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import memory_env
import qjax
from memory_env import describe
from qjax import kernels

ACT = qjax.QuantSpec("int8", granularity=qjax.per_token())
W8 = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
W4 = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 128))
FP8 = qjax.QuantSpec("float8_e4m3fn", granularity=qjax.per_channel(-1))
MXFP4 = qjax.QuantSpec("mxfp4")

# (column, weight spec or None for float, activation: "dyn", "pre" or None, targets)
# targets: (max ratio, rows predicate) or None
COLUMNS: list[tuple[str, object, str | None, tuple[float, Callable[[int], bool]] | None]] = [
    ("W8A8 dyn", W8, "dyn", (0.6, lambda m: m >= 128)),
    ("W8A8 pre", W8, "pre", (0.6, lambda m: m >= 128)),
    ("W4A8 dyn", W4, "dyn", (0.7, lambda m: m >= 128)),
    ("W4A8 pre", W4, "pre", (0.7, lambda m: m >= 128)),
    ("int8 w-only", W8, None, None),
    ("int4 w-only", W4, None, (0.8, lambda m: m <= 8)),
    ("fp8 w-only", FP8, None, None),
    ("mxfp4 w-only", MXFP4, None, None),
    ("bf16", "bfloat16", None, None),  # last: see interleaved_minima
]


def interleaved_minima(fns: list[Callable[[], object]], repeats: int) -> list[tuple[float, float]]:
    """Fastest wall and median CPU seconds of each callable over ``repeats`` rounds, one
    call of each per round (after one untimed call each: compilation and warm-up).

    Each round starts with an untimed call of the first callable (the baseline), which
    absorbs what the round before left behind: in glibc's default malloc regime the call
    timed right after the bfloat16 column (XLA:CPU converts its whole weight to float32)
    ran 11-17% slower (float32 at M = 128, timed there). Put such a column last.
    """
    for fn in fns:
        fn()
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(repeats):
        fns[0]()
        for fn, ts in zip(fns, times, strict=True):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            ts.append((time.perf_counter() - start, time.process_time() - cpu))
    return [(min(t[0] for t in ts), statistics.median(t[1] for t in ts)) for ts in times]


def _variants(
    x: jax.Array, w: jax.Array, weights: dict[object, object], all_paths: bool
) -> tuple[list[tuple[str, Callable[[], object], str]], dict[str, jax.Array]]:
    """(column, timed callable, path) for every column (and explicit path), and the
    results of one call each for the sanity check."""
    float_mm = jax.jit(lambda x, w: x @ w)
    xq = jax.block_until_ready(jax.jit(lambda x: qjax.quantize(x, ACT))(x))
    out: list[tuple[str, Callable[[], object], str]] = [
        ("float32", lambda: jax.block_until_ready(float_mm(x, w)), "x @ w")
    ]
    results = {"float32": float_mm(x, w)}
    for name, spec, act, _ in COLUMNS:
        if spec == "bfloat16":
            wb = weights[spec]
            fn = jax.jit(lambda x, wb: (x.astype(jnp.bfloat16) @ wb).astype(jnp.float32))
            out.append((name, lambda fn=fn, wb=wb: jax.block_until_ready(fn(x, wb)), "bf16 dot"))
            results[name] = fn(x, wb)
            continue
        qw = weights[spec]
        explicit = ("int8_dot", "bf16_dot") if act else ("dequant", "dequant_chunked")
        column_paths = ("auto", *explicit) if all_paths else ("auto",)
        for path in column_paths:
            label = name if path == "auto" else f"{name} [{path}]"
            if act == "pre":
                fn = jax.jit(lambda xq, qw, path=path: kernels.matmul(xq, qw, path=path))
                operand = xq
            else:
                activation = ACT if act == "dyn" else None
                fn = jax.jit(
                    lambda x, qw, path=path, activation=activation: kernels.matmul(
                        x, qw, activation=activation, path=path
                    )
                )
                operand = x
            chosen = kernels.choose_path(qw, ACT if act else None, x.shape[0])
            call = lambda fn=fn, a=operand, qw=qw: jax.block_until_ready(fn(a, qw))  # noqa: E731
            out.append((label, call, chosen if path == "auto" else path))
            results[label] = fn(operand, qw)
    return out, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M in {1, 8, 128}, one shape")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 7; 5 quick)")
    parser.add_argument(
        "--paths",
        action="store_true",
        help="also time every explicit path (dequant, dequant_chunked; int8_dot, bf16_dot)",
    )
    parser.add_argument("--ms", default=None, help="rows M, comma-separated (e.g. 1,1024)")
    parser.add_argument(
        "--shapes",
        default=None,
        help="weight shapes K x N, comma-separated (e.g. 1024x1024,2048x2048)",
    )
    memory_env.add_argument(parser)
    args = parser.parse_args()
    memory_env.apply(args)
    ms = (1, 8, 128) if args.quick else (1, 8, 128, 1024)
    if args.ms:
        ms = tuple(int(m) for m in args.ms.split(","))
    shapes = ((4096, 4096),) if args.quick else ((4096, 4096), (4096, 11008), (11008, 4096))
    if args.shapes:
        shapes = tuple(_shape(text) for text in args.shapes.split(","))
    repeats = args.repeats or (5 if args.quick else 7)
    dev = jax.devices()[0]
    print(
        f"# qjax.kernels.matmul vs float32: jax {jax.__version__}, {dev.platform} "
        f"({dev.device_kind}, {os.cpu_count()} cores), fastest of {repeats} interleaved "
        f"rounds; load average {_load()} at the start\n{describe()}\n{_bf16_line()}\n"
    )
    header = None
    chosen: dict[str, dict[str, list[int]]] = {}
    for k, n in shapes:
        w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) / np.sqrt(k)
        weights = {
            spec: jax.block_until_ready(qjax.quantize(w, spec)) for spec in (W8, W4, FP8, MXFP4)
        }
        weights["bfloat16"] = w.astype(jnp.bfloat16)
        for m in ms:
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
            variants, results = _variants(x, w, weights, args.paths)
            _sanity(results, (m, k, n))
            best = interleaved_minima([fn for _, fn, _ in variants], repeats)
            if header is None:
                header = [name for name, _, _ in variants]
                print("| M | K x N | float32 ms | " + " | ".join(header[1:]) + " |")
                print("|---:|---|---:|" + "---:|" * (len(header) - 1))
            (base, base_cpu) = best[0]
            cells = [
                _cell(name, t / base, c / base_cpu, m)
                for (name, _, _), (t, c) in zip(variants[1:], best[1:])
            ]
            print(f"| {m} | {k} x {n} | {base * 1e3:.1f} | " + " | ".join(cells) + " |", flush=True)
            for name, _, path in variants[1:]:
                chosen.setdefault(name, {}).setdefault(path, []).append(m)
    print("\nPaths taken (M):")
    for name, paths_m in chosen.items():
        taken = ", ".join(
            f"{p} ({', '.join(map(str, sorted(set(m))))})" for p, m in paths_m.items()
        )
        print(f"- {name}: {taken}")
    print(
        "\nTargets: W8A8 <= 0.6x, W4A8 <= 0.7x at M >= 128; int4 weight-only <= 0.8x at "
        "M <= 8 (ok / MISSED in the cells)."
    )
    print(WHY)
    print(f"Load average at the end: {_load()}")


def _shape(text: str) -> tuple[int, int]:
    """``"1024x4096"`` as (1024, 4096); exits with a message for anything else."""
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected K x N like 1024x4096, got {text!r}") from None
    if k < 1 or n < 1:
        raise SystemExit(f"--shapes: K and N must be positive, got {text!r}")
    return k, n


def _bf16_line() -> str:
    """Whether the CPU has native bfloat16 dots, which decides the integer path "auto" takes."""
    if kernels.native_bf16_dots():
        return 'bfloat16 dots: native (path="auto" takes "bf16_dot" where it measured faster)'
    return (
        f"bfloat16 dots: emulated (no {' / '.join(kernels.BF16_DOT_FLAGS)}): "
        'path="auto" takes "int8_dot" for integer activations'
    )


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


WHY = """
Why a cell is slower than float32 (XLA:CPU; read off the HLO and measured):
- bf16: x and W in bfloat16 with a bfloat16 result: XLA:CPU runs that dot far slower
  than float32. (Summed in float32, preferred_element_type=float32, a bfloat16 dot runs
  at about 0.55-0.6x float32's time: "bf16_dot" uses it.)
- Weight-only, M <= 8: the float32 matrix-vector product streams the float weight at
  memory speed. XLA:CPU fuses no conversion into a dot, so every quantized weight is
  converted in a loop before its dot (a chunk at a time, in cache): packed int4 reads 8x
  fewer bytes and int8 4x, and come out under float32; float8 and mxfp4 decode their
  float codes with several integer ops per weight, which costs more than reading float32.
- Any cell whose wall-time ratio is far above its CPU-time one (in brackets): float32's
  dot got both cores while the quantized variant ran on one. The chunked loops' small
  dots (M <= 8: [M, 128] x [128, N]) always run on one core, float32's matrix-vector dot
  on two when they are free; on a machine shared with other jobs any variant may lose
  a core for a whole round (M = 1024 cells with CPU ratio ~1.0 and wall ratio ~2.0).
- Weight-only, M >= 128: the dot is compute-bound and the same float32 dot; converting
  the weight is extra work (about 5-15%; "dequant", the whole weight at once, is slower).
- W4A8, M = 1: memory-bound; XLA:CPU turns an int8 matrix-vector dot into an int32 one
  over a converted weight and ran slower than the float path with the activation
  fake-quantized, which "auto" takes (it reads the same bytes); one core (above).
- With native bfloat16 dots (the line under the title), W8A8 at every M: "bf16_dot":
  the int8 codes as bfloat16 (exact), bfloat16 dots summed in float32 over chunks of at
  most 1024 rows (every sum an integer under 2**24: exact), the chunks' sums added as
  int32: the int8 dot's bits in less time. Below 512 rows of x the chunks hold about
  8 MiB of bfloat16 codes (at most 512 rows), so the dot reads each from cache right
  after its conversion (kernels.bf16_chunk_rows). W4A8, M >= 64: one bfloat16 dot per
  128-row scale block (32-86 of them), each exact; dots with K = 128 run at lower
  efficiency than one long one.
- Without them (AVX2): "int8_dot". XLA:CPU's int8 x int8 -> int32 dot is its fastest dot
  there but runs at only 0.85-0.9x float32's time on large operands (no VNNI
  instructions on AVX2), so W8A8 and W4A8 at M >= 128 come out near float32, and W4A8
  at M = 1024 above it (one int8 dot per 128-row scale block, each rescaled into the
  float32 sum). There "bf16_dot" (--paths) runs W8A8 at 1.6-5x float32's time, and the
  "bf16" column (a bfloat16 result) at 1.1-7.3x.
"""


def _cell(name: str, ratio: float, cpu_ratio: float, rows: int) -> str:
    target = next((t for col, _, _, t in COLUMNS if col == name), None)
    cell = f"{ratio:.2f}x ({cpu_ratio:.2f})"
    if target is not None and target[1](rows):
        cell += " ok" if ratio <= target[0] else f" MISSED (<={target[0]}x)"
    return cell


def _sanity(results: dict[str, jax.Array], shape: tuple[int, int, int]) -> None:
    """Every variant close to float32 (relative Frobenius error under 0.15): a wrong
    kernel would show here before its time is reported."""
    ref = np.asarray(results["float32"], np.float64)
    for name, y in results.items():
        err = np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
        if not err < 0.15:
            raise AssertionError(f"{name} at M, K, N = {shape}: relative error {err:.3f}")


if __name__ == "__main__":
    main()
