"""Benchmark: the jitted QAT training step of qjax against the float one and Qwix's.

For two Linen models, the digits CNN of :mod:`qjax.demo.digits` (input [128, 8, 8, 1])
and an MLP 512-1024-1024-16 (input [128, 512]), both at batch 128 on random data, builds
three jitted training steps (Adam 1e-3, softmax cross-entropy, the same batch and the
same initial parameters) for each format of :data:`qjax.demo.digits.FORMATS`:

* **float**: the plain model (:func:`qjax.demo.digits.make_train_step` without rules);
* **qjax**: the model run under :func:`qjax.flax.linen.intercept` inside the jitted
  function (:func:`qjax.demo.digits.make_train_step` with the format's rules; in int8
  the Dense layers add ``integer_dot=True``, an int8 x int8 -> int32 forward dot, as
  Qwix's int8 QAT runs, see :func:`qjax_rules`); static activation ranges are first
  calibrated on the batch;
* **Qwix** (when ``qwix`` is importable and ``--no-qwix`` is not given): the model
  returned by ``qwix.quantize_model(model, qwix.QtProvider(rules))``, Qwix's
  quantized training (QT, i.e. QAT), in a step built exactly like qjax's; Qwix's static
  activation ranges (its ``quant_stats`` collection) are likewise first set from the
  batch. The rules are in :func:`qwix_config`, the closest Qwix 0.1.8 has to each qjax
  format::

      int8 (per-channel int8 weights; int8 inputs, per tensor, static ranges):
        QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8,
               act_static_scale=True,
               additional_qt_config={"lhs_disable_channelwise_axes": True})
        CNN: conv1|conv2 first get the same rule with act_static_scale=False (see below)
      int4 (int4 weights, blocks of 16 along the input axis; convs per output channel):
        QtRule(module_path="conv1|conv2", weight_qtype=jnp.int4)        # CNN only
        QtRule(module_path=".*", weight_qtype=jnp.int4, tile_size=16)
      float8_e4m3fn (per-channel weights; inputs per tensor, dynamic):
        QtRule(module_path=".*", weight_qtype=jnp.float8_e4m3fn,
               act_qtype=jnp.float8_e4m3fn, act_static_scale=False,
               additional_qt_config={"lhs_disable_channelwise_axes": True})
      mxfp4 (weights only; conv1 and head float):
        QtRule(module_path="conv1|head")                                 # kept float
        QtRule(module_path=".*", weight_qtype="mxfp4", tile_size=32)     # MLP only

  Qwix quantizes a weight per channel of every non-contracted axis and tiles the last
  contracted axis by ``tile_size`` (the input axis of a Dense kernel), so int8, int4
  and float8 weights match qjax's layout exactly (conv2's int4 block (3, 3, 16, 1)
  is one per output channel). Qwix scales a Dense input per row (token) unless
  ``lhs_disable_channelwise_axes`` is set through ``additional_qt_config`` (which Qwix
  applies to ``dot_general`` only), and scales a conv input per batch element, with no
  per-tensor option short of ``disable_channelwise_axes``, which makes the conv weights
  per tensor too. Where Qwix cannot match a format, the row says so below the table:

  - CNN int8: Qwix 0.1.8's static-range conv QAT fails (its ``quant_stats`` update runs
    inside the conv's ``custom_vjp`` and leaks a tracer), so conv1 and conv2 quantize
    their inputs dynamically, per batch element;
  - CNN float8: conv inputs per batch element (see above);
  - CNN mxfp4: no Qwix number (``-``): Qwix's conv QAT refuses ``tile_size`` and mxfp4
    needs tiles of 32, so conv2 cannot be mxfp4;
  - MLP mxfp4: Qwix's 32-blocks run along the input (contracted) axis of each kernel,
    the OCP MX layout for a matmul; qjax's ``mxfp4`` preset runs them along the
    kernel's last (output) axis (``mxfp4:axis=-2`` would match Qwix). Same block size
    and number of scales.

  Static ranges: qjax keeps an exponential moving average of each batch's range
  (momentum 0.9), Qwix a running mean of each batch's absmax; both update every step.
  In the forward pass Qwix multiplies int8 by int8 codes into int32 where both operands
  are quantized with unblocked contractions (the Dense layers in int8), as qjax does
  with ``integer_dot=True`` (:func:`qjax_rules`). Qwix's backward pass (no
  ``bwd_qtype``) multiplies the unquantized operands, so it never materialises
  fake-quantized weights; qjax's straight-through backward multiplies the
  fake-quantized ones, as fake-quant QAT does (torchao), which costs a pass or two over
  each weight per step.

The three steps run in turn, ``repeats`` times, so that machine noise hits them alike;
each run times one call from the same inputs (to ``block_until_ready``). The table
shows the medians, qjax / float (judged against the target of at most 1.15x), the ratio
of the fastest runs (min / min, the steadier figure on a shared machine, where other
load only ever adds time), Qwix / float and qjax / Qwix (target: at most 1.0, qjax no
slower than Qwix), by median and by min / min.

Before timing, each Qwix model is checked to really quantize: its logits on the batch
must differ from the float model's (same parameters) by a relative L2 error in
(0, 0.5), and its loss must fall over 5 steps on the batch. Both are printed below the
table.

Run it with::

    python benchmarks/bench_qat_step.py [--repeats 200] [--models cnn mlp]
        [--formats int8 int4 float8_e4m3fn mxfp4] [--no-qwix]

(about a minute on 2 CPU cores, most of it compiling)

or call :func:`run` (e.g. from ``benchmarks/run.py``). Qwix is optional (``pip install
qwix``); without it the Qwix columns show ``-``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qjax.demo import digits
from qjax.flax import linen as qlinen

try:
    import qwix
except ImportError:  # optional: pip install qwix
    qwix = None

TARGET = 1.15
"""The qjax QAT step may take at most this many times the float step."""

QWIX_TARGET = 1.0
"""The qjax QAT step may take at most this many times Qwix's QAT step."""

BATCH = 128
LR = 1e-3
DEFAULT_REPEATS = 200
SANITY_STEPS = 5
QWIX_STATS = "quant_stats"
"""The Flax collection of Qwix's static activation ranges."""


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

CONV_LAYERS = {"cnn": "conv1|conv2", "mlp": None}
"""The regex of each model's conv layers (None: it has none)."""


@dataclasses.dataclass(frozen=True)
class QwixConfig:
    """Qwix's rules for one qjax format and model (None: Qwix cannot express it)."""

    rules: tuple[Any, ...] | None
    note: str = ""
    """How it departs from qjax's format; empty where it matches."""


def qjax_rules(fmt: digits.Format, model_name: str) -> digits.Rules:
    """qjax's rules for ``fmt``: int8 Dense layers run their forward dot on int8 codes
    (``LayerQuant(integer_dot=True)``), as Qwix's int8 QAT does; convolutions do not. A
    rule for the CNN's first conv alone is left out for the MLP (it would match nothing,
    and qjax would warn so)."""
    convs = CONV_LAYERS[model_name]
    if fmt.name != "int8":
        if convs is None:
            return {k: v for k, v in fmt.rules.items() if k != "conv1"}
        return fmt.rules
    (quant,) = fmt.rules.values()
    integer = dataclasses.replace(quant, integer_dot=True)
    return {".*": integer} if convs is None else {convs: quant, ".*": integer}


def qwix_config(fmt_name: str, model_name: str) -> QwixConfig:
    """The Qwix QAT rules closest to qjax's format ``fmt_name`` for model ``model_name``.

    See the module docstring for how each departs from qjax's format.
    """
    if qwix is None:
        raise RuntimeError("qwix is not installed")
    convs = CONV_LAYERS[model_name]
    per_tensor_input = {"additional_qt_config": {"lhs_disable_channelwise_axes": True}}
    if fmt_name == "int8":
        q8 = {"weight_qtype": jnp.int8, "act_qtype": jnp.int8}
        rules = [qwix.QtRule(module_path=".*", act_static_scale=True, **q8, **per_tensor_input)]
        if convs is None:
            return QwixConfig(tuple(rules))
        conv = qwix.QtRule(module_path=convs, act_static_scale=False, **q8)
        return QwixConfig(
            (conv, *rules),
            "conv inputs dynamic, one scale per batch element: Qwix 0.1.8's static-range "
            "conv QAT leaks a tracer (its quant_stats update runs inside the conv's "
            "custom_vjp)",
        )
    if fmt_name == "int4":
        rules = [qwix.QtRule(module_path=".*", weight_qtype=jnp.int4, tile_size=16)]
        if convs is not None:  # Qwix tiles no conv; conv2's block (3, 3, 16, 1) is per channel
            rules.insert(0, qwix.QtRule(module_path=convs, weight_qtype=jnp.int4))
        return QwixConfig(tuple(rules))
    if fmt_name == "float8_e4m3fn":
        f8 = jnp.float8_e4m3fn
        rule = qwix.QtRule(
            module_path=".*",
            weight_qtype=f8,
            act_qtype=f8,
            act_static_scale=False,
            **per_tensor_input,
        )
        note = "" if convs is None else "conv inputs with one scale per batch element"
        return QwixConfig((rule,), note)
    if fmt_name == "mxfp4":
        if convs is not None:
            return QwixConfig(
                None,
                "Qwix's conv QAT refuses tile_size and mxfp4 needs tiles of 32, so conv2 "
                "cannot be mxfp4",
            )
        rules = (
            qwix.QtRule(module_path="conv1|head"),  # kept float, as in qjax's format
            qwix.QtRule(module_path=".*", weight_qtype="mxfp4", tile_size=32),
        )
        return QwixConfig(
            rules,
            "32-blocks along each kernel's input (contracted) axis, qjax's mxfp4 preset "
            "along its last (output) axis",
        )
    return QwixConfig(None, f"no Qwix equivalent set up for format {fmt_name!r}")


def describe_rule(rule: Any) -> str:
    """``QtRule(...)`` with only the fields that differ from their defaults."""
    default = type(rule)()
    parts = []
    for field in dataclasses.fields(rule):
        value = getattr(rule, field.name)
        if field.name == "module_path" or value != getattr(default, field.name):
            shown = getattr(value, "__name__", None) if isinstance(value, type) else None
            parts.append(f"{field.name}={f'jnp.{shown}' if shown else repr(value)}")
    return f"QtRule({', '.join(parts)})"


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _data(shape: tuple[int, ...], classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    y = rng.integers(0, classes, shape[0]).astype(np.int32)
    return x, y


def _step_inputs(
    model: nn.Module, shape: tuple[int, ...], classes: int, rules: digits.Rules | None
) -> tuple:
    """(params, stats, opt_state, x, y) for one step, stats calibrated where static."""
    x, y = _data(shape, classes)
    variables = digits.init(model, x, seed=0)
    stats = None
    if digits.has_static_ranges(rules):
        stats = digits.calibrate(model, variables, rules, x, batches=1)[qlinen.STATS]
    return variables["params"], stats, optax.adam(LR).init(variables["params"]), x, y


def make_qwix_train_step(qwix_model: nn.Module, optimizer: optax.GradientTransformation):
    """:func:`qjax.demo.digits.make_train_step` for a ``qwix.quantize_model`` model.

    The same jitted ``step(params, stats, opt_state, x, y) -> (params, stats, opt_state,
    loss)``; ``stats`` is Qwix's ``quant_stats`` collection (static activation ranges,
    updated at every step), else None.
    """

    def loss_fn(params: Any, stats: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        if stats is None:
            logits = qwix_model.apply({"params": params}, x)
        else:
            variables = {"params": params, QWIX_STATS: stats}
            logits, updates = qwix_model.apply(variables, x, mutable=[QWIX_STATS])
            stats = updates[QWIX_STATS]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

    @jax.jit
    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple:
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        with jax.numpy_dtype_promotion("standard"):  # as digits.make_train_step
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


@dataclasses.dataclass
class QwixStep:
    """A Qwix QAT step with its inputs, checked to quantize."""

    step: Callable
    args: tuple
    rel_error: float
    """Relative L2 distance of Qwix's logits from the float model's."""
    losses: list[float]
    """The loss over :data:`SANITY_STEPS` steps on the batch."""


def build_qwix_step(
    model: nn.Module, config: QwixConfig, float_args: tuple, float_logits: jax.Array
) -> QwixStep:
    """Qwix's QAT step for ``model``, its inputs (static ranges set from the batch), checked.

    Raises:
      AssertionError: where Qwix's model does not quantize (logits equal to the float
        ones, or far from them), leaves a rule unused, or its loss does not fall.
    """
    params, _, opt_state, x, y = float_args
    provider = qwix.QtProvider(list(config.rules))
    qwix_model = qwix.quantize_model(model, provider)
    step = make_qwix_train_step(qwix_model, optax.adam(LR))
    shapes = jax.eval_shape(qwix_model.init, jax.random.key(0), x[:1])
    stats = None
    if QWIX_STATS in shapes:
        # Qwix's moving average starts at zero with a count of 0 (uncalibrated); one
        # step on the batch sets the ranges from it, as digits.calibrate does for qjax.
        stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[QWIX_STATS])
        _, stats, _, _ = step(params, stats, opt_state, x, y)
    unused = provider.get_unused_rules()
    assert not unused, f"Qwix rules matched no layer: {unused}"
    variables = {"params": params} if stats is None else {"params": params, QWIX_STATS: stats}
    logits = jax.jit(qwix_model.apply)(variables, x)
    rel_error = float(jnp.linalg.norm(logits - float_logits) / jnp.linalg.norm(float_logits))
    assert 0 < rel_error < 0.5, f"Qwix logits vs float: relative error {rel_error}"
    state = (params, stats, opt_state)
    losses = []
    for _ in range(SANITY_STEPS):
        *state, loss = step(*state, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0], f"Qwix QAT loss does not fall: {losses}"
    return QwixStep(step, (params, stats, opt_state, x, y), rel_error, losses)


@dataclasses.dataclass
class Result:
    """Seconds of each run of the three steps (``qwix`` None where not run)."""

    float: list[float]
    qjax: list[float]
    qwix: list[float] | None


def bench(
    float_step: Callable,
    float_args: tuple,
    qat_step: Callable,
    qat_args: tuple,
    qwix_step: QwixStep | None,
    repeats: int,
) -> Result:
    """Times the float, qjax and Qwix steps in turn, ``repeats`` runs each after warm-up."""
    fns = [lambda: float_step(*float_args), lambda: qat_step(*qat_args)]
    if qwix_step is not None:
        fns.append(lambda: qwix_step.step(*qwix_step.args))
    for _ in range(3):  # compile and warm up
        for fn in fns:
            _seconds(fn)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            ts.append(_seconds(fn))
    return Result(times[0], times[1], times[2] if qwix_step is not None else None)


def _cell(ratio: float | None, target: float | None = None) -> str:
    if ratio is None:
        return "-"
    cell = f"{ratio:.2f}x"
    if target is not None:
        cell += " met" if ratio <= target else " NOT met"
    return cell


def run(
    repeats: int = DEFAULT_REPEATS,
    models: Sequence[str] = ("cnn", "mlp"),
    use_qwix: bool = True,
    formats: Sequence[str] | None = None,
) -> None:
    """Prints the table of float, qjax and Qwix QAT step times, and the Qwix checks.

    Args:
      repeats: timed runs of each step per row.
      models: names from :data:`MODELS`.
      use_qwix: also time Qwix's QAT step, where qwix is importable.
      formats: names from :data:`qjax.demo.digits.FORMATS` (or ``EXTRA_FORMATS``);
        default: all of ``FORMATS``.
    """
    start = time.perf_counter()
    use_qwix = use_qwix and qwix is not None
    names = [f.name for f in digits.FORMATS] if formats is None else list(formats)
    by_name = {f.name: f for f in digits.FORMATS + digits.EXTRA_FORMATS}
    qwix_note = (
        f"qwix {qwix.__version__}"
        if use_qwix
        else ("Qwix skipped (--no-qwix)" if qwix is not None else "qwix not installed")
    )
    device = jax.devices()[0].device_kind
    print(
        f"jax {jax.__version__}, {qwix_note}, on {device}; batch {BATCH}, Adam {LR:g}; "
        f"medians of {repeats} runs of each step, in turn\n"
    )
    print(
        "| model | format | float ms | qjax ms | Qwix ms "
        f"| qjax / float (<= {TARGET}x) | min / min | Qwix / float "
        f"| qjax / Qwix (<= {QWIX_TARGET}x) | min / min |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes: list[str] = []
    checks: list[str] = []
    configs: list[str] = []
    optimizer = optax.adam(LR)
    for model_name in models:
        model, shape, classes = MODELS[model_name]
        float_step = digits.make_train_step(model, optimizer)  # compiled once per model
        float_args = _step_inputs(model, shape, classes, None)
        float_logits = jax.jit(model.apply)({"params": float_args[0]}, float_args[3])
        for fmt_name in names:
            fmt = by_name[fmt_name]
            rules = qjax_rules(fmt, model_name)
            qat_step = digits.make_train_step(model, optimizer, rules)
            qat_args = _step_inputs(model, shape, classes, rules)
            qwix_step, config, label = None, None, fmt_name
            if use_qwix:
                config = qwix_config(fmt_name, model_name)
                if config.note:
                    notes.append(f"{len(notes) + 1}. {model_name} {fmt_name}: {config.note}")
                    label += f" [{len(notes)}]"
                if config.rules is not None:
                    configs.append(
                        f"- {model_name} {fmt_name}: "
                        + "; ".join(describe_rule(r) for r in config.rules)
                    )
                    qwix_step = build_qwix_step(model, config, float_args, float_logits)
                    first, last = qwix_step.losses[0], qwix_step.losses[-1]
                    checks.append(
                        f"| {model_name} | {fmt_name} | {qwix_step.rel_error:.4f} "
                        f"| {first:.4f} → {last:.4f} |"
                    )
            r = bench(float_step, float_args, qat_step, qat_args, qwix_step, repeats)
            f_med, q_med = statistics.median(r.float), statistics.median(r.qjax)
            w_med = statistics.median(r.qwix) if r.qwix else None
            w_min = min(r.qwix) if r.qwix else None
            print(
                f"| {model_name} | {label} | {f_med * 1e3:.2f} | {q_med * 1e3:.2f} "
                f"| {'-' if w_med is None else f'{w_med * 1e3:.2f}'} "
                f"| {_cell(q_med / f_med, TARGET)} | {_cell(min(r.qjax) / min(r.float))} "
                f"| {_cell(w_med and w_med / f_med)} "
                f"| {_cell(w_med and q_med / w_med, QWIX_TARGET)} "
                f"| {_cell(w_min and min(r.qjax) / w_min)} |",
                flush=True,
            )
    if notes:
        print("\nWhere Qwix's configuration departs from qjax's format:\n")
        print("\n".join(notes))
    if configs:
        print("\nQwix rules (qwix.QtProvider([...]), fields other than the defaults):\n")
        print("\n".join(configs))
    if checks:
        print(
            f"\nQwix quantizes: relative L2 distance of its logits from the float model's "
            f"(same parameters), and its loss over {SANITY_STEPS} steps on the batch:\n"
        )
        print("| model | format | logits rel. error | loss |\n|---|---|---:|---|")
        print("\n".join(checks))
    print(f"\n{time.perf_counter() - start:.0f} s in all.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help="timed runs per step and row"
    )
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--formats",
        nargs="*",
        default=[f.name for f in digits.FORMATS],
        choices=[f.name for f in digits.FORMATS + digits.EXTRA_FORMATS],
        help="names from FORMATS (and EXTRA_FORMATS)",
    )
    parser.add_argument("--no-qwix", action="store_true", help="skip Qwix even if installed")
    args = parser.parse_args(argv)
    run(args.repeats, args.models, use_qwix=not args.no_qwix, formats=args.formats)


if __name__ == "__main__":
    main()
