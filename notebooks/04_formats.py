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
# # Number formats: integers, float8, float4 and power-of-two scales
#
# The same trained weights in six formats, and what their errors look like:
#
# 1. **Error distributions** of `x - x'` for int8, float8_e4m3fn, float8_e5m2, int4 and
#    mxfp4 (float4_e2m1fn values, one power-of-two scale per 32 values), and how the
#    error scales with the magnitude of the weight.
# 2. **Power-of-two scales.** The OCP MX formats store each block's scale as an 8-bit
#    exponent (`float8_e8m0fnu`). What does that cost against a float32 scale, for fp8
#    and fp4 targets, at several granularities, and why?
#
# The weights are those of a small MLP trained here, in a few seconds, on scikit-learn's
# bundled 8x8 digits.

# %%
import time

import flax.linen as nn
import matplotlib
import matplotlib.pyplot as plt
import ml_dtypes
import numpy as np

import qjax
from qjax.demo.notebook import accuracy_fn, flat_digits, print_table, train_classifier

matplotlib.use("Agg")  # off-screen rendering when this file runs as a plain script
# %matplotlib inline

START = time.perf_counter()


# %% [markdown]
# ## The weights
#
# An MLP 64 → 256 → 256 → 10, trained with AdamW (fixed seeds). Its hidden kernel,
# `Dense_1` `[256, 256]` (65536 weights), is quantized below; blocks of 32 fit along
# either of its axes.

# %%
x_train, x_test, y_train, y_test = flat_digits()


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)


model = MLP()
params, _ = train_classifier(model, x_train, y_train, epochs=30, learning_rate=3e-3)
print(f"float32 test accuracy: {float(accuracy_fn(model)(params, x_test, y_test)):.1%}")

w = params["params"]["Dense_1"]["kernel"]  # the hidden [256, 256] kernel
w_all = np.asarray(w, np.float64).ravel()
n_weights = w.size
print(f"Dense_1/kernel {w.shape}: std {w_all.std():.4f}, max|w| {np.abs(w_all).max():.4f}")

# %% [markdown]
# ## 1. Error distributions
#
# int8, float8 and int4 get one float32 scale per output channel (`per_channel(-1)`).
# The MX preset `mxfp4` uses blocks of 32 along the *last* axis; for a Flax kernel
# `[in, out]` that is the output axis, while a matmul wants the scale to be shared along
# the contracted input axis, so the input-axis variant is shown too. int4 with blocks of
# 32 inputs and float32 scales is the integer counterpart of mxfp4. `bits/w` is the
# stored size per weight, scales included (`QArray.nbytes`).

# %%
FORMATS = {  # label: (spec, where its scales sit)
    "int8": (qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)), "channel"),
    "float8_e4m3fn": (qjax.QuantSpec("float8_e4m3fn", granularity=qjax.per_channel(-1)), "channel"),
    "float8_e5m2": (qjax.QuantSpec("float8_e5m2", granularity=qjax.per_channel(-1)), "channel"),
    "int4": (qjax.QuantSpec("int4", granularity=qjax.per_channel(-1)), "channel"),
    "int4 block 32": (qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32)), "32 inputs"),
    "mxfp4": (qjax.QuantSpec("mxfp4"), "32 outputs"),
    "mxfp4 (inputs)": (qjax.QuantSpec("mxfp4", granularity=qjax.per_block(-2, 32)), "32 inputs"),
}


def expand(scale, block):
    """A compact per-block array repeated to the full shape of the quantized array."""
    scale = np.asarray(scale, np.float64)
    for axis, size in enumerate(block):
        scale = np.repeat(scale, size, axis)
    return scale


def quantize_w(spec):
    """Quantizes the kernel. Returns the errors w - w', each weight's scale (both
    flattened), each block's scale and the stored bytes (QArray.nbytes)."""
    qa = qjax.quantize(w, spec)
    err = w_all - np.asarray(qjax.dequantize(qa), np.float64).ravel()
    scale = expand(qa.scale, spec.granularity.block_shape(w.shape)).ravel()
    return err, scale, np.asarray(qa.scale, np.float64).ravel(), qa.nbytes


def sqnr_db(err) -> float:
    return float(10 * np.log10(np.sum(w_all**2) / np.sum(err**2)))


errors, rows = {}, []
for label, (spec, blocks) in FORMATS.items():
    err, _, _, nbytes = quantize_w(spec)
    errors[label] = err
    rows.append(
        [
            label,
            blocks,
            spec.scale_dtype,
            8 * nbytes / n_weights,
            sqnr_db(err),
            f"{np.sqrt(np.mean(err**2)):.2e}",
            f"{np.abs(err).max():.2e}",
        ]
    )
print_table(["format", "one scale per", "scale", "bits/w", "SQNR dB", "rms err", "max|err|"], rows)

# %%
fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
for ax, (label, err) in zip(axes.flat, errors.items()):
    ax.hist(err, bins=121, color="C0" if label.startswith("int") else "C1")
    ax.set_yscale("log")
    ax.set_title(f"{label}: {sqnr_db(err):.1f} dB", fontsize=10)
    ax.set_xlabel("w - w'")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
axes.flat[-1].axis("off")
fig.suptitle("Quantization error of the trained kernel (blue: integer, orange: float formats)")
fig.tight_layout()
plt.show()

# %% [markdown]
# The shapes differ. Integer errors are flat: rounding to a fixed grid leaves an error
# spread evenly over `±scale / 2`. Float errors are peaked at zero with long tails:
# a float grid is fine near zero and coarse near the top of the range, so small weights
# are nearly exact and large ones carry most of the error. Binning the weights by
# magnitude shows it: the relative error `|w - w'| / |w|` of an integer format grows as
# the weight shrinks, that of a float format stays flat down to its subnormal range.

# %%
magnitude = np.abs(w_all)
edges = np.geomspace(np.quantile(magnitude, 0.001), magnitude.max(), 25)
centres = np.sqrt(edges[:-1] * edges[1:])
which = np.digitize(magnitude, edges) - 1
fig, ax = plt.subplots(figsize=(8, 5))
for label in ("int8", "float8_e4m3fn", "float8_e5m2", "int4", "mxfp4 (inputs)"):
    rel = np.abs(errors[label]) / np.maximum(magnitude, np.finfo(np.float64).tiny)
    rms = [np.sqrt(np.mean(rel[which == b] ** 2)) for b in range(len(centres))]
    ax.plot(centres, rms, marker="o", ms=3, label=label)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("|w|")
ax.set_ylabel("rms of |w - w'| / |w| in the bin")
ax.set_title("Relative error against magnitude")
ax.grid(alpha=0.3, which="both")
ax.legend()
plt.show()

# %% [markdown]
# Where each format wins, in numbers. A float format with `m` mantissa bits rounds a
# normal value to a relative error of at most `2^-(m+1)`; an integer format's relative
# error is `scale / 2 / |w|`. The weights below the median magnitude are where the two
# differ most.

# %%
small = magnitude < np.median(magnitude)
for label, dtype in (
    ("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
    ("float8_e5m2", ml_dtypes.float8_e5m2),
    ("mxfp4 (inputs)", ml_dtypes.float4_e2m1fn),
):
    info = ml_dtypes.finfo(dtype)
    print(
        f"{label}: {info.nmant} mantissa bits, relative error bound "
        f"{2.0 ** -(info.nmant + 1):.4f} on normal values"
    )
for label in ("int8", "float8_e4m3fn", "float8_e5m2", "int4", "mxfp4 (inputs)"):
    err = errors[label]
    share = np.sum(err[~small] ** 2) / np.sum(err**2)
    rel = np.median(np.abs(err[small]) / magnitude[small])
    print(
        f"{label:>15}: {share:.1%} of the error energy from the larger half of the weights, "
        f"median relative error of the smaller half {rel:.4f}"
    )

# %% [markdown]
# ## 2. Power-of-two scales for fp8 and fp4
#
# With `scale_dtype="float8_e8m0fnu"`, a block's scale is `2^(floor(log2(amax)) - emax)`
# (emax: the largest exponent of the element type) instead of `amax / fmax`. It costs one
# byte instead of four and makes rescaling a shift, but the block's largest value now
# lands anywhere in `[2^emax, 2^(emax+1))` instead of exactly at `fmax`. Where that is
# above `fmax` the top of the block is clipped; where it is below, part of the grid goes
# unused. The ratio `amax / (scale * fmax)` says which: 1 for a float32 scale, above 1
# means clipping.

# %%
TARGETS = ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")
GRANULARITIES = {
    "tensor": qjax.per_tensor(),
    "channel": qjax.per_channel(-1),
    "block 32": qjax.per_block(-2, 32),
}
for target in TARGETS:
    fmax = float(ml_dtypes.finfo(getattr(ml_dtypes, target)).max)
    emax = qjax.target_dtype(target).emax
    print(
        f"{target}: fmax {fmax:g} = {fmax / 2**emax:g} * 2^{emax}, so amax / (scale * fmax) "
        f"lies in [{2.0**emax / fmax:.3f}, {2.0 ** (emax + 1) / fmax:.3f})"
    )

rows, why, pow2, ratios = [], [], {}, {}
for target in TARGETS:
    fmax = float(ml_dtypes.finfo(getattr(ml_dtypes, target)).max)
    for g_label, gran in GRANULARITIES.items():
        err, scale, block_scale, nbytes = {}, {}, {}, {}
        for sd in ("float32", "float8_e8m0fnu"):
            spec = qjax.QuantSpec(target, granularity=gran, scale_dtype=sd)
            err[sd], scale[sd], block_scale[sd], nbytes[sd] = quantize_w(spec)
        sq = {sd: sqnr_db(e) for sd, e in err.items()}
        pow2[target, g_label] = sq
        rows.append(
            [
                target,
                g_label,
                sq["float32"],
                sq["float8_e8m0fnu"],
                sq["float8_e8m0fnu"] - sq["float32"],
                *[8 * nbytes[sd] / n_weights for sd in ("float32", "float8_e8m0fnu")],
            ]
        )

        # Why: each block's amax is fmax times its float32 scale, so amax / (scale * fmax) is
        # the ratio of the two scales. Split the extra error energy of the e8m0 scales into
        # the weights clamped to fmax * scale, the (unclamped) block maxima, and the rest.
        ratio = block_scale["float32"] / block_scale["float8_e8m0fnu"]
        ratios[target, g_label] = ratio
        clamped = np.abs(w_all) > fmax * scale["float8_e8m0fnu"]
        maxima = np.isclose(np.abs(w_all), fmax * scale["float32"], rtol=1e-6) & ~clamped
        rest = ~clamped & ~maxima
        base = np.sum(err["float32"] ** 2)

        def extra(mask, err=err, base=base):
            """Extra error energy of the e8m0 scales on these weights, as a share of base."""
            diff = np.sum(err["float8_e8m0fnu"][mask] ** 2) - np.sum(err["float32"][mask] ** 2)
            return f"{diff / base:+.1%}"

        why.append(
            [
                target,
                g_label,
                f"{ratio.min():.3f}..{ratio.max():.3f}",
                f"{np.mean(clamped):.2%}",
                extra(clamped),
                extra(maxima),
                extra(rest),
            ]
        )
print()
print_table(
    ["target", "granularity", "f32 dB", "e8m0 dB", "Δ dB", "f32 bits/w", "e8m0 bits/w"], rows
)
print("\nextra error energy of e8m0 scales, as a share of the float32-scale error energy:")
print_table(
    [
        "target",
        "granularity",
        "amax/(s*fmax)",
        "clamped",
        "from clamped",
        "from block max",
        "from the rest",
    ],
    why,
)

# %%
fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
labels = [f"{t.split('_')[1]}\n{g}" for t in TARGETS for g in GRANULARITIES]
xs = np.arange(len(labels))
for i, (scale_dtype, color) in enumerate((("float32", "C0"), ("float8_e8m0fnu", "C3"))):
    values = [pow2[t, g][scale_dtype] for t in TARGETS for g in GRANULARITIES]
    axes[0].bar(xs + (i - 0.5) * 0.4, values, 0.4, color=color, label=f"{scale_dtype} scale")
axes[0].set_xticks(xs, labels, fontsize=8)
axes[0].set_ylabel("SQNR (dB)")
axes[0].set_title("float32 against power-of-two (e8m0) scales")
axes[0].legend()

# float8_e4m3fn and float8_e5m2 share fmax = 1.75 * 2^emax, hence the same ratios.
for target, label in (
    ("float8_e4m3fn", "float8 (e4m3fn and e5m2)"),
    ("float4_e2m1fn", "float4_e2m1fn"),
):
    axes[1].hist(ratios[target, "block 32"], bins=40, alpha=0.6, label=label)
axes[1].axvline(1.0, color="k", linestyle="--", label="amax lands on fmax")
axes[1].set_xlabel("amax / (scale * fmax) with an e8m0 scale, per block of 32")
axes[1].set_ylabel("blocks")
axes[1].set_title("where each block's largest value lands (> 1: clipped)")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Why the e8m0 scales lose what they lose, from the second table:
#
# * **Block maxima.** With a float32 scale, each block's largest magnitude maps exactly
#   onto `fmax`, a point of the grid, so it comes back exact. A power-of-two scale puts
#   it anywhere in the binade below (or above) `fmax`, where it is rounded like any other
#   value, and on a float grid, whose steps grow with the magnitude, the largest value
#   is rounded the most coarsely.
# * **Clipping.** A block whose amax has a larger mantissa than `fmax` (1.75 for the two
#   fp8 types, 1.5 for e2m1: the printed ranges above 1) has its top values clamped to
#   `fmax * scale`. e2m1, with one mantissa bit, clips more blocks and by more.
# * Both effects are per block: they grow as blocks shrink, since there are more maxima
#   and each carries a larger share of its block. Per tensor, only the rest remains: the
#   fp8 grids are nearly scale-invariant (the same relative precision in every binade),
#   but e2m1's grid of eight magnitudes is not, so the position of the block on it
#   matters.
# * In exchange the scale takes one byte instead of four (the `bits/w` columns), which is
#   how the MX formats can afford a scale per 32 values.

# %% [markdown]
# The scale invariance of the fp8 grids shows in the granularity too: finer scales help
# an integer format far more than a float8 one, since a float grid already adapts to
# each weight's magnitude.

# %%
for target in ("int8", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"):
    sq = {
        g: sqnr_db(quantize_w(qjax.QuantSpec(target, granularity=gran))[0])
        for g, gran in GRANULARITIES.items()
    }
    print(
        f"{target:>14}: per tensor {sq['tensor']:5.2f} dB, per channel {sq['channel']:5.2f} dB, "
        f"block 32 {sq['block 32']:5.2f} dB: +{sq['block 32'] - sq['tensor']:.2f} dB in all"
    )
print(f"notebook ran in {time.perf_counter() - START:.1f} s")
