"""GPU benchmark: the quantize table of ``run.py`` and low-precision matmuls against bf16.

Short and self-contained for a lent GPU machine (CI has none)::

    python benchmarks/gpu.py [--repeats 20] [--sizes 4096 8192]

1. **Quantize.** The rows of :data:`run.CASES` on a 4096x4096 float32 array: qjax's
   jitted quantize, a device memory bound (the jitted negation ``-x``: one read and one
   write of the array, what a copy costs on the device) and, when ``qwix`` imports,
   Qwix's quantize with the same settings. GPU calls are asynchronous and short, so each
   figure is the median over ``--repeats`` batches of 20 back-to-back calls, per call.
   Before timing, qjax's codes are checked against the same spec run on the CPU backend:
   they must be bit-identical.
2. **Matmuls** at transformer sizes ``[M, K] @ [K, N]`` (each ``--sizes`` value ``S``
   gives ``M = K = N = S``): bf16 x bf16, float8_e4m3fn x float8_e4m3fn with per-tensor
   scales (qjax codes, f32 accumulation) and int8 x int8 -> int32 with per-token and
   per-channel scales, each both on pre-quantized codes and with the activation quantized
   inside the jitted function. Prints ms, TFLOP/s, the ratio to bf16 and the relative
   error against a float32 product of the original inputs.
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
from run import CASES

try:
    import qwix
except ImportError:  # optional: pip install qwix
    qwix = None

CALLS_PER_BATCH = 20


def per_call_ms(fn: Callable[[], jax.Array], repeats: int) -> float:
    """Median milliseconds per call over ``repeats`` batches of back-to-back calls."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(CALLS_PER_BATCH - 1):
            fn()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) / CALLS_PER_BATCH)
    return statistics.median(times) * 1e3


def check_against_cpu(spec: qjax.QuantSpec, x: np.ndarray) -> None:
    """Raise if qjax's codes and scales on the GPU differ from those on the CPU."""
    gpu = jax.jit(lambda v: qjax.quantize(v, spec))(jnp.asarray(x))
    cpu_x = jax.device_put(x, jax.devices("cpu")[0])
    cpu = jax.jit(lambda v: qjax.quantize(v, spec))(cpu_x)
    for name in ("data", "scale", "offset"):
        a, b = getattr(gpu, name), getattr(cpu, name)
        if a is None and b is None:
            continue
        if not np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)):
            raise AssertionError(f"{spec}: GPU {name} differs from the CPU result")


def bench_quantize(size: int, repeats: int) -> None:
    x_host = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    x = jax.block_until_ready(jnp.asarray(x_host))
    bound = jax.jit(jnp.negative)
    bound_ms = per_call_ms(lambda: bound(x), repeats)
    print(f"## Quantize {size}x{size} float32 (device bound -x: {bound_ms:.3f} ms)\n")
    print("| spec | qjax ms | qjax/bound | Qwix ms | qjax/Qwix | equals CPU |")
    print("|---|---:|---:|---:|---:|---|")
    for name, spec, qwix_kwargs, _ in CASES:
        check_against_cpu(spec, x_host[:512, :512])
        quantize = jax.jit(lambda v, spec=spec: qjax.quantize(v, spec))
        q_ms = per_call_ms(lambda quantize=quantize: quantize(x), repeats)
        w_cell = ratio_cell = "-"
        if qwix is not None and qwix_kwargs is not None:
            kwargs = dict(qwix_kwargs)
            qtype = kwargs.pop("qtype")
            qwix_fn = jax.jit(lambda v, qtype=qtype, kw=kwargs: qwix.quantize(v, qtype, **kw))
            w_ms = per_call_ms(lambda qwix_fn=qwix_fn: qwix_fn(x), repeats)
            w_cell, ratio_cell = f"{w_ms:.3f}", f"{q_ms / w_ms:.2f}x"
        print(
            f"| {name} | {q_ms:.3f} | {q_ms / bound_ms:.2f}x | {w_cell} | {ratio_cell} | yes |",
            flush=True,
        )


def bench_matmul(size: int, repeats: int) -> None:
    k1, k2 = jax.random.split(jax.random.key(size))
    x = jax.random.normal(k1, (size, size), jnp.float32)
    w = jax.random.normal(k2, (size, size), jnp.float32)
    ref = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
    dims = (((1,), (0,)), ((), ()))

    fp8 = qjax.QuantSpec("float8_e4m3fn")
    act8 = qjax.QuantSpec("int8", granularity=qjax.per_token())
    w8_spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
    quant = jax.jit(qjax.quantize, static_argnums=1)
    x_f8, w_f8 = quant(x, fp8), quant(w, fp8)
    x_i8, w_i8 = quant(x, act8), quant(w, w8_spec)
    x_bf, w_bf = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)

    def fp8_dot(xq: qjax.QArray, wq: qjax.QArray) -> jax.Array:
        acc = jax.lax.dot_general(xq.data, wq.data, dims, preferred_element_type=jnp.float32)
        return (acc * (xq.scale * wq.scale)).astype(jnp.bfloat16)

    def int8_dot(xq: qjax.QArray, wq: qjax.QArray) -> jax.Array:
        acc = jax.lax.dot_general(xq.data, wq.data, dims, preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * xq.scale * wq.scale).astype(jnp.bfloat16)

    variants: list[tuple[str, Callable[[], jax.Array]]] = []

    def add(name: str, fn: Callable, *args: object) -> None:
        jitted = jax.jit(fn)
        variants.append((name, lambda: jitted(*args)))

    add("bf16 x bf16", lambda a, b: a @ b, x_bf, w_bf)
    add("fp8 e4m3 x e4m3 (pre-quantized)", fp8_dot, x_f8, w_f8)
    add(
        "fp8 e4m3, activation quantized in jit",
        lambda a, b: fp8_dot(qjax.quantize(a, fp8), b),
        x_bf,
        w_f8,
    )
    add("int8 x int8 -> int32 (pre-quantized)", int8_dot, x_i8, w_i8)
    add(
        "int8, activation quantized in jit",
        lambda a, b: int8_dot(qjax.quantize(a, act8), b),
        x_bf,
        w_i8,
    )

    flops = 2 * size**3
    print(f"\n## Matmul [{size}, {size}] @ [{size}, {size}]\n")
    print("| variant | ms | TFLOP/s | vs bf16 | rel. error |\n|---|---:|---:|---:|---:|")
    base = None
    for name, fn in variants:
        ms = per_call_ms(fn, repeats)
        base = base or ms
        out = fn().astype(jnp.float32)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        print(
            f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {ms / base:.2f}x | {err:.4f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed batches per figure")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--quantize-size", type=int, default=4096)
    args = parser.parse_args()
    dev = jax.devices()[0]
    qwix_note = f"qwix {qwix.__version__}" if qwix is not None else "qwix not installed"
    print(f"# qjax GPU benchmarks: jax {jax.__version__}, {qwix_note}, {dev.device_kind}\n")
    bench_quantize(args.quantize_size, args.repeats)
    for size in args.sizes:
        bench_matmul(size, args.repeats)


if __name__ == "__main__":
    main()
