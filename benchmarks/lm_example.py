"""A small byte-level language model trained offline, the test bed of calibrated PTQ.

A decoder-only transformer in Flax Linen (pre-LayerNorm blocks; separate ``query`` /
``key`` / ``value`` / ``out`` projections; an ``up`` / ``down`` GELU MLP; learned position
embeddings; an untied ``head``) over bytes (vocabulary 256: no tokenizer, no download),
trained with Optax on text every Python installation ships: the standard library's own
``.py`` sources. The files are sorted by path; ``test``/``tests``, ``site-packages`` and
caches are left out; every tenth file is held out for evaluation, so the training and
evaluation text never share a file.

The trained parameters are cached in ``~/.cache/qjax-bench/lm-<hash>.npz`` (the hash
covers the configuration and the Python version, whose standard library is the data), with
the training time and loss beside them in a ``.json``; later runs load them::

    python benchmarks/lm_example.py            # trains once (6 min on 2 quiet cores)
    python benchmarks/lm_example.py --tiny     # 2 layers, width 64: seconds

What other code uses: :func:`load_or_train`, :func:`perplexity`, :func:`eval_windows`,
:func:`calibration_batches`, :func:`make_model` and :func:`apply` (``apply(params, tokens)
-> logits``, with ``params`` the Flax variables ``{"params": ...}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

DEFAULT_CACHE = Path.home() / ".cache" / "qjax-bench"
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
HOLDOUT_EVERY = 10  # file i (in sorted order) is held out when i % HOLDOUT_EVERY == 0
DATA_VERSION = 1  # bump when the data selection changes: it is part of the cache key


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """The architecture and the training run (all of it is part of the cache key)."""

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    context: int = 128
    steps: int = 800
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0

    @property
    def key(self) -> str:
        blob = json.dumps(
            {**dataclasses.asdict(self), "python": sys.version_info[:2], "data": DATA_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


DEFAULT = LMConfig()
TINY = LMConfig(d_model=64, n_layers=2, n_heads=2, context=64, steps=300, batch_size=16)


# The data -----------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not EXCLUDED_DIRS & set(f.relative_to(root).parts)]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


@functools.cache
def corpus(split: str) -> np.ndarray:
    """All bytes of the ``"train"`` or ``"eval"`` files, concatenated, as uint8."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    held_out = split == "eval"
    chosen = [f for i, f in enumerate(stdlib_files()) if (i % HOLDOUT_EVERY == 0) == held_out]
    return np.frombuffer(b"".join(f.read_bytes() for f in chosen), np.uint8)


def eval_windows(context: int, n: int = 256) -> np.ndarray:
    """``n`` evenly spaced held-out windows of ``context + 1`` bytes: int32 ``[n, context + 1]``."""
    text = corpus("eval")
    starts = np.linspace(0, len(text) - context - 1, n).astype(np.int64)
    return np.stack([text[s : s + context + 1] for s in starts]).astype(np.int32)


def calibration_batches(
    n: int, seq: int, *, batch_size: int = 8, seed: int = 1234
) -> list[np.ndarray]:
    """``n`` batches of training text, each int32 ``[batch_size, seq]``, from a fixed seed."""
    text = corpus("train")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - seq, (n, batch_size))
    return [np.stack([text[s : s + seq] for s in row]).astype(np.int32) for row in starts]


# The model ----------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.n_heads
        h = nn.LayerNorm(name="ln_attn")(x)
        q, k, v = (
            nn.Dense(d, name=name)(h).reshape(b, t, self.n_heads, hd)
            for name in ("query", "key", "value")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
        att = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        x = x + nn.Dense(d, name="out")(att)
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.Dense(d, name="down")(nn.gelu(nn.Dense(4 * d, name="up")(h)))
        return x + h


class ByteLM(nn.Module):
    """Decoder-only byte-level transformer: ``tokens [b, t] int -> logits [b, t, 256]``."""

    d_model: int
    n_layers: int
    n_heads: int
    context: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        x = nn.Embed(256, self.d_model, name="embed")(tokens)
        x = x + nn.Embed(self.context, self.d_model, name="pos")(jnp.arange(t))
        for i in range(self.n_layers):
            x = Block(self.d_model, self.n_heads, name=f"block_{i}")(x)
        return nn.Dense(256, name="head")(nn.LayerNorm(name="ln_final")(x))


def make_model(config: LMConfig) -> ByteLM:
    return ByteLM(config.d_model, config.n_layers, config.n_heads, config.context)


def apply(config: LMConfig) -> Callable[[Any, jax.Array], jax.Array]:
    """``fn(params, tokens) -> logits`` for ``params = {"params": ...}``."""
    return make_model(config).apply


def init(config: LMConfig) -> dict[str, Any]:
    tokens = jnp.zeros((1, config.context), jnp.int32)
    return make_model(config).init(jax.random.key(config.seed), tokens)


def nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean negative log-likelihood in nats per byte."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def perplexity(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    data: np.ndarray,
    *,
    batch_size: int = 16,
) -> float:
    """Byte-level perplexity ``exp(mean NLL)`` of ``apply_fn(params, x)`` on windows ``data``.

    ``data``: int ``[n, t + 1]`` (:func:`eval_windows`); each window predicts its last
    ``t`` bytes from the ones before. ``apply_fn`` is jitted here; QArray leaves in
    ``params`` are fine if ``apply_fn`` accepts them (``qjax.dequantizing``).
    """
    step = _nll_step(apply_fn)
    total = sum(
        float(step(params, data[i : i + batch_size])) for i in range(0, len(data), batch_size)
    )
    return math.exp(total / len(data))


@functools.cache
def _nll_step(apply_fn: Callable[[Any, jax.Array], jax.Array]) -> Callable:
    """The jitted summed NLL of one batch of windows, one per ``apply_fn`` (jit's cache then
    serves every tree of the same structure)."""
    return jax.jit(lambda p, w: nll(apply_fn(p, w[:, :-1]), w[:, 1:]) * w.shape[0])


# Training -----------------------------------------------------------------------------------


def train(config: LMConfig, *, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Trains from scratch: ``(variables, info)``, info with seconds and losses."""
    model = make_model(config)
    variables = init(config)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup, config.steps, config.learning_rate / 10
    )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay)
    )
    state = opt.init(variables)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(variables, state, batch):
        loss, grads = jax.value_and_grad(
            lambda v: nll(model.apply(v, batch[:, :-1]), batch[:, 1:])
        )(variables)
        updates, state = opt.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state, loss

    text = corpus("train")
    rng = np.random.default_rng(config.seed)
    start, losses = time.perf_counter(), []
    for i in range(config.steps):
        starts = rng.integers(0, len(text) - config.context - 1, config.batch_size)
        batch = np.stack([text[s : s + config.context + 1] for s in starts]).astype(np.int32)
        variables, state, loss = step(variables, state, batch)
        if (i + 1) % max(1, config.steps // 10) == 0:
            losses.append(float(loss))
            log(
                f"  step {i + 1}/{config.steps}: train loss {losses[-1]:.3f} nats/byte "
                f"({time.perf_counter() - start:.0f} s)"
            )
    jax.block_until_ready(variables)
    info = {"train_seconds": time.perf_counter() - start, "train_losses": losses}
    return variables, info


def cache_path(config: LMConfig, cache_dir: Path | str = DEFAULT_CACHE) -> Path:
    return Path(cache_dir) / f"lm-{config.key}.npz"


def load_or_train(
    config: LMConfig = DEFAULT,
    cache_dir: Path | str = DEFAULT_CACHE,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The trained variables ``{"params": ...}``, from the cache or trained (then cached)."""
    path = cache_path(config, cache_dir)
    if path.is_file():
        with np.load(path) as f:
            flat = {tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files}
        return traverse_util.unflatten_dict(flat)
    log(f"training {config} (cached to {path})")
    variables, info = train(config, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(variables, sep="/")
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps({**info, "config": dataclasses.asdict(config)}))
    return variables


def training_info(config: LMConfig, cache_dir: Path | str = DEFAULT_CACHE) -> dict[str, Any]:
    """What :func:`load_or_train` recorded when it trained ``config`` ({} if unknown)."""
    meta = cache_path(config, cache_dir).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


def n_params(variables: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2 layers, width 64 (seconds)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = parser.parse_args(argv)
    config = TINY if args.tiny else DEFAULT
    variables = load_or_train(config, args.cache)
    info = training_info(config, args.cache)
    train_text, eval_text = corpus("train"), corpus("eval")
    ppl = perplexity(apply(config), variables, eval_windows(config.context))
    seconds = info.get("train_seconds", float("nan"))
    print(
        f"{config}\n{n_params(variables):,} parameters; {len(train_text):,} training bytes, "
        f"{len(eval_text):,} held-out bytes\nheld-out byte perplexity {ppl:.3f} "
        f"({math.log2(ppl):.3f} bits/byte); trained in {seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
