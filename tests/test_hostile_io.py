"""Hostile inputs to the file layer: corrupted files, hostile targets, odd dtypes.

Classes (issue 11 items 4 and 8, issue 10 storage):
* corruption: every character of the header (qjax metadata included) flipped, random
  bytes flipped, QArrays that do not fit their spec: a one-line ValueError, or exactly
  the saved tree, never different weights;
* targets: devices, FIFOs, sockets, directories, links, long names, permissions, full
  disks, failed writes;
* storage: 64-bit and non-float leaves without x64, names, implied and narrowed offsets.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import socket
import stat
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import qjax
from qjax import files
from qjax import io as qio

RNG = np.random.default_rng(11)


def _x(shape, dtype=np.float32):
    return jnp.asarray(RNG.standard_normal(shape).astype(dtype))


def _trees():
    """Small trees whose metadata exercises pad, spec indices, block sizes and offsets."""
    blocks = qjax.per_block(-1, 32)
    return {
        "blocks": {
            "w": qjax.quantize(_x((4, 64)), qjax.QuantSpec("int4", granularity=blocks)),
            "f4": qjax.quantize(_x((4, 64)), qjax.QuantSpec("float4_e2m1fn", granularity=blocks)),
            "b": jnp.arange(3, dtype=jnp.int32),
        },
        "offsets": [
            qjax.quantize(_x((6, 10)), qjax.QuantSpec("uint4", "asymmetric", granularity=(6, 1))),
            qjax.quantize(_x((3, 16)), qjax.QuantSpec("uint8", granularity=qjax.per_channel(0))),
            qjax.quantize(_x((2, 8)), qjax.QuantSpec("int8", "asymmetric", "minval")),
        ],
    }


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8)


def _same(loaded, original) -> bool:
    """Exactly the saved tree: containers, statics, dtypes, shapes and bits."""
    if isinstance(original, qjax.QArray):
        return (
            isinstance(loaded, qjax.QArray)
            and (loaded.spec, loaded.float_dtype, loaded.packed, loaded.pad)
            == (original.spec, original.float_dtype, original.packed, original.pad)
            and all(
                _same(getattr(loaded, p), getattr(original, p)) for p in ("data", "scale", "offset")
            )
        )
    if original is None:
        return loaded is None
    if isinstance(original, dict):
        return (
            type(loaded) is dict
            and list(loaded) == list(original)
            and all(_same(loaded[k], original[k]) for k in original)
        )
    if isinstance(original, (list, tuple)):
        return (
            type(loaded) is type(original)
            and len(loaded) == len(original)
            and all(_same(a, b) for a, b in zip(loaded, original))
        )
    a, b = np.asarray(loaded), np.asarray(original)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def _more_trees():
    """Another file: MX and float8 specs, bf16 and e8m0 scales, stacked and 0-d QArrays."""
    stack = jax.vmap(lambda w: qjax.quantize(w, qjax.QuantSpec("int2", "asymmetric")))
    return {
        "mx": qjax.quantize(_x((2, 64)), qjax.QuantSpec("mxfp4")),
        "fp8": qjax.quantize(_x((8, 8)), qjax.QuantSpec("float8_e5m2", scale_dtype="bfloat16")),
        "stacked": stack(_x((3, 4, 8))),
        "scalar": (qjax.quantize(jnp.float32(0.5), qjax.QuantSpec("uint8")), None),
        "ids": np.arange(4, dtype=np.int64),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tree = _trees()
    path = tmp_path_factory.mktemp("hostile") / "q.safetensors"
    qio.save(path, tree, names={"blocks/w": "blocks.w"})
    return path, tree


@pytest.fixture(scope="module", params=["blocks-and-offsets", "mx-stacked-scalars"])
def files_to_corrupt(saved, tmp_path_factory, request):
    if request.param == "blocks-and-offsets":
        return saved
    tree = _more_trees()
    path = tmp_path_factory.mktemp("hostile") / "more.safetensors"
    qio.save(path, tree, names={"mx": "m.x"})
    return path, tree


def _outcome_of(directory, i, content, tree) -> str:
    """Writes ``content`` to a new file (rewriting one is slow on some disks) and loads it."""
    path = directory / f"trial{i}.safetensors"
    path.write_bytes(bytes(content))
    try:
        return _outcome(path, tree)
    finally:
        path.unlink()


def _outcome(path, tree) -> str:
    """'same' or 'refused'; anything else fails the test."""
    try:
        loaded = qio.load(path)
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and str(path) in message, message
        return "refused"
    assert _same(loaded, tree), "a corrupted file loaded different weights"
    return "same"


def _flipped(c: int) -> int:
    """Another printable byte: digits to the next digit, letters to another letter."""
    if 0x30 <= c <= 0x39:
        return 0x30 + (c - 0x30 + 1) % 10
    if 0x61 <= c <= 0x7A:
        return 0x61 + (c - 0x61 + 1) % 26
    if 0x41 <= c <= 0x5A:
        return c + 0x20
    return c ^ 0x01


# ----------------------------------------------------------------------------- corruption


def test_every_header_character_flipped_fails_or_loads_the_same_tree(files_to_corrupt, tmp_path):
    path, tree = files_to_corrupt
    data = pathlib.Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].decode()
    start = header.index('"__metadata__"')
    outcomes = {"same": 0, "refused": 0}
    for i in range(8 + start, 8 + n):  # every character of the qjax metadata and its key
        corrupted = bytearray(data)
        corrupted[i] = _flipped(corrupted[i])
        outcomes[_outcome_of(tmp_path, i, corrupted, tree)] += 1
    assert outcomes["refused"] > 0.95 * (n - start)
    assert outcomes["same"] + outcomes["refused"] == n - start


def test_tensor_header_characters_flipped(files_to_corrupt, tmp_path):
    path, tree = files_to_corrupt
    data = pathlib.Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    start = data[8 : 8 + n].index(b'"__metadata__"')
    for i in range(0, 8 + start):  # the length prefix and the tensor entries
        corrupted = bytearray(data)
        corrupted[i] = _flipped(corrupted[i])
        _outcome_of(tmp_path, i, corrupted, tree)


def test_random_single_byte_corruption_anywhere(files_to_corrupt, tmp_path):
    path, tree = files_to_corrupt
    data = pathlib.Path(path).read_bytes()
    refused = 0
    for i, value in zip(RNG.integers(0, len(data), 400), RNG.integers(0, 256, 400)):
        corrupted = bytearray(data)
        if corrupted[i] == value:
            continue
        corrupted[i] = int(value)
        refused += _outcome_of(tmp_path, i, corrupted, tree) == "refused"
    assert refused > 350


@pytest.mark.parametrize(
    "text",
    [
        lambda t: t.replace('"pad":0', '"pad":1', 1),
        lambda t: t.replace('"block_size":32', '"block_size":16', 1),
        lambda t: t.replace('"spec":0', '"spec":1', 1),
        lambda t: t.replace('"float_dtype":"float32"', '"float_dtype":"float16"', 1),
        lambda t: t[:-1],
        lambda t: t + " ",
        lambda t: "",
    ],
    ids=["pad", "block-size", "spec-index", "float-dtype", "cut", "space", "empty"],
)
def test_edited_metadata_with_the_old_checksum_is_refused(saved, tmp_path, text):
    path, _ = saved
    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
        stored = {name: f.get_tensor(name) for name in f.keys()}
    edited = text(metadata["qjax"])
    assert edited != metadata["qjax"]
    target = tmp_path / "edited.safetensors"
    safetensors.numpy.save_file(stored, target, metadata=metadata | {"qjax": edited})
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        qio.load(target)


def _rewrite(source, target, edit=None, tensors=None):
    """The file with edited metadata and a valid checksum: the checks behind it must hold."""
    with safe_open(source, framework="numpy") as f:
        header = json.loads(f.metadata()["qjax"])
        stored = {name: f.get_tensor(name) for name in f.keys()}
    if edit is not None:
        edit(header)
    if tensors is not None:
        tensors(stored)
    text = json.dumps(header)
    crc = f"{zlib.crc32(text.encode()):08x}"
    safetensors.numpy.save_file(stored, target, metadata={"qjax": text, "qjax_crc32": crc})
    return target


def _node(header, *keys):
    node = header["tree"]
    for key in keys:
        node = node["dict"][key] if isinstance(key, str) else node["list"][key]
    return node.get("qarray") or node.get("array")


def _spec_of(header, *keys):
    return header["specs"][_node(header, *keys)["spec"]]


@pytest.mark.parametrize(
    ("edit", "tensors", "message"),
    [
        (lambda h: _node(h, "blocks", "w").update(pad=1), None, r"scale has shape \(4, 2\)"),
        (lambda h: _node(h, "blocks", "w").update(pad=2.0), None, "pad must be an int, got 2.0"),
        (
            lambda h: _node(h, "blocks", "w").update(pad=-1),
            None,
            r"pad must be in \[0, 1\].*got -1",
        ),
        (
            lambda h: _node(h, "blocks", "w").update(packed=1),
            None,
            "packed must be True or False, got 1",
        ),
        (
            lambda h: _spec_of(h, "blocks", "w")["granularity"].update(block_size=16),
            None,
            r"scale has shape \(4, 2\), but per_block.* \(4, 64\)",
        ),
        (
            lambda h: _spec_of(h, "blocks", "w")["granularity"].update(kind="per_channel"),
            None,
            r"scale has shape \(4, 2\), but per_channel\(axis=-1\) .* \(4, 64\)",
        ),
        (lambda h: _node(h, "blocks", "w").update(float_dtype="int32"), None, "float_dtype"),
        (lambda h: _node(h, "offsets", 0).update(offset="implied"), None, "does not fix its zero"),
        (lambda h: _node(h, "offsets", 1).update(offset=None), None, "offset is missing"),
        (
            lambda h: _node(h, "offsets", 1).update(offset_dtype="float32"),
            None,
            "offset must be integer .* got float32",
        ),
        (
            lambda h: _node(h, "offsets", 2).update(offset_dtype="int32"),
            None,
            "cannot stand for int32",
        ),
        (
            lambda h: _node(h, "offsets", 0)["offset"].update(
                shape=[1, 5], crc32=zlib.crc32(np.zeros(5, np.uint8))
            ),
            lambda t: t.update({"offsets/0:offset": np.zeros((1, 5), np.uint8)}),
            r"offset must have the scale's shape \(1, 10\).*got \(1, 5\)",
        ),
        (
            lambda h: _node(h, "blocks", "b").update(name=7),
            None,
            "corrupted qjax metadata: name 7",
        ),
        (lambda h: h["tree"].update({"dict": []}), None, "unknown node kind 'dict'"),
    ],
)
def test_qarrays_that_do_not_fit_their_spec_are_refused(saved, tmp_path, edit, tensors, message):
    path, _ = saved
    target = _rewrite(path, tmp_path / "bad.safetensors", edit, tensors)
    with pytest.raises(ValueError, match=message) as info:
        qio.load(target)
    assert "\n" not in str(info.value) and str(target) in str(info.value)


def test_version_1_files_get_a_clear_error(saved, tmp_path):
    path, _ = saved
    with safe_open(path, framework="numpy") as f:
        header = json.loads(f.metadata()["qjax"])
        stored = {name: f.get_tensor(name) for name in f.keys()}
    header["version"] = 1
    target = tmp_path / "v1.safetensors"
    safetensors.numpy.save_file(stored, target, metadata={"qjax": json.dumps(header)})
    with pytest.raises(ValueError, match=r"format version 1 .* re-create the file"):
        qio.load(target)


# ----------------------------------------------------------------------------- targets


def _tree():
    return {"w": jnp.ones(4)}


@pytest.mark.parametrize("device", [os.devnull, "/dev/zero", "/dev/full"])
def test_device_nodes_are_never_replaced(device):
    if not os.path.exists(device):
        pytest.fail(f"{device} missing on this machine")
    with pytest.raises(ValueError, match=f"{device}: is a character device, not a regular"):
        qio.save(device, _tree())
    assert stat.S_ISCHR(os.stat(device).st_mode)


def test_fifo_socket_and_directory_are_refused_and_kept(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.safetensors"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    try:
        for path, kind in ((fifo, "FIFO"), (sock_path, "socket"), (folder, "directory")):
            with pytest.raises(ValueError, match=f"is a {kind}, not a regular file"):
                qio.save(path, _tree())
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISSOCK(os.stat(sock_path).st_mode)
        os.symlink(fifo, tmp_path / "link-to-fifo")  # links are followed, then checked
        with pytest.raises(ValueError, match="is a FIFO"):
            qio.save(tmp_path / "link-to-fifo", _tree())
    finally:
        server.close()
    assert sorted(os.listdir(tmp_path)) == [
        "dir.safetensors", "link-to-fifo", "pipe.safetensors", "s.safetensors"
    ]  # fmt: skip


def test_symlinks_are_written_through(tmp_path):
    real = tmp_path / "real.safetensors"
    qio.save(real, {"w": jnp.zeros(2)})
    link = tmp_path / "link.safetensors"
    os.symlink(real, link)
    qio.save(link, {"w": jnp.full(2, 5.0)})
    assert os.path.islink(link) and os.readlink(link) == str(real)
    assert float(qio.load(real)["w"][0]) == 5.0
    dangling = tmp_path / "dangling.safetensors"
    os.symlink(tmp_path / "new.safetensors", dangling)
    qio.save(dangling, _tree())
    assert os.path.islink(dangling) and (tmp_path / "new.safetensors").is_file()
    chain = tmp_path / "chain.safetensors"
    os.symlink(link, chain)
    qio.save(chain, {"w": jnp.full(2, 7.0)})
    assert float(qio.load(real)["w"][1]) == 7.0 and os.path.islink(link)


@pytest.mark.parametrize("length", [240, 252, 255])
def test_long_file_names_work(tmp_path, length):
    name = "w" * (length - len(".safetensors")) + ".safetensors"
    qio.save(tmp_path / name, _tree())
    assert os.listdir(tmp_path) == [name]
    unicode_name = "é" * ((length - 12) // 2) + ".safetensors"  # 2 bytes per character
    qio.save(tmp_path / unicode_name, _tree())
    assert sorted(os.listdir(tmp_path)) == sorted([name, unicode_name])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        qio.save(tmp_path / "new.safetensors", _tree())
        np.save(tmp_path / "numpy.npy", np.ones(1))
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "numpy.npy").st_mode)
    os.chmod(tmp_path / "new.safetensors", 0o604)
    qio.save(tmp_path / "new.safetensors", _tree())
    assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o604


@pytest.mark.parametrize(
    ("code", "what"), [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "disk quota exceeded")]
)
def test_full_disk_names_the_target_and_keeps_the_old_file(tmp_path, monkeypatch, code, what):
    path = tmp_path / "model.safetensors"
    qio.save(path, {"w": jnp.zeros(3)})
    before = path.read_bytes()

    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"{what} on {path}") as info:
        qio.save(path, {"w": jnp.ones(3)})
    assert ".tmp" not in str(info.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.safetensors"]


def test_permission_errors_name_the_target_not_the_temporary(tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, flags, mode=0o777, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError) as info:
        qio.save(tmp_path / "w.safetensors", _tree())
    assert info.value.filename == str(tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, MemoryError, RuntimeError])
def test_a_failed_write_leaves_nothing_behind(tmp_path, error):
    path = tmp_path / "w.bin"

    def write(f):
        f.write(b"partial")
        raise error

    with pytest.raises(error):
        files.write_atomically(path, write)
    assert os.listdir(tmp_path) == []


def test_missing_directory_and_load_of_odd_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qio.save(tmp_path / "no" / "w.safetensors", _tree())
    with pytest.raises(ValueError, match="is a directory"):
        qio.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        qio.load(tmp_path / "absent.safetensors")
    os.mkfifo(tmp_path / "pipe.safetensors")  # opening it to read would block forever
    for path, kind in ((tmp_path / "pipe.safetensors", "FIFO"), ("/dev/zero", "character device")):
        with pytest.raises(ValueError, match=f"is a {kind}, not a qjax checkpoint file"):
            qio.load(path)
        with pytest.raises(ValueError, match=f"is a {kind}, not a checkpoint file"):
            files.open_checkpoint(path)


# ----------------------------------------------------------------------------- storage


ODD = {
    "position_ids": np.arange(512, dtype=np.int64).reshape(1, 512),
    "u64": np.array([0, 2**64 - 1], np.uint64),
    "f64": np.array([1e300, -1e-300, np.pi]),
    "flags": np.array([True, False]),
    "u16": np.array([65535], np.uint16),
    "u32": np.array([2**32 - 1], np.uint32),
    "i16": np.array([-32768], np.int16),
    "bf16": np.array([1.5, -2.0], ml_dtypes.bfloat16),
    "f16": np.array([65504.0], np.float16),
    "fp8": np.array([448.0], ml_dtypes.float8_e4m3fn),
}


def test_64_bit_and_non_float_leaves_load_without_x64(tmp_path):
    assert not jax.config.jax_enable_x64
    qio.save(tmp_path / "odd.safetensors", ODD)
    loaded = qio.load(tmp_path / "odd.safetensors")
    for name, x in ODD.items():
        y = loaded[name]
        assert y.dtype == x.dtype and y.shape == x.shape, name
        assert np.array_equal(_bits(y), _bits(x)), name
        assert isinstance(y, np.ndarray) == (x.dtype.itemsize == 8), name
    with jax.enable_x64(True):
        loaded = qio.load(tmp_path / "odd.safetensors")
    assert isinstance(loaded["position_ids"], jax.Array)
    assert loaded["position_ids"].dtype == np.int64


def test_names_come_back_from_load_tensors(tmp_path):
    tree = {"bert": {"embeddings": {"weight": jnp.ones(2)}}, "step": jnp.int32(1)}
    names = {"bert/embeddings/weight": "bert.embeddings.weight"}
    qio.save(tmp_path / "n.safetensors", tree, names=names)
    assert list(qio.load_tensors(tmp_path / "n.safetensors")) == ["bert.embeddings.weight", "step"]
    assert _same(qio.load(tmp_path / "n.safetensors"), tree)
    with pytest.raises(ValueError, match="names given for paths that hold no array leaf"):
        qio.save(tmp_path / "m.safetensors", tree, names={"nope": "x"})
    clash = {"a/b": jnp.ones(1), "a": {"b": jnp.ones(1)}}
    qio.save(tmp_path / "c.safetensors", clash)
    with pytest.raises(ValueError, match="two leaves are named 'a/b'"):
        qio.load_tensors(tmp_path / "c.safetensors")


@pytest.mark.parametrize(
    ("dtype", "scheme", "stored"),
    [
        ("int8", "symmetric", None),
        ("uint8", "symmetric", None),
        ("uint4", "symmetric", None),
        ("uint2", "symmetric", None),
        ("int4", "asymmetric", "I8"),
        ("uint4", "asymmetric", "U8"),
        ("int8", "asymmetric", "I8"),
        ("uint8", "asymmetric", "U8"),
        ("int2", "asymmetric", "I8"),
    ],
)
def test_zero_points_are_implied_or_narrow_and_load_as_int32(tmp_path, dtype, scheme, stored):
    spec = qjax.QuantSpec(dtype, scheme, "zero_point", qjax.per_block(-1, 32))
    qa = qjax.quantize(_x((8, 64)) + 0.3, spec)
    qio.save(tmp_path / "z.safetensors", {"w": qa})
    with safe_open(tmp_path / "z.safetensors", framework="numpy") as f:
        codes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert codes.get("w:offset") == stored
    loaded = qio.load(tmp_path / "z.safetensors")["w"]
    assert loaded.offset.dtype == jnp.int32
    assert _same(loaded, qa)
    assert np.array_equal(_bits(loaded.dequantize()), _bits(qa.dequantize()))


def test_empty_and_stacked_qarrays_round_trip(tmp_path):
    spec = qjax.QuantSpec("uint8", granularity=qjax.per_channel(-1))
    stacked = jax.vmap(lambda w: qjax.quantize(w, spec))(_x((3, 8, 16)))
    empty = qjax.quantize(jnp.zeros((0, 4)), qjax.QuantSpec("int4", "asymmetric"))
    tree = {"stacked": stacked, "empty": empty}
    qio.save(tmp_path / "s.safetensors", tree)
    assert _same(qio.load(tmp_path / "s.safetensors"), tree)


@pytest.mark.parametrize("dtype", ["float6_e2m3fn", "int1"])
def test_types_jax_cannot_hold_are_refused_when_saved_and_loaded(saved, tmp_path, dtype):
    if not hasattr(ml_dtypes, dtype):
        pytest.skip(f"this ml_dtypes has no {dtype}")
    with pytest.raises(TypeError, match=f"cannot store tensor 'x' of dtype {dtype}"):
        qio.save(tmp_path / "x.safetensors", {"x": np.zeros(4, getattr(ml_dtypes, dtype))})
    # A file that says so anyway (its checksum recomputed): one ValueError naming it.
    source, _ = saved
    target = _rewrite(
        source,
        tmp_path / "edited.safetensors",
        lambda h: _node(h, "blocks", "b").update(dtype=dtype),
    )
    with pytest.raises(ValueError, match=f"cannot store tensor .* of dtype {dtype}"):
        qio.load(target)


def test_keys_and_names_a_header_cannot_hold_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not valid Unicode text"):
        qio.save(tmp_path / "s.safetensors", {"layer\udcff": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match="not valid Unicode text"):
        qio.save(tmp_path / "s.safetensors", {"a": np.ones(2)}, names={"a": "b\udcff"})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("names", [{"a": "b"}, {"a": "x", "b": "x"}])
def test_names_that_collide_are_refused(tmp_path, names):
    tree = {"a": np.ones(2, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="would both be named"):
        qio.save(tmp_path / "d.safetensors", tree, names=names)
