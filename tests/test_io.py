"""qjax.io: bit-exact save/load of QArray trees, compact files, clear errors on bad files."""

from __future__ import annotations

import json
import os
import pathlib
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import qjax
from qjax import io as qio

SHAPE = (256, 384)
"""Big enough that the payload dwarfs the header, divisible by 32 (MX) and by 4 (packing)."""

FORMULATIONS = {
    "int8": (("symmetric", "scale"), ("symmetric", "zero_point"), ("asymmetric", "minval")),
    "uint8": (("symmetric", "zero_point"), ("asymmetric", "minval")),
    "int4": (("symmetric", "scale"), ("asymmetric", "zero_point"), ("symmetric", "minval")),
    "uint4": (("asymmetric", "zero_point"), ("asymmetric", "minval")),
    "int2": (("symmetric_with_clipping", "scale"), ("asymmetric", "minval")),
    "uint2": (("symmetric", "zero_point"), ("asymmetric", "minval")),
    "float8_e4m3fn": (("symmetric", "scale"),),
    "float8_e5m2": (("symmetric", "scale"),),
    "float4_e2m1fn": (("symmetric", "scale"),),
    "mxfp4": (("symmetric", "scale"),),
    "mxfp8": (("symmetric", "scale"),),
    "nvfp4": (("symmetric", "scale"),),
}
"""Every target dtype, with every formulation it supports."""

SUB_BYTE = ("int4", "uint4", "int2", "uint2", "float4_e2m1fn", "mxfp4", "nvfp4")
GRANULARITIES = (
    qjax.per_channel(-1),
    qjax.per_block(-2, 16),
    None,
    (8, -1),
)


def _qarrays() -> dict[str, qjax.QArray]:
    """One QArray per (dtype, formulation, packing), cycling granularities and dtypes."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))
    out = {}
    for i, (dtype, pairs) in enumerate(FORMULATIONS.items()):
        for j, (scheme, formulation) in enumerate(pairs):
            preset = dtype in qjax.spec.PRESETS
            granularity = None if preset else GRANULARITIES[(i + j) % len(GRANULARITIES)]
            spec = qjax.QuantSpec(dtype, scheme, formulation, granularity)
            source = x.astype(jnp.bfloat16) if (i + j) % 3 == 0 else x
            for packed in (True, False) if dtype in SUB_BYTE else (None,):
                name = f"{dtype}/{formulation}" + ("" if packed is None else f"/packed={packed}")
                out[name] = qjax.quantize(source, spec, packed=packed)
    out["int8/bf16-scale"] = qjax.quantize(x, qjax.QuantSpec("int8", scale_dtype="bfloat16"))
    return out


@pytest.fixture(scope="module")
def mixed_tree():
    qarrays = _qarrays()
    rng = np.random.default_rng(1)
    return {
        "qarrays": qarrays,
        "plain": [
            jnp.asarray(rng.normal(size=(32, 32)).astype(np.float32)),
            jnp.asarray(rng.normal(size=(16,)), dtype=jnp.bfloat16),
            jnp.arange(12, dtype=jnp.int32).reshape(3, 4),
            np.arange(5, dtype=np.uint8),
        ],
        "nested": {"layers": [{"kernel": qarrays["int4/scale/packed=True"], "norm": None}, ()]},
        "tuple": (jnp.float32(2.5), {}, []),
    }


@pytest.fixture(scope="module")
def saved(mixed_tree, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("io") / "mixed.safetensors")
    qio.save(path, mixed_tree)
    return path


def _bits(a) -> np.ndarray:
    array = np.asarray(a)
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _assert_same(loaded, original, where="root"):
    """Same containers (types, key order), same QArray statics, bit-identical arrays."""
    if isinstance(original, qjax.QArray):
        assert isinstance(loaded, qjax.QArray), where
        assert loaded.spec == original.spec, where
        assert (loaded.float_dtype, loaded.packed, loaded.pad) == (
            original.float_dtype,
            original.packed,
            original.pad,
        ), where
        for part in ("data", "scale", "offset", "channel_scale", "tensor_scale"):
            _assert_same(getattr(loaded, part), getattr(original, part), f"{where}:{part}")
    elif original is None:
        assert loaded is None, where
    elif isinstance(original, dict):
        assert type(loaded) is dict and list(loaded) == list(original), where
        for key in original:
            _assert_same(loaded[key], original[key], f"{where}/{key}")
    elif isinstance(original, (list, tuple)):
        assert type(loaded) is type(original) and len(loaded) == len(original), where
        for i, (a, b) in enumerate(zip(loaded, original)):
            _assert_same(a, b, f"{where}/{i}")
    else:
        assert isinstance(loaded, jnp.ndarray), where
        assert loaded.dtype == np.asarray(original).dtype, where
        assert loaded.shape == np.shape(original), where
        np.testing.assert_array_equal(_bits(loaded), _bits(original), err_msg=where)


# ----------------------------------------------------------------------------- round trip


def test_mixed_tree_round_trips_bit_exactly(saved, mixed_tree):
    loaded = qio.load(saved)
    _assert_same(loaded, mixed_tree)
    for name, qa in mixed_tree["qarrays"].items():
        np.testing.assert_array_equal(
            _bits(loaded["qarrays"][name].dequantize()), _bits(qa.dequantize()), err_msg=name
        )


def test_mixed_tree_covers_every_target_formulation_and_packing(mixed_tree):
    qarrays = mixed_tree["qarrays"].values()
    assert {qa.spec.dtype for qa in qarrays} == {
        "int8", "uint8", "int4", "uint4", "int2", "uint2",
        "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn",
    }  # fmt: skip
    assert {qa.spec.formulation for qa in qarrays} == {"scale", "zero_point", "minval"}
    assert {(qa.spec.dtype, qa.packed) for qa in qarrays} >= {("int4", True), ("int4", False)}
    assert {qa.float_dtype for qa in qarrays} == {"float32", "bfloat16"}
    scale_dtypes = {qa.scale.dtype.name for qa in qarrays}
    assert scale_dtypes == {"float32", "bfloat16", "float8_e8m0fnu", "float8_e4m3fn"}
    assert any(qa.tensor_scale is not None for qa in qarrays)  # nvfp4: format version 4


def test_file_size_is_the_payload_plus_a_small_header(saved):
    with safe_open(saved, framework="numpy") as f:
        payload = sum(f.get_tensor(name).nbytes for name in f.keys())
    size = os.path.getsize(saved)
    assert payload <= size <= payload * 1.01 + 8 * 1024


def test_int4_per_channel_takes_half_a_byte_per_value(tmp_path):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1024, 1024)).astype(np.float32))
    qa = qjax.quantize(x, qjax.QuantSpec("int4", granularity=qjax.per_channel(-1)))
    path = tmp_path / "int4.safetensors"
    qio.save(path, {"kernel": qa})
    payload = 1024 * 1024 // 2 + 1024 * 4  # packed values + float32 scales
    assert payload <= os.path.getsize(path) <= payload + 1024
    _assert_same(qio.load(path), {"kernel": qa})


@pytest.mark.parametrize(
    "tree",
    [
        jnp.arange(3.0),
        jnp.float32(1.0),
        {},
        [],
        (),
        None,
        {"a": jnp.zeros((0, 3))},
        [np.float32(7.0), np.ones((2, 2), np.float16), np.array([True, False])],
    ],
    ids=["root-array", "scalar", "empty-dict", "empty-list", "empty-tuple", "none", "empty", "np"],
)
def test_edge_trees_round_trip(tmp_path, tree):
    qio.save(tmp_path / "t.safetensors", tree)
    _assert_same(qio.load(tmp_path / "t.safetensors"), tree)


def test_root_and_zero_d_qarrays_round_trip(tmp_path):
    tree = qjax.quantize(jnp.linspace(-1.0, 1.0, 10), qjax.QuantSpec("uint2"))
    qio.save(tmp_path / "root.safetensors", tree)
    _assert_same(qio.load(tmp_path / "root.safetensors"), tree)
    scalar = qjax.quantize(jnp.float32(0.3), qjax.QuantSpec("int4"))
    qio.save(tmp_path / "scalar.safetensors", [scalar])
    _assert_same(qio.load(tmp_path / "scalar.safetensors"), [scalar])


def test_tensor_names_are_the_tree_paths(tmp_path):
    spec = qjax.QuantSpec("uint4", "asymmetric", granularity=qjax.per_channel(0))
    qa = qjax.quantize(jnp.ones((4, 8)), spec)
    qio.save(tmp_path / "n.safetensors", {"dense": [{"kernel": qa, "bias": jnp.zeros(8)}]})
    with safe_open(tmp_path / "n.safetensors", framework="numpy") as f:
        assert set(f.keys()) == {
            "dense/0/kernel:data",
            "dense/0/kernel:scale",
            "dense/0/kernel:offset",
            "dense/0/bias",
        }
        header = json.loads(f.metadata()["qjax"])
        assert f.get_slice("dense/0/kernel:data").get_dtype() == "U8"
        # uint4 zero points lie in [0, 15]: stored as uint8, loaded as the int32 they were
        assert f.get_slice("dense/0/kernel:offset").get_dtype() == "U8"
    assert header["format"] == "qjax" and header["version"] == 2  # no channel scales
    assert header["specs"][0]["dtype"] == "uint4"
    assert "tensor_scale" not in header["specs"][0]  # so releases before NVFP4 read it


def test_nvfp4_files_are_version_4_and_keep_the_tensor_scale(tmp_path):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32)) * 50.0, jnp.float32)
    qa = qjax.quantize(x, "nvfp4")
    qio.save(tmp_path / "nv.safetensors", {"w": qa})
    with safe_open(tmp_path / "nv.safetensors", framework="numpy") as f:
        header = json.loads(f.metadata()["qjax"])
        assert header["version"] == 4 and header["specs"][0]["tensor_scale"] is True
        stored = f.get_tensor("w:tensor_scale")
    # the tensor scale of the spec: amax / (448 * 6), one per tensor
    expected = np.float32(np.max(np.abs(np.asarray(x)))) / np.float32(2688.0)
    assert stored.shape == (1, 1) and stored[0, 0] == expected
    loaded = qio.load(tmp_path / "nv.safetensors")["w"]
    np.testing.assert_array_equal(np.asarray(loaded.dequantize()), np.asarray(qa.dequantize()))


KEYS = ["a/b", "a:b", "%2F", "a%3Ab", "", "__metadata__", "x//y", "ünï cödé", ":data"]


def test_keys_with_separators_round_trip(tmp_path):
    tree = {key: {key: jnp.full((2,), i, jnp.int32)} for i, key in enumerate(KEYS)}
    tree["a"] = {"b": jnp.zeros(1)}  # would collide with "a/b" without escaping
    qio.save(tmp_path / "k.safetensors", tree)
    _assert_same(qio.load(tmp_path / "k.safetensors"), tree)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(max_size=6), min_size=1, max_size=5, unique=True))
def test_any_string_keys_round_trip(tmp_path_factory, keys):
    tree = {key: {"leaf": jnp.full((1,), i, jnp.int32)} for i, key in enumerate(keys)}
    path = tmp_path_factory.mktemp("keys") / "k.safetensors"
    qio.save(path, tree)
    _assert_same(qio.load(path), tree)


# ----------------------------------------------------------------------------- saving


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path, saved, monkeypatch):
    path = tmp_path / "model.safetensors"
    qio.save(path, {"w": jnp.ones(3)})
    before = path.read_bytes()

    def crash(fd):  # Ctrl-C once the whole temporary file is written, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        qio.save(path, {"w": jnp.zeros(3)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({1: jnp.ones(2)}, r"dict key 1 \(int\) at the root is not a string"),
        ({"a": {("x",): jnp.ones(2)}}, r"dict key \('x',\) \(tuple\) at 'a' is not a string"),
        ({"a": [1.0]}, r"cannot save float at 'a/0'"),
        ({"a": "text"}, r"cannot save str at 'a'"),
        ({"a": np.array(["x"])}, r"cannot store tensor 'a' of dtype <U1"),
    ],
)
def test_save_refuses_what_it_cannot_round_trip(tmp_path, tree, message):
    with pytest.raises(TypeError, match=message):
        qio.save(tmp_path / "bad.safetensors", tree)
    assert not os.listdir(tmp_path)


def test_save_into_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        qio.save(tmp_path / "missing" / "w.safetensors", [jnp.ones(1)])


# ----------------------------------------------------------------------------- loading errors


def _load_fails(path, message, error=ValueError):
    """Load must raise a one-line error and leave the file exactly as it was."""
    path = pathlib.Path(path)
    before, mtime = path.read_bytes(), os.stat(path).st_mtime_ns
    with pytest.raises(error, match=message) as info:
        qio.load(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before and os.stat(path).st_mtime_ns == mtime


def _rewrite(source, target, edit=None, tensors=None):
    """Writes ``source``'s tensors with edited qjax metadata, a valid safetensors file."""
    with safe_open(source, framework="numpy") as f:
        header = json.loads(f.metadata()["qjax"])
        stored = {name: f.get_tensor(name) for name in f.keys()}
    if edit is not None:
        edit(header)
    if tensors is not None:
        tensors(stored)
    text = json.dumps(header)
    crc = f"{zlib.crc32(text.encode()):08x}"  # a valid checksum: the checks behind it must hold
    safetensors.numpy.save_file(stored, target, metadata={"qjax": text, "qjax_crc32": crc})
    return target


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("small") / "small.safetensors")
    x = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
    qa = qjax.quantize(x, qjax.QuantSpec("int4", granularity=qjax.per_channel(0)), packed=False)
    qio.save(path, {"w": qa, "b": jnp.ones(8)})
    return path


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        qio.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("stop", [-1, -100, -300, 8, 100])
def test_truncated_file(tmp_path, saved, stop):
    data = pathlib.Path(saved).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:stop])
    _load_fails(path, "not a valid safetensors file")


def test_corrupted_header(tmp_path, small):
    data = bytearray(pathlib.Path(small).read_bytes())
    data[12:20] = b"#garbage"
    path = tmp_path / "header.safetensors"
    path.write_bytes(bytes(data))
    _load_fails(path, "not a valid safetensors file")


def test_corrupted_tensor_bytes(tmp_path, small):
    data = bytearray(pathlib.Path(small).read_bytes())
    data[-20] ^= 0x01  # one bit of the last tensor's payload
    path = tmp_path / "flip.safetensors"
    path.write_bytes(bytes(data))
    _load_fails(path, "is corrupted: its bytes fail the CRC-32 check")


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n" * 10, b"\x00" * 64])
def test_not_safetensors_at_all(tmp_path, content):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(content)
    _load_fails(path, "not a valid safetensors file")


def test_plain_safetensors_file_is_not_a_qjax_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"w": np.ones(3, np.float32)}, path, metadata={"x": "y"})
    _load_fails(path, r"not a qjax checkpoint: .* use qjax.load only on files written by qjax")
    safetensors.numpy.save_file({"w": np.ones(3, np.float32)}, path)
    _load_fails(path, "not a qjax checkpoint")


def test_directory_is_refused(tmp_path):
    _load_fails_dir = pytest.raises(ValueError, match="is a directory")
    with _load_fails_dir:
        qio.load(tmp_path)


def _set(obj, keys, value):
    for key in keys[:-1]:
        obj = obj[key]
    obj[keys[-1]] = value


W = ["tree", "dict", "w", "qarray"]
B = ["tree", "dict", "b", "array"]


@pytest.mark.parametrize(
    ("edit", "tensors", "message"),
    [
        (lambda h: _set(h, [*B, "shape"], [9]), None, r"tensor 'b' does not match .* \[9\]"),
        (lambda h: _set(h, [*B, "dtype"], "int32"), None, "expected int32 .* holds F32"),
        (lambda h: _set(h, [*W, "data", "dtype"], "int8"), None, "expected int8 .* holds U8"),
        (lambda h: _set(h, [*W, "data", "dtype"], "uint4"), None, "data must be int4 .* got uint4"),
        (
            lambda h: _set(h, [*W, "packed"], True),
            None,
            r"'w' does not fit its spec: .*data must be uint8 \(packed int4",
        ),
        (lambda h: _set(h, [*W, "spec"], 5), None, "unknown spec #5"),
        (lambda h: _set(h, ["specs", 0, "dtype"], "int5"), None, "invalid spec #0"),
        (
            lambda h: _set(h, ["specs", 0, "scale_dtype"], "bfloat16"),
            None,
            "scale must be bfloat16 .* got float32",
        ),
        (lambda h: _set(h, ["specs", 0, "formulation"], "minval"), None, "offset is missing"),
        (lambda h: _set(h, ["version"], 5), None, "unsupported qjax format version 5"),
        (lambda h: _set(h, ["version"], "2"), None, "unsupported qjax format version .2."),
        (lambda h: _set(h, ["format"], "other"), None, "no 'format': 'qjax'"),
        (lambda h: _set(h, ["tree", "dict", "c"], {"array": {}}), None, "'c' is in the qjax"),
        (lambda h: h["tree"]["dict"].pop("b"), None, "1 tensor.* does not describe, e.g. .'b'"),
        (lambda h: _set(h, ["tree"], {"set": []}), None, "unknown node kind 'set'"),
        (lambda h: h.pop("specs"), None, "malformed qjax metadata"),
        (None, lambda t: t.pop("b"), "tensor 'b' is in the qjax metadata but not in the file"),
        (None, lambda t: t.update(extra=np.ones(1)), r"does not describe, e.g. \['extra'\]"),
    ],
)
def test_metadata_that_does_not_match_the_tensors(tmp_path, small, edit, tensors, message):
    _load_fails(_rewrite(small, tmp_path / "edited.safetensors", edit, tensors), message)


def test_metadata_that_is_not_json(tmp_path, small):
    with safe_open(small, framework="numpy") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    path = tmp_path / "json.safetensors"
    crc = f"{zlib.crc32(b'{not json'):08x}"
    safetensors.numpy.save_file(stored, path, metadata={"qjax": "{not json", "qjax_crc32": crc})
    _load_fails(path, "corrupted qjax metadata: not valid JSON")
    safetensors.numpy.save_file(stored, path, metadata={"qjax": "{not json"})
    _load_fails(path, "corrupted qjax metadata: it fails its CRC-32 check")


def test_non_finite_values_are_refused_unless_allowed(tmp_path):
    tree = {"layer": {"bias": jnp.array([1.0, jnp.nan, jnp.inf])}}
    path = tmp_path / "nan.safetensors"
    qio.save(path, tree)
    _load_fails(path, r"tensor 'layer/bias' holds 2 non-finite value\(s\)")
    _assert_same(qio.load(path, check_finite=False), tree)


def test_lookup_table_arrays_round_trip_bit_for_bit(tmp_path):
    from qjax.palettize import nf4, palettize, per_grouped_channel

    w = jnp.asarray(np.random.default_rng(1).normal(size=(128, 48)), jnp.float32)
    tree = {
        "nf4": nf4(w),
        "lut3": palettize(w, 3, per_grouped_channel(-1, 16)),
        "bias": jnp.zeros(48),
    }
    qio.save(tmp_path / "lut.safetensors", tree)
    with safe_open(tmp_path / "lut.safetensors", framework="numpy") as f:
        assert json.loads(f.metadata()["qjax"])["version"] == 4
        assert {"nf4:indices", "nf4:table", "nf4:scale", "lut3:indices", "lut3:table"} <= set(
            f.keys()
        )
    loaded = qio.load(tmp_path / "lut.safetensors")
    for name in ("nf4", "lut3"):
        got, want = loaded[name], tree[name]
        assert (got.bits, got.pad, got.shape) == (want.bits, want.pad, want.shape)
        np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
        np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(want.dequantize()))
    assert loaded["lut3"].scale is None
    # a tree of them dequantizes like QArrays do
    np.testing.assert_array_equal(
        np.asarray(qjax.dequantize_tree(loaded)["nf4"]), np.asarray(tree["nf4"].dequantize())
    )


def test_a_lookup_table_with_duplicate_entries_is_refused_on_load(tmp_path):
    from qjax.palettize import palettize

    la = palettize(jnp.arange(32.0).reshape(4, 8), 2)
    qio.save(tmp_path / "lut.safetensors", {"w": la})
    with safe_open(tmp_path / "lut.safetensors", framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    table = tensors["w:table"].copy()
    table[..., 1] = table[..., 0]  # two equal entries: indices 0 and 1 would mean the same
    header = json.loads(metadata["qjax"])
    header["tree"]["dict"]["w"]["lut"]["table"]["crc32"] = zlib.crc32(table.tobytes())
    text = json.dumps(header, separators=(",", ":"))
    metadata = {"qjax": text, "qjax_crc32": f"{zlib.crc32(text.encode()):08x}"}
    safetensors.numpy.save_file(
        {**tensors, "w:table": table}, str(tmp_path / "bad.safetensors"), metadata
    )
    with pytest.raises(ValueError, match=r"LUTArray at 'w' is not valid: .*duplicate entries"):
        qio.load(tmp_path / "bad.safetensors")
