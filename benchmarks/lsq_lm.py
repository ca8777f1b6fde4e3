"""Benchmark: learned step sizes (LSQ) against plain STE QAT on the small byte-level LM.

The language model of :mod:`lm_example` (4 pre-LayerNorm blocks, width 256, trained on
the standard library's sources and cached in ``~/.cache/qjax-bench``). Quantized: the
24 projections of the blocks (``query`` / ``key`` / ``value`` / ``out`` / ``up`` /
``down``), int2 or int3 weights and int8 inputs (per tensor, dynamic); the byte
embeddings, position embeddings and output head stay float, as the LSQ paper keeps its
first and last layers at higher precision. Weight granularities: per output channel, and
per block of 64 input values per output channel (group-wise, how 2-4 bit LLM weights are
stored in practice: GPTQ / AWQ groups; a block of 64 gives 4 groups per 256-wide input,
16 for the MLP's 1024-wide ``down``). Per tensor is not an LM's realistic choice.

For each row, from the cached float LM, on the same training batches (seeded by ``seed``):

* **STE QAT**: ``steps`` Adam steps at ``lr`` under :func:`qjax.flax.linen.intercept`
  with fixed (min-max) scales that follow the weights;
* **LSQ**: the same steps, batches, Adam and learning rate for the weights, with
  ``learn_scale=True``: weight and input scales are parameters, created from the same
  calibration and trained with LSQ's gradients. By default they share the weights' Adam
  and learning rate (the LSQ paper trains every parameter with one optimizer and one
  learning rate; the LM is an Adam model). ``scales="sgd"`` trains them as the digits
  rows of :mod:`bench_lsq` do (SGD, momentum 0.9, at ``scale_lr``), ``"adam:scale_lr"``
  on Adam at ``scale_lr``. On this LM, SGD at 1e-2 barely moves the scales: their
  LSQ-scaled gradients are ~5e-5 to 2e-4 (of scales ~0.1), under 1% of a scale in 60 steps.
  ``"weights"``: LSQ on the weight scales only: ``kernel_scale`` / ``kernel_offset`` on
  Adam at ``scale_lr``, the input scales (still parameters, as ``learn_scale=True``
  makes them) frozen at their calibration (``optax.set_to_zero``). ``"weights:relative"``:
  the same with each Adam step multiplied by the scale's magnitude (relative steps, about
  Adam on the log of the scale): a fixed-size Adam step is large next to small scales.

Where the learned weight scales start (``inits``, ``--lm-inits``): ``"minmax"``, the
weight's min-max params (what STE QAT uses), or ``"mse"``, :func:`qjax.calibrate`'s
MSE-optimal clipping (``LayerQuant(calibration=qjax.Calibration("mse"))``, shorthand
``"int2:per_channel:mse:lsq"``). At 2 and 3 bits min-max scales clip nothing, so the
largest weights set the step and most weights share the few levels near zero, and 60
steps of LSQ barely move them; from the MSE start, LSQ keeps the better
grid and trains it.

``scales`` and ``inits`` may name several: each pair is its own LSQ column, from the same
STE run.

Both are evaluated the same way, as trained (the model under ``intercept``), on the
held-out windows of :func:`lm_example.eval_windows` (256 windows of 128 predicted bytes
from files never seen in training): next-byte loss (bits per byte in the table) and
top-1 accuracy. "recovered" is ``(STE loss - LSQ loss) / (STE loss - float loss)``.
``--lm-eval validation`` evaluates instead on 256 evenly spaced windows of the
*training* files (:func:`validation_windows`), never the test windows: for choosing
``scale_lr``. The float LM was pretrained on those files, so its validation loss is
lower than on the test windows; a window may overlap one of the fine-tuning batches'
random windows (480 of 129 bytes in a 10 MB corpus: ~1% of windows).

Run: ``python benchmarks/bench_lsq.py --sections lm`` (or ``python benchmarks/lsq_lm.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax
from qjax.flax import linen as qlinen
from qjax.flax.linen import ActQuant, LayerQuant
from qjax.lsq import param_labels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_example

LAYERS = r"block_\d+/(query|key|value|out|up|down)"
ACT = ActQuant(qjax.QuantSpec("int8"))
WEIGHTS = {
    "int2 per channel": qjax.QuantSpec("int2", granularity=qjax.per_channel(-1)),
    "int2 per block 64": qjax.QuantSpec("int2", granularity=qjax.per_block(-2, 64)),
    "int3 per channel": qjax.QuantSpec("int3", granularity=qjax.per_channel(-1)),
    "int3 per block 64": qjax.QuantSpec("int3", granularity=qjax.per_block(-2, 64)),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """The fine-tuning run, the same for STE QAT and LSQ (``scales``: see :func:`optimizer`;
    ``inits``: where the learned weight scales start, see :func:`rules`). Each pair of a
    ``scales`` and an ``inits`` entry is one LSQ column."""

    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-4
    scales: tuple[str, ...] = ("adam",)
    scale_lr: float = 1e-3
    inits: tuple[str, ...] = ("minmax", "mse")
    eval_windows: int = 256
    eval_split: str = "test"


INITS = {
    "minmax": "min-max start",
    "mse": "MSE-calibrated start",
}
"""Where the learned weight scales start: ``LayerQuant.calibration`` (None for min-max)."""


def rules(weight: qjax.QuantSpec, learn: bool, init: str = "minmax") -> dict[str, LayerQuant]:
    """The blocks' projections: ``weight`` weights, int8 inputs; learned scales where
    ``learn``, the weight's starting from ``init`` (a key of :data:`INITS`)."""
    calibration = None if init == "minmax" else qjax.Calibration(init)
    return {LAYERS: LayerQuant(weight=weight, act=ACT, learn_scale=learn, calibration=calibration)}


def train_batches(steps: int, batch_size: int, context: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` batches of ``context + 1`` training bytes, int32, from ``seed``."""
    text = lm_example.corpus("train")
    rng = np.random.default_rng(1000 + seed)
    for _ in range(steps):
        starts = rng.integers(0, len(text) - context - 1, batch_size)
        yield np.stack([text[s : s + context + 1] for s in starts]).astype(np.int32)


def validation_windows(context: int, n: int = 256) -> np.ndarray:
    """``n`` evenly spaced windows of ``context + 1`` *training* bytes, int32: for choosing
    hyperparameters without looking at :func:`lm_example.eval_windows`."""
    text = lm_example.corpus("train")
    starts = np.linspace(0, len(text) - context - 1, n).astype(np.int64)
    return np.stack([text[s : s + context + 1] for s in starts]).astype(np.int32)


@functools.cache
def _apply(model: Any, quant: tuple | None) -> Callable:
    """``model.apply`` under ``dict(quant)`` (float where None)."""
    return model.apply if quant is None else qlinen.intercepted(model.apply, dict(quant))


def _key(quant_rules: dict[str, LayerQuant] | None) -> tuple | None:
    return None if quant_rules is None else tuple(quant_rules.items())


@functools.cache
def _eval_step(model: Any, quant: tuple | None) -> Callable:
    apply = _apply(model, quant)

    @jax.jit
    def step(variables: Any, windows: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = apply(variables, windows[:, :-1])
        targets = windows[:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return nll.sum(), (jnp.argmax(logits, -1) == targets).sum()

    return step


def evaluate(model: Any, variables: Any, quant_rules: Any, windows: np.ndarray) -> tuple:
    """``(loss in nats per byte, top-1 accuracy)`` on held-out ``windows``, under the rules."""
    step = _eval_step(model, _key(quant_rules))
    loss = correct = 0.0
    for i in range(0, len(windows), 64):
        total, right = step(variables, windows[i : i + 64])
        loss, correct = loss + float(total), correct + float(right)
    n = windows.shape[0] * (windows.shape[1] - 1)
    return loss / n, correct / n


def with_learned_scales(model: Any, params: Any, lsq_rules: Any, batch: np.ndarray) -> Any:
    """``params`` plus the learned scales, created from their calibration on ``batch``."""
    create = qlinen.intercepted(functools.partial(model.apply, mutable=["params"]), lsq_rules)
    _, new = jax.jit(create)({"params": params}, jnp.asarray(batch[:, :-1]))
    return new["params"]


def weight_scale_labels(params: Any) -> Any:
    """:func:`qjax.lsq.param_labels` with the learned *input* scales and offsets relabelled
    ``"frozen"``: ``"lsq"`` (weight scales), ``"frozen"`` or ``"other"`` per leaf."""

    def label(path: tuple, lsq_label: str) -> str:
        name = getattr(path[-1], "key", None)
        return "frozen" if lsq_label == "lsq" and str(name).startswith("input_") else lsq_label

    return jax.tree_util.tree_map_with_path(label, param_labels(params))


def relative_steps() -> optax.GradientTransformation:
    """Multiplies each update by its parameter's magnitude."""

    def update(updates: Any, state: Any, params: Any) -> tuple[Any, Any]:
        return jax.tree.map(lambda u, p: u * jnp.abs(p), updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def optimizer(setup: Setup, scales: str, params: Any) -> optax.GradientTransformation:
    """Adam at ``setup.lr`` for the weights; learned scales (if any) on Adam at the same
    learning rate (``scales="adam"``), on Adam at ``setup.scale_lr`` (``"adam:scale_lr"``),
    on SGD with momentum 0.9 at ``setup.scale_lr`` (``"sgd"``), or the weight scales on
    Adam at ``setup.scale_lr`` and the input scales frozen (``"weights"``; in relative
    steps: ``"weights:relative"``)."""
    if scales not in SCALES:
        raise ValueError(f"scales must be one of {sorted(SCALES)}, got {scales!r}")
    if scales == "adam":
        return optax.adam(setup.lr)
    transforms = {"other": optax.adam(setup.lr)}
    labels = param_labels(params)
    if scales == "adam:scale_lr":
        transforms["lsq"] = optax.adam(setup.scale_lr)
    elif scales == "sgd":
        transforms["lsq"] = optax.sgd(setup.scale_lr, momentum=0.9)
    else:
        scale_tx = optax.adam(setup.scale_lr)
        if scales == "weights:relative":
            scale_tx = optax.chain(scale_tx, relative_steps())
        transforms |= {"lsq": scale_tx, "frozen": optax.set_to_zero()}
        labels = weight_scale_labels(params)
    return optax.multi_transform(transforms, labels)


@functools.cache
def _train_step(model: Any, quant: tuple, tx: optax.GradientTransformation) -> Callable:
    apply = _apply(model, quant)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Any, state: Any, batch: jax.Array) -> tuple:
        def loss_fn(p: Any) -> jax.Array:
            return lm_example.nll(apply({"params": p}, batch[:, :-1]), batch[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
            updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def fine_tune(
    model: Any, params: Any, quant_rules: Any, setup: Setup, seed: int, scales: str = "adam"
) -> Any:
    """``setup.steps`` of QAT from ``params`` on the batches of ``seed``, learned scales
    (if any) trained as ``scales`` says (:func:`optimizer`); the trained params."""
    tx = _optimizer(setup, scales, jax.tree.structure(params))
    step = _train_step(model, _key(quant_rules), tx)
    params = jax.tree.map(jnp.array, params)  # a copy: the step donates its buffers
    state = tx.init(params)
    context = lm_example.DEFAULT.context
    for batch in train_batches(setup.steps, setup.batch_size, context, seed):
        params, state, _ = step(params, state, batch)
    return jax.block_until_ready(params)


@functools.cache
def _optimizer(setup: Setup, scales: str, structure: Any) -> optax.GradientTransformation:
    """One optimizer object per setup and tree structure, so the jitted steps are reused."""
    return optimizer(setup, scales, jax.tree.unflatten(structure, range(structure.num_leaves)))


def run(
    setup: Setup,
    seeds: list[int],
    rows: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """``{"float": (loss, acc), row: [(PTQ, STE, LSQ...) per seed, each (loss, acc)]}``
    for ``rows`` (keys of :data:`WEIGHTS`, default all): one LSQ per ``setup.scales``."""
    config = lm_example.DEFAULT
    model = lm_example.make_model(config)
    params = lm_example.load_or_train(config, log=log)["params"]
    if setup.eval_split not in ("test", "validation"):
        raise ValueError(f"eval_split must be 'test' or 'validation', got {setup.eval_split!r}")
    pick = lm_example.eval_windows if setup.eval_split == "test" else validation_windows
    windows = pick(config.context, setup.eval_windows)
    out: dict[str, Any] = {"float": evaluate(model, {"params": params}, None, windows)}
    calib = next(train_batches(1, setup.batch_size, config.context, seed=-1))
    for name in rows or list(WEIGHTS):
        weight = WEIGHTS[name]
        ste_rules = rules(weight, False)
        ptq = evaluate(model, {"params": params}, ste_rules, windows)
        lsq_rules = {init: rules(weight, True, init) for init in setup.inits}
        lsq_starts = {
            init: with_learned_scales(model, params, lsq_rules[init], calib) for init in setup.inits
        }
        out[name] = []
        for seed in seeds:
            start = time.perf_counter()
            ste = fine_tune(model, params, ste_rules, setup, seed)
            ste_eval = evaluate(model, {"params": ste}, ste_rules, windows)
            lsq_evals = []
            for scales, init in lsq_columns(setup):
                lsq = fine_tune(model, lsq_starts[init], lsq_rules[init], setup, seed, scales)
                lsq_evals.append(evaluate(model, {"params": lsq}, lsq_rules[init], windows))
            out[name].append((ptq, ste_eval, *lsq_evals))
            log(
                f"{name}, seed {seed} ({setup.eval_split}, nats/byte, top-1): float "
                f"{out['float']}, PTQ {ptq}, STE {ste_eval}, LSQ {lsq_columns(setup)} {lsq_evals} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    return out


def lsq_columns(setup: Setup) -> list[tuple[str, str]]:
    """The ``(scales, init)`` of each LSQ column, in table order."""
    return [(scales, init) for init in setup.inits for scales in setup.scales]


SCALES = {
    "adam": "all scales on the same Adam",
    "adam:scale_lr": "all scales on Adam at {1:g}",
    "sgd": "all scales on SGD (momentum 0.9) at {1:g}",
    "weights": "weight scales on Adam at {1:g}, input scales frozen at calibration",
    "weights:relative": "weight scales on Adam at {1:g} in relative steps, input scales frozen",
}


def markdown(results: dict, setup: Setup, seeds: list[int]) -> str:
    """The README table: mean over seeds, the spread (min-max) of the recovered share."""
    float_loss, float_acc = results["float"]
    pairs = lsq_columns(setup)
    columns = [f"LSQ {i + 1}" if len(pairs) > 1 else "LSQ" for i in range(len(pairs))]
    kinds = "; ".join(
        f"{column}: {SCALES[scales].format(setup.lr, setup.scale_lr)}, {INITS[init]}"
        for column, (scales, init) in zip(columns, pairs, strict=True)
    )
    split = "held-out" if setup.eval_split == "test" else "VALIDATION (training files)"
    lines = [
        f"byte LM ({lm_example.DEFAULT.n_layers} blocks, width {lm_example.DEFAULT.d_model}), "
        f"int8 inputs (per tensor, dynamic); QAT {setup.steps} steps of {setup.batch_size} x "
        f"{lm_example.DEFAULT.context} bytes, weights on Adam at {setup.lr:g}; learned "
        f"scales ({kinds}); mean over seeds {seeds}; {split} loss in bits per byte "
        "(top-1 accuracy)",
        "",
        "| weights | float | PTQ | STE QAT | "
        + " | ".join(columns)
        + " | "
        + " | ".join(f"{column} recovered (per seed)" for column in columns)
        + " |",
        "|---|" + "---:|" * (3 + 2 * len(columns)),
    ]
    bits = 1 / math.log(2)
    for name in (name for name in WEIGHTS if name in results):
        rows = np.array(results[name])  # [seed, (ptq, ste, lsq...), (loss, acc)]
        mean = rows.mean(axis=0)
        cells = [f"{bits * loss:.3f} ({acc:.1%})" for loss, acc in mean]
        for lsq in range(2, rows.shape[1]):
            per_seed = (rows[:, 1, 0] - rows[:, lsq, 0]) / (rows[:, 1, 0] - float_loss)
            recovered = (mean[1, 0] - mean[lsq, 0]) / (mean[1, 0] - float_loss)
            cells.append(f"{recovered:.0%} ({', '.join(f'{r:.0%}' for r in per_seed)})")
        lines.append(
            f"| {name} | {bits * float_loss:.3f} ({float_acc:.1%}) | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    setup, seeds = from_arguments(args)
    print(markdown(run(setup, seeds, args.lm_rows), setup, seeds))
    print(f"\n{time.perf_counter() - start:.0f} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The LM section's options (``--lm-...``), shared with :mod:`bench_lsq`."""
    default = Setup()
    parser.add_argument("--lm-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lm-steps", type=int, default=default.steps)
    parser.add_argument("--lm-batch", type=int, default=default.batch_size)
    parser.add_argument("--lm-lr", type=float, default=default.lr)
    parser.add_argument(
        "--lm-scales", nargs="+", choices=sorted(SCALES), default=list(default.scales)
    )
    parser.add_argument("--lm-scale-lr", type=float, default=default.scale_lr)
    parser.add_argument("--lm-inits", nargs="+", choices=sorted(INITS), default=list(default.inits))
    parser.add_argument("--lm-rows", nargs="+", choices=list(WEIGHTS), default=list(WEIGHTS))
    parser.add_argument("--lm-eval", choices=["test", "validation"], default=default.eval_split)


def from_arguments(args: argparse.Namespace) -> tuple[Setup, list[int]]:
    setup = Setup(
        args.lm_steps,
        args.lm_batch,
        args.lm_lr,
        tuple(args.lm_scales),
        args.lm_scale_lr,
        tuple(args.lm_inits),
        eval_split=args.lm_eval,
    )
    return setup, args.lm_seeds


if __name__ == "__main__":
    main()
