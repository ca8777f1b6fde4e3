"""A third-party Flax transformer end to end: transformers' FlaxBertModel, as a user runs it.

A tiny randomly initialised BERT (2 layers, hidden 64, vocab 1000) of the architecture of
the README's all-MiniLM-L6-v2 example is written as Hugging Face ships checkpoints: PyTorch
names and layout (``encoder.layer.0.attention.self.query.weight`` is ``[out, in]``) and an
int64 ``embeddings.position_ids``. Then, with no layout flag anywhere:

* ``qjax quantize`` (the CLI) and ``qjax.quantize_tree`` (the API) read Linear weights as
  ``[out, in]`` (blocks along ``in``, channels along ``out``) and embeddings by row, checked
  against the NumPy reference of ``tests/reference.py``;
* ``qjax.load`` and ``qjax dequantize`` give back every tensor under its own name, the
  int64 position ids bit for bit;
* FlaxBertModel runs on the loaded packed weights through ``serve.dequantizing``;
* ``intercept`` with rules written as parameter paths quantizes the model, and
  ``convert`` + ``served`` reproduce its eval output bit for bit;
* ``benchmarks/bert_example.py --tiny`` runs.

transformers' Flax code relies on JAX's standard dtype promotion (it multiplies float
attention weights by an int32 head mask); the suite's conftest makes promotion strict for
qjax's own code, so each test here runs the third-party model under "standard".
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from transformers import BertConfig, FlaxBertModel

import qjax
from qjax.cli import main
from qjax.flax import linen as qlinen
from qjax.flax import serve
from reference import reference

CONFIG = BertConfig(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)
LINEAR = "encoder.layer.{}.{}.weight"
LINEARS = [
    LINEAR.format(i, m)
    for i in range(CONFIG.num_hidden_layers)
    for m in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
] + ["pooler.dense.weight"]
EMBEDDINGS = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"]
# Parameter-path rules (``encoder/layer/0/attention/self/query/kernel``), as for quantize_tree.
QAT_RULES = {
    r".*/attention/.*/kernel": qlinen.LayerQuant(
        weight=qjax.parse_spec("int8:per_channel"),
        act=qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token())),
    ),
    r".*/(intermediate|output)/dense/kernel": "int4:per_block:32",
}


@pytest.fixture(autouse=True)
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


def _load_example():
    """benchmarks/bert_example.py as a module: the tests run its code, not a copy of it."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bert_example.py"
    spec = importlib.util.spec_from_file_location("bert_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bert_example"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


EXAMPLE = _load_example()


@pytest.fixture(scope="module")
def model() -> FlaxBertModel:
    with jax.numpy_dtype_promotion("standard"):
        return FlaxBertModel(CONFIG, seed=0)


@pytest.fixture(scope="module")
def tensors(model) -> dict[str, np.ndarray]:
    """The model's parameters as Hugging Face's PyTorch ``BertModel`` state dict."""
    out = EXAMPLE.torch_state_dict(model.params)
    # A buffer, not a parameter: int64 values JAX would truncate without x64.
    out["embeddings.position_ids"] = np.arange(2**40, 2**40 + 64, dtype=np.int64)[None]
    return out


@pytest.fixture(scope="module")
def checkpoint(tensors, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("bert") / "model.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def int4_file(checkpoint) -> pathlib.Path:
    out = checkpoint.with_name("int4.safetensors")
    argv = ["quantize", str(checkpoint), str(out), "--dtype", "int4", "--block-size", "32", "-q"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def ids() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = (np.arange(12)[None] < np.array([[12], [7], [9]])).astype(np.int32)
    return rng.integers(1, CONFIG.vocab_size, (3, 12)).astype(np.int32) * mask, mask


def check_int4_rows(q: dict, tensors: dict) -> None:
    """int4 symmetric in blocks of 32 along the last axis of every [out, in] / [rows, features]
    tensor: the input axis of a Linear weight, the features of an embedding row."""
    for name in LINEARS + EMBEDDINGS:
        w = tensors[name]
        ref = reference(w, "int4", "symmetric", "scale", (1, 32))
        qa = q[name]
        assert isinstance(qa, qjax.QArray), name
        assert qa.scale.shape == (w.shape[0], w.shape[1] // 32), name
        np.testing.assert_array_equal(np.asarray(qa.scale), ref["scale"], err_msg=name)
        np.testing.assert_array_equal(np.asarray(qa.dequantize()), ref["dequantized"], err_msg=name)


class TestQuantizeCheckpoint:
    def test_cli_reads_torch_layout_without_flags(self, int4_file, tensors):
        check_int4_rows(qjax.load_tensors(int4_file), tensors)

    def test_api_reads_torch_layout_without_flags(self, tensors):
        q = qjax.quantize_tree(tensors, {".*": "int4:per_block:32"})
        check_int4_rows(q, tensors)
        for name in ("embeddings.LayerNorm.weight", "encoder.layer.0.output.dense.bias"):
            np.testing.assert_array_equal(q[name], tensors[name])  # 1-D: stays float

    def test_cli_int8_per_channel_scales_output_rows(self, checkpoint, tensors):
        out = checkpoint.with_name("int8.safetensors")
        assert main(["quantize", str(checkpoint), str(out), "-q"]) == 0
        q = qjax.load_tensors(out)
        for name in LINEARS + EMBEDDINGS:
            w = tensors[name]
            ref = reference(w, "int8", "symmetric", "scale", (1, w.shape[1]))
            assert q[name].scale.shape == (w.shape[0], 1), name
            np.testing.assert_array_equal(np.asarray(q[name].scale), ref["scale"], err_msg=name)

    def test_load_gives_every_tensor_back_under_its_name(self, int4_file, tensors):
        q = qjax.load_tensors(int4_file)  # x64 is off: int64 comes back as NumPy
        assert set(q) == set(tensors)
        positions = q["embeddings.position_ids"]
        assert np.asarray(positions).dtype == np.int64
        np.testing.assert_array_equal(np.asarray(positions), tensors["embeddings.position_ids"])
        kept = [n for n in tensors if n not in LINEARS + EMBEDDINGS]
        for name in kept:
            np.testing.assert_array_equal(np.asarray(q[name]), tensors[name], err_msg=name)

    def test_dequantize_restores_a_checkpoint_the_model_loads(self, int4_file, tensors, tmp_path):
        out = tmp_path / "restored.safetensors"
        assert main(["dequantize", str(int4_file), str(out), "-q"]) == 0
        restored = safetensors.numpy.load_file(str(out))
        assert set(restored) == set(tensors)
        for name, x in tensors.items():
            assert restored[name].dtype == x.dtype, name
            expected = x
            if name in LINEARS + EMBEDDINGS:
                expected = reference(x, "int4", "symmetric", "scale", (1, 32))["dequantized"]
            np.testing.assert_array_equal(restored[name], expected, err_msg=name)


    def test_dequantized_save_pretrained_file_loads_with_from_pretrained(
        self, model, ids, tmp_path
    ):
        # from_pretrained refuses a safetensors file without its "format" metadata entry.
        model.save_pretrained(tmp_path / "float", safe_serialization=True)
        source = tmp_path / "float" / "model.safetensors"
        packed, back = tmp_path / "int8.safetensors", tmp_path / "back" / "model.safetensors"
        back.parent.mkdir()
        (tmp_path / "float" / "config.json").rename(back.parent / "config.json")
        assert main(["quantize", str(source), str(packed), "--dtype", "int8", "-q"]) == 0
        assert main(["dequantize", str(packed), str(back), "-q"]) == 0
        with safetensors.safe_open(str(back), "numpy") as f:
            assert f.metadata() == {"format": "flax"}
        restored = FlaxBertModel.from_pretrained(back.parent)
        expected = qjax.dequantize_tree(qjax.load(packed))
        got = jax.tree_util.tree_leaves_with_path(restored.params)
        assert len(got) == len(jax.tree.leaves(model.params))
        for path, leaf in got:
            keys = [k.key for k in path]
            want = expected
            for key in ".".join(keys).split("."):
                want = want[key]
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want), err_msg=str(keys))
        restored(*ids)  # and it runs


class TestRunThirdPartyModel:
    def test_flax_bert_runs_on_packed_weights(self, model, int4_file, tensors, ids):
        loaded = qjax.load_tensors(int4_file)

        def hidden(tree, ids, mask):
            return model(ids, mask, params=EXAMPLE.flax_params(tree)).last_hidden_state

        run = jax.jit(serve.dequantizing(hidden))
        # The jitted function receives the packed int4 codes, not float weights.
        args = run.lower(loaded, *ids).args_info[0][0]
        data = args["encoder.layer.0.intermediate.dense.weight"].data
        assert data.dtype == jnp.uint8 and data.shape == (128, 32)
        out = run(loaded, *ids)
        expected = jax.jit(hidden)(qjax.dequantize_tree(loaded), *ids)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        float_out = jax.jit(hidden)(tensors, *ids)
        assert float(jnp.max(jnp.abs(out - float_out))) > 1e-3  # the weights are int4

    def test_intercept_with_parameter_path_rules_quantizes(self, model, ids):
        def hidden(variables, ids, mask):
            return model.module.apply(variables, ids, mask).last_hidden_state

        variables = {"params": model.params}
        weight_only = {r"encoder/layer/\d+/(intermediate|output)/dense/kernel": "int4:per_block:32"}
        out = jax.jit(qlinen.intercepted(hidden, weight_only))(variables, *ids)
        # The same model with those kernels fake-quantized by the NumPy reference: Flax
        # kernels [in, out], blocks of 32 along `in`.
        params = jax.tree.map(np.asarray, model.params)
        for layer in params["encoder"]["layer"].values():
            for dense in (layer["intermediate"]["dense"], layer["output"]["dense"]):
                ref = reference(dense["kernel"], "int4", "symmetric", "scale", (32, 1))
                dense["kernel"] = ref["dequantized"]
        expected = jax.jit(hidden)({"params": params}, *ids)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        float_out = jax.jit(hidden)(variables, *ids)
        assert float(jnp.max(jnp.abs(out - float_out))) > 1e-3

    def test_served_equals_qat_eval_bit_for_bit(self, model, ids):
        def hidden(variables, ids, mask):
            return model.module.apply(variables, ids, mask).last_hidden_state

        variables = {"params": model.params}
        qat = jax.jit(qlinen.intercepted(hidden, QAT_RULES))(variables, *ids)
        float_out = jax.jit(hidden)(variables, *ids)
        assert float(jnp.max(jnp.abs(qat - float_out))) > 1e-3
        served_vars = serve.convert(variables, QAT_RULES)
        layer = served_vars["params"]["encoder"]["layer"]["0"]
        assert layer["attention"]["self"]["query"]["kernel"].scale.shape == (1, 64)
        assert layer["intermediate"]["dense"]["kernel"].scale.shape == (2, 128)
        out = jax.jit(serve.served(hidden, QAT_RULES))(served_vars, *ids)
        np.testing.assert_array_equal(out, qat)


def test_example_script_runs_tiny(tmp_path):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert EXAMPLE.main(["--tiny", "--qat-steps", "1", "--cache", str(tmp_path)]) == 0
    text = stdout.getvalue()
    assert "int4 block 32, MSE clipping |" in text
    assert "max |diff| of the hidden states: 0 (expected 0)" in text
