"""Lookup-table rules: nf4 / lutN shorthand in quantize_tree, plan, the CLI and its errors.

The reference for every quantized leaf is a direct call of qjax.palettize.nf4 / palettize
with the axes the leaf's layout implies (Flax kernels [in, out]: blocks along 0, output
channels on -1; PyTorch weights [out, in]: channels on 0, blocks along 1). NF4 codes are
also checked against plain NumPy on one leaf, with the 16 levels rebuilt from QLoRA's
construction (normal quantiles, standard library only).
"""

from __future__ import annotations

import json
from statistics import NormalDist

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qjax
from qjax.checkpoints import plan_checkpoint, quantize_checkpoint
from qjax.cli import main
from qjax.flax import linen as qlinen
from qjax.palettize import (
    NF4_LEVELS,
    LUTArray,
    TableFormat,
    nf4,
    palettize,
    per_grouped_channel,
    quantize_to_table,
)
from qjax.rules import Calibration, LeafRule, parse_leaf_rule, parse_rules, parse_spec

RNG = np.random.default_rng(0)


def normal(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


KERNEL = normal(128, 64)  # Flax Dense kernel [in, out]
WEIGHT = normal(64, 128)  # PyTorch Linear weight [out, in]
BIAS = normal(64)


def assert_same_lut(got: object, want: LUTArray) -> None:
    assert isinstance(got, LUTArray), type(got)
    assert (got.bits, got.pad, got.float_dtype) == (want.bits, want.pad, want.float_dtype)
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_array_equal(np.asarray(got.table), np.asarray(want.table))
    if want.scale is None:
        assert got.scale is None
    else:
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))


def params_leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


# Shorthand: parse, print, round trip.


@pytest.mark.parametrize(
    ("text", "printed", "fields", "template"),
    [
        ("nf4", "nf4:per_block:64", ("nf4", 4, 64, None, False, -2), True),
        ("nf4:per_block:128", "nf4:per_block:128", ("nf4", 4, 128, None, False, -2), True),
        (" nf4 : axis=1 ", "nf4:per_block:64:axis=1", ("nf4", 4, 64, None, False, 1), False),
        ("lut4", "lut4:per_tensor", ("kmeans", 4, None, None, False, None), False),
        ("lut1:per_tensor", "lut1:per_tensor", ("kmeans", 1, None, None, False, None), False),
        ("lut3:scaled", "lut3:per_tensor:scaled", ("kmeans", 3, None, None, True, -1), True),
        (
            "lut8:scaled:per_grouped_channel:16",
            "lut8:per_grouped_channel:16:scaled",
            ("kmeans", 8, None, 16, True, -1),
            True,
        ),
        (
            "lut6:per_grouped_channel:2:axis=0",
            "lut6:per_grouped_channel:2:axis=0",
            ("kmeans", 6, None, 2, False, 0),
            False,
        ),
    ],
)
def test_table_shorthand_parses_prints_and_round_trips(text, printed, fields, template):
    rule = parse_leaf_rule(text)
    names = ("kind", "bits", "block_size", "group_size", "scaled", "axis")
    assert rule.spec == TableFormat(**dict(zip(names, fields)))
    assert rule.template is template and rule.calibration is None
    assert str(rule) == printed
    again = parse_leaf_rule(printed)
    assert again == rule
    # the format's own text (axes written out) reads back as the same format
    assert parse_leaf_rule(str(rule.spec)).spec == rule.spec


def test_rule_lists_and_command_line_strings_take_tables():
    rules = parse_rules(
        [".*mlp.*=nf4:per_block:32", ("attn", "lut2:per_grouped_channel:4"), (".*", None)]
    )
    assert [p for p, _ in rules] == [".*mlp.*", "attn", ".*"]
    assert rules[0][1].spec == TableFormat("nf4", block_size=32)
    assert rules[1][1].spec == TableFormat("kmeans", 2, group_size=4)
    fmt = TableFormat("kmeans", 3, scaled=True, axis=0)
    assert parse_rules({"w": fmt})[0][1] == LeafRule(fmt)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nf4:mse", r"calibration 'mse' does not apply to lookup tables \(nf4 scales each"),
        ("lut4:percentile=99.9", r"calibration 'percentile=99.9' does not apply .*k-means"),
        ("lut4:absmax", "calibration 'absmax' does not apply"),
        ("nf4:asymmetric", "'asymmetric' is an option of integer and float specs"),
        ("lut4:scale=bfloat16", "a lookup table has none: drop it"),
        ("nf4:tensor_scale", "a lookup table has none"),
        ("nf4:64", "write nf4:per_block:64"),
        ("lut4:16", "write lut4:per_grouped_channel:16"),
        ("lut5", r"lookup tables take lut1, lut2, lut3, lut4, lut6, lut8 \('lut5'"),
        ("lut16", "'lut16' would need 16-bit indices"),
        ("nf4:per_channel", "write nf4:per_block:SIZE"),
        ("nf4:per_grouped_channel:16", "write nf4:per_block:SIZE"),
        ("nf4:scaled", "nf4 always scales its blocks"),
        ("lut4:per_channel", "lut4:per_grouped_channel:1"),
        ("lut4:per_block:32", "nf4:per_block:SIZE"),
        ("lut4:axis=0", "'axis=0' has no meaning for one table per tensor"),
        ("lut4:per_tensor:axis=0", "no meaning for one table per tensor"),
        ("nf4:per_block", "per_block needs a block size after it"),
        ("lut4:per_grouped_channel", "per_grouped_channel needs a group size after it"),
        ("lut4:per_grouped_channel:0", "group size '0' must be a positive integer"),
        ("nf4:per_block:-64", "block size '-64' must be a positive integer"),
        ("nf4:axis=x", "'axis=x' needs an integer"),
        ("lut4:scaled:scaled", "'scaled' repeats"),
        ("lut4:per_tensor:per_grouped_channel:4", "'per_grouped_channel' contradicts"),
        ("nf4:per_block:32:per_block:64", "'per_block' repeats"),
        ("nf4:int8", "'int8' is a second format after 'nf4'"),
        ("lut4:nf4", "'nf4' is a second format"),
        ("lut4:banana", r"cannot read 'banana'; lut4 takes per_tensor"),
        ("nf4:", "empty token"),
    ],
)
def test_bad_table_tokens_are_refused_with_what_to_write(text, message):
    with pytest.raises(ValueError, match=message):
        parse_leaf_rule(text)
    with pytest.raises(ValueError, match=rf"rule 'w': spec {text!r}"):
        parse_rules({"w": text})


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kind": "int4"}, ValueError, "kind must be one of"),
        ({"kind": "nf4", "bits": 3}, ValueError, "nf4 has 4-bit codes"),
        ({"kind": "nf4", "scaled": True}, ValueError, "nf4 has 4-bit codes"),
        ({"kind": "kmeans", "bits": 5}, ValueError, r"bits must be one of \(1, 2, 3, 4, 6, 8\)"),
        ({"kind": "kmeans", "block_size": 64}, ValueError, "block_size is NF4's"),
        ({"kind": "kmeans", "axis": 0}, ValueError, "axis=0 has no meaning"),
        ({"kind": "kmeans", "group_size": 0}, ValueError, "group_size must be a positive"),
        ({"kind": "nf4", "block_size": 2.0}, TypeError, "block_size must be an int"),
        ({"kind": "kmeans", "scaled": 1}, TypeError, "scaled must be True or False"),
    ],
)
def test_bad_table_formats_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        TableFormat(**kwargs)


def test_a_table_takes_no_calibration_and_is_no_quant_spec():
    with pytest.raises(ValueError, match="calibration 'mse' does not apply to the lookup table"):
        LeafRule(TableFormat("nf4"), Calibration("mse"))
    with pytest.raises(ValueError, match=r"'nf4' is a lookup-table format .* not a QuantSpec"):
        parse_spec("nf4")
    with pytest.raises(ValueError, match=r"for QAT qjax\.palettize\.fake_nf4 or fake_palettize"):
        qjax.quantize(KERNEL, "lut4:per_tensor")


def test_flax_qat_rules_refuse_tables_instead_of_ignoring_them():
    model = nn.Dense(8)
    x = jnp.ones((2, 16))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"rule '\.\*kernel': spec 'nf4' is a lookup-table"):
        with qlinen.intercept({".*kernel": "nf4"}):
            model.apply(variables, x)
    with pytest.raises(TypeError, match="got TableFormat"):
        with qlinen.intercept({".*kernel": TableFormat("nf4")}):
            model.apply(variables, x)


# Layouts: quantize_tree equals the direct call with the layout's axes.


def test_nf4_codes_match_numpy_nearest_published_level():
    # QLoRA's construction (bitsandbytes create_normal_map): 8 positive and 7 negative
    # normal quantiles between offset and 1/2, an exact zero, scaled to [-1, 1].
    offset, ppf = 0.9677083, NormalDist().inv_cdf
    pos = [ppf(offset + (0.5 - offset) * i / 8) for i in range(8)]
    neg = [-ppf(offset + (0.5 - offset) * i / 7) for i in range(7)]
    levels = np.sort(np.array(pos + [0.0] + neg))
    levels /= levels.max()
    np.testing.assert_allclose(NF4_LEVELS, levels, atol=1e-6)

    w = normal(128, 8)  # a Flax kernel: blocks of 64 along the 128 inputs
    got = qjax.quantize_tree({"kernel": w}, {"kernel": "nf4"})["kernel"]
    blocks = w.reshape(2, 64, 8)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    normalized = (blocks / absmax).reshape(128, 8)  # float32 IEEE division
    codes = np.abs(normalized[..., None] - levels).argmin(axis=-1)
    np.testing.assert_array_equal(np.asarray(got.codes()), codes)
    np.testing.assert_array_equal(np.asarray(got.scale), absmax.reshape(2, 8))
    want = levels[codes] * np.repeat(absmax.reshape(2, 8), 64, axis=0)
    np.testing.assert_allclose(np.asarray(got.dequantize()), want, rtol=1e-6)


@pytest.mark.parametrize(
    ("rule", "direct_flax", "direct_torch"),
    [
        ("nf4", lambda w: nf4(w, axis=-2), lambda w: nf4(w, axis=1)),
        ("nf4:per_block:32", lambda w: nf4(w, -2, 32), lambda w: nf4(w, 1, 32)),
        (
            "lut2:per_grouped_channel:8",
            lambda w: palettize(w, 2, per_grouped_channel(-1, 8)),
            lambda w: palettize(w, 2, per_grouped_channel(0, 8)),
        ),
        (
            "lut3:scaled",
            lambda w: palettize(w, 3, per_channel_scale=-1),
            lambda w: palettize(w, 3, per_channel_scale=0),
        ),
    ],
)
def test_quantize_tree_follows_both_layouts(rule, direct_flax, direct_torch):
    params = {"Dense_0": {"kernel": KERNEL}, "fc.weight": WEIGHT}
    q = qjax.quantize_tree(params, {".*": rule})
    assert_same_lut(q["Dense_0"]["kernel"], direct_flax(KERNEL))
    assert_same_lut(q["fc.weight"], direct_torch(WEIGHT))
    # forcing a layout reads every leaf in it: the kernel as [out, in] now
    forced = qjax.quantize_tree(params, {".*": rule}, layout="torch")
    assert_same_lut(forced["Dense_0"]["kernel"], direct_torch(KERNEL))


def test_grouped_scaled_tables_and_embeddings_follow_the_layout():
    emb = normal(64, 32)  # [vocab, features]: rows are the channels, blocks along features
    params = {"Embed_0": {"embedding": emb}, "model.embed_tokens.weight": emb, "k": KERNEL}
    rules = {".*embed.*": "nf4:per_block:16", "k": "lut2:per_grouped_channel:16:scaled"}
    q = qjax.quantize_tree(params, rules)
    assert_same_lut(q["Embed_0"]["embedding"], nf4(emb, axis=1, block_size=16))
    assert_same_lut(q["model.embed_tokens.weight"], nf4(emb, axis=1, block_size=16))
    want = palettize(KERNEL, 2, per_grouped_channel(-1, 16), per_channel_scale=-1)
    assert_same_lut(q["k"], want)


def test_explicit_axes_and_table_format_objects_are_used_as_given():
    params = {"fc.weight": WEIGHT, "Dense_0/kernel": KERNEL}
    rules = {"fc.weight": "nf4:per_block:16:axis=0", ".*": TableFormat("kmeans", 1, group_size=4)}
    q = qjax.quantize_tree(params, rules)
    assert_same_lut(q["fc.weight"], nf4(WEIGHT, axis=0, block_size=16))
    # a TableFormat object is not a template: group along its axis -1 whatever the layout
    assert_same_lut(q["Dense_0/kernel"], palettize(KERNEL, 1, per_grouped_channel(-1, 4)))


def test_conv_kernels_block_inputs_in_both_layouts():
    flax_conv, torch_conv = normal(3, 3, 64, 16), normal(16, 64, 3, 3)
    q = qjax.quantize_tree(
        {"Conv_0": {"kernel": flax_conv}, "conv.weight": torch_conv}, {".*": "nf4"}
    )
    assert_same_lut(q["Conv_0"]["kernel"], nf4(flax_conv, axis=-2))
    assert_same_lut(q["conv.weight"], nf4(torch_conv, axis=1))


# min_size, catch-alls, fallbacks, plans.


def test_catch_all_table_rules_leave_small_and_1d_leaves_float_named_rules_do_not():
    bias, small, ids = normal(64), normal(16, 32), np.arange(4096).reshape(64, 64)
    params = {"d": {"kernel": KERNEL, "bias": bias, "small": small}, "ids": ids}
    q = qjax.quantize_tree(params, {".*": "nf4"})
    assert isinstance(q["d"]["kernel"], LUTArray)
    assert q["d"]["bias"] is bias and q["d"]["small"] is small and q["ids"] is ids
    named = qjax.quantize_tree(params, {".*bias": "nf4", ".*small": "lut2"}, min_size=0)
    assert_same_lut(named["d"]["bias"], nf4(bias, axis=-1))
    assert_same_lut(named["d"]["small"], palettize(small, 2))
    default = qjax.quantize_tree(params, qjax.default_rules("nf4"))
    assert isinstance(default["d"]["kernel"], LUTArray) and default["d"]["small"] is small


def test_fallbacks_one_block_or_table_per_channel_or_a_clear_error():
    w = normal(96, 24)  # 96 inputs: blocks of 64 do not fit; 24 outputs: groups of 16 do not
    plan = qjax.plan(
        {"a/kernel": w, "b/kernel": w}, {"a.*": "nf4", "b.*": "lut2:per_grouped_channel:16"}
    )
    assert (
        plan[0].note
        == "fallback nf4:per_block:96:axis=-2: block 64 does not divide axis 0 (size 96)"
    )
    assert plan[1].note == (
        "fallback lut2:per_grouped_channel:1:axis=-1: group 16 does not divide axis 1 (size 24)"
    )
    q = qjax.quantize_tree(
        {"a/kernel": w, "b/kernel": w}, {"a.*": "nf4", "b.*": "lut2:per_grouped_channel:16"}
    )
    assert_same_lut(q["a/kernel"], nf4(w, axis=0, block_size=96))
    assert_same_lut(q["b/kernel"], palettize(w, 2, per_grouped_channel(-1, 1)))
    with pytest.raises(ValueError, match=r"'a/kernel' \(shape \(96, 24\), read as flax .*block 64"):
        qjax.quantize_tree({"a/kernel": w}, {"a.*": "nf4"}, fallback=None)
    with pytest.raises(ValueError, match=r"group 16 does not divide axis 1 \(size 24\).*output"):
        qjax.plan(
            {"b/kernel": normal(48, 24)}, {".*": "lut2:per_grouped_channel:16"}, fallback=None
        )
    with pytest.raises(ValueError, match=r"'w' \(shape \(4, 64\)\): nf4 axis 2 is out of range"):
        qjax.plan({"w": normal(4, 64)}, {"w": "nf4:axis=2"})


def test_nf4_fallback_that_would_outgrow_float_keeps_the_tensor_float():
    # A depthwise conv [out, 1, kh, kw]: one input per block would store 4.5 bytes a value.
    depthwise, conv = normal(128, 1, 3, 3), normal(64, 96, 3, 3)
    params = {"dw.weight": depthwise, "conv.weight": conv}
    rows = {row.path: row for row in qjax.plan(params, {".*": "nf4"})}
    assert rows["dw.weight"].spec is None
    assert rows["dw.weight"].note.startswith("kept float: fallback nf4:per_block:1:axis=1")
    assert rows["conv.weight"].spec is not None  # blocks of 96 inputs: 0.54 bytes a value
    q = qjax.quantize_tree(params, {".*": "nf4"})
    assert q["dw.weight"] is depthwise and isinstance(q["conv.weight"], LUTArray)


def test_plan_and_leaf_specs_print_rules_that_paste_back():
    params = {"Dense_0": {"kernel": KERNEL}, "fc.weight": WEIGHT, "fc.bias": normal(32)}
    rules = {".*kernel": "nf4", ".*": "lut4:per_grouped_channel:8:scaled"}
    plan = qjax.plan(params, rules)
    text = str(plan)
    assert "nf4:per_block:64:axis=-2" in text and "lut4:per_grouped_channel:8:axis=0:scaled" in text
    specs = qjax.leaf_specs(params, rules)
    assert specs["Dense_0/kernel"] == TableFormat("nf4", axis=-2)
    assert specs["fc.weight"] == TableFormat("kmeans", 4, group_size=8, scaled=True, axis=0)
    assert specs["fc.bias"] is None
    q = qjax.quantize_tree(params, rules)
    assert [row.spec is not None for row in plan] == [True, False, True]
    for row in plan:
        if row.spec is not None:  # the printed spec, pasted back as a rule, gives the same leaf
            again = qjax.quantize_tree(
                {row.path: np.asarray(params_leaf(params, row.path))}, {".*": str(row.spec)}
            )
            assert_same_lut(again[row.path], params_leaf(q, row.path))


def test_report_style_descriptions_paste_back_as_rules():
    cases = [
        (KERNEL, nf4(KERNEL)),
        (WEIGHT, nf4(WEIGHT, axis=1, block_size=32)),
        (KERNEL, palettize(KERNEL, 2)),
        (WEIGHT, palettize(WEIGHT, 3, per_grouped_channel(0, 4))),
        (KERNEL, palettize(KERNEL, 2, per_grouped_channel(-1, 8), per_channel_scale=-1)),
        (WEIGHT, palettize(WEIGHT, 1, per_channel_scale=0)),
    ]
    texts = []
    for w, la in cases:
        fmt = TableFormat.of(la)
        assert fmt is not None
        texts.append(str(fmt))
        assert_same_lut(parse_leaf_rule(str(fmt)).spec.quantize(w), la)
    assert texts == [
        "nf4:per_block:64:axis=-2",
        "nf4:per_block:32:axis=-1",
        "lut2:per_tensor",
        "lut3:per_grouped_channel:4:axis=-2",
        "lut2:per_grouped_channel:8:axis=-1:scaled",
        "lut1:per_tensor:axis=-2:scaled",
    ]
    three = quantize_to_table(KERNEL, jnp.array([-1.0, 0.0, 1.0]))  # 3 entries of 2 bits
    assert TableFormat.of(three) is None


def test_leaves_already_quantized_stay_as_they_are():
    la, qa = nf4(KERNEL), qjax.quantize(KERNEL, "int8")
    q = qjax.quantize_tree({"a": la, "b": qa, "c": KERNEL}, {".*": "lut2"}, min_size=0)
    assert q["a"] is la and q["b"] is qa and isinstance(q["c"], LUTArray)
    assert [row.note for row in qjax.plan({"a": la}, {".*": "nf4"}, min_size=0)] == [
        "already quantized"
    ]


def test_calibrated_methods_refuse_table_rules():
    params = {"fc.weight": WEIGHT}
    with pytest.raises(
        ValueError,
        match=r"parameter 'fc.weight': rule '\.\*' gives the lookup "
        r"table nf4:per_block:64:axis=1, but GPTQ computes integer params.*"
        r"method='rtn'",
    ):
        qjax.quantize_tree(params, {".*": "nf4"}, method="gptq", statistics={})
    with pytest.raises(ValueError, match="but AWQ computes integer params"):
        qjax.quantize_tree(params, {".*": "lut4"}, method="awq", statistics={})


# The command line.


@pytest.fixture(params=[".safetensors", ".npz"])
def checkpoint(request, tmp_path):
    tensors = {
        "Dense_0.kernel": KERNEL,
        "fc.weight": WEIGHT,
        "fc.bias": BIAS,
        "step": np.array(3, np.int32),
    }
    path = str(tmp_path / f"model{request.param}")
    if request.param == ".npz":
        np.savez(path, **tensors)
    else:
        save_file(tensors, path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_dtype_nf4_and_table_rules_save_and_load(checkpoint, tmp_path, capsys):
    out, report = tmp_path / "q.safetensors", tmp_path / "r.json"
    argv = ["quantize", checkpoint, out, "--dtype", "nf4", "--report", report]
    code, stdout, err = run(capsys, *argv, "--rule", "fc.weight=lut2:per_grouped_channel:8:scaled")
    assert code == 0, err
    tree = qjax.io.load(out)
    assert_same_lut(tree["Dense_0"]["kernel"], nf4(KERNEL, axis=-2))
    want = palettize(WEIGHT, 2, per_grouped_channel(0, 8), per_channel_scale=0)
    assert_same_lut(tree["fc"]["weight"], want)
    np.testing.assert_array_equal(tree["fc"]["bias"], BIAS)
    assert int(tree["step"]) == 3
    rows = {r["path"]: r for r in json.loads(report.read_text())["rows"]}
    assert rows["Dense_0.kernel"]["quantized"] and rows["fc.weight"]["quantized"]
    assert rows["Dense_0.kernel"]["bytes_after"] == nf4(KERNEL).nbytes
    assert not rows["fc.bias"]["quantized"]
    assert "2 of 4 quantized" in stdout
    code, stdout, err = run(capsys, "inspect", out)
    assert code == 0 and "Dense_0.kernel" in stdout, err


def test_cli_plan_shows_table_specs_with_layout_axes(checkpoint, capsys):
    def plan_lines(*rules: str) -> dict[str, str]:
        flags = [arg for rule in rules for arg in ("--rule", rule)]
        code, out, err = run(capsys, "plan", checkpoint, "--dtype", "lut4", *flags)
        assert code == 0, err
        return {line.split()[0]: line for line in out.splitlines()[1:]}

    lines = plan_lines("fc.*=nf4")
    assert "lut4:per_tensor" in lines["Dense_0.kernel"]
    assert "nf4:per_block:64:axis=1" in lines["fc.weight"]
    assert "float" in lines["fc.bias"]  # a rule naming the layer, not its 1-D bias
    lines = plan_lines("fc.bias=nf4", "fc.*=nf4")
    assert "nf4" in lines["fc.bias"]  # a rule that names a tensor quantizes it, 1-D or not
    code, out, err = run(capsys, "plan", checkpoint, "--dtype", "nf4", "--block-size", "32")
    assert code == 0 and "nf4:per_block:32:axis=-2" in out, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "nf4", "--calibration", "mse"], "calibration 'mse' does not apply"),
        (["--dtype", "nf4", "--scheme", "asymmetric"], "a lookup table has none"),
        (["--dtype", "lut4", "--granularity", "per_channel"], "lut4:per_grouped_channel:1"),
        (["--dtype", "lut4", "--axis", "0"], "has no meaning for one table per tensor"),
        (["--dtype", "lut5"], "invalid choice: 'lut5'"),
        (["--rule", ".*=nf4:64"], "write nf4:per_block:64"),
        (
            ["--dtype", "nf4", "--block-size", "48", "--fallback", "none"],
            "'Dense_0.kernel' (shape (128, 64), read as flax [..., in, out]): block 48 does "
            "not divide axis 0 (size 128)",
        ),
        (
            [
                "--dtype",
                "nf4",
                "--method",
                "gptq",
                "--model",
                "m.py:f",
                "--calibration-data",
                "d.npy",
            ],
            "tensor 'Dense_0.kernel': rule '.*' gives the lookup table nf4:per_block:64:axis=-2, "
            "but GPTQ computes integer params",
        ),
    ],
)
def test_cli_table_errors_are_one_line(tmp_path, capsys, flags, message):
    source = tmp_path / "m.safetensors"
    save_file({"Dense_0.kernel": KERNEL, "fc.weight": WEIGHT}, str(source))
    code, out, err = run(capsys, "quantize", source, tmp_path / "o.safetensors", *flags)
    assert code == 2 and out == "", err
    assert err.startswith("qjax: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_tables_dequantize_inspect_and_keep_float64(tmp_path, capsys):
    source, q, back = tmp_path / "m.npz", tmp_path / "q.safetensors", tmp_path / "b.safetensors"
    np.savez(source, **{"Dense_0.kernel": KERNEL, "fc.weight": WEIGHT.astype(np.float64)})
    rule = "fc.weight=lut2:per_grouped_channel:8:scaled"
    assert main(["quantize", str(source), str(q), "--dtype", "nf4", "--rule", rule, "-q"]) == 0
    assert main(["inspect", str(q), "--report", str(tmp_path / "r.json"), "-q"]) == 0
    rows = {r["path"]: r["spec"] for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert rows == {  # the report's specs are rules that build the same leaves
        "Dense_0.kernel": "nf4:per_block:64:axis=-2",
        "fc.weight": "lut2:per_grouped_channel:8:axis=-2:scaled",
    }
    assert main(["dequantize", str(q), str(back)]) == 0, capsys.readouterr().err
    floats = load_file(str(back))
    np.testing.assert_array_equal(floats["Dense_0.kernel"], nf4(KERNEL).dequantize())
    want = palettize(WEIGHT, 2, per_grouped_channel(0, 8), per_channel_scale=0).dequantize()
    assert floats["fc.weight"].dtype == np.float64
    np.testing.assert_array_equal(floats["fc.weight"], np.asarray(want).astype(np.float64))


def test_checkpoint_calibrated_methods_refuse_tables(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"fc.weight": WEIGHT}, str(path))
    plan = plan_checkpoint(path, {".*": "nf4"})
    with pytest.raises(ValueError, match=r"tensor 'fc\.weight': rule '\.\*' gives the lookup"):
        quantize_checkpoint(
            plan,
            tmp_path / "q.safetensors",
            method="gptq",
            model=lambda t, b: b @ t["fc.weight"].T,
            batches=[np.ones((2, 128), np.float32)],
        )
