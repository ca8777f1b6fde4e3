"""Benchmark: learned step sizes (LSQ) against plain STE QAT, on the digits CNN and the byte LM.

The protocol of :mod:`qjax.demo.digits`, for int2 and int3 weights (per output channel,
and per tensor) with int8 inputs of every layer (per tensor, dynamic):

1. train the float CNN (:func:`qjax.demo.digits.train`, 1500 Adam steps at 1e-3);
2. **STE QAT**: fine-tune it for ``--qat-steps`` under
   :func:`qjax.flax.linen.intercept` with fixed (min-max) scales: the weight scales
   follow the weights, the gradient passes the rounding straight through;
3. **LSQ**: the same fine-tuning (same steps, Adam learning rate and batches for the
   weights) with ``learn_scale=True`` (``":lsq"``): the weight and input scales are
   parameters, created from the same calibration (an apply with ``mutable=["params"]``)
   and trained with LSQ's gradients (:func:`qjax.lsq.lsq_fake_quant`), by SGD with
   momentum 0.9 at 1e-2, as the paper trains them (its gradient scale is designed for
   SGD; :func:`qjax.lsq.param_labels` splits the optimizer). The column "LSQ, Adam"
   trains them with the weights' Adam instead, for comparison.

Both quantized models are evaluated the same way, as trained: the model under
``intercept`` on the 450 test images. For STE QAT that equals the PTQ'd model
(``fake_quant == dequantize(quantize)``); for LSQ it is the model with its weights
quantized with the learned scales (what :mod:`qjax.flax.serve` serves). The recovered
fraction is ``(LSQ - STE) / (float - STE)``: the share of the accuracy STE QAT still
loses to float that LSQ wins back. Each row is the mean over ``--seeds`` (data split,
initialisation and batches), with the standard error over seeds of the float - STE gap
and of the LSQ - STE gain: with per-channel scales STE QAT sits within a few of the 450
test images of float, so the seeds (each its own split) are what separates a gain from
noise.

The LM rows (``--sections lm``) are :mod:`lsq_lm`'s.

Run: ``python benchmarks/bench_lsq.py`` (``--sections digits lm --seeds 0 1 ... 9
--qat-steps 300``; the ``--lm-...`` options are :mod:`lsq_lm`'s).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lsq_lm
import qjax
from qjax.demo import digits
from qjax.flax import linen as qlinen
from qjax.flax.linen import ActQuant, LayerQuant
from qjax.lsq import param_labels

ACT = ActQuant(qjax.QuantSpec("int8"))
WEIGHTS = {
    "int2 per channel": qjax.QuantSpec("int2", granularity=qjax.per_channel(-1)),
    "int2 per tensor": qjax.QuantSpec("int2"),
    "int3 per channel": qjax.QuantSpec("int3", granularity=qjax.per_channel(-1)),
    "int3 per tensor": qjax.QuantSpec("int3"),
}


def rules(weight: qjax.QuantSpec, learn: bool) -> dict[str, LayerQuant]:
    """Every layer: ``weight`` weights, int8 inputs; learned scales where ``learn``."""
    return {".*": LayerQuant(weight=weight, act=ACT, learn_scale=learn)}


def with_learned_scales(model, variables, lsq_rules, x):
    """The float params plus the learned scales, created from their calibration on ``x``."""
    create = qlinen.intercepted(functools.partial(model.apply, mutable=["params"]), lsq_rules)
    _, new = jax.jit(create)({"params": variables["params"]}, jnp.asarray(x))
    return {"params": new["params"]}


def fine_tune(model, data, seed, fmt, start, steps, lr, scale_optimizer=None):
    """QAT from ``start``: Adam at ``lr`` (the learned scales with ``scale_optimizer``
    where given), the demo's training step and batches; returns the test accuracy."""
    params = start["params"]
    optimizer = optax.adam(lr)
    if scale_optimizer is not None:
        optimizer = optax.multi_transform(
            {"other": optimizer, "lsq": scale_optimizer}, param_labels(params)
        )
    step = digits.make_train_step(model, optimizer, fmt)
    opt_state = optimizer.init(params)
    x, y = data.x_train, data.y_train
    for idx in digits._batches(len(x), 128, steps, seed + 1):
        params, _, opt_state, _ = step(params, None, opt_state, x[idx], y[idx])
    return digits.accuracy(model, {"params": params}, data.x_test, data.y_test, fmt)


def run_seed(seed: int, qat_steps: int, qat_lr: float) -> dict[str, tuple[float, ...]]:
    """``{weights: (float, STE QAT, LSQ, LSQ with Adam) accuracies}`` for one seed."""
    data = digits.load_data(seed)
    model = digits.CNN()
    float_vars = digits.train(model, data, steps=1500, lr=1e-3, seed=seed)
    float_acc = digits.accuracy(model, float_vars, data.x_test, data.y_test)
    tune = functools.partial(fine_tune, model, data, seed, steps=qat_steps, lr=qat_lr)
    out = {}
    for name, weight in WEIGHTS.items():
        ste = tune(rules(weight, False), {"params": float_vars["params"]})
        lsq_rules = rules(weight, True)
        start = with_learned_scales(model, float_vars, lsq_rules, data.x_train[:256])
        lsq = tune(lsq_rules, start, scale_optimizer=optax.sgd(1e-2, momentum=0.9))
        lsq_adam = tune(lsq_rules, start)
        out[name] = (float_acc, ste, lsq, lsq_adam)
    return out


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over seeds (0 for one seed)."""
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se)


def table(per_seed: list[dict], seeds: list[int], qat_steps: int, qat_lr: float) -> str:
    """The README table: means over seeds, the float - STE gap and the LSQ - STE gain with
    their standard errors over seeds (paired: each seed's own split and float model).
    "recovered" is gain / gap; a gap under two standard errors is noise, said so."""
    lines = [
        f"digits CNN, int8 inputs (per tensor, dynamic); QAT {qat_steps} Adam steps at "
        f"{qat_lr:g}; mean over seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} splits of 450 "
        "test images); ± one standard error over seeds",
        "",
        "| weights | float | STE QAT | LSQ | float - STE | LSQ - STE | recovered | LSQ, Adam |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in WEIGHTS:
        rows = 100 * np.array([result[name] for result in per_seed])
        f, ste, lsq, lsq_adam = rows.mean(axis=0)
        gap, gap_se = mean_se(rows[:, 0] - rows[:, 1])
        gain, gain_se = mean_se(rows[:, 2] - rows[:, 1])
        recovered = f"{gain / gap:.0%}" if gap > 0 else "n/a"
        if gap <= 2 * gap_se:
            recovered += " (gap within noise)"
        lines.append(
            f"| {name} | {f:.2f}% | {ste:.2f}% | {lsq:.2f}% | {gap:.2f} ± {gap_se:.2f} | "
            f"{gain:+.2f} ± {gain_se:.2f} | {recovered} | {lsq_adam:.2f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=["digits", "lm"], default=["digits", "lm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--qat-steps", type=int, default=300)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    lsq_lm.add_arguments(parser)
    args = parser.parse_args()
    if "digits" in args.sections:
        start = time.perf_counter()
        per_seed = []
        for seed in args.seeds:
            per_seed.append(run_seed(seed, args.qat_steps, args.qat_lr))
            cells = "; ".join(
                f"{name}: " + "/".join(f"{100 * a:.2f}" for a in accs)
                for name, accs in per_seed[-1].items()
            )
            print(f"seed {seed} (float/STE/LSQ/LSQ Adam): {cells}", flush=True)
        print(table(per_seed, args.seeds, args.qat_steps, args.qat_lr))
        print(f"\ndigits: {time.perf_counter() - start:.0f} s\n", flush=True)
    if "lm" in args.sections:
        start = time.perf_counter()
        setup, seeds = lsq_lm.from_arguments(args)
        print(lsq_lm.markdown(lsq_lm.run(setup, seeds, args.lm_rows), setup, seeds))
        print(f"\nLM: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
