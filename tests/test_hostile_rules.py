"""Hostile inputs to the rule language: whitespace, repeated and contradictory tokens, bad
types and values, arbitrary text, and leaves that overflow float32.

Every bad input is a TypeError or ValueError that names what to change; nothing else
(AttributeError, KeyError, a silent different meaning) may come out.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
from qjax.resolve import RulePlan
from qjax.rules import Calibration, LeafRule, parse_leaf_rule, parse_rules, parse_spec

KERNEL = {"Dense_0": {"kernel": jnp.ones((64, 64))}}


# Whitespace: ignored around tokens and the REGEX=SPEC '=', refused inside a token.


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        (" int8:per_channel", "int8:per_channel"),
        ("int8 :per_channel", "int8:per_channel"),
        ("int8: per_channel ", "int8:per_channel"),
        ("\tint4 : per_block : 32\n", "int4:per_block:32"),
        ("uint8 : asymmetric : per_channel : axis=0", "uint8:asymmetric:per_channel:axis=0"),
        (" keep ", "keep"),
        ("int8 : scale=bfloat16", "int8:scale=bfloat16"),
    ],
)
def test_whitespace_around_tokens_is_ignored(text, canonical):
    assert parse_spec(text) == parse_spec(canonical)


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("int8:per channel", "per channel"),
        ("int8:per_channel:axis = 0", "axis = 0"),
        ("int 8", "int 8"),
        ("int4:per_block:3 2", "3 2"),
        ("int8:scale = float16", "scale = float16"),
        ("int8:sym metric", "sym metric"),
    ],
)
def test_whitespace_inside_a_token_is_refused_naming_it(text, token):
    with pytest.raises(ValueError, match=f"token {re.escape(repr(token))} contains whitespace"):
        parse_spec(text)


@pytest.mark.parametrize(
    "text",
    [
        ".*kernel = int4:per_block:32",
        ".*kernel =int4:per_block:32",
        ".*kernel= int4 : per_block : 32",
        " .*kernel=int4:per_block:32 ",
    ],
)
def test_spaces_around_the_rule_equals_do_not_change_the_rule(text):
    # The bug: ".*kernel " never matched, and the kernel silently fell to the int8 catch-all.
    ((pattern, rule), _) = parse_rules([text, ".*=int8"])
    assert pattern == ".*kernel" and rule.spec == parse_spec("int4:per_block:32")
    q = qjax.quantize_tree(KERNEL, [text, ".*=int8"])
    assert q["Dense_0"]["kernel"].spec.dtype == "int4"


@pytest.mark.parametrize("pattern", [" .*kernel", ".*kernel ", "\t.*", ".*\n"])
def test_patterns_with_outer_whitespace_are_refused(pattern):
    with pytest.raises(ValueError, match="starts or ends with whitespace"):
        parse_rules({pattern: "int8"})


# Repeated and contradictory tokens.


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("int8:per_channel:per_tensor", "'per_tensor' contradicts 'per_channel'"),
        ("int8:per_tensor:per_channel", "'per_channel' contradicts 'per_tensor'"),
        ("int8:per_channel:per_channel", "'per_channel' repeats"),
        ("int4:per_block:32:per_block:16", "'per_block' repeats"),
        ("int4:per_block:32:per_channel", "'per_channel' contradicts 'per_block'"),
        ("int8:per_token:per_tensor", "'per_tensor' contradicts 'per_token'"),
        ("int8:symmetric:asymmetric", "'asymmetric' contradicts 'symmetric'"),
        ("int8:asymmetric:asymmetric", "'asymmetric' repeats"),
        ("int8:zero_point:minval", "'minval' contradicts 'zero_point'"),
        ("int8:scale:scale", "'scale' repeats"),
        ("int8:per_channel:axis=0:axis=1", "'axis=1' contradicts 'axis=0'"),
        ("int8:per_channel:axis=0:axis=0", "'axis=0' repeats"),
        ("int8:scale=float16:scale=bfloat16", "'scale=bfloat16' contradicts 'scale=float16'"),
        ("int8:int4", "'int4' contradicts 'int8'"),
        ("int8:int8", "'int8' repeats"),
        ("int8:mxfp4", "'mxfp4' contradicts 'int8'"),
        ("mxfp4:axis=-2:axis=-1", "'axis=-1' contradicts 'axis=-2'"),
    ],
)
def test_repeated_or_contradictory_tokens_are_refused_naming_them(text, message):
    with pytest.raises(ValueError, match=re.escape(f"spec {text!r}: {message}")):
        parse_spec(text)
    with pytest.raises(ValueError, match=re.escape(message)):  # the same through rules
        parse_rules([f".*={text}"])


@pytest.mark.parametrize(
    "text",
    ["int4:mse:minmax", "int4:mse:mse", "int4:percentile=99:percentile=99.9", "int4:absmax:mse"],
)
def test_two_calibrations_are_refused(text):
    with pytest.raises(ValueError, match=r"(repeats|contradicts) .*one calibration per spec"):
        parse_leaf_rule(text)


# axis= where it means nothing.


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("int8:per_tensor:axis=0", "'axis=0' has no meaning with per_tensor"),
        ("int8:axis=0:per_tensor", "'axis=0' has no meaning with per_tensor"),
        ("int8:per_token:axis=-1", "'axis=-1' has no meaning with per_token"),
        ("int8:axis=0", "'axis=0' needs per_channel or per_block"),
        ("uint4:asymmetric:axis=1", "'axis=1' needs per_channel or per_block"),
    ],
)
def test_axis_without_an_axis_granularity_is_refused_in_api_and_rules(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_spec(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        qjax.quantize_tree(KERNEL, [f".*={text}"])


# Tokens that cannot be read.


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty token"),
        ("   ", "empty token"),
        ("int8:", "empty token"),
        (":int8", "empty token"),
        ("int8::per_channel", "empty token"),
        ("int8:32", "cannot read '32'"),
        ("int8:wide", "cannot read 'wide'"),
        ("int4:per_block", "per_block needs a block size"),
        ("int4:per_block:x", "per_block needs a block size"),
        ("int4:per_block:0", "block size '0' must be a positive integer"),
        ("int4:per_block:-4", "block size '-4' must be a positive integer"),
        ("int8:per_channel:axis=x", "'axis=x' needs an integer"),
        ("int8:per_channel:axis=1.5", "'axis=1.5' needs an integer"),
        ("int8:per_channel:axis=", "'axis=' needs an integer"),
        ("int8:scale=float64", "'scale=float64' is not a scale dtype"),
        ("int8:scale=", "'scale=' is not a scale dtype"),
        ("keep:per_channel", "'keep' keeps the tensor float and takes no other tokens"),
        ("none:int8", "'none' keeps the tensor float"),
        ("mxfp4:per_channel", "mxfp4 sets its own blocks"),
        ("mxfp8:per_block:32", "mxfp8 sets its own blocks"),
        ("int9", "'int9'"),
        ("int8:mse", "'mse' is a calibration method"),
        ("int8:percentile=99", "'percentile=99' is a calibration method"),
    ],
)
def test_unreadable_tokens_are_refused_naming_them(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_spec(text)


@pytest.mark.parametrize(
    "token",
    [
        "percentile",
        "percentile=",
        "percentile=0",
        "percentile=101",
        "percentile=nan",
        "percentile=inf",
        "percentile=x",
    ],
)
def test_bad_percentiles_are_refused(token):
    with pytest.raises(ValueError, match=re.escape(f"{token!r} needs a number in (0, 100]")):
        parse_leaf_rule(f"int8:{token}")


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("median",), ValueError, "calibration method must be one of"),
        (("percentile", "99"), ValueError, "percentile must be a number in"),
        (("percentile", True), ValueError, "percentile must be a number in"),
        (("percentile", 0), ValueError, "percentile must be a number in"),
    ],
)
def test_bad_calibration_objects(args, error, message):
    with pytest.raises(error, match=message):
        Calibration(*args)


def test_bad_leaf_rule_objects():
    with pytest.raises(TypeError, match=r"LeafRule\.spec must be a QuantSpec or None"):
        LeafRule("int8")
    with pytest.raises(TypeError, match=r"LeafRule\.calibration must be"):
        LeafRule(qjax.QuantSpec("int8"), "mse")
    with pytest.raises(ValueError, match="a calibration needs a spec"):
        LeafRule(None, Calibration("mse"))


# Arguments of the wrong type.


@pytest.mark.parametrize("text", [None, 3, 3.0, b"int8", ["int8"], qjax.QuantSpec("int8")])
def test_parse_spec_of_a_non_string_is_a_type_error_naming_the_argument(text):
    with pytest.raises(TypeError, match=r"parse_spec: text must be shorthand text"):
        parse_spec(text)


@pytest.mark.parametrize(
    ("rules", "error", "message"),
    [
        (42, TypeError, "rules must be a mapping"),
        (3.5, TypeError, "rules must be a mapping"),
        ({".*", "int8"}, TypeError, "rules must be a mapping"),
        (".*=int8", TypeError, "rules is one string"),
        ([("a", "int8", 3)], TypeError, "must be a (regex, spec) pair .*got 3 items"),
        ([("a",)], TypeError, "got 1 items"),
        ([42], TypeError, "must be a (regex, spec) pair"),
        ([(3, "int8")], TypeError, "rule pattern must be a str .*got int 3"),
        ([(None, "int8")], TypeError, "rule pattern must be a str"),
        ([(re.compile(".*"), "int8")], TypeError, "pass pattern.pattern"),
        ({".*": 8}, TypeError, "spec must be a QuantSpec, shorthand text or None .*got int 8"),
        ({".*": 8.0}, TypeError, "got float"),
        ({".*": {"a": 1}}, TypeError, "got dict"),
        ({".*": ["int8"]}, TypeError, "got list"),
        ({"": "int8"}, ValueError, "rule pattern is empty"),
        ({"(": "int8"}, ValueError, "invalid regex"),
        ([".*kernel"], ValueError, "must read REGEX=SPEC"),
        ([".*kernel=int9:per_channel"], ValueError, "spec 'int9:per_channel': .*'int9'"),
        ([".*kernel=int8:per_channel:per_tensor"], ValueError, "contradicts"),
    ],
)
def test_malformed_rules_name_what_to_change(rules, error, message):
    message = message.replace("(regex, spec)", r"\(regex, spec\)")
    with pytest.raises(error, match=message):
        qjax.quantize_tree(KERNEL, rules)
    with pytest.raises(error, match=message):
        RulePlan(rules)


def test_lists_from_json_are_pairs_too():
    assert parse_rules([[".*", "int8"]]) == parse_rules([(".*", "int8")])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min_size": "5"}, TypeError, "min_size must be a non-negative int .*got str '5'"),
        ({"min_size": 5.0}, TypeError, "min_size must be a non-negative int"),
        ({"min_size": None}, TypeError, "min_size must be a non-negative int"),
        ({"min_size": True}, TypeError, "min_size must be a non-negative int"),
        ({"min_size": -1}, ValueError, "min_size must be a non-negative int .*got -1"),
        ({"layout": "pytorch"}, ValueError, r"layout must be one of \('auto', 'flax', 'torch'\)"),
        ({"layout": "Flax"}, ValueError, "layout must be one of"),
        ({"layout": None}, ValueError, "layout must be one of"),
        ({"fallback": "per_tensor"}, ValueError, "fallback must be 'per_channel' or None"),
        ({"fallback": True}, ValueError, "fallback must be 'per_channel' or None"),
        ({"strict": "yes"}, TypeError, "strict must be True or False"),
        ({"strict": 1}, TypeError, "strict must be True or False"),
        ({"check_finite": "no"}, TypeError, "check_finite must be True or False"),
    ],
)
def test_bad_options_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        qjax.quantize_tree(KERNEL, {".*": "int8"}, **kwargs)


def test_numpy_integers_are_sizes():
    with pytest.warns(qjax.QjaxRuleWarning, match="quantized nothing"):
        q = qjax.quantize_tree(KERNEL, {".*": "int8"}, min_size=np.int64(5000))
    assert not isinstance(q["Dense_0"]["kernel"], qjax.QArray)


def test_a_rule_naming_only_integer_leaves_quantizes_nothing_and_says_so():
    tree = {"step": np.int32(3), "Dense_0": {"kernel": np.ones((64, 64), np.float32)}}
    with pytest.raises(ValueError, match=r"quantized nothing.*1 not floating point.*only"):
        qjax.quantize_tree(tree, {"step": "int8"}, strict=True)


def test_rules_that_keep_tensors_float_on_purpose_are_no_warning():
    tree = {"Dense_0": {"kernel": np.ones((64, 64), np.float32), "bias": np.ones(64, np.float32)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = qjax.quantize_tree(tree, {".*kernel": None, ".*": "int8"}, strict=True)
    assert not isinstance(q["Dense_0"]["kernel"], qjax.QArray)


def test_resolve_checks_its_arguments():
    plan = RulePlan({"scalar": "int8:per_channel", ".*": "int8:per_channel"})
    with pytest.raises(TypeError, match="path must be a str"):
        plan.resolve(("a", "b"), (4, 4), "float32")
    with pytest.raises(ValueError, match=r"'scalar' \(shape \(\)\): per_channel axis -1"):
        plan.resolve("scalar", (), "float32")  # a rule naming a scalar: it must fit
    assert plan.resolve("other", (), "float32").note == "0-D"  # a catch-all skips it


# Arbitrary text: parsing fails only with ValueError.

TOKENS = st.sampled_from(
    [
        "int8",
        "int4",
        "mxfp4",
        "keep",
        "per_block",
        "per_channel",
        "per_tensor",
        "32",
        "axis=0",
        "axis=-2",
        "scale=float16",
        "asymmetric",
        "minval",
        "mse",
        "percentile=99",
        " ",
        "",
        "=",
        "x",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(TOKENS, max_size=6), st.text(max_size=8))
def test_arbitrary_text_gives_a_spec_or_a_value_error(tokens, noise):
    for text in (":".join(tokens), ":".join(tokens) + noise, noise):
        for parse in (parse_spec, parse_leaf_rule):
            try:
                parse(text)
            except ValueError:
                pass
        try:
            parse_rules([f".*={text}", text])
        except ValueError:
            pass


# Leaves beyond float32 and other non-finite values.


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (1e39, np.float64),
        (-1e39, np.float64),
        (3.5e38, np.float64),
        (2.0**128 - 2.0**103, np.float64),  # the first value the cast rounds to inf
        (np.finfo(np.float64).max, np.float64),
        (np.nan, np.float64),
        (np.inf, np.float32),
        (-np.inf, np.float16),
        (np.nan, jnp.bfloat16),
    ],
)
def test_values_not_finite_in_float32_are_refused_naming_the_leaf(value, dtype):
    w = np.ones((64, 64), dtype)
    w[1, 2] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ValueError, match=r"parameter 'enc/kernel' \(shape \(64, 64\)\) has 1 NaN"
        ):
            qjax.quantize_tree({"enc": {"kernel": w}}, {".*": "int4:per_block:32"})
        assert int(qjax.count_nonfinite(w)) == 1


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (float(np.finfo(np.float32).max), np.float64),
        (3.4028235e38, np.float64),  # above float32's max, but the cast rounds it down to it
        (np.nextafter(2.0**128 - 2.0**103, 0), np.float64),
        (-65504.0, np.float16),
        (3e38, np.float64),
        (1e-45, np.float64),
    ],
)
def test_extreme_finite_values_pass_the_check(value, dtype):
    w = np.ones((64, 64), dtype)
    w[0, 0] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert int(qjax.count_nonfinite(w)) == 0
        qjax.quantize_tree({"k": w}, {".*": "int8"})  # no error


def test_count_nonfinite_under_jit_counts_float32_overflow():
    w = jnp.ones((4, 4), jnp.float32).at[0, 0].set(jnp.inf)
    assert int(jax.jit(qjax.count_nonfinite)({"w": w})["w"]) == 1


# LayerQuant fields: specs as objects or text, anything else refused where it is built.


def test_layer_quant_reads_spec_text_and_wraps_an_activation_spec():
    from qjax.flax.linen import ActQuant, LayerQuant

    act = qjax.QuantSpec("int8", granularity=qjax.per_token())
    quant = LayerQuant(weight="int4:per_block:32", act=act)
    assert quant.weight == qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32))
    assert quant.act == ActQuant(act)
    assert LayerQuant(act="int8").act == ActQuant(qjax.QuantSpec("int8"))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"weight": 8}, TypeError, "LayerQuant weight must be a QuantSpec"),
        ({"weight": "int9"}, ValueError, "LayerQuant weight"),
        ({"act": 8}, TypeError, "LayerQuant act must be an ActQuant"),
        ({"act": "keep"}, ValueError, "LayerQuant act"),
    ],
)
def test_layer_quant_refuses_what_is_not_a_spec(kwargs, error, message):
    from qjax.flax.linen import LayerQuant

    with pytest.raises(error, match=message):
        LayerQuant(**kwargs)
