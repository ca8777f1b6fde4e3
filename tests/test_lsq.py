"""Learned step size quantization (qjax.lsq, the ``:lsq`` rules of the Flax adapters).

Gradients are checked against a NumPy implementation of the papers' formulae (LSQ:
Esser et al. 2019, eq. 3 and the gradient scale of section 2.2; LSQ+: Bhalgat et al.
2020, the offset's gradient), written here from the papers, not from qjax's code.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx
from qjax.lsq import (
    default_grad_scale,
    learnable_params,
    learned_qparams,
    lsq_fake_quant,
    param_labels,
)

EPS = np.float32(np.finfo(np.float32).eps)


# The papers' formulae in NumPy ------------------------------------------------------------


def _blocks(x: np.ndarray, block: tuple[int, ...]) -> np.ndarray:
    split = []
    for d, b in zip(x.shape, block, strict=True):
        split += [d // b, b]
    return x.reshape(split)


def _expand(p: np.ndarray, x_ndim: int) -> np.ndarray:
    """(n0, n1, ...) params as (n0, 1, n1, 1, ...)."""
    shape = []
    for n in p.shape:
        shape += [n, 1]
    return p.reshape(shape)


def _block_sum(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.sum(axis=tuple(range(1, 2 * ndim, 2)), dtype=np.float64)


def paper_lsq(x, cot, s, offset, *, qmin, qmax, formulation, asymmetric, block, g):
    """Forward and gradients of ``sum(cot * y)`` by the papers' formulae.

    LSQ (eq. 1-3): ``v_bar = round(clip(v / s, -Q_N, Q_P)) * s``; ``dv_hat/ds = -v/s +
    round(v/s)`` inside, ``-Q_N`` / ``Q_P`` at the ends; straight-through for ``v``; the
    scale's gradient times ``g``. A zero point ``z`` shifts the grid: ``Q_N = z - qmin``,
    ``Q_P = qmax - z``, ``v_bar = s * (q - z)``, so ``d/dz = -s`` where clipped. LSQ+:
    ``x_hat = round(clip((x - beta) / s, 0, Q)) * s + beta``; ``d/dbeta = 1`` where
    clipped, 0 inside. A symmetric minval is ``beta = -s * Q / 2`` (chain rule).
    """
    x = np.asarray(x, np.float32)
    xb, cb = _blocks(x, block), _blocks(np.asarray(cot, np.float32), block)
    s = np.maximum(np.asarray(s, np.float32), EPS)
    se = _expand(s, x.ndim)
    if formulation == "minval":  # LSQ+
        top = qmax - qmin
        if asymmetric:
            beta = _expand(np.asarray(offset, np.float32), x.ndim)
        else:
            beta = -(se * np.float32(top / 2))
        v = (xb - beta) / se
        lo, hi = np.zeros_like(v), np.full_like(v, top)
    else:  # LSQ, the grid shifted by the zero point
        z = np.float32(0)
        if formulation == "zero_point":
            z = _expand(np.clip(np.round(np.asarray(offset, np.float32)), qmin, qmax), x.ndim)
        v = xb / se
        lo, hi = np.broadcast_to(qmin - z, v.shape), np.broadcast_to(qmax - z, v.shape)
    q = np.round(np.clip(v, lo, hi))
    inside = (v >= lo) & (v <= hi)
    d_s = np.where(v <= lo, lo, np.where(v >= hi, hi, -v + np.round(v)))
    if formulation == "minval":
        y = (se * q).astype(np.float32) + beta
        d_beta = np.where(inside, 0.0, 1.0)
        if not asymmetric:  # chain rule through beta = -s * Q / 2
            d_s = d_s + d_beta * (-(qmax - qmin) / 2)
    else:
        y = se * q
        d_beta = np.where(inside, 0.0, -se)  # d/dz
    out = {
        "y": y.reshape(x.shape).astype(np.float32),
        "dx": (cb * inside).reshape(x.shape),
        "ds": g * _block_sum(cb * d_s, x.ndim).reshape(s.shape),
    }
    if asymmetric:
        out["doffset"] = g * _block_sum(cb * d_beta, x.ndim).reshape(s.shape)
    return out


def _ref_blocks(shape, granularity):
    return qjax.block_shape(shape, granularity)


# Cases: (spec, x shape) across formulations, schemes and granularities.
CASES = [
    (qjax.QuantSpec("int4"), (8, 6)),
    (qjax.QuantSpec("int2", granularity=qjax.per_channel(-1)), (12, 5)),
    (qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 4)), (8, 3)),
    (qjax.QuantSpec("int8", scheme="symmetric_with_clipping"), (4, 9)),
    (qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 4)), (3, 3, 8, 4)),
    (qjax.QuantSpec("uint8", scheme="asymmetric", granularity=qjax.per_channel(0)), (5, 16)),
    (
        qjax.QuantSpec(
            "uint4", scheme="asymmetric", formulation="minval", granularity=qjax.per_block(-1, 8)
        ),
        (4, 16),
    ),
    (qjax.QuantSpec("uint8"), (6, 7)),  # symmetric, fixed zero point 128
    (qjax.QuantSpec("int4", formulation="minval", granularity=qjax.per_channel(-1)), (10, 3)),
    (qjax.QuantSpec("int4", formulation="zero_point", granularity=qjax.per_channel(-1)), (10, 3)),
]
IDS = [f"{spec}-{'x'.join(map(str, shape))}" for spec, shape in CASES]


def _case(spec, shape, seed=0):
    """x, a cotangent, and learned params moved away from the calibration so that some
    values clip at both ends."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    cot = rng.normal(size=shape).astype(np.float32)
    scale, offset = learnable_params(qjax.compute_qparams(x, spec), spec)
    scale = scale * np.float32(0.7)
    if offset is not None:
        offset = offset + (np.float32(0.3) if spec.formulation == "zero_point" else np.float32(0.1))
    return x, cot, scale, offset


def _paper(spec, x, cot, scale, offset, g):
    if spec.formulation == "zero_point" and offset is None:  # symmetric: the middle code
        offset = np.full(np.shape(scale), (spec.qmax + spec.qmin + 1) // 2, np.float32)
    return paper_lsq(
        x,
        cot,
        np.asarray(scale),
        None if offset is None else np.asarray(offset),
        qmin=spec.qmin,
        qmax=spec.qmax,
        formulation=spec.formulation,
        asymmetric=spec.scheme == "asymmetric",
        block=_ref_blocks(x.shape, spec.granularity),
        g=g,
    )


def _grads(spec, x, cot, scale, offset, grad_scale=None):
    def loss(x, scale, offset):
        y = lsq_fake_quant(x, spec, scale, offset, grad_scale=grad_scale)
        return jnp.sum(y * cot)

    argnums = (0, 1) if offset is None else (0, 1, 2)
    return jax.jit(jax.grad(loss, argnums=argnums))(x, scale, offset)


@pytest.mark.parametrize(("spec", "shape"), CASES, ids=IDS)
def test_forward_is_fake_quant_bit_for_bit(spec, shape):
    x, _, scale, offset = _case(spec, shape)
    qp = learned_qparams(scale, offset, spec)
    expected = qjax.fake_quant(x, spec, qparams=qp)
    got = jax.jit(lambda x, s, o: lsq_fake_quant(x, spec, s, o))(x, scale, offset)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(
        np.asarray(got).view(np.uint32), np.asarray(expected).view(np.uint32)
    )
    # And the papers' forward, in NumPy.
    ref = _paper(spec, x, x, scale, offset, 1.0)
    np.testing.assert_allclose(np.asarray(got), ref["y"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("spec", "shape"), CASES, ids=IDS)
def test_gradients_match_the_papers(spec, shape):
    x, cot, scale, offset = _case(spec, shape)
    blocks = _ref_blocks(shape, spec.granularity)
    numel = math.prod(blocks)
    asym = spec.scheme == "asymmetric"
    q_p = spec.qmax - spec.qmin if asym else spec.qmax - (spec.qmax + spec.qmin + 1) // 2
    g = 1.0 / math.sqrt(numel * q_p)
    ref = _paper(spec, x, cot, scale, offset, g)
    # Both ends are exercised: some values clip, some do not.
    assert 0 < ref["dx"].astype(bool).sum() < x.size
    grads = _grads(spec, x, cot, scale, offset)
    np.testing.assert_array_equal(np.asarray(grads[0]), ref["dx"])
    np.testing.assert_allclose(np.asarray(grads[1]), ref["ds"], rtol=2e-5, atol=1e-6)
    if asym:
        np.testing.assert_allclose(np.asarray(grads[2]), ref["doffset"], rtol=2e-5, atol=1e-6)


def test_explicit_grad_scale_multiplies_the_param_gradients_only():
    spec, shape = CASES[5]
    x, cot, scale, offset = _case(spec, shape)
    ref = _paper(spec, x, cot, scale, offset, 0.25)
    dx, ds, doff = _grads(spec, x, cot, scale, offset, grad_scale=0.25)
    np.testing.assert_array_equal(np.asarray(dx), ref["dx"])
    np.testing.assert_allclose(np.asarray(ds), ref["ds"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(doff), ref["doffset"], rtol=2e-5, atol=1e-6)


def test_forward_mode_agrees_with_reverse_mode():
    spec, shape = CASES[2]
    x, cot, scale, _ = _case(spec, shape)
    f = lambda s: jnp.sum(lsq_fake_quant(x, spec, s) * cot)  # noqa: E731
    direction = jnp.asarray(np.random.default_rng(1).normal(size=scale.shape), jnp.float32)
    _, jvp = jax.jvp(f, (scale,), (direction,))
    np.testing.assert_allclose(
        float(jvp), float(jnp.sum(jax.grad(f)(scale) * direction)), rtol=1e-5
    )


def test_vmap_quantizes_each_slice_on_its_own():
    spec = qjax.QuantSpec("int2", granularity=qjax.per_channel(-1))
    xs = np.random.default_rng(2).normal(size=(3, 6, 4)).astype(np.float32)
    scales = np.stack([learnable_params(qjax.compute_qparams(x, spec), spec)[0] for x in xs])
    f = lambda x, s: lsq_fake_quant(x, spec, s)  # noqa: E731
    batched = jax.jit(jax.vmap(f))(xs, scales)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(f(xs[i], scales[i])))
    grad = jax.vmap(jax.grad(lambda x, s: jnp.sum(f(x, s) ** 2), argnums=1))(xs, scales)
    for i in range(3):
        ref = _paper(
            spec, xs[i], 2 * np.asarray(f(xs[i], scales[i])), scales[i], None, 1 / math.sqrt(6)
        )
        np.testing.assert_allclose(np.asarray(grad[i]), ref["ds"], rtol=2e-5, atol=1e-6)


def test_scale_is_clamped_positive_and_its_gradient_passes_the_clamp():
    x = jnp.array([1e-8, -2e-8, 5.0])
    spec = qjax.QuantSpec("int8")
    y = lsq_fake_quant(x, spec, jnp.float32(-1.0))
    expected = qjax.fake_quant(x, spec, qparams=qjax.QParams(jnp.float32(EPS), None, None))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    ds = jax.grad(lambda s: jnp.sum(lsq_fake_quant(x, spec, s)))(jnp.float32(-1.0))
    assert float(ds) > 0  # 5.0 clips at qmax = 127: the step grows back


def test_bfloat16_input_keeps_its_dtype():
    x = jnp.linspace(-1, 1, 16, dtype=jnp.bfloat16)
    spec = qjax.QuantSpec("int4")
    y = lsq_fake_quant(x, spec, jnp.float32(0.1))
    assert y.dtype == jnp.bfloat16
    expected = qjax.fake_quant(x, spec, qparams=qjax.QParams(jnp.float32(0.1), None, None))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))
    assert (
        jax.grad(lambda x: jnp.sum(lsq_fake_quant(x, spec, 0.1)).astype(jnp.float32))(x).dtype
        == jnp.bfloat16
    )


def test_default_grad_scale_is_lsqs():
    assert default_grad_scale(64, "int4") == pytest.approx(1 / math.sqrt(64 * 7))
    assert default_grad_scale(10, "uint8:asymmetric") == pytest.approx(1 / math.sqrt(10 * 255))
    assert default_grad_scale(10, "uint8") == pytest.approx(1 / math.sqrt(10 * 127))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: lsq_fake_quant(jnp.ones(4), "float8_e4m3fn", 1.0), ValueError, "integer target"),
        (lambda: lsq_fake_quant(jnp.ones(4), "mxfp4:axis=-1", jnp.ones(1)), ValueError, "integer"),
        (
            lambda: lsq_fake_quant(jnp.ones((4, 2)), "int4:per_channel", jnp.ones(3)),
            ValueError,
            r"scale must have shape \(1, 2\)",
        ),
        (
            lambda: lsq_fake_quant(jnp.ones(4), "uint8:asymmetric", 1.0),
            ValueError,
            "give offset",
        ),
        (lambda: lsq_fake_quant(jnp.ones(4), "int8", 1.0, 0.0), ValueError, "offset=None"),
        (
            lambda: lsq_fake_quant(jnp.ones(4), "int8", 1.0, grad_scale=-1.0),
            ValueError,
            "grad_scale must be a positive number",
        ),
        (lambda: lsq_fake_quant(jnp.ones(4, jnp.int32), "int8", 1.0), TypeError, "floating"),
        (lambda: lsq_fake_quant(jnp.ones(4), "int8", jnp.ones((), jnp.int32)), TypeError, "scale"),
    ],
)
def test_bad_input_is_refused_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()


# Linen: intercept and the Quant layers ----------------------------------------------------

X = np.random.default_rng(3).normal(size=(8, 12)).astype(np.float32)
INT2 = qjax.QuantSpec("int2", granularity=qjax.per_channel(-1))


def _mlp():
    return nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])


def _init(model, rules, x=X):
    with qlinen.intercept(rules, strict=True):
        return model.init(jax.random.key(0), x)


def test_linen_lsq_rule_creates_the_scale_from_the_calibration():
    model = _mlp()
    variables = _init(model, {"layers_0": "int2:per_channel:lsq"})
    params = variables["params"]
    assert sorted(params["layers_0"]) == ["bias", "kernel", "kernel_scale"]
    assert sorted(params["layers_2"]) == ["bias", "kernel"]
    kernel = params["layers_0"]["kernel"]
    np.testing.assert_array_equal(
        params["layers_0"]["kernel_scale"], qjax.compute_qparams(kernel, INT2).scale
    )
    # Before any training, the learned model computes what the fixed-scale one does.
    plain = {k: v for k, v in params["layers_0"].items() if k != "kernel_scale"}
    fixed = qlinen.intercepted(model.apply, {"layers_0": "int2:per_channel"})
    learned = qlinen.intercepted(model.apply, {"layers_0": "int2:per_channel:lsq"})
    np.testing.assert_array_equal(
        jax.jit(learned)(variables, X),
        jax.jit(fixed)({"params": {**params, "layers_0": plain}}, X),
    )


def test_linen_kernel_scale_gradient_is_the_papers():
    model = nn.Dense(5)
    rules = {".*": "int2:per_channel:lsq"}
    variables = _init(model, rules)
    params = variables["params"]
    params = {**params, "kernel_scale": params["kernel_scale"] * 0.8}  # some values clip
    r = np.random.default_rng(4).normal(size=(8, 5)).astype(np.float32)
    apply = qlinen.intercepted(model.apply, rules)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply({"params": p}, X) * r)))(params)
    kernel = np.asarray(params["kernel"])
    ref = paper_lsq(
        kernel,
        X.T @ r,  # the kernel's cotangent: d sum(r * (x @ W)) / dW
        np.asarray(params["kernel_scale"]),
        None,
        qmin=-2,
        qmax=1,
        formulation="scale",
        asymmetric=False,
        block=(12, 1),
        g=1 / math.sqrt(12 * 1),
    )
    np.testing.assert_allclose(grads["kernel_scale"], ref["ds"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["kernel"], ref["dx"], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(grads["kernel_scale"]) != 0)


def test_linen_learned_input_scale_and_offset_lsq_plus():
    act = qlinen.ActQuant(qjax.QuantSpec("uint8", scheme="asymmetric"))
    quant = qlinen.LayerQuant(weight=INT2, act=act, learn_scale=True)
    model = qlinen.QuantDense(4, quant=quant)
    variables = model.init(jax.random.key(0), X)
    params = variables["params"]
    assert sorted(params) == ["bias", "input_offset", "input_scale", "kernel", "kernel_scale"]
    qp = qjax.compute_qparams(X, act.spec)  # the first batch's dynamic params
    assert params["input_scale"].shape == params["input_offset"].shape == ()
    np.testing.assert_array_equal(params["input_scale"], qp.scale)
    np.testing.assert_array_equal(params["input_offset"], qp.zero_point.astype(np.float32))
    # A wider batch clips at both ends: the offset and the scale take gradients.
    wide = 3 * X
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, wide) ** 2))(params)
    assert float(grads["input_offset"]) != 0 and float(grads["input_scale"]) != 0
    # The input is quantized with the learned params: change them, the output follows.
    moved = {**params, "input_scale": params["input_scale"] * 2}
    x_q = qjax.fake_quant(X, act.spec, qparams=qjax.QParams(qp.scale * 2, qp.zero_point, None))
    w_q = qjax.fake_quant(
        params["kernel"], INT2, qparams=qjax.compute_qparams(params["kernel"], INT2)
    )
    np.testing.assert_allclose(
        model.apply({"params": moved}, X),
        np.asarray(x_q @ w_q) + np.asarray(params["bias"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_linen_learned_per_channel_input_scale_fits_any_rank():
    act = qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)))
    model = qlinen.QuantDense(4, quant=qlinen.LayerQuant(act=act, learn_scale=True))
    variables = model.init(jax.random.key(0), X)
    assert variables["params"]["input_scale"].shape == (12,)
    out = model.apply(variables, X.reshape(2, 4, 12))
    np.testing.assert_array_equal(out.reshape(8, 4), model.apply(variables, X))


def test_linen_float_checkpoint_gets_its_learned_scales_from_a_mutable_apply():
    model = _mlp()
    float_vars = model.init(jax.random.key(0), X)
    rules = {".*": "int2:per_channel:lsq"}
    apply = qlinen.intercepted(model.apply, rules)
    with pytest.raises(
        ValueError,
        match=r"'layers_0' learns its scales .*no 'kernel_scale'.*"
        r"mutable=\['params'\]",
    ):
        apply(float_vars, X)
    _, new = apply(float_vars, X, mutable=["params"])
    for layer in ("layers_0", "layers_2"):
        kernel = float_vars["params"][layer]["kernel"]
        np.testing.assert_array_equal(
            new["params"][layer]["kernel_scale"], qjax.compute_qparams(kernel, INT2).scale
        )
        np.testing.assert_array_equal(new["params"][layer]["kernel"], kernel)


def test_linen_integer_dot_uses_the_learned_scales():
    w8 = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
    act = qlinen.ActQuant(qjax.QuantSpec("int8"))
    lsq = qlinen.LayerQuant(weight=w8, act=act, learn_scale=True)
    model = nn.Dense(4)
    variables = _init(model, {".*": lsq})
    params = variables["params"]
    params = {**params, "kernel_scale": params["kernel_scale"] * 0.5}
    fake = qlinen.intercepted(model.apply, {".*": lsq})({"params": params}, X)
    integer = dataclasses.replace(lsq, integer_dot=True)
    apply = qlinen.intercepted(model.apply, {".*": integer})
    np.testing.assert_allclose(apply({"params": params}, X), fake, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(apply({"params": p}, X)))(params)
    assert np.all(np.asarray(grads["kernel_scale"]) != 0)


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        ("mxfp4:lsq", "integer target"),
        ("float8_e4m3fn:per_channel:lsq", "integer target"),
        ("keep:lsq", "no scale to learn"),
        ("int8:lsq:lsq", "repeated"),
        ("lsq", "follows a spec"),
        (
            lambda: qlinen.LayerQuant(
                act=qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token())),
                learn_scale=True,
            ),
            "per_token",
        ),
    ],
)
def test_lsq_rules_that_cannot_apply_are_refused_naming_the_rule(rule, match):
    def build():
        value = rule() if callable(rule) else rule
        with qlinen.intercept({"layers_0": value}):
            _mlp().init(jax.random.key(0), X)

    with pytest.raises(ValueError, match=match):
        build()


def test_lsq_suffix_refused_without_a_spec_and_named_in_nnx():
    with pytest.raises(ValueError, match=r"rule 'layers/0': .*integer target"):
        qnnx.quantize(_nnx_mlp(), {"layers/0": "mxfp4:axis=-1:lsq"})
    with pytest.raises(ValueError, match="needs a weight or an activation spec"):
        qlinen.LayerQuant(learn_scale=True)


def test_linen_embed_learns_its_table_scale():
    model = nn.Embed(16, 8)
    ids = jnp.arange(6)
    variables = _init(model, {".*": "int4:per_channel:lsq"}, ids)
    table = variables["params"]["embedding"]
    spec = qjax.QuantSpec("int4", granularity=qjax.per_channel(0))  # one scale per row
    np.testing.assert_array_equal(
        variables["params"]["embedding_scale"], qjax.compute_qparams(table, spec).scale
    )


def test_plan_notes_learned_scales_and_labels_split_the_optimizer():
    import optax

    model = _mlp()
    rules = {"layers_0": "int2:per_channel:lsq", ".*": "int4"}
    plan = qlinen.plan(model, X, rules=rules)
    assert [row.note for row in plan.rows if row.spec is not None] == ["learned scales, LSQ", ""]
    assert "(learned scales, LSQ)" in str(plan)
    params = _init(model, rules)["params"]
    labels = param_labels(params)
    assert labels["layers_0"] == {"bias": "other", "kernel": "other", "kernel_scale": "lsq"}
    optimizer = optax.multi_transform({"other": optax.sgd(0.0), "lsq": optax.sgd(1.0)}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    assert float(jnp.abs(updates["layers_0"]["kernel"]).max()) == 0.0
    np.testing.assert_array_equal(updates["layers_0"]["kernel_scale"], -np.ones((1, 6)))


# NNX ---------------------------------------------------------------------------------------


def _nnx_mlp():
    return nnx.Sequential(
        nnx.Linear(12, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 3, rngs=nnx.Rngs(1))
    )


def test_nnx_learned_weight_scale_is_a_param_that_trains():
    import optax

    model = qnnx.quantize(_nnx_mlp(), {"layers/0": "int2:per_channel:lsq"}, strict=True)
    op = model.layers[0].dot_general
    kernel = model.layers[0].kernel[...]
    np.testing.assert_array_equal(op.weight_scale[...], qjax.compute_qparams(kernel, INT2).scale)
    fixed = qnnx.quantize(_nnx_mlp(), {"layers/0": "int2:per_channel"})
    np.testing.assert_array_equal(model(X), fixed(X))  # the same start
    r = np.random.default_rng(5).normal(size=(8, 3)).astype(np.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(X) * r))(model)
    ds = grads["layers"][0]["dot_general"]["weight_scale"][...]
    assert ds.shape == (1, 6) and np.all(np.asarray(ds) != 0)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int32 and floats
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        before = np.asarray(op.weight_scale[...])
        optimizer.update(model, grads)
    assert not np.array_equal(before, op.weight_scale[...])


def test_nnx_learned_input_scale_is_set_by_a_calibrating_call():
    act = qnnx.ActQuant(qjax.QuantSpec("uint8", scheme="asymmetric", formulation="minval"))
    quant = qnnx.LayerQuant(weight=INT2, act=act, learn_scale=True)
    model = qnnx.quantize(_nnx_mlp(), {"layers/0": quant}, strict=True)
    with pytest.raises(ValueError, match="calibrate"):
        model(X)
    qnnx.calibrate(model)
    nnx.jit(lambda m, x: m(x))(model, X)  # the first call sets the shape () values
    qnnx.calibrate(model, False)
    op = model.layers[0].dot_general
    qp = qjax.compute_qparams(X, act.spec)
    np.testing.assert_array_equal(op.input_scale[...], qp.scale.reshape(()))
    np.testing.assert_array_equal(op.input_offset[...], qp.minval.reshape(()))
    grads = nnx.grad(lambda m: jnp.sum(m(3 * X) ** 2))(model)
    g = grads["layers"][0]["dot_general"]
    assert float(g["input_scale"][...]) != 0 and float(g["input_offset"][...]) != 0
    out = nnx.jit(lambda m, x: m(x))(model, X)
    np.testing.assert_array_equal(out, model(X))


# Serving: convert and served use the learned values ------------------------------------------


def _trained_lsq_variables(model, rules):
    """Variables as if QAT had trained the learned params away from their calibration."""
    params = _init(model, rules)["params"]

    def move(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "scale" in name:
            return leaf * 0.7
        return leaf + 0.4 if "offset" in name else leaf

    return {"params": jax.tree_util.tree_map_with_path(move, params)}


@pytest.mark.parametrize(
    "rule",
    [
        "int2:per_channel:lsq",
        "int2:per_channel:mse:lsq",
        qlinen.LayerQuant(
            weight=qjax.QuantSpec("uint4", scheme="asymmetric", granularity=qjax.per_channel(-1)),
            act=qlinen.ActQuant(qjax.QuantSpec("uint8", scheme="asymmetric")),
            learn_scale=True,
        ),
    ],
    ids=["int2-weights", "int2-weights-mse-start", "lsq-plus-weights-and-inputs"],
)
def test_served_model_is_bit_exact_with_the_lsq_trained_one(rule):
    from qjax.flax import serve

    model, rules = _mlp(), {".*": rule}
    variables = _trained_lsq_variables(model, rules)
    want = jax.jit(qlinen.intercepted(model.apply, rules))(variables, X)
    served = serve.convert(variables, rules)
    kernel = served["params"]["layers_0"]["kernel"]
    assert isinstance(kernel, qjax.QArray)
    np.testing.assert_array_equal(
        np.asarray(kernel.scale), np.asarray(variables["params"]["layers_0"]["kernel_scale"])
    )
    got = jax.jit(serve.served(model.apply, rules))(served, X)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_served_integer_dots_use_the_learned_input_scale():
    from qjax.flax import serve

    quant = qlinen.LayerQuant(
        weight=qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)),
        act=qlinen.ActQuant(qjax.QuantSpec("int8")),
        learn_scale=True,
    )
    model, rules = nn.Dense(4), {".*": quant}
    variables = _trained_lsq_variables(model, rules)
    want = qlinen.intercepted(model.apply, rules)(variables, X)
    fn = serve.served(model.apply, rules, integer_dots="require")
    got = jax.jit(fn)(serve.convert(variables, rules), X)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# Calibrated starts --------------------------------------------------------------------------

UINT2_ASYM = qjax.QuantSpec("uint2", "asymmetric", "minval", granularity=qjax.per_channel(-1))


@pytest.mark.parametrize(
    "rule, spec, method",
    [
        ("int2:per_channel:mse:lsq", INT2, "mse"),
        ("int2:per_channel:lsq:mse", INT2, "mse"),  # the tokens in either order
        ("int2:per_channel:percentile=90:lsq", INT2, "percentile"),
        (
            qlinen.LayerQuant(
                weight=UINT2_ASYM, learn_scale=True, calibration=qjax.Calibration("mse")
            ),
            UINT2_ASYM,
            "mse",
        ),
    ],
    ids=["mse", "mse-after-lsq", "percentile", "LayerQuant-asymmetric-lsq+"],
)
def test_linen_learned_weight_scale_starts_from_the_rules_calibration(rule, spec, method):
    model = _mlp()
    variables = _init(model, {"layers_0": rule})
    layer = variables["params"]["layers_0"]
    kernel = layer["kernel"]
    expected = qjax.calibrate(kernel, spec, method, percentile=90.0)
    np.testing.assert_array_equal(layer["kernel_scale"], expected.scale)
    if spec.scheme == "asymmetric":  # LSQ+: the offset starts from the calibration too
        np.testing.assert_array_equal(layer["kernel_offset"], expected.minval)
    # Not the min-max start: at two bits the calibrated scales clip.
    assert np.all(np.asarray(layer["kernel_scale"]) <= qjax.compute_qparams(kernel, spec).scale)
    assert np.any(np.asarray(layer["kernel_scale"]) < qjax.compute_qparams(kernel, spec).scale)
    # Before training, the layer computes fake_quant with the calibrated params.
    dense = nn.Dense(6)
    learned = qlinen.intercepted(dense.apply, {".*": rule})
    y = jax.jit(learned)({"params": layer}, X)
    w_q = qjax.fake_quant(kernel, spec, qparams=expected)
    expected_y = X @ np.asarray(w_q) + np.asarray(layer["bias"])
    np.testing.assert_allclose(y, expected_y, rtol=1e-6, atol=1e-6)


def test_nnx_learned_weight_scale_starts_from_the_rules_calibration():
    model = qnnx.quantize(_nnx_mlp(), {"layers/0": "int2:per_channel:mse:lsq"}, strict=True)
    kernel = model.layers[0].kernel[...]
    np.testing.assert_array_equal(
        model.layers[0].dot_general.weight_scale[...], qjax.calibrate(kernel, INT2, "mse").scale
    )


def test_plan_names_the_calibrated_start():
    plan = qlinen.plan(_mlp(), X, rules={"layers_0": "int2:per_channel:mse:lsq", ".*": None})
    assert [row.note for row in plan.rows if row.spec is not None] == [
        "learned scales, LSQ, from mse"
    ]


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: qlinen.LayerQuant(weight=INT2, calibration=qjax.Calibration("mse")),
            ValueError,
            "sets where a learned weight scale starts.*learn_scale=True",
        ),
        (
            lambda: qlinen.LayerQuant(
                act=qlinen.ActQuant(qjax.QuantSpec("int8")),
                learn_scale=True,
                calibration=qjax.Calibration("mse"),
            ),
            ValueError,
            "needs a weight spec",
        ),
        (
            lambda: qlinen.LayerQuant(weight=INT2, learn_scale=True, calibration="mse"),
            TypeError,
            "must be a qjax.Calibration",
        ),
        (
            lambda: _init(_mlp(), {"layers_0": "int2:per_channel:mse"}),
            ValueError,
            "rule 'layers_0'.*calibration 'mse' in a QAT rule .*needs 'lsq' too "
            r"\('int2:per_channel:mse:lsq'\)",
        ),
        (
            lambda: _init(_mlp(), {"layers_0": "nf4:lsq"}),
            ValueError,
            "rule 'layers_0'.*lookup-table format",
        ),
        (
            lambda: _init(_mlp(), {"layers_0": "int2:mse:minmax:lsq"}),
            ValueError,
            "rule 'layers_0'",
        ),
    ],
)
def test_calibrated_starts_that_cannot_apply_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_nnx_lsq_model_converts_with_its_learned_scales():
    from qjax.flax import serve

    rules = {".*kernel": "int4:per_channel:lsq"}
    model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu)
    qnnx.quantize(model, rules)
    op = model.layers[0].dot_general
    op.weight_scale[...] = op.weight_scale[...] * 1.25  # as if trained: not min-max any more
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kernel = serve.convert({"params": params}, rules)["params"]["layers"][0]["kernel"]
    np.testing.assert_array_equal(kernel.scale, op.weight_scale[...])
    x = jax.random.normal(jax.random.key(1), (3, 32))
    bias = params["layers"][0]["bias"]
    served = jnp.maximum(x @ kernel.dequantize() + bias[None], 0)
    np.testing.assert_array_equal(served, model(x))  # the QAT forward, bit for bit
