"""Small helpers the notebooks share: flat digits, a training loop, SQNR and text tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = ["accuracy_fn", "flat_digits", "print_table", "sqnr_db", "train_classifier"]


def flat_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as 64 pixels in [0, 1]: a fixed stratified 75/25 split.

    Returns:
      ``(x_train, x_test, y_train, y_test)``, float32 images and int32 labels.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return tuple(train_test_split(x, y, test_size=0.25, stratify=y, random_state=0))


def train_classifier(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[Any, float]:
    """Trains ``model`` with AdamW and cross-entropy; fixed seeds give the same weights.

    Returns:
      ``(variables, last batch loss)``.
    """
    optimizer = optax.adamw(learning_rate, weight_decay=1e-4)

    @jax.jit
    def train_step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = model.apply(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.init(jax.random.key(seed), x_train[:1])
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    loss = jnp.float32(np.nan)
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[i : i + batch_size]
            params, opt_state, loss = train_step(params, opt_state, x_train[batch], y_train[batch])
    return params, float(loss)


def accuracy_fn(model: nn.Module):
    """A jitted ``accuracy(variables, x, y)``: the fraction of ``x`` classified as ``y``."""

    @jax.jit
    def accuracy(variables: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(jnp.argmax(model.apply(variables, x), -1) == y)

    return accuracy


def sqnr_db(x: Any, x_hat: Any) -> float:
    """``10 log10(sum(x**2) / sum((x - x_hat)**2))`` in float64: signal over quantization noise."""
    x = np.asarray(x, np.float64)
    err = x - np.asarray(x_hat, np.float64)
    return float(10 * np.log10(np.sum(x**2) / np.sum(err**2)))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints rows as a fixed-width text table (floats with 2 decimals)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
