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
# # Granularity trade-offs: bits, block sizes and the bytes the scales cost
#
# How much accuracy does each quantization choice keep, and what does it cost in bytes?
# This notebook measures it on real weights: a small MLP trained here, in a few seconds,
# on scikit-learn's bundled 8x8 digits.
#
# 1. **Bits and granularity.** SQNR and max error of the trained kernels for int8 / int4 /
#    int2 (signed, symmetric) and uint8 / uint4 / uint2 (asymmetric), per tensor, per
#    output channel, and per block of 8 to 256 inputs.
# 2. **The bytes of the scales.** `QArray.nbytes` (values + scales + offsets) against the
#    values alone, so each granularity becomes a point on a size/error plane.
# 3. **The three formulations** (`scale`, `zero_point`, `minval`) on asymmetric data: the
#    trained model's post-ReLU activations and its pre-activations.
# 4. **Where the curves bend, and why**, from the numbers computed above.
#
# SQNR is the signal-to-quantization-noise ratio, `10 log10(sum(x**2) / sum((x - x')**2))`,
# in dB: higher is better, and every extra bit is worth at most `20 log10(2)` dB.

# %%
import itertools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np

import qjax
from qjax.demo.notebook import accuracy_fn, flat_digits, print_table, sqnr_db, train_classifier

matplotlib.use("Agg")  # off-screen rendering when this file runs as a plain script
# %matplotlib inline

START = time.perf_counter()
DB_PER_BIT = 20 * np.log10(2.0)  # the SQNR one more bit buys a uniform quantizer


# %% [markdown]
# ## A model to quantize
#
# An MLP 64 → 256 → 256 → 10 with ReLUs, trained with AdamW on 75% of the 1797 digits
# (fixed seeds, so every run gives the same weights). Flax stores Dense kernels as
# `[in, out]`: the output channel is axis -1 and blocks run along the input axis, -2.
# The study covers the two hidden kernels, `Dense_0` `[64, 256]` and `Dense_1`
# `[256, 256]`.

# %%
x_train, x_test, y_train, y_test = flat_digits()


class MLP(nn.Module):
    hidden: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


model = MLP()
accuracy = accuracy_fn(model)
t0 = time.perf_counter()
params, loss = train_classifier(model, x_train, y_train, epochs=30, learning_rate=3e-3)
float_acc = float(accuracy(params, x_test, y_test))
print(
    f"trained in {time.perf_counter() - t0:.1f} s (final batch loss {loss:.4f}); "
    f"test accuracy {float_acc:.1%} on {len(x_test)} held-out digits"
)

# The two hidden kernels; the 10-way head (2560 weights) stays float, as it often does.
kernels = {name: params["params"][name]["kernel"] for name in ("Dense_0", "Dense_1")}
for name, k in kernels.items():
    print(f"{name}/kernel {tuple(k.shape)}: std {k.std():.4f}, max|w| {jnp.abs(k).max():.4f}")

# %% [markdown]
# ## 1. SQNR and max error vs bits, for every granularity
#
# Granularities run from coarse to fine: one scale for the whole kernel, one per output
# channel, then one per block of `B` inputs of each output channel, for the block sizes
# that divide the kernel's input axis (so `Dense_0`, with 64 inputs, stops at 64). A
# block of 256 on a kernel with 256 inputs is per channel; the sweep checks that once
# and then leaves it out.
#
# * `int` rows: signed, symmetric scheme (the default), `scale = amax / ((qmax - qmin) / 2)`.
# * `uint` rows: unsigned, asymmetric scheme, `scale = (max - min) / (qmax - qmin)` with a
#   zero point; the sensible use of an unsigned type for weights centred on zero.
#
# Each cell keeps the `QArray`, so the byte counts below are those of the stored arrays.

# %%
BITS = (8, 4, 2)
BLOCK_SIZES = (128, 64, 32, 16, 8)
FAMILIES = {"int": "symmetric", "uint": "asymmetric"}

w1 = kernels["Dense_1"]
per_channel_hat = qjax.fake_quant(w1, qjax.QuantSpec("int4", granularity=qjax.per_channel(-1)))
block_256_hat = qjax.fake_quant(w1, qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 256)))
print(
    "per_block(-2, 256) equals per_channel(-1) on Dense_1 [256, 256]:",
    bool(jnp.array_equal(per_channel_hat, block_256_hat)),
)


def granularities(shape):
    """(label, granularity) pairs from coarse to fine that fit a kernel of this shape."""
    out = [("tensor", qjax.per_tensor()), ("channel", qjax.per_channel(-1))]
    out += [(f"block {b}", qjax.per_block(-2, b)) for b in BLOCK_SIZES if shape[-2] % b == 0]
    return out


results = {}  # (kernel, family, bits, granularity label) -> measurements
t0 = time.perf_counter()
for name, k in kernels.items():
    k64 = np.asarray(k, np.float64)
    for family, scheme in FAMILIES.items():
        for bits in BITS:
            for label, gran in granularities(k.shape):
                spec = qjax.QuantSpec(f"{family}{bits}", scheme=scheme, granularity=gran)
                qa = qjax.quantize(k, spec)
                k_hat = qjax.dequantize(qa)
                results[name, family, bits, label] = {
                    "sqnr": sqnr_db(k, k_hat),
                    "max_err": float(np.max(np.abs(k64 - np.asarray(k_hat)))),
                    "nbytes": qa.nbytes,  # values + scales + zero points
                    "values": int(qa.data.nbytes),  # the (packed) values alone
                    "k_hat": k_hat,
                }
print(f"{len(results)} quantize + dequantize pairs in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# The int rows of the 256 x 256 hidden kernel, `Dense_1`, in full; `overhead` is the
# share of the bytes spent on scales (and zero points), `bits/w` the stored bits per
# weight, parameters included.


# %%
def overhead(r) -> float:
    return 100 * (r["nbytes"] - r["values"]) / r["nbytes"]


def bits_per_weight(name, r) -> float:
    return 8 * r["nbytes"] / kernels[name].size


for family in FAMILIES:
    rows = []
    for bits in BITS:
        for label, _ in granularities(kernels["Dense_1"].shape):
            r = results["Dense_1", family, bits, label]
            rows.append(
                [
                    f"{family}{bits}",
                    label,
                    r["sqnr"],
                    f"{r['max_err']:.2e}",
                    r["values"],
                    r["nbytes"] - r["values"],
                    f"{overhead(r):.1f}%",
                    bits_per_weight("Dense_1", r),
                ]
            )
    print_table(
        [
            "dtype",
            "granularity",
            "SQNR dB",
            "max|err|",
            "values B",
            "params B",
            "overhead",
            "bits/w",
        ],
        rows,
    )
    print()


# %%
all_labels = [label for label, _ in granularities(w1.shape)]  # the finest list: Dense_1's
fig, axes = plt.subplots(2, 3, figsize=(14, 7), sharex=True)
markers = {"Dense_0": "o", "Dense_1": "s"}
for col, bits in enumerate(BITS):
    for name in kernels:
        labels = [label for label, _ in granularities(kernels[name].shape)]
        xs = [all_labels.index(label) for label in labels]
        for family, style in (("int", "-"), ("uint", "--")):
            rs = [results[name, family, bits, label] for label in labels]
            kw = {"marker": markers[name], "linestyle": style, "label": f"{name} {family}"}
            axes[0, col].plot(xs, [r["sqnr"] for r in rs], **kw)
            axes[1, col].plot(xs, [r["max_err"] for r in rs], **kw)
    axes[0, col].set_title(f"{bits}-bit")
    axes[1, col].set_yscale("log")
    axes[1, col].set_xticks(range(len(all_labels)), all_labels, rotation=60)
axes[0, 0].set_ylabel("SQNR (dB)")
axes[1, 0].set_ylabel("max |w - w'|")
axes[0, 2].legend(fontsize=8)
fig.suptitle(
    "Trained MLP kernels, coarse to fine granularity (solid: int symmetric, "
    "dashed: uint asymmetric)"
)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### Accuracy
#
# SQNR is a proxy. Putting the dequantized kernels back into the model (biases and the
# head stay float) gives the test accuracy each choice keeps, for the granularities that
# fit both kernels.


# %%
def with_kernels(family, bits, label):
    """The trained params with the studied kernels replaced by their dequantized versions."""
    new = {name: dict(layer) for name, layer in params["params"].items()}
    for name in kernels:
        new[name]["kernel"] = results[name, family, bits, label]["k_hat"]
    return {"params": new}


common = [label for label, _ in granularities(kernels["Dense_0"].shape)]
rows = []
for family in FAMILIES:
    for bits in BITS:
        accs = [float(accuracy(with_kernels(family, bits, lab), x_test, y_test)) for lab in common]
        rows.append([f"{family}{bits}", *[f"{a:.1%}" for a in accs]])
print(f"float32 test accuracy: {float_acc:.1%}")
print_table(["dtype", *common], rows)

# %% [markdown]
# ## 2. The bytes of the scales: size against error
#
# A float32 scale per block of `B` weights costs `32 / B` bits per weight on top of the
# values (plus the int32 zero points for the asymmetric rows). Plotting SQNR against the
# stored bits per weight puts every (dtype, granularity) pair of `Dense_1` on one plane:
# the useful choices are on the upper-left frontier.

# %%
fig, ax = plt.subplots(figsize=(8, 5))
labels = [label for label, _ in granularities(w1.shape)]
for family, style in (("int", "-"), ("uint", "--")):
    for bits, color in zip(BITS, ("C0", "C1", "C2")):
        rs = [results["Dense_1", family, bits, label] for label in labels]
        xs = [bits_per_weight("Dense_1", r) for r in rs]
        ax.plot(
            xs, [r["sqnr"] for r in rs], style, marker="o", color=color, label=f"{family}{bits}"
        )
        if family == "int" and bits == 4:
            for xv, r, label in zip(xs, rs, labels):
                ax.annotate(
                    label.replace("block ", "B"),
                    (xv, r["sqnr"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, -9),
                )
ax.set_xscale("log", base=2)
ax.set_xlabel("stored bits per weight (values + scales + zero points)")
ax.set_ylabel("SQNR (dB)")
ax.set_title("Dense_1 [256, 256]: SQNR against size")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ### Lookup tables against integers
#
# A lookup table (`qjax.palettize`) stores an `n`-bit index per weight into a small
# table of float values instead of a point on a uniform grid. Three kinds for `Dense_1`,
# on the same size/error plane as its integer rows (per channel and per block 32):
#
# * **palettize**: `2**n` values fitted to the kernel by k-means (Lloyd), one table for
#   the whole kernel (`n` = 1 to 4 bits; `qjax.palettize` also takes 6 and 8);
# * **palettize + channel scale**: the same after dividing each output channel by its
#   absmax (coremltools' `enable_per_channel_scale`), one float32 more per channel;
# * **NF4**: QLoRA's 16 fixed normal-quantile levels, an absmax per block of 64 inputs.
#
# The accuracy column puts the dequantized `Dense_1` back into the model (`Dense_0`
# stays float here): the test accuracy each keeps.

# %%
from qjax import palettize as lut  # noqa: E402

LUT_BITS = (1, 2, 3, 4)
lut_rows, lut_points = [], {}
t0 = time.perf_counter()
for kind in ("palettize", "palettize + channel scale"):
    for bits in LUT_BITS:
        scale_axis = -1 if "scale" in kind else None  # Flax kernel: output channels last
        lut_points[kind, bits] = lut.palettize(w1, bits, per_channel_scale=scale_axis)
lut_points["nf4", 4] = lut.nf4(w1, axis=-2)  # blocks of 64 inputs
print(f"{len(lut_points)} lookup-table arrays in {time.perf_counter() - t0:.1f} s")


def lut_params(a):
    """The trained params with Dense_1's kernel replaced by the dequantized array."""
    new = {layer: dict(p) for layer, p in params["params"].items()}
    new["Dense_1"]["kernel"] = a.dequantize()
    return {"params": new}


for (kind, bits), a in lut_points.items():
    lut_rows.append(
        [
            kind,
            bits,
            sqnr_db(w1, a.dequantize()),
            a.bits_per_weight,
            f"{float(accuracy(lut_params(a), x_test, y_test)):.1%}",
        ]
    )
print_table(["lookup table", "index bits", "Dense_1 SQNR dB", "bits/w", "accuracy"], lut_rows)

fig, ax = plt.subplots(figsize=(8, 5))
for label, marker in (("channel", "o"), ("block 32", "s")):
    rs = [results["Dense_1", "int", b, label] for b in BITS]
    ax.plot(
        [bits_per_weight("Dense_1", r) for r in rs],
        [r["sqnr"] for r in rs],
        "--",
        marker=marker,
        color="0.5",
        label=f"int per {label}",
    )
for kind, color in (("palettize", "C0"), ("palettize + channel scale", "C1")):
    arrays = [lut_points[kind, b] for b in LUT_BITS]
    ax.plot(
        [a.bits_per_weight for a in arrays],
        [sqnr_db(w1, a.dequantize()) for a in arrays],
        "-",
        marker="o",
        color=color,
        label=kind,
    )
nf4_dense1 = lut_points["nf4", 4]
ax.plot(
    [nf4_dense1.bits_per_weight], [sqnr_db(w1, nf4_dense1.dequantize())], "*", ms=12, label="nf4"
)
ax.set_xscale("log", base=2)
ax.set_xlabel("stored bits per weight (indices + tables + scales)")
ax.set_ylabel("SQNR (dB)")
ax.set_title("Dense_1 [256, 256]: lookup tables against integers")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

int4_channel = results["Dense_1", "int", 4, "channel"]["sqnr"]
pal4 = sqnr_db(w1, lut_points["palettize", 4].dequantize())
print(
    f"4-bit palettization {pal4:.2f} dB at "
    f"{lut_points['palettize', 4].bits_per_weight:.3f} bits/w against int4 per "
    f"channel {int4_channel:.2f} dB at "
    f"{bits_per_weight('Dense_1', results['Dense_1', 'int', 4, 'channel']):.3f} bits/w"
)

# %% [markdown]
# ## 3. Three formulations on asymmetric data
#
# Weights are roughly centred on zero; activations after a ReLU are not: they are all
# `>= 0`. The spec's three formulations map values to integers differently:
#
# * `scale`: `q = round(x / scale)`, zero point 0. With a signed type, half of the
#   codes stand for negative numbers that never occur.
# * `zero_point`: `q = round(x / scale) + zero_point`, with an integer zero point: zero
#   is exactly representable, but the grid's lower end is the minimum rounded to a
#   multiple of the scale, so it may miss the true minimum.
# * `minval`: `q = round((x - minval) / scale) + qmin`: the grid starts exactly at the
#   minimum, but zero is representable only if it happens to land on the grid.
#
# Two tensors from the trained model on the test digits, each quantized per tensor (one
# range, as for a static activation quantizer): the first hidden layer's post-ReLU
# output, and the second layer's pre-activation `h @ W + b`, which is skewed and takes
# both signs. `codes used` counts the distinct integers that occur; `x'(0)` is what an
# exact 0 (a padded position, a dead ReLU) comes back as with the tensor's params.

# %%
pre_act0 = x_test @ kernels["Dense_0"] + params["params"]["Dense_0"]["bias"]
post_relu = jax.nn.relu(pre_act0)
pre_act1 = post_relu @ kernels["Dense_1"] + params["params"]["Dense_1"]["bias"]
activations = {"post-ReLU 0": post_relu, "pre-act 1": pre_act1}
for label, a in activations.items():
    a = np.asarray(a)
    print(
        f"{label} {a.shape}: min {a.min():.3f}, max {a.max():.3f}, "
        f"exact zeros {np.mean(a == 0):.1%}"
    )


def formulation_specs(bits):
    return {
        "scale": qjax.QuantSpec(f"int{bits}"),  # signed, symmetric
        "zero_point": qjax.QuantSpec(f"uint{bits}", "asymmetric", formulation="zero_point"),
        "minval": qjax.QuantSpec(f"uint{bits}", "asymmetric", formulation="minval"),
    }


# 0 followed by a dense ramp that runs past both ends of every grid: pushed through
# fake_quant with a tensor's params, it gives x'(0) and the levels of the grid.
bound = 2 * max(float(jnp.abs(a).max()) for a in activations.values())
probe = jnp.concatenate([jnp.zeros(1), jnp.linspace(-bound, bound, 16384)])
rows, form_sqnr, form_hat, form_levels = [], {}, {}, {}
for label, a in activations.items():
    for bits in BITS:
        for form, spec in formulation_specs(bits).items():
            qa = qjax.quantize(a, spec)
            a_hat = qjax.dequantize(qa)
            probed = np.asarray(qjax.fake_quant(probe, spec, qparams=qa.qparams))
            form_sqnr[label, bits, form] = sqnr_db(a, a_hat)
            form_hat[label, bits, form] = a_hat
            form_levels[label, bits, form] = np.unique(probed[1:])
            rows.append(
                [
                    label,
                    spec.dtype,
                    form,
                    form_sqnr[label, bits, form],
                    f"{len(np.unique(np.asarray(qa.codes())))}/{2**bits}",
                    f"{probed[0]:+.2e}",
                ]
            )
print_table(["tensor", "dtype", "formulation", "SQNR dB", "codes used", "x'(0)"], rows)

# %% [markdown]
# The 4-bit grids over the post-ReLU histogram: each formulation's 16 levels, from the
# probe above.

# %%
a = np.asarray(post_relu).ravel()
fig, axes = plt.subplots(1, 2, figsize=(14, 4))
axes[0].hist(a[a > 0], bins=100, color="0.7", label="activations > 0")
for row, form in enumerate(("scale", "zero_point", "minval")):
    levels = form_levels["post-ReLU 0", 4, form]
    axes[0].vlines(
        levels,
        10 ** (2.6 - 0.4 * row),
        10 ** (2.9 - 0.4 * row),
        color=f"C{row}",
        label=f"{form}: {len(levels)} levels",
    )
axes[0].set_yscale("log")
axes[0].set_xlabel("post-ReLU activation")
axes[0].set_title("4-bit grids (ticks) over the activation histogram")
axes[0].legend(fontsize=8, loc="lower left")

width = 0.27
for i, form in enumerate(("scale", "zero_point", "minval")):
    for j, label in enumerate(activations):
        xs = np.arange(len(BITS)) + j * (len(BITS) + 1) + (i - 1) * width
        axes[1].bar(
            xs,
            [form_sqnr[label, b, form] for b in BITS],
            width,
            color=f"C{i}",
            label=form if j == 0 else None,
        )
ticks = [b + j * (len(BITS) + 1) for j in range(len(activations)) for b in range(len(BITS))]
axes[1].set_xticks(ticks, [f"{b}-bit\n{label}" for label in activations for b in BITS])
axes[1].set_ylabel("SQNR (dB)")
axes[1].set_title("per-tensor SQNR by formulation")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Where the curves bend, and why
#
# A uniform quantizer whose rounding error is spread evenly over a step `Δ = scale` has
# noise power `Δ² / 12`. With the symmetric scheme `scale = amax_k / ((2^b - 1) / 2)` in
# block `k`, so the predicted SQNR is
#
# `SQNR ≈ 20 log10(2^b - 1) + 10 log10(3) - C`, with `C = 10 log10(mean_k(amax_k²) / mean(x²))`
#
# (blocks of equal size). The first term is the bits; `C`, a crest factor, is the
# granularity alone: how far each block's largest weight sits above the typical weight.
# The table checks the prediction against the measured int rows of `Dense_1`, and gives
# `C` for a Gaussian matrix of the same shape and standard deviation for comparison.


# %%
def crest_db(k, gran) -> float:
    """C for one kernel and granularity: mean block amax² over mean x², in dB."""
    k = np.asarray(k, np.float64)
    block = gran.block_shape(k.shape)
    split = [n for dim, b in zip(k.shape, block) for n in (dim // b, b)]
    amax = np.abs(k.reshape(split)).max(axis=tuple(range(1, 2 * k.ndim, 2)))
    return float(10 * np.log10(np.mean(amax**2) / np.mean(k**2)))


name = "Dense_1"
grans = granularities(kernels[name].shape)
gaussian = np.random.default_rng(0).normal(0.0, float(w1.std()), w1.shape)
crest = {label: crest_db(w1, gran) for label, gran in grans}
rows, gaps = [], {}
for label, gran in grans:
    cells = []
    for b in BITS:
        predicted = 20 * np.log10(2**b - 1) + 10 * np.log10(3) - crest[label]
        measured = results[name, "int", b, label]["sqnr"]
        gaps[label, b] = measured - predicted
        cells.append(f"{measured:5.1f} / {predicted:5.1f}")
    rows.append([label, crest[label], crest_db(gaussian, gran), *cells])
print(f"{name}: measured / predicted SQNR in dB (symmetric int)")
print_table(["granularity", "C dB", "C Gaussian", *[f"int{b}" for b in BITS]], rows)
for b in BITS:
    worst = max(abs(gaps[label, b]) for label, _ in grans)
    print(f"int{b}: the prediction is off by at most {worst:.2f} dB")

# %% [markdown]
# The bends, as numbers. The bits curve: how many dB each extra value bit buys between
# int2 and int4 and between int4 and int8, and what happens to the weights at int2. The
# granularity curve: the dB each extra *stored* bit per weight buys when the scales get
# finer. Finer scales are worth their bytes while they buy more than widening the values
# would, about `20 log10(2)` dB per bit.

# %%
print(f"one more value bit buys at most 20 log10(2) = {DB_PER_BIT:.2f} dB")
for label in ("tensor", "channel", "block 32"):
    sq = {b: results[name, "int", b, label]["sqnr"] for b in BITS}
    print(
        f"{name} {label:>8}: int2→int4 {(sq[4] - sq[2]) / 2:.2f} dB/bit, "
        f"int4→int8 {(sq[8] - sq[4]) / 4:.2f} dB/bit"
    )

# A symmetric grid spans its range with 2^b - 1 steps, not 2^b: that costs
# 20 log10(2^b / (2^b - 1)) dB against an ideal b-bit quantizer.
for b in BITS:
    print(f"int{b}: the '2^b - 1' term costs {20 * np.log10(2**b / (2**b - 1)):.2f} dB")
fine_gaps = [abs(gaps[label, b]) for label, _ in grans for b in BITS if (label, b) != ("tensor", 2)]
print(
    f"the prediction is within {max(fine_gaps):.2f} dB everywhere but int2 per tensor, "
    f"where it is off by {gaps['tensor', 2]:+.2f} dB"
)

# int2's symmetric grid is {-2, -1, 0, 1} * scale with scale = amax / 1.5.
for label, gran in grans[:2]:
    spec = qjax.QuantSpec("int2", granularity=gran)
    codes = np.asarray(qjax.quantize(w1, spec).codes())
    print(
        f"int2 per {label}: {np.mean(codes == 0):.1%} of the weights become 0, "
        f"{np.mean(codes == 1):.1%} the top code +1 (2/3 of the block's amax)"
    )

rows, worth = [], []
labels = [label for label, _ in grans]
for coarse, fine in itertools.pairwise(labels):
    extra = [
        bits_per_weight(name, results[name, "int", b, fine])
        - bits_per_weight(name, results[name, "int", b, coarse])
        for b in (4, 2)
    ]
    gain = [
        results[name, "int", b, fine]["sqnr"] - results[name, "int", b, coarse]["sqnr"]
        for b in (4, 2)
    ]
    rows.append(
        [
            f"{coarse} → {fine}",
            crest[coarse] - crest[fine],
            extra[0],
            gain[0],
            gain[0] / extra[0],
            gain[1] / extra[1],
        ]
    )
    if gain[0] / extra[0] >= DB_PER_BIT:
        worth.append(f"{coarse} → {fine}")
print()
print_table(["step", "C drop dB", "+bits/w", "int4 +dB", "int4 dB/bit", "int2 dB/bit"], rows)
print(f"steps worth more than {DB_PER_BIT:.2f} dB per extra stored bit at int4: {worth}")

max_errs = {b: {results[name, "int", b, label]["max_err"] for label in labels} for b in BITS}
amax_w1 = float(jnp.abs(w1).max())
for b in BITS:
    spec = qjax.QuantSpec(f"int{b}")
    half_step = amax_w1 / (spec.qmax - spec.qmin)  # scale / 2 where the largest weight is
    print(
        f"int{b}: max|err| over all granularities spans {min(max_errs[b]):.3e} to "
        f"{max(max_errs[b]):.3e}; half a step of the largest weight's block: {half_step:.3e}"
    )

gaussian_like = max(abs(crest[label] - crest_db(gaussian, gran)) for label, gran in grans[1:])
print(
    f"per channel and finer, C of {name} is within {gaussian_like:.2f} dB of the Gaussian's; "
    f"per tensor it is {crest['tensor'] - crest_db(gaussian, grans[0][1]):+.2f} dB above it"
)

# %% [markdown]
# What the numbers say:
#
# * **Bits.** The uniform-noise prediction tracks the measurements, so the error is
#   rounding noise of a fixed step, and between int4 and int8 each bit buys about
#   `20 log10(2)` dB. Below int4 the curve bends down for two reasons. A symmetric grid
#   spans its range with `2^b - 1` steps, which costs little at 8 bits and much at 2
#   bits (the printed cost per bit width). And with one scale per tensor at int2, the
#   step is so coarse that most weights round to 0: the error is then the weight itself,
#   no longer uniform noise, and the SQNR collapses towards 0 dB, the SQNR of
#   predicting zeros (the accuracy table shows what that does to the model).
# * **Granularity.** The whole gain of a finer granularity is the drop of `C`, the same
#   number of dB at every bit width while the noise model holds. Per channel isolates
#   columns of different range, which a Gaussian matrix does not have: that is the one
#   step worth far more than its scale bytes. Inside a channel the trained weights look
#   like Gaussian samples (same `C` as the Gaussian reference), and for those the largest
#   magnitude of `n` samples shrinks only logarithmically as `n` falls. Each halving of
#   the block lowers `C` by a similar amount while doubling the scale bytes, so the dB
#   per stored bit halves at every step: that is the bend, right after per channel.
# * **Max error** of the symmetric int rows does not move with the granularity. The
#   largest weight sits exactly `(qmax - qmin) / 2` steps from zero, a tie half a step
#   from the nearest code, and the block that holds it has the same scale at every
#   granularity. SQNR (the mean) improves; the worst case does not. (The asymmetric uint
#   rows differ: their step also depends on the block's minimum, which gets less extreme
#   as the block shrinks.)
# * **Formulations.** On post-ReLU data the signed `scale` formulation leaves the
#   negative half of its codes unused, one bit's worth of SQNR; `zero_point` and `minval`
#   coincide there because the minimum is exactly 0 (checked below). On the skewed
#   pre-activations they differ: `minval` starts its grid at the true minimum but maps 0
#   to a non-zero value (`x'(0)`), `zero_point` keeps 0 exact at the price of a rounded
#   offset.

# %%
for bits in BITS:
    same = jnp.array_equal(
        form_hat["post-ReLU 0", bits, "zero_point"], form_hat["post-ReLU 0", bits, "minval"]
    )
    loss = form_sqnr["post-ReLU 0", bits, "zero_point"] - form_sqnr["post-ReLU 0", bits, "scale"]
    print(
        f"{bits}-bit post-ReLU: zero_point == minval: {bool(same)}; "
        f"scale loses {loss:.2f} dB = {loss / DB_PER_BIT:.2f} bits"
    )
print(f"notebook ran in {time.perf_counter() - START:.1f} s")
