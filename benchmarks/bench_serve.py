"""A served language model, float32 vs int8 vs int4: tokens/s, agreement, resident and peak memory.

    python benchmarks/bench_serve.py            # the full run (about 2 min on 2 cores)
    python benchmarks/bench_serve.py --quick    # a smoke run: fewer steps, rounds and formats

One command, one run, markdown tables on stdout (issue 13, "Served memory" and "An
end-to-end number"):

1. **The byte-level LM of** ``benchmarks/lm_example.py`` (4 blocks, width 256, context 128,
   trained and cached by :func:`lm_example.load_or_train`). The kernels of every block's
   ``query`` / ``key`` / ``value`` / ``out`` / ``up`` / ``down`` Dense are quantized with
   :func:`qjax.quantize_tree` (embeddings, norms, biases and the ``head`` stay float32) and
   run by :func:`qjax.dequantizing` (every weight dequantized at the start of the jitted
   function) or :func:`qjax.flax.serve.served` with ``weight_only="exact"`` (each weight
   dequantized where its layer reads it, bit-exact with QAT) or ``"fast"`` (Dense layers
   call :func:`qjax.kernels.matmul`: a loop over chunks of the packed weight, each
   dequantized into its dot; a weight of one chunk or less is dequantized whole).

   * Greedy decoding with a KV cache, written in this file (``lm_example.ByteLM`` has none):
     :class:`DecodeLM` has ByteLM's parameter names and module paths, so the same variables
     and serving rules run it; one jitted step per token (batch of prompts x 1 token, the
     cache donated), called from Python as a server would. A prompt of ``--prompt`` bytes
     from each of ``--batch`` held-out windows (:func:`lm_example.eval_windows`) is fed one
     token per step (untimed), then ``--steps`` tokens are generated and timed.
   * Prefill: one ``ByteLM.apply`` over ``[batch, 128]`` tokens (the model as trained).
   * Top-1 agreement with the float model: each quantized model is fed the float model's
     greedy tokens (teacher forcing) and its argmax compared with the float model's at every
     step; "same greedy" compares the tokens each model generates on its own. The prefill
     logits of each served model are compared with ``qjax.dequantizing``'s of the same tree.

2. **Memory**, for the same variables: resident bytes (the served tree's ``nbytes``, QArrays
   packed, and the growth of :func:`jax.live_arrays` when it is made), and the compiled
   memory analysis of the prefill forward and of one decode step
   (``temp`` and the peak ``argument + output + temp - alias``). "temp - float" is what the
   quantized variant adds to the float model's working buffers: compare with one layer's
   largest float weight (``up``/``down``: 1 MiB) and with all block weights in float32
   (12 MiB). A verdict line per ``"fast"`` variant says which it is near.

3. **The issue's decode case**: a two-layer 4096-wide Dense stack (``Dense(4096)``, ReLU,
   ``Dense(4096)``) at batch 8, float32 against int4 per-block-128 (and int8 per channel),
   served exact / fast and dequantizing, with the same memory columns (one float32 weight
   is 64 MiB there).

Every timed variant of a table runs once per round, rounds interleaved (machine noise hits
all alike); medians and ratios to float32 from the same run. In the stack's rounds each
timed call follows an untimed float32 one, so none pays for its predecessor's buffers. The
load average is printed (the benchmark machine may be shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qjax
from qjax.flax import linen as qlinen
from qjax.flax import serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_example as lm
import memory_env
from memory_env import describe

KERNELS = r".*block_\d+/(query|key|value|out|up|down)/kernel"
"""The leaves quantized (``quantize_tree`` paths)."""
MODULES = r"block_\d+/(query|key|value|out|up|down)"
"""The same layers as serving rules (module paths)."""
FORMATS = {
    "int8 per-channel": "int8:per_channel:axis=-1",
    "int4 per-block 128": "int4:per_block:128:axis=-2",
    "int4 per-block 32": "int4:per_block:32:axis=-2",
}
MODES = ("dequantizing", "exact", "fast")
ACT_FORMATS = {
    "W8A8 (int8 per-channel)": "int8:per_channel:axis=-1",
    "W4A8 (int4 per-block 128)": "int4:per_block:128:axis=-2",
}
"""Weights and int8 activations (per token, dynamic): served with the activation quantized
as QAT's fake quant does (``integer_dots="never"``) or through integer dots (``"auto"``:
int8 x int8 -> int32, int4 blocks through :func:`qjax.kernels.matmul`)."""
ACT_MODES = ("fake-quant", "integer")
ACT = qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token()))
MiB = 2**20


# The model with a KV cache ------------------------------------------------------------------


class CachedBlock(nn.Module):
    """``lm_example.Block`` on ``t`` new tokens at positions ``pos ..``, with a KV cache."""

    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, x, k_cache, v_cache, pos):
        b, t, d = x.shape
        hd = d // self.n_heads
        h = nn.LayerNorm(name="ln_attn")(x)
        q, k, v = (
            nn.Dense(d, name=name)(h).reshape(b, t, self.n_heads, hd)
            for name in ("query", "key", "value")
        )
        # The cache is [b, heads, context, head_dim]: its attention dots need no transpose.
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3), (0, 0, pos, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3), (0, 0, pos, 0))
        logits = jnp.einsum("bqhd,bhkd->bhqk", q, k_cache) / math.sqrt(hd)
        visible = jnp.arange(k_cache.shape[2])[None, :] <= (pos + jnp.arange(t))[:, None]
        weights = jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1)
        att = jnp.einsum("bhqk,bhkd->bqhd", weights, v_cache).reshape(b, t, d)
        x = x + nn.Dense(d, name="out")(att)
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.Dense(d, name="down")(nn.gelu(nn.Dense(4 * d, name="up")(h)))
        return x + h, k_cache, v_cache


class DecodeLM(nn.Module):
    """``lm_example.ByteLM`` with a KV cache: same parameters, same module paths.

    ``(tokens [b, t], pos, cache) -> (logits [b, t, 256], cache)``: the tokens sit at
    positions ``pos .. pos + t - 1``; ``cache`` holds one ``(k, v)`` pair per layer, each
    ``[b, heads, context, head_dim]``, updated in place when the caller donates it.
    """

    d_model: int
    n_layers: int
    n_heads: int
    context: int

    @nn.compact
    def __call__(self, tokens, pos, cache):
        t = tokens.shape[-1]
        x = nn.Embed(256, self.d_model, name="embed")(tokens)
        x = x + nn.Embed(self.context, self.d_model, name="pos")(pos + jnp.arange(t))
        new = []
        for i, (k, v) in enumerate(cache):
            x, k, v = CachedBlock(self.d_model, self.n_heads, name=f"block_{i}")(x, k, v, pos)
            new.append((k, v))
        logits = nn.Dense(256, name="head")(nn.LayerNorm(name="ln_final")(x))
        return logits, tuple(new)


def empty_cache(config: lm.LMConfig, batch: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
    hd = config.d_model // config.n_heads
    shape = (batch, config.n_heads, config.context, hd)
    zeros = functools.partial(jnp.zeros, shape, jnp.float32)
    return tuple((zeros(), zeros()) for _ in range(config.n_layers))


# Variants -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str
    params: Any
    wrap: Callable[[Callable], Callable]  # model.apply -> the function to jit


def quantized(variables: Any, shorthand: str, act: bool = False) -> tuple[Any, dict[str, Any]]:
    """The variables with the block kernels quantized, and the serving rules for them (with
    int8 per-token activations where ``act``)."""
    tree = jax.block_until_ready(qjax.quantize_tree(variables, {KERNELS: shorthand}))
    spec = qjax.parse_spec(shorthand)
    stored = {
        leaf.spec
        for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, qjax.QArray))
        if isinstance(leaf, qjax.QArray)
    }
    if stored != {spec}:
        raise AssertionError(f"{shorthand}: stored specs {stored}, serving rules give {spec}")
    return tree, {MODULES: qlinen.LayerQuant(weight=spec, act=ACT) if act else spec}


def wrapper(mode: str, rules: dict | None) -> Callable[[Callable], Callable]:
    if mode == "float32":
        return lambda fn: fn
    if mode == "dequantizing":
        return qjax.dequantizing
    if mode == "fake-quant":
        return lambda fn: serve.served(fn, rules, integer_dots="never")
    if mode == "integer":
        return lambda fn: serve.served(fn, rules, integer_dots="auto", weight_only="fast")
    return lambda fn: serve.served(fn, rules, weight_only=mode)


def variants(
    variables: Any, formats: dict[str, str], modes: tuple[str, ...]
) -> tuple[list[Variant], dict[str, int]]:
    """float32, then every format x mode and activation format x :data:`ACT_MODES`; and the
    live-array growth of each format's tree."""
    out = [Variant("float32", variables, wrapper("float32", None))]
    growth = {}
    for fmt, shorthand, act in [(*kv, False) for kv in formats.items()] + [
        (*kv, True) for kv in ACT_FORMATS.items()
    ]:
        before = live_bytes()
        tree, rules = quantized(variables, shorthand, act)
        growth[fmt] = live_bytes() - before
        out += [
            Variant(f"{fmt}, {mode}", tree, wrapper(mode, rules))
            for mode in (ACT_MODES if act else modes)
        ]
    return out, growth


# Measuring ----------------------------------------------------------------------------------


def tree_nbytes(tree: Any) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, qjax.QArray))
    return sum(int(leaf.nbytes) for leaf in leaves)


def live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


@dataclasses.dataclass
class Memory:
    """The compiled memory analysis of one jitted call (bytes)."""

    args: int
    out: int
    temp: int
    peak: int  # argument + output + temp - alias

    @classmethod
    def of(cls, jitted: Callable, *args: Any) -> Memory:
        m = jitted.lower(*args).compile().memory_analysis()
        arg, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
        return cls(arg, out, temp, arg + out + temp - m.alias_size_in_bytes)


def verdict(name: str, extra: int, layer: int, total: int) -> str:
    """``extra`` temp bytes (over float32's) against one layer's float32 weight (``layer``
    bytes) and all the quantized weights in float32 (``total``)."""
    if extra < layer // 2:
        return f"{name}: +{mib(extra)} MiB, {extra / layer:.0%} of one layer's float32 weight"
    return (
        f"{name}: +{mib(extra)} MiB, {extra / layer:.1f}x one layer's float32 weight "
        f"({mib(layer)} MiB): {extra / total:.0%} of all the quantized weights in float32"
    )


def mib(n: float) -> str:
    return f"{n / MiB:.2f}"


class Decoder:
    """One variant's jitted decode step, prefill forward, and greedy generation."""

    def __init__(self, variant: Variant, config: lm.LMConfig, batch: int):
        self.variant, self.config, self.batch = variant, config, batch
        decode = DecodeLM(config.d_model, config.n_layers, config.n_heads, config.context)
        apply = variant.wrap(decode.apply)

        @functools.partial(jax.jit, donate_argnums=(1,))
        def step(params, cache, tokens, pos):
            logits, cache = apply(params, tokens, pos, cache)
            last = logits[:, -1]
            return jnp.argmax(last, axis=-1).astype(jnp.int32), last, cache

        self.step = step
        self.prefill = jax.jit(variant.wrap(lm.make_model(config).apply))

    def generate(self, prompts: np.ndarray, steps: int, forced: np.ndarray | None = None):
        """Greedy tokens ``[b, steps]`` after ``prompts`` (or, with ``forced``, the argmax
        after each forced token), their logits, and the seconds of the ``steps`` steps."""
        params, (b, p) = self.variant.params, prompts.shape
        cache = empty_cache(self.config, b)
        for i in range(p - 1):
            _, _, cache = self.step(params, cache, prompts[:, i : i + 1], np.int32(i))
        token = prompts[:, p - 1 : p]
        jax.block_until_ready(cache)
        start = time.perf_counter()
        preds, logits = [], []
        for i in range(steps):
            nxt, last, cache = self.step(params, cache, token, np.int32(p - 1 + i))
            preds.append(nxt)
            logits.append(last)
            token = nxt[:, None] if forced is None else forced[:, i : i + 1]
        jax.block_until_ready(preds)
        seconds = time.perf_counter() - start
        return np.stack(preds, axis=1), np.stack(logits, axis=1), seconds

    def prefill_seconds(self, tokens: np.ndarray) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self.prefill(self.variant.params, tokens))
        return time.perf_counter() - start

    def memory(self, tokens: np.ndarray) -> tuple[Memory, Memory]:
        """Compiled memory of the prefill forward and of one decode step."""
        params = self.variant.params
        cache = empty_cache(self.config, self.batch)
        one = tokens[:, :1]
        return Memory.of(self.prefill, params, tokens), Memory.of(
            self.step, params, cache, one, np.int32(0)
        )


def lm_tables(args: argparse.Namespace) -> None:
    config = lm.DEFAULT
    variables = jax.block_until_ready(jax.device_put(lm.load_or_train(config)))
    formats = dict(list(FORMATS.items())[:2]) if args.quick else FORMATS
    vs, growth = variants(variables, formats, MODES)
    windows = lm.eval_windows(config.context, args.batch)
    prompts = windows[:, : args.prompt]
    full = windows[:, : config.context]
    if args.prompt + args.steps > config.context:
        raise SystemExit(f"--prompt + --steps must be at most {config.context}")
    decoders = [Decoder(v, config, args.batch) for v in vs]

    # Float reference, and a check of the cached decode against ByteLM's full forward.
    ref = decoders[0]
    ref_tokens, ref_logits, _ = ref.generate(prompts, args.steps)
    seq = np.concatenate([prompts, ref_tokens], axis=1)
    full_logits = np.asarray(ref.prefill(variables, seq[:, :-1]))[:, args.prompt - 1 :]
    cache_err = float(np.max(np.abs(full_logits - ref_logits)))
    cache_agree = float(np.mean(full_logits.argmax(-1) == ref_tokens))
    if not (cache_err < 1e-3 and cache_agree > 0.99):
        raise AssertionError(f"KV-cache decode vs ByteLM: max |dlogits| {cache_err}")

    agree, same = {}, {}
    for d in decoders[1:]:
        forced, _, _ = d.generate(prompts, args.steps, forced=ref_tokens)
        agree[d.variant.name] = float(np.mean(forced == ref_tokens))
        own, _, _ = d.generate(prompts, args.steps)
        same[d.variant.name] = float(np.mean(own == ref_tokens))
    logits = {d.variant.name: np.asarray(d.prefill(d.variant.params, full)) for d in decoders}
    # Served vs qjax.dequantizing of the same tree (exact: bit-exact; fast: close),
    # and the integer dots vs the fake-quant activations (close).
    reference = {"exact": "dequantizing", "fast": "dequantizing"}
    reference["integer"] = "fake-quant"
    diff = {}
    for name, out in logits.items():
        fmt, _, mode = name.rpartition(", ")
        if mode in reference:
            diff[name] = float(np.max(np.abs(out - logits[f"{fmt}, {reference[mode]}"])))

    decode_t: list[list[float]] = [[] for _ in decoders]
    prefill_t: list[list[float]] = [[] for _ in decoders]
    for _ in range(args.repeats):
        for d, dt, pt in zip(decoders, decode_t, prefill_t, strict=True):
            dt.append(d.generate(prompts, args.steps)[2])
            pt.append(d.prefill_seconds(full))
    dec = [statistics.median(t) for t in decode_t]
    pre = [statistics.median(t) for t in prefill_t]

    n_tok = args.batch * args.steps
    print(
        f"## The byte LM served: greedy decode and prefill (batch {args.batch})\n\n"
        f"{lm.n_params(variables):,} parameters ({config.n_layers} blocks, width "
        f"{config.d_model}); prompts of "
        f"{args.prompt} held-out bytes, {args.steps} greedy steps each ({n_tok} "
        f"predictions); prefill = one forward over [{args.batch}, {config.context}]; "
        f"median of {args.repeats} interleaved rounds.\n"
    )
    print(
        "| variant | resident MiB | decode tok/s | decode x float time | prefill tok/s | "
        "prefill x float time | top-1 agree (forced) | same greedy | max abs dlogits vs "
        "dequantizing |"
    )
    print("|---|" + "---:|" * 8)
    for d, td, tp in zip(decoders, dec, pre, strict=True):
        name = d.variant.name
        cells = [
            name,
            mib(tree_nbytes(d.variant.params)),
            f"{n_tok / td:,.0f}",
            f"{td / dec[0]:.2f}x",
            f"{args.batch * config.context / tp:,.0f}",
            f"{tp / pre[0]:.2f}x",
            "1 (ref)" if name == "float32" else f"{agree[name]:.3f}",
            "1 (ref)" if name == "float32" else f"{same[name]:.3f}",
            f"{diff[name]:.2g}" if name in diff else "-",
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\nThe KV cache is this benchmark's (ByteLM has none): its logits match ByteLM's "
        f"full forward to {cache_err:.1e} (argmax agreement {cache_agree:.3f}). One "
        "jitted call per decode step (Python loop, cache donated), as a server steps; its "
        "dispatch overhead is the same for every variant. Quantized: the 24 block kernels "
        "(query/key/value/out/up/down); embeddings, norms, biases and head stay float32. "
        "Last column: prefill logits of the served model against qjax.dequantizing of the "
        "same tree (exact: 0 expected; fast: float rounding, 0 where it dequantizes the "
        "small weight once), and for W8A8 / W4A8 the integer dots against fake-quantized "
        "activations (float rounding, which can move an activation code). 'integer' is "
        "integer_dots='auto' with weight_only='fast'."
        f" Decode weights M = {args.batch} rows per Dense; prefill M = "
        f"{args.batch * config.context}.\n"
    )

    # Memory.
    mems = [d.memory(full) for d in decoders]
    f_pre, f_dec = mems[0]
    kernels = [
        x
        for path, x in jax.tree_util.tree_leaves_with_path(variables)
        if "block_" in jax.tree_util.keystr(path) and x.ndim == 2
    ]
    layer, blocks = max(x.nbytes for x in kernels), sum(x.nbytes for x in kernels)
    print(f"## The byte LM served: memory (batch {args.batch})\n")
    print(
        "| variant | resident MiB | live growth MiB | prefill args MiB | prefill out MiB | "
        "prefill temp MiB | prefill temp - float | prefill peak MiB | decode temp MiB | "
        "decode temp - float | decode peak MiB |"
    )
    print("|---|" + "---:|" * 10)
    for d, (mp, md) in zip(decoders, mems, strict=True):
        grown = growth.get(d.variant.name.split(",")[0])
        cells = [
            d.variant.name,
            mib(tree_nbytes(d.variant.params)),
            "-" if grown is None else mib(grown),
            mib(mp.args),
            mib(mp.out),
            mib(mp.temp),
            mib(mp.temp - f_pre.temp),
            mib(mp.peak),
            mib(md.temp),
            mib(md.temp - f_dec.temp),
            mib(md.peak),
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\nLive growth: jax.live_arrays() bytes added by quantize_tree's output (what stays "
        "resident). Peak = argument + output + temp - alias of the compiled function "
        "(arguments: the parameters, the tokens, and for decode the KV cache of "
        f"{mib(tree_nbytes(empty_cache(config, args.batch)))} MiB, donated). "
        f"jax.live_arrays() after all runs: {mib(live_bytes())} MiB (float variables "
        f"{mib(tree_nbytes(variables))} + quantized trees {mib(sum(growth.values()))} + "
        "tokens and kept outputs). Working buffers beyond float32's, weight_only='fast':"
    )
    for d, (mp, md) in zip(decoders, mems, strict=True):
        if d.variant.name.endswith(("fast", "integer")):
            for what, m, f in (("prefill", mp, f_pre), ("decode", md, f_dec)):
                line = verdict(f"{d.variant.name} {what}", m.temp - f.temp, layer, blocks)
                print(f"- {line}")
    print()


# The decode case ----------------------------------------------------------------------


class Stack(nn.Module):
    """Two 4096-wide Dense layers with a ReLU between: the issue's decode case."""

    width: int = 4096

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.width, name="fc2")(nn.relu(nn.Dense(self.width, name="fc1")(x)))


def stack_table(args: argparse.Namespace) -> None:
    width, batch = 4096, 8
    model = Stack(width)
    x = jax.random.normal(jax.random.key(1), (batch, width), jnp.float32)
    variables = jax.block_until_ready(model.init(jax.random.key(0), x))
    vs = [Variant("float32", variables, wrapper("float32", None))]
    for fmt, shorthand in (
        ("int8 per-channel", FORMATS["int8 per-channel"]),
        ("int4 per-block 128", FORMATS["int4 per-block 128"]),
    ):
        tree = jax.block_until_ready(qjax.quantize_tree(variables, {r".*kernel": shorthand}))
        rules = {"fc1|fc2": qjax.parse_spec(shorthand)}
        vs += [Variant(f"{fmt}, {mode}", tree, wrapper(mode, rules)) for mode in MODES]
    for fmt, shorthand in ACT_FORMATS.items():
        tree = jax.block_until_ready(qjax.quantize_tree(variables, {r".*kernel": shorthand}))
        rules = {"fc1|fc2": qlinen.LayerQuant(qjax.parse_spec(shorthand), ACT)}
        vs += [Variant(f"{fmt}, {mode}", tree, wrapper(mode, rules)) for mode in ACT_MODES]
    fns = [jax.jit(v.wrap(model.apply)) for v in vs]
    outs = [np.asarray(fn(v.params, x)) for fn, v in zip(fns, vs, strict=True)]
    ref = outs[0]
    errs = [float(np.linalg.norm(o - ref) / np.linalg.norm(ref)) for o in outs]
    times: list[list[float]] = [[] for _ in vs]
    for _ in range(args.stack_repeats):
        for fn, v, ts in zip(fns, vs, times, strict=True):
            # An untimed float32 call first: in glibc's default malloc regime a call timed
            # right after one with 128 MiB of temporaries ("exact", "dequantizing",
            # "fake-quant") ran slower, so every variant gets the same predecessor.
            jax.block_until_ready(fns[0](vs[0].params, x))
            start = time.perf_counter()
            jax.block_until_ready(fn(v.params, x))
            ts.append(time.perf_counter() - start)
    med = [statistics.median(t) for t in times]
    mems = [Memory.of(fn, v.params, x) for fn, v in zip(fns, vs, strict=True)]
    print(
        f"## The issue's decode case: Dense({width}) -> ReLU -> Dense({width}), batch {batch}\n\n"
        f"Median of {args.stack_repeats} interleaved rounds; the issue measured 3.35x float "
        "for int4 per-block-128 served before weight_only='fast' existed.\n"
    )
    print(
        "| variant | ms | x float time | resident MiB | temp MiB | peak MiB | rel. error vs float |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v, t, m, e in zip(vs, med, mems, errs, strict=True):
        cells = [
            v.name,
            f"{t * 1e3:.2f}",
            f"{t / med[0]:.2f}x",
            mib(tree_nbytes(v.params)),
            mib(m.temp),
            mib(m.peak),
            f"{e:.4f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        "\n'exact' and 'dequantizing' dequantize each whole weight; 'fast' reads the packed "
        "weight a chunk at a time (qjax.kernels.CHUNK_BYTES = "
        f"{mib(qjax.kernels.CHUNK_BYTES)} MiB of float32). Working buffers beyond float32's:"
    )
    layer = 4 * width * width
    for v, m in zip(vs[1:], mems[1:], strict=True):
        print(f"- {verdict(v.name, m.temp - mems[0].temp, layer, 2 * layer)}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--prompt", type=int, default=32, help="prompt bytes")
    parser.add_argument("--steps", type=int, default=None, help="greedy steps (default 96)")
    parser.add_argument("--repeats", type=int, default=None, help="LM rounds (default 7)")
    parser.add_argument(
        "--stack-repeats", type=int, default=None, help="4096-stack rounds (default 21)"
    )
    memory_env.add_argument(parser)
    args = parser.parse_args()
    memory_env.apply(args)
    args.steps = args.steps or (16 if args.quick else 96)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.stack_repeats = args.stack_repeats or (3 if args.quick else 21)
    dev = jax.devices()[0]
    start = time.perf_counter()
    print(
        f"# Served quantized inference: jax {jax.__version__}, qjax {qjax.__version__}, "
        f"{dev.platform} ({dev.device_kind}), {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at start\n{describe()}\n"
    )
    lm_tables(args)
    stack_table(args)
    print(
        f"Total {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f} "
        "at the end (other jobs on the machine slow every variant alike, not the ratios)."
    )


if __name__ == "__main__":
    main()
