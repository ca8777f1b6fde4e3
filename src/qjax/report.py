"""Per-parameter size and error tables for a quantized pytree: bytes, ratio, SQNR, max error.

A :class:`Report` holds one plain-data row per leaf and the totals. Rows come from one
``(path, float leaf, quantized leaf)`` triple at a time (:func:`leaf_row`), so a streaming
tool such as ``qjax quantize`` can build a report without keeping the float tensors;
:func:`report` does the same over two whole trees.

The errors are computed in float64 NumPy, in chunks, from the float leaf ``x`` and the
dequantized leaf ``x'``:

* ``sqnr_db = 10 * log10(sum(x**2) / sum((x - x')**2))``: ``inf`` when ``x' == x``;
* ``max_abs_error = max(|x - x'|)``.

Leaves that stayed unquantized have ``sqnr_db`` and ``max_abs_error`` None (shown as
``-``). The total SQNR pools the quantized leaves: the sum of their signal energies over the
sum of their error energies.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from qjax.granularity import per_block
from qjax.palettize import LUTArray, TableFormat
from qjax.qarray import QArray
from qjax.spec import PRESETS, QuantSpec
from qjax.tree import path_str

__all__ = [
    "COLUMNS",
    "Report",
    "format_bytes",
    "leaf_row",
    "report",
    "short_spec",
    "stored_row",
    "totals",
]

COLUMNS = (
    "path",
    "quantized",
    "shape",
    "dtype",
    "spec",
    "bytes_before",
    "bytes_after",
    "ratio",
    "sqnr_db",
    "max_abs_error",
    "signal",
    "noise",
)
"""The keys of every row: ``signal = sum(x**2)`` and ``noise = sum((x - x')**2)`` (float64;
None where unknown) let totals pool the SQNR over leaves."""

_CHUNK = 1 << 20
"""Elements per float64 chunk when summing errors: bounds the temporaries to a few MiB."""


def leaf_row(path: str, x: Any, q: Any) -> dict[str, Any]:
    """One report row from a float leaf and what it became (a QArray or the leaf itself).

    Args:
      path: the leaf's path, e.g. ``"Dense_0/kernel"``.
      x: the float (original) leaf: any array-like.
      q: the quantized leaf: a :class:`~qjax.QArray`, or an unquantized array (``x`` kept).

    Returns:
      A dict with the keys of :data:`COLUMNS`: ``bytes_before`` is ``x``'s ``nbytes``,
      ``bytes_after`` the QArray's (values + scales + offsets) or the kept leaf's own,
      ``ratio = bytes_before / bytes_after``; ``sqnr_db``, ``max_abs_error``, ``signal``
      and ``noise`` are None for unquantized leaves.

    Raises:
      ValueError: if ``q`` does not have ``x``'s shape.

    Examples:
      >>> import numpy as np, qjax
      >>> from qjax.report import leaf_row
      >>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
      >>> row = leaf_row("w", x, qjax.quantize(x, qjax.QuantSpec("int8")))
      >>> row["bytes_before"], row["bytes_after"], row["ratio"]
      (256, 68, 3.764705882352941)
      >>> round(row["sqnr_db"], 1), row["max_abs_error"] <= 1 / 127.5 / 2
      (48.1, True)
      >>> leaf_row("b", x[0], x[0])["spec"], leaf_row("b", x[0], x[0])["sqnr_db"]
      ('float', None)
    """
    x = np.asarray(x)
    before = int(x.nbytes)
    if not _quantized(q):
        after = int(np.asarray(q).nbytes)
        return _row(path, x.shape, x.dtype, _kept_spec(x.dtype), before, after, False)
    if tuple(q.shape) != tuple(x.shape):
        raise ValueError(
            f"{path!r}: the quantized leaf has shape {tuple(q.shape)} but the float leaf "
            f"{tuple(x.shape)}; pass the tree that was quantized"
        )
    signal, noise, max_err = _error_sums(x, np.asarray(_dequantize(q)))
    spec = _spec_text(q)
    return _row(path, x.shape, x.dtype, spec, before, q.nbytes, True, signal, noise, max_err)


def stored_row(path: str, leaf: Any) -> dict[str, Any]:
    """A report row from a quantized leaf alone (no float leaf), e.g. from a saved file.

    ``bytes_before`` is what the leaf takes as float (its ``float_dtype``); the error
    columns are None since the original values are unknown.

    Examples:
      >>> import numpy as np, qjax
      >>> from qjax.report import stored_row
      >>> qa = qjax.quantize(np.ones((64, 64), np.float32), qjax.parse_spec("int4:per_block:32"))
      >>> row = stored_row("w", qa)
      >>> row["bytes_before"], row["bytes_after"], row["sqnr_db"]
      (16384, 2560, None)
    """
    if not _quantized(leaf):
        leaf = np.asarray(leaf)
        return _row(
            path, leaf.shape, leaf.dtype, _kept_spec(leaf.dtype), leaf.nbytes, leaf.nbytes, False
        )
    dtype = np.dtype(leaf.float_dtype)
    before = math.prod(leaf.shape) * dtype.itemsize
    return _row(path, leaf.shape, dtype, _spec_text(leaf), before, leaf.nbytes, True)


def report(params: Any, qtree: Any) -> Report:
    """Compares a float parameter tree with its quantized version, leaf by leaf.

    Args:
      params: the float pytree that was quantized.
      qtree: the result of :func:`~qjax.quantize_tree` on ``params``: the same structure,
        with :class:`~qjax.QArray` leaves where quantized.

    Returns:
      A :class:`Report`, rows sorted by path as the trees flatten.

    Raises:
      ValueError: if the two trees do not hold the same leaf paths.

    Examples:
      >>> import jax.numpy as jnp, qjax
      >>> from qjax.report import report
      >>> params = {"dense": {"kernel": jnp.linspace(-1, 1, 4096).reshape(64, 64),
      ...                     "bias": jnp.zeros(64)}}
      >>> rep = report(params, qjax.quantize_tree(params))
      >>> for r in rep.rows:
      ...     print(r["path"], r["spec"], r["bytes_before"], r["bytes_after"])
      dense/bias float 256 256
      dense/kernel int8:symmetric:scale:per_channel(axis=-1) 16384 4352
      >>> rep.totals["bytes_before"], rep.totals["bytes_after"], round(rep.totals["ratio"], 2)
      (16640, 4608, 3.61)
      >>> print(rep)
      ┏━━━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━━┓
      ┃ path         ┃ shape    ┃ spec                     ┃   before ┃   after ┃ ratio ┃ SQNR dB ┃ max |err| ┃
      ┡━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━━┩
      │ dense/bias   │ (64,)    │ float                    │    256 B │   256 B │  1.00 │       - │         - │
      │ dense/kernel │ (64, 64) │ int8:per_channel:axis=-1 │ 16.0 KiB │ 4.2 KiB │  3.76 │    47.5 │   0.00392 │
      ├──────────────┼──────────┼──────────────────────────┼──────────┼─────────┼───────┼─────────┼───────────┤
      │ total        │          │ 1 of 2 quantized         │ 16.2 KiB │ 4.5 KiB │  3.61 │    47.5 │   0.00392 │
      └──────────────┴──────────┴──────────────────────────┴──────────┴─────────┴───────┴─────────┴───────────┘
    """  # noqa: E501
    floats = _leaves_by_path(params)
    quants = _leaves_by_path(qtree)
    if floats.keys() != quants.keys():
        missing = sorted(floats.keys() - quants.keys())
        extra = sorted(quants.keys() - floats.keys())
        raise ValueError(
            f"the trees do not match: missing from the quantized tree {missing}, not in the "
            f"float tree {extra}; pass the float tree and its quantize_tree result"
        )
    return Report.from_rows([leaf_row(p, floats[p], quants[p]) for p in floats])


@dataclasses.dataclass(frozen=True)
class Report:
    """Rows of per-leaf sizes and errors, and their totals.

    Attributes:
      rows: one dict per leaf, keys :data:`COLUMNS` (plain Python values).
      totals: ``leaves``, ``quantized`` (counts), ``bytes_before``, ``bytes_after``,
        ``ratio``, ``sqnr_db`` (pooled over the quantized leaves with known errors, else
        None), ``max_abs_error`` (the largest, or None).
    """

    rows: list[dict[str, Any]]
    totals: dict[str, Any]

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]]) -> Report:
        """A report of these rows (from :func:`leaf_row` / :func:`stored_row`), with totals."""
        rows = list(rows)
        return cls(rows=rows, totals=totals(rows))

    def as_dicts(self) -> list[dict[str, Any]]:
        """The rows followed by a ``path="total"`` row, as new dicts."""
        total = {k: None for k in COLUMNS} | {"path": "total", "spec": ""}
        total |= {k: v for k, v in self.totals.items() if k in COLUMNS}
        return [dict(r) for r in self.rows] + [total]

    def to_table(self, title: str | None = None) -> Table:
        """A :class:`rich.table.Table`: one line per leaf, then the totals.

        Specs are shown as :func:`~qjax.parse_spec` shorthand. The SQNR and error columns
        are left out when no row has them (a report of a saved file).
        """
        errors = any(r["noise"] is not None for r in self.rows)
        names = ("before", "after", "ratio") + (("SQNR dB", "max |err|") if errors else ())
        table = Table(title=title, show_edge=True, header_style="bold")
        table.add_column("path", overflow="fold")
        table.add_column("shape", no_wrap=True)
        table.add_column("spec", no_wrap=True)
        for name in names:
            table.add_column(name, justify="right", no_wrap=True)
        for r in self.rows:
            table.add_row(*_cells(r)[: 3 + len(names)])
        table.add_section()
        t = self.totals
        spec = f"{t['quantized']} of {t['leaves']} quantized"
        total = _cells(t | {"path": "total", "shape": None, "spec": spec})
        table.add_row(*total[: 3 + len(names)], style="bold")
        return table

    def __str__(self) -> str:
        console = Console(
            file=io.StringIO(), width=120, no_color=True, color_system=None, record=True
        )
        console.print(self.to_table())
        return console.export_text().rstrip("\n")

    def to_csv(self, path: str | os.PathLike) -> None:
        """Writes :meth:`as_dicts` as CSV (shape as ``64x64``; empty cells for None)."""
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for r in self.as_dicts():
                writer.writerow(r | {"shape": "x".join(map(str, r["shape"] or ()))})

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes ``{"rows": [...], "totals": {...}}`` as JSON; an infinite SQNR is ``"inf"``."""
        data = {"rows": self.rows, "totals": self.totals}
        with open(path, "w") as f:
            json.dump(_json_safe(data), f, indent=1, allow_nan=False)
            f.write("\n")


def totals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals of report rows: counts, bytes, ratio, pooled SQNR and the largest error."""
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    known = [r for r in rows if r["noise"] is not None]
    errors = [r["max_abs_error"] for r in known]
    signal = math.fsum(r["signal"] for r in known) if known else None
    noise = math.fsum(r["noise"] for r in known) if known else None
    return {
        "leaves": len(rows),
        "quantized": sum(1 for r in rows if r["quantized"]),
        "bytes_before": before,
        "bytes_after": after,
        "ratio": _ratio(before, after),
        "sqnr_db": _sqnr_db(signal, noise) if known else None,
        "max_abs_error": max(errors) if errors else None,
        "signal": signal,
        "noise": noise,
    }


def _row(
    path: str,
    shape: Sequence[int],
    dtype: Any,
    spec: str,
    before: int,
    after: int,
    quantized: bool,
    signal: float | None = None,
    noise: float | None = None,
    max_err: float | None = None,
) -> dict[str, Any]:
    return {
        "path": path,
        "quantized": quantized,
        "shape": tuple(int(d) for d in shape),
        "dtype": np.dtype(dtype).name,
        "spec": spec,
        "bytes_before": int(before),
        "bytes_after": int(after),
        "ratio": _ratio(before, after),
        "sqnr_db": None if noise is None else _sqnr_db(signal, noise),
        "max_abs_error": max_err,
        "signal": signal,
        "noise": noise,
    }


def _kept_spec(dtype: Any) -> str:
    """``"float"`` for a floating leaf left as it was, else its dtype name (``"int32"``)."""
    return "float" if jnp.issubdtype(dtype, jnp.floating) else np.dtype(dtype).name


def _error_sums(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """``sum(x**2)``, ``sum((x - y)**2)`` and ``max|x - y|`` in float64, chunk by chunk."""
    x, y = x.reshape(-1), y.reshape(-1)
    signal = noise = max_err = 0.0
    xbuf = np.empty(min(x.size, _CHUNK), np.float64)
    ebuf = np.empty_like(xbuf)
    for start in range(0, x.size, _CHUNK):
        n = min(_CHUNK, x.size - start)
        xc, err = xbuf[:n], ebuf[:n]
        xc[...] = x[start : start + n]
        np.subtract(xc, y[start : start + n], out=err)
        signal += float(np.dot(xc, xc))
        noise += float(np.dot(err, err))
        max_err = abs(float(np.max([max_err, err.max(), -err.min()])))  # NaN stays NaN; no -0
    return signal, noise, max_err


@jax.jit
def _dequantize(q: QArray | LUTArray) -> jax.Array:
    return q.dequantize()


def _quantized(leaf: Any) -> bool:
    return isinstance(leaf, QArray | LUTArray)


def _spec_text(q: QArray | LUTArray) -> str:
    """The spec of a QArray; for a lookup-table array the rule shorthand that builds it
    (:meth:`qjax.palettize.TableFormat.of`, e.g. ``"nf4:per_block:64:axis=-2"``), else its
    index bits, table count and whether it is scaled, e.g. ``"lut2:tables=1"``."""
    if isinstance(q, QArray):
        return str(q.spec)
    fmt = TableFormat.of(q)
    if fmt is not None:
        return str(fmt)
    tables = math.prod(q.table.shape[:-1])
    return f"lut{q.bits}:tables={tables}" + (":scaled" if q.scale is not None else "")


def _sqnr_db(signal: float, noise: float) -> float:
    """``10 * log10(signal / noise)``, with the ratio taken apart into mantissas and a power
    of two, so that it cannot overflow or underflow (a huge signal over a tiny noise)."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    (s, s_exp), (n, n_exp) = math.frexp(signal), math.frexp(noise)
    return 10 * (math.log10(s / n) + (s_exp - n_exp) * math.log10(2))


def _ratio(before: int, after: int) -> float:
    if after == 0:
        return 1.0 if before == 0 else math.inf
    return before / after


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_quantized)
    return {path_str(p): leaf for p, leaf in leaves[0]}


def _cells(r: dict[str, Any]) -> list[str]:
    shape = r["shape"]
    return [
        str(r["path"]),
        "" if shape is None else str(tuple(shape)),
        short_spec(str(r["spec"])),
        format_bytes(r["bytes_before"]),
        format_bytes(r["bytes_after"]),
        f"{r['ratio']:.2f}",
        "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}",
        "-" if r["max_abs_error"] is None else f"{r['max_abs_error']:.3g}",
    ]


def short_spec(text: str) -> str:
    """A spec string as :func:`~qjax.parse_spec` shorthand without defaults, where possible.

    Examples:
      >>> from qjax.report import short_spec
      >>> short_spec("int4:symmetric:scale:per_block(axis=-2, block_size=32)")
      'int4:per_block:32:axis=-2'
      >>> short_spec("uint8:asymmetric:zero_point:per_channel(axis=0)")
      'uint8:asymmetric:per_channel:axis=0'
      >>> import qjax
      >>> nvfp4, mxfp4 = qjax.parse_spec("nvfp4"), qjax.parse_spec("mxfp4:axis=-2")
      >>> short_spec(str(nvfp4)), short_spec(str(mxfp4))
      ('nvfp4', 'mxfp4:axis=-2')
    """
    preset = _preset(text)
    if preset is not None:
        return preset
    match = _SPEC_RE.fullmatch(text)
    if match is None:
        return text
    dtype, scheme, formulation, kind, axis, block, scale = match.groups()
    try:
        default = QuantSpec(dtype, scheme).formulation
    except (ValueError, TypeError):
        return text
    parts = [dtype]
    parts += [] if scheme == "symmetric" else [scheme]
    parts += [] if formulation == default else [formulation]
    parts += [kind] + ([block] if block else []) + ([f"axis={axis}"] if axis else [])
    parts += [scale] if scale else []
    return ":".join(parts)


def _preset(text: str) -> str | None:
    """The preset shorthand (``"mxfp4"``, ``"nvfp4:axis=-2"``) a spec string stands for."""
    match = _PRESET_RE.fullmatch(text)
    if match is None:
        return None
    axis = int(match.group(1))
    for name, preset in PRESETS.items():
        blocks = per_block(axis, preset.block_size, channel_axis="all")
        if str(QuantSpec(name, granularity=blocks)) == text:
            return name if axis == -1 else f"{name}:axis={axis}"
    return None


_PRESET_RE = re.compile(r".*:per_block\(axis=(-?\d+), block_size=\d+, channel_axis='all'\).*")
_SPEC_RE = re.compile(
    r"(\w+):(\w+):(\w+):(per_tensor|per_channel|per_block)"
    r"(?:\(axis=(-?\d+)(?:, block_size=(\d+))?\))?(?::(scale=\w+))?"
)


def format_bytes(n: int) -> str:
    """Bytes in binary units with one decimal: ``512 B``, ``4.0 KiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
