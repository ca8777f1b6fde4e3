"""Rules and layouts: RulePlan, quantize_tree with layouts, fallback, calibration, plan.

Reference scales are computed here with NumPy: symmetric int8 ``amax / 127.5`` and int4
``amax / 7.5`` over the block the layout calls for.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.resolve import RulePlan, report_unmatched

RNG = np.random.default_rng(0)


def normal(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def int8_rows(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 scale per row of a 2-D array: amax / 127.5."""
    return np.abs(w).max(axis=1, keepdims=True) / np.float32(127.5)


def int4_blocks(w: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Symmetric int4 scales of blocks of ``size`` along ``axis`` of a 2-D array, per index
    of the other axis (shape: the array's with ``axis`` divided by ``size``)."""
    moved = np.moveaxis(w, axis, 1)
    amax = np.abs(moved.reshape(moved.shape[0], -1, size)).max(axis=2)
    return np.moveaxis(amax / np.float32(7.5), 1, axis)


def scale(q: qjax.QArray) -> np.ndarray:
    return np.asarray(q.scale)


# Layout detection on realistic names.


class TestLayouts:
    def test_bert_pytorch_names_scale_rows_and_block_inputs(self):
        params = {
            "bert.embeddings.word_embeddings.weight": normal(250, 64),
            "bert.embeddings.position_ids": np.arange(64, dtype=np.int64)[None],
            "bert.embeddings.LayerNorm.weight": normal(64),
            "bert.encoder.layer.0.attention.self.query.weight": normal(96, 64),
            "bert.encoder.layer.0.attention.self.query.bias": normal(96),
        }
        q = qjax.quantize_tree(params, {".*": "int4:per_block:32"})
        emb = params["bert.embeddings.word_embeddings.weight"]
        query = params["bert.encoder.layer.0.attention.self.query.weight"]
        # [vocab, features]: blocks along the features, one row each (not along the vocab).
        np.testing.assert_array_equal(
            scale(q["bert.embeddings.word_embeddings.weight"]), int4_blocks(emb, 1, 32)
        )
        # Linear [out, in]: blocks along the input axis.
        np.testing.assert_array_equal(
            scale(q["bert.encoder.layer.0.attention.self.query.weight"]), int4_blocks(query, 1, 32)
        )
        for name in (
            "bert.embeddings.position_ids",
            "bert.embeddings.LayerNorm.weight",
            "bert.encoder.layer.0.attention.self.query.bias",
        ):
            assert not isinstance(q[name], qjax.QArray)

    def test_int8_per_channel_on_torch_linear_and_embedding_scales_rows(self):
        params = {
            "model.embed_tokens.weight": normal(300, 64),
            "model.o_proj.weight": normal(80, 64),
        }
        q = qjax.quantize_tree(params, {".*": "int8:per_channel"})
        for name, w in params.items():
            np.testing.assert_array_equal(scale(q[name]), int8_rows(w))

    def test_default_rules_on_a_llama_style_checkpoint(self):
        params = {
            "model.embed_tokens.weight": normal(128, 32),
            "model.layers.0.self_attn.q_proj.weight": normal(64, 32),
            "model.layers.0.input_layernorm.weight": normal(32),
            "model.norm.weight": normal(32),
            "lm_head.weight": normal(128, 32),
        }
        q = qjax.quantize_tree(params)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            np.testing.assert_array_equal(scale(q[name]), int8_rows(params[name]))
        q_proj = "model.layers.0.self_attn.q_proj.weight"
        np.testing.assert_array_equal(scale(q[q_proj]), int8_rows(params[q_proj]))
        for name in ("model.layers.0.input_layernorm.weight", "model.norm.weight"):
            assert not isinstance(q[name], qjax.QArray)
        rows = {row.path: row for row in qjax.plan(params)}
        assert rows["lm_head.weight"].layout == "torch"
        assert rows["model.norm.weight"].note == "1-D"

    def test_gpt2_conv1d_weights_are_in_out(self):
        params = {
            "h.0.attn.c_attn.weight": normal(64, 192),
            "h.0.mlp.c_fc.weight": normal(64, 256),
            "wte.weight": normal(200, 64),
        }
        q = qjax.quantize_tree(params, {".*": "int8:per_channel"})
        for name in ("h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"):
            w = params[name]
            np.testing.assert_array_equal(scale(q[name]), int8_rows(w.T).T)  # per column
        np.testing.assert_array_equal(scale(q["wte.weight"]), int8_rows(params["wte.weight"]))

    @pytest.mark.parametrize("c_attn_rows", [192, 96])  # Qwen-1 [3d, d]; GPTBigCode [d + 2hd, d]
    def test_gpt2_named_linear_weights_are_out_in(self, c_attn_rows):
        # nn.Linear weights under GPT-2's names: the tree's c_attn [more outputs, d] tells.
        params = {
            "transformer.h.0.attn.c_attn.weight": normal(c_attn_rows, 64),
            "transformer.h.0.attn.c_proj.weight": normal(64, 64),
            "transformer.h.0.mlp.c_fc.weight": normal(256, 64),
            "transformer.h.0.mlp.c_proj.weight": normal(64, 256),
        }
        q = qjax.quantize_tree(params, {".*": "int8:per_channel"})
        for name, w in params.items():
            np.testing.assert_array_equal(scale(q[name]), int8_rows(w))  # per output row
        rows = {row.path: row for row in qjax.plan(params, {".*": "int4:per_block:32"})}
        assert all(row.spec.granularity.axis == 1 for row in rows.values())  # along inputs

    def test_other_torch_weight_names_are_out_in(self):
        params = {
            "encoder.layers.0.self_attention.in_proj_weight": normal(192, 64),
            "encoder.pos_conv.weight_v": normal(96, 6, 128),  # weight norm [out, in/g, k]
            "blocks.0.fc.weight_orig": normal(64, 128),  # pruning
            "blocks.1.fc.parametrizations.weight.original1": normal(64, 128),
        }
        q = qjax.quantize_tree(params, {".*": "int8:per_channel"})
        for name, w in params.items():
            rows = int8_rows(w.reshape(w.shape[0], -1)).reshape((-1,) + (1,) * (w.ndim - 1))
            np.testing.assert_array_equal(scale(q[name]), rows)
        assert {row.layout for row in qjax.plan(params, {".*": "int8"})} == {"torch"}

    def test_a_jax_name_ending_in_weight_is_not_read_as_torch(self):
        rows = qjax.plan({"moe": {"router_weight": normal(512, 64)}}, {".*": "int4:per_block:32"})
        assert rows[0].layout == "other" and rows[0].spec.granularity.axis == -2

    def test_gpt2_layouts_are_told_per_framework_in_one_tree(self):
        # A PyTorch GPT-2 (Conv1D [in, out]) beside transformers' Flax one ([out, in]).
        tree = {
            "teacher.h.0.attn.c_attn.weight": normal(64, 192),
            "teacher.h.0.mlp.c_fc.weight": normal(64, 256),
            "student": {
                "attn": {"c_attn": {"kernel": normal(192, 64)}},
                "mlp": {"c_fc": {"kernel": normal(256, 64)}},
            },
        }
        rows = qjax.plan(tree, {".*": "int8:per_channel"})
        axes = {row.path: row.spec.granularity.axis for row in rows}
        assert axes["teacher.h.0.attn.c_attn.weight"] == -1  # per output column
        assert axes["student/attn/c_attn/kernel"] == 0  # per output row
        assert axes["student/mlp/c_fc/kernel"] == 0

    def test_torch_conv_blocks_span_the_kernel_window_per_output_channel(self):
        w = normal(16, 64, 3, 3)  # [out, in, kh, kw]
        q = qjax.quantize_tree({"features.0.weight": w}, {".*": "int4:per_block:32"})
        amax = np.abs(w.reshape(16, 2, 32, 3, 3)).max(axis=(2, 3, 4))
        np.testing.assert_array_equal(
            scale(q["features.0.weight"]), (amax / np.float32(7.5))[:, :, None, None]
        )

    def test_flax_model_kernels_embedding_and_conv(self):
        class Model(nn.Module):
            @nn.compact
            def __call__(self, tokens):
                x = nn.Embed(300, 64)(tokens)
                x = nn.Conv(16, (3,))(x)
                return nn.Dense(96)(x)

        params = Model().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        q = qjax.quantize_tree(params, {".*": "int4:per_block:32"})
        dense = np.asarray(params["Dense_0"]["kernel"])  # [in=16, out=96]: 16 < 32
        # Blocks along the input axis do not fit 16 inputs: the per-channel fallback.
        np.testing.assert_array_equal(
            scale(q["Dense_0"]["kernel"]),
            np.abs(dense).max(axis=0, keepdims=True) / np.float32(7.5),
        )
        emb = np.asarray(params["Embed_0"]["embedding"])
        np.testing.assert_array_equal(scale(q["Embed_0"]["embedding"]), int4_blocks(emb, 1, 32))
        conv = np.asarray(params["Conv_0"]["kernel"])  # [3, in=64, out=16]
        amax = np.abs(conv.reshape(3, 2, 32, 16)).max(axis=(0, 2))
        np.testing.assert_array_equal(scale(q["Conv_0"]["kernel"]), (amax / np.float32(7.5))[None])

    def test_forced_layouts_override_the_names(self):
        w = normal(64, 96)
        for layout, axis in (("flax", 0), ("torch", 1), ("auto", 1)):
            q = qjax.quantize_tree({"fc.weight": w}, {".*": "int4:per_block:32"}, layout=layout)
            np.testing.assert_array_equal(scale(q["fc.weight"]), int4_blocks(w, axis, 32))
        q = qjax.quantize_tree({"fc/kernel": w}, {".*": "int8:per_channel"}, layout="torch")
        np.testing.assert_array_equal(scale(q["fc/kernel"]), int8_rows(w))
        specs = qjax.leaf_specs({"fc/kernel": w}, {".*": "int8:per_channel"}, layout="torch")
        assert specs["fc/kernel"] == q["fc/kernel"].spec

    def test_names_without_a_layout_are_read_as_flax_kernels(self):
        plan = RulePlan({".*": "int8:per_channel"})
        r = plan.resolve("w", (64, 32), "float32")
        assert r.layout == "other" and r.spec.granularity == qjax.per_channel(-1)

    def test_explicit_axis_and_spec_objects_are_used_as_given(self):
        spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(1))
        plan = RulePlan({"a.*": "int8:per_channel:axis=1", "b.*": spec})
        for name in ("a.weight", "b.weight"):
            assert plan.resolve(name, (64, 32), "float32").spec == spec

    def test_mx_shorthand_blocks_along_the_contraction_axis(self):
        plan = RulePlan({".*": "mxfp4"})
        flax_spec = plan.resolve("Dense_0/kernel", (64, 32), "float32").spec
        torch_spec = plan.resolve("fc.weight", (32, 64), "float32").spec
        assert flax_spec.granularity.block_shape((64, 32)) == (32, 1)
        assert torch_spec.granularity.block_shape((32, 64)) == (1, 32)
        assert flax_spec.scale_dtype == torch_spec.scale_dtype == "float8_e8m0fnu"

    def test_rules_match_dotted_names_with_slashes_or_dots(self):
        params = {"encoder.query.weight": normal(64, 64), "encoder.key.weight": normal(64, 64)}
        q = qjax.quantize_tree(params, {".*query/weight": "int8", r".*key\.weight": "int4"})
        assert q["encoder.query.weight"].spec.dtype == "int8"
        assert q["encoder.key.weight"].spec.dtype == "int4"


# Fallback when a block does not fit.


class TestFallback:
    def test_three_channel_input_conv_falls_back_per_channel(self):
        w = normal(64, 3, 7, 7)  # torch [out, in=3, kh, kw]
        params = {"conv1.weight": w}
        q = qjax.quantize_tree(params, {".*": "int4:per_block:32"})
        amax = np.abs(w).max(axis=(1, 2, 3))
        np.testing.assert_array_equal(
            scale(q["conv1.weight"]), (amax / np.float32(7.5))[:, None, None, None]
        )
        (row,) = qjax.plan(params, {".*": "int4:per_block:32"})
        assert row.note == "fallback per_channel(axis=0): block 32 does not divide axis 1 (size 3)"
        assert row.spec == qjax.QuantSpec("int4", granularity=qjax.per_channel(0))

    def test_flax_conv_fallback_is_per_output_channel(self):
        w = normal(7, 7, 3, 32)  # HWIO
        q = qjax.quantize_tree({"Conv_0": {"kernel": w}}, {".*": "int4:per_block:32"})
        expected = qjax.quantize(w, qjax.QuantSpec("int4", granularity=qjax.per_channel(-1)))
        np.testing.assert_array_equal(q["Conv_0"]["kernel"].data, expected.data)
        np.testing.assert_array_equal(q["Conv_0"]["kernel"].scale, expected.scale)

    def test_without_fallback_the_error_names_the_tensor_and_the_axis_that_fits(self):
        params = {"conv1.weight": normal(64, 3, 7, 7)}
        with pytest.raises(ValueError, match=r"'conv1.weight'.*divides axis 0 \(size 64\)"):
            qjax.quantize_tree(params, {".*": "int4:per_block:32"}, fallback=None)
        with pytest.raises(ValueError, match=r"choose a block size that divides 3"):
            qjax.quantize_tree(params, {".*": "int4:per_block:32"}, fallback=None)

    def test_no_axis_fits_says_so_without_naming_one(self):
        with pytest.raises(ValueError, match=r"does not divide axis 0 \(size 40\); or choose"):
            RulePlan({".*": "int4:per_block:32:axis=0"}, fallback=None).resolve(
                "w", (40, 48), "float32"
            )

    def test_mx_fallback_keeps_the_element_type_and_power_of_two_scales(self):
        r = RulePlan({".*": "mxfp4"}).resolve("Dense_0/kernel", (48, 64), "float32")
        assert r.spec.granularity == qjax.per_channel(-1)
        assert (r.spec.dtype, r.spec.scale_dtype) == ("float4_e2m1fn", "float8_e8m0fnu")
        assert r.note.startswith("fallback per_channel(axis=-1)")


# Rules that match nothing.


DENSE = {"Dense_0": {"kernel": jnp.ones((64, 64))}}


class TestUnmatched:
    def test_warns_by_default_and_names_the_rule(self):
        with pytest.warns(qjax.QjaxRuleWarning, match=r"quantize_tree: rule '.\*kernal'"):
            q = qjax.quantize_tree(DENSE, {".*kernal": "int8"})
        assert not isinstance(q["Dense_0"]["kernel"], qjax.QArray)

    def test_strict_raises(self):
        with pytest.raises(ValueError, match=r"rule '.\*kernal' matched nothing"):
            qjax.quantize_tree(DENSE, {".*kernal": "int8"}, strict=True)

    def test_a_rule_shadowed_by_an_earlier_one_is_reported(self):
        with pytest.warns(qjax.QjaxRuleWarning, match=r"'.\*/kernel'"):
            qjax.quantize_tree(DENSE, {".*Dense.*": None, ".*/kernel": "int8"})

    def test_catch_alls_and_defaults_are_not_reported(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            qjax.quantize_tree(DENSE, {".*kernel": "int8", ".*": None})
            qjax.quantize_tree({"bias": jnp.ones(3)})
            qjax.quantize_tree({}, {".*": "int8"})

    def test_plan_and_leaf_specs_report_too(self):
        for fn in (qjax.plan, qjax.leaf_specs):
            with pytest.warns(qjax.QjaxRuleWarning, match="nope"):
                fn(DENSE, {"nope": "int8"})

    def test_report_lists_every_pattern_once(self):
        with pytest.raises(ValueError, match=r"^--rule: rules 'a', 'b' matched nothing"):
            report_unmatched(["a", "b"], strict=True, where="--rule")
        report_unmatched([], strict=True, where="--rule")  # nothing to say

    def test_rule_plan_tracks_use_across_calls(self):
        plan = RulePlan({"a.*": "int8", "b.*": "int4"})
        plan.resolve("a/kernel", (64, 64), "float32")
        assert plan.unmatched() == ["b.*"]
        plan.resolve("b.weight", (4,), "int32")  # matched, even though it stays as it is
        assert plan.unmatched() == []


# min_size and rank: catch-alls skip, named leaves are quantized.


class TestMinSizeAndRank:
    def test_a_rule_naming_a_small_kernel_quantizes_it(self):
        params = {"head": {"kernel": normal(16, 10), "bias": normal(10)}}
        q = qjax.quantize_tree(params, {".*head/kernel": "int8:per_channel"})
        np.testing.assert_array_equal(
            scale(q["head"]["kernel"]), int8_rows(params["head"]["kernel"].T).T
        )

    def test_catch_all_and_default_rules_skip_small_leaves_with_a_note(self):
        params = {"head": {"kernel": normal(16, 10)}}
        for rules in (None, {".*": "int8"}):
            with pytest.warns(qjax.QjaxRuleWarning, match=r"quantized nothing.*1 under min_size"):
                q = qjax.quantize_tree(params, rules)
            assert not isinstance(q["head"]["kernel"], qjax.QArray)
            with pytest.raises(ValueError, match="quantized nothing"):
                qjax.quantize_tree(params, rules, strict=True)
            (row,) = qjax.plan(params, rules)
            assert row.note == "below min_size 1024"

    def test_min_size_boundary(self):
        params = {"a": normal(32, 32), "b": normal(31, 33)}  # 1024 and 1023 elements
        q = qjax.quantize_tree(params, {".*": "int8"})
        assert isinstance(q["a"], qjax.QArray) and not isinstance(q["b"], qjax.QArray)
        assert isinstance(
            qjax.quantize_tree(params, {".*": "int8"}, min_size=1023)["b"], qjax.QArray
        )

    def test_bare_catch_all_skips_1d_leaves_unless_named(self):
        params = {
            "dense": {"kernel": normal(64, 64), "bias": normal(2048)},
            "norm": {"scale": normal(2048)},
        }
        q = qjax.quantize_tree(params, {".*": "int8"}, min_size=0)
        assert isinstance(q["dense"]["kernel"], qjax.QArray)
        assert not isinstance(q["dense"]["bias"], qjax.QArray)
        assert not isinstance(q["norm"]["scale"], qjax.QArray)
        q = qjax.quantize_tree(params, {".*bias": "int8", ".*": "int8"})
        np.testing.assert_array_equal(
            scale(q["dense"]["bias"]), np.abs(params["dense"]["bias"]).max(keepdims=True) / 127.5
        )
        assert not isinstance(q["norm"]["scale"], qjax.QArray)

    def test_rules_that_do_not_name_them_leave_stacked_biases_and_norm_scales_float(self):
        params = {  # nn.scan-stacked: [layers, features]
            "Scan_0": {
                "LayerNorm_0": {"scale": normal(12, 256)},
                "Dense_0": {"kernel": normal(12, 256, 256), "bias": normal(12, 256)},
            },
            "experts.gate_up_proj_bias": normal(8, 512),
        }
        for rules in ({".*": "int8"}, {"Scan_0/.*": "int8", "experts.*": "int8"}):
            q = qjax.quantize_tree(params, rules)
            assert isinstance(q["Scan_0"]["Dense_0"]["kernel"], qjax.QArray)
            for leaf in (q["Scan_0"]["LayerNorm_0"]["scale"], q["Scan_0"]["Dense_0"]["bias"]):
                assert not isinstance(leaf, qjax.QArray)
            assert not isinstance(q["experts.gate_up_proj_bias"], qjax.QArray)
        notes = {row.path: row.note for row in qjax.plan(params, {".*": "int8"})}
        assert notes["Scan_0/LayerNorm_0/scale"] == "a scale (name it to quantize it)"
        named = qjax.quantize_tree(params, {".*LayerNorm_0/scale": "int8"})
        assert isinstance(named["Scan_0"]["LayerNorm_0"]["scale"], qjax.QArray)

    def test_a_rule_naming_a_group_skips_its_1d_leaves_as_qat_does(self):
        params = {
            "params": {
                "dense": {"kernel": normal(16, 8), "bias": normal(8)},
                "ln": {"scale": normal(8)},
            },
            "torch.fc.weight": normal(8, 16),
            "torch.fc.bias": normal(8),
        }
        for rules in ({"params/.*": "int8", "torch.*": "int8"}, {".*(dense|ln|fc).*": "int8"}):
            q = qjax.quantize_tree(params, rules)  # small kernels too: the rules name them
            assert isinstance(q["params"]["dense"]["kernel"], qjax.QArray)
            assert isinstance(q["torch.fc.weight"], qjax.QArray)
            assert not isinstance(q["params"]["dense"]["bias"], qjax.QArray)
            assert not isinstance(q["params"]["ln"]["scale"], qjax.QArray)
            assert not isinstance(q["torch.fc.bias"], qjax.QArray)
            notes = {row.path: row.note for row in qjax.plan(params, rules)}
            assert notes["params/ln/scale"] == notes["torch.fc.bias"] == "1-D"
        q = qjax.quantize_tree(params, {"params/ln/scale": "int8", "torch.fc.b.*": "int8"})
        assert isinstance(q["params"]["ln"]["scale"], qjax.QArray)  # named: quantized
        assert isinstance(q["torch.fc.bias"], qjax.QArray)

    def test_a_rule_naming_1d_leaves_blocks_them_or_falls_back_per_tensor(self):
        bias, odd = normal(64), normal(40)
        q = qjax.quantize_tree({"fc.bias": bias, "ln.bias": odd}, {".*bias": "int4:per_block:32"})
        amax = np.abs(bias.reshape(2, 32)).max(axis=1)
        np.testing.assert_array_equal(scale(q["fc.bias"]), amax / np.float32(7.5))
        np.testing.assert_array_equal(scale(q["ln.bias"]), np.abs(odd).max(keepdims=True) / 7.5)
        (_, row) = qjax.plan({"fc.bias": bias, "ln.bias": odd}, {".*bias": "int4:per_block:32"})
        assert row.note == "fallback per_tensor: block 32 does not divide axis 0 (size 40)"

    def test_other_catch_all_spellings_behave_like_dot_star(self):
        params = {"bias": normal(2048), "kernel": normal(64, 64)}
        for pattern in (".+", "(.*)", "(?:.*/)?.*"):
            q = qjax.quantize_tree(params, {pattern: "int8"})
            assert isinstance(q["kernel"], qjax.QArray) and not isinstance(q["bias"], qjax.QArray)

    def test_default_rules_passed_explicitly_equal_the_default(self):
        params = {"a": {"kernel": normal(16, 16)}, "b": {"kernel": normal(64, 64)}}
        for path, spec in qjax.leaf_specs(params, qjax.default_rules()).items():
            assert spec == qjax.leaf_specs(params)[path]
        assert qjax.leaf_specs(params)["a/kernel"] is None


# Calibration per rule.


class TestStackedLayers:
    """``stack=N``: the first N axes stack copies of a layer (scan layers, fused experts)."""

    experts = np.stack([normal(64, 96) * m for m in (1.0, 0.05, 30.0)])  # [experts, in, out]

    def test_each_copy_gets_its_own_scales_in_its_own_layout(self):
        tree = {"mlp.experts.gate_up_proj": self.experts, "mlp.experts.down.weight": self.experts}
        rules = {".*gate_up_proj": "int4:per_block:32:stack=1", ".*": "int8:per_channel:stack=1"}
        q = qjax.quantize_tree(tree, rules)
        flax_like, torch_like = q["mlp.experts.gate_up_proj"], q["mlp.experts.down.weight"]
        for e, w in enumerate(self.experts):
            np.testing.assert_array_equal(scale(flax_like)[e], int4_blocks(w, 0, 32))
            np.testing.assert_array_equal(scale(torch_like)[e], int8_rows(w))  # [out, in]
            codes = np.clip(np.rint(w / int8_rows(w)), -128, 127)
            np.testing.assert_array_equal(np.asarray(torch_like.codes())[e], codes)
        rows = {r.path: r for r in qjax.plan(tree, rules)}
        assert str(qjax.plan(tree, rules)).count(":stack=1") == 2
        assert rows["mlp.experts.down.weight"].stack == 1

    def test_without_stack_the_copies_share_scales(self):
        q = qjax.quantize_tree({"experts.kernel": self.experts}, {".*": "int8:per_channel"})
        assert scale(q["experts.kernel"]).shape == (1, 1, 96)  # why stack= exists

    def test_file_round_trip_on_the_command_line(self, tmp_path, capsys):
        from safetensors.numpy import save_file

        from qjax.cli import main

        source, out = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
        save_file({"experts.gate_up_proj": self.experts}, source)
        rule = ".*=int8:per_channel:stack=1"
        assert main(["quantize", str(source), str(out), "-q", "--rule", rule]) == 0
        (loaded,) = qjax.load_tensors(out).values()
        for e, w in enumerate(self.experts):
            np.testing.assert_array_equal(scale(loaded)[e], int8_rows(w.T).T)

    def test_a_stacked_gpt2_c_proj_is_read_from_its_stacked_c_attn(self):
        tree = {  # FlaxConv1D kernels [out, in], nn.scan-stacked
            "h/attn/c_attn/kernel": normal(2, 192, 64),
            "h/attn/c_proj/kernel": normal(2, 64, 64),
        }
        q = qjax.quantize_tree(tree, {".*": "int8:per_channel:stack=1"})
        for layer, w in enumerate(tree["h/attn/c_proj/kernel"]):
            np.testing.assert_array_equal(scale(q["h/attn/c_proj/kernel"])[layer], int8_rows(w))

    def test_a_catch_all_with_stack_skips_what_it_cannot_stack(self):
        tree = {"layers.kernel": self.experts, "final_norm.scale": normal(96), "step": np.int32(1)}
        q = qjax.quantize_tree(tree, {".*": "int8:per_channel:stack=1"})
        assert isinstance(q["layers.kernel"], qjax.QArray)
        assert not isinstance(q["final_norm.scale"], qjax.QArray)

    def test_stacked_specs_count_axes_from_the_end(self):
        q = qjax.quantize_tree({"experts.weight": self.experts}, {".*": "int8:per_channel:stack=1"})
        assert q["experts.weight"].spec.granularity.axis == -2  # [out, in] in each copy

    @pytest.mark.parametrize(
        ("rules", "message"),
        [
            ({".*": "int8:stack=0"}, "must count 1 or more"),
            ({".*": "nf4:stack=1"}, "cannot read 'stack=1'"),
            ({"experts.kernel": "int8:per_channel:stack=3"}, "leaves none of its axes"),
        ],
    )
    def test_bad_stacks_are_named(self, rules, message):
        with pytest.raises(ValueError, match=message):
            qjax.quantize_tree({"experts.kernel": self.experts}, rules)

    def test_quantspecs_qat_and_calibrated_methods_refuse_it(self):
        with pytest.raises(ValueError, match="belongs in a quantize_tree or command-line rule"):
            qjax.parse_spec("int8:stack=1")
        from qjax.flax import linen as qlinen

        with pytest.raises(ValueError, match="QAT, convert and serving see the layers"):
            qlinen.intercepted(nn.Dense(4).apply, {".*": "int8:per_channel:stack=1"})
        x = jnp.ones((4, 64))
        stats = qjax.capture.accumulate(lambda p, x: x @ p["w"][0], {"w": self.experts}, [x])
        with pytest.raises(ValueError, match="drop stack= from the rule"):
            qjax.quantize_tree(
                {"w": self.experts},
                {"w": "int8:per_channel:stack=1"},
                method="gptq",
                statistics=stats,
            )


class TestCalibration:
    w = normal(64, 64)
    w[0] = 25.0  # an outlier in every block

    @pytest.mark.parametrize(
        ("token", "method", "kwargs"),
        [("mse", "mse", {}), ("percentile=99.5", "percentile", {"percentile": 99.5})],
    )
    def test_shorthand_equals_calibrate_then_quantize(self, token, method, kwargs):
        params = {"Dense_0": {"kernel": self.w}}
        q = qjax.quantize_tree(params, {".*": f"int4:per_block:32:{token}"})["Dense_0"]["kernel"]
        spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32))
        expected = qjax.quantize(
            self.w, spec, qparams=qjax.calibrate(self.w, spec, method, **kwargs)
        )
        np.testing.assert_array_equal(q.data, expected.data)
        np.testing.assert_array_equal(q.scale, expected.scale)
        plain = qjax.quantize(self.w, spec)
        assert not np.array_equal(q.scale, plain.scale)  # the calibration did something

    def test_minmax_is_what_quantize_does(self):
        q = qjax.quantize_tree({"k": self.w}, [".*=int8:per_channel:minmax"])["k"]
        expected = qjax.quantize(self.w, qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)))
        np.testing.assert_array_equal(q.data, expected.data)
        np.testing.assert_array_equal(q.scale, expected.scale)

    def test_calibration_under_jit_equals_eager(self):
        params = {"kernel": self.w}
        rules = {".*": "int4:per_block:32:mse"}
        eager = qjax.quantize_tree(params, rules)
        jitted = jax.jit(lambda p: qjax.quantize_tree(p, rules))(params)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            np.testing.assert_array_equal(a, b)

    def test_leaf_rule_objects_carry_a_calibration(self):
        rule = qjax.LeafRule(
            qjax.QuantSpec("int8", granularity=qjax.per_channel(-1)), qjax.Calibration("mse")
        )
        q = qjax.quantize_tree({"k": self.w}, {".*": rule})["k"]
        expected = qjax.quantize(
            self.w, rule.spec, qparams=qjax.calibrate(self.w, rule.spec, "mse")
        )
        np.testing.assert_array_equal(q.scale, expected.scale)


# Finite checks after the float32 cast.


class TestFinite:
    def test_float64_beyond_float32_is_refused_naming_the_leaf(self):
        w = np.ones((64, 64), np.float64)
        w[3, 3], w[5, 5] = 1e39, -3.5e38
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no numpy overflow warning on the way
            with pytest.raises(
                ValueError, match=r"'enc/kernel' \(shape \(64, 64\)\) has 2 NaN or inf"
            ):
                qjax.quantize_tree({"enc": {"kernel": w}}, {".*": "int8"})
            counts = qjax.count_nonfinite({"w": w, "ok": np.float64(3e38), "i": np.arange(3)})
        assert {k: int(v) for k, v in counts.items()} == {"w": 2, "ok": 0, "i": 0}

    def test_float64_within_float32_range_quantizes(self):
        w = np.linspace(-3e38, 3e38, 64 * 64).reshape(64, 64)
        q = qjax.quantize_tree({"k": w}, {".*": "int8"})["k"]
        assert np.isfinite(np.asarray(q.scale)).all()


# plan(): what the rules will do.


class TestPlan:
    def test_rows_of_a_flax_model_from_shapes_only(self):
        model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32)))
        rows = qjax.plan(shapes, {".*layers_2.*": None, ".*kernel": "int4:per_block:32"})
        by_path = {r.path: r for r in rows}
        assert set(by_path) == {
            "params/layers_0/bias",
            "params/layers_0/kernel",
            "params/layers_2/bias",
            "params/layers_2/kernel",
        }
        k = by_path["params/layers_0/kernel"]
        assert (k.shape, k.dtype, k.layout, k.pattern) == ((32, 64), "float32", "flax", ".*kernel")
        assert k.spec == qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 32))
        assert by_path["params/layers_2/kernel"].note == "kept float by the rule"
        assert by_path["params/layers_0/bias"].note == "no rule matches"
        text = str(rows)
        assert text.splitlines()[0].split() == [
            "path",
            "shape",
            "dtype",
            "layout",
            "spec",
            "rule",
            "note",
        ]
        assert "int4:per_block:32:axis=-2" in text and len(text.splitlines()) == 5

    def test_quantized_and_non_array_leaves(self):
        q = qjax.quantize(jnp.ones((4, 4)), qjax.QuantSpec("int8"))
        rows = {r.path: r for r in qjax.plan({"q": q, "n": 3.0}, {".*": "int8"})}
        assert rows["q"].note == "already quantized" and rows["q"].spec is None
        assert rows["n"].note == "not an array"

    def test_non_float_leaves_say_why(self):
        (row,) = qjax.plan({"ids": np.zeros((64, 64), np.int64)}, {".*": "int8"})
        assert row.spec is None and row.note == "int64 is not floating point"
