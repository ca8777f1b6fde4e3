"""QuantSpec: a frozen, hashable description of how to quantize one array."""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from qjax.dtypes import TargetDType, target_dtype
from qjax.granularity import GranularityLike, as_granularity, block_shape, per_block

__all__ = [
    "FORMULATIONS",
    "MX_PRESETS",
    "PRESETS",
    "SCALE_DTYPES",
    "SCHEMES",
    "QuantSpec",
    "SpecLike",
    "as_spec",
]

Scheme = Literal["symmetric", "symmetric_with_clipping", "asymmetric"]
Formulation = Literal["scale", "zero_point", "minval"]

SCHEMES = ("symmetric", "symmetric_with_clipping", "asymmetric")
FORMULATIONS = ("scale", "zero_point", "minval")
SCALE_DTYPES = ("float32", "bfloat16", "float16", "float8_e8m0fnu", "float8_e4m3fn")
MX_PRESETS = {"mxfp8": "float8_e4m3fn", "mxfp4": "float4_e2m1fn"}
"""OCP MX presets: element dtype; blocks of 32 along the last axis with e8m0 scales."""

MX_BLOCK_SIZE = 32


class Preset(NamedTuple):
    """A named format: element dtype, blocks along the last axis, and how they are scaled."""

    element: str
    block_size: int
    scale_dtype: str
    tensor_scale: bool


PRESETS: dict[str, Preset] = {
    **{
        name: Preset(element, MX_BLOCK_SIZE, "float8_e8m0fnu", False)
        for name, element in MX_PRESETS.items()
    },
    "nvfp4": Preset("float4_e2m1fn", 16, "float8_e4m3fn", True),
}
"""Every preset by name: the OCP MX formats and NVIDIA's NVFP4 (e2m1 values, one e4m3 scale
per block of 16, one float32 scale per tensor)."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize an array: target dtype, scheme, formulation, granularity, scale dtype.

    A QuantSpec is frozen and hashable, so it can be a static argument of ``jax.jit``.
    Fields of the wrong type raise ``TypeError`` and invalid combinations ``ValueError``
    when the spec is built, naming the field; an axis or block size that does not fit an
    array raises when the spec is first used on it. Functions that take a spec also
    accept its shorthand text (see :func:`as_spec` and :func:`qjax.parse_spec`).

    Args:
      dtype: the target: ``"int8"``, ``"uint8"``, ``"int4"``, ``"uint4"``, ``"int2"``,
        ``"uint2"``, ``"float8_e4m3fn"``, ``"float8_e5m2"``, ``"float4_e2m1fn"`` (or the
        matching ``jnp`` dtype), or a preset: ``"mxfp8"`` / ``"mxfp4"`` (OCP MX) set blocks
        of 32 along the last axis and ``float8_e8m0fnu`` scales; ``"nvfp4"`` (NVIDIA) sets
        ``float4_e2m1fn`` values, blocks of 16 along the last axis, ``float8_e4m3fn``
        scales and a tensor scale. A preset's blocks, scale dtype and tensor scale are
        defaults: fields given explicitly win.
      scheme: how the scale is chosen from each block's range.

        * ``"symmetric"`` (default): ``scale = amax / ((qmax - qmin) / 2)`` and
          ``zero_point = (qmax + qmin + 1) // 2`` (0 for signed, 128 for uint8).
        * ``"symmetric_with_clipping"``: signed integers only, ``qmin = -qmax``, so
          ``scale = amax / qmax`` (coremltools' ``linear_symmetric``).
        * ``"asymmetric"``: integers only, ``scale = (max_pos - min_neg) / (qmax - qmin)``
          and ``zero_point = clamp(qmin - round(min_neg / scale), qmin, qmax)``.
      formulation: how values are mapped with the params (the spec's three formulae):
        ``"scale"`` (``q = round(x / scale)``, needs a zero point of 0), ``"zero_point"``
        or ``"minval"`` (integers only). Default: ``"scale"`` where the zero point is 0
        (float targets, signed symmetric), else ``"zero_point"``.
      granularity: :func:`~qjax.per_tensor` (default), :func:`~qjax.per_channel`,
        :func:`~qjax.per_block` or an explicit block-shape tuple.
      scale_dtype: dtype the scale is stored in: ``"float32"`` (default), ``"bfloat16"``,
        ``"float16"``, ``"float8_e8m0fnu"`` for power-of-two scales (float targets), or
        ``"float8_e4m3fn"`` (float targets, as in NVFP4): ``scale = amax / fmax`` (divided
        by the tensor scale, if any) clamped to ``[2**-6, 448]`` and rounded to e4m3.
      tensor_scale: True for two-level scaling (``scale_dtype="float8_e4m3fn"`` only): one
        float32 scale per tensor, ``max(amax(x) / (448 * fmax), 2**-120)``, that the block
        scales are relative to; values are ``x / (tensor_scale * scale)``. Under ``vmap``
        (stacked layers) each layer gets its own. Default: the preset's, else False.

    Examples:
      >>> import qjax
      >>> spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32))
      >>> spec.formulation, spec.qmin, spec.qmax
      ('scale', -8, 7)
      >>> qjax.QuantSpec("uint8", formulation="scale")
      Traceback (most recent call last):
        ...
      ValueError: formulation 'scale' needs a zero point of 0, but uint8 ... zero point 128; ...

      NVFP4: 32 e2m1 values in 16 bytes, two e4m3 block scales and one float32 tensor scale:

      >>> import jax.numpy as jnp
      >>> qa = qjax.quantize(jnp.linspace(-3.0, 3.0, 32).reshape(2, 16), "nvfp4")
      >>> qa.scale.dtype, qa.tensor_scale.shape, qa.nbytes
      (dtype(float8_e4m3fn), (1, 1), 22)
    """

    dtype: str = "int8"
    scheme: Scheme = "symmetric"
    formulation: Formulation | None = None
    granularity: GranularityLike | None = None
    scale_dtype: str | None = None
    tensor_scale: bool | None = None

    def __post_init__(self):
        name = _dtype_name(self.dtype, "dtype", "int8")
        preset = PRESETS.get(name)
        if preset is not None:
            name = preset.element
        target = target_dtype(name)
        object.__setattr__(self, "dtype", target.name)

        _check_choice("scheme", self.scheme, SCHEMES)
        if target.is_float and self.scheme != "symmetric":
            raise ValueError(
                f"scheme {self.scheme!r} is for integer targets; float target {target.name} "
                "is symmetric by construction: use scheme='symmetric'"
            )
        if self.scheme == "symmetric_with_clipping" and not target.is_signed:
            raise ValueError(
                f"scheme 'symmetric_with_clipping' needs a signed dtype, got {target.name}; "
                f"use 'int{target.bits}' or scheme='symmetric'/'asymmetric'"
            )

        formulation = self.formulation
        if formulation is None:
            formulation = "scale" if self.symmetric_zero_point == 0 else "zero_point"
        _check_choice("formulation", formulation, FORMULATIONS)
        if target.is_float and formulation != "scale":
            raise ValueError(
                f"formulation {formulation!r} is for integer targets; float target "
                f"{target.name} supports only formulation='scale'"
            )
        if formulation == "scale" and self.symmetric_zero_point != 0:
            raise ValueError(
                f"formulation 'scale' needs a zero point of 0, but {target.name} with scheme "
                f"{self.scheme!r} has "
                + (
                    "a data-dependent zero point"
                    if self.scheme == "asymmetric"
                    else f"zero point {self.symmetric_zero_point}"
                )
                + "; use formulation='zero_point' or 'minval', or a signed dtype"
                + (" with a symmetric scheme" if self.scheme == "asymmetric" else "")
            )
        object.__setattr__(self, "formulation", formulation)

        granularity = self.granularity
        if granularity is None and preset is not None:
            granularity = per_block(-1, preset.block_size, channel_axis="all")
        object.__setattr__(self, "granularity", as_granularity(granularity))

        scale_dtype = self.scale_dtype
        if scale_dtype is None:
            scale_dtype = "float32" if preset is None else preset.scale_dtype
        scale_dtype = _dtype_name(scale_dtype, "scale_dtype", "float32")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"unsupported scale_dtype {scale_dtype!r}; choose one of {SCALE_DTYPES}"
            )
        if scale_dtype == "float8_e8m0fnu" and not target.is_float:
            raise ValueError(
                f"power-of-two scales (scale_dtype='float8_e8m0fnu') are for float targets "
                f"(the OCP MX formats), not {target.name}; use scale_dtype='float32'"
            )
        if scale_dtype == "float8_e4m3fn" and not target.is_float:
            raise ValueError(
                f"float8_e4m3fn scales are for float targets (as in NVFP4), not "
                f"{target.name}; use scale_dtype='float32'"
            )
        object.__setattr__(self, "scale_dtype", scale_dtype)

        tensor_scale = self.tensor_scale
        if tensor_scale is None:
            tensor_scale = preset is not None and preset.tensor_scale
        if not isinstance(tensor_scale, (bool, np.bool_)):
            raise TypeError(
                f"QuantSpec tensor_scale must be True or False, got {tensor_scale!r} "
                f"({type(tensor_scale).__name__})"
            )
        if tensor_scale and scale_dtype != "float8_e4m3fn":
            raise ValueError(
                f"tensor_scale=True scales float8_e4m3fn block scales (as in NVFP4), but "
                f"scale_dtype is {scale_dtype!r}; use scale_dtype='float8_e4m3fn' or "
                "tensor_scale=False"
            )
        object.__setattr__(self, "tensor_scale", bool(tensor_scale))

    @property
    def target(self) -> TargetDType:
        """The target-dtype row: storage dtype, range and bits."""
        return target_dtype(self.dtype)

    @property
    def qmin(self) -> int | float:
        """Smallest quantized value (``-qmax`` under ``symmetric_with_clipping``)."""
        t = target_dtype(self.dtype)
        return -t.qmax if self.scheme == "symmetric_with_clipping" else t.qmin

    @property
    def qmax(self) -> int | float:
        """Largest quantized value."""
        return target_dtype(self.dtype).qmax

    @property
    def symmetric_zero_point(self) -> int | None:
        """The fixed zero point of symmetric schemes; None for asymmetric (data-dependent)."""
        if self.scheme == "asymmetric":
            return None
        if target_dtype(self.dtype).is_float:
            return 0
        return (self.qmax + self.qmin + 1) // 2

    @property
    def is_float(self) -> bool:
        """True for float8 / float4 targets."""
        return target_dtype(self.dtype).is_float

    @property
    def power_of_two_scale(self) -> bool:
        """True where scales are powers of two (``scale_dtype='float8_e8m0fnu'``)."""
        return self.scale_dtype == "float8_e8m0fnu"

    def __str__(self) -> str:
        parts = [self.dtype, self.scheme, self.formulation, str(self.granularity)]
        if self.scale_dtype != "float32":
            parts.append(f"scale={self.scale_dtype}")
        if self.tensor_scale:
            parts.append("tensor_scale")
        return ":".join(parts)


SpecLike = Union[QuantSpec, str]
"""A :class:`QuantSpec` or its shorthand text (see :func:`qjax.parse_spec`), e.g. ``"int8"``."""


def as_spec(spec: SpecLike, argname: str = "spec") -> QuantSpec:
    """The :class:`QuantSpec` that ``spec`` stands for: a QuantSpec as it is, or shorthand text.

    Every function that takes a spec accepts both, through this one function. Text is read
    by :func:`qjax.parse_spec`; ``"keep"`` (no quantization) is refused, as a spec is needed.

    Args:
      spec: a QuantSpec, or text such as ``"int8"`` or ``"int4:per_block:32"``.
      argname: the argument's name, for error messages.

    Raises:
      TypeError: for anything else, e.g. a traced value (a spec passed to ``jax.jit`` as an
        ordinary argument: close over it or mark it static).
      ValueError: for text that does not parse, or that says ``"keep"``.

    Examples:
      >>> import qjax
      >>> from qjax.spec import as_spec
      >>> as_spec("int4:per_channel") == qjax.QuantSpec("int4", granularity=qjax.per_channel(-1))
      True
      >>> as_spec(3)
      Traceback (most recent call last):
        ...
      TypeError: spec must be a QuantSpec or shorthand text such as 'int8' ... got int
    """
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, str):
        from qjax.rules import parse_spec  # rules builds on this module

        try:
            parsed = parse_spec(spec)
        except ValueError as e:
            raise ValueError(f"{argname}: {e}") from None
        if parsed is None:
            raise ValueError(
                f"{argname}={spec!r} means 'stay float', but a quantization is needed here; "
                "give a dtype, e.g. 'int8' or 'int4:per_block:32'"
            )
        return parsed
    if isinstance(spec, jax.core.Tracer):
        raise TypeError(
            f"{argname} is a traced value: a QuantSpec passed to jax.jit (or another "
            "transformation) as an ordinary argument is traced like an array. Close over it, "
            "e.g. jax.jit(lambda x: qjax.quantize(x, spec)), or mark it static, e.g. "
            f"jax.jit(qjax.quantize, static_argnames={argname!r})"
        )
    raise TypeError(
        f"{argname} must be a QuantSpec or shorthand text such as 'int8' or "
        f"'int4:per_block:32', got {type(spec).__name__}"
    )


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(
            f"QuantSpec {field} must be one of {choices} (a str), got {value!r} "
            f"({type(value).__name__})"
        )
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}; choose one of {choices}")


def _dtype_name(value: object, field: str, example: str) -> str:
    """The name of a dtype given as text, a ``np.dtype`` or a scalar type (``jnp.int8``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, np.dtype):
        return value.name
    # Scalar types (np.float32, ml_dtypes.int4) and jnp's scalar types (jnp.int8); not
    # arrays, which also have a dtype, nor Python values, which jnp.dtype reads as a type.
    if isinstance(value, type) or (hasattr(value, "dtype") and not hasattr(value, "shape")):
        try:
            return jnp.dtype(value).name
        except TypeError:
            pass
    raise TypeError(
        f"QuantSpec {field} must be a dtype name such as {example!r} or a dtype such as "
        f"jnp.{example}, got {value!r} ({type(value).__name__})"
    )


def check_shorthand_fits(
    given: SpecLike, spec: QuantSpec, shape: tuple[int, ...], what: str
) -> None:
    """Refuses ``per_block`` shorthand without ``axis=`` that does not fit ``shape``, saying
    which axis the shorthand chose: the user never wrote it.

    Examples:
      >>> spec = as_spec("int4:per_block:32")
      >>> check_shorthand_fits("int4:per_block:32", spec, (64,), "quantize")
      Traceback (most recent call last):
        ...
      ValueError: quantize: per_block axis -2 is out of range ... add ':axis=N' ...
    """
    if not isinstance(given, str) or "axis=" in given or ":per_block" not in given:
        return  # presets (mxfp4, nvfp4) block their own axis: the usual error says it
    try:
        block_shape(shape, spec.granularity)
    except ValueError as e:
        raise ValueError(
            f"{what}: {e}; the shorthand {given!r} has no axis=, so it blocks axis "
            f"{spec.granularity.axis}, the input axis of a Flax kernel [..., in, out]: add "
            f"':axis=N' to block another axis (e.g. {given + ':axis=-1'!r})"
        ) from None
