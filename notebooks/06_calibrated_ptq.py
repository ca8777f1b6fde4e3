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
# # Calibrated PTQ: GPTQ and AWQ against round to nearest, on a language model
#
# Round to nearest (RTN) quantizes each weight on its own. GPTQ and AWQ also look at the
# inputs each layer sees on a few calibration batches, and choose the quantized weight that
# moves the layer's *output* least:
#
# 1. **Capture** the statistics of each layer's inputs with `qjax.capture.accumulate`:
#    the Hessian `XᵀX` and the mean `|x|` per input channel, summed over batches under
#    `jit` (memory: the statistics, never the activations). It reads any function that
#    ends in matrix products on parameter leaves: here a Linen `model.apply`.
# 2. **Quantize** with `qjax.quantize_tree(params, rules, method="gptq" | "awq",
#    statistics=stats)`. The result is an ordinary tree of QArrays: save, load, report,
#    serve as usual.
#
# The model is the byte-level decoder-only transformer of `benchmarks/lm_example.py`,
# trained on the Python standard library's own sources (held-out files for evaluation).
# Here it is its tiny configuration (2 layers, width 64) trained for 150 steps so that the
# notebook runs in half a minute; `python benchmarks/bench_calibrated.py` measures the
# 4-layer, width-256 model against Qwix's GPTQ and AWQ (the README has the table).

# %%
import dataclasses
import pathlib
import sys
import time

import matplotlib.pyplot as plt

import qjax

# The language model lives with the benchmarks, next to the package's source tree.
sys.path.insert(0, str(pathlib.Path(qjax.__file__).resolve().parents[2] / "benchmarks"))
import lm_example as lm

config = dataclasses.replace(lm.TINY, steps=150)
start = time.perf_counter()
variables, info = lm.train(config, log=lambda line: None)
apply = lm.apply(config)
evaluation = lm.eval_windows(config.context, n=32)
calibration = lm.calibration_batches(8, config.context)
float_ppl = lm.perplexity(apply, variables, evaluation)
print(f"{lm.n_params(variables):,} parameters, trained in {time.perf_counter() - start:.0f} s")
print(f"float perplexity {float_ppl:.3f} (bytes)")

# %% [markdown]
# ## One capture serves every method
#
# The rules name the linear layers of the blocks; embeddings and the head stay float here
# (an embedding lookup is no matrix product, so GPTQ has no statistics for it: a rule
# that matches one is an error saying so).

# %%
stats = qjax.capture.accumulate(apply, variables, calibration)
kernels = r".*block_\d+/(query|key|value|out|up|down)/kernel"
print(
    len(stats),
    "weights captured; e.g.",
    "params/block_0/up/kernel",
    stats["params/block_0/up/kernel"].hessian.shape,
)

# %% [markdown]
# ## Perplexity against bits per weight
#
# Bits per weight count the stored values and the scales (a float32 scale per block of
# 32 adds 1 bit; per channel, almost nothing).

# %%
formats = {
    "int2:per_block:32": 2 + 32 / 32,
    "int4:per_block:128": 4 + 32 / 128,
    "int4:per_block:32": 4 + 32 / 32,
}
methods = {"RTN": "rtn", "GPTQ": "gptq", "AWQ": "awq"}
run = qjax.dequantizing(apply)
results = {name: [] for name in methods}
trees = {}
for spec, bits in formats.items():
    for name, method in methods.items():
        statistics = None if method == "rtn" else stats
        qtree = qjax.quantize_tree(variables, {kernels: spec}, method=method, statistics=statistics)
        trees[name, spec] = qtree
        results[name].append((bits, lm.perplexity(run, qtree, evaluation)))
print(f"{'format':<20}" + "".join(f"{m:>9}" for m in methods))
for i, spec in enumerate(formats):
    print(f"{spec:<20}" + "".join(f"{results[m][i][1]:9.3f}" for m in methods))

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for name, points in results.items():
    bits, ppl = zip(*sorted(points))
    ax.plot(bits, ppl, marker="o", label=name)
ax.axhline(float_ppl, color="gray", linestyle="--", label="float32")
ax.set_xlabel("bits per weight (values + scales)")
ax.set_ylabel("held-out perplexity (bytes)")
ax.set_yscale("log")
ax.set_title("Tiny byte-level LM: calibrated PTQ vs round to nearest")
ax.legend()
plt.show()

# %% [markdown]
# ## What the tree holds
#
# GPTQ's codes are `qjax.quantize`'s with the parameters GPTQ chose (re-quantizing the
# dequantized weight gives them back). AWQ's QArrays carry `channel_scale`, the `1/s`
# multiplier of each input channel, applied when they are dequantized or served; the
# layers that read one LayerNorm's output share it, so `qjax.fold_channel_scales` can fold
# it into that LayerNorm and drop it from the weights.

# %%
gptq = trees["GPTQ", "int4:per_block:32"]
qa = gptq["params"]["block_0"]["up"]["kernel"]
again = qjax.quantize(qa.dequantize(), qa.spec, qparams=qa.qparams)
print("GPTQ codes == qjax.quantize with its params:", bool((again.codes() == qa.codes()).all()))

awq = trees["AWQ", "int4:per_block:32"]
into = {}
for i in range(config.n_layers):
    norm = [f"params/block_{i}/ln_attn/scale", f"params/block_{i}/ln_attn/bias"]
    into.update({f"params/block_{i}/{n}/kernel": norm for n in ("query", "key", "value")})
folded = qjax.fold_channel_scales(awq, into)
print(
    f"AWQ explicit {lm.perplexity(run, awq, evaluation):.4f}, "
    f"folded into the LayerNorms {lm.perplexity(run, folded, evaluation):.4f}"
)
