"""Checkpoint files: save and load pytrees of QArrays and arrays as one ``.safetensors`` file.

A tree of nested ``dict`` / ``list`` / ``tuple`` / ``None`` whose leaves are
:class:`~qjax.QArray` s or plain arrays (jax or NumPy) is written as one safetensors file:

* every array is one tensor. A QArray gives one to five: ``<path>:data`` (packed
  sub-byte values stay packed, one uint8 per 2 or 4 values), ``<path>:scale``, where
  the formulation has one that the spec does not fix, ``<path>:offset``, where it has
  channel scales (AWQ, SmoothQuant), ``<path>:channel_scale``, and where its spec has a
  tensor scale (NVFP4), ``<path>:tensor_scale``. ``<path>`` joins
  dict keys and list indices with ``/``; ``%``, ``/`` and ``:`` inside keys are
  percent-encoded (``%25``, ``%2F``, ``%3A``), so any string key round-trips;
* offsets are stored as small as the maths allows: a symmetric ``zero_point`` spec fixes
  every zero point (0 for signed targets, 128 / 8 / 2 for uint8 / uint4 / uint2), so
  none is stored (``"offset": "implied"``); other zero points are stored in the narrowest
  integer type that holds the target's range (int8 for signed targets, uint8 for
  unsigned ones) and come back as the int32 they were. Minvals stay float32;
* dtypes that safetensors cannot hold (int4, uint4, int2, uint2 unpacked, the float8 and
  float4 types, float8_e8m0fnu scales) are stored as a raw unsigned view of the same item
  size (uint8), so the round trip is bit-exact; bool, (u)int8-64, float16/32/64 and
  bfloat16 are stored as themselves;
* the safetensors metadata holds one JSON string under the key ``"qjax"`` and its CRC-32
  (8 hex digits) under ``"qjax_crc32"``::

    {"format": "qjax", "version": 2,
     "specs": [{"dtype": "int4", "scheme": "symmetric", "formulation": "scale",
                "granularity": {"kind": "per_channel", "axis": -1, ...},
                "scale_dtype": "float32"}, ...],
     "tree": {"dict": {"dense": {"dict": {
       "kernel": {"qarray": {"spec": 0, "float_dtype": "float32", "packed": true, "pad": 0,
                             "data": T, "scale": T, "offset": null, "name": "dense.kernel"}},
       "bias": {"array": {..T.., "name": "dense.bias"}}}}}}}

  where each ``T`` is ``{"dtype": <real dtype>, "shape": [...], "crc32": <checksum of the
  stored bytes>}``; an offset is ``null``, ``"implied"`` or a ``T``, with
  ``"offset_dtype"`` its dtype in memory; ``"channel_scale": T`` and ``"tensor_scale":
  T`` are there only where the QArray has them. Files are written in the oldest version
  that holds them (older qjax releases refuse newer versions rather than drop a part):
  version 2 without either, 3 with channel scales, 4 with tensor scales. ``"name"``
  (optional) is the leaf's original tensor name (``qjax quantize`` stores it;
  :func:`load_tensors` gives it back). A :class:`~qjax.palettize.LUTArray` (NF4,
  palettized weights; version 4) is ``{"lut": {"bits": n, "pad": p, "float_dtype": ...,
  "indices": T, "table": T, "scale": T or null}}``, its tensors ``<path>:indices`` (packed
  codes), ``<path>:table`` and ``<path>:scale``. Other nodes are ``{"list": [...]}``,
  ``{"tuple": [...]}`` and ``null``.

:func:`load` checks everything it reads (the metadata checksum, format version, tensor
names, dtypes, shapes, tensor checksums, every QArray against its spec, finite values)
and raises a one-line ``ValueError`` naming the file and what is wrong rather than
return different weights. Files of format version 1 (qjax 0.1.0 before metadata
checksums) are refused with a message saying to re-create them.

Tensors of 64-bit dtypes (int64, uint64, float64) load as NumPy arrays unless JAX's x64
mode is on: JAX would truncate them to 32 bits. Every other leaf loads as a jax array.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import stat
import zlib
from collections.abc import Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from qjax.granularity import Granularity
from qjax.palettize import LUTArray
from qjax.qarray import QArray
from qjax.spec import QuantSpec

__all__ = ["CHECKSUM_KEY", "FORMAT_VERSION", "METADATA_KEY", "load", "load_tensors", "save"]

FORMAT_VERSION = 4
"""The newest metadata layout. :func:`save` writes each file in the oldest version that
holds its tree, so older qjax releases read what they can: version 2 added the metadata
checksum, implied and narrowed offsets and tensor names; version 3 channel scales (AWQ,
SmoothQuant); version 4 tensor scales (NVFP4). :func:`load` reads versions 2 to 4."""

_READABLE_VERSIONS = (2, 3, FORMAT_VERSION)
_OPTIONAL_PARTS = {"channel_scale": 3, "tensor_scale": 4}
"""QArray leaves stored only where present, and the format version that added each."""
_LUT_PARTS = ("indices", "table", "scale")
_LUT_VERSION = 4
"""Lookup-table arrays (:class:`~qjax.palettize.LUTArray`) came with version 4."""

METADATA_KEY = "qjax"
"""The safetensors metadata key that holds the qjax JSON."""

CHECKSUM_KEY = "qjax_crc32"
"""The safetensors metadata key that holds the CRC-32 of the qjax JSON (8 hex digits)."""

PathLike = Union[str, "os.PathLike[str]"]
Path = tuple[Union[str, int], ...]

_NATIVE_DTYPES = {
    "bool": "BOOL",
    "int8": "I8",
    "uint8": "U8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
}
"""dtypes stored as themselves, with their safetensors code."""

_RAW_VIEWS = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}
"""Unsigned views, by item size, for the dtypes safetensors cannot hold."""

_NARROW_INTS = tuple(
    np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32)
)
"""Candidates for stored zero points, narrowest first (unsigned ones for ranges from 0)."""

IMPLIED = "implied"
"""The offset entry of a QArray whose zero points the spec fixes (none stored)."""


class _Invalid(Exception):
    """A problem with the file's content; :func:`load` reports it as a ValueError."""


def save(
    path: PathLike,
    tree: Any,
    *,
    names: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Saves a pytree of QArrays and arrays to one ``.safetensors`` file, atomically.

    The file is written next to ``path`` under a temporary name and then renamed over
    ``path``, so a crash never leaves a half-written file there. Only a regular file or a
    new path is written: a directory, device, FIFO or socket at ``path`` is refused, and a
    symbolic link is written through (its target is replaced). A new file's permissions
    follow the umask, as with ``numpy.save``. See the module docstring for the layout and
    :mod:`qjax.files` for the writer.

    Args:
      path: the file to write (conventionally ending in ``.safetensors``); replaced if it
        exists. Its directory must exist.
      tree: nested ``dict`` (string keys) / ``list`` / ``tuple`` / ``None`` whose leaves
        are :class:`~qjax.QArray` s or jax / NumPy arrays of a numeric or bool dtype.
      names: optional original tensor names by leaf path (keys joined with ``/``, as
        :func:`qjax.leaf_specs` shows them); stored, and given back by :func:`load_tensors`.
      metadata: optional string entries for the file's safetensors metadata, beside
        qjax's own (``qjax quantize`` keeps the source file's, such as transformers'
        ``{"format": "flax"}``, and ``qjax dequantize`` writes them back); given back by
        :func:`user_metadata`.

    Raises:
      TypeError: for a non-string dict key, an unsupported container or leaf type (named
        by its path), or an unsupported dtype.
      ValueError: for a ``names`` entry that names no leaf, or a path that is not a regular
        file.
      FileNotFoundError: when the directory of ``path`` does not exist.
      OSError: when writing fails (e.g. "no space left on <path>"); ``path`` is unchanged.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, qjax
      >>> from qjax import io
      >>> w = jnp.linspace(-1.0, 1.0, 64 * 32).reshape(64, 32)
      >>> spec = qjax.QuantSpec("int4", granularity=qjax.per_channel(-1))
      >>> tree = {"dense": {"kernel": qjax.quantize(w, spec), "bias": jnp.zeros(32)}}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = os.path.join(tmp, "model.safetensors")
      ...     io.save(path, tree)
      ...     restored = io.load(path)
      >>> kernel = restored["dense"]["kernel"]
      >>> kernel.spec == spec, kernel.data.nbytes  # 64 * 32 int4 values in 1024 bytes
      (True, 1024)
      >>> bool((kernel.data == tree["dense"]["kernel"].data).all())
      True
    """
    encoder = _Encoder(names)
    encoded_tree = encoder.node(tree, ())
    header = {
        "format": "qjax",
        "version": encoder.version,
        "tree": encoded_tree,
        "specs": encoder.specs,
    }
    unused = sorted(set(encoder.names) - encoder.named)
    if unused:
        raise ValueError(f"names given for paths that hold no array leaf: {unused[:3]}")
    text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    metadata = {**_user_entries(metadata), METADATA_KEY: text, CHECKSUM_KEY: _text_crc32(text)}
    tensors = encoder.tensors
    items = [(name, array.shape, array.dtype) for name, array in tensors.items()]
    from qjax.files import write_safetensors  # qjax.files builds on this module

    write_safetensors(path, items, lambda name, dtype: tensors[name], metadata)


def load(path: PathLike, *, check_finite: bool = True) -> Any:
    """Loads a tree written by :func:`save`, bit-exactly.

    Args:
      path: a file written by :func:`save`. It is only read, never modified.
      check_finite: refuse float tensors (plain leaves, scales, minvals, float8 values)
        that hold NaN or inf, naming the parameter. Pass False to load them anyway.

    Returns:
      The saved structure (dicts, lists, tuples, None) with :class:`~qjax.QArray` leaves
      whose data, scale and offset are bit-identical jax arrays and whose spec equals the
      saved one, and plain leaves as jax arrays of their saved dtype (NumPy arrays for
      64-bit dtypes while JAX's x64 mode is off, since JAX would truncate them).

    Raises:
      FileNotFoundError: when ``path`` does not exist.
      ValueError: when ``path`` is a directory, the file is not a valid safetensors file
        (truncated, corrupted), is not a qjax checkpoint, has an unsupported format
        version, its metadata fails its checksum or does not match its tensors, or a
        QArray does not fit its spec. The one-line message names the file and the problem.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, numpy as np, qjax
      >>> from qjax import io
      >>> x = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
      >>> tree = [qjax.quantize(x, qjax.QuantSpec("mxfp4")), (jnp.arange(3),)]
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     io.save(os.path.join(tmp, "w.safetensors"), tree)
      ...     qa, (steps,) = io.load(os.path.join(tmp, "w.safetensors"))
      >>> qa.shape, qa.scale.dtype, steps
      ((2, 32), dtype(float8_e8m0fnu), Array([0, 1, 2], dtype=int32))
      >>> with tempfile.TemporaryDirectory() as tmp:  # int64 without x64: a NumPy array
      ...     io.save(os.path.join(tmp, "p.safetensors"), {"ids": np.arange(3)})
      ...     io.load(os.path.join(tmp, "p.safetensors"))
      {'ids': array([0, 1, 2])}
    """
    return _read(path, check_finite)[0]


def load_tensors(path: PathLike, *, check_finite: bool = True) -> dict[str, Any]:
    """Loads a file written by :func:`save` as a flat ``{tensor name: leaf}`` dict.

    Leaves saved with a name (``qjax quantize`` saves every tensor's original name, e.g.
    ``"Dense_0.kernel"``) come back under it; others under their ``/``-joined path.
    ``None`` leaves and empty containers are left out. Checks as :func:`load`.

    Raises:
      ValueError: as :func:`load`, and when two leaves would get the same name.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from qjax import io
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = os.path.join(tmp, "w.safetensors")
      ...     io.save(path, {"Dense_0": {"kernel": jnp.ones(2)}, "step": jnp.int32(3)},
      ...             names={"Dense_0/kernel": "Dense_0.kernel"})
      ...     sorted(io.load_tensors(path))
      ['Dense_0.kernel', 'step']
    """
    _, leaves = _read(path, check_finite)
    out: dict[str, Any] = {}
    for leaf_path, name, leaf in leaves:
        key = name if name is not None else "/".join(str(k) for k in leaf_path)
        if key in out:
            raise ValueError(f"{os.fspath(path)}: two leaves are named {key!r}")
        out[key] = leaf
    return out


def user_metadata(path: PathLike) -> dict[str, str]:
    """The safetensors metadata entries of a file written by :func:`save` other than qjax's
    own: what ``metadata=`` gave it.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from qjax import io
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = os.path.join(tmp, "w.safetensors")
      ...     io.save(path, {"w": jnp.ones(2)}, metadata={"format": "flax"})
      ...     io.user_metadata(path)
      {'format': 'flax'}
    """
    from qjax.files import SafetensorsCheckpoint  # qjax.files builds on this module

    entries = SafetensorsCheckpoint(os.fspath(path)).metadata()
    return {k: v for k, v in entries.items() if k not in (METADATA_KEY, CHECKSUM_KEY)}


def _user_entries(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """``metadata`` checked: string keys and values, none of them qjax's own keys."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata must map str to str (safetensors stores text), got {key!r}: "
                f"{type(value).__name__}"
            )
        _check_text(key, "metadata key")
        _check_text(value, f"metadata value of {key!r}")
        if key in (METADATA_KEY, CHECKSUM_KEY):
            raise ValueError(f"metadata key {key!r} is qjax's own; choose another key")
    return dict(metadata)


def _read(path: PathLike, check_finite: bool) -> tuple[Any, list[tuple[Path, str | None, Any]]]:
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such qjax checkpoint file", path) from None
    if not stat.S_ISREG(mode):  # a FIFO would block, a device would be read forever
        from qjax.files import file_kind

        raise ValueError(f"{path}: is a {file_kind(mode)}, not a qjax checkpoint file")
    try:
        with safe_open(path, framework="numpy") as file:
            decoder = _Decoder(file, check_finite)
            return decoder.checkpoint(file.metadata()), decoder.leaves
    except _Invalid as e:
        raise ValueError(_one_line(f"{path}: {e}")) from None
    except SafetensorError as e:
        message = f"{path}: not a valid safetensors file (truncated or corrupted?): {e}"
        raise ValueError(_one_line(message)) from None
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, RecursionError) as e:
        message = f"{path}: malformed qjax metadata ({type(e).__name__}: {e})"
        raise ValueError(_one_line(message)) from None


# Saving.


class _Encoder:
    """Walks a tree, collecting its tensors (by name) and its distinct specs."""

    def __init__(self, names: Mapping[str, str] | None):
        self.tensors: dict[str, np.ndarray] = {}
        self.specs: list[dict[str, Any]] = []
        self._spec_ids: dict[QuantSpec, int] = {}
        self.names = dict(names or {})
        self.named: set[str] = set()
        self._leaf_names: dict[str, str] = {}  # stored name -> leaf path, where names given
        self.version = 2  # raised by the optional parts a QArray holds

    def node(self, node: Any, path: Path) -> Any:
        if isinstance(node, QArray):
            return {"qarray": self.named_leaf(self.qarray(node, path), path)}
        if isinstance(node, LUTArray):
            return {"lut": self.named_leaf(self.lut(node, path), path)}
        if node is None:
            return None
        if type(node) is dict:
            for key in node:
                if not isinstance(key, str):
                    raise TypeError(
                        f"dict key {key!r} ({type(key).__name__}) at {_show(path)} is not a "
                        "string; qjax.io.save needs string keys: convert them with str()"
                    )
                _check_text(key, f"dict key {key!r} at {_show(path)}")
            return {"dict": {key: self.node(child, path + (key,)) for key, child in node.items()}}
        if type(node) in (list, tuple):
            children = [self.node(child, path + (i,)) for i, child in enumerate(node)]
            return {type(node).__name__: children}
        if isinstance(node, (jax.Array, np.ndarray, np.generic)):
            return {"array": self.named_leaf(self.tensor(_tensor_name(path), node), path)}
        raise TypeError(
            f"cannot save {type(node).__name__} at {_show(path)}: qjax.io.save takes nested "
            "dict / list / tuple / None with QArray or array leaves; convert other containers "
            "(e.g. flax FrozenDict, namedtuple) to dict / tuple and scalars to arrays"
        )

    def named_leaf(self, encoded: dict[str, Any], path: Path) -> dict[str, Any]:
        key = "/".join(str(k) for k in path)
        name = key
        if key in self.names:
            name = self.names[key]
            if not isinstance(name, str):
                raise TypeError(f"names[{key!r}] must be a string, got {type(name).__name__}")
            _check_text(name, f"names[{key!r}]")
            encoded["name"] = name
            self.named.add(key)
        if self.names:  # the names load_tensors and the command line give the leaves
            other = self._leaf_names.setdefault(name, key)
            if other != key:
                raise ValueError(
                    f"names: the leaves at {other!r} and {key!r} would both be named "
                    f"{name!r}; give each leaf its own name"
                )
        return encoded

    def qarray(self, qa: QArray, path: Path) -> dict[str, Any]:
        try:
            qa.validate()
        except ValueError as e:
            raise ValueError(f"cannot save the QArray at {_show(path)}: {e}") from None
        encoded: dict[str, Any] = {
            "spec": self.spec_id(qa.spec),
            "float_dtype": jnp.dtype(qa.float_dtype).name,
            "packed": bool(qa.packed),
            "pad": int(qa.pad),
            "data": self.tensor(_tensor_name(path, "data"), qa.data),
            "scale": self.tensor(_tensor_name(path, "scale"), qa.scale),
            "offset": None,
        }
        if qa.offset is not None:
            offset = np.asarray(qa.offset)
            encoded["offset_dtype"] = offset.dtype.name
            encoded["offset"] = self.offset(qa.spec, offset, _tensor_name(path, "offset"))
        for part, version in _OPTIONAL_PARTS.items():
            value = getattr(qa, part, None)
            if value is not None:
                encoded[part] = self.tensor(_tensor_name(path, part), value)
                self.version = max(self.version, version)
        return encoded

    def lut(self, la: LUTArray, path: Path) -> dict[str, Any]:
        try:
            la.validate()
        except ValueError as e:
            raise ValueError(f"cannot save the LUTArray at {_show(path)}: {e}") from None
        return self.lut_parts(la, path)

    def lut_parts(self, la: LUTArray, path: Path) -> dict[str, Any]:
        """A LUTArray's encoding, its values unchecked (:meth:`lut` checks them first)."""
        self.version = max(self.version, _LUT_VERSION)
        encoded: dict[str, Any] = {
            "bits": int(la.bits),
            "pad": int(la.pad),
            "float_dtype": jnp.dtype(la.float_dtype).name,
        }
        for part in _LUT_PARTS:
            value = getattr(la, part)
            encoded[part] = None if value is None else self.tensor(_tensor_name(path, part), value)
        return encoded

    def offset(self, spec: QuantSpec, offset: np.ndarray, name: str) -> Any:
        if spec.formulation != "zero_point" or not np.issubdtype(offset.dtype, np.integer):
            return self.tensor(name, offset)
        fixed = spec.symmetric_zero_point
        if fixed is not None and bool(np.all(offset == fixed)):
            return IMPLIED
        return self.tensor(name, offset.astype(_narrowest_int(offset, spec)))

    def spec_id(self, spec: QuantSpec) -> int:
        if spec not in self._spec_ids:
            self._spec_ids[spec] = len(self.specs)
            self.specs.append(_encode_spec(spec))
        return self._spec_ids[spec]

    def tensor(self, name: str, value: jax.Array | np.ndarray) -> dict[str, Any]:
        array = np.asarray(value, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        stored = array.view(_storage_dtype(array.dtype, name))
        self.tensors[name] = stored
        return {"dtype": array.dtype.name, "shape": list(array.shape), "crc32": _crc32(stored)}


def _narrowest_int(values: np.ndarray, spec: QuantSpec) -> np.dtype:
    """The narrowest integer dtype that holds the spec's range [qmin, qmax] (int8 for signed
    targets, uint8 for unsigned ones), or failing that the values' own range."""
    low, high = int(spec.qmin), int(spec.qmax)
    if values.size and not (low <= int(values.min()) and int(values.max()) <= high):
        low, high = int(values.min()), int(values.max())
    for dtype in _NARROW_INTS:
        info = np.iinfo(dtype)
        if (info.min == 0) == (low >= 0) and info.min <= low and high <= info.max:
            return dtype
    return values.dtype


def _encode_spec(spec: QuantSpec) -> dict[str, Any]:
    encoded = {}
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if isinstance(value, Granularity):
            value = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
        if field.name == "tensor_scale" and not value:
            continue  # as files before version 4 have it, so older releases read them
        encoded[field.name] = value
    try:
        survives = _decode_spec(json.loads(json.dumps(encoded))) == spec
    except (TypeError, ValueError) as e:
        survives, why = False, f": {e}"
    else:
        why = ""
    if not survives:
        raise TypeError(f"cannot save spec {spec}: it does not survive a JSON round trip{why}")
    return encoded


# Loading.


class _Decoder:
    """Rebuilds a tree from the qjax metadata, reading and checking each tensor."""

    def __init__(self, file: Any, check_finite: bool):
        self.file = file
        self.check_finite = check_finite
        self.names = set(file.keys())
        self.used: set[str] = set()
        self.specs: list[QuantSpec] = []
        self.leaves: list[tuple[Path, str | None, Any]] = []

    def checkpoint(self, metadata: dict[str, str] | None) -> Any:
        header = _header(metadata)
        self.specs = [self.spec(i, fields) for i, fields in enumerate(header["specs"])]
        tree = self.node(header["tree"], ())
        extra = sorted(self.names - self.used)
        if extra:
            raise _Invalid(
                f"the file holds {len(extra)} tensor(s) the qjax metadata does not describe, "
                f"e.g. {extra[:3]}"
            )
        return tree

    def spec(self, index: int, fields: dict[str, Any]) -> QuantSpec:
        try:
            return _decode_spec(fields)
        except (TypeError, ValueError) as e:
            raise _Invalid(f"invalid spec #{index} in the qjax metadata: {e}") from None

    def node(self, node: Any, path: Path) -> Any:
        if node is None:
            return None
        if not isinstance(node, dict) or len(node) != 1:
            raise _Invalid(f"corrupted qjax metadata: bad tree node at {_show(path)}")
        ((kind, body),) = node.items()
        if kind == "dict" and isinstance(body, dict):
            return {key: self.node(child, path + (key,)) for key, child in body.items()}
        if kind in ("list", "tuple") and isinstance(body, list):
            children = [self.node(child, path + (i,)) for i, child in enumerate(body)]
            return children if kind == "list" else tuple(children)
        if kind == "array":
            leaf = self.tensor(_tensor_name(path), body)
        elif kind == "qarray":
            leaf = self.qarray(body, path)
        elif kind == "lut":
            leaf = self.lut(body, path)
        else:
            raise _Invalid(f"corrupted qjax metadata: unknown node kind {kind!r} at {_show(path)}")
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise _Invalid(f"corrupted qjax metadata: name {name!r} at {_show(path)}")
        self.leaves.append((path, name, leaf))
        return leaf

    def qarray(self, body: dict[str, Any], path: Path) -> QArray:
        spec_id = body["spec"]
        if type(spec_id) is not int or not 0 <= spec_id < len(self.specs):
            raise _Invalid(f"QArray at {_show(path)} refers to unknown spec #{spec_id!r}")
        spec = self.specs[spec_id]
        data = self.tensor(_tensor_name(path, "data"), body["data"])
        scale = self.tensor(_tensor_name(path, "scale"), body["scale"])
        offset = self.offset(body, spec, scale.shape, path)
        optional = {
            part: self.tensor(_tensor_name(path, part), body[part])
            for part in _OPTIONAL_PARTS
            if body.get(part) is not None
        }
        try:
            qa = QArray(
                data=data,
                scale=scale,
                offset=offset,
                **optional,
                spec=spec,
                float_dtype=body["float_dtype"],
                packed=body["packed"],
                pad=body["pad"],
            ).validate()
        except (TypeError, ValueError) as e:
            raise _Invalid(f"QArray at {_show(path)} does not fit its spec: {e}") from None
        return qa

    def lut(self, body: dict[str, Any], path: Path) -> LUTArray:
        parts = {
            part: None if body[part] is None else self.tensor(_tensor_name(path, part), body[part])
            for part in _LUT_PARTS
        }
        try:
            return LUTArray(
                **parts, bits=body["bits"], pad=body["pad"], float_dtype=body["float_dtype"]
            ).validate()
        except (TypeError, ValueError) as e:
            raise _Invalid(f"LUTArray at {_show(path)} is not valid: {e}") from None

    def offset(
        self, body: dict[str, Any], spec: QuantSpec, shape: tuple[int, ...], path: Path
    ) -> jax.Array | None:
        entry = body["offset"]
        if entry is None:
            return None
        dtype = jnp.dtype(body["offset_dtype"])
        if entry == IMPLIED:
            fixed = spec.symmetric_zero_point
            if spec.formulation != "zero_point" or fixed is None:
                raise _Invalid(
                    f"QArray at {_show(path)}: spec {spec} does not fix its zero points, but "
                    "the file has none stored"
                )
            return jnp.full(shape, fixed, dtype)
        stored = self.tensor(_tensor_name(path, "offset"), entry)
        if stored.dtype != dtype:
            integers = jnp.issubdtype(stored.dtype, jnp.integer)
            if not (integers and jnp.issubdtype(dtype, jnp.integer)):
                raise _Invalid(
                    f"QArray at {_show(path)}: offset stored as {stored.dtype.name} cannot "
                    f"stand for {dtype.name}"
                )
            stored = stored.astype(dtype)
        return stored

    def tensor(self, name: str, info: dict[str, Any]) -> Any:
        if name not in self.names:
            raise _Invalid(f"tensor {name!r} is in the qjax metadata but not in the file")
        if name in self.used:
            raise _Invalid(f"tensor {name!r} is described twice in the qjax metadata")
        try:
            dtype = jnp.dtype(info["dtype"])
            stored = _storage_dtype(dtype, name)
        except TypeError as e:
            raise _Invalid(f"tensor {name!r}: {e}") from None
        shape = tuple(info["shape"])
        found = self.file.get_slice(name)
        found_dtype, found_shape = found.get_dtype(), tuple(found.get_shape())
        if (found_dtype, found_shape) != (_NATIVE_DTYPES[stored.name], shape):
            raise _Invalid(
                f"tensor {name!r} does not match the qjax metadata: expected {dtype.name} "
                f"{list(shape)} (stored as {_NATIVE_DTYPES[stored.name]}), the file holds "
                f"{found_dtype} {list(found_shape)}"
            )
        array = self.file.get_tensor(name)
        if _crc32(array) != info["crc32"]:
            raise _Invalid(f"tensor {name!r} is corrupted: its bytes fail the CRC-32 check")
        array = array.view(dtype)
        if self.check_finite and jnp.issubdtype(dtype, jnp.floating):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise _Invalid(
                    f"tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); pass "
                    "check_finite=False to load it anyway"
                )
        self.used.add(name)
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            return array  # 64-bit without x64: JAX would truncate it
        return jnp.asarray(array)


def _header(metadata: dict[str, str] | None) -> dict[str, Any]:
    """The qjax JSON of a file, after its checksum and format version are checked."""
    if not metadata or METADATA_KEY not in metadata:
        raise _Invalid(
            f"not a qjax checkpoint: it has no {METADATA_KEY!r} metadata; use qjax.load "
            "only on files written by qjax.save"
        )
    text = metadata[METADATA_KEY]
    checksum = metadata.get(CHECKSUM_KEY)
    if checksum is None and _version_of(text) == 1:
        raise _Invalid(
            "qjax format version 1 (written by qjax 0.1.0 without a metadata checksum) is no "
            "longer read; this qjax reads versions 2 to 4: re-create the file with "
            "qjax.save or qjax quantize from the float weights"
        )
    if checksum != _text_crc32(text):
        raise _Invalid(
            "corrupted qjax metadata: it fails its CRC-32 check "
            + (f"(no {CHECKSUM_KEY!r} entry)" if checksum is None else "")
        )
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Invalid(f"corrupted qjax metadata: not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != "qjax":
        raise _Invalid("corrupted qjax metadata: no 'format': 'qjax' entry")
    version = header.get("version")
    if type(version) is not int or version not in _READABLE_VERSIONS:
        raise _Invalid(
            f"unsupported qjax format version {version!r}; this qjax reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}: load it with the qjax release that "
            "wrote it"
        )
    return header


def _version_of(text: str) -> Any:
    try:
        header = json.loads(text)
    except json.JSONDecodeError:
        return None
    return header.get("version") if isinstance(header, dict) else None


def _decode_spec(fields: dict[str, Any]) -> QuantSpec:
    fields = dict(fields)
    granularity = fields.get("granularity")
    if isinstance(granularity, dict):
        granularity = dict(granularity)
        if granularity.get("explicit") is not None:
            granularity["explicit"] = tuple(granularity["explicit"])
        fields["granularity"] = Granularity(**granularity)
    return QuantSpec(**fields)


# Shared helpers.


def _storage_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The dtype a tensor is stored as: itself, or a raw unsigned view of the same size."""
    if dtype.name in _NATIVE_DTYPES:
        return dtype
    known = jnp.issubdtype(dtype, jnp.number) and jnp.dtype(dtype.name) == dtype
    if not known or dtype.itemsize not in _RAW_VIEWS or not _jax_holds(dtype.name):
        raise TypeError(
            f"cannot store tensor {name!r} of dtype {dtype}: qjax.io holds bool, integer "
            "and floating-point arrays of the types JAX computes with (including its "
            "ml_dtypes types)"
        )
    return _RAW_VIEWS[dtype.itemsize]


@functools.cache
def _jax_holds(name: str) -> bool:
    """Whether this JAX makes arrays of the dtype named ``name`` (ml_dtypes defines some,
    such as float6_e2m3fn or int1, that it cannot)."""
    probe = np.arange(16).astype(np.dtype(name))  # several elements: one can pass by luck
    try:
        back = np.asarray(jnp.asarray(probe))
    except Exception:  # XLA's errors for types it cannot hold vary by version
        return False
    return back.dtype == probe.dtype and back.tobytes() == probe.tobytes()


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.asarray(array, order="C").reshape(-1).view(np.uint8))


def _text_crc32(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8', 'surrogatepass')):08x}"


def _tensor_name(path: Path, part: str | None = None) -> str:
    name = "/".join(_escape(key) if isinstance(key, str) else str(key) for key in path)
    if name == "__metadata__":  # safetensors reserves this key for its metadata
        name = "%5F" + name[1:]
    return name if part is None else f"{name}:{part}"


def _check_text(text: str, what: str) -> None:
    """Refuses text that UTF-8 cannot encode (a lone surrogate, as ``os.listdir`` gives for
    undecodable bytes): the file's JSON header could not hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid Unicode text ({e.reason} at position {e.start}), which "
            "a safetensors header cannot hold; decode it properly (e.g. os.fsdecode) or "
            "rename it"
        ) from None


def _escape(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F").replace(":", "%3A")


def _show(path: Path) -> str:
    return repr("/".join(str(key) for key in path)) if path else "the root"


def _one_line(message: str) -> str:
    return " ".join(message.split())
