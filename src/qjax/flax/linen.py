"""Quantization-aware Flax Linen: QuantDense & co., and ``intercept`` for unmodified models.

One mechanism serves the layers and the interceptor. While a quantized module runs, the
parameters it reads (``kernel``, or ``embedding`` for Embed) are fake-quantized where
they are read, through a thin proxy in front of the module's variable scope, and its
input activation is fake-quantized before the layer sees it. That seam exists for every
Linen layer (Dense, DenseGeneral, Conv, ConvTranspose, Einsum, Embed), where the
``dot_general`` hooks exist only for some and do not say which operand is the weight.
The parameter tree stays identical to the float model's: a float checkpoint loads as is.

Static activation ranges live in the ``quant_stats`` collection (``act_min``,
``act_max`` of each quantized module). Applying with ``mutable=["quant_stats"]``
calibrates them with a moving average; applying without freezes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.ops import fake_quant
from qjax.qparams import QParams, block_range, qparams_from_minmax
from qjax.rules import parse_spec
from qjax.spec import QuantSpec

__all__ = [
    "STATS",
    "ActQuant",
    "LayerQuant",
    "QuantConv",
    "QuantConvTranspose",
    "QuantDense",
    "QuantDenseGeneral",
    "QuantEinsum",
    "intercept",
    "intercepted",
]

STATS = "quant_stats"
"""The collection holding static activation ranges."""

WEIGHT_NAMES: dict[type, str] = {
    nn.Dense: "kernel",
    nn.DenseGeneral: "kernel",
    nn.Conv: "kernel",
    nn.ConvTranspose: "kernel",
    nn.Einsum: "kernel",
    nn.Embed: "embedding",
}
"""The parameter each quantizable layer type multiplies its input with."""


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """How a layer's input activation is quantized.

    Attributes:
      spec: the QuantSpec. Dynamic quantization may use any granularity, e.g.
        :func:`~qjax.per_token`; static ranges need one whose block shape does not
        depend on the batch (per tensor, or per channel of the last axis).
      static: False: params computed from each call's activation (dynamic). True: params
        from ranges calibrated into the ``quant_stats`` collection; until calibrated, the
        dynamic params are used.
      momentum: the moving-average weight of the old range during calibration.
    """

    spec: QuantSpec
    static: bool = False
    momentum: float = 0.9

    def __post_init__(self):
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """What a quantized layer does: a weight spec and an optional activation spec."""

    weight: QuantSpec | None = None
    act: ActQuant | None = None


RuleValue = LayerQuant | QuantSpec | str | None


def _as_layer_quant(value: RuleValue, where: str) -> LayerQuant | None:
    if value is None or isinstance(value, LayerQuant):
        return value
    if isinstance(value, QuantSpec):
        return LayerQuant(weight=value)
    if isinstance(value, str):
        try:
            spec = parse_spec(value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return None if spec is None else LayerQuant(weight=spec)
    raise TypeError(
        f"{where}: expected a LayerQuant, QuantSpec, shorthand text or None, "
        f"got {type(value).__name__}"
    )


class _QuantizingScope:
    """Forwards everything to a Linen scope, fake-quantizing one parameter as it is read."""

    def __init__(self, scope: Any, name: str, spec: QuantSpec):
        self._scope, self._name, self._spec = scope, name, spec

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._scope, attr)

    def param(self, name: str, init_fn: Callable, *args: Any, unbox: bool = True, **kw: Any):
        value = self._scope.param(name, init_fn, *args, unbox=unbox, **kw)
        if name == self._name and isinstance(value, jax.Array | jnp.ndarray):
            return fake_quant(value, self._spec)
        return value


@contextlib.contextmanager
def _weights_quantized(module: nn.Module, spec: QuantSpec | None) -> Iterator[None]:
    name = _weight_name(module)
    if spec is None or name is None:
        yield
        return
    scope = module.scope
    object.__setattr__(module, "scope", _QuantizingScope(scope, name, spec))
    try:
        yield
    finally:
        object.__setattr__(module, "scope", scope)


def _weight_name(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls in WEIGHT_NAMES:
            return WEIGHT_NAMES[cls]
    return None


def _quantize_activation(module: nn.Module, x: jax.Array, act: ActQuant) -> jax.Array:
    if not act.static:
        return fake_quant(x, act.spec)
    lo, hi = block_range(jax.lax.stop_gradient(x), act.spec)
    act_min = module.variable(STATS, "act_min", jnp.full, lo.shape, jnp.inf, jnp.float32)
    act_max = module.variable(STATS, "act_max", jnp.full, hi.shape, -jnp.inf, jnp.float32)
    if module.is_mutable_collection(STATS) and not module.is_initializing():
        fresh = jnp.isinf(act_min.value)
        m = act.momentum
        act_min.value = jnp.where(fresh, lo, m * act_min.value + (1 - m) * lo)
        act_max.value = jnp.where(fresh, hi, m * act_max.value + (1 - m) * hi)
    calibrated = jnp.isfinite(act_min.value)
    qp = qparams_from_minmax(
        jnp.where(calibrated, act_min.value, lo),
        jnp.where(calibrated, act_max.value, hi),
        act.spec,
    )
    return fake_quant(x, act.spec, qparams=QParams(*qp))


def quantized_call(
    module: nn.Module, fun: Callable, args: tuple, kwargs: dict, quant: LayerQuant
) -> Any:
    """Runs ``fun(*args, **kwargs)``, a method of ``module``, with ``quant`` applied."""
    if quant.act is not None and args and jnp.issubdtype(jnp.asarray(args[0]).dtype, jnp.floating):
        args = (_quantize_activation(module, args[0], quant.act), *args[1:])
    with _weights_quantized(module, quant.weight):
        return fun(*args, **kwargs)


def _quantized_layer(base: type[nn.Module]) -> type[nn.Module]:
    class Quantized(base):
        quant: LayerQuant = LayerQuant()

        @nn.compact
        def __call__(self, *args, **kwargs):
            return quantized_call(
                self, functools.partial(base.__call__, self), args, kwargs, self.quant
            )

    Quantized.__name__ = Quantized.__qualname__ = f"Quant{base.__name__}"
    Quantized.__doc__ = (
        f"Drop-in :class:`flax.linen.{base.__name__}` with fake-quantized weight and input.\n\n"
        "Same parameter names and shapes as the float layer. ``quant`` is a\n"
        ":class:`LayerQuant`: the weight spec and an optional :class:`ActQuant`."
    )
    return Quantized


QuantDense = _quantized_layer(nn.Dense)
QuantDenseGeneral = _quantized_layer(nn.DenseGeneral)
QuantConv = _quantized_layer(nn.Conv)
QuantConvTranspose = _quantized_layer(nn.ConvTranspose)
QuantEinsum = _quantized_layer(nn.Einsum)


def _interceptor(rules: list[tuple[Callable[[str], Any], LayerQuant | None]]) -> Callable:
    def intercept_method(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name not in ("__call__", "setup") or _weight_name(module) is None:
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        quant = next((q for match, q in rules if match(path)), None)
        if quant is None:
            return next_fun(*args, **kwargs)
        if context.method_name == "setup" or isinstance(module, nn.Embed):
            quant = LayerQuant(weight=quant.weight)  # setup / integer ids: weights only
        return quantized_call(module, next_fun, args, kwargs, quant)

    return intercept_method


@contextlib.contextmanager
def intercept(rules: Mapping[str, RuleValue]) -> Iterator[None]:
    """Quantizes the layers of an unmodified Linen model while the context is active.

    Args:
      rules: ``{regex: LayerQuant | QuantSpec | shorthand | None}``, first match wins,
        matched with ``re.fullmatch`` against each module's path joined with ``/``
        (e.g. ``"Block_0/Dense_1"``). A QuantSpec or shorthand quantizes weights only.
        Dense, DenseGeneral, Conv, ConvTranspose, Einsum and Embed are quantized where
        a rule matches them; other modules run unchanged.

    Enter the context inside the function you jit (or wrap it with :func:`intercepted`):
    Linen's interceptors are Python state that JAX's jit cache does not see, so a
    function jitted outside the context would replay whichever version it traced first.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from qjax.flax import linen as qlinen
      >>> model = nn.Dense(4)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> @jax.jit
      ... def quantized_apply(variables, x):
      ...     with qlinen.intercept({".*": "int4:per_channel"}):
      ...         return model.apply(variables, x)
      >>> quantized_apply(variables, jnp.ones((1, 8))).shape
      (1, 4)
    """
    compiled = [
        (re.compile(pattern).fullmatch, _as_layer_quant(value, f"rule {pattern!r}"))
        for pattern, value in rules.items()
    ]
    with nn.intercept_methods(_interceptor(compiled)):
        yield


def intercepted(fn: Callable, rules: Mapping[str, RuleValue]) -> Callable:
    """``fn`` run inside :func:`intercept` ``(rules)``: a new function, safe to ``jax.jit``.

    The wrapper is a different function from ``fn``, so jitting both gives two cache
    entries: the float and the quantized versions never replay each other's trace.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from qjax.flax import linen as qlinen
      >>> model = nn.Dense(4)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> float_apply = jax.jit(model.apply)
      >>> int8_apply = jax.jit(qlinen.intercepted(model.apply, {".*": "int8"}))
      >>> bool(jnp.any(float_apply(variables, jnp.ones((1, 8)))
      ...               != int8_apply(variables, jnp.ones((1, 8)))))
      True
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with intercept(rules):
            return fn(*args, **kwargs)

    return wrapper
