"""Orbax checkpoints of QArray trees, abstract quantized trees, and the qjax file interop.

A tree of :class:`~qjax.QArray` s is a pytree, so Orbax saves it as it saves any tree:
each process writes only the shards it holds (packed sub-byte values stay packed, one
uint8 per 2 or 4 values), and a restore reads each shard where the target's sharding puts
it, on any mesh. What Orbax cannot know is a QArray's static part (spec, float dtype,
packing): a restore needs a target that has it. :func:`abstract_quantized` builds one from
the float model's abstract params (``jax.eval_shape`` output) without materialising any
float weight, by running :func:`qjax.quantize_tree` under ``jax.eval_shape``; the data,
scales and offsets it gives are sharded like the float leaf they come from.

Lookup-table arrays (:class:`~qjax.palettize.LUTArray`: ``nf4``, ``lut*`` rules) are
handled as QArrays are: their parts (``indices``, ``table``, ``scale``) are stored, their
statics (bits, pad, float dtype) kept in the metadata.

* :func:`save` / :func:`restore`: one ``ocp.StandardCheckpointer`` call each (its save is
  asynchronous: the arrays are copied off the devices, then written in the background;
  :func:`save` waits, :func:`save_async` returns the checkpointer to wait on). :func:`save`
  also records the static parts in Orbax's custom metadata, so :func:`checkpoint_target`
  and ``restore(path)`` rebuild the tree without a model.
* With ``ocp.CheckpointManager``: save ``ocp.args.StandardSave(parts(tree))`` with
  ``custom_metadata=metadata(tree)``, restore ``ocp.args.StandardRestore(parts(target))``
  and rebuild with ``from_parts(restored, target)``. :func:`parts` turns each QArray into
  the dict ``{"data", "scale", "offset", "channel_scale", "tensor_scale"}``, exactly what
  Orbax stores for a QArray node, so the files are the same either way.
* :func:`orbax_to_safetensors` / :func:`safetensors_to_orbax`: an Orbax checkpoint to one
  qjax ``.safetensors`` file (:mod:`qjax.io`) and back, one tensor in memory at a time,
  keeping the file's original tensor names.

Orbax names each stored array by its key path joined with ``.``; :func:`save` refuses a
tree in which two leaves would get one name (``{"a.b": x, "a": {"b": y}}``), naming both.
Leaves of 64-bit dtypes restore as NumPy arrays unless JAX's x64 mode is on, as
:func:`qjax.load` gives them: JAX would truncate them to 32 bits.

Unpacked ``uint4`` / ``uint2`` data (``packed=False``) cannot be stored: tensorstore has
no such dtypes (``int4``, ``int2``, the float8 / float4 types and packed data are fine).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open

from qjax import io as qio
from qjax import shard_fit
from qjax.files import write_safetensors
from qjax.palettize import LUTArray
from qjax.qarray import QArray
from qjax.rules import RulesLike
from qjax.tree import path_str, quantize_tree

__all__ = [
    "METADATA_KEY",
    "abstract_quantized",
    "checkpoint_target",
    "from_parts",
    "metadata",
    "orbax_to_safetensors",
    "parts",
    "restore",
    "safetensors_to_orbax",
    "save",
    "save_async",
]

METADATA_KEY = "qjax"
"""The key of Orbax's custom metadata under which :func:`save` records the QArrays' statics."""

_FORMAT = "qjax-orbax"
_VERSION = 2
"""The metadata layout :func:`save` writes when the tree holds LUTArrays (version 2 added
them); a tree without any is written as version 1, which older qjax releases read."""
_READABLE_VERSIONS = (1, _VERSION)
_PARTS = ("data", "scale", "offset", "channel_scale", "tensor_scale")
_LUT_PARTS = ("indices", "table", "scale")
_UNSTORABLE = ("uint4", "uint2")


# --------------------------------------------------------------------------- abstract trees


def abstract_quantized(abstract_params: Any, rules: RulesLike | None = None, **kwargs: Any) -> Any:
    """The tree :func:`qjax.quantize_tree` would return, with ``ShapeDtypeStruct`` leaves.

    No float weight is materialised: ``quantize_tree(params, rules, **kwargs)`` runs under
    ``jax.eval_shape``, so the shapes, dtypes and specs are those a real run gives. Where a
    float leaf has a sharding (``jax.eval_shape`` of a sharded init, or
    ``ShapeDtypeStruct(..., sharding=...)``), the quantized parts get one derived from it:

    * ``data`` the float leaf's ``PartitionSpec`` (packed data too: its last axis holds
      bytes, so each shard must hold whole bytes);
    * ``scale``, ``offset``, ``channel_scale`` and ``tensor_scale`` the same mesh axes
      along the dimensions where they have more than one entry, replicated along the
      others (a per-tensor or per-channel scale along an unsharded axis).

    Leaves kept float keep their sharding. Fully replicated shardings of any kind (one
    device) are given to every part as they are; the only ones lookup-table targets
    (:class:`~qjax.palettize.LUTArray`) take.

    Args:
      abstract_params: the float params as ``jax.ShapeDtypeStruct`` s (or arrays).
      rules: as :func:`qjax.quantize_tree`.
      **kwargs: the other keyword arguments of :func:`qjax.quantize_tree` (``layout``,
        ``min_size``, ``fallback``, ``strict``).

    Returns:
      A tree like ``quantize_tree``'s, whose QArrays hold ``ShapeDtypeStruct`` s: a restore
      target for :func:`restore` or Orbax, and something ``jax.jit(...).lower`` accepts.

    Raises:
      ValueError: naming the leaf, axis, shard count and sizes, where a sharding would split
        a packed byte or a quantization block across shards; naming the leaf, for a
        lookup-table target whose sharding is not fully replicated; and as ``quantize_tree``.
      TypeError: for a sharding that is neither a ``NamedSharding`` nor fully replicated.

    Examples:
      >>> import jax, jax.numpy as jnp, qjax.orbax
      >>> params = {"kernel": jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)}
      >>> target = qjax.orbax.abstract_quantized(params, {".*": "int4:per_block:128"})
      >>> target["kernel"].data, target["kernel"].scale.shape
      (ShapeDtypeStruct(shape=(4096, 512), dtype=uint8), (32, 1024))
    """
    run = functools.partial(quantize_tree, rules=rules, **kwargs)
    # Shapes never depend on shardings: trace unsharded, then derive the shardings here,
    # where a sharding that splits a packed byte or a block is refused by the leaf's name.
    quantized = jax.eval_shape(run, jax.tree.map(_unsharded, abstract_params))

    def shard(path: tuple, leaf: Any, out: Any) -> Any:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(leaf, QArray):
            return jax.tree.map(lambda a: _sds(a, getattr(a, "sharding", None)), leaf)
        if sharding is None:
            return out
        if isinstance(out, LUTArray):
            return _shard_lut(path_str(path), out, sharding)
        if not isinstance(out, QArray):
            return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)
        return _shard_qarray(path_str(path), out, sharding)

    return jax.tree_util.tree_map_with_path(
        shard, abstract_params, quantized, is_leaf=lambda x: isinstance(x, QArray)
    )


def _shard_qarray(name: str, qa: QArray, sharding: jax.sharding.Sharding) -> QArray:
    """``qa`` (abstract) with each part sharded as :func:`abstract_quantized` says."""
    if not isinstance(sharding, NamedSharding):
        if not sharding.is_fully_replicated:
            raise TypeError(
                f"parameter {name!r}: its sharding {sharding} is neither a NamedSharding nor "
                "fully replicated; give the float params NamedShardings (jax.make_mesh, "
                "jax.sharding.NamedSharding) to derive the quantized ones"
            )
        return _map_parts(qa, lambda part, a: _sds(a, sharding))
    mesh = sharding.mesh
    spec = tuple(sharding.spec) + (None,) * (len(qa.shape) - len(sharding.spec))

    sharded = shard_fit.sharded_axes(mesh, spec)
    for axis, names, count in sharded:
        problem = shard_fit.split_block_problem(
            axis, qa.shape[axis], qa.scale.shape[axis], names, count, qa.spec.granularity
        )
        if qa.packed and axis == len(qa.shape) - 1:
            packs = qa.spec.target.packs
            problem = problem or shard_fit.split_byte_problem(
                axis, qa.shape[axis], names, count, packs
            )
        if problem:
            raise ValueError(f"parameter {name!r}: {problem}")

    def part_spec(part: str, a: Any) -> NamedSharding:
        if part == "data":
            return NamedSharding(mesh, PartitionSpec(*spec))
        kept = [None] * a.ndim
        for axis, names, count in sharded:
            if a.shape[axis] > 1 and a.shape[axis] % count == 0:
                kept[axis] = names
        return NamedSharding(mesh, PartitionSpec(*kept))

    return _map_parts(qa, lambda part, a: _sds(a, part_spec(part, a)))


def _shard_lut(name: str, la: LUTArray, sharding: jax.sharding.Sharding) -> LUTArray:
    """``la`` (abstract) with every part given ``sharding``, which must be fully replicated."""
    if not sharding.is_fully_replicated:
        raise ValueError(
            f"parameter {name!r}: its sharding {sharding} splits it, and sharded lookup-table "
            "targets (LUTArray: nf4, lut*) have no derived sharding yet; replicate it, or "
            "quantize it with a QuantSpec rule"
        )
    return jax.tree.map(lambda a: _sds(a, sharding), la)


def _unsharded(a: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _sds(a: Any, sharding: jax.sharding.Sharding | None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)


def _map_parts(qa: QArray, fn: Callable[[str, Any], Any]) -> QArray:
    """``qa`` with ``fn(name, part)`` applied to each part that is not None."""
    new = {p: getattr(qa, p) for p in _PARTS}
    new = {p: None if a is None else fn(p, a) for p, a in new.items()}
    return QArray(**new, spec=qa.spec, float_dtype=qa.float_dtype, packed=qa.packed, pad=qa.pad)


# --------------------------------------------------------------------------- parts and statics


def _is_qarray(x: Any) -> bool:
    return isinstance(x, (QArray, LUTArray))


def _split(x: Any) -> Any:
    """A QArray or LUTArray as its dict of parts; anything else as it is."""
    if isinstance(x, QArray):
        return {p: getattr(x, p) for p in _PARTS}
    if isinstance(x, LUTArray):
        return {p: getattr(x, p) for p in _LUT_PARTS}
    return x


def parts(tree: Any) -> Any:
    """``tree`` with each QArray and LUTArray replaced by its dict of parts.

    A QArray becomes ``{"data", "scale", "offset", "channel_scale", "tensor_scale"}``, a
    :class:`~qjax.palettize.LUTArray` (NF4, palettized weights) ``{"indices", "table",
    "scale"}`` (absent parts as None). Orbax stores a QArray node as exactly this dict, so
    a checkpoint saved from ``parts(tree)`` or from ``tree`` is the same; ``parts`` of a
    target restores into plain dicts, which :func:`from_parts` turns back into QArrays and
    LUTArrays.

    Examples:
      >>> import jax.numpy as jnp, qjax, qjax.orbax
      >>> p = qjax.orbax.parts({"w": qjax.quantize(jnp.ones((4, 8)), "int8")})
      >>> sorted(p["w"]), p["w"]["offset"]
      (['channel_scale', 'data', 'offset', 'scale', 'tensor_scale'], None)
    """
    return jax.tree.map(_split, tree, is_leaf=_is_qarray)


def from_parts(restored: Any, like: Any) -> Any:
    """Rebuilds the QArrays and LUTArrays of ``like`` (statics) from the dicts in ``restored``.

    Examples:
      >>> import jax.numpy as jnp, qjax, qjax.orbax
      >>> tree = {"w": qjax.quantize(jnp.ones((4, 8)), "int4")}
      >>> qjax.orbax.from_parts(qjax.orbax.parts(tree), tree)["w"].spec.dtype
      'int4'
    """

    def join(x: Any, got: Any) -> Any:
        if isinstance(x, LUTArray):
            return dataclasses.replace(x, **{p: got[p] for p in _LUT_PARTS})
        if not isinstance(x, QArray):
            return got
        return QArray(
            **{p: got[p] for p in _PARTS},
            spec=x.spec,
            float_dtype=x.float_dtype,
            packed=x.packed,
            pad=x.pad,
        )

    return jax.tree.map(join, like, restored, is_leaf=_is_qarray)


def metadata(tree: Any, *, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The QArrays' and LUTArrays' statics as JSON-able custom metadata.

    ``{METADATA_KEY: {"format": "qjax-orbax", "version": 1, "specs": [...],
    "qarrays": {keystr: {"spec": i, "float_dtype", "packed", "pad"}}}}``, keyed by
    ``jax.tree_util.keystr`` of each QArray's path; specs are encoded as in :mod:`qjax.io`.
    A tree with LUTArrays adds ``"luts": {keystr: {"bits", "pad", "float_dtype"}}`` and is
    version 2 (older qjax releases refuse it rather than restore LUTArrays as dicts).
    ``names`` (``"/"``-joined leaf path to original tensor name, as :func:`qjax.save`
    takes them) adds ``"names"``, which :func:`orbax_to_safetensors` writes back.

    Raises:
      ValueError: for a tree Orbax cannot store (see :func:`save`).
    """
    _check_storable(tree)
    specs: list[dict[str, Any]] = []
    ids: dict[Any, int] = {}
    qarrays, luts = {}, {}
    for path, qa in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qarray)[0]:
        if isinstance(qa, LUTArray):
            luts[jax.tree_util.keystr(path)] = {
                "bits": int(qa.bits),
                "pad": int(qa.pad),
                "float_dtype": np.dtype(qa.float_dtype).name,
            }
        if not isinstance(qa, QArray):
            continue
        if qa.spec not in ids:
            ids[qa.spec] = len(specs)
            specs.append(qio._encode_spec(qa.spec))
        qarrays[jax.tree_util.keystr(path)] = {
            "spec": ids[qa.spec],
            "float_dtype": qa.float_dtype,
            "packed": qa.packed,
            "pad": qa.pad,
        }
    custom: dict[str, Any] = {"format": _FORMAT, "version": _VERSION if luts else 1}
    custom.update(specs=specs, qarrays=qarrays)
    if luts:
        custom["luts"] = luts
    if names:
        custom["names"] = dict(names)
    return {METADATA_KEY: custom}


def _key_name(key: Any) -> str:
    """One entry of a key path as Orbax names it (tree/utils.py ``get_key_name``)."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _check_storable(tree: Any) -> None:
    for path, qa in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qarray)[0]:
        if isinstance(qa, QArray) and not qa.packed and qa.spec.target.name in _UNSTORABLE:
            raise ValueError(
                f"QArray at {path_str(path)!r}: unpacked {qa.spec.target.name} data cannot be "
                "stored in an Orbax checkpoint (tensorstore has no such dtype); quantize it "
                "with packed=True (the default)"
            )
    # Orbax names each array by its key path joined with ".": two paths with one name would
    # be written to one place, and one leaf restored as the other.
    seen: dict[str, Any] = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(parts(tree))[0]:
        name = ".".join(_key_name(k) for k in path)
        if name in seen:
            raise ValueError(
                f"the leaves at {jax.tree_util.keystr(seen[name])} and "
                f"{jax.tree_util.keystr(path)} would both be stored as {name!r}: Orbax joins "
                "key paths with '.', so one would overwrite the other; rename the keys that "
                "contain '.' (qjax.save keeps them apart)"
            )
        seen[name] = path


# --------------------------------------------------------------------------- save / restore


def save_async(
    path: str | os.PathLike[str], tree: Any, *, force: bool = False
) -> ocp.StandardCheckpointer:
    """Starts saving ``tree`` to the directory ``path``; returns the checkpointer.

    Returns once the arrays are copied off the devices; the files are written in the
    background: call ``.wait_until_finished()`` on the result (and ``.close()``) before
    reading them. Every process of a multi-process run calls it with the same tree; each
    writes the shards it holds. ``force=True`` replaces an existing checkpoint.
    """
    checkpointer = ocp.StandardCheckpointer()
    _save_with(checkpointer.save, path, tree, force)
    return checkpointer


def _save_with(
    save_fn: Callable[..., Any],
    path: Any,
    tree: Any,
    force: bool,
    names: Mapping[str, str] | None = None,
) -> None:
    """``save_fn(path, parts(tree), ...)`` with the qjax metadata, after checking the tree."""
    custom = metadata(tree, names=names)  # checks the tree before anything is written
    save_fn(os.path.abspath(path), parts(tree), force=force, custom_metadata=custom)


def save(path: str | os.PathLike[str], tree: Any, *, force: bool = False) -> None:
    """Saves a tree of QArrays, LUTArrays and arrays to the Orbax checkpoint directory ``path``.

    ``ocp.StandardCheckpointer`` with the QArrays' and LUTArrays' statics in its custom
    metadata; each process writes only its shards. Waits until the checkpoint is committed.

    Raises:
      ValueError: before anything is written, for unpacked uint4 / uint2 data, naming the
        leaf, and for two leaves whose key paths Orbax would store under one name (it joins
        them with ``.``: ``{"a.b": x, "a": {"b": y}}``), naming both; Orbax's errors (an
        existing ``path`` without ``force=True``) as they are.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, numpy as np, qjax, qjax.orbax
      >>> tree = {"w": qjax.quantize(jnp.linspace(-1, 1, 256).reshape(8, 32), "int4")}
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> qjax.orbax.save(path, tree)
      >>> back = qjax.orbax.restore(path, qjax.orbax.checkpoint_target(path))
      >>> bool(np.array_equal(back["w"].data, tree["w"].data)), back["w"].spec.dtype
      (True, 'int4')
    """
    checkpointer = save_async(path, tree, force=force)
    checkpointer.wait_until_finished()
    checkpointer.close()


def restore(path: str | os.PathLike[str], target: Any = None) -> Any:
    """Restores a checkpoint of QArrays into ``target``'s structure, shapes and shardings.

    Leaves of 64-bit dtypes (int64, uint64, float64) come back as NumPy arrays unless JAX's
    x64 mode is on, as :func:`qjax.load` gives them: JAX would truncate them to 32 bits.

    Args:
      path: an Orbax checkpoint directory (saved by :func:`save`, or by Orbax from a
        QArray tree or its :func:`parts`).
      target: the abstract tree to fill (:func:`abstract_quantized`, or ``jax.tree.map``
        of ``ocp.utils.to_shape_dtype_struct`` over a tree): each array is read where its
        ``ShapeDtypeStruct.sharding`` puts it, on any mesh. None: from the checkpoint's
        own metadata (:func:`checkpoint_target`), on the default device.

    Returns:
      The tree, with QArrays and LUTArrays whose parts are ``jax.Array`` s, bit for bit as
      saved (64-bit leaves as NumPy arrays without x64).
    """
    path = os.path.abspath(path)
    if target is None:
        target = checkpoint_target(path)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, jax.tree.map(_host_if_wide, parts(target)))
    return from_parts(restored, target)


def _host_if_wide(leaf: Any) -> Any:
    """A 64-bit leaf JAX would truncate (x64 off) as a NumPy stand-in, which Orbax restores
    as a NumPy array of that dtype; a zero-strided view, so nothing is allocated."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or jax.dtypes.canonicalize_dtype(dtype) == dtype:
        return leaf
    return np.broadcast_to(np.zeros((), dtype), tuple(leaf.shape))


def checkpoint_target(
    path: str | os.PathLike[str],
    sharding: jax.sharding.Sharding | None = None,
    *,
    custom_metadata: Mapping[str, Any] | None = None,
) -> Any:
    """The abstract tree of a checkpoint written by :func:`save`, from its metadata alone.

    Containers come back as Orbax lists them (dicts and lists). Every array gets
    ``sharding`` (default: the first local device); for a sharded restore, build the target
    with :func:`abstract_quantized` instead. 64-bit leaves keep their dtype (see
    :func:`restore`).

    Args:
      path: the checkpoint (item) directory.
      sharding: of every array in the result.
      custom_metadata: where the statics are, if not in ``path`` itself: a
        ``CheckpointManager`` keeps them with the step, ``manager.metadata(step)
        .custom_metadata``, and the item in ``<step>/<item name>``.

    Raises:
      ValueError: for a checkpoint without qjax metadata (not written by :func:`save`), or
        with a newer version of it than this qjax reads.
    """
    path = os.path.abspath(path)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    step, custom = _qjax_metadata(path, custom_metadata)
    specs = [qio._decode_spec(s) for s in custom["specs"]]
    statics = custom["qarrays"]
    luts = custom.get("luts", {})

    def build(node: Any, path: tuple) -> Any:
        key = jax.tree_util.keystr(path)
        if key in luts:
            arrays = {p: None if node.get(p) is None else build(node[p], ()) for p in _LUT_PARTS}
            return LUTArray(**arrays, **luts[key])
        if key in statics:
            info = statics[key]
            arrays = {p: None if node.get(p) is None else build(node[p], ()) for p in _PARTS}
            return QArray(
                **arrays,
                spec=specs[info["spec"]],
                float_dtype=info["float_dtype"],
                packed=info["packed"],
                pad=info["pad"],
            )
        if isinstance(node, Mapping):
            return {k: build(v, (*path, jax.tree_util.DictKey(k))) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            children = [build(v, (*path, jax.tree_util.SequenceKey(i))) for i, v in enumerate(node)]
            return type(node)(children)
        if node is None:
            return None
        return jax.ShapeDtypeStruct(tuple(node.shape), node.dtype, sharding=sharding)

    return build(step.item_metadata.tree, ())


def _qjax_metadata(path: str, custom_metadata: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """The checkpoint's Orbax metadata and its qjax custom metadata, checked."""
    with ocp.StandardCheckpointer() as checkpointer:
        step = checkpointer.metadata(path)
    if custom_metadata is None:
        custom_metadata = step.custom_metadata
    custom = (custom_metadata or {}).get(METADATA_KEY)
    if not isinstance(custom, Mapping) or custom.get("format") != _FORMAT:
        raise ValueError(
            f"{path}: no qjax metadata in this Orbax checkpoint (custom_metadata[{METADATA_KEY!r}]"
            "); it was not written by qjax.orbax.save: pass the target tree, e.g. from "
            "qjax.orbax.abstract_quantized"
        )
    if custom.get("version") not in _READABLE_VERSIONS:
        raise ValueError(
            f"{path}: unsupported qjax-orbax metadata version {custom.get('version')!r}; this "
            f"qjax reads versions {', '.join(map(str, _READABLE_VERSIONS))}: restore it with "
            "the qjax release that wrote it"
        )
    return step, custom


# --------------------------------------------------------------------------- interop


def orbax_to_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    target: Any = None,
    *,
    batch_bytes: int = 64 * 2**20,
) -> None:
    """Writes the Orbax checkpoint ``src`` as one qjax ``.safetensors`` file ``dst``.

    Streaming: arrays are read from the checkpoint a batch at a time, and dropped once
    encoded (checksums, narrowed offsets) or written. Each is read twice, since the file's
    header (its checksums) comes before the tensors. The file is what :func:`qjax.save`
    writes for the restored tree (dict entries in key order, as JAX flattens them), with
    the original tensor names :func:`safetensors_to_orbax` kept (``qjax quantize`` 's), and
    :func:`qjax.load` reads it.

    Args:
      src: an Orbax checkpoint directory.
      dst: the file to write, atomically (see :func:`qjax.save`).
      target: the abstract tree (containers of dicts, lists, tuples); default
        :func:`checkpoint_target` of ``src`` (a checkpoint written by :func:`save`).
      batch_bytes: read about this many bytes per Orbax restore (at least one array):
        the memory the conversion holds, beside the largest tensor.
    """
    src = os.path.abspath(src)
    try:
        names = _qjax_metadata(src, None)[1].get("names")
    except ValueError:
        names = None  # not written by qjax: target given, no names
    target = checkpoint_target(src) if target is None else target
    target = jax.tree.map(lambda x: x, target, is_leaf=_is_qarray)  # dicts in key order
    with _LeafReader(src, target, batch_bytes) as reader:
        encoder = _StreamingEncoder(names)
        tree = encoder.node(reader.lazy_tree(), ())
        header = {"format": "qjax", "version": encoder.version, "tree": tree}
        header["specs"] = encoder.specs
        text = json.dumps(header, separators=(",", ":"), allow_nan=False)
        items = [(name, t.shape, t.stored) for name, t in encoder.tensors.items()]
        # The order write_safetensors writes in (by item size), for the reads ahead.
        written = sorted(encoder.tensors.values(), key=lambda t: -t.stored.itemsize)
        reader.order = [t.value.path for t in written if isinstance(t.value, _Lazy)]
        write_safetensors(
            dst,
            items,
            lambda name, dtype: encoder.tensors[name].read(),
            {qio.METADATA_KEY: text, qio.CHECKSUM_KEY: qio._text_crc32(text)},
        )


def safetensors_to_orbax(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, force: bool = False
) -> None:
    """Writes the qjax ``.safetensors`` file ``src`` as the Orbax checkpoint ``dst``.

    The file's tensors are memory-mapped, checked as :func:`qjax.load` checks them
    (metadata checksum, shapes, dtypes, CRC-32 of each tensor, every QArray against its
    spec) and handed to Orbax as NumPy arrays that it writes without copying them, about
    1 GB at a time: the quantized weights are never copied into memory as a whole. The
    checkpoint is the one :func:`save` writes; restore it with :func:`restore` (or
    :func:`checkpoint_target` for the abstract tree). The file's original tensor names
    (``qjax quantize`` stores them) are kept in the qjax metadata, for
    :func:`orbax_to_safetensors`.
    """
    src = os.fspath(src)
    with safe_open(src, framework="numpy") as file:
        decoder = _MappedDecoder(file, src)
        try:
            tree = decoder.checkpoint(file.metadata())
        except qio._Invalid as e:
            raise ValueError(qio._one_line(f"{src}: {e}")) from None
    names = {"/".join(map(str, p)): n for p, n, _ in decoder.leaves if n is not None}
    tree = jax.tree.map(np.asarray, tree)  # implied zero points: small jax arrays
    handler = ocp.PyTreeCheckpointHandler(
        type_handler_registry=ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, _OneAtATime()), (jax.Array, ocp.type_handlers.ArrayHandler())
        ),
    )
    with ocp.Checkpointer(handler) as checkpointer:

        def save_fn(path: str, item: Any, **kwargs: Any) -> None:
            checkpointer.save(path, args=ocp.args.PyTreeSave(item), **kwargs)

        _save_with(save_fn, dst, tree, force, names)


class _OneAtATime(ocp.type_handlers.NumpyHandler):
    """Orbax's NumPy handler, writing memory-mapped arrays as they are, one at a time."""

    def __init__(self) -> None:
        super().__init__(deepcopy_host_arrays=False)
        self._lock: asyncio.Lock | None = None

    async def _open_and_write(self, value: np.ndarray, tspec: Any, ts_context: Any) -> None:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            await super()._open_and_write(value, tspec, ts_context)


class _Lazy:
    """One array of an Orbax checkpoint, read (as NumPy) only when asked for."""

    def __init__(self, reader: _LeafReader, path: tuple, abstract: Any):
        self.reader, self.path = reader, path
        self.shape, self.dtype = tuple(abstract.shape), np.dtype(abstract.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.reader.read(self.path)
        return array if dtype is None else array.astype(dtype)


class _LeafReader:
    """Reads the arrays of an Orbax checkpoint in batches, in the order they are asked for.

    ``order`` lists the paths (``target``'s, flattened) in the order they will be read; a
    read that misses reads the next ``batch_bytes`` of them (every other leaf a
    placeholder); each array is handed out once, then dropped.
    """

    def __init__(self, path: str, target: Any, batch_bytes: int):
        self.path, self.batch_bytes = path, batch_bytes
        self.flat, self.treedef = jax.tree_util.tree_flatten_with_path(target)
        self.nbytes = {p: math.prod(a.shape) * np.dtype(a.dtype).itemsize for p, a in self.flat}
        self.order = [p for p, _ in self.flat]
        self.cache: dict[tuple, np.ndarray] = {}
        self.checkpointer = ocp.PyTreeCheckpointer()

    def __enter__(self) -> _LeafReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.checkpointer.close()

    def lazy_tree(self) -> Any:
        leaves = [_Lazy(self, path, leaf) for path, leaf in self.flat]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def read(self, path: tuple) -> np.ndarray:
        if path not in self.cache:
            self._fetch(path)
        return self.cache.pop(path)

    def _fetch(self, path: tuple) -> None:
        ahead = self.order[self.order.index(path) :] if path in self.order else [path]
        batch, size = set(), 0
        for p in ahead:
            if batch and size + self.nbytes[p] > self.batch_bytes:
                break
            batch.add(p)
            size += self.nbytes[p]
        leaves = [a if p in batch else ocp.PLACEHOLDER for p, a in self.flat]
        item = jax.tree_util.tree_unflatten(self.treedef, leaves)
        as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
        restore_args = jax.tree.map(
            lambda leaf: leaf if leaf is ocp.PLACEHOLDER else as_numpy, item
        )
        restored = self.checkpointer.restore(
            self.path,
            args=ocp.args.PyTreeRestore(item=parts(item), restore_args=parts(restore_args)),
        )
        restored = from_parts(restored, item)
        for p, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
            if p in batch:
                self.cache[p] = np.asarray(leaf)


class _Pending:
    """A tensor of the file being written: its stored shape and dtype, and how to read it."""

    def __init__(self, value: Any, array: np.ndarray, stored: np.dtype):
        self.shape, self.stored = array.shape, stored
        self.value = value if isinstance(value, _Lazy) else array  # small: kept

    def read(self) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.value)).view(self.stored)


class _StreamingEncoder(qio._Encoder):
    """:class:`qjax.io` 's encoder, keeping lazily read arrays unread until written."""

    def node(self, node: Any, path: qio.Path) -> Any:
        if isinstance(node, _Lazy):
            encoded = self.tensor(qio._tensor_name(path), node)
            return {"array": self.named_leaf(encoded, path)}
        return super().node(node, path)

    def lut(self, la: LUTArray, path: qio.Path) -> dict[str, Any]:
        """As :mod:`qjax.io` encodes it, without :meth:`LUTArray.validate` 's value checks,
        which would read the indices once more (:func:`qjax.load` checks them)."""
        if not any(isinstance(getattr(la, p), _Lazy) for p in _LUT_PARTS):
            return super().lut(la, path)
        return self.lut_parts(la, path)

    def tensor(self, name: str, value: Any) -> dict[str, Any]:
        encoded = super().tensor(name, value)
        stored = self.tensors[name]
        self.tensors[name] = _Pending(value, stored, stored.dtype)
        return encoded


class _MappedDecoder(qio._Decoder):
    """:class:`qjax.io` 's decoder, giving memory-mapped NumPy arrays instead of copies."""

    def __init__(self, file: Any, path: str):
        super().__init__(file, check_finite=True)
        self.path = path
        with open(path, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
            self.layout = json.loads(f.read(header_bytes))
        self.start = 8 + header_bytes

    def tensor(self, name: str, info: dict[str, Any]) -> Any:
        dtype = jax.numpy.dtype(info["dtype"])
        stored = qio._storage_dtype(dtype, name)
        entry = self.layout.get(name)
        shape = tuple(info["shape"])
        if name in self.used or entry is None:
            raise qio._Invalid(f"tensor {name!r} is missing or described twice")
        if (entry["dtype"], tuple(entry["shape"])) != (qio._NATIVE_DTYPES[stored.name], shape):
            raise qio._Invalid(
                f"tensor {name!r} does not match the qjax metadata: expected {dtype.name} "
                f"{list(shape)}, the file holds {entry['dtype']} {entry['shape']}"
            )
        begin = self.start + entry["data_offsets"][0]
        array = np.memmap(self.path, stored, "r", begin, shape) if math.prod(shape) else None
        array = np.zeros(shape, stored) if array is None else array
        if qio._crc32(array) != info["crc32"]:
            raise qio._Invalid(f"tensor {name!r} is corrupted: its bytes fail the CRC-32 check")
        array = array.view(dtype)
        if jax.numpy.issubdtype(dtype, jax.numpy.floating):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise qio._Invalid(f"tensor {name!r} holds {bad} non-finite value(s)")
        self.used.add(name)
        return array
