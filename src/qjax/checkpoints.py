"""Checkpoint operations, what the ``qjax`` command runs, on top of :mod:`qjax.files`.

:func:`plan_checkpoint` says which tensor gets which spec (through
:class:`qjax.RulePlan`, with ``keep`` / ``drop``), :func:`quantize_checkpoint` turns a float
file into a qjax file with one tensor in memory at a time and the original tensor names
stored, :func:`dequantize_checkpoint` turns a qjax file back into a float file under the
original names, and :func:`inspect_checkpoint` lists a qjax file's tensors.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import capture
from qjax import io as qio
from qjax.files import (
    FLOAT_SUFFIXES,
    ST_CODES,
    PathLike,
    TensorInfo,
    check_target,
    open_checkpoint,
    tensor_path,
    write_npz,
    write_safetensors,
)
from qjax.methods import (
    AWQ,
    GPTQ,
    Method,
    MethodLike,
    as_method,
    calibrated_leaf,
    shared_awq_scales,
)
from qjax.palettize import LUTArray, TableFormat
from qjax.qarray import QArray
from qjax.report import leaf_row, stored_row
from qjax.resolve import Plan, PlanRow, Resolution, RulePlan, report_unmatched
from qjax.rules import DEFAULT_MIN_SIZE, RulesLike
from qjax.tree import nonfinite_in_float32, quantize_leaf, table_method_error

__all__ = [
    "CheckpointPlan",
    "Progress",
    "dequantize_checkpoint",
    "inspect_checkpoint",
    "plan_checkpoint",
    "quantize_checkpoint",
    "refuse_tables",
]

CLI_LISTING = "qjax plan FILE"
"""How the command line lists a checkpoint's tensor names, for messages about rules."""

Progress = Callable[[str, int], None]
"""``progress(name, nbytes)``: called with 0 bytes when a tensor (or the final write, named
``"writing <path>"``) starts, and with the tensor's bytes when it is done."""


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """What :func:`quantize_checkpoint` will do to each tensor of a float checkpoint.

    Attributes:
      path: the checkpoint file.
      tensors: every tensor, in file order.
      rows: one :class:`~qjax.resolve.PlanRow` per tensor (``row.path`` is the original
        tensor name), printed as a table by ``str(plan.table)``.
      dropped: the names left out of the output (``drop``).
    """

    path: str
    tensors: tuple[TensorInfo, ...]
    rows: tuple[PlanRow, ...]
    dropped: frozenset[str]

    @property
    def table(self) -> Plan:
        return Plan(self.rows)

    @property
    def fallbacks(self) -> list[PlanRow]:
        """The rows quantized with a fallback granularity (their note says why)."""
        return [r for r in self.rows if r.spec is not None and r.note.startswith("fallback")]


def plan_checkpoint(
    path: PathLike,
    rules: RulesLike | None = None,
    *,
    layout: str = "auto",
    min_size: int = DEFAULT_MIN_SIZE,
    fallback: str | None = "per_channel",
    keep: Sequence[str] = (),
    drop: Sequence[str] = (),
) -> CheckpointPlan:
    """Which spec each tensor of a float checkpoint gets, reading only its header.

    Rules are those of :class:`qjax.RulePlan` (matched against each tensor's name as given,
    e.g. ``"encoder.layer.0.attention.self.query.weight"``, and with ``.`` read as ``/``).
    Before them, ``drop`` and ``keep`` regexes (``re.fullmatch`` on the same two forms):
    a tensor that a ``drop`` pattern matches is left out of the output; one that a ``keep``
    pattern matches is written as it is (float), whatever the rules say. ``drop`` wins.

    Raises:
      ValueError: for a rule, ``keep`` or ``drop`` pattern that matches no tensor, a spec
        that does not fit a tensor (``fallback=None``), tensor names that clash as paths,
        or a file that cannot be read; each names what to change.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from qjax.checkpoints import plan_checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "m.npz")
      >>> np.savez(path, **{"fc.weight": np.ones((64, 48), np.float32),
      ...                   "fc.bias": np.ones(64, np.float32), "ids": np.arange(8)})
      >>> plan = plan_checkpoint(path, {".*": "int4:per_block:16"}, drop=["ids"])
      >>> print(plan.table)
      path       shape  dtype    layout  spec                      rule  note
      fc.weight  64x48  float32  torch   int4:per_block:16:axis=1  .*
      fc.bias    64     float32  other   float                     .*    1-D
      ids        8      int64    other   float                     -     dropped (--drop ids)
    """
    path = os.fspath(path)
    reader = open_checkpoint(path)
    if qio.METADATA_KEY in reader.metadata():
        raise ValueError(
            f"{path} is a qjax file (quantized already): its tensors are codes and scales, "
            "not the model's weights. Quantize the float checkpoint it came from, or turn "
            "it back into one with `qjax dequantize` (qjax.checkpoints.dequantize_checkpoint)"
        )
    tensors = reader.tensors()
    _check_paths(tensors)
    rule_plan = RulePlan(rules, layout=layout, min_size=min_size, fallback=fallback)
    rule_plan.read_tree([(t.name, t.shape) for t in tensors])
    keep_match = _patterns(keep, "keep")
    drop_match = _patterns(drop, "drop")
    used: set[tuple[str, str]] = set()
    rows, dropped, taken = [], set(), {}
    names = {t.name for t in tensors}
    for t in tensors:
        forms = (t.name, t.name.replace(".", "/"))
        hit_drop = _first(drop_match, forms)
        hit_keep = None if hit_drop else _first(keep_match, forms)
        if hit_drop or hit_keep:
            flag, pattern = ("drop", hit_drop) if hit_drop else ("keep", hit_keep)
            used.add((flag, pattern))
            note = f"dropped (--drop {pattern})" if hit_drop else f"kept float (--keep {pattern})"
            if hit_drop:
                dropped.add(t.name)
            taken[t.name] = f"--{flag} {pattern}"
            resolution = Resolution(None, None, "other", note)
        else:
            try:
                resolution = rule_plan.resolve(t.name, t.shape, t.dtype)
            except ValueError as e:
                raise ValueError(f"{path}: tensor {e}") from None
        if resolution.spec is not None:
            _refuse_scaled_float8(t, names)
        rows.append(PlanRow.of(t.name, t.shape, t.dtype, resolution))
    for flag, matchers in (("drop", drop_match), ("keep", keep_match)):
        unused = [p for p, _ in matchers if (flag, p) not in used]
        report_unmatched(unused, strict=True, where=f"--{flag}", listing=CLI_LISTING)
    _check_shadowed(rule_plan.unmatched(), taken)
    rule_plan.check_unmatched(strict=True, where="--rule", listing=CLI_LISTING)
    return CheckpointPlan(path, tuple(tensors), tuple(rows), frozenset(dropped))


def _refuse_scaled_float8(t: TensorInfo, names: set[str]) -> None:
    """Refuses to quantize a float8 weight stored with its own scales (DeepSeek-V3 style
    ``weight_scale_inv``, compressed-tensors ``weight_scale``): its values are not the
    weights until multiplied by them."""
    if not np.dtype(t.dtype).name.startswith("float8"):
        return
    scales = [f"{t.name}{suffix}" for suffix in ("_scale_inv", "_scale")]
    found = next((name for name in scales if name in names), None)
    if found is not None:
        raise ValueError(
            f"tensor {t.name!r} is {np.dtype(t.dtype).name} with its scales in {found!r}: "
            "its values are not the weights until multiplied by them, and qjax would "
            "quantize them without. Dequantize the checkpoint to float first (weights "
            f"times their block scales), or keep them as they are (--keep {t.name!r} and "
            "the scales stay float)"
        )


def _check_shadowed(patterns: Sequence[str], taken: dict[str, str]) -> None:
    """Refuses a rule whose tensors ``--keep`` / ``--drop`` all took (``taken``: tensor
    name -> the flag and pattern that took it), saying so."""
    for pattern in patterns:
        match = re.compile(pattern).fullmatch
        hit = next((n for n in taken if match(n) or match(n.replace(".", "/"))), None)
        if hit is not None:
            raise ValueError(
                f"--rule: rule {pattern!r} applies to no tensor: every tensor it matches "
                f"was taken by --keep or --drop first (e.g. {hit!r} by {taken[hit]}); "
                "narrow that pattern or drop the rule"
            )


def quantize_checkpoint(
    plan: CheckpointPlan,
    output: PathLike,
    *,
    progress: Progress | None = None,
    method: MethodLike = "rtn",
    model: Callable[..., Any] | None = None,
    batches: Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """Quantizes a float checkpoint by its plan into a qjax file, one tensor at a time.

    With a calibrated ``method`` (``"gptq"``, ``"awq"``, ``"smoothquant"``, see
    :func:`qjax.quantize_tree`), ``model(tensors, batch)`` runs the model on the
    checkpoint's float tensors (a flat dict by tensor name) for each calibration batch of
    ``batches``; the statistics of the inputs of every tensor the plan quantizes are
    captured (:func:`qjax.capture.accumulate`) and the tensors quantized from them. All
    float tensors are then in memory at once, as running the model needs.

    With round to nearest only one float tensor is in memory at a time (plus the quantized
    output so far). The
    output holds every tensor not dropped, nested by its path (``"Dense_0.kernel"`` ->
    ``{"Dense_0": {"kernel": ...}}``) with its original name stored, so :func:`qjax.load`
    gives the nested tree and :func:`dequantize_checkpoint` the original names. Non-float
    and 64-bit tensors (``position_ids``, float64) are kept bit for bit.

    Returns:
      The report rows (:func:`qjax.report.leaf_row`), by original name.

    Raises:
      ValueError: when a tensor to quantize holds NaN or inf (in float32), when ``output``
        is the input file or not a ``.safetensors`` path, or when a tensor cannot be read.
      OSError: when the output cannot be written (the old file is then left as it was).

    Examples:
      >>> import os, tempfile, numpy as np, qjax
      >>> from qjax.checkpoints import plan_checkpoint, quantize_checkpoint
      >>> tmp = tempfile.mkdtemp()
      >>> np.savez(os.path.join(tmp, "m.npz"), **{"fc.weight": np.ones((64, 48), np.float32)})
      >>> plan = plan_checkpoint(os.path.join(tmp, "m.npz"), {".*": "int8:per_channel"})
      >>> rows = quantize_checkpoint(plan, os.path.join(tmp, "q.safetensors"))
      >>> qjax.load(os.path.join(tmp, "q.safetensors"))["fc"]["weight"].scale.shape
      (64, 1)
    """
    output = _check_output(output, (".safetensors",), plan.path)
    reader = open_checkpoint(plan.path)
    progress = progress or (lambda name, nbytes: None)
    calibrated = _calibrated_tensors(plan, reader, as_method(method), model, batches, progress)
    tree: dict[str, Any] = {}
    names: dict[str, str] = {}
    rows = []
    for t, row in zip(plan.tensors, plan.rows):
        if t.name in plan.dropped:
            continue
        progress(t.name, 0)
        x = reader.read(t.name)
        if t.name in calibrated:
            q = calibrated.pop(t.name)
        else:
            q = x if row.spec is None else _quantize_tensor(t, x, row)
        rows.append(leaf_row(t.name, x, q))
        if isinstance(q, QArray | LUTArray) and q.float_dtype != x.dtype.name:
            q = dataclasses.replace(q, float_dtype=x.dtype.name)  # float64 without x64
        path = tensor_path(t.name)
        _insert(tree, path, q)
        names["/".join(path)] = t.name
        del x, q
        progress(t.name, t.nbytes)
    progress(f"writing {output}", 0)
    own = (qio.METADATA_KEY, qio.CHECKSUM_KEY)  # a source written by qjax: not carried
    metadata = {k: v for k, v in reader.metadata().items() if k not in own}
    qio.save(output, tree, names=names, metadata=metadata)
    return rows


def dequantize_checkpoint(
    path: PathLike, output: PathLike, *, progress: Progress | None = None
) -> list[TensorInfo]:
    """Writes the float tensors of a qjax file to ``.safetensors`` or ``.npz``, by suffix.

    Tensors get their original names back where the file stores them (``qjax quantize``
    does), else their ``/``-joined paths, and a ``.safetensors`` output the metadata the
    source file had (transformers' ``from_pretrained`` needs its ``"format"`` entry).
    QArrays become their ``float_dtype`` (``.npz`` cannot hold bfloat16 and the other
    ml_dtypes floats: those are written as float32);
    other tensors are written as they are, bit for bit. One tensor is dequantized at a time.

    Returns:
      What was written: name, shape and dtype of each tensor.

    Raises:
      ValueError: for a file that is not a valid qjax checkpoint, an output suffix other
        than ``.safetensors`` / ``.npz``, or an output that is the input.

    Examples:
      >>> import os, tempfile, numpy as np, qjax
      >>> from qjax.checkpoints import plan_checkpoint, quantize_checkpoint, dequantize_checkpoint
      >>> tmp = tempfile.mkdtemp()
      >>> np.savez(os.path.join(tmp, "m.npz"), **{"fc.weight": np.ones((64, 48), np.float32)})
      >>> plan = plan_checkpoint(os.path.join(tmp, "m.npz"))
      >>> _ = quantize_checkpoint(plan, os.path.join(tmp, "q.safetensors"))
      >>> dequantize_checkpoint(os.path.join(tmp, "q.safetensors"), os.path.join(tmp, "b.npz"))
      [TensorInfo(name='fc.weight', shape=(64, 48), dtype=dtype('float32'))]
    """
    path = os.fspath(path)
    output = _check_output(output, FLOAT_SUFFIXES, path)
    npz = output.lower().endswith(".npz")
    leaves = qio.load_tensors(path, check_finite=False)  # as quantize wrote them
    infos = [
        TensorInfo(name, tuple(leaf.shape), _float_dtype(leaf, npz))
        for name, leaf in leaves.items()
    ]
    progress = progress or (lambda name, nbytes: None)

    def produce(name: str, dtype: np.dtype) -> np.ndarray:
        progress(name, 0)
        leaf = leaves.pop(name)
        if isinstance(leaf, QArray | LUTArray):
            # float64 without x64: dequantize in float32, then cast (JAX would warn)
            canonical = jax.dtypes.canonicalize_dtype(np.dtype(leaf.float_dtype)).name
            leaf = dataclasses.replace(leaf, float_dtype=canonical).dequantize()
        x = np.asarray(leaf).astype(dtype, copy=False)
        progress(name, x.nbytes)
        return x

    items = [(t.name, t.shape, t.dtype) for t in infos]
    if npz:
        write_npz(output, items, produce)
    else:
        write_safetensors(output, items, produce, qio.user_metadata(path) or None)
    return infos


def inspect_checkpoint(path: PathLike) -> list[dict[str, Any]]:
    """Report rows (:func:`qjax.report.stored_row`) of a qjax file, by original name.

    Examples:
      >>> import os, tempfile, numpy as np, qjax
      >>> from qjax.checkpoints import inspect_checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "q.safetensors")
      >>> qjax.save(path, {"w": qjax.quantize(np.ones((4, 8), np.float32), qjax.QuantSpec())})
      >>> [(r["path"], r["spec"], r["bytes_after"]) for r in inspect_checkpoint(path)]
      [('w', 'int8:symmetric:scale:per_tensor', 36)]
    """
    leaves = qio.load_tensors(path, check_finite=False)  # a kept -inf mask buffer is no damage
    return [stored_row(name, leaf) for name, leaf in leaves.items()]


def refuse_tables(plan: CheckpointPlan, method: Method) -> None:
    """A ValueError naming the first kept tensor that a lookup-table rule gives to a
    calibrated ``method`` (GPTQ, AWQ, SmoothQuant compute integer params, not tables),
    raised before any tensor is read or the model run."""
    for t, row in zip(plan.tensors, plan.rows):
        if isinstance(row.spec, TableFormat) and t.name not in plan.dropped:
            raise ValueError(table_method_error(t.name, row.pattern, row.spec, method, "tensor"))


def _calibrated_tensors(
    plan: CheckpointPlan,
    reader: Any,
    method: Method | None,
    model: Callable[..., Any] | None,
    batches: Sequence[Any] | None,
    progress: Progress,
) -> dict[str, QArray]:
    """The tensors a calibrated method quantizes, from the model run on the batches."""
    if method is None:
        if model is not None or batches is not None:
            raise ValueError(
                "a model and calibration batches are used only by a calibrated method: "
                "pass method='gptq', 'awq' or 'smoothquant'"
            )
        return {}
    refuse_tables(plan, method)
    if model is None or not callable(model) or batches is None:
        raise ValueError(
            f"method {type(method).__name__} runs the model on calibration batches: pass "
            "model=(a function model(tensors, batch)) and batches"
        )
    chosen = [
        (t, row)
        for t, row in zip(plan.tensors, plan.rows)
        if row.spec is not None and t.name not in plan.dropped
    ]
    tensors = {}
    for t in plan.tensors:
        if t.name not in plan.dropped:
            tensors[t.name] = reader.read(t.name)
    for t, row in chosen:
        if row.calibration is not None:
            raise ValueError(
                f"tensor {t.name!r}: calibration {row.calibration.method!r} is round to "
                f"nearest's; {type(method).__name__} chooses its own params: drop it"
            )
        _check_finite_tensor(t, tensors[t.name])
    progress(f"calibrating on {len(batches)} batch(es)", 0)
    names = [t.name for t, _ in chosen]
    try:
        stats = capture.accumulate(
            model, tensors, batches, paths=names, hessian=isinstance(method, (GPTQ, AWQ))
        )
    except ValueError as e:
        raise ValueError(f"{plan.path}: {e}") from None
    except Exception as e:  # the user's model function failed: its error, in one line
        raise ValueError(
            f"{plan.path}: running the model on the calibration batches failed: "
            f"{type(e).__name__}: {e}"
        ) from None
    leaves = {t.name: (tensors[t.name], row.spec, stats[t.name]) for t, row in chosen}
    shared = {}
    if isinstance(method, AWQ) and method.share_inputs:
        shared = shared_awq_scales(leaves, method)
    return {
        name: calibrated_leaf(name, x, spec, st, method, shared.get(name))
        for name, (x, spec, st) in leaves.items()
    }


def _quantize_tensor(t: TensorInfo, x: np.ndarray, row: PlanRow) -> Any:
    """One tensor by its plan row, as quantize_tree quantizes a leaf; errors name it."""
    _check_finite_tensor(t, x)
    resolution = Resolution(row.spec, row.pattern, row.layout, row.note, row.calibration, row.stack)
    return quantize_leaf(t.name, x, resolution, check_finite=False, what="tensor")


def _check_finite_tensor(t: TensorInfo, x: np.ndarray) -> None:
    bad = nonfinite_in_float32(x)
    if bad:
        raise ValueError(
            f"tensor {t.name!r} (shape {t.shape}) has {bad} NaN or inf value(s) in float32, "
            f"the precision quantization computes in; fix the checkpoint or keep it float "
            f"with --keep '{re.escape(t.name)}'"
        )


def _float_dtype(leaf: Any, npz: bool) -> np.dtype:
    """The dtype a leaf is written as: ml_dtypes integers (int4, uint2, ...) as bytes of
    the same values, ml_dtypes floats that the format cannot hold (any in npz; float4 or
    e8m0 in safetensors) as float32, which holds their values exactly."""
    dtype = np.dtype(leaf.float_dtype) if isinstance(leaf, QArray) else np.dtype(leaf.dtype)
    if dtype.kind != "V":
        return dtype
    if jnp.issubdtype(dtype, jnp.integer):
        signed = jnp.issubdtype(dtype, jnp.signedinteger)
        return np.dtype(np.int8 if signed else np.uint8)
    if npz or dtype not in ST_CODES:
        return np.dtype(np.float32)
    return dtype


def _check_output(output: PathLike, suffixes: Sequence[str], source: str) -> str:
    """Checks an output path before any work: suffix, kind of file, not the input."""
    output = os.fspath(output)
    suffix = os.path.splitext(output)[1].lower()
    if suffix not in suffixes:
        raise ValueError(
            f"{output}: unknown output suffix {suffix or '(none)'!r}; name it with "
            + " or ".join(suffixes)
        )
    target = check_target(output)
    if os.path.exists(target) and os.path.samefile(target, source):
        raise ValueError(f"{output}: is the input file; write to another path")
    return output


def _patterns(patterns: Sequence[str], flag: str) -> list[tuple[str, Callable[[str], Any]]]:
    out = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"--{flag}: patterns must be non-empty regexes, got {pattern!r}")
        try:
            out.append((pattern, re.compile(pattern).fullmatch))
        except re.error as e:
            raise ValueError(f"--{flag} {pattern!r}: invalid regex ({e})") from None
    return out


def _first(matchers: list[tuple[str, Callable[[str], Any]]], forms: Sequence[str]) -> str | None:
    return next((p for p, match in matchers if any(match(f) for f in forms)), None)


def _check_paths(tensors: Sequence[TensorInfo]) -> None:
    """Refuses names whose paths are empty, equal, or one inside the other."""
    leaves: dict[tuple[str, ...], str] = {}
    folders: dict[tuple[str, ...], str] = {}
    for t in tensors:
        path = tensor_path(t.name)
        other = leaves.get(path) or folders.get(path)
        other = other or next(
            (leaves[path[:i]] for i in range(1, len(path)) if path[:i] in leaves), None
        )
        if other is not None:
            raise ValueError(
                f"tensor names {other!r} and {t.name!r} give clashing parameter paths once "
                "split on '.' and '/' (the same path, or one inside the other); rename one"
            )
        for i in range(1, len(path)):
            folders.setdefault(path[:i], t.name)
        leaves[path] = t.name


def _insert(tree: dict[str, Any], path: Sequence[str], leaf: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = leaf
