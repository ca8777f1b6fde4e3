"""An independent NumPy reference of the numeric contract (design notes section 1).

Written from the formulae alone, in plain NumPy float32 arithmetic (IEEE division,
round-half-to-even), with ml_dtypes casts for float targets. It shares no code with qjax.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

EPS = np.float32(np.finfo(np.float32).eps)
INT_TARGETS = ("int8", "uint8", "int4", "uint4", "int2", "uint2")
FLOAT_TARGETS = ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")
EMAX = {"float8_e4m3fn": 8, "float8_e5m2": 15, "float4_e2m1fn": 2}


def dtype_range(name: str, scheme: str) -> tuple[float, float]:
    dt = np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)
    if name in FLOAT_TARGETS:
        fmax = float(ml_dtypes.finfo(dt).max)
        return -fmax, fmax
    info = ml_dtypes.iinfo(dt)
    if scheme == "symmetric_with_clipping":
        return -int(info.max), int(info.max)
    return int(info.min), int(info.max)


def blocks_view(x: np.ndarray, block: tuple[int, ...]) -> np.ndarray:
    """(n0, b0, n1, b1, ...) view of x."""
    split = []
    for d, b in zip(x.shape, block, strict=True):
        split += [d // b, b]
    return x.reshape(split)


def reference(
    x: np.ndarray,
    name: str,
    scheme: str,
    formulation: str,
    block: tuple[int, ...],
    scale_dtype: str = "float32",
) -> dict[str, np.ndarray]:
    """Scale, zero point, minval, q, dequantized x and the straight-through mask."""
    x = np.asarray(x, np.float32)
    qmin, qmax = dtype_range(name, scheme)
    xb = blocks_view(x, block)
    axes = tuple(range(1, 2 * x.ndim, 2))
    min_neg = np.minimum(xb.min(axis=axes, keepdims=True), np.float32(0))
    max_pos = np.maximum(xb.max(axis=axes, keepdims=True), np.float32(0))
    zero_point = minval = None
    if scheme == "asymmetric":
        scale = np.maximum((max_pos - min_neg) / np.float32(qmax - qmin), EPS)
        zero_point = np.clip(qmin - np.round(min_neg / scale), qmin, qmax)
        minval = min_neg
    else:
        amax = np.maximum(-min_neg, max_pos)
        if scale_dtype == "float8_e8m0fnu":
            with np.errstate(divide="ignore"):
                exp = np.floor(np.log2(amax.astype(np.float64))) - EMAX[name]
            scale = np.exp2(np.clip(exp, -127, 127)).astype(np.float32)
        else:
            scale = np.maximum(amax / np.float32((qmax - qmin) / 2), EPS)
        if name in INT_TARGETS:
            zero_point = np.full_like(amax, math.floor((qmax + qmin + 1) / 2))
            minval = -amax
    scale_stored = scale.astype(_np_dtype(scale_dtype)).astype(np.float32)

    if name in FLOAT_TARGETS:
        v = xb / scale_stored
        q = np.clip(v, qmin, qmax).astype(_np_dtype(name)).astype(np.float32)
        deq = q * scale_stored
    elif formulation == "minval":
        v = np.round((xb - minval) / scale_stored) + np.float32(qmin)
        q = np.clip(v, qmin, qmax)
        deq = scale_stored * (q - np.float32(qmin)) + minval
    else:
        zp = zero_point if formulation == "zero_point" else np.float32(0)
        v = np.round(xb / scale_stored) + zp
        q = np.clip(v, qmin, qmax)
        deq = scale_stored * (q - zp)
    mask = (v >= qmin) & (v <= qmax)
    pshape = xb.shape[0::2]
    return {
        "scale": scale_stored.reshape(pshape),
        "zero_point": None if zero_point is None else zero_point.reshape(pshape),
        "minval": None if minval is None else minval.reshape(pshape),
        "q": q.reshape(x.shape),
        "dequantized": deq.astype(np.float32).reshape(x.shape),
        "mask": mask.reshape(x.shape),
    }


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)
