"""GPTQ, AWQ and SmoothQuant on one weight (qjax.algorithms), against NumPy references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import algorithms
from qjax.algorithms import awq, gptq, smoothquant

INT4_32 = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32))
INT4_128 = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 128))
INT4_CHANNEL = qjax.QuantSpec("int4", granularity=qjax.per_channel(-1))
INT8_CHANNEL = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))


def correlated_layer(k=128, n=32, rows=512, seed=0, skew=None):
    """Inputs whose channels are mixed (so H has large off-diagonal terms), and a weight."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.4 * rng.standard_normal((k, k)) / np.sqrt(k) * 4
    x = rng.standard_normal((rows, k)) @ mix
    if skew is not None:
        x = x * skew
    w = rng.standard_normal((k, n))
    return x.astype(np.float32), w.astype(np.float32)


def output_error(x, w, w_hat):
    """||X W - X W_hat|| in float64."""
    x, w, w_hat = (np.asarray(a, np.float64) for a in (x, w, w_hat))
    return float(np.linalg.norm(x @ w - x @ w_hat))


def hessian(x):
    x = np.asarray(x, np.float64)
    return (x.T @ x).astype(np.float32)


def codes(qa):
    return np.asarray(qa.values.astype(jnp.float32))


# GPTQ -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        INT4_32,
        INT8_CHANNEL,
        qjax.QuantSpec("int8"),
        qjax.QuantSpec("int4", granularity=qjax.per_block(-1, 8)),  # blocks along the outputs
        qjax.QuantSpec("mxfp4"),
    ],
    ids=str,
)
def test_diagonal_hessian_gives_round_to_nearest(spec):
    # Uncorrelated inputs: no error is carried between rows, so GPTQ is RTN.
    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 32)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 4.0, 128)).astype(np.float32)
    qa = gptq(w, h, spec)
    rtn = qjax.quantize(w, spec)
    np.testing.assert_array_equal(codes(qa), codes(rtn))
    np.testing.assert_array_equal(np.asarray(qa.scale), np.asarray(rtn.scale))


MXFP4_INPUT = qjax.QuantSpec("mxfp4")  # blocks of 32 along the last axis: inputs of [out, in]


@pytest.mark.parametrize(
    ("spec", "layout"),
    [
        (INT4_32, "in_out"),
        (INT4_128, "in_out"),
        (qjax.QuantSpec("int2", granularity=qjax.per_block(-2, 32)), "in_out"),
        (qjax.QuantSpec("mxfp4"), "in_out"),
        (MXFP4_INPUT, "out_in"),
        (qjax.QuantSpec("float8_e4m3fn", granularity=qjax.per_channel(-1)), "in_out"),
        (INT8_CHANNEL, "in_out"),
        (qjax.QuantSpec("uint8", scheme="asymmetric", granularity=qjax.per_channel(-1)), "in_out"),
        (
            qjax.QuantSpec(
                "float8_e5m2", granularity=qjax.per_block(-2, 32), scale_dtype="bfloat16"
            ),
            "in_out",
        ),
        (
            qjax.QuantSpec(
                "int4", scheme="symmetric_with_clipping", granularity=qjax.per_block(-1, 8)
            ),
            "out_in",
        ),
        (
            qjax.QuantSpec(
                "uint4",
                scheme="asymmetric",
                formulation="minval",
                granularity=qjax.per_block(-2, 64),
            ),
            "in_out",
        ),
    ],
    ids=lambda v: str(v),
)
def test_gptq_beats_round_to_nearest_and_matches_quantize(spec, layout):
    x, w = correlated_layer(k=256 if spec == INT4_128 else 128)
    h = hessian(x)
    if layout == "out_in":  # PyTorch layout [out, in], contracted on the last axis
        w_used, axis = np.ascontiguousarray(w.T), -1
    else:
        w_used, axis = w, -2
    rows = algorithms.gptq_rows(w_used, h, spec, axis=axis)
    qa = gptq(w_used, h, spec, axis=axis)
    # The codes are what qjax.quantize gives for the updated rows and the chosen params,
    # and they dequantize to the loop's own values.
    again = qjax.quantize(rows.weights, spec, qparams=rows.qparams)
    np.testing.assert_array_equal(codes(qa), codes(again))
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), np.asarray(rows.dequantized))
    # Params of blocks that span all inputs come from the weight itself.
    if qjax.block_shape(w_used.shape, spec.granularity)[axis] == w_used.shape[axis]:
        np.testing.assert_array_equal(
            np.asarray(qa.scale), np.asarray(qjax.compute_qparams(w_used, spec).scale)
        )
    w_hat = np.asarray(qa.dequantize())
    rtn_hat = np.asarray(qjax.quantize(w_used, spec).dequantize())
    if layout == "out_in":
        w_hat, rtn_hat = w_hat.T, rtn_hat.T
    assert output_error(x, w, w_hat) < 0.9 * output_error(x, w, rtn_hat)


def numpy_gptq_int4_per_channel(w, h, damp):
    """The paper's algorithm, one row at a time, in float64: symmetric int4 per output
    channel (scale = amax / 7.5, q = clip(round(w / scale), -8, 7))."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    scale = np.maximum(np.abs(w).max(axis=0) / 7.5, np.finfo(np.float32).eps)
    scale = scale.astype(np.float32).astype(np.float64)
    q = np.zeros_like(w)
    for i in range(len(w)):
        q[i] = np.clip(np.round(w[i] / scale), -8, 7)
        err = (w[i] - q[i] * scale) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
    return q, scale


def test_gptq_matches_numpy_reference():
    x, w = correlated_layer(k=24, n=8, rows=64, seed=3)
    h = hessian(x)
    q_ref, scale_ref = numpy_gptq_int4_per_channel(w, h, damp=0.01)
    qa = gptq(w, h, INT4_CHANNEL, block_size=8)  # two blocks of 12 rows, chunks of 12
    np.testing.assert_allclose(np.asarray(qa.scale)[0], scale_ref, rtol=0)
    np.testing.assert_array_equal(codes(qa), q_ref)


def numpy_gptq_int2_groups(w, h, damp, group, block):
    """The reference (IST-DASLab's gptq.py) with quant groups, in float64: symmetric int2
    per ``group`` inputs of each output (scale = amax / 1.5, q = clip(round(w / s), -2, 1)),
    each group's scale taken from the rows as they were when their lazy ``block`` began."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64) + damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q, scales = np.zeros_like(w), []
    for i1 in range(0, len(w), block):
        at_start = w.copy()
        for i in range(i1, i1 + block):
            if i % group == 0:
                amax = np.abs(at_start[i : i + group]).max(axis=0).astype(np.float32)
                scale = np.maximum(amax / np.float32(1.5), np.finfo(np.float32).eps)
                scales.append(scale)
            q[i] = np.clip(np.round(w[i] / scale.astype(np.float64)), -2, 1)
            err = (w[i] - q[i] * scale) / u[i, i]
            w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
    return q, np.stack(scales)


def test_gptq_groups_take_their_scales_from_the_block_start_as_the_reference():
    # Scales from the rows already updated inside the block made int2 GPTQ worse than
    # round to nearest on inputs of uneven scale; Qwix and the reference take them here.
    rng = np.random.default_rng(7)
    skew = np.exp(rng.normal(size=32) * 0.7).astype(np.float32)
    x, w = correlated_layer(k=32, n=8, rows=256, seed=7, skew=skew)
    h = hessian(x)
    spec = qjax.QuantSpec("int2", granularity=qjax.per_block(-2, 8))
    q_ref, scale_ref = numpy_gptq_int2_groups(w, h, damp=0.01, group=8, block=16)
    qa = gptq(w, h, spec, block_size=16)  # lazy blocks of 16 rows, groups of 8
    np.testing.assert_allclose(np.asarray(qa.scale), scale_ref, rtol=1e-6)
    np.testing.assert_array_equal(codes(qa), q_ref)
    rtn = qjax.quantize(w, spec)
    assert output_error(x, w, qa.dequantize()) < output_error(x, w, rtn.dequantize())


def test_act_order_on_skewed_inputs():
    rng = np.random.default_rng(5)
    skew = np.exp(rng.uniform(-2.5, 2.5, 128)).astype(np.float32)
    x, w = correlated_layer(seed=5, skew=skew)
    h = hessian(x)
    plain = gptq(w, h, INT4_32, act_order=False)
    ordered = gptq(w, h, INT4_32, act_order=True)
    rtn = qjax.quantize(w, INT4_32)
    err = {
        name: output_error(x, w, qa.dequantize())
        for name, qa in [("plain", plain), ("ordered", ordered), ("rtn", rtn)]
    }
    assert err["ordered"] <= err["plain"] < err["rtn"], err
    # Static groups: the params come from the original weight.
    np.testing.assert_array_equal(np.asarray(ordered.scale), np.asarray(rtn.scale))
    rows = algorithms.gptq_rows(w, h, INT4_32, act_order=True)
    again = qjax.quantize(rows.weights, INT4_32, qparams=rows.qparams)
    np.testing.assert_array_equal(codes(ordered), codes(again))


def test_dead_inputs_are_zeroed():
    x, w = correlated_layer(rows=256, seed=7)
    dead = [3, 40, 41, 100]
    x[:, dead] = 0.0
    qa = gptq(w, hessian(x), INT4_32)
    w_hat = np.asarray(qa.dequantize())
    assert np.isfinite(w_hat).all()
    np.testing.assert_array_equal(w_hat[dead], 0.0)
    assert output_error(x, w, w_hat) < output_error(x, w, qjax.quantize(w, INT4_32).dequantize())


def test_hessian_not_positive_definite_explains_what_to_do():
    x, w = correlated_layer(rows=8, seed=9)  # 8 rows: rank 8 < k
    with pytest.raises(ValueError, match=r"not positive definite.*8 calibration rows.*damp"):
        gptq(w, hessian(x), INT4_32, damp=0.0, count=8)
    # The documented fallback: damping makes it usable.
    assert np.isfinite(np.asarray(gptq(w, hessian(x), INT4_32, damp=0.1).dequantize())).all()


def test_conv_kernel_with_tuple_axis():
    # Blocks of 4 input channels span all kernel positions: not contiguous in the
    # flattened (h, w, i) order, so GPTQ takes them one after the other.
    spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 4))
    rng = np.random.default_rng(11)
    kernel = rng.standard_normal((3, 3, 8, 16)).astype(np.float32)  # HWIO
    mix = np.eye(72) + 0.5 * rng.standard_normal((72, 72)) / np.sqrt(72) * 3
    patches = (rng.standard_normal((512, 72)) @ mix).astype(np.float32)  # im2col rows (h, w, i)
    rows = algorithms.gptq_rows(kernel, hessian(patches), spec, axis=(0, 1, 2))
    qa = gptq(kernel, hessian(patches), spec, axis=(0, 1, 2))
    assert qa.shape == kernel.shape
    again = qjax.quantize(rows.weights, spec, qparams=rows.qparams)
    np.testing.assert_array_equal(codes(qa), codes(again))
    flat = kernel.reshape(72, 16)
    rtn = qjax.quantize(kernel, spec).dequantize()
    assert output_error(patches, flat, np.asarray(qa.dequantize()).reshape(72, 16)) < (
        output_error(patches, flat, np.asarray(rtn).reshape(72, 16))
    )


def test_bfloat16_weight_keeps_its_dtype():
    x, w = correlated_layer(rows=256, seed=13)
    wb = jnp.asarray(w, jnp.bfloat16)
    qa = gptq(wb, hessian(x), INT4_32)
    assert qa.float_dtype == "bfloat16" and qa.dequantize().dtype == jnp.bfloat16
    rows = algorithms.gptq_rows(wb, hessian(x), INT4_32)
    np.testing.assert_array_equal(
        np.asarray(qa.dequantize()), np.asarray(rows.dequantized.astype(jnp.bfloat16))
    )


def test_jit_and_vmap_over_stacked_layers_equal_a_loop():
    layers = [correlated_layer(rows=256, seed=s) for s in (20, 21, 22)]
    ws = jnp.stack([w for _, w in layers])
    hs = jnp.stack([hessian(x) for x, _ in layers])
    stacked = jax.jit(jax.vmap(lambda w, h: gptq(w, h, INT4_32)))(ws, hs)
    for i, (x, w) in enumerate(layers):
        one = gptq(w, hessian(x), INT4_32)
        np.testing.assert_array_equal(codes(one), np.asarray(stacked.values[i], np.float32))
        np.testing.assert_array_equal(np.asarray(one.scale), np.asarray(stacked.scale[i]))


def test_gptq_bad_arguments_name_them():
    x, w = correlated_layer(k=32, n=8, rows=64)
    h = hessian(x)
    with pytest.raises(ValueError, match=r"hessian must be .* shape \(32, 32\)"):
        gptq(w, h[:16, :16], INT4_CHANNEL)
    with pytest.raises(ValueError, match="axis 5 is out of range"):
        gptq(w, h, INT4_CHANNEL, axis=5)
    with pytest.raises(TypeError, match="floating-point"):
        gptq(w.astype(np.int32), h, INT4_CHANNEL)
    with pytest.raises(ValueError, match=r"per_token.*activations"):
        gptq(w, h, qjax.QuantSpec("int8", granularity=qjax.per_token()))
    with pytest.raises(ValueError, match="rank >= 2"):
        gptq(w[:, 0], h, INT4_CHANNEL)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        gptq(w, h, INT4_CHANNEL, block_size=0)
    with pytest.raises(ValueError, match="damp must be"):
        gptq(w, h, INT4_CHANNEL, damp=-1.0)
    with pytest.raises(ValueError, match="spec does not fit"):
        gptq(w, h, qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 5)))


# AWQ ---------------------------------------------------------------------------------------


def outlier_layer(k=64, n=32, rows=256, seed=30):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, [2, 17, 50]] *= 20.0  # a few channels with large inputs
    w = rng.standard_normal((k, n)).astype(np.float32)
    return x, w, np.abs(x).mean(0)


def numpy_loss(w, w_hat, h):
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.trace(d.T @ np.asarray(h, np.float64) @ d))


def test_awq_alpha_zero_is_round_to_nearest():
    x, w, mean = outlier_layer()
    qa = awq(w, hessian(x), mean, INT4_32, grid=1)
    rtn = qjax.quantize(w, INT4_32)
    np.testing.assert_array_equal(codes(qa), codes(rtn))
    np.testing.assert_array_equal(np.asarray(qa.channel_scale), 1.0)
    found = algorithms.awq_search(w, hessian(x), mean, INT4_32, grid=1)
    assert float(found.alpha) == 0.0
    np.testing.assert_allclose(
        float(found.rtn_loss), numpy_loss(w, rtn.dequantize(), hessian(x)), rtol=1e-4
    )


def test_awq_lowers_the_loss_and_dequantizes_to_q_over_s():
    x, w, mean = outlier_layer()
    h = hessian(x)
    found = algorithms.awq_search(w, h, mean, INT4_32)
    assert float(found.loss) < float(found.rtn_loss)
    assert float(found.alpha) > 0
    s = np.asarray(found.scale)
    # The scale is mean|x| ** alpha over sqrt(max * min), computed independently.
    ref = mean.astype(np.float64) ** float(found.alpha)
    np.testing.assert_allclose(s, ref / np.sqrt(ref.max() * ref.min()), rtol=1e-5)
    qa = awq(w, h, mean, INT4_32)
    q = qjax.quantize(w * s[:, None], INT4_32)
    np.testing.assert_array_equal(codes(qa), codes(q))
    np.testing.assert_allclose(
        np.asarray(qa.dequantize()), np.asarray(q.dequantize()) / s[:, None], rtol=1e-6, atol=0
    )
    np.testing.assert_allclose(float(found.loss), numpy_loss(w, qa.dequantize(), h), rtol=1e-4)
    assert output_error(x, w, qa.dequantize()) < output_error(
        x, w, qjax.quantize(w, INT4_32).dequantize()
    )


def test_awq_shared_input_list():
    x, w, mean = outlier_layer()
    h = hessian(x)
    w2 = np.random.default_rng(31).standard_normal((64, 48)).astype(np.float32)
    specs = [INT4_32, INT8_CHANNEL]
    found = algorithms.awq_search([w, w2], h, mean, specs)
    s = np.asarray(found.scale)
    qas = awq([w, w2], h, mean, specs)
    assert isinstance(qas, list) and len(qas) == 2
    total = 0.0
    for wi, qa in zip([w, w2], qas):
        np.testing.assert_array_equal(np.asarray(qa.channel_scale)[:, 0], (1.0 / s))
        total += numpy_loss(wi, qa.dequantize(), h)
    np.testing.assert_allclose(float(found.loss), total, rtol=1e-4)
    rtn = sum(
        numpy_loss(wi, qjax.quantize(wi, sp).dequantize(), h) for wi, sp in zip([w, w2], specs)
    )
    np.testing.assert_allclose(float(found.rtn_loss), rtn, rtol=1e-4)
    assert float(found.loss) <= float(found.rtn_loss)


def test_awq_bad_arguments_name_them():
    x, w, mean = outlier_layer()
    h = hessian(x)
    with pytest.raises(ValueError, match="grid must be >= 1"):
        algorithms.awq_search(w, h, mean, INT4_32, grid=0)
    with pytest.raises(ValueError, match=r"mean_abs must be .* shape \(64,\)"):
        algorithms.awq_search(w, h, mean[:10], INT4_32)
    with pytest.raises(ValueError, match="input sizes"):
        algorithms.awq_search([w, w[:32]], h, mean, INT4_32)
    with pytest.raises(ValueError, match="2 specs for 1"):
        algorithms.awq_search([w], h, mean, [INT4_32, INT4_32])
    with pytest.raises(ValueError, match="s must be finite and > 0"):
        algorithms.scaled(w, np.zeros(64, np.float32), INT4_32)


# SmoothQuant -------------------------------------------------------------------------------


def test_smoothquant_preserves_the_product_and_flattens_outliers():
    x, w, _ = outlier_layer(seed=40)
    abs_max = np.abs(x).max(0)
    qa = smoothquant(w, abs_max, INT8_CHANNEL, alpha=0.5)
    s = np.asarray(algorithms.smoothquant_scale(w, abs_max, alpha=0.5), np.float64)
    ref = np.clip(np.sqrt(abs_max) / np.sqrt(np.abs(w).max(1)), 1e-5, 1e5)
    np.testing.assert_allclose(s, ref, rtol=1e-6)
    m = np.asarray(qa.channel_scale, np.float64)[:, 0]
    core = np.asarray(dataclasses.replace(qa, channel_scale=None).dequantize(), np.float64)
    # (x * m) @ dequant(Q) against x @ W: each weight is off by at most half a step.
    step = np.asarray(qa.scale, np.float64)[0]
    got = (x * m) @ core
    bound = (np.abs(x) * m) @ np.ones_like(core) * (step / 2) * (1 + 1e-5) + 1e-3
    assert (np.abs(got - x.astype(np.float64) @ w) <= bound).all()

    # Outlier ratio of the per-channel activation ranges: max over median.
    def ratio(a):
        r = np.abs(a).max(0)
        return r.max() / np.median(r)

    assert ratio(x * m) < ratio(x) / 3


def test_smoothquant_bad_arguments_name_them():
    x, w, _ = outlier_layer()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        smoothquant(w, np.abs(x).max(0), INT8_CHANNEL, alpha=1.5)
    with pytest.raises(ValueError, match=r"abs_max must be .* shape \(64,\)"):
        smoothquant(w, np.abs(x).max(0)[:3], INT8_CHANNEL)
    with pytest.raises(ValueError, match="axis -3 is out of range"):
        smoothquant(w, np.abs(x).max(0), INT8_CHANNEL, axis=-3)


def test_awq_and_smoothquant_vmap_over_stacked_layers_equal_a_loop():
    layers = [outlier_layer(n=16, rows=64, seed=s) for s in (50, 51)]
    ws = jnp.stack([w for _, w, _ in layers])
    hs = jnp.stack([hessian(x) for x, _, _ in layers])
    means = jnp.stack([m for _, _, m in layers])
    maxes = jnp.stack([np.abs(x).max(0) for x, _, _ in layers])
    spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 16))
    stacked_awq = jax.jit(jax.vmap(lambda w, h, m: awq(w, h, m, spec, grid=4)))(ws, hs, means)
    stacked_sq = jax.vmap(lambda w, m: smoothquant(w, m, INT8_CHANNEL))(ws, maxes)
    for i, (x, w, mean) in enumerate(layers):
        one = awq(w, hessian(x), mean, spec, grid=4)
        np.testing.assert_array_equal(codes(one), np.asarray(stacked_awq.values[i], np.float32))
        # exp / log vectorise differently under vmap: the scales may differ by an ulp.
        np.testing.assert_allclose(
            np.asarray(one.channel_scale), np.asarray(stacked_awq.channel_scale[i]), rtol=1e-6
        )
        sq = smoothquant(w, np.abs(x).max(0), INT8_CHANNEL)
        np.testing.assert_array_equal(codes(sq), np.asarray(stacked_sq.values[i], np.float32))


def test_gptq_refuses_a_tensor_scale_spec_clearly():
    w = jnp.ones((64, 32))
    with pytest.raises(ValueError, match=r"gptq: spec .*tensor scale \(NVFP4\).*mxfp4"):
        gptq(w, jnp.eye(64), "nvfp4:axis=-2")
