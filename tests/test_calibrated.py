"""Calibrated PTQ of whole models: capture -> quantize_tree(method=...) -> an ordinary tree.

A small Linen model (LayerNorm -> q/k/v Dense -> MLP) on correlated inputs with outlier
channels, the kind of input that makes round to nearest lose accuracy. Each method's tree
must save, load, report, dequantize and serve like any other, and beat RTN on the
calibration inputs' output error, measured here in NumPy from the model's own activations.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import capture
from qjax.flax import linen as qlinen
from qjax.flax import serve

D, HIDDEN, ROWS = 64, 128, 256


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        q = nn.Dense(D, name="query")(h)
        k = nn.Dense(D, name="key")(h)
        v = nn.Dense(D, name="value")(h)
        mixed = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(D)) @ v
        up = nn.gelu(nn.Dense(HIDDEN, name="up")(x + mixed))
        return nn.Dense(D, name="down")(up)


MODEL = Block()
KERNELS = ("query", "key", "value", "up", "down")


def _inputs(seed: int, batch: int = 8) -> jax.Array:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    x = rng.normal(size=(batch, ROWS // batch, D)) @ mix
    x[..., :4] *= 20.0  # outlier channels, as real activations have
    return jnp.asarray(x, jnp.float32)


@pytest.fixture(scope="module")
def variables():
    params = MODEL.init(jax.random.key(0), _inputs(0))
    return jax.tree.map(lambda p: p * 1.0, params)


@pytest.fixture(scope="module")
def batches():
    return [_inputs(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def stats(variables, batches):
    return capture.accumulate(MODEL.apply, variables, batches)


RULES = {".*(query|key|value|up|down)/kernel": "int4:per_block:16"}


def _quantized(variables, stats, method, rules=RULES):
    return qjax.quantize_tree(variables, rules, method=method, statistics=stats)


def _output_error(variables, tree, batches) -> float:
    run = jax.jit(qjax.dequantizing(MODEL.apply))
    return float(sum(jnp.sum((run(tree, x) - MODEL.apply(variables, x)) ** 2) for x in batches))


@pytest.mark.parametrize("method", ["gptq", "awq", qjax.GPTQ(act_order=True, block_size=32)])
def test_calibrated_methods_beat_round_to_nearest_on_the_model_output(
    variables, stats, batches, method
):
    rtn = qjax.quantize_tree(variables, RULES)
    calibrated = _quantized(variables, stats, method)
    assert _output_error(variables, calibrated, batches) < _output_error(variables, rtn, batches)


def test_gptq_codes_are_qjax_quantize_of_their_own_dequantized_values(variables, stats):
    tree = _quantized(variables, stats, "gptq")
    for name in KERNELS:
        qa = tree["params"][name]["kernel"]
        again = qjax.quantize(qa.dequantize(), qa.spec, qparams=qa.qparams)
        np.testing.assert_array_equal(np.asarray(again.codes()), np.asarray(qa.codes()))


def test_awq_shares_one_scale_across_layers_that_read_one_input(variables, stats):
    tree = _quantized(variables, stats, "awq")
    q, k, v = (tree["params"][n]["kernel"].channel_scale for n in ("query", "key", "value"))
    assert q is not None and q.shape == (D, 1)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(v))
    alone = _quantized(variables, stats, qjax.AWQ(share_inputs=False))
    assert alone["params"]["query"]["kernel"].channel_scale is not None


def test_awq_folded_into_the_layernorm_equals_the_explicit_scales(variables, stats, batches):
    tree = _quantized(variables, stats, "awq")
    producers = ["params/norm/scale", "params/norm/bias"]
    folds = {f"params/{n}/kernel": producers for n in ("query", "key", "value")}
    folded = qjax.fold_channel_scales(tree, folds)
    assert folded["params"]["query"]["kernel"].channel_scale is None
    assert folded["params"]["up"]["kernel"].channel_scale is not None  # not folded: kept
    run = jax.jit(qjax.dequantizing(MODEL.apply))
    for x in batches:
        np.testing.assert_allclose(run(folded, x), run(tree, x), rtol=2e-5, atol=2e-5)


def test_fold_refuses_unequal_scales_and_bad_paths(variables, stats):
    alone = _quantized(variables, stats, "awq")
    query = alone["params"]["query"]["kernel"]
    alone["params"]["query"]["kernel"] = dataclasses.replace(
        query, channel_scale=2 * query.channel_scale
    )
    folds = {f"params/{n}/kernel": ["params/norm/scale"] for n in ("query", "key")}
    with pytest.raises(ValueError, match="different channel scales"):
        qjax.fold_channel_scales(alone, folds)
    with pytest.raises(ValueError, match="no such leaf"):
        qjax.fold_channel_scales(alone, {"params/nope/kernel": ["params/norm/scale"]})
    with pytest.raises(ValueError, match="has no channel_scale"):
        rtn = qjax.quantize_tree(variables, RULES)
        qjax.fold_channel_scales(rtn, {"params/query/kernel": ["params/norm/scale"]})
    with pytest.raises(ValueError, match="last axis must be the input size"):
        qjax.fold_channel_scales(alone, {"params/up/kernel": ["params/up/bias"]})


def test_calibrated_trees_save_load_and_report(variables, stats, tmp_path):
    tree = _quantized(variables, stats, "awq")
    path = str(tmp_path / "awq.safetensors")
    qjax.save(path, tree)
    back = qjax.load(path)
    for name in KERNELS:
        a, b = tree["params"][name]["kernel"], back["params"][name]["kernel"]
        np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))
    report = qjax.report(variables, back)
    assert sorted(r["path"] for r in report.rows if r["quantized"]) == sorted(
        f"params/{n}/kernel" for n in KERNELS
    )


def test_served_smoothquant_w8a8_is_an_integer_dot_of_the_smoothed_input(variables, stats):
    rules = {".*(up|down)/kernel": "int8:per_channel"}
    tree = _quantized(variables, stats, qjax.SmoothQuant(alpha=0.5), rules)
    act = qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token()))
    weight = qjax.parse_spec("int8:per_channel:axis=-1")
    layer_rules = {"(up|down)": qlinen.LayerQuant(weight=weight, act=act)}
    x = _inputs(7)
    y = jax.jit(serve.served(Dense0().apply, layer_rules, integer_dots="require"))(
        _single_dense(tree, variables, "up"), x
    )
    qa = tree["params"]["up"]["kernel"]
    m = np.asarray(qa.channel_scale)[:, 0]
    xs = np.asarray(x, np.float32) * m
    sx = np.max(np.abs(xs), axis=-1, keepdims=True) / np.float32(127.5)
    cx = np.clip(np.round(xs / sx), -128, 127)
    core = dataclasses.replace(qa, channel_scale=None)
    cw = np.asarray(core.codes(), np.float64)
    sw = np.asarray(core.scale, np.float64)
    bias = np.asarray(variables["params"]["up"]["bias"], np.float64)
    want = (cx.astype(np.float64) @ cw) * sx * sw + bias
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5)


class Dense0(nn.Module):
    """The model's ``up`` layer alone, for the served integer dot."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(HIDDEN, name="up")(x)


def _single_dense(tree, variables, name):
    return {
        "params": {
            "up": {
                "kernel": tree["params"][name]["kernel"],
                "bias": variables["params"][name]["bias"],
            }
        }
    }


def test_served_weight_only_applies_channel_scales(variables, stats):
    tree = _quantized(variables, stats, "awq", {".*up/kernel": "int4:per_block:16"})
    rules = {"up": qjax.parse_spec("int4:per_block:16:axis=-2")}
    x = _inputs(9)
    y = jax.jit(serve.served(Dense0().apply, rules))(_single_dense(tree, variables, "up"), x)
    want = jax.jit(qjax.dequantizing(Dense0().apply))(_single_dense(tree, variables, "up"), x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_scan_stacked_layers_get_one_result_per_layer():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(32, name="dense")(jnp.tanh(x)), None

    Stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Stack(name="layers")(x, None)[0]

    model = Model()
    x = _inputs(4)[..., :32]
    variables = model.init(jax.random.key(1), x)
    stats = capture.accumulate(model.apply, variables, [x, _inputs(5)[..., :32]])
    (stat,) = stats.values()
    assert stat.stacked == 1 and stat.hessian.shape == (3, 32, 32)
    tree = qjax.quantize_tree(
        variables, {".*kernel": "int4:per_block:16"}, method="gptq", statistics=stats
    )
    qa = tree["params"]["layers"]["dense"]["kernel"]
    assert qa.shape == (3, 32, 32) and qa.scale.shape == (3, 2, 32)
    kernel = variables["params"]["layers"]["dense"]["kernel"]
    for layer in range(3):
        one = qjax.algorithms.gptq(kernel[layer], stat.hessian[layer], qa.spec)
        np.testing.assert_array_equal(np.asarray(qa.codes()[layer]), np.asarray(one.codes()))


def test_too_few_rows_for_the_hessian_is_an_error_also_for_stacked_layers():
    stacked = {
        "kernel": jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32)), jnp.float32)
    }
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32)), jnp.float32)

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["kernel"])[0]

    stats = capture.accumulate(fn, stacked, [x])
    assert stats["kernel"].stacked == 1
    with pytest.raises(ValueError, match=r"'kernel': GPTQ failed .* not positive definite"):
        qjax.quantize_tree(
            stacked, {".*": "int4:per_channel"}, method=qjax.GPTQ(damp=0.0), statistics=stats
        )
    flat = {"kernel": stacked["kernel"][0]}
    flat_stats = capture.accumulate(lambda p, x: x @ p["kernel"], flat, [x])
    with pytest.raises(ValueError, match=r"'kernel': .*not positive definite"):
        qjax.quantize_tree(
            flat, {".*": "int4:per_channel"}, method=qjax.GPTQ(damp=0.0), statistics=flat_stats
        )


def test_a_rule_matching_a_leaf_without_statistics_is_an_error(variables, stats):
    rules = {".*kernel": "int4:per_block:16", ".*norm/scale": "int8"}
    with pytest.raises(ValueError, match=r"'params/norm/scale' matches rule .* no statistics"):
        qjax.quantize_tree(variables, rules, method="gptq", statistics=stats, min_size=0)


def test_statistics_of_the_tree_without_its_params_level_say_so(variables, stats):
    bare = {name.removeprefix("params/"): value for name, value in stats.items()}
    with pytest.raises(ValueError, match=r"statistics name it 'up/kernel'.*same tree"):
        rules = {".*up/kernel": "int4:per_block:16"}
        qjax.quantize_tree(variables, rules, method="gptq", statistics=bare)


def test_a_leaf_of_the_same_name_elsewhere_is_no_hint():
    x = jnp.ones((4, 8))
    tree = {"proj": {"kernel": jnp.ones((8, 8))}, "encoder": {"proj": {"kernel": jnp.ones((8, 8))}}}
    stats = qjax.capture.accumulate(lambda p, x: x @ p["proj"]["kernel"], tree, [x])
    with pytest.raises(ValueError, match=r"'encoder/proj/kernel'.*no statistics were captured"):
        qjax.quantize_tree(tree, {".*kernel": "int8:per_channel"}, method="gptq", statistics=stats)


def test_statistics_that_are_not_input_stats_are_a_type_error(variables, stats):
    wrong = dict(stats, **{"params/up/kernel": np.ones(64)})
    with pytest.raises(TypeError, match=r"statistics\['params/up/kernel'\] must be an InputStats"):
        qjax.quantize_tree(variables, RULES, method="gptq", statistics=wrong)
    with pytest.raises(TypeError, match="into must be a mapping"):
        qjax.fold_channel_scales(variables, [("params/up/kernel", ["params/norm/scale"])])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "gptq"}, TypeError, "needs statistics"),
        ({"method": "rtn", "statistics": {}}, ValueError, "read only by a calibrated method"),
        ({"method": "optimal"}, ValueError, "method must be 'rtn', 'gptq'"),
        ({"method": 3}, ValueError, "method must be"),
    ],
)
def test_bad_method_arguments(variables, kwargs, error, message):
    with pytest.raises(error, match=message):
        qjax.quantize_tree(variables, RULES, **kwargs)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_methods_that_need_the_hessian_say_so(variables, batches, method):
    stats = capture.accumulate(MODEL.apply, variables, batches[:1], hessian=False)
    with pytest.raises(ValueError, match=r"needs the inputs' Hessian.* hessian=True"):
        qjax.quantize_tree(variables, RULES, method=method, statistics=stats)
    smooth = qjax.quantize_tree(variables, RULES, method="smoothquant", statistics=stats)
    assert smooth["params"]["up"]["kernel"].channel_scale is not None


def test_round_to_nearest_calibration_tokens_do_not_mix_with_gptq(variables, stats):
    with pytest.raises(ValueError, match=r"calibration 'mse'.* drop it from the rule"):
        qjax.quantize_tree(
            variables, {".*kernel": "int4:per_block:16:mse"}, method="gptq", statistics=stats
        )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: qjax.GPTQ(block_size=0), "block_size must be an int >= 1"),
        (lambda: qjax.GPTQ(damp=-1.0), "damp must be a finite number >= 0"),
        (lambda: qjax.GPTQ(act_order="yes"), "act_order must be True or False"),
        (lambda: qjax.AWQ(grid=0), "grid must be an int >= 1"),
        (lambda: qjax.SmoothQuant(alpha=1.5), r"alpha must be a finite number in \[0.0, 1.0\]"),
    ],
)
def test_method_options_are_checked(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


# The command line: qjax quantize --method gptq --model FILE.py:FUNCTION --calibration-data


MODEL_FILE = """
import jax.numpy as jnp

def forward(tensors, batch):
    hidden = jnp.tanh(batch @ tensors["fc1.weight"].T)
    return hidden @ tensors["fc2.weight"].T

def broken(tensors, batch):
    return tensors["no.such.tensor"]
"""


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    import safetensors.numpy

    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(3)
    tensors = {
        "fc1.weight": rng.normal(size=(32, 64)).astype(np.float32),
        "fc2.weight": rng.normal(size=(16, 32)).astype(np.float32),
    }
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
    (folder / "model.py").write_text(MODEL_FILE)
    batches = np.stack([np.asarray(_inputs(s)[..., :64]).reshape(-1, 64) for s in (1, 2)])
    np.save(folder / "batches.npy", batches)
    return folder, tensors, batches


def _cli(*argv: str) -> int:
    from qjax.cli import main

    return main([str(a) for a in argv])


def test_cli_gptq_gives_the_api_result(cli_files, capsys):
    folder, tensors, batches = cli_files
    out = folder / "gptq.safetensors"
    code = _cli(
        "quantize",
        folder / "model.safetensors",
        out,
        "--dtype",
        "int4",
        "--block-size",
        "16",
        "--method",
        "gptq",
        "--model",
        f"{folder / 'model.py'}:forward",
        "--calibration-data",
        folder / "batches.npy",
        "--min-size",
        "0",
        "-q",
    )
    assert code == 0, capsys.readouterr().err
    from qjax.files import load_function

    forward = load_function(f"{folder / 'model.py'}:forward")
    stats = capture.accumulate(forward, tensors, list(batches))
    want = qjax.quantize_tree(
        tensors, {".*": "int4:per_block:16"}, method="gptq", statistics=stats, min_size=0
    )
    got = qjax.load(str(out))
    for name in tensors:
        a, b = got[name.split(".")[0]]["weight"], want[name]
        np.testing.assert_array_equal(np.asarray(a.codes()), np.asarray(b.codes()))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "gptq"], "--method gptq needs --model and --calibration-data"),
        (["--model", "m.py:forward"], "--model need a calibrated --method"),
        (
            ["--method", "awq", "--model", "nope.py:f", "--calibration-data", "b.npy"],
            "no such file 'nope.py'",
        ),
        (
            [
                "--method",
                "awq",
                "--model",
                "{folder}/model.py:missing",
                "--calibration-data",
                "{folder}/batches.npy",
            ],
            "has no function 'missing'",
        ),
        (
            [
                "--method",
                "awq",
                "--model",
                "{folder}/model.py:broken",
                "--calibration-data",
                "{folder}/batches.npy",
            ],
            "running the model on the calibration batches failed: KeyError",
        ),
        (
            [
                "--method",
                "gptq",
                "--model",
                "{folder}/model.py:forward",
                "--calibration-data",
                "{folder}/model.py",
            ],
            "unknown suffix '.py'",
        ),
        (
            [
                "--method",
                "gptq",
                "--model",
                "{folder}/model.py:forward",
                "--calibration-data",
                "{folder}/pickled.npy",
            ],
            "pickled.npy: cannot read it",
        ),
    ],
)
def test_cli_calibrated_errors_are_one_line(cli_files, capsys, extra, message):
    folder = cli_files[0]
    if not (folder / "pickled.npy").exists():
        np.save(folder / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    extra = [e.replace("{folder}", str(folder)) for e in extra]
    code = _cli("quantize", folder / "model.safetensors", folder / "x.safetensors", *extra)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
@pytest.mark.parametrize("shape", [(64, 0), (0, 64)])
def test_empty_layers_quantize_as_round_to_nearest_does(method, shape):
    params = {"w": jnp.zeros(shape)}
    stats = capture.accumulate(lambda p, x: x @ p["w"], params, [jnp.ones((4, shape[0]))])
    out = qjax.quantize_tree(params, {"w": "int8"}, method=method, statistics=stats)["w"]
    assert isinstance(out, qjax.QArray) and out.shape == shape
    assert out.dequantize().shape == shape


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_non_finite_statistics_are_refused_naming_the_parameter(method):
    params = {"w": jax.random.normal(jax.random.key(0), (128, 64))}
    batches = [jax.random.normal(jax.random.key(i), (64, 128)) for i in range(2)]
    batches[1] = batches[1].at[3, 5].set(jnp.inf)
    stats = capture.accumulate(lambda p, x: x @ p["w"], params, batches)
    with pytest.raises(ValueError, match=r"statistics\['w'\] hold NaN or inf"):
        qjax.quantize_tree(params, {"w": "int8:per_channel"}, method=method, statistics=stats)


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_statistics_without_hessian_are_checked_too(method):
    params = {"w": jax.random.normal(jax.random.key(0), (128, 64))}
    batch = jax.random.normal(jax.random.key(1), (64, 128)).at[3, 5].set(jnp.nan)
    stats = capture.accumulate(lambda p, x: x @ p["w"], params, [batch], hessian=False)
    with pytest.raises(ValueError, match=r"statistics\['w'\] hold NaN or inf"):
        qjax.quantize_tree(params, {"w": "int8:per_channel"}, method=method, statistics=stats)


@pytest.mark.parametrize("hessian", [True, False])
def test_statistics_of_no_rows_are_refused_as_such(hessian):
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    empty = [jnp.zeros((0, 64))]
    stats = capture.accumulate(lambda p, x: x @ p["w"], params, empty, hessian=hessian)
    method = "gptq" if hessian else "smoothquant"
    with pytest.raises(ValueError, match=r"statistics\['w'\] saw no calibration rows"):
        qjax.quantize_tree(params, {"w": "int8:per_channel"}, method=method, statistics=stats)


def test_finite_activations_whose_sums_overflow_are_not_called_non_finite():
    params = {"w": jax.random.normal(jax.random.key(0), (128, 64))}
    batch = jax.random.normal(jax.random.key(1), (64, 128)) * 1e19  # X^T X past float32
    stats = capture.accumulate(lambda p, x: x @ p["w"], params, [batch])
    with pytest.raises(ValueError, match=r"overflow float32 \(hessian\).*largest \|x\| = "):
        qjax.quantize_tree(params, {"w": "int8:per_channel"}, method="gptq", statistics=stats)
