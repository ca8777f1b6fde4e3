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
calibrates them with a moving average; applying without freezes them; a float
checkpoint without them quantizes activations dynamically.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.flax._common import (
    ActQuant,
    LayerQuant,
    RuleValue,
    compile_rules,
    quantize_activation,
)
from qjax.flax._integer import dense_contraction, dot_scale, qat_dot, spec_reason
from qjax.ops import fake_quant, quantize
from qjax.qparams import QParams, compute_qparams
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
    "quantized_call",
    "swapped_attributes",
    "weight_name",
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


class _QuantizingScope:
    """Forwards everything to a Linen scope, fake-quantizing one parameter as it is read.

    ``weight_qparams`` holds the params it last used (None until the weight is read).
    """

    def __init__(self, scope: Any, name: str, spec: QuantSpec):
        self._scope, self._name, self._spec = scope, name, spec
        self.weight_qparams: QParams | None = None

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._scope, attr)

    def param(self, name: str, init_fn: Callable, *args: Any, unbox: bool = True, **kw: Any):
        value = self._scope.param(name, init_fn, *args, unbox=unbox, **kw)
        if name == self._name and isinstance(value, jax.Array | jnp.ndarray):
            self.weight_qparams = compute_qparams(jax.lax.stop_gradient(value), self._spec)
            return fake_quant(value, self._spec, qparams=self.weight_qparams)
        return value


@contextlib.contextmanager
def _weights_quantized(
    module: nn.Module, spec: QuantSpec | None
) -> Iterator[_QuantizingScope | None]:
    name = weight_name(module)
    if spec is None or name is None:
        yield None
        return
    scope = _QuantizingScope(module.scope, name, spec)
    with swapped_attributes(module, {"scope": scope}):
        yield scope


@contextlib.contextmanager
def swapped_attributes(module: nn.Module, values: dict[str, Any]) -> Iterator[None]:
    """Sets attributes of a (frozen) module for the duration of the context."""
    old = {attr: getattr(module, attr) for attr in values}
    for attr, value in values.items():
        object.__setattr__(module, attr, value)
    try:
        yield
    finally:
        for attr, value in old.items():
            object.__setattr__(module, attr, value)


def weight_name(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls in WEIGHT_NAMES:
            return WEIGHT_NAMES[cls]
    return None


def _quantize_activation(
    module: nn.Module, x: jax.Array, act: ActQuant
) -> tuple[jax.Array, QParams]:
    """Fake-quantizes ``x``; static ranges live in the module's ``quant_stats``."""
    stored = module.has_variable(STATS, "act_min")
    mutable = module.is_mutable_collection(STATS)
    stats = (
        (module.get_variable(STATS, "act_min"), module.get_variable(STATS, "act_max"))
        if stored
        else None
    )
    calibrating = mutable and not module.is_initializing()
    x_q, qparams, stats = quantize_activation(x, act, stats, calibrating)
    if stats is not None and mutable:
        module.put_variable(STATS, "act_min", stats[0])
        module.put_variable(STATS, "act_max", stats[1])
    return x_q, qparams


def quantized_call(
    module: nn.Module, fun: Callable, args: tuple, kwargs: dict, quant: LayerQuant
) -> Any:
    """Runs ``fun(*args, **kwargs)``, a method of ``module``, with ``quant`` applied."""
    contraction = _integer_dot_contraction(module, args, quant) if quant.integer_dot else None
    act_qparams = None
    if quant.act is not None and args and jnp.issubdtype(jnp.asarray(args[0]).dtype, jnp.floating):
        x_q, act_qparams = _quantize_activation(module, args[0], quant.act)
        args = (x_q, *args[1:])
    with _weights_quantized(module, quant.weight) as scope:
        if contraction is None:
            return fun(*args, **kwargs)
        hooks = {
            "dot_general": _integer_dot_general(quant, act_qparams, scope, contraction),
            "dot_general_cls": None,
        }
        with swapped_attributes(module, hooks):
            return fun(*args, **kwargs)


def _integer_dot_contraction(
    module: nn.Module, args: tuple, quant: LayerQuant
) -> tuple[tuple, tuple]:
    """The (input, kernel) axes of a layer that ``integer_dot=True`` may run on int8."""
    path = "/".join(module.path)
    reason = None
    if quant.act is None or quant.weight is None:
        reason = "integer dots need both a weight and an activation spec"
    else:
        reason = spec_reason("activation", quant.act.spec) or spec_reason("weight", quant.weight)
    if reason is None and not isinstance(module, nn.Dense | nn.DenseGeneral):
        reason = f"integer_dot is wired for Dense and DenseGeneral, not {type(module).__name__}"
    if reason is None and not (args and jnp.issubdtype(jnp.asarray(args[0]).dtype, jnp.floating)):
        reason = "its input is not a floating-point array"
    contraction = reason or dense_contraction(module, jnp.ndim(args[0]))
    if isinstance(contraction, str):
        raise ValueError(
            f"layer {path!r} ({type(module).__name__}) cannot use integer_dot=True: "
            f"{contraction}. Drop integer_dot from its rule to train it with fake-quantized "
            "floats"
        )
    return contraction


def _integer_dot_general(
    quant: LayerQuant,
    act_qparams: QParams,
    scope: _QuantizingScope,
    contraction: tuple[tuple, tuple],
) -> Callable:
    """A ``dot_general`` for the layer: its fake-quantized operands dotted as int8 codes."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del preferred_element_type  # the output keeps the input's dtype, as the float dot
        weight_qparams = scope.weight_qparams
        out_scale = dot_scale(act_qparams.scale, weight_qparams.scale, *contraction)
        if isinstance(out_scale, str):
            raise ValueError(f"integer_dot=True: {out_scale}")
        lhs_codes = quantize(lhs, quant.act.spec, qparams=act_qparams, packed=False).data
        rhs_codes = quantize(rhs, quant.weight, qparams=weight_qparams, packed=False).data
        return qat_dot(lhs, rhs, lhs_codes, rhs_codes, out_scale, dimension_numbers, precision)

    return dot_general


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
        if context.method_name not in ("__call__", "setup") or weight_name(module) is None:
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
    compiled = [(match, quant) for match, quant, _ in compile_rules(rules)]
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
