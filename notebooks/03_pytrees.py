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
# # Quantizing parameter pytrees: rules, stacked layers, reports and checkpoints
#
# Post-training quantization of a whole Flax model, end to end:
#
# 1. **Rules by regex.** `qjax.quantize_tree(params, rules)` picks a spec for each leaf by
#    matching its path (`params/blocks/Dense_0/kernel`) against ordered regexes, with specs
#    in shorthand (`"int4:per_block:32"`).
# 2. **Scan-stacked layers.** A model built with `nn.scan` stores its layers stacked on a
#    leading axis. `jax.vmap` over that axis quantizes each layer on its own, exactly as a
#    Python loop would.
# 3. **The report**: bytes before and after, compression ratio, SQNR and max error per
#    leaf (`qjax.report.report`).
# 4. **Checkpoints**: `qjax.save` / `qjax.load` to a `.safetensors` file, and its real
#    size on disk against float32.
#
# The model is trained here, in a few seconds, on scikit-learn's bundled 8x8 digits.

# %%
import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qjax
from qjax.demo.notebook import accuracy_fn, flat_digits, sqnr_db, train_classifier
from qjax.report import report

START = time.perf_counter()


# %% [markdown]
# ## A model with scan-stacked layers
#
# An embedding layer 64 → 128, four residual blocks `h + relu(Dense(h))` applied with
# `nn.scan` (one set of block parameters per layer, stacked on axis 0), and a 10-way
# head. Fixed seeds: every run trains the same weights.

# %%
x_train, x_test, y_train, y_test = flat_digits()
DEPTH, WIDTH = 4, 128


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.relu(nn.Dense(h.shape[-1])(h)), None


class ScanMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(WIDTH, name="embed")(x))
        blocks = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=DEPTH
        )
        h, _ = blocks(name="blocks")(h, None)
        return nn.Dense(10, name="head")(h)


model = ScanMLP()
accuracy = accuracy_fn(model)
params, _ = train_classifier(model, x_train, y_train, epochs=20, learning_rate=1e-3)
float_acc = float(accuracy(params, x_test, y_test))
print(f"float32 test accuracy: {float_acc:.1%}")
for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    print(f"{jax.tree_util.keystr(path, simple=True, separator='/'):28} {leaf.shape}")

# %% [markdown]
# ## 1. Rules by regex
#
# Rules are ordered: the first regex that `re.fullmatch`-es a leaf's path decides its
# spec, and `None` (or `"keep"`) keeps a leaf float. A catch-all rule such as `.*`
# leaves float the leaves under `min_size` elements (default 1024) and the 1-D ones (the
# biases here); a rule that names a leaf quantizes it whatever its size. A shorthand spec
# without `axis=` follows the leaf's layout (a Flax kernel `[in, out]`: channels on the
# last axis, blocks along the inputs). `qjax.plan` shows the decisions, and why a leaf
# stays float, without quantizing anything.
#
# These rules keep the small head float, quantize the embedding to int8 per output
# channel and the stacked blocks to int4 with blocks of 32 inputs. The catch-all `.*`
# after them is a safety net for any leaf added to the model later.

# %%
rules = {
    r"params/head/.*": "keep",  # matched first: the head stays float
    r"params/embed/kernel": "int8:per_channel",
    r"params/blocks/.*kernel": "int4:per_block:32",
    r".*": None,
}
print(qjax.plan(params, rules))

# %% [markdown]
# One caveat shows up in the block shape. A per-block granularity covers the whole of
# every axis other than the blocked and the channel axis, so on the stacked
# `[layers, in, out]` kernel the blocks run across all four layers: one scale per 32
# inputs of each output channel, *shared by the layers*.

# %%
stacked_kernel = params["params"]["blocks"]["Dense_0"]["kernel"]
gran = qjax.parse_spec("int4:per_block:32").granularity
for what, shape in (
    ("stacked kernel", stacked_kernel.shape),
    ("one layer", stacked_kernel.shape[1:]),
):
    print(f"{what:14} {shape!s:15} -> blocks of {gran.block_shape(shape)}")

# %% [markdown]
# ## 2. vmap over the stacked layers
#
# `jax.vmap` over the layer axis gives each layer its own scales. The quantized leaf is
# one `QArray` whose values and scales carry the layer axis in front, and it is exactly
# what a loop over the layers produces.

# %%
blocks = params["params"]["blocks"]
block_rules = {r".*kernel": "int4:per_block:32"}

# Under jit the leaves are tracers, so quantize_tree cannot look for NaN / inf in them;
# qjax.count_nonfinite(params) is the jit-friendly check. These weights are finite.
vmapped = jax.jit(jax.vmap(lambda p: qjax.quantize_tree(p, block_rules)))(blocks)
looped = [
    qjax.quantize_tree(jax.tree.map(lambda a, i=i: a[i], blocks), block_rules) for i in range(DEPTH)
]
qv = vmapped["Dense_0"]["kernel"]
print(qv)
for field in ("data", "scale"):
    stacked = jnp.stack([getattr(q["Dense_0"]["kernel"], field) for q in looped])
    same = bool(jnp.array_equal(getattr(qv, field), stacked))
    print(f"{field:5}: vmap {getattr(qv, field).shape} == loop {stacked.shape}: {same}")

shared = qjax.quantize_tree(blocks, block_rules)["Dense_0"]["kernel"]  # no vmap
print(f"\nwithout vmap: scale shape {shared.scale.shape} (shared by the {DEPTH} layers)")

per_layer = qv.dequantize()  # a stacked QArray dequantizes as a whole
across = shared.dequantize()
for i in range(DEPTH):
    print(
        f"layer {i}: SQNR {sqnr_db(stacked_kernel[i], per_layer[i]):5.2f} dB with its own "
        f"scales, {sqnr_db(stacked_kernel[i], across[i]):5.2f} dB with shared ones"
    )

# %% [markdown]
# The whole model: the stacked blocks from `vmap`, the other leaves from the rules. The
# quantized tree keeps the structure of `params`, so `dequantize_tree` gives back
# something `model.apply` takes.

# %%
outer_rules = {r"params/blocks/.*": "keep", **{p: s for p, s in rules.items() if "blocks" not in p}}
qtree = qjax.quantize_tree(params, outer_rules)
qtree["params"]["blocks"] = vmapped
q_acc = float(accuracy(qjax.dequantize_tree(qtree), x_test, y_test))
print(f"test accuracy: float32 {float_acc:.1%}, quantized {q_acc:.1%}")

# %% [markdown]
# ## 3. The report
#
# `qjax.report.report(params, qtree)` compares the float tree with the quantized one,
# leaf by leaf: bytes before and after (values, scales and offsets as stored: int4
# values are packed two per byte), the ratio, the SQNR and the largest error. The total
# SQNR pools the quantized leaves.

# %%
rep = report(params, qtree)
print(rep)

# %% [markdown]
# The same numbers from NumPy, for the stacked kernel, as a check of what the table
# means.

# %%
row = next(r for r in rep.rows if r["path"] == "params/blocks/Dense_0/kernel")
x = np.asarray(stacked_kernel, np.float64)
err = x - np.asarray(qv.dequantize(), np.float64)
values_bytes = x.size // 2  # int4: two values per byte
scale_bytes = qv.scale.size * 4  # float32 scales
print(
    f"bytes  : {values_bytes} + {scale_bytes} = {values_bytes + scale_bytes}, "
    f"report {row['bytes_after']}"
)
print(
    f"SQNR   : {10 * np.log10(np.sum(x**2) / np.sum(err**2)):.4f} dB, "
    f"report {row['sqnr_db']:.4f} dB"
)
print(f"max err: {np.abs(err).max():.6f}, report {row['max_abs_error']:.6f}")

# %% [markdown]
# ## 4. Save and load
#
# `qjax.save` writes the tree to one `.safetensors` file: packed int4 values stay packed,
# each QArray's spec goes into the metadata, and every tensor gets a checksum that
# `qjax.load` verifies. The float tree, saved the same way, is the baseline.

# %%
with tempfile.TemporaryDirectory() as tmp:
    q_path = os.path.join(tmp, "quantized.safetensors")
    f_path = os.path.join(tmp, "float32.safetensors")
    qjax.save(q_path, qtree)
    qjax.save(f_path, params)
    q_size, f_size = os.path.getsize(q_path), os.path.getsize(f_path)
    loaded = qjax.load(q_path)

float_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
print(f"float32 parameters : {float_bytes:7d} B in memory, {f_size:7d} B on disk")
print(f"quantized          : {rep.totals['bytes_after']:7d} B in memory, {q_size:7d} B on disk")
print(
    f"on disk: {f_size / q_size:.2f}x smaller; the file's header and metadata take "
    f"{q_size - rep.totals['bytes_after']} B"
)

same_tree = jax.tree.structure(loaded) == jax.tree.structure(qtree)
same_leaves = all(
    jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qtree))
)
print(f"loaded tree: same structure and specs {same_tree}, bit-identical leaves {same_leaves}")
loaded_acc = float(accuracy(qjax.dequantize_tree(loaded), x_test, y_test))
print(f"test accuracy of the loaded model: {loaded_acc:.1%}")

# %%
print(f"notebook ran in {time.perf_counter() - START:.1f} s")
