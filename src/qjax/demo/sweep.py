"""``qjax demo``: a PTQ sweep of the digits CNN over dtypes, granularities and formulations.

:func:`run` does, with no download:

1. trains the float CNN of :mod:`qjax.demo.digits` on scikit-learn's bundled 8x8 digits;
2. quantizes its four kernels (post-training, weights only) for every valid combination
   of target dtype, scheme and formulation, and granularity (:func:`sweep_configs`), and
   measures each configuration: test accuracy with the dequantized weights (float
   activations), bytes of all parameters as stored (values, scales and offsets; biases
   float32), compression against float32 and the mean SQNR of the quantized kernels;
3. fine-tunes (QAT, :func:`qjax.demo.digits.train` with the configuration's rules) the
   configurations whose PTQ accuracy dropped most, and measures them the same way;
4. marks the Pareto front: the rows that no other row beats on both bytes and accuracy.

:func:`write_outputs` then writes ``results.csv``, ``results.json``,
``accuracy_vs_bytes.png``, ``sqnr_vs_block_size.png`` and ``float_params.npz`` (the
trained float CNN, which ``qjax quantize`` reads) into the output folder.

Blocks run along the input axis of the Flax kernels, ``per_block(-2, B)``; a conv block
spans all 3x3 positions. ``conv1`` [3, 3, 1, 16] has one input channel and ``conv2``
[3, 3, 16, 32] sixteen, so no block size divides conv1's input axis and 32 and 64 do not
divide conv2's. Such a kernel falls back to ``per_channel`` with the same dtype, scheme
and formulation, and the configuration's label says so: ``int4:per_block:32 (conv1,conv2
per_channel)``. ``fc1`` [2048, 64] (96% of the weights) and ``head`` [64, 10] take every
block size from 8 to 64. Labels are :func:`qjax.parse_spec` shorthand (defaults left
out: ``int4:per_channel`` is symmetric with the ``scale`` formulation).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

import qjax
from qjax.demo import digits
from qjax.dtypes import TARGET_DTYPES
from qjax.rules import parse_spec
from qjax.spec import MX_PRESETS

__all__ = [
    "COLUMNS",
    "DEFAULT_DTYPES",
    "DTYPES",
    "FILES",
    "FULL",
    "QUICK",
    "SCHEME_FORMULATIONS",
    "Config",
    "Result",
    "Row",
    "Settings",
    "StageLines",
    "kernel_shapes",
    "make_settings",
    "measure",
    "pareto_front",
    "parse_dtypes",
    "plot_accuracy_vs_bytes",
    "plot_sqnr_vs_block_size",
    "run",
    "sweep_configs",
    "table",
    "write_outputs",
]

DTYPES: tuple[str, ...] = (*TARGET_DTYPES, *MX_PRESETS)
"""Every name ``--dtypes`` accepts: the target dtypes and the MX presets."""

DEFAULT_DTYPES: tuple[str, ...] = (
    "int8",
    "uint8",
    "int4",
    "uint4",
    "int2",
    "float8_e4m3fn",
    "float8_e5m2",
    "float4_e2m1fn",
    "mxfp4",
)
"""The dtypes of a full run."""

SCHEME_FORMULATIONS: tuple[tuple[str, str], ...] = (
    ("symmetric", "scale"),
    ("symmetric", "zero_point"),
    ("symmetric", "minval"),
    ("asymmetric", "zero_point"),
    ("asymmetric", "minval"),
)
"""(scheme, formulation) pairs of a full run; :class:`~qjax.QuantSpec` drops the invalid
ones per dtype (``scale`` needs a zero point of 0, float targets take only symmetric
``scale``). For a signed dtype, symmetric ``zero_point`` gives the values of ``scale``
(its zero point is 0) plus stored int32 zero points: the sweep shows what they cost."""

FILES = (
    "results.csv",
    "results.json",
    "accuracy_vs_bytes.png",
    "sqnr_vs_block_size.png",
    "float_params.npz",
)
"""What :func:`write_outputs` writes into the output folder."""

COLUMNS = (
    "config",
    "method",
    "dtype",
    "scheme",
    "formulation",
    "granularity",
    "block_size",
    "per_channel_fallback",
    "accuracy",
    "accuracy_drop",
    "weight_bytes",
    "compression",
    "mean_sqnr_db",
    "pareto",
)
"""The columns of ``results.csv``; ``results.json`` rows add ``rules`` and
``kernel_sqnr_db``."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run sweeps, and how long it trains.

    Attributes:
      dtypes: target dtypes and MX presets (see :data:`DTYPES`).
      granularities: ``per_tensor``, ``per_channel`` and ``per_block:B`` tokens.
      scheme_formulations: the (scheme, formulation) pairs to try on each dtype.
      steps: float training steps.
      qat_steps: QAT fine-tuning steps of each QAT configuration.
      qat_top: how many configurations get QAT (those with the largest PTQ drop).
      lr: Adam's learning rate for float training.
      qat_lr: Adam's learning rate for QAT.
    """

    dtypes: tuple[str, ...]
    granularities: tuple[str, ...]
    scheme_formulations: tuple[tuple[str, str], ...]
    steps: int
    qat_steps: int
    qat_top: int
    lr: float = 1e-3
    qat_lr: float = 3e-4


FULL = Settings(
    dtypes=DEFAULT_DTYPES,
    granularities=("per_tensor", "per_channel", "per_block:8", "per_block:16")
    + ("per_block:32", "per_block:64"),
    scheme_formulations=SCHEME_FORMULATIONS,
    steps=1500,
    qat_steps=300,
    qat_top=3,
)
"""``qjax demo``: every default dtype, granularity and valid (scheme, formulation)."""

QUICK = Settings(
    dtypes=("int8", "int4", "int2", "float8_e4m3fn", "mxfp4"),
    granularities=("per_tensor", "per_channel", "per_block:16", "per_block:32"),
    scheme_formulations=(("symmetric", "scale"), ("asymmetric", "zero_point"))
    + (("asymmetric", "minval"),),
    steps=300,
    qat_steps=60,
    qat_top=1,
)
"""``qjax demo --quick``: fewer dtypes and granularities, each formulation once, short
training (well under a minute on 2 CPU cores)."""


def parse_dtypes(text: str) -> tuple[str, ...]:
    """``"int8,int4"`` -> ``("int8", "int4")``; ``"all"`` is every name of :data:`DTYPES`.

    Raises:
      ValueError: naming an unknown dtype and the choices.

    Examples:
      >>> from qjax.demo.sweep import parse_dtypes
      >>> parse_dtypes("int8, mxfp4,int8")
      ('int8', 'mxfp4')
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return DTYPES
    unknown = [name for name in names if name not in DTYPES]
    if unknown or not names:
        what = f"unknown dtype(s) {', '.join(map(repr, unknown))}" if unknown else "no dtype"
        raise ValueError(
            f"--dtypes {text!r}: {what}; give a comma-separated list from {', '.join(DTYPES)} "
            "(or 'all')"
        )
    return tuple(dict.fromkeys(names))


def make_settings(
    *,
    quick: bool = False,
    dtypes: str | Sequence[str] | None = None,
    steps: int | None = None,
    qat_steps: int | None = None,
    qat_top: int | None = None,
) -> Settings:
    """:data:`QUICK` or :data:`FULL`, with the given fields replaced (None keeps them)."""
    base = QUICK if quick else FULL
    if isinstance(dtypes, str):
        dtypes = parse_dtypes(dtypes)
    elif dtypes is not None:
        dtypes = parse_dtypes(",".join(dtypes))
    changes = {"dtypes": dtypes, "steps": steps, "qat_steps": qat_steps, "qat_top": qat_top}
    for name in ("steps", "qat_steps", "qat_top"):
        value = changes[name]
        if value is not None and value < (1 if name == "steps" else 0):
            raise ValueError(f"{name} must be {'positive' if name == 'steps' else '>= 0'}")
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


# Configurations.


@dataclasses.dataclass(frozen=True)
class Config:
    """One PTQ configuration: a spec per kernel, as :func:`qjax.parse_spec` shorthand.

    Attributes:
      label: the shorthand of the blocked kernels, plus the per_channel fallbacks.
      dtype: the target dtype or MX preset.
      scheme: ``symmetric`` or ``asymmetric``.
      formulation: ``scale``, ``zero_point`` or ``minval``.
      granularity: ``per_tensor``, ``per_channel``, ``per_block`` or ``mx``.
      block_size: the block length along the input axis (per_block and mx).
      rules: ``(module, shorthand)`` for each kernel, in the format of
        :func:`qjax.demo.digits.ptq` and :func:`qjax.flax.linen.intercept`.
      fallback: the kernels that the block does not fit, quantized per_channel instead.
    """

    label: str
    dtype: str
    scheme: str
    formulation: str
    granularity: str
    block_size: int | None
    rules: tuple[tuple[str, str], ...]
    fallback: tuple[str, ...] = ()

    @property
    def rules_dict(self) -> dict[str, str]:
        """``{module: shorthand}``: rules for :mod:`qjax.demo.digits` and ``intercept``."""
        return dict(self.rules)


def kernel_shapes(model: Any, x: np.ndarray) -> dict[str, tuple[int, ...]]:
    """``{module: kernel shape}`` of ``model`` for inputs like ``x`` (nothing computed)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))["params"]
    return {name: tuple(leaf["kernel"].shape) for name, leaf in shapes.items()}


def _shorthand(dtype: str, scheme: str, formulation: str, granularity: str) -> str | None:
    """The shorthand of one spec without its defaults, or None for an invalid combination."""
    if dtype in MX_PRESETS:
        return f"{dtype}:axis=-2" if granularity == "mx" else None
    try:
        default = qjax.QuantSpec(dtype, scheme).formulation
        qjax.QuantSpec(dtype, scheme, formulation)
    except ValueError:
        return None
    parts = [dtype]
    parts += [] if scheme == "symmetric" else [scheme]
    parts += [] if formulation == default else [formulation]
    return ":".join(parts + [granularity])


def _fits(shorthand: str, shape: tuple[int, ...]) -> bool:
    try:
        qjax.block_shape(shape, parse_spec(shorthand).granularity)
    except ValueError:
        return False
    return True


def _per_channel(dtype: str, scheme: str, formulation: str) -> str:
    if dtype in MX_PRESETS:  # the preset's element type, still with power-of-two scales
        return f"{MX_PRESETS[dtype]}:per_channel:scale=float8_e8m0fnu"
    shorthand = _shorthand(dtype, scheme, formulation, "per_channel")
    assert shorthand is not None
    return shorthand


def sweep_configs(shapes: Mapping[str, tuple[int, ...]], settings: Settings) -> list[Config]:
    """Every valid configuration of the dtypes, schemes, formulations and granularities.

    Validity is :class:`~qjax.QuantSpec`'s: unsigned dtypes get no ``scale`` formulation,
    float dtypes only symmetric ``scale``; an MX preset is one configuration (blocks of 32
    along the input axis, e8m0 scales). A kernel whose input axis a block does not divide
    (see :func:`qjax.block_shape`) is quantized per_channel instead, with the same dtype,
    scheme and formulation, and the label names it.

    Examples:
      >>> from qjax.demo.sweep import QUICK, sweep_configs
      >>> shapes = {"conv1": (3, 3, 1, 16), "conv2": (3, 3, 16, 32), "fc1": (2048, 64)}
      >>> for c in sweep_configs(shapes, QUICK)[:5]:
      ...     print(c.label)
      int8:per_tensor
      int8:per_channel
      int8:per_block:16 (conv1 per_channel)
      int8:per_block:32 (conv1,conv2 per_channel)
      int8:asymmetric:per_tensor
    """
    configs = []
    for dtype in settings.dtypes:
        if dtype in MX_PRESETS:
            combos, granularities = [("symmetric", "scale")], ["mx"]
        else:
            combos, granularities = settings.scheme_formulations, settings.granularities
        for scheme, formulation in combos:
            for granularity in granularities:
                shorthand = _shorthand(dtype, scheme, formulation, granularity)
                if shorthand is None:
                    continue
                rules, fallback = [], []
                for name, shape in shapes.items():
                    if _fits(shorthand, shape):
                        rules.append((name, shorthand))
                    else:
                        rules.append((name, _per_channel(dtype, scheme, formulation)))
                        fallback.append(name)
                label = shorthand + (f" ({','.join(fallback)} per_channel)" if fallback else "")
                kind, _, block = granularity.partition(":")
                configs.append(
                    Config(
                        label=label,
                        dtype=dtype,
                        scheme=scheme,
                        formulation=formulation,
                        granularity=kind,
                        block_size=int(block) if block else (32 if kind == "mx" else None),
                        rules=tuple(rules),
                        fallback=tuple(fallback),
                    )
                )
    return configs


# Measurements.


@dataclasses.dataclass
class Row:
    """One line of the results: the float model, or one configuration after PTQ or QAT.

    ``weight_bytes`` counts every parameter as stored (quantized values, scales and
    offsets; biases float32), ``compression`` is the float32 bytes over it, and
    ``mean_sqnr_db`` the mean over the quantized kernels of ``10 log10(sum w^2 / sum
    (w - w')^2)`` (None for the float row).
    """

    config: str
    method: str
    dtype: str
    scheme: str | None
    formulation: str | None
    granularity: str | None
    block_size: int | None
    per_channel_fallback: str
    accuracy: float
    accuracy_drop: float
    weight_bytes: int
    compression: float
    mean_sqnr_db: float | None
    pareto: bool = False
    rules: dict[str, str] = dataclasses.field(default_factory=dict)
    kernel_sqnr_db: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, config: Config, method: str, **values: Any) -> Row:
        return cls(
            config=config.label + (" +QAT" if method == "qat" else ""),
            method=method,
            dtype=config.dtype,
            scheme=config.scheme,
            formulation=config.formulation,
            granularity=config.granularity,
            block_size=config.block_size,
            per_channel_fallback=",".join(config.fallback),
            rules=config.rules_dict,
            **values,
        )


_FAST_COMPILE = {"xla_backend_optimization_level": 0}
"""XLA:CPU options for the sweep's programs. Each runs once, on a few small kernels, so
LLVM's optimizations cost far more than they save (compiling dominates the sweep); they
do not change the values, which the tests check against an eager ``quantize_tree``."""

GROUP_SIZE = 32
"""Configurations per compiled program: one program for many configurations compiles in
a fraction of the time of one program each (about 0.1 s instead of 0.6 s per
configuration on 2 CPU cores)."""


def _dequantized_program(configs: Sequence[Config]) -> Callable:
    """One jitted ``variables -> [dequantize_tree(ptq(variables, rules)) per config]``."""

    def dequantized(variables: Any) -> list[Any]:
        return [qjax.dequantize_tree(digits.ptq(variables, c.rules_dict)) for c in configs]

    options = _FAST_COMPILE if jax.default_backend() == "cpu" else None
    return jax.jit(dequantized, compiler_options=options)


def _stored(variables: Any, config: Config) -> tuple[int, list[str]]:
    """Bytes of all parameters as :func:`qjax.demo.digits.ptq` stores them, and the
    modules whose kernels it quantizes, from the shapes of its QArrays (nothing computed)."""
    abstract = jax.eval_shape(lambda v: digits.ptq(v, config.rules_dict), variables)["params"]
    nbytes = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract))
    return nbytes, [k for k, layer in abstract.items() if isinstance(layer["kernel"], qjax.QArray)]


def _sqnr_db(x: Any, y: Any) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    signal, noise = float(np.sum(x * x)), float(np.sum((x - y) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def measure(
    model: Any,
    variables: Any,
    configs: Sequence[Config],
    data: digits.Digits,
    float_accuracy: float,
    method: str = "ptq",
    on_row: Callable[[], None] | None = None,
) -> list[Row]:
    """Quantizes ``variables`` by each configuration and measures it: one row each.

    The kernels are quantized with :func:`qjax.demo.digits.ptq` and dequantized (in one
    compiled program for all the configurations), and the float model runs on the test
    images with them (:func:`qjax.demo.digits.accuracy`). The bytes are those of the
    QArrays ``ptq`` returns: values (4- and 2-bit packed), scales and offsets.
    ``on_row()`` is called after each row (e.g. to advance a progress bar).
    """
    params = {"params": variables["params"]}
    float_bytes = digits.weight_bytes(params["params"])
    rows = []
    for config, dequantized in zip(configs, _dequantized_program(configs)(params)):
        nbytes, quantized = _stored(params, config)
        sqnr = {
            name: _sqnr_db(params["params"][name]["kernel"], dequantized["params"][name]["kernel"])
            for name in quantized
        }
        acc = digits.accuracy(model, dequantized, data.x_test, data.y_test)
        rows.append(
            Row.of(
                config,
                method,
                accuracy=acc,
                accuracy_drop=float_accuracy - acc,
                weight_bytes=nbytes,
                compression=float_bytes / nbytes,
                mean_sqnr_db=float(np.mean(list(sqnr.values()))) if sqnr else None,
                kernel_sqnr_db=sqnr,
            )
        )
        if on_row is not None:
            on_row()
    return rows


def pareto_front(rows: Sequence[Row]) -> list[bool]:
    """Whether each row is on the Pareto front: no other row has fewer or equal bytes
    and higher or equal accuracy, one of them strictly.

    Examples:
      >>> from types import SimpleNamespace as R
      >>> from qjax.demo.sweep import pareto_front
      >>> pareto_front([R(weight_bytes=10, accuracy=0.9), R(weight_bytes=20, accuracy=0.8),
      ...               R(weight_bytes=30, accuracy=0.95)])
      [True, False, True]
    """

    def dominates(a: Row, b: Row) -> bool:
        no_worse = a.weight_bytes <= b.weight_bytes and a.accuracy >= b.accuracy
        return no_worse and (a.weight_bytes < b.weight_bytes or a.accuracy > b.accuracy)

    return [not any(dominates(other, row) for other in rows) for row in rows]


def _qat_candidates(rows: Sequence[Row], configs: Sequence[Config], k: int) -> list[Config]:
    """The ``k`` configurations with the largest PTQ accuracy drop (fewer bytes first on
    ties), skipping one whose quantized weights are those of a configuration already
    chosen (same dtype, granularity and kernel SQNRs: e.g. signed symmetric
    ``zero_point``, whose zero point is 0, next to ``scale``)."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].accuracy_drop, rows[i].weight_bytes))
    chosen: list[Config] = []
    seen = set()
    for i in order:
        if len(chosen) == k:
            break
        r = rows[i]
        key = (r.dtype, r.granularity, r.block_size, tuple(sorted(r.kernel_sqnr_db.items())))
        if key not in seen:
            seen.add(key)
            chosen.append(configs[i])
    return chosen


# The run.


@dataclasses.dataclass
class Result:
    """What :func:`run` measured: the rows (float first, then PTQ, then QAT), the trained
    float variables and facts about the run (``meta``)."""

    rows: list[Row]
    float_variables: Any
    meta: dict[str, Any]


class StageLines:
    """Progress as plain lines on a stream, for logs (CI) where a progress bar cannot draw.

    It takes the calls :func:`run` makes on a rich ``Progress`` (``add_task``, ``update``,
    ``advance``) and prints one line when a stage starts and one at each quarter of it,
    with the seconds since the run started, so a long run is never minutes of silence.

    Examples:
      >>> import sys
      >>> from qjax.demo.sweep import StageLines
      >>> lines = StageLines(sys.stdout, clock=iter(range(0, 100, 5)).__next__)
      >>> task = lines.add_task("PTQ sweep", total=8)
      [   5 s] PTQ sweep: 0/8
      >>> for _ in range(8):
      ...     lines.advance(task)
      [  10 s] PTQ sweep: 2/8
      [  15 s] PTQ sweep: 4/8
      [  20 s] PTQ sweep: 6/8
      [  25 s] PTQ sweep: 8/8, done
    """

    def __init__(self, stream: Any, clock: Callable[[], float] = time.perf_counter) -> None:
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._tasks: list[list[Any]] = []  # [description, total, completed, quarters printed]

    def add_task(self, description: str, total: int) -> int:
        """Starts a stage of ``total`` steps; returns its id."""
        self._tasks.append([description, total, 0, 0])
        self._print(f"{description}: 0/{total}")
        return len(self._tasks) - 1

    def update(self, task: int, completed: int) -> None:
        """Sets the steps done; prints when a new quarter of the stage is reached."""
        state = self._tasks[task]
        description, total, _, printed = state
        state[2] = completed
        quarter = 4 * completed // total if total else 4
        if quarter > printed:
            state[3] = quarter
            done = ", done" if completed >= total else ""
            self._print(f"{description}: {completed}/{total}{done}")

    def advance(self, task: int) -> None:
        """One more step done."""
        self.update(task, self._tasks[task][2] + 1)

    def _print(self, text: str) -> None:
        print(f"[{self._clock() - self._start:4.0f} s] {text}", file=self._stream, flush=True)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr where it is a terminal, else :class:`StageLines` on
    stderr; None where disabled."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        yield StageLines(sys.stderr)
        return
    columns = (
        TextColumn("{task.description}", style="cyan"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        yield progress


def _stepper(progress: Any, description: str, total: int) -> Callable[[int, Any], None] | None:
    """A ``digits.train`` progress callback advancing a new task (None without a bar)."""
    if progress is None:
        return None
    task = progress.add_task(description, total=total)

    def advance(done: int, loss: Any) -> None:
        if done % 25 == 0:
            loss.block_until_ready()  # dispatch runs ahead of the computation otherwise
        progress.update(task, completed=done)

    return advance


def run(settings: Settings, *, seed: int = 0, progress: bool = True) -> Result:
    """Trains the float CNN, sweeps PTQ, runs QAT for the worst configurations.

    Args:
      settings: what to sweep and how long to train (:data:`FULL`, :data:`QUICK` or
        :func:`make_settings`).
      seed: seeds the data split, the initialization and the batches.
      progress: show progress on stderr: a bar where stderr is a terminal, else a line
        per stage and per quarter of it (:class:`StageLines`).

    Returns:
      A :class:`Result`: the float row, one PTQ row per configuration, one QAT row per
      QAT configuration, with the Pareto front marked.
    """
    start = time.perf_counter()
    data = digits.load_data(seed)
    model = digits.CNN()
    configs = sweep_configs(kernel_shapes(model, data.x_train), settings)
    seconds: dict[str, float] = {}
    with _progress(progress) as bar:
        t = time.perf_counter()
        float_variables = digits.train(
            model,
            data,
            steps=settings.steps,
            lr=settings.lr,
            seed=seed,
            progress=_stepper(bar, "train float CNN", settings.steps),
        )
        float_acc = digits.accuracy(model, float_variables, data.x_test, data.y_test)
        float_bytes = digits.weight_bytes(float_variables["params"])
        seconds["train"] = time.perf_counter() - t

        t = time.perf_counter()
        task = bar.add_task("PTQ sweep", total=len(configs)) if bar is not None else None
        ptq_rows: list[Row] = []
        for i in range(0, len(configs), GROUP_SIZE):
            group = configs[i : i + GROUP_SIZE]
            advance = None if bar is None else lambda: bar.advance(task)
            ptq_rows += measure(model, float_variables, group, data, float_acc, on_row=advance)
        seconds["ptq_sweep"] = time.perf_counter() - t

        t = time.perf_counter()
        chosen = _qat_candidates(ptq_rows, configs, settings.qat_top)
        qat_rows: list[Row] = []
        for c in chosen:
            qat_variables = digits.train(
                model,
                data,
                steps=settings.qat_steps,
                lr=settings.qat_lr,
                seed=seed + 1,
                rules=c.rules_dict,
                init_variables={"params": float_variables["params"]},
                progress=_stepper(bar, f"QAT {c.label.split()[0]}", settings.qat_steps),
            )
            qat_rows += measure(model, qat_variables, [c], data, float_acc, method="qat")
        seconds["qat"] = time.perf_counter() - t

    float_row = Row(
        config="float32",
        method="float",
        dtype="float32",
        scheme=None,
        formulation=None,
        granularity=None,
        block_size=None,
        per_channel_fallback="",
        accuracy=float_acc,
        accuracy_drop=0.0,
        weight_bytes=float_bytes,
        compression=1.0,
        mean_sqnr_db=None,
    )
    rows = [float_row, *ptq_rows, *qat_rows]
    for row, on_front in zip(rows, pareto_front(rows)):
        row.pareto = on_front
    seconds["total"] = time.perf_counter() - start
    meta = {
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "ptq_configs": len(ptq_rows),
        "qat_configs": len(qat_rows),
        "float_accuracy": float_acc,
        "float_bytes": float_bytes,
        "test_images": len(data.y_test),
        "kernels": {k: list(v) for k, v in kernel_shapes(model, data.x_train).items()},
        "seconds": seconds,
        "device": jax.devices()[0].device_kind,
        "versions": {"qjax": qjax.__version__, "jax": jax.__version__},
        "notes": NOTES,
    }
    return Result(rows=rows, float_variables=float_variables, meta=meta)


NOTES = (
    "accuracy: on the held-out test images, the model running with the dequantized "
    "weights (float activations)",
    "weight_bytes: every parameter as stored: quantized values (4- and 2-bit packed), "
    "scales and offsets; biases float32",
    "compression: float32 bytes of all parameters / weight_bytes",
    "mean_sqnr_db: mean over the quantized kernels of 10 log10(sum w^2 / sum (w - w')^2); "
    "for QAT rows w are the fine-tuned float weights",
    "per_block blocks run along the kernel input axis; a kernel whose input axis the block "
    "does not divide is quantized per_channel (listed in per_channel_fallback)",
    "QAT: fine-tuned from the float weights with the configuration's rules intercepted, "
    "for the configurations with the largest PTQ accuracy drop",
    "pareto: no other row has fewer or equal bytes and higher or equal accuracy",
)


# Outputs.


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def write_outputs(result: Result, out: str | os.PathLike) -> dict[str, str]:
    """Writes :data:`FILES` into the folder ``out`` (created where missing).

    Returns:
      ``{file name: path}`` of what was written.
    """
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in FILES}
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: _csv_value(getattr(row, k)) for k in COLUMNS})
    with open(paths["results.json"], "w") as f:
        rows = [_json_value(dataclasses.asdict(row)) for row in result.rows]
        json.dump({"meta": result.meta, "rows": rows}, f, indent=1, allow_nan=False)
        f.write("\n")
    flat = jax.tree_util.tree_flatten_with_path(result.float_variables["params"])[0]
    arrays = {"params/" + qjax.tree.path_str(p): np.asarray(leaf) for p, leaf in flat}
    np.savez(paths["float_params.npz"], **arrays)
    plot_accuracy_vs_bytes(result.rows, paths["accuracy_vs_bytes.png"])
    plot_sqnr_vs_block_size(result.rows, paths["sqnr_vs_block_size.png"])
    return paths


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure drawn by the Agg backend, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


DPI = 100
"""Resolution of the plots (pixels per inch)."""


def _colors(dtypes: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {dtype: cmap(i % 10) for i, dtype in enumerate(dict.fromkeys(dtypes))}


def plot_accuracy_vs_bytes(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Accuracy against weight bytes (log scale): PTQ and QAT rows by dtype, the float
    model, and the Pareto front drawn and ringed.

    The accuracy axis starts at most 25 points below the best row; rows below it are
    drawn as triangles on its lower edge and counted in the corner.
    """
    from matplotlib.ticker import FuncFormatter

    fig = _figure(7.0, 4.4)
    ax = fig.subplots()
    best = max(100 * r.accuracy for r in rows)
    worst = min(100 * r.accuracy for r in rows)
    bottom = max(0.0, 5 * math.floor(max(worst - 1, best - 25) / 5))
    colors = _colors([r.dtype for r in rows if r.method != "float"])

    def draw(subset: Sequence[Row], **style: Any) -> None:
        """Scatters the rows, those below the axis as triangles on its edge."""
        inside = [r for r in subset if 100 * r.accuracy >= bottom]
        below = [r for r in subset if 100 * r.accuracy < bottom]
        for part, extra in ((inside, {}), (below, {"marker": "v", "label": None})):
            if part:
                ax.scatter(
                    [r.weight_bytes / 1024 for r in part],
                    [max(100 * r.accuracy, bottom + 0.4) for r in part],
                    color=[colors.get(r.dtype, "black") for r in part],
                    **(style | extra),
                )

    for dtype in colors:
        ptq = [r for r in rows if r.dtype == dtype and r.method == "ptq"]
        draw(ptq, s=14, alpha=0.75, linewidths=0, label=dtype)
    qat = [r for r in rows if r.method == "qat"]
    draw(qat, s=90, marker="*", edgecolors="black", linewidths=0.6, label="after QAT", zorder=3)
    draw([r for r in rows if r.method == "float"], s=40, marker="D", label="float32", zorder=3)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.weight_bytes)
    x = [r.weight_bytes / 1024 for r in front]
    y = [max(100 * r.accuracy, bottom + 0.4) for r in front]
    ax.step(x, y, where="post", color="crimson", linewidth=1, label="Pareto front", zorder=2)
    ax.scatter(x, y, s=70, facecolors="none", edgecolors="crimson", linewidths=1, zorder=4)
    hidden = sum(100 * r.accuracy < bottom for r in rows)
    if hidden:
        ax.text(0.01, 0.02, f"\u25bc {hidden} below {bottom:g}%", transform=ax.transAxes,
                fontsize=7)  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(
        FuncFormatter(lambda v, _: f"{v:g}" if _leading(v) in (2, 5) else "")
    )
    ax.set_xlabel("weight bytes incl. scales and offsets (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(bottom, min(100.0, best + 1) + 0.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Digits CNN: accuracy vs size of each quantization config", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path)


def _leading(v: float) -> int:
    """The leading digit of a positive number: 2 for 0.25, 250 and 2000."""
    return int(round(v / 10 ** math.floor(math.log10(v)), 6))


_GRANULARITY_ORDER = ("per_tensor", "per_channel", 64, 32, 16, 8)


def plot_sqnr_vs_block_size(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Mean kernel SQNR from coarse to fine granularity, one line per dtype.

    Each dtype is drawn with its first (scheme, formulation) of the sweep, preferring
    symmetric ``scale`` and then asymmetric ``zero_point``; MX presets are single points
    at block size 32.
    """
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    ptq = [r for r in rows if r.method == "ptq" and r.mean_sqnr_db is not None]
    colors = _colors([r.dtype for r in ptq])

    def key(r: Row) -> Any:
        return r.block_size if r.granularity in ("per_block", "mx") else r.granularity

    order = [k for k in _GRANULARITY_ORDER if any(key(r) == k for r in ptq)]
    order += sorted({key(r) for r in ptq} - set(order), key=lambda k: -k)  # other block sizes

    def position(r: Row) -> int:
        return order.index(key(r))

    used = set()
    for dtype, color in colors.items():
        mine = [r for r in ptq if r.dtype == dtype]
        combos = list(dict.fromkeys((r.scheme, r.formulation) for r in mine))
        for preferred in (("asymmetric", "zero_point"), ("symmetric", "scale")):
            if preferred in combos:
                combos.insert(0, combos.pop(combos.index(preferred)))
        if not combos:
            continue
        line = sorted((r for r in mine if (r.scheme, r.formulation) == combos[0]), key=position)
        used.update(position(r) for r in line)
        x = [position(r) for r in line]
        y = [min(r.mean_sqnr_db, 99.0) for r in line]
        mx = line[0].granularity == "mx"
        label = dtype if mx or combos[0] == ("symmetric", "scale") else f"{dtype} ({combos[0][0]})"
        ax.plot(x, y, marker="X" if mx else "o", markersize=7 if mx else 4, color=color,
                linestyle="none" if mx else "-", label=label)  # fmt: skip
    ticks = sorted(used)
    names = {"per_tensor": "tensor", "per_channel": "channel"}
    ax.set_xticks(ticks, [names.get(order[i], f"block {order[i]}") for i in ticks])
    ax.set_xlabel("granularity, coarse to fine (blocks along the kernel input axis)")
    ax.set_ylabel("mean kernel SQNR (dB)")
    ax.grid(True, alpha=0.3)
    ax.set_title(
        "SQNR vs block size (conv1 stays per channel in block configs, conv2 too at 32/64)",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path)


CAPTION = (
    "config: qjax spec shorthand without defaults (symmetric; scale where the zero point is "
    "0, else zero_point). weight bytes: all parameters as stored, scales and offsets "
    "included. vs float32: compression. mean SQNR: over the quantized kernels. P: * on the "
    "Pareto front of (bytes, accuracy)."
)


def table(result: Result) -> Any:
    """The rows as a :class:`rich.table.Table`: config (PTQ, or ``+QAT``), accuracy,
    weight bytes, compression, mean SQNR, and a ``*`` on the Pareto front."""
    from rich import box
    from rich.table import Table

    m = result.meta
    title = (
        f"qjax demo: digits CNN, {m['ptq_configs']} PTQ configs, "
        f"{m['qat_configs']} fine-tuned with QAT"
    )
    t = Table(
        title=title,
        caption=CAPTION,
        header_style="bold",
        box=box.SIMPLE,
        pad_edge=False,
        collapse_padding=True,
    )
    longest = max(len(word) for r in result.rows for word in r.config.split())
    t.add_column("config", min_width=longest)  # wraps at spaces: shorthand stays whole
    t.add_column("accuracy", justify="right")
    t.add_column("weight\nbytes", justify="right")
    t.add_column("vs\nfloat32", justify="right")
    t.add_column("mean\nSQNR dB", justify="right")
    t.add_column("P", justify="center")
    for r in result.rows:
        t.add_row(
            r.config,
            f"{100 * r.accuracy:.2f}%",
            f"{r.weight_bytes:,}",
            f"{r.compression:.2f}x",
            "-" if r.mean_sqnr_db is None else f"{r.mean_sqnr_db:.1f}",
            "*" if r.pareto else "",
            end_section=r.method == "float" or r is result.rows[-1 - m["qat_configs"]],
        )
    return t
