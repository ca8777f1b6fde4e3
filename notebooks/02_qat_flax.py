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
# # Quantization-aware training in Flax: Linen, NNX, calibration and int8 serving
#
# One small CNN, trained here in a few seconds on scikit-learn's bundled 8x8 digits, goes
# through the whole path from a float model to a served integer model:
#
# 1. **The interceptor on an unmodified Linen model.** `qjax.flax.linen.intercept(rules)`
#    fake-quantizes the weights and inputs of the layers the rules match, while the model
#    code and its parameter tree stay exactly those of the float model.
# 2. **Static activation calibration.** Input ranges of each quantized layer live in the
#    `quant_stats` collection, calibrated by a moving average over a few batches.
# 3. **PTQ, then QAT.** Post-training quantization of the float weights, then a short
#    fine-tune with the interceptor inside the jitted training step (straight-through
#    gradients).
# 4. **The same model in NNX.** `qjax.flax.nnx.quantize(model, rules)` puts quantizing
#    operators in place, with the same rules; ranges are `QuantStat` variables.
# 5. **Serving.** `qjax.flax.serve.convert` stores the QAT weights as packed QArrays and
#    `serve.serving` runs the same unmodified model with int8 x int8 -> int32 dots.
#
# Two formats, both servable with integer dots (signed, symmetric, zero point 0, scales
# that factor out of the contraction):
#
# - **W8A8**: int8 weights per output channel, int8 inputs per tensor with static ranges
#   (`qjax.demo.digits.FORMATS[0]`).
# - **W2A8**: the same, with int2 weights (`[-2, 1]`): a format where PTQ loses accuracy
#   and QAT has something to win back.
#
# Training, calibration and evaluation reuse `qjax.demo.digits`; every number below is
# computed in this notebook.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import qjax
from qjax.demo import digits
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx
from qjax.flax import serve

matplotlib.use("Agg")  # off-screen rendering when this file runs as a plain script
# %matplotlib inline

START = time.perf_counter()
SEED = 0
FLOAT_STEPS = 200  # float training (Adam, lr 1e-3, batches of 128)
QAT_STEPS = 60  # QAT fine-tuning from the float weights
QAT_LR = 3e-4
EVAL_EVERY = 10  # QAT steps between two test-accuracy points of the curves


def print_table(headers, rows) -> None:
    """A plain-text table, right-aligned, one column per header."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


# %% [markdown]
# ## The float model
#
# `digits.CNN` is a plain Linen model, `Conv(16) → Conv(32) → Dense(64) → Dense(10)` with
# ReLUs, whose layers are named `conv1`, `conv2`, `fc1` and `head`. Nothing in it knows
# about quantization.

# %%
data = digits.load_data(SEED)
model = digits.CNN()
t0 = time.perf_counter()
float_vars = digits.train(model, data, steps=FLOAT_STEPS, lr=1e-3, seed=SEED)
float_acc = digits.accuracy(model, float_vars, data.x_test, data.y_test)
float_bytes = digits.weight_bytes(float_vars["params"])
print(f"{len(data.y_train)} training / {len(data.y_test)} test images")
print(f"float CNN: {FLOAT_STEPS} steps in {time.perf_counter() - t0:.1f} s")
print(f"float32 test accuracy {float_acc:.2%}, {float_bytes:,} parameter bytes")
for name, layer in float_vars["params"].items():
    print(f"  {name:5s} kernel {tuple(layer['kernel'].shape)}")

# %% [markdown]
# ## Rules, and the interceptor on the unmodified model
#
# A rule maps a regex on the module path to a `LayerQuant`: a weight spec and an optional
# `ActQuant` for the layer's input. `static=True` asks for calibrated ranges instead of
# each batch's own min / max.

# %%
A8 = qlinen.ActQuant(qjax.QuantSpec("int8"), static=True)  # per tensor, calibrated
FORMATS = {
    "W8A8": digits.FORMATS[0].rules,
    "W2A8": {
        ".*": qlinen.LayerQuant(
            weight=qjax.QuantSpec("int2", granularity=qjax.per_channel(-1)), act=A8
        )
    },
}
for name, rules in FORMATS.items():
    for pattern, quant in rules.items():
        print(f"{name}: {pattern!r} -> weight {quant.weight}, input {quant.act.spec} static")

# %% [markdown]
# `intercept` is a context manager around `model.apply`. Linen interceptors are Python
# state that the jit cache does not see, so the context is entered *inside* the jitted
# function: `qlinen.intercepted(model.apply, rules)` is a new function, safe to jit next
# to the float one. The variables are the float model's, as they are.
#
# Without calibrated ranges the static activation quantizers fall back to each batch's
# range; applying with `mutable=["quant_stats"]` calibrates them.

# %%
rules = FORMATS["W8A8"]
float_apply = jax.jit(model.apply)
qat_apply = jax.jit(qlinen.intercepted(model.apply, rules))
x = jnp.asarray(data.x_test[:8])
y_float = float_apply(float_vars, x)
y_q = qat_apply(float_vars, x)
shapes = jax.eval_shape(qlinen.intercepted(model.init, rules), jax.random.key(0), x)
same = jax.tree.map(lambda a, b: a.shape == b.shape, shapes["params"], float_vars["params"])
print("collections of model.init under intercept:", sorted(shapes))
print("params: same tree and shapes as the float model's:", all(jax.tree.leaves(same)))
print(
    f"max |logits(W8A8) - logits(float)| on 8 images: {float(jnp.max(jnp.abs(y_q - y_float))):.4f}"
)


@jax.jit
def calibrate_once(variables, x):
    with qlinen.intercept(rules):  # inside the jitted function
        _, updates = model.apply(variables, x, mutable=[qlinen.STATS])
    return updates[qlinen.STATS]


stats = calibrate_once(float_vars, jnp.asarray(data.x_train[:256]))
print("\nquant_stats after one calibrating apply (a single batch of 256):")
for layer, s in stats.items():
    print(f"  {layer:5s} input range [{float(s['act_min']):+.3f}, {float(s['act_max']):+.3f}]")

# %% [markdown]
# Gradients flow through the fake quantizers with the straight-through estimator, and
# have the float parameters' structure: the optimizer never sees anything quantized.

# %%


def qat_loss(params, x, y):
    with qlinen.intercept(rules):
        logits = model.apply({"params": params, qlinen.STATS: stats}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


grads = jax.jit(jax.grad(qat_loss))(
    float_vars["params"], jnp.asarray(data.x_train[:128]), jnp.asarray(data.y_train[:128])
)
print(
    "gradient tree == parameter tree:",
    jax.tree.structure(grads) == jax.tree.structure(float_vars["params"]),
)
for layer, g in grads.items():
    print(f"  {layer:5s} |grad kernel| = {float(jnp.linalg.norm(g['kernel'])):.4f}")

# %% [markdown]
# ## Static calibration and PTQ
#
# `digits.calibrate` runs the intercepted model with `mutable=["quant_stats"]` on the
# first 4 batches of 256 training images: the first batch sets each range, the next ones
# move it with the `ActQuant`'s moving average (momentum 0.9).
#
# `digits.evaluate` is PTQ: the kernels are really quantized with `qjax.quantize_tree`
# (the byte counts are those of the stored QArrays), dequantized, and the model runs with
# only the activation quantizers intercepted, on freshly calibrated ranges.

# %%
calibrated = {
    name: digits.calibrate(model, float_vars, r, data.x_train) for name, r in FORMATS.items()
}
rows = []
for layer in float_vars["params"]:
    s8, s2 = (calibrated[name][qlinen.STATS][layer] for name in FORMATS)
    rows.append(
        [
            layer,
            f"{float(s8['act_min']):+.3f}",
            f"{float(s8['act_max']):+.3f}",
            f"{float(s8['act_max']) / 127.5:.5f}",
            f"{float(s2['act_max']):+.3f}",
        ]
    )
print("calibrated input ranges (4 batches of 256):")
print_table(["layer", "W8A8 min", "W8A8 max", "int8 scale", "W2A8 max"], rows)

results = {name: {"float": float_acc} for name in FORMATS}
nbytes = {}
for name, r in FORMATS.items():
    results[name]["PTQ"], nbytes[name] = digits.evaluate(model, float_vars, r, data)
    print(f"{name} PTQ: {results[name]['PTQ']:.2%} ({nbytes[name]:,} parameter bytes)")

# %% [markdown]
# The W2A8 ranges differ from W8A8's from `conv2` on: the int2 weights of the earlier
# layers already change what the later layers see. The int8 scale of a symmetric range
# is `max(|min|, |max|) / 127.5`.
#
# ## QAT in Linen
#
# `digits.make_train_step(model, optimizer, rules)` is a jitted Adam step whose model
# runs under `intercept(rules)` inside the jit; the static ranges start from the
# calibration above and follow the moving average of the training batches. Every
# `EVAL_EVERY` steps the current weights are evaluated exactly as PTQ was (quantized
# storage, fresh calibration), so step 0 is the PTQ accuracy.

# %%
qat_vars, curves = {}, {}
for name, r in FORMATS.items():
    t0 = time.perf_counter()
    optimizer = optax.adam(QAT_LR)
    step = digits.make_train_step(model, optimizer, r)
    params, stats = float_vars["params"], calibrated[name][qlinen.STATS]
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(SEED + 1)
    per_epoch = len(data.y_train) // 128  # shuffled epochs of full batches of 128
    batches = [
        b
        for _ in range(-(-QAT_STEPS // per_epoch))
        for b in np.array_split(rng.permutation(len(data.y_train))[: per_epoch * 128], per_epoch)
    ]
    losses, evals = [], [(0, results[name]["PTQ"])]
    for i, idx in enumerate(batches[:QAT_STEPS], start=1):
        params, stats, opt_state, loss = step(
            params, stats, opt_state, data.x_train[idx], data.y_train[idx]
        )
        losses.append(float(loss))
        if i % EVAL_EVERY == 0:
            evals.append((i, digits.evaluate(model, {"params": params}, r, data)[0]))
    qat_vars[name] = {"params": params, qlinen.STATS: stats}
    curves[name] = (losses, evals)
    results[name]["QAT (Linen)"] = evals[-1][1]
    print(
        f"{name} QAT: {QAT_STEPS} steps in {time.perf_counter() - t0:.1f} s, "
        f"mean loss of the first / last {EVAL_EVERY} steps "
        f"{np.mean(losses[:EVAL_EVERY]):.4f} / {np.mean(losses[-EVAL_EVERY:]):.4f}; test accuracy "
        + " -> ".join(f"{a:.2%}" for _, a in evals)
    )

# %% [markdown]
# ## The same model in NNX
#
# `digits.NnxCNN` is the same network in Flax NNX (same layer names and layouts), and
# `digits.nnx_from_linen` loads the trained Linen weights into it. `qnnx.quantize(model,
# rules)` takes the same rules: each matched layer's `dot_general` /
# `conv_general_dilated` becomes a `QuantOp` that fake-quantizes both operands; with a
# static `ActQuant` it holds two `QuantStat` variables. `qnnx.calibrate(model)` turns the
# moving-average updates on, `qnnx.calibrate(model, False)` freezes them.

# %%
nnx_model = digits.nnx_from_linen(float_vars)
print("NNX float accuracy:", f"{digits.nnx_accuracy(nnx_model, data.x_test, data.y_test):.2%}")

nnx_q = qnnx.quantize(nnx.clone(nnx_model), FORMATS["W8A8"])
print("conv1.conv_general_dilated is a", type(nnx_q.conv1.conv_general_dilated).__name__)
print("fc1.dot_general is a", type(nnx_q.fc1.dot_general).__name__)


@nnx.jit
def nnx_forward(m, x):
    return m(x)


qnnx.calibrate(nnx_q)  # the same 4 batches of 256 as digits.calibrate
for i in range(4):
    nnx_forward(nnx_q, data.x_train[i * 256 : (i + 1) * 256])
qnnx.calibrate(nnx_q, False)
linen_stats = calibrated["W8A8"][qlinen.STATS]
rows = []
for layer in digits.NNX_LAYERS:
    op = getattr(nnx_q, layer)
    op = op.conv_general_dilated if layer.startswith("conv") else op.dot_general
    nnx_range = (float(op.act_min[...]), float(op.act_max[...]))
    linen_range = (float(linen_stats[layer]["act_min"]), float(linen_stats[layer]["act_max"]))
    diff = max(abs(a - b) for a, b in zip(nnx_range, linen_range))
    rows.append([layer, f"{nnx_range[0]:+.3f}", f"{nnx_range[1]:+.3f}", f"{diff:.1e}"])
print("W8A8 QuantStat ranges, calibrated in NNX, against Linen's quant_stats:")
print_table(["layer", "act_min", "act_max", "max |NNX - Linen|"], rows)
n_params = len(jax.tree.leaves(nnx.state(nnx_q, nnx.Param)))
n_stats = len(jax.tree.leaves(nnx.state(nnx_q, qnnx.QuantStat)))
print(f"{n_params} nnx.Param leaves (what nnx.Optimizer(..., wrt=nnx.Param) trains)")
print(f"{n_stats} QuantStat leaves (act_min / act_max of the 4 layers: state, not parameters)")

# %% [markdown]
# `digits.nnx_evaluate` is PTQ in NNX (a quantized, calibrated copy), and
# `digits.nnx_train` is QAT: it quantizes the model in place, lets the ranges follow the
# training batches, and freezes them at the end. Same steps and learning rate as above.

# %%
for name, r in FORMATS.items():
    t0 = time.perf_counter()
    results[name]["PTQ (NNX)"] = digits.nnx_evaluate(nnx_model, r, data)
    trained = digits.nnx_train(
        digits.nnx_from_linen(float_vars), data, steps=QAT_STEPS, lr=QAT_LR, seed=SEED + 1, rules=r
    )
    results[name]["QAT (NNX)"] = digits.nnx_evaluate(trained, r, data)
    print(
        f"{name} NNX: PTQ {results[name]['PTQ (NNX)']:.2%}, QAT {results[name]['QAT (NNX)']:.2%} "
        f"({time.perf_counter() - t0:.1f} s)"
    )

# %% [markdown]
# ## Serving with integer dots
#
# `serve.convert(variables, rules)` turns the QAT variables (float params plus calibrated
# `quant_stats`) into the served tree: each quantized kernel becomes a packed QArray (int2
# is four values a byte), biases and ranges stay as they are. `serve.served(model.apply,
# rules, integer_dots="require")` runs the *same unmodified model* on it: each layer's
# input is quantized to int8 codes with its calibrated scale, the dot or convolution runs
# on int8 operands with int32 accumulation, and the int32 result is multiplied by
# activation scale x weight scale. `"require"` refuses any layer that could not do this.
#
# The QAT ranges are recalibrated first, as the evaluation above does.

# %%
served_vars, served_fns = {}, {}
for name, r in FORMATS.items():
    final = digits.calibrate(model, {"params": qat_vars[name]["params"]}, r, data.x_train)
    qat_vars[name] = final
    served_vars[name] = serve.convert(final, r)
    served_fns[name] = jax.jit(serve.served(model.apply, r, integer_dots="require"))
    kernels = {k: v["kernel"] for k, v in served_vars[name]["params"].items()}
    print(
        f"{name}: "
        + ", ".join(f"{k} {v.dtype}{'(packed)' if v.packed else ''}" for k, v in kernels.items())
        + f"; {digits.weight_bytes(served_vars[name]['params']):,} parameter bytes"
        + f" (float32: {float_bytes:,})"
    )


def dots(jaxpr):
    """(primitive, input dtypes, output dtype) of every dot and convolution, nested too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            ins = tuple(str(v.aval.dtype) for v in eqn.invars)
            found.append((eqn.primitive.name, ins, str(eqn.outvars[0].aval.dtype)))
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    found += dots(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    found += dots(sub)
    return found


print("\nW8A8 served: the dots in the traced program")
for prim, ins, out in dots(jax.make_jaxpr(served_fns["W8A8"])(served_vars["W8A8"], x).jaxpr):
    print(f"  {prim:22s} {' x '.join(ins)} -> {out}")

# %% [markdown]
# The served model against the QAT model (float kernels, fake-quantized under the
# interceptor, the same calibrated ranges). Each layer's integer sum is exact and scaled
# once, where the fake-quant model rounds every float product, so a layer's outputs agree
# to the last bits. Those last bits can still move a value of the *next* layer's input
# across a rounding boundary of its int8 grid, one code step: an image whose logits
# differ by more than float rounding (relative 1e-5 here) has met such a tie somewhere.

# %%
for name, r in FORMATS.items():
    served_logits = np.asarray(served_fns[name](served_vars[name], data.x_test))
    qat_logits = np.asarray(digits.logits(model, qat_vars[name], data.x_test, r))
    pred = served_logits.argmax(-1)
    results[name]["served int8"] = float(np.mean(pred == data.y_test))
    gap = np.max(np.abs(served_logits - qat_logits), axis=-1) / np.max(np.abs(qat_logits))
    same = np.mean(pred == qat_logits.argmax(-1))
    print(
        f"{name}: served accuracy {results[name]['served int8']:.2%}, same prediction as QAT "
        f"on {same:.1%} of images; max |served - QAT| / max |QAT| = {gap.max():.1e}, "
        f"over 1e-5 on {int(np.sum(gap > 1e-5))} of {len(gap)} images"
    )

# %% [markdown]
# ## The accuracy table
#
# Test accuracy on the 450 held-out images. PTQ and QAT are evaluated alike (quantized
# weights, freshly calibrated static ranges); "served int8" is the converted QAT model run
# with int8 x int8 -> int32 dots. Bytes are those of all parameters as stored (values,
# scales, float32 biases).

# %%
COLUMNS = ["float", "PTQ", "PTQ (NNX)", "QAT (Linen)", "QAT (NNX)", "served int8"]
table = [
    [name, *(f"{results[name][c]:.2%}" for c in COLUMNS), f"{nbytes[name]:,}"] for name in FORMATS
]
print_table(["format", *COLUMNS, "bytes"], table)
print(f"\nfloat32: {float_acc:.2%}, {float_bytes:,} bytes")
for name in FORMATS:
    ptq_gap = 100 * (results[name]["PTQ"] - results[name]["float"])
    qat_gain = 100 * (results[name]["QAT (Linen)"] - results[name]["PTQ"])
    print(
        f"{name}: {float_bytes / nbytes[name]:.1f}x smaller; PTQ vs float {ptq_gap:+.2f} points, "
        f"QAT (Linen) vs PTQ {qat_gain:+.2f} points"
    )

# %%
fig, (ax_bar, ax_acc, ax_loss) = plt.subplots(
    1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1.3, 1, 1]}
)
width = 0.8 / len(COLUMNS)
for j, col in enumerate(COLUMNS):
    xs = np.arange(len(FORMATS)) + (j - (len(COLUMNS) - 1) / 2) * width
    ax_bar.bar(xs, [100 * results[n][col] for n in FORMATS], width, label=col)
ax_bar.set_xticks(np.arange(len(FORMATS)), list(FORMATS))
low = min(min(v.values()) for v in results.values())
ax_bar.set_ylim(100 * low - 2, 100.5)
ax_bar.set_ylabel("test accuracy (%)")
ax_bar.set_title("accuracy per format and stage")
ax_bar.legend(fontsize=8, loc="upper center", ncol=3)

for name in FORMATS:
    steps_, accs = zip(*curves[name][1])
    ax_acc.plot(steps_, [100 * a for a in accs], "o-", label=name)
    ax_loss.plot(np.arange(1, QAT_STEPS + 1), curves[name][0], label=name)
ax_acc.axhline(100 * float_acc, color="gray", ls="--", label="float32")
ax_acc.set_xlabel("QAT step (step 0 = PTQ)")
ax_acc.set_ylabel("test accuracy (%)")
ax_acc.set_title("Linen QAT: test accuracy, evaluated as PTQ")
ax_acc.legend(fontsize=8, loc="lower right")
ax_loss.set_xlabel("QAT step")
ax_loss.set_ylabel("cross-entropy")
ax_loss.set_title("Linen QAT: training loss (fake-quantized model)")
ax_loss.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What to take away
#
# - The interceptor quantizes an unmodified Linen model; its parameter tree, checkpoints
#   and optimizer are the float model's. Enter it inside the jitted function (or jit
#   `qlinen.intercepted(...)`).
# - Static ranges are just another collection (`quant_stats`) in Linen and `QuantStat`
#   variables in NNX; both calibrate with the same moving average, and give the same
#   ranges from the same batches.
# - The same rules drive Linen QAT, NNX QAT, PTQ storage and serving.
# - `serve.convert` + `serve.served(..., integer_dots="require")` run the QAT model with
#   integer dots; its logits match the fake-quant QAT model's up to float rounding, or
#   one int8 code step where a rounding tie falls the other way (counted above).

# %%
print(f"notebook ran in {time.perf_counter() - START:.0f} s on {jax.devices()[0].device_kind}")
