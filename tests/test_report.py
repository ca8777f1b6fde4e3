"""qjax.report: sizes, ratios, SQNR and max error, checked against independent NumPy."""

from __future__ import annotations

import csv
import importlib
import json
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from rich.table import Table

import qjax
from qjax.report import COLUMNS, Report, format_bytes, leaf_row, report, short_spec, stored_row
from reference import reference

report_module = importlib.import_module("qjax.report")  # the module, not the function
RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 96)).astype(np.float32)

# (spec shorthand, block shape on X, bits per value, offset bytes per block)
CASES = [
    ("int8", (64, 96), 8, 0),
    ("int8:per_channel", (64, 1), 8, 0),
    ("uint8:asymmetric:per_channel:axis=0", (1, 96), 8, 4),
    ("int4:per_block:32", (32, 1), 4, 0),
    ("uint4:minval:per_block:16", (16, 1), 4, 4),
    ("int2:per_block:32", (32, 1), 2, 0),
    ("float8_e4m3fn:per_channel", (64, 1), 8, 0),
]


def np_sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return float(10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2)))


@pytest.mark.parametrize(("text", "block", "bits", "offset_bytes"), CASES)
def test_leaf_row_matches_numpy(text, block, bits, offset_bytes):
    spec = qjax.parse_spec(text)
    qa = qjax.quantize(X, spec)
    row = leaf_row("layer/kernel", X, qa)

    n_blocks = X.size // math.prod(block)
    after = X.size * bits // 8 + n_blocks * (4 + offset_bytes)
    ref = reference(X, spec.dtype, spec.scheme, spec.formulation, block)["dequantized"]
    assert set(row) == set(COLUMNS)
    assert row["path"] == "layer/kernel" and row["quantized"]
    assert row["shape"] == (64, 96) and row["dtype"] == "float32" and row["spec"] == str(spec)
    assert row["bytes_before"] == X.nbytes == 64 * 96 * 4
    assert row["bytes_after"] == after
    assert row["ratio"] == pytest.approx(X.nbytes / after)
    y = np.asarray(qa.dequantize())
    assert row["sqnr_db"] == pytest.approx(np_sqnr_db(X, y), rel=1e-12)
    assert row["max_abs_error"] == float(np.max(np.abs(X.astype(np.float64) - y)))
    # and the dequantized values are the spec's (up to float32 rounding of the formulae)
    assert row["sqnr_db"] == pytest.approx(np_sqnr_db(X, ref), rel=1e-5)
    assert row["max_abs_error"] == pytest.approx(float(np.max(np.abs(X - ref))), rel=1e-5)
    assert row["signal"] == pytest.approx(float(np.sum(X.astype(np.float64) ** 2)), rel=1e-12)


def test_unquantized_leaves_have_no_error_columns():
    bias = np.ones(96, np.float32)
    row = leaf_row("b", bias, bias)
    assert (row["spec"], row["quantized"], row["bytes_after"], row["ratio"]) == (
        "float",
        False,
        384,
        1.0,
    )
    assert row["sqnr_db"] is row["max_abs_error"] is row["noise"] is None
    assert leaf_row("step", np.int32(3), np.int32(3))["spec"] == "int32"
    half = np.ones(8, ml_dtypes.bfloat16)
    assert leaf_row("h", half, half)["spec"] == "float"


def test_exact_quantization_gives_infinite_sqnr():
    x = np.arange(-127, 128, dtype=np.float32).reshape(15, 17) * np.float32(0.5)
    row = leaf_row("w", x, qjax.quantize(x, qjax.parse_spec("int8:symmetric_with_clipping")))
    assert row["sqnr_db"] == math.inf and row["max_abs_error"] == 0.0
    zeros = np.zeros((32, 32), np.float32)
    row = leaf_row("z", zeros, qjax.quantize(zeros, qjax.QuantSpec("int8")))
    assert row["sqnr_db"] == math.inf
    assert math.copysign(1.0, row["max_abs_error"]) == 1.0  # 0, not -0 ("-0" in the table)


def test_chunked_sums_equal_one_pass(monkeypatch):
    monkeypatch.setattr(report_module, "_CHUNK", 7)
    qa = qjax.quantize(X, qjax.parse_spec("int4:per_block:32"))
    chunked = leaf_row("w", X, qa)
    monkeypatch.setattr(report_module, "_CHUNK", 1 << 20)
    whole = leaf_row("w", X, qa)
    for key in ("signal", "noise", "sqnr_db"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12)
    assert chunked["max_abs_error"] == whole["max_abs_error"]


def test_report_over_trees_and_totals():
    params = {
        "dense": {"kernel": jnp.asarray(X), "bias": jnp.zeros(96)},
        "head": {"kernel": jnp.asarray(X[:32])},
        "step": jnp.int32(7),
    }
    rules = {"dense/kernel": "int4:per_block:32", "head/kernel": "uint8:asymmetric"}
    qtree = qjax.quantize_tree(params, rules)
    rep = report(params, qtree)

    assert [r["path"] for r in rep.rows] == ["dense/bias", "dense/kernel", "head/kernel", "step"]
    x1, x2 = X, X[:32]
    y1 = np.asarray(qtree["dense"]["kernel"].dequantize())
    y2 = np.asarray(qtree["head"]["kernel"].dequantize())
    signal = np.sum(x1.astype(np.float64) ** 2) + np.sum(x2.astype(np.float64) ** 2)
    noise = np.sum((x1 - y1.astype(np.float64)) ** 2) + np.sum((x2 - y2.astype(np.float64)) ** 2)
    before = X.nbytes + 96 * 4 + x2.nbytes + 4
    after = X.size // 2 + 2 * 96 * 4 + 96 * 4 + x2.size + 4 + 4 + 4
    t = rep.totals
    assert (t["leaves"], t["quantized"]) == (4, 2)
    assert (t["bytes_before"], t["bytes_after"]) == (before, after)
    assert t["ratio"] == pytest.approx(before / after)
    assert t["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
    max_err = max(np.max(np.abs(x1 - y1)), np.max(np.abs(x2 - y2)))
    assert t["max_abs_error"] == pytest.approx(float(max_err), rel=1e-9)


def test_report_refuses_mismatched_trees():
    params = {"a": jnp.ones((32, 32)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"missing from the quantized tree \['b'\]"):
        report(params, {"a": params["a"]})
    with pytest.raises(ValueError, match="has shape"):
        leaf_row("a", np.ones((4, 8)), qjax.quantize(np.ones((8, 4)), qjax.QuantSpec("int8")))


def test_stored_row_counts_float_bytes_from_float_dtype():
    x = jnp.ones((64, 64), jnp.bfloat16)
    row = stored_row("w", qjax.quantize(x, qjax.parse_spec("int4:per_block:32")))
    assert row["bytes_before"] == 64 * 64 * 2 and row["dtype"] == "bfloat16"
    assert row["bytes_after"] == 64 * 64 // 2 + 2 * 64 * 4
    assert row["sqnr_db"] is None and row["quantized"]


def test_table_text_and_files(tmp_path):
    params = {"w": jnp.asarray(X), "b": jnp.ones(96)}
    rep = report(params, qjax.quantize_tree(params, {"w": "int4:per_block:32"}))
    assert isinstance(rep.to_table(), Table)
    text = str(rep)
    assert "int4:per_block:32:axis=-2" in text and "total" in text and "1 of 2 quantized" in text
    assert max(len(line) for line in text.splitlines()) <= 120

    rep.to_csv(tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["b", "w", "total"]
    assert rows[1]["shape"] == "64x96" and int(rows[1]["bytes_after"]) == rep.rows[1]["bytes_after"]

    exact = np.zeros((32, 32), np.float32)
    rep = Report.from_rows([leaf_row("z", exact, qjax.quantize(exact, qjax.QuantSpec("int8")))])
    rep.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"][0]["sqnr_db"] == "inf" and data["totals"]["sqnr_db"] == "inf"
    assert data["rows"][0]["shape"] == [32, 32]
    assert rep.as_dicts()[-1]["path"] == "total"


def test_stored_report_table_has_no_error_columns():
    rep = Report.from_rows([stored_row("w", qjax.quantize(X, qjax.QuantSpec("int8")))])
    assert "SQNR" not in str(rep) and rep.totals["sqnr_db"] is None


@pytest.mark.parametrize(
    ("text", "short"),
    [
        ("int8:symmetric:scale:per_tensor", "int8:per_tensor"),
        ("uint8:symmetric:zero_point:per_channel(axis=-1)", "uint8:per_channel:axis=-1"),
        ("int8:symmetric:zero_point:per_tensor", "int8:zero_point:per_tensor"),
        (
            "uint4:asymmetric:minval:per_block(axis=-2, block_size=16)",
            "uint4:asymmetric:minval:per_block:16:axis=-2",
        ),
    ],
)
def test_short_spec_is_parse_spec_shorthand(text, short):
    assert short_spec(text) == short
    assert str(qjax.parse_spec(short)) == text


def test_short_spec_names_presets_and_keeps_what_shorthand_cannot_say():
    for shorthand in ("mxfp4", "nvfp4", "mxfp8:axis=-2", "nvfp4:axis=0"):
        spec = qjax.parse_spec(shorthand)
        assert short_spec(str(spec)) == shorthand
        assert qjax.parse_spec(short_spec(str(spec))) == spec
    blocks = qjax.per_block(-1, 8, channel_axis="all")  # MX-like blocks of 8: no preset
    text = str(qjax.QuantSpec("float4_e2m1fn", granularity=blocks, scale_dtype="float8_e8m0fnu"))
    assert "channel_axis" in text and short_spec(text) == text


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3 * 2**29, "1.5 GiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_lookup_table_leaves_get_rows_with_their_real_bytes_and_error():
    from qjax.palettize import nf4

    w = np.random.default_rng(3).normal(size=(128, 64)).astype(np.float32)
    la = nf4(w)  # 4-bit codes + one float32 absmax per 64 values: 4.5 bits per weight
    (row,) = qjax.report({"w": w}, {"w": la}).rows
    assert row["quantized"] and row["spec"] == "nf4:per_block:64:axis=-2"
    assert row["bytes_after"] == 128 * 64 // 2 + 4 * (128 // 64) * 64 + 16 * 4
    error = w - np.asarray(la.dequantize(), np.float64)
    expected_sqnr = 10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum(error**2))
    assert abs(row["sqnr_db"] - expected_sqnr) < 1e-6


def test_a_nan_error_is_reported_as_nan_not_zero():
    x = X[:8, :8].copy()
    x[0, 0] = np.nan
    row = leaf_row("w", x, qjax.quantize(x, qjax.parse_spec("int8:per_channel")))
    assert math.isnan(row["max_abs_error"]) and math.isnan(row["sqnr_db"])
