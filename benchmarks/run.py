"""One-command benchmark: qjax against a memory copy and Google's Qwix, medians and ratios.

Everything is measured in one run (tree PTQ workers in subprocesses, for their memory),
so the ratios compare like with like.

1. **Quantize.** For a 4096x4096 float32 array (random normal, fixed seed, placed on the
   device once), each row times the jitted ``qjax.quantize`` of one spec and, interleaved
   with it so that machine noise hits all alike, ``np.copy`` of the host array, XLA's own
   copy of it (a jitted negation: see ``memory_env``, XLA's large buffers can cost 4x
   NumPy's) and, when ``qwix`` is importable, the jitted ``qwix.quantize`` with the same
   dtype and granularity (nvfp4 has no Qwix column: Qwix's ``"nvfp4"`` keeps float32
   block scales and no tensor scale, another format). Prints the medians, the ratios
   qjax / copy, qjax / XLA copy and qjax / Qwix, and the targets where there are ones.
2. **PTQ of a whole tree** (:mod:`bench_tree_ptq`): about 100M float32 parameters of a
   scan-stacked transformer, int8 per channel and int4 per block 128, qjax's
   ``quantize_tree`` against Qwix's ``quantize_params``: time, and peak memory against
   the budget input + output + 2 x the largest leaf, each in a fresh subprocess.
3. **QAT train step** (:mod:`bench_qat_step`): float step, qjax step (the model under
   ``qjax.flax.linen.intercept``) and Qwix's QAT step (``qwix.QtProvider``) on the digits
   CNN and an MLP 512-1024-1024-16 at batch 128, run in turn; ratios against the float
   step (target <= 1.15x) and against Qwix (target <= 1.0x).
4. **Inference matmul.** ``[1024, 4096] @ [4096, 4096]`` in float32 against

   * int8 x int8 -> int32 (``jax.lax.dot_general(..., preferred_element_type=jnp.int32)``
     on qjax int8 codes, then rescaled by the per-token activation scale and the
     per-channel weight scale), both with the activation quantized inside the jitted
     function (dynamic) and with pre-quantized codes (the dot and rescale alone);
   * weight-only int4: ``qjax.dequantize`` of a packed int4 ``per_block(-2, 128)``
     QArray inside the jitted matmul (dequant on the fly), then a float32 matmul.

   All variants run alternately; prints medians and ratios against float.

Run it with::

    python benchmarks/run.py [--repeats N] [--skip-tree] [--skip-qat] [--skip-matmul]

(about 1.5 minutes on a 2-core CPU). ``benchmarks/gpu.py`` is the GPU counterpart.

Qwix is optional (``pip install qwix``; the project may carry it as an extra,
``bench = ["qwix"]`` under ``[project.optional-dependencies]``); without it the Qwix
columns show ``-``. Qwix calls used, with ``x`` the float32 array (axis 0 = rows, the
blocked axis -2; axis 1 = the channel axis -1)::

    qwix.quantize(x, jnp.int8)                                   # per tensor
    qwix.quantize(x, jnp.int8, channelwise_axes=(1,))            # per channel (axis -1)
    qwix.quantize(x, jnp.int4, channelwise_axes=(1,), tiled_axes={0: B})  # per block
    qwix.quantize(x, jnp.float8_e4m3fn)                          # per tensor float8
    qwix.quantize(x, "mxfp4", channelwise_axes=(0,), tiled_axes={1: 32})
    qwix.quantize(x, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128},
                  calibration_method="minmax")                   # asymmetric int4

Qwix stores int4 unpacked (``jnp.int4``, one value per byte on CPU) and has no uint4 for
asymmetric quantization (only int8 / int4, with a zero point), so the asymmetric row
compares qjax's uint4 minval with Qwix's asymmetric int4 zero-point formulation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import bench_qat_step
import bench_tree_ptq
import memory_env
import qjax
from memory_env import describe, xla_copy

try:
    import qwix
except ImportError:  # optional: pip install qwix
    qwix = None

SIZE = 4096
TOKENS = 1024

# (row name, qjax spec, Qwix quantize kwargs or None, targets)
# targets: (max ratio qjax / copy or None, max ratio qjax / Qwix or None)
CASES: list[tuple[str, qjax.QuantSpec, dict | None, tuple[float | None, float | None]]] = [
    ("per-tensor int8", qjax.QuantSpec("int8"), {"qtype": jnp.int8}, (None, None)),
    (
        "per-channel int8 (axis -1)",
        qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)),
        {"qtype": jnp.int8, "channelwise_axes": (1,)},
        (2.0, None),
    ),
    (
        "per-block(32) int4 packed",
        qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32)),
        {"qtype": jnp.int4, "channelwise_axes": (1,), "tiled_axes": {0: 32}},
        (1.5, 0.2),
    ),
    (
        "per-block(128) int4 packed",
        qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 128)),
        {"qtype": jnp.int4, "channelwise_axes": (1,), "tiled_axes": {0: 128}},
        (1.5, 0.2),
    ),
    (
        "per-tensor float8_e4m3fn",
        qjax.QuantSpec("float8_e4m3fn"),
        {"qtype": jnp.float8_e4m3fn},
        (2.5, None),
    ),
    (
        "per-tensor float8_e5m2",
        qjax.QuantSpec("float8_e5m2"),
        {"qtype": jnp.float8_e5m2},
        (2.5, None),
    ),
    (
        "mxfp4",
        qjax.QuantSpec("mxfp4"),
        {"qtype": "mxfp4", "channelwise_axes": (0,), "tiled_axes": {1: 32}},
        (None, None),
    ),
    ("nvfp4", qjax.QuantSpec("nvfp4"), None, (None, None)),
    (
        "asym uint4 minval block(128)",
        qjax.QuantSpec(
            "uint4",
            scheme="asymmetric",
            formulation="minval",
            granularity=qjax.per_block(-2, 128),
        ),
        {
            "qtype": jnp.int4,
            "channelwise_axes": (1,),
            "tiled_axes": {0: 128},
            "calibration_method": "minmax",
        },
        (None, None),
    ),
]


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each callable, run once each in turn ``repeats`` times.

    Each callable is run once first (compile, warm up); the timed runs then alternate
    between them so that machine noise hits all alike.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            ts.append(_seconds(fn))
    return [statistics.median(ts) for ts in times]


def _ratio_cell(ratio: float | None, target: float | None) -> str:
    if ratio is None:
        return "-"
    cell = f"{ratio:.2f}x"
    if target is not None:
        cell += f" (<={target:g}x {'ok' if ratio <= target else 'MISSED'})"
    return cell


def bench_quantize(repeats: int, use_qwix: bool) -> None:
    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((SIZE, SIZE), dtype=np.float32)
    x_dev = jax.block_until_ready(jnp.asarray(x_host))

    print(f"## 1. Quantize: {SIZE}x{SIZE} float32, median of {repeats} interleaved runs\n")
    print(
        f"{describe()}\n\n"
        "| spec | qjax ms | copy ms | Qwix ms | qjax/copy (target) | qjax/XLA copy "
        "| qjax/Qwix (target) |\n"
        "|---|---:|---:|---:|---|---:|---|"
    )
    for name, spec, qwix_kwargs, (copy_target, qwix_target) in CASES:
        quantize = jax.jit(lambda x, spec=spec: qjax.quantize(x, spec))
        fns: list[Callable[[], object]] = [
            lambda quantize=quantize: jax.block_until_ready(quantize(x_dev)),
            lambda: np.copy(x_host),
            lambda: jax.block_until_ready(xla_copy(x_dev)),
        ]
        if use_qwix and qwix_kwargs is not None:
            kwargs = dict(qwix_kwargs)
            qtype = kwargs.pop("qtype")
            qwix_quantize = jax.jit(
                lambda x, qtype=qtype, kwargs=kwargs: qwix.quantize(x, qtype, **kwargs)
            )
            fns.append(
                lambda qwix_quantize=qwix_quantize: jax.block_until_ready(qwix_quantize(x_dev))
            )
        medians = interleaved_medians(fns, repeats)
        q, c, xla = medians[0], medians[1], medians[2]
        w = medians[3] if len(medians) > 3 else None
        qwix_ms = f"{w * 1e3:.2f}" if w is not None else "-"
        print(
            f"| {name} | {q * 1e3:.2f} | {c * 1e3:.2f} | {qwix_ms} "
            f"| {_ratio_cell(q / c, copy_target)} | {q / xla:.2f}x "
            f"| {_ratio_cell(q / w if w else None, qwix_target)} |",
            flush=True,
        )
    print(
        "\nqjax/Qwix target <=0.2x means qjax at least 5x faster than Qwix. The asymmetric "
        "row compares qjax uint4 minval with Qwix int4 minmax (zero point): Qwix has no "
        "asymmetric uint4."
    )


def bench_matmul(repeats: int) -> None:
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (TOKENS, SIZE), jnp.float32)
    w = jax.random.normal(k2, (SIZE, SIZE), jnp.float32)

    act_spec = qjax.QuantSpec("int8", granularity=qjax.per_token())
    w8_spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
    w4_spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 128))
    w8 = jax.block_until_ready(jax.jit(lambda w: qjax.quantize(w, w8_spec))(w))
    w4 = jax.block_until_ready(jax.jit(lambda w: qjax.quantize(w, w4_spec))(w))
    x8 = jax.block_until_ready(jax.jit(lambda x: qjax.quantize(x, act_spec))(x))
    assert w4.packed, "expected qjax's default packed int4 storage"

    dims = (((1,), (0,)), ((), ()))

    def int8_dot(xq: jax.Array, xs: jax.Array, wq: jax.Array, ws: jax.Array) -> jax.Array:
        acc = jax.lax.dot_general(xq, wq, dims, preferred_element_type=jnp.int32)
        # xs: [TOKENS, 1] per-token scales, ws: [1, SIZE] per-channel scales.
        return acc.astype(jnp.float32) * xs * ws

    float_mm = jax.jit(lambda x, w: x @ w)
    int8_static = jax.jit(lambda x8, w8: int8_dot(x8.data, x8.scale, w8.data, w8.scale))

    @jax.jit
    def int8_dynamic(x, w8):
        xq = qjax.quantize(x, act_spec)
        return int8_dot(xq.data, xq.scale, w8.data, w8.scale)

    int4_wo = jax.jit(lambda x, w4: x @ qjax.dequantize(w4))

    variants: list[tuple[str, Callable[[], object]]] = [
        ("float32 x @ w", lambda: jax.block_until_ready(float_mm(x, w))),
        (
            "int8 x int8 -> int32 + rescale (act quantized in jit)",
            lambda: jax.block_until_ready(int8_dynamic(x, w8)),
        ),
        (
            "int8 x int8 -> int32 + rescale (pre-quantized codes)",
            lambda: jax.block_until_ready(int8_static(x8, w8)),
        ),
        (
            "weight-only int4 block(128), dequant in jit",
            lambda: jax.block_until_ready(int4_wo(x, w4)),
        ),
    ]
    medians = interleaved_medians([fn for _, fn in variants], repeats)

    # Sanity: the quantized results should be close to the float one.
    ref = float_mm(x, w)
    errs = [
        None,
        jnp.linalg.norm(int8_dynamic(x, w8) - ref) / jnp.linalg.norm(ref),
        jnp.linalg.norm(int8_static(x8, w8) - ref) / jnp.linalg.norm(ref),
        jnp.linalg.norm(int4_wo(x, w4) - ref) / jnp.linalg.norm(ref),
    ]

    print(
        f"\n## 4. Inference matmul: [{TOKENS}, {SIZE}] @ [{SIZE}, {SIZE}] float32, "
        f"median of {repeats} interleaved runs\n"
    )
    print("| variant | ms | vs float | rel. error |\n|---|---:|---:|---:|")
    base = medians[0]
    for (name, _), m, err in zip(variants, medians, errs, strict=True):
        err_cell = f"{float(err):.4f}" if err is not None else "-"
        print(f"| {name} | {m * 1e3:.1f} | {m / base:.2f}x | {err_cell} |")
    print(
        "\nint8: activations per token (qjax.per_token()), weights per channel "
        "(qjax.per_channel(-1)); int4: qjax.per_block(-2, 128), packed."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per quantize row")
    parser.add_argument(
        "--matmul-repeats", type=int, default=None, help="timed matmul runs (default: --repeats)"
    )
    parser.add_argument("--no-qwix", action="store_true", help="skip Qwix even if installed")
    parser.add_argument("--skip-tree", action="store_true", help="skip the tree PTQ section")
    parser.add_argument("--skip-qat", action="store_true", help="skip the QAT step section")
    parser.add_argument("--skip-matmul", action="store_true", help="skip the matmul section")
    parser.add_argument(
        "--qat-repeats", type=int, default=100, help="timed runs of each QAT step (100)"
    )
    memory_env.add_argument(parser)
    args = parser.parse_args()
    memory_env.apply(args)

    use_qwix = qwix is not None and not args.no_qwix
    qwix_note = f"qwix {qwix.__version__}" if qwix is not None else "qwix not installed"
    dev = jax.devices()[0]
    print(
        f"# qjax benchmarks: jax {jax.__version__}, {qwix_note}, "
        f"device {dev.platform} ({dev.device_kind})\n"
    )
    bench_quantize(args.repeats, use_qwix)
    if not args.skip_tree:
        print("\n## 2. PTQ of a whole scan-stacked tree (qjax.quantize_tree vs Qwix)\n")
        bench_tree_ptq.run(repeats=3, use_qwix=use_qwix)
    if not args.skip_qat:
        print("\n## 3. QAT train step: float vs qjax vs Qwix\n")
        bench_qat_step.run(args.qat_repeats, use_qwix=use_qwix)
    if not args.skip_matmul:
        bench_matmul(args.matmul_repeats or args.repeats)


if __name__ == "__main__":
    main()
