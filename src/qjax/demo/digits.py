"""Quantization-aware training of a small Linen CNN on scikit-learn's 8x8 digits.

The protocol (:func:`run_protocol`, or ``python -m qjax.demo.digits``):

1. train the float CNN (:func:`train`);
2. for each format of :data:`FORMATS` (and :data:`EXTRA_FORMATS`), quantize the trained
   weights (PTQ) and measure the test accuracy of the quantized model (:func:`evaluate`);
3. fine-tune from the float weights for a few steps with the format's rules intercepted
   inside the jitted training step (QAT: :func:`train` with ``rules``), then quantize and
   measure the result the same way.

A format is one set of rules in :func:`qjax.flax.linen.intercept`'s format: ``{regex on
the module path: LayerQuant | QuantSpec | shorthand | None}``. The same rules drive QAT
(intercepted model), PTQ (:func:`ptq` turns them into :func:`qjax.quantize_tree` rules
on ``params/<module>/kernel``) and evaluation.

Every quantized accuracy is measured the same way: the weights are really quantized with
:func:`qjax.quantize_tree` (the byte counts are those of the stored QArrays), dequantized,
and the model runs with only the activation quantizers of the rules intercepted; static
activation ranges are first calibrated on a few training batches. ``fake_quant`` equals
``dequantize(quantize(w))`` bit for bit, so this is exactly the model QAT trained.

:class:`NnxCNN` is the same network in Flax NNX: :func:`nnx_from_linen` loads the Linen
weights, and :func:`nnx_train` / :func:`nnx_evaluate` run the same protocol through
:func:`qjax.flax.nnx.quantize`, with the same rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import qjax
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx
from qjax.flax.linen import STATS, ActQuant, LayerQuant
from qjax.rules import parse_spec

__all__ = [
    "CNN",
    "EXTRA_FORMATS",
    "FORMATS",
    "Digits",
    "Format",
    "NnxCNN",
    "Row",
    "accuracy",
    "activation_rules",
    "calibrate",
    "compare_format",
    "evaluate",
    "has_static_ranges",
    "init",
    "layer_rules",
    "load_data",
    "logits",
    "main",
    "make_train_step",
    "markdown_table",
    "nnx_accuracy",
    "nnx_evaluate",
    "nnx_from_linen",
    "nnx_train",
    "ptq",
    "run_protocol",
    "train",
    "weight_bytes",
    "weight_rules",
]

Rules = Mapping[str, qlinen.RuleValue]
"""Rules in :func:`qjax.flax.linen.intercept`'s format, matched on Linen module paths."""


class Digits(NamedTuple):
    """The digits data: images in [0, 1] of shape [N, 8, 8, 1] (float32), labels int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(seed: int = 0, test_size: float = 0.25) -> Digits:
    """scikit-learn's bundled 8x8 digits (no download), split stratified by label.

    Args:
      seed: seeds the split; the same seed always gives the same split.
      test_size: the share of the 1797 samples held out for testing.

    Returns:
      A :class:`Digits` tuple ``(x_train, y_train, x_test, y_test)``.

    Examples:
      >>> from qjax.demo.digits import load_data
      >>> x_train, y_train, x_test, y_test = load_data(seed=0)
      >>> x_train.shape, x_test.shape, float(x_train.max())
      ((1347, 8, 8, 1), (450, 8, 8, 1), 1.0)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed
    )
    return Digits(x_train, y_train, x_test, y_test)


class CNN(nn.Module):
    """Conv(16, 3x3) → relu → Conv(32, 3x3) → relu → flatten → Dense(64) → relu → Dense(10).

    The kernels are ``conv1`` [3, 3, 1, 16], ``conv2`` [3, 3, 16, 32], ``fc1`` [2048, 64]
    and ``head`` [64, 10]; these module names are what rules match.
    """

    hidden: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(self.num_classes, name="head")(x)


@dataclasses.dataclass(frozen=True)
class Format:
    """One quantization configuration of the report: a name, its rules and why."""

    name: str
    rules: Rules
    description: str


FORMATS: tuple[Format, ...] = (
    Format(
        "int8",
        {
            ".*": LayerQuant(
                weight=qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)),
                act=ActQuant(qjax.QuantSpec("int8"), static=True),
            )
        },
        "int8 weights per output channel; int8 inputs of every layer, per tensor, with "
        "static ranges calibrated on training batches",
    ),
    Format(
        "int4",
        {"conv1": "int4:per_channel", ".*": "int4:per_block:16"},
        "int4 weights, blocks of 16 along the input axis (a conv block spans the 3x3 "
        "positions); conv1 has a single input channel, so it is per output channel",
    ),
    Format(
        "float8_e4m3fn",
        {
            ".*": LayerQuant(
                weight=qjax.QuantSpec("float8_e4m3fn", granularity=qjax.per_channel(-1)),
                act=ActQuant(qjax.QuantSpec("float8_e4m3fn")),
            )
        },
        "float8_e4m3fn weights per output channel; float8_e4m3fn inputs, per tensor, dynamic",
    ),
    Format(
        "mxfp4",
        {"conv1|head": None, ".*": "mxfp4:axis=-1"},
        "OCP MX fp4 (e2m1 values, e8m0 scale per 32 values along the last axis) for conv2 "
        "and fc1; conv1 (16 outputs) and head (10 outputs) have no last axis divisible "
        "by 32 and stay float32 (0.6% of the weights)",
    ),
)
"""The four configurations of the report."""

EXTRA_FORMATS: tuple[Format, ...] = (
    Format(
        "int2",
        {".*": "int2:per_channel"},
        "int2 weights ([-2, 1]) per output channel: a format where PTQ loses accuracy "
        "and QAT wins it back",
    ),
)
"""Further configurations, reported after :data:`FORMATS`."""


def layer_rules(rules: Rules) -> dict[str, LayerQuant | None]:
    """The rules with every value as a :class:`~qjax.flax.linen.LayerQuant` (or None)."""
    out: dict[str, LayerQuant | None] = {}
    for pattern, value in rules.items():
        if isinstance(value, str):
            value = parse_spec(value)
        if isinstance(value, qjax.QuantSpec):
            value = LayerQuant(weight=value)
        if value is not None and not isinstance(value, LayerQuant):
            raise TypeError(
                f"rule {pattern!r}: expected a LayerQuant, QuantSpec, shorthand text or None, "
                f"got {type(value).__name__}"
            )
        out[pattern] = value
    return out


def weight_rules(rules: Rules) -> list[tuple[str, qjax.QuantSpec | None]]:
    """The :func:`qjax.quantize_tree` rules for the kernels that ``rules`` quantize.

    Examples:
      >>> from qjax.demo.digits import weight_rules
      >>> for pattern, spec in weight_rules({"head": None, ".*": "int8"}):
      ...     print(pattern, spec)
      params/(?:head)/kernel None
      params/(?:.*)/kernel int8:symmetric:scale:per_tensor
    """
    return [
        (f"params/(?:{pattern})/kernel", None if quant is None else quant.weight)
        for pattern, quant in layer_rules(rules).items()
    ]


def activation_rules(rules: Rules) -> dict[str, LayerQuant | None] | None:
    """The rules without their weight specs, or None where no rule quantizes activations."""
    acts = {
        p: None if q is None or q.act is None else LayerQuant(act=q.act)
        for p, q in layer_rules(rules).items()
    }
    return acts if any(q is not None for q in acts.values()) else None


def has_static_ranges(rules: Rules | None) -> bool:
    """Whether a rule quantizes activations with static (calibrated) ranges."""
    return rules is not None and any(
        q is not None and q.act is not None and q.act.static for q in layer_rules(rules).values()
    )


def _key(rules: Rules | None) -> tuple | None:
    """A hashable stand-in for ``rules``, to cache the jitted functions of each format."""
    return None if rules is None else tuple(layer_rules(rules).items())


def _apply_fn(model: nn.Module, rules: Rules | None, mutable: bool) -> Callable:
    """``model.apply`` (returning ``(logits, stats)`` when ``mutable``), intercepted by rules.

    QArray leaves of the variables (see :func:`ptq`) are dequantized first, in the same
    traced function.
    """

    def apply(variables: Any, x: jax.Array) -> Any:
        variables = qjax.dequantize_tree(variables)
        if mutable:
            logits, updates = model.apply(variables, x, mutable=[STATS])
            return logits, updates[STATS]
        return model.apply(variables, x)

    return apply if rules is None else qlinen.intercepted(apply, rules)


@functools.lru_cache(maxsize=64)
def _jitted_apply(model: nn.Module, key: tuple | None, mutable: bool) -> Callable:
    return jax.jit(_apply_fn(model, None if key is None else dict(key), mutable))


@functools.lru_cache(maxsize=64)
def _jitted_fresh_stats(model: nn.Module, key: tuple) -> Callable:
    def fresh_stats(x: jax.Array) -> Any:
        return model.init(jax.random.key(0), x)[STATS]

    return jax.jit(qlinen.intercepted(fresh_stats, dict(key)))


def init(model: nn.Module, x: np.ndarray, seed: int) -> dict[str, Any]:
    """The float variables ``{"params": ...}`` of ``model`` for inputs shaped like ``x``.

    The key uses the ``rbg`` generator: XLA:CPU compiles its initializers in about a
    third of the time threefry's take (seconds for this model).
    """
    key = jax.random.key(seed, impl="rbg")
    return dict(jax.jit(model.init)(key, jnp.asarray(x[:1])))


def calibrate(
    model: nn.Module,
    variables: Any,
    rules: Rules,
    x: np.ndarray,
    *,
    batches: int = 4,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Fresh static activation ranges (``quant_stats``) from the first batches of ``x``.

    The ranges start uncalibrated and follow each :class:`~qjax.flax.linen.ActQuant`'s
    moving average over ``batches`` batches; existing ranges are discarded. The
    variables may hold QArrays (see :func:`ptq`).
    """
    key = _key(rules)
    stats = _jitted_fresh_stats(model, key)(jnp.asarray(x[:1]))
    step = _jitted_apply(model, key, True)
    rest = {k: v for k, v in variables.items() if k != STATS}
    for i in range(batches):
        xb = x[i * batch_size : (i + 1) * batch_size]
        if len(xb):
            _, stats = step({**rest, STATS: stats}, xb)
    return {**rest, STATS: stats}


def _optax_promotion() -> Any:
    """Standard dtype promotion, for tracing an Optax update.

    Optax's Adam mixes its int32 step count with Python floats (bias correction), which
    ``jax_numpy_dtype_promotion="strict"`` refuses; with this, the demo also runs under
    the test suite's strict setting.
    """
    return jax.numpy_dtype_promotion("standard")


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, rules: Rules | None = None
) -> Callable:
    """A jitted ``step(params, stats, opt_state, x, y) -> (params, stats, opt_state, loss)``.

    With ``rules``, the model runs under :func:`qjax.flax.linen.intercept` inside the
    jitted function: its weights and inputs are fake-quantized and gradients flow
    through them with qjax's straight-through estimator (QAT). ``stats`` is the
    ``quant_stats`` collection where the rules have static activation ranges (updated by
    the moving average at every step), else None.
    """
    apply_stats = _apply_fn(model, rules, mutable=True)
    apply_plain = _apply_fn(model, rules, mutable=False)

    def loss_fn(params: Any, stats: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        if stats is None:
            logits = apply_plain({"params": params}, x)
        else:
            logits, stats = apply_stats({"params": params, STATS: stats}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

    @jax.jit
    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple:
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        with _optax_promotion():
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` index batches: shuffled epochs, the last short batch of each dropped."""
    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        order = rng.permutation(n)
        for b in range(min(per_epoch, steps - done)):
            yield order[b * batch_size : (b + 1) * batch_size]
        done += per_epoch


def train(
    model: nn.Module,
    data: Sequence[np.ndarray],
    *,
    steps: int,
    lr: float,
    seed: int,
    rules: Rules | None = None,
    init_variables: Any = None,
    batch_size: int = 128,
    progress: Callable[[int, jax.Array], None] | None = None,
) -> dict[str, Any]:
    """Trains ``model`` with Adam on ``(x_train, y_train) = data[:2]``.

    Args:
      model: a Linen model mapping images to logits.
      data: :class:`Digits` or any sequence starting with the training images and labels.
      steps: number of optimizer steps (minibatches of ``batch_size``).
      lr: Adam's learning rate.
      seed: seeds the initialization (when ``init_variables`` is None) and the batches.
      rules: quantization rules: None trains the float model; rules make it QAT, the
        model running under :func:`qjax.flax.linen.intercept` inside the jitted step.
        Static activation ranges start from the first batch where ``init_variables``
        has none, and follow the moving average of the training batches.
      init_variables: the variables to start from (e.g. the trained float model's).
      batch_size: the minibatch size.
      progress: called as ``progress(steps_done, loss)`` after each step is dispatched,
        e.g. to advance a progress bar (``loss.block_until_ready()`` waits for the step).

    Returns:
      The trained variables: ``params`` and, with static activation ranges, ``quant_stats``.
    """
    x, y = np.asarray(data[0]), np.asarray(data[1])
    variables = dict(init_variables) if init_variables is not None else init(model, x, seed)
    if has_static_ranges(rules) and STATS not in variables:
        # Uncalibrated ranges: the first step sets them from its batch, the moving
        # average then follows the training batches.
        variables[STATS] = _jitted_fresh_stats(model, _key(rules))(jnp.asarray(x[:1]))
    optimizer = optax.adam(lr)
    step = make_train_step(model, optimizer, rules)
    params = variables["params"]
    stats = variables.get(STATS) if has_static_ranges(rules) else None
    opt_state = optimizer.init(params)
    for done, idx in enumerate(_batches(len(x), batch_size, steps, seed), 1):
        params, stats, opt_state, loss = step(params, stats, opt_state, x[idx], y[idx])
        if progress is not None:
            progress(done, loss)
    return {"params": params} if stats is None else {"params": params, STATS: stats}


def logits(
    model: nn.Module, variables: Any, x: np.ndarray, rules: Rules | None = None
) -> jax.Array:
    """``model.apply(variables, x)`` jitted (once per model and rules), under ``rules``.

    The variables may hold QArrays (see :func:`ptq`), dequantized in the jitted function;
    static activation ranges are used as they are in ``variables`` (see :func:`calibrate`).
    """
    return _jitted_apply(model, _key(rules), False)(variables, x)


def accuracy(
    model: nn.Module, variables: Any, x: np.ndarray, y: np.ndarray, rules: Rules | None = None
) -> float:
    """The share of ``x`` that ``model`` classifies as ``y``, as :func:`logits` computes."""
    predicted = np.argmax(np.asarray(logits(model, variables, x, rules)), axis=-1)
    return float(np.mean(predicted == np.asarray(y)))


def ptq(variables: Any, rules: Rules) -> Any:
    """Post-training quantization: the variables with the rules' kernels as QArrays.

    Every kernel that a rule gives a weight spec is quantized, however small (no
    ``min_size``), so that PTQ stores exactly what the interceptor fake-quantizes.
    """
    return qjax.quantize_tree(variables, weight_rules(rules), min_size=0)


def weight_bytes(tree: Any) -> int:
    """Bytes of every leaf: stored values, scales and offsets of QArrays, floats as they are."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, qjax.QArray))
    return sum(int(leaf.nbytes) for leaf in leaves)


def evaluate(model: nn.Module, variables: Any, rules: Rules, data: Digits) -> tuple[float, int]:
    """Test accuracy and parameter bytes of ``variables`` quantized with ``rules``.

    The kernels are quantized with :func:`ptq`; activations are quantized by
    intercepting the activation part of the rules, with static ranges calibrated afresh
    on the training images.
    """
    quantized = ptq({"params": variables["params"]}, rules)
    acts = activation_rules(rules)
    if has_static_ranges(acts):
        quantized = calibrate(model, quantized, acts, data.x_train)
    acc = accuracy(model, quantized, data.x_test, data.y_test, acts)
    return acc, weight_bytes(quantized["params"])


class NnxCNN(nnx.Module):
    """:class:`CNN` in Flax NNX: the same layers, names, shapes and parameter layouts.

    Rules written for :class:`CNN` match it (the module paths are ``conv1``, ``conv2``,
    ``fc1`` and ``head`` in both), and :func:`nnx_from_linen` loads a Linen checkpoint.
    """

    def __init__(self, rngs: nnx.Rngs, *, hidden: int = 64, num_classes: int = 10):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(8 * 8 * 32, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.relu(self.fc1(x.reshape((x.shape[0], -1))))
        return self.head(x)


NNX_LAYERS = ("conv1", "conv2", "fc1", "head")


def nnx_from_linen(variables: Any) -> NnxCNN:
    """An :class:`NnxCNN` holding the parameters of a :class:`CNN` (QArrays dequantized)."""
    params = qjax.dequantize_tree(variables["params"])
    model = nnx.eval_shape(lambda: NnxCNN(nnx.Rngs(0)))  # no random init to compile
    for name in NNX_LAYERS:
        layer = getattr(model, name)
        layer.kernel.set_value(jnp.asarray(params[name]["kernel"]))
        layer.bias.set_value(jnp.asarray(params[name]["bias"]))
    return model


@nnx.jit
def _nnx_forward(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


def _nnx_calibrate(model: nnx.Module, x: np.ndarray, batches: int = 4, size: int = 256) -> None:
    qnnx.calibrate(model)
    for i in range(batches):
        if len(xb := x[i * size : (i + 1) * size]):
            _nnx_forward(model, xb)
    qnnx.calibrate(model, False)


def nnx_train(
    model: nnx.Module,
    data: Sequence[np.ndarray],
    *,
    steps: int,
    lr: float,
    seed: int,
    rules: Rules | None = None,
    batch_size: int = 128,
) -> nnx.Module:
    """:func:`train` for NNX: QAT through :func:`qjax.flax.nnx.quantize`, in place.

    With ``rules``, the model is quantized in place first; static activation ranges
    start from the first batch and follow the moving average of the training batches,
    as in :func:`train`, and are frozen at the end. Returns ``model``.
    """
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if rules is not None:
        qnnx.calibrate(qnnx.quantize(model, rules))  # ranges follow the training batches
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
        def loss_fn(model: nnx.Module) -> jax.Array:
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        with _optax_promotion():
            optimizer.update(model, grads)
        return loss

    for idx in _batches(len(x), batch_size, steps, seed):
        step(model, optimizer, x[idx], y[idx])
    if rules is not None:
        qnnx.calibrate(model, False)
    return model


def nnx_accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The share of ``x`` that the NNX ``model`` classifies as ``y``."""
    logits = _nnx_forward(model, x)
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == np.asarray(y)))


def nnx_evaluate(model: nnx.Module, rules: Rules, data: Digits) -> float:
    """:func:`evaluate` for NNX: test accuracy of a copy of ``model`` quantized by ``rules``.

    The copy gets fresh quantizers (:func:`qjax.flax.nnx.quantize` on every layer a rule
    matches), static activation ranges calibrated on the training images, and is run
    frozen. Weight fake-quantization is ``dequantize(quantize(w))`` bit for bit, so this
    is the accuracy of the PTQ-stored weights.
    """
    quantized = qnnx.quantize(nnx.clone(model), rules)
    if has_static_ranges(rules):
        _nnx_calibrate(quantized, data.x_train)
    return nnx_accuracy(quantized, data.x_test, data.y_test)


class Row(NamedTuple):
    """One line of the report."""

    format: str
    float_acc: float
    ptq_acc: float
    qat_acc: float
    nbytes: int
    float_nbytes: int


def compare_format(
    model: nn.Module,
    data: Digits,
    float_variables: Any,
    fmt: Format,
    *,
    qat_steps: int,
    qat_lr: float,
    seed: int,
) -> Row:
    """PTQ and QAT (fine-tuned from ``float_variables``) of one format, evaluated alike."""
    float_acc = accuracy(model, float_variables, data.x_test, data.y_test)
    ptq_acc, nbytes = evaluate(model, float_variables, fmt.rules, data)
    qat = train(
        model,
        data,
        steps=qat_steps,
        lr=qat_lr,
        seed=seed + 1,
        rules=fmt.rules,
        init_variables={"params": float_variables["params"]},
    )
    qat_acc, _ = evaluate(model, qat, fmt.rules, data)
    return Row(
        fmt.name, float_acc, ptq_acc, qat_acc, nbytes, weight_bytes(float_variables["params"])
    )


def run_protocol(
    *,
    seed: int = 0,
    float_steps: int = 1500,
    qat_steps: int = 300,
    lr: float = 1e-3,
    qat_lr: float = 1e-4,
    formats: Sequence[Format] = FORMATS + EXTRA_FORMATS,
) -> list[Row]:
    """Trains the float CNN once, then PTQ and QAT for each format: one row per format."""
    data = load_data(seed)
    model = CNN()
    float_variables = train(model, data, steps=float_steps, lr=lr, seed=seed)
    return [
        compare_format(
            model, data, float_variables, fmt, qat_steps=qat_steps, qat_lr=qat_lr, seed=seed
        )
        for fmt in formats
    ]


def markdown_table(rows: Sequence[Row]) -> str:
    """The report as a Markdown table, with a float32 row first.

    The bytes are those of all parameters: kernels as stored (values, scales and
    offsets), biases and kernels kept float as float32.
    """
    lines = [
        "| format | float acc | PTQ acc | QAT acc | weight bytes (incl. scales) |",
        "|---|---:|---:|---:|---:|",
    ]
    if rows:
        r = rows[0]
        lines.append(f"| float32 | {r.float_acc:.2%} | | | {r.float_nbytes:,} |")
    for r in rows:
        ratio = r.float_nbytes / r.nbytes
        lines.append(
            f"| {r.format} | {r.float_acc:.2%} | {r.ptq_acc:.2%} | {r.qat_acc:.2%} "
            f"| {r.nbytes:,} ({ratio:.1f}x smaller) |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qjax.demo.digits", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seed", type=int, default=0, help="data split, init and batches")
    parser.add_argument("--float-steps", type=int, default=1500, help="float training steps")
    parser.add_argument("--qat-steps", type=int, default=300, help="QAT fine-tuning steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (float)")
    parser.add_argument("--qat-lr", type=float, default=1e-4, help="Adam learning rate (QAT)")
    parser.add_argument(
        "--formats",
        nargs="*",
        default=[f.name for f in FORMATS + EXTRA_FORMATS],
        help="names from FORMATS and EXTRA_FORMATS (default: all)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the protocol and prints the Markdown table (``python -m qjax.demo.digits``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    by_name = {f.name: f for f in FORMATS + EXTRA_FORMATS}
    unknown = [name for name in args.formats if name not in by_name]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; choose from {list(by_name)}")
    start = time.perf_counter()
    rows = run_protocol(
        seed=args.seed,
        float_steps=args.float_steps,
        qat_steps=args.qat_steps,
        lr=args.lr,
        qat_lr=args.qat_lr,
        formats=[by_name[name] for name in args.formats],
    )
    print(markdown_table(rows))
    print()
    for name in args.formats:
        print(f"- {name}: {by_name[name].description}")
    print("\nWeight bytes count every parameter: kernels as stored (values, scales, offsets),")
    print("biases and float kernels as float32. Accuracies are on the 450 held-out images.")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join([parser.prog, shlex.join(argv)]).strip()
    seconds = time.perf_counter() - start
    print(f"\nReproduce with `{command}` ({seconds:.0f} s on {jax.devices()[0].device_kind}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
