"""``qjax demo``: the quick run end to end, its files checked against each other and
against an independent quantization of the float CNN it saved; configs; bad options."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pathlib
import re
import sys
import tomllib

import numpy as np
import pytest

import qjax
from qjax.cli import main
from qjax.demo import digits, sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["demo", "--quick", "--out", str(out)])
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    with open(out / "results.json") as f:
        data = json.load(f)
    return {
        "code": code,
        "out": out,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "csv": csv_rows,
        "meta": data["meta"],
        "rows": data["rows"],
    }


def test_quick_run_writes_every_file(quick_run: dict):
    assert quick_run["code"] == 0, quick_run["stderr"]
    for name in sweep.FILES:
        assert (quick_run["out"] / name).is_file(), name
    for name in ("accuracy_vs_bytes.png", "sqnr_vs_block_size.png"):
        content = (quick_run["out"] / name).read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 5000, name
    assert "qjax: error" not in quick_run["stderr"]
    assert "\x1b[" not in quick_run["stderr"]  # no progress bar where stderr is no terminal
    stdout = quick_run["stdout"]
    assert "int4:per_channel" in stdout and "+QAT" in stdout
    assert os.path.abspath(quick_run["out"]) in stdout.splitlines()[-1]


def test_csv_and_json_hold_the_same_rows(quick_run: dict):
    csv_rows, rows = quick_run["csv"], quick_run["rows"]
    assert [r["config"] for r in csv_rows] == [r["config"] for r in rows]
    assert len({r["config"] for r in rows}) == len(rows)
    for c, j in zip(csv_rows, rows):
        assert list(c) == list(sweep.COLUMNS)
        for key in sweep.COLUMNS:
            value = j[key]
            if value is None:
                assert c[key] == "", (key, c)
            elif isinstance(value, bool):
                assert c[key] == str(value)
            elif isinstance(value, (int, float)):
                assert float(c[key]) == value, (key, c, j)
            else:
                assert c[key] == value
    meta = quick_run["meta"]
    assert meta["ptq_configs"] == sum(r["method"] == "ptq" for r in rows)
    assert meta["qat_configs"] == sum(r["method"] == "qat" for r in rows) >= 1


def test_float_row_and_accuracy_bounds(quick_run: dict):
    rows = quick_run["rows"]
    float_row = rows[0]
    assert float_row["method"] == "float" and float_row["config"] == "float32"
    assert float_row["accuracy"] >= 0.9
    assert float_row["compression"] == 1.0 and float_row["mean_sqnr_db"] is None
    for r in rows[1:]:
        assert 0 <= r["accuracy"] <= 1
        assert r["accuracy_drop"] == pytest.approx(float_row["accuracy"] - r["accuracy"])
        assert r["weight_bytes"] < float_row["weight_bytes"]
        assert r["compression"] == pytest.approx(float_row["weight_bytes"] / r["weight_bytes"])
        assert r["mean_sqnr_db"] == pytest.approx(np.mean(list(r["kernel_sqnr_db"].values())))


def test_qat_rows_fine_tune_the_worst_ptq_configs(quick_run: dict):
    rows = quick_run["rows"]
    ptq = [r for r in rows if r["method"] == "ptq"]
    qat = [r for r in rows if r["method"] == "qat"]
    assert len(qat) == sweep.QUICK.qat_top
    worst = max(r["accuracy_drop"] for r in ptq)
    (twin,) = [r for r in ptq if r["rules"] == qat[0]["rules"]]
    assert twin["accuracy_drop"] == worst
    assert qat[0]["config"] == twin["config"] + " +QAT"
    assert qat[0]["weight_bytes"] == twin["weight_bytes"]


def test_pareto_flags(quick_run: dict):
    rows = quick_run["rows"]

    def dominated(r: dict) -> bool:
        return any(
            o["weight_bytes"] <= r["weight_bytes"]
            and o["accuracy"] >= r["accuracy"]
            and (o["weight_bytes"] < r["weight_bytes"] or o["accuracy"] > r["accuracy"])
            for o in rows
        )

    assert [r["pareto"] for r in rows] == [not dominated(r) for r in rows]
    assert any(r["pareto"] for r in rows)


def _load_float_params(path: os.PathLike) -> dict:
    tree: dict = {}
    with np.load(path) as npz:
        for name in npz.files:
            node = tree
            *folders, leaf = name.split("/")
            for key in folders:
                node = node.setdefault(key, {})
            node[leaf] = npz[name]
    return tree


@pytest.mark.parametrize(
    "pick",
    [
        lambda r: r["granularity"] == "per_block" and "conv2" in r["per_channel_fallback"],
        lambda r: r["formulation"] == "minval" and r["granularity"] == "per_channel",
        lambda r: r["dtype"] == "mxfp4",
    ],
    ids=["per_block_with_fallback", "minval", "mxfp4"],
)
def test_a_row_matches_an_independent_quantization(quick_run: dict, pick):
    """Re-quantizes the saved float CNN with the row's rules, eagerly, and compares bytes,
    compression and SQNR with qjax.report, and the accuracy with digits.accuracy."""
    row = next(r for r in quick_run["rows"] if r["method"] == "ptq" and pick(r))
    variables = _load_float_params(quick_run["out"] / "float_params.npz")
    params = variables["params"]
    assert set(params) == set(row["rules"]) == {"conv1", "conv2", "fc1", "head"}
    rules = {f"params/{name}/kernel": spec for name, spec in row["rules"].items()}
    quantized = qjax.quantize_tree(variables, rules, min_size=0)

    rep = qjax.report(params, quantized["params"])
    assert rep.totals["bytes_before"] == quick_run["rows"][0]["weight_bytes"]
    assert rep.totals["bytes_after"] == row["weight_bytes"]
    assert rep.totals["ratio"] == pytest.approx(row["compression"], rel=1e-12)
    kernels = {r["path"].split("/")[0]: r["sqnr_db"] for r in rep.rows if r["quantized"]}
    assert set(kernels) == set(row["kernel_sqnr_db"])
    for name, sqnr in kernels.items():
        assert row["kernel_sqnr_db"][name] == pytest.approx(sqnr, rel=1e-9, abs=1e-9)
    assert row["mean_sqnr_db"] == pytest.approx(np.mean(list(kernels.values())), rel=1e-9)

    data = digits.load_data(quick_run["meta"]["seed"])
    dequantized = qjax.dequantize_tree(quantized)
    acc = digits.accuracy(digits.CNN(), dequantized, data.x_test, data.y_test)
    assert acc == row["accuracy"]


def test_configs_are_valid_and_fallbacks_honest():
    shapes = {"conv1": (3, 3, 1, 16), "conv2": (3, 3, 16, 32), "fc1": (2048, 64), "head": (64, 10)}
    configs = sweep.sweep_configs(shapes, sweep.FULL)
    # signed ints: 5 (scheme, formulation) pairs, unsigned: 4 (no scale), floats: 1;
    # 6 granularities each; one mxfp4.
    assert len(configs) == (3 * 5 + 2 * 4 + 3 * 1) * 6 + 1
    assert len({c.label for c in configs}) == len(configs)
    for c in configs:
        if c.dtype.startswith("uint"):
            assert c.formulation != "scale"
        if c.dtype.startswith("float"):
            assert (c.scheme, c.formulation) == ("symmetric", "scale")
        for name, text in c.rules:
            spec = qjax.parse_spec(text)
            assert spec.formulation == c.formulation and spec.scheme == c.scheme
            qjax.block_shape(shapes[name], spec.granularity)  # every rule fits its kernel
            fell_back = name in c.fallback
            assert fell_back == (spec.granularity.kind != c.granularity.replace("mx", "per_block"))
            if fell_back:
                assert spec.granularity.kind == "per_channel"
        if c.granularity == "per_block":
            assert "conv1" in c.fallback  # one input channel: no block fits
            assert ("conv2" in c.fallback) == (c.block_size > 16)
            assert c.label.endswith(f"({','.join(c.fallback)} per_channel)")
        else:
            assert c.granularity == "mx" or not c.fallback


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtypes", "int8,int5"], "unknown dtype(s) 'int5'"),
        (["--dtypes", ","], "no dtype"),
        (["--steps", "0"], "must be > 0"),
        (["--qat-top", "-1"], "must be >= 0"),
        (["--out", "FILE"], "exists and is not a directory"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    file = tmp_path / "file.txt"
    file.write_text("x")
    args = [str(file) if a == "FILE" else a for a in args]
    assert main(["demo", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qjax: error: "), captured.err
    assert message in lines[0]


def test_stage_lines_where_stderr_is_no_terminal(quick_run: dict):
    """In a log, each long step prints where it is: a line when it starts and at each
    quarter, with the seconds since the start, so a CI log is never minutes of silence."""
    lines = quick_run["stderr"].splitlines()
    stage = re.compile(r"\[ *(\d+) s\] (.+): (\d+)/(\d+)(, done)?")
    matches = [stage.fullmatch(line) for line in lines]
    assert all(matches), lines
    steps = sweep.QUICK.steps
    stages = {m[2]: [] for m in matches}
    for m in matches:
        stages[m[2]].append((int(m[3]), int(m[4]), bool(m[5])))
    qat = [name for name in stages if name.startswith("QAT ")]
    assert list(stages) == ["train float CNN", "PTQ sweep", *qat]
    assert len(qat) == sweep.QUICK.qat_top
    assert stages["train float CNN"] == [(k * steps // 4, steps, k == 4) for k in range(5)]
    n = quick_run["meta"]["ptq_configs"]
    assert stages["PTQ sweep"][0] == (0, n, False) and stages["PTQ sweep"][-1] == (n, n, True)
    seconds = [int(m[1]) for m in matches]
    assert seconds == sorted(seconds)


def test_stage_lines_print_each_quarter_once():
    out = io.StringIO()
    ticks = iter(range(100))
    lines = sweep.StageLines(out, clock=lambda: float(next(ticks)))
    task = lines.add_task("QAT int2", total=6)
    for done in (1, 2, 2, 3, 5, 6, 6):
        lines.update(task, completed=done)
    assert out.getvalue().splitlines() == [
        "[   1 s] QAT int2: 0/6",
        "[   2 s] QAT int2: 2/6",  # 2/6: first quarter (1/6 is not)
        "[   3 s] QAT int2: 3/6",  # half
        "[   4 s] QAT int2: 5/6",  # three quarters
        "[   5 s] QAT int2: 6/6, done",
    ]


PYPROJECT = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9._-]+", r)[0].lower().replace("_", "-") for r in requirements}


def test_demo_packages_are_an_extra_not_library_dependencies():
    """`pip install qjax` brings what the library imports; the demo's packages are the
    `demo` extra, and qjax.demo names exactly those when they are missing."""
    project = PYPROJECT["project"]
    demo = _names(project["optional-dependencies"]["demo"])
    assert demo == {"optax", "scikit-learn", "matplotlib"}
    assert not demo & _names(project["dependencies"])
    from qjax import demo as demo_package

    assert {dist for _, dist in demo_package.EXTRA} == demo


@pytest.mark.parametrize(
    "module, dist", [("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"), ("optax", "optax")]
)
def test_demo_without_the_extra_is_one_line(monkeypatch, capsys, tmp_path, module, dist):
    """Without the extra, `qjax demo` says what to install, in one line, before any work."""
    for name in [m for m in sys.modules if m == "qjax.demo" or m.startswith("qjax.demo.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"qjax: error: qjax demo needs {dist} (the demo extra, which the library does not "
        'need): pip install "qjax[demo]"'
    ]
    assert not out.exists()
