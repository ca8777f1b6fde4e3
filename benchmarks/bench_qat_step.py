"""Benchmark: the jitted QAT training step against the float one, per format.

For two Linen models, the digits CNN of :mod:`qjax.demo.digits` (input [128, 8, 8, 1])
and an MLP 512-1024-1024-16 (input [128, 512]), both at batch 128 on random data, builds
the float training step (Adam, cross-entropy) and, for each format of
:data:`qjax.demo.digits.FORMATS`, the same step with the model run under
:func:`qjax.flax.linen.intercept` inside the jitted function
(:func:`qjax.demo.digits.make_train_step`). The float and the QAT step run alternately,
so that machine noise hits both alike; the table shows the medians, their ratio
QAT / float (judged against the target of at most 1.15x) and the ratio of the fastest
runs, the steadier figure on a shared machine.

Run it with::

    python benchmarks/bench_qat_step.py [--repeats 50] [--models cnn mlp]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
import optax

from qjax.demo import digits
from qjax.flax import linen as qlinen

TARGET = 1.15
"""The QAT step may take at most this many times the float step."""

BATCH = 128


class MLP(nn.Module):
    """Dense 512 → 1024 → relu → 1024 → relu → 16; layers ``fc1``, ``fc2``, ``head``."""

    hidden: tuple[int, ...] = (1024, 1024)
    num_classes: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, features in enumerate(self.hidden):
            x = nn.relu(nn.Dense(features, name=f"fc{i + 1}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


MODELS: dict[str, tuple[nn.Module, tuple[int, ...], int]] = {
    "cnn": (digits.CNN(), (BATCH, 8, 8, 1), 10),
    "mlp": (MLP(), (BATCH, 512), 16),
}
"""name: (model, input shape, number of classes)."""


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _step_inputs(
    model: nn.Module, shape: tuple[int, ...], classes: int, rules: digits.Rules | None
) -> tuple:
    """(params, stats, opt_state, x, y) for one step, stats calibrated where static."""
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    y = rng.integers(0, classes, shape[0]).astype(np.int32)
    variables = digits.init(model, x, seed=0)
    stats = None
    if digits.has_static_ranges(rules):
        stats = digits.calibrate(model, variables, rules, x, batches=1)[qlinen.STATS]
    return variables["params"], stats, optax.adam(1e-3).init(variables["params"]), x, y


def bench(name: str, fmt: digits.Format, repeats: int) -> tuple[float, float, float]:
    """Median seconds of the float and the QAT step of model ``name``, and their min ratio.

    The two steps run alternately. The ratio of the fastest runs is the steadier figure
    on a shared machine, where other load only ever adds time.
    """
    model, shape, classes = MODELS[name]
    optimizer = optax.adam(1e-3)
    float_step = digits.make_train_step(model, optimizer)
    qat_step = digits.make_train_step(model, optimizer, fmt.rules)
    float_args = _step_inputs(model, shape, classes, None)
    qat_args = _step_inputs(model, shape, classes, fmt.rules)
    for _ in range(3):  # compile and warm up
        _seconds(lambda: float_step(*float_args))
        _seconds(lambda: qat_step(*qat_args))
    float_times, qat_times = [], []
    for _ in range(repeats):
        float_times.append(_seconds(lambda: float_step(*float_args)))
        qat_times.append(_seconds(lambda: qat_step(*qat_args)))
    return (
        statistics.median(float_times),
        statistics.median(qat_times),
        min(qat_times) / min(float_times),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--formats", nargs="*", default=[f.name for f in digits.FORMATS], help="FORMATS names"
    )
    args = parser.parse_args(argv)
    formats = [f for f in digits.FORMATS + digits.EXTRA_FORMATS if f.name in args.formats]
    device = jax.devices()[0].device_kind
    print(
        f"jax {jax.__version__} on {device}, batch {BATCH}, "
        f"medians of {args.repeats} alternating runs\n"
    )
    print(
        "| model | format | float step ms | QAT step ms | QAT / float | min / min "
        f"| target <= {TARGET}x |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for name in args.models:
        for fmt in formats:
            float_s, qat_s, min_ratio = bench(name, fmt, args.repeats)
            ratio = qat_s / float_s
            verdict = "met" if ratio <= TARGET else "NOT met"
            print(
                f"| {name} | {fmt.name} | {float_s * 1e3:.2f} | {qat_s * 1e3:.2f} "
                f"| {ratio:.2f}x | {min_ratio:.2f}x | {verdict} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
