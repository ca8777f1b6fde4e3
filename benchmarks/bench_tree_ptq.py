"""PTQ of a whole scan-stacked parameter tree: qjax against Qwix, time and peak memory.

The tree is the float32 ``params`` of a small Flax Linen transformer whose blocks run
under ``nn.scan``, so every per-layer leaf is stacked along a leading ``[L, ...]`` axis::

    embed/embedding               [vocab, d]
    layers/attn/{query,key,value,out}/kernel   [L, d, d]
    layers/mlp/wi/kernel          [L, d, 4d]
    layers/mlp/wo/kernel          [L, 4d, d]
    layers/{attn_norm,mlp_norm}/scale          [L, d]
    final_norm/scale              [d]
    head/kernel                   [d, vocab]

with ``d = 1024``, ``vocab = 8 d`` and ``L`` chosen to give about ``--params`` parameters
(7 layers, 105M parameters, 400 MiB, for the default 100M). Both tools quantize the same
leaves, every ``kernel`` (embedding and norm scales stay float), in two configurations:

* **int8 per channel**: one scale per output channel (qjax ``"int8:per_channel"``, i.e.
  ``per_channel(-1)`` of a ``[in, out]`` kernel; Qwix ``weight_qtype=int8``, channelwise
  on the non-contracting axis);
* **int4 per block 128** along the input axis (qjax ``"int4:per_block:128"``, i.e.
  ``per_block(-2, 128)``, packed two values per byte into ``uint8``; Qwix
  ``weight_qtype=int4, tile_size=128``, a ``jnp.int4`` array, which XLA's CPU buffers
  also hold two values per byte).

Scan stacking: the stacked ``layers`` subtree is quantized under ``jax.vmap`` over its
leading axis, so each layer gets its own scales, exactly as a loop over the layers would
(the way the ``qjax.quantize_tree`` docstring recommends); ``embed`` and ``head`` are
quantized directly. The same holds for Qwix: its ``quantize_params`` takes the abstract
params of the PTQ model (``qwix.quantize_model(model, qwix.PtqProvider(rules))``, then
``jax.eval_shape`` of its ``init``), whose quantization recipe (``HowToQuantize``) is
per layer while the arrays are stacked. Called on the stacked params it fails (int4:
"cannot be tiled") or computes scales over the wrong axes (int8), so the benchmark drops
the leading axis from the abstract ``layers`` subtree and vmaps ``qwix.quantize_params``
over the stacked layers too. Each tool's whole-tree function runs under one ``jax.jit``.

Each (tool, configuration) runs in a fresh worker subprocess, which

1. traces and compiles the jitted function ahead of time on abstract shapes (for Qwix,
   after building the abstract quantized params) -- before any parameter exists, so the
   compiler's transient memory stays out of the peak below and is reported apart;
2. builds the input tree on the device one leaf at a time, each leaf written in place in
   chunks of at most 16 MiB (a donated ``dynamic_update_slice``), so that building it
   peaks at about the input size; then reads ``VmRSS`` (the baseline, input resident)
   and ``VmHWM`` from ``/proc/self/status``;
3. runs the compiled function once (*first call* = compile + this run); ``VmHWM`` after
   it, less the baseline ``VmRSS``, is the *peak above input*. On the JAX CPU backend
   device memory is host memory, so RSS covers it. The peak is an upper bound when it
   does not exceed the high-water mark the input build left ("build slack" in the
   notes). Then ``--repeats`` more calls, each after dropping the previous output, give
   *steady* (their median); they are left out of the peak, as the allocator keeps some
   freed output pages resident from one call to the next, which would add up over calls;
4. checks the result: the SQNR of every dequantized kernel against the input.

The target, from the issue: peak <= input + output + 2 x largest leaf. As the input is
already resident at the baseline, the peak above it is checked against
*budget* = output bytes + 2 x largest input leaf bytes, where output bytes are the bytes
of every leaf of the output tree (QArray values and scales, and the float leaves kept,
which the jitted function copies), with ``jnp.int4`` counted at two values per byte as
XLA stores it on CPU (``jax.Array.nbytes`` says one).

Run it with::

    python benchmarks/bench_tree_ptq.py [--params 100e6] [--repeats 3] [--no-qwix]

Qwix is optional (``pip install qwix``); without it the Qwix rows show ``-``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

import qjax

try:
    import qwix
except ImportError:  # optional: pip install qwix
    qwix = None

D_MODEL = 1024
HEAD_DIM = 128
VOCAB_PER_D_MODEL = 8
INIT_STD = 0.02
CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32: the most the input build holds twice
RESULT_PREFIX = "RESULT "
TOOLS = ("qjax", "qwix")


@dataclasses.dataclass(frozen=True)
class Config:
    """One quantization setting, as each tool spells it."""

    label: str
    qjax_spec: str
    qwix_qtype: Any
    qwix_tile_size: int | None


CONFIGS: dict[str, Config] = {
    "int8": Config("int8 per-channel", "int8:per_channel", jnp.int8, None),
    "int4": Config("int4 per-block 128", "int4:per_block:128", jnp.int4, 128),
}


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """The transformer's size: model width, number of scanned layers, vocabulary."""

    d_model: int
    layers: int
    vocab: int

    @classmethod
    def for_params(cls, n_params: float) -> TreeShape:
        """``d_model`` 1024 (smaller when ``n_params`` is too small for 2 layers of it)
        and the number of layers that comes nearest to ``n_params``.

        A layer holds ``12 d^2`` kernel parameters, embedding and head ``2 * 8 d^2``.
        """
        d_model = D_MODEL
        while d_model > HEAD_DIM and (2 * 12 + 2 * VOCAB_PER_D_MODEL) * d_model**2 > n_params:
            d_model //= 2
        per_layer = 12 * d_model**2
        fixed = 2 * VOCAB_PER_D_MODEL * d_model**2
        layers = max(1, round((n_params - fixed) / per_layer))
        return cls(d_model, layers, VOCAB_PER_D_MODEL * d_model)

    def model(self) -> Transformer:
        return Transformer(self.d_model, max(1, self.d_model // HEAD_DIM), self.layers, self.vocab)


class Attention(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def heads(name: str) -> jax.Array:
            y = nn.Dense(self.d_model, use_bias=False, name=name)(x)
            return y.reshape(*y.shape[:-1], self.heads, -1)

        q, k, v = heads("query"), heads("key"), heads("value")
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]))
        mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        return nn.Dense(self.d_model, use_bias=False, name="out")(mixed)


class Mlp(nn.Module):
    d_model: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(nn.Dense(4 * self.d_model, use_bias=False, name="wi")(x))
        return nn.Dense(self.d_model, use_bias=False, name="wo")(h)


class Block(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        x = x + Attention(self.d_model, self.heads, name="attn")(nn.RMSNorm(name="attn_norm")(x))
        x = x + Mlp(self.d_model, name="mlp")(nn.RMSNorm(name="mlp_norm")(x))
        return x, None


class Transformer(nn.Module):
    """Embedding, ``layers`` blocks under ``nn.scan`` (params stacked on axis 0), head."""

    d_model: int
    heads: int
    layers: int
    vocab: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        blocks = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        x, _ = blocks(self.d_model, self.heads, name="layers")(x, None)
        return nn.Dense(self.vocab, use_bias=False, name="head")(nn.RMSNorm(name="final_norm")(x))


def abstract_params(model: nn.Module) -> Any:
    """The model's ``params`` as ``jax.ShapeDtypeStruct`` leaves; nothing is allocated."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


# --- Building the input -------------------------------------------------------------------


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


def random_leaf(shape: tuple[int, ...], rng: np.random.Generator) -> jax.Array:
    """A float32 N(0, 0.02^2) device array, written in place in chunks of rows."""
    buffer = jnp.zeros(shape, jnp.float32)
    row_size = math.prod(shape[1:])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row_size)
    for start in range(0, shape[0], rows_per_chunk):
        rows = rng.standard_normal((min(rows_per_chunk, shape[0] - start), *shape[1:]), np.float32)
        rows *= np.float32(INIT_STD)
        buffer = _write_rows(buffer, rows, start)
        del rows
    return buffer.block_until_ready()


def build_params(abstract: Any, seed: int = 0) -> Any:
    """Random float32 params of the abstract tree's shapes, leaf by leaf on the device."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: random_leaf(tuple(s.shape), rng), abstract)


# --- The two tools -------------------------------------------------------------------------


def split_layers(params: dict) -> tuple[dict, dict]:
    """``({"layers": stacked subtree}, {every other top-level entry})``."""
    return {"layers": params["layers"]}, {k: v for k, v in params.items() if k != "layers"}


def qjax_quantize_fn(config: Config) -> Callable[[dict], dict]:
    """params -> quantized params, with qjax: vmap over the stacked layers."""
    rules = {".*kernel": config.qjax_spec}

    def quantize(params: dict) -> dict:
        stacked, rest = split_layers(params)
        layers = jax.vmap(lambda tree: qjax.quantize_tree(tree, rules))(stacked)
        return {**qjax.quantize_tree(rest, rules), **layers}

    return quantize


def qwix_abstract_quantized(model: nn.Module, config: Config) -> Any:
    """The abstract params of the Qwix PTQ model: WithAux(QArray) leaves for kernels."""
    rule = qwix.QuantizationRule(
        module_path=".*",
        op_names=("dot_general",),  # the Dense kernels; attention einsums stay float
        weight_qtype=config.qwix_qtype,
        tile_size=config.qwix_tile_size,
    )
    return abstract_params(qwix.quantize_model(model, qwix.PtqProvider([rule])))


def qwix_quantize_fn(abstract_quantized: Any) -> Callable[[dict], dict]:
    """params -> quantized params, with ``qwix.quantize_params``: vmap over the stacked
    layers against the per-layer abstract tree (leading axis dropped)."""
    per_layer = {
        "layers": jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), abstract_quantized["layers"]
        )
    }

    def quantize(params: dict) -> dict:
        stacked, rest = split_layers(params)
        layers = jax.vmap(lambda tree: qwix.quantize_params(tree, per_layer))(stacked)
        return {**qwix.quantize_params(rest, abstract_quantized), **layers}

    return quantize


def quantized_pairs(params: dict, quantized: dict) -> list[tuple[str, jax.Array, Any]]:
    """``(path, float leaf, quantized leaf)`` for every leaf that was quantized: a qjax
    ``QArray`` or the ``WithAux`` (holding a ``qwix.QArray``) that Qwix returns."""
    quantized_flat = flax.traverse_util.flatten_dict(quantized)
    return [
        ("/".join(path), x, quantized_flat[path])
        for path, x in flax.traverse_util.flatten_dict(params).items()
        if not isinstance(quantized_flat[path], jax.Array)
    ]


def dequantize_leaf(tool: str, leaf: Any) -> jax.Array:
    if tool == "qjax":
        return qjax.dequantize(leaf)
    return qwix.dequantize(leaf.array)


@functools.partial(jax.jit, static_argnames=("tool", "stacked"))
def _squared_sums(x: jax.Array, leaf: Any, tool: str, stacked: bool) -> tuple[jax.Array, jax.Array]:
    dequantize = functools.partial(dequantize_leaf, tool)
    restored = jax.vmap(dequantize)(leaf) if stacked else dequantize(leaf)
    return jnp.sum(jnp.square(x)), jnp.sum(jnp.square(x - restored))


def sqnr_db(tool: str, params: dict, quantized: dict) -> tuple[float, int]:
    """Signal-to-quantization-noise ratio over all quantized kernels, and their count."""
    signal = noise = 0.0
    pairs = quantized_pairs(params, quantized)
    for path, x, leaf in pairs:
        s, n = _squared_sums(x, leaf, tool, path.startswith("layers/"))
        signal, noise = signal + float(s), noise + float(n)
    return 10 * math.log10(signal / noise), len(pairs)


# --- The worker ------------------------------------------------------------------------------


def memory_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def tree_bytes(tree: Any) -> int:
    """The bytes of the tree's arrays, sub-byte types packed as XLA stores them on CPU.

    (``jax.Array.nbytes`` counts a byte per ``int4`` value; XLA's CPU buffers hold two.)
    """
    return sum(
        math.ceil(leaf.size * jax.dtypes.itemsize_bits(leaf.dtype) / 8)
        for leaf in jax.tree.leaves(tree)
    )


def worker(tool: str, config_key: str, n_params: float, repeats: int) -> dict[str, Any]:
    """One (tool, configuration): compile, build the input, time and measure; see the
    module docstring."""
    config = CONFIGS[config_key]
    model = TreeShape.for_params(n_params).model()
    abstract = abstract_params(model)

    start = time.perf_counter()
    if tool == "qjax":
        quantize = qjax_quantize_fn(config)
    else:
        quantize = qwix_quantize_fn(qwix_abstract_quantized(model, config))
    setup_s = time.perf_counter() - start

    before_compile = memory_status()
    start = time.perf_counter()
    compiled = jax.jit(quantize).lower(abstract).compile()
    compile_s = time.perf_counter() - start
    compile_peak = memory_status()["VmHWM"] - before_compile["VmRSS"]

    params = build_params(abstract)
    gc.collect()
    baseline = memory_status()

    start = time.perf_counter()
    quantized = jax.block_until_ready(compiled(params))
    first_run_s = time.perf_counter() - start
    peak = memory_status()["VmHWM"]

    steady = []
    for _ in range(repeats):
        quantized = None  # drop the previous output before the next call
        start = time.perf_counter()
        quantized = jax.block_until_ready(compiled(params))
        steady.append(time.perf_counter() - start)

    sqnr, n_quantized = sqnr_db(tool, params, quantized)
    return {
        "setup_s": setup_s,
        "compile_s": compile_s,
        "first_s": compile_s + first_run_s,
        "steady_s": statistics.median(steady) if steady else first_run_s,
        "input_bytes": tree_bytes(params),
        "largest_bytes": max(tree_bytes(leaf) for leaf in jax.tree.leaves(params)),
        "output_bytes": tree_bytes(quantized),
        "xla_temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "peak_above": peak - baseline["VmRSS"],
        "build_slack": baseline["VmHWM"] - baseline["VmRSS"],
        "compile_peak": compile_peak,
        "sqnr_db": sqnr,
        "n_quantized": n_quantized,
    }


def run_worker(tool: str, config_key: str, n_params: float, repeats: int) -> dict[str, Any] | str:
    """The worker's result in a fresh subprocess, or the error text when it failed."""
    command = [sys.executable, __file__, "--worker", tool, config_key]
    command += ["--params", str(n_params), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]


# --- The report ------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(repeats: int = 3, use_qwix: bool = True, n_params: float = 100e6) -> None:
    """Runs every (tool, configuration) worker and prints the markdown table and notes."""
    shape = TreeShape.for_params(n_params)
    abstract = abstract_params(shape.model())
    sizes = [math.prod(s.shape) for s in jax.tree.leaves(abstract)]
    print(
        f"Scan-stacked float32 tree: {sum(sizes):,} params (d_model {shape.d_model}, "
        f"{shape.layers} layers, vocab {shape.vocab}), {mib(4 * sum(sizes))}, largest leaf "
        f"{mib(4 * max(sizes))}; JAX {jax.__version__} on {jax.default_backend()}, "
        f"median of {repeats} steady calls.\n"
    )
    print(
        "| tool | config | first call s | steady s | output bytes | peak above input "
        "| budget | ok |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    notes = []
    for config_key, config in CONFIGS.items():
        for tool in TOOLS:
            if tool == "qwix" and (not use_qwix or qwix is None):
                print(f"| {tool} | {config.label} | - | - | - | - | - | - |")
                continue
            result = run_worker(tool, config_key, n_params, repeats)
            if isinstance(result, str):
                print(f"| {tool} | {config.label} | error | | | | | |")
                notes.append(f"{tool} {config.label}: {result}")
                continue
            budget = result["output_bytes"] + 2 * result["largest_bytes"]
            ok = "ok" if result["peak_above"] <= budget else "MISSED"
            print(
                f"| {tool} | {config.label} | {result['first_s']:.2f} | {result['steady_s']:.3f} "
                f"| {mib(result['output_bytes'])} | {mib(result['peak_above'])} "
                f"| {mib(budget)} | {ok} |"
            )
            notes.append(
                f"{tool} {config.label}: {result['n_quantized']} kernel leaves quantized, "
                f"SQNR {result['sqnr_db']:.1f} dB; compile {result['compile_s']:.2f} s "
                f"(compiler peak {mib(result['compile_peak'])} above its start, before the "
                f"input exists), setup {result['setup_s']:.2f} s; XLA temp buffers "
                f"{mib(result['xla_temp_bytes'])}; build slack {mib(result['build_slack'])}"
            )
    print()
    for note in notes:
        print(f"- {note}")
    print(
        "- budget = output bytes + 2 x largest input leaf (the input is resident at the "
        "baseline); first call = compile + first run; Qwix setup = building the abstract "
        "PTQ-model params (`jax.eval_shape` of the quantized model's init)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=100e6, help="tree size (100e6)")
    parser.add_argument("--repeats", type=int, default=3, help="steady-state calls (3)")
    parser.add_argument("--no-qwix", action="store_true", help="skip the Qwix rows")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, config_key = args.worker
        result = worker(tool, config_key, args.params, args.repeats)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    start = time.perf_counter()
    run(repeats=args.repeats, use_qwix=not args.no_qwix, n_params=args.params)
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
