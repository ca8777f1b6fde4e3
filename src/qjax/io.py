"""Checkpoint files: save and load pytrees of QArrays and arrays as one ``.safetensors`` file.

A tree of nested ``dict`` / ``list`` / ``tuple`` / ``None`` whose leaves are
:class:`~qjax.QArray` s or plain arrays (jax or NumPy) is written as one safetensors file:

* every array is one tensor. A QArray gives two or three: ``<path>:data`` (packed
  sub-byte values stay packed, one uint8 per 2 or 4 values), ``<path>:scale`` and, where
  the formulation has one, ``<path>:offset``. ``<path>`` joins dict keys and list indices
  with ``/``; ``%``, ``/`` and ``:`` inside keys are percent-encoded (``%25``, ``%2F``,
  ``%3A``), so any string key round-trips;
* dtypes that safetensors cannot hold (int4, uint4, int2, uint2 unpacked, the float8 and
  float4 types, float8_e8m0fnu scales) are stored as a raw unsigned view of the same item
  size (uint8), so the round trip is bit-exact; bool, (u)int8-64, float16/32/64 and
  bfloat16 are stored as themselves;
* the safetensors metadata holds one JSON string under the key ``"qjax"``::

    {"format": "qjax", "version": 1,
     "specs": [{"dtype": "int4", "scheme": "symmetric", "formulation": "scale",
                "granularity": {"kind": "per_channel", "axis": -1, ...},
                "scale_dtype": "float32"}, ...],
     "tree": {"dict": {"dense": {"dict": {
       "kernel": {"qarray": {"spec": 0, "float_dtype": "float32", "packed": true, "pad": 0,
                             "data": T, "scale": T, "offset": null}},
       "bias": {"array": T}}}}}}

  where each ``T`` is ``{"dtype": <real dtype>, "shape": [...], "crc32": <checksum of the
  stored bytes>}``. Other nodes are ``{"list": [...]}``, ``{"tuple": [...]}`` and ``null``.
  Tensor names are not stored: they follow from the tree paths.

:func:`load` checks everything it reads (format version, tensor names, dtypes, shapes,
checksums, spec and QArray consistency, finite values) and raises a one-line
``ValueError`` naming the file and what is wrong rather than return wrong weights.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import zlib
from collections.abc import Iterable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from qjax.granularity import Granularity
from qjax.qarray import QArray
from qjax.spec import QuantSpec

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "load", "save"]

FORMAT_VERSION = 1
"""Version of the metadata layout written by :func:`save`; :func:`load` reads only this."""

METADATA_KEY = "qjax"
"""The safetensors metadata key that holds the qjax JSON."""

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

_PARTS = ("data", "scale", "offset")


class _Invalid(Exception):
    """A problem with the file's content; :func:`load` reports it as a ValueError."""


def save(path: PathLike, tree: Any) -> None:
    """Saves a pytree of QArrays and arrays to one ``.safetensors`` file, atomically.

    The file is written next to ``path`` under a temporary name and then renamed over
    ``path``, so a crash never leaves a half-written file there. See the module docstring
    for the layout.

    Args:
      path: the file to write (conventionally ending in ``.safetensors``); replaced if it
        exists. Its directory must exist.
      tree: nested ``dict`` (string keys) / ``list`` / ``tuple`` / ``None`` whose leaves
        are :class:`~qjax.QArray` s or jax / NumPy arrays of a numeric or bool dtype.

    Raises:
      TypeError: for a non-string dict key, an unsupported container or leaf type (named
        by its path), or an unsupported dtype.
      FileNotFoundError: when the directory of ``path`` does not exist.

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
    path = os.fspath(path)
    encoder = _Encoder()
    header = {
        "format": "qjax",
        "version": FORMAT_VERSION,
        "tree": encoder.node(tree, ()),
        "specs": encoder.specs,
    }
    metadata = {METADATA_KEY: json.dumps(header, separators=(",", ":"), allow_nan=False)}
    _write_atomically(path, encoder.tensors, metadata)


def load(path: PathLike, *, check_finite: bool = True) -> Any:
    """Loads a tree written by :func:`save`, bit-exactly.

    Args:
      path: a file written by :func:`save`. It is only read, never modified.
      check_finite: refuse float tensors (plain leaves, scales, minvals, float8 values)
        that hold NaN or inf, naming the parameter. Pass False to load them anyway.

    Returns:
      The saved structure (dicts, lists, tuples, None) with :class:`~qjax.QArray` leaves
      whose data, scale and offset are bit-identical jax arrays and whose spec equals the
      saved one, and plain leaves as jax arrays of their saved dtype.

    Raises:
      FileNotFoundError: when ``path`` does not exist.
      ValueError: when the file is not a valid safetensors file (truncated, corrupted),
        is not a qjax checkpoint, has an unsupported format version, or its metadata does
        not match its tensors. The one-line message names the file and the problem.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, qjax
      >>> from qjax import io
      >>> x = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
      >>> tree = [qjax.quantize(x, qjax.QuantSpec("mxfp4")), (jnp.arange(3),)]
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     io.save(os.path.join(tmp, "w.safetensors"), tree)
      ...     qa, (steps,) = io.load(os.path.join(tmp, "w.safetensors"))
      >>> qa.shape, qa.scale.dtype, steps
      ((2, 32), dtype(float8_e8m0fnu), Array([0, 1, 2], dtype=int32))
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such qjax checkpoint file", path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a qjax checkpoint file")
    try:
        with safe_open(path, framework="numpy") as file:
            return _Decoder(file, check_finite).checkpoint(file.metadata())
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

    def __init__(self):
        self.tensors: dict[str, np.ndarray] = {}
        self.specs: list[dict[str, Any]] = []
        self._spec_ids: dict[QuantSpec, int] = {}

    def node(self, node: Any, path: Path) -> Any:
        if isinstance(node, QArray):
            return {"qarray": self.qarray(node, path)}
        if node is None:
            return None
        if type(node) is dict:
            for key in node:
                if not isinstance(key, str):
                    raise TypeError(
                        f"dict key {key!r} ({type(key).__name__}) at {_show(path)} is not a "
                        "string; qjax.io.save needs string keys: convert them with str()"
                    )
            return {"dict": {key: self.node(child, path + (key,)) for key, child in node.items()}}
        if type(node) in (list, tuple):
            children = [self.node(child, path + (i,)) for i, child in enumerate(node)]
            return {type(node).__name__: children}
        if isinstance(node, (jax.Array, np.ndarray, np.generic)):
            return {"array": self.tensor(_tensor_name(path), node)}
        raise TypeError(
            f"cannot save {type(node).__name__} at {_show(path)}: qjax.io.save takes nested "
            "dict / list / tuple / None with QArray or array leaves; convert other containers "
            "(e.g. flax FrozenDict, namedtuple) to dict / tuple and scalars to arrays"
        )

    def qarray(self, qa: QArray, path: Path) -> dict[str, Any]:
        encoded: dict[str, Any] = {
            "spec": self.spec_id(qa.spec),
            "float_dtype": jnp.dtype(qa.float_dtype).name,
            "packed": bool(qa.packed),
            "pad": int(qa.pad),
        }
        for part in _PARTS:
            value = getattr(qa, part)
            encoded[part] = None if value is None else self.tensor(_tensor_name(path, part), value)
        return encoded

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


def _encode_spec(spec: QuantSpec) -> dict[str, Any]:
    encoded = {}
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if isinstance(value, Granularity):
            value = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
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


def _write_atomically(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, "directory to save into does not exist", directory)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        safetensors.numpy.save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Makes the rename durable where the platform allows it (POSIX); else does nothing."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Loading.


class _Decoder:
    """Rebuilds a tree from the qjax metadata, reading and checking each tensor."""

    def __init__(self, file: Any, check_finite: bool):
        self.file = file
        self.check_finite = check_finite
        self.names = set(file.keys())
        self.used: set[str] = set()
        self.specs: list[QuantSpec] = []

    def checkpoint(self, metadata: dict[str, str] | None) -> Any:
        if not metadata or METADATA_KEY not in metadata:
            raise _Invalid(
                f"not a qjax checkpoint: it has no {METADATA_KEY!r} metadata; use qjax.load "
                "only on files written by qjax.save"
            )
        try:
            header = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise _Invalid(f"corrupted qjax metadata: not valid JSON ({e})") from None
        if not isinstance(header, dict) or header.get("format") != "qjax":
            raise _Invalid("corrupted qjax metadata: no 'format': 'qjax' entry")
        version = header.get("version")
        if version != FORMAT_VERSION:
            raise _Invalid(
                f"unsupported qjax format version {version!r}; this qjax reads version "
                f"{FORMAT_VERSION}: load it with the qjax release that wrote it"
            )
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
        if kind == "dict":
            return {key: self.node(child, path + (key,)) for key, child in body.items()}
        if kind in ("list", "tuple"):
            children = [self.node(child, path + (i,)) for i, child in enumerate(body)]
            return children if kind == "list" else tuple(children)
        if kind == "array":
            return self.tensor(_tensor_name(path), body)
        if kind == "qarray":
            return self.qarray(body, path)
        raise _Invalid(f"corrupted qjax metadata: unknown node kind {kind!r} at {_show(path)}")

    def qarray(self, body: dict[str, Any], path: Path) -> QArray:
        parts = {
            part: None if body[part] is None else self.tensor(_tensor_name(path, part), body[part])
            for part in _PARTS
        }
        spec_id = body["spec"]
        if not isinstance(spec_id, int) or not 0 <= spec_id < len(self.specs):
            raise _Invalid(f"QArray at {_show(path)} refers to unknown spec #{spec_id!r}")
        qa = QArray(
            **parts,
            spec=self.specs[spec_id],
            float_dtype=body["float_dtype"],
            packed=body["packed"],
            pad=body["pad"],
        )
        _check_qarray(qa, path)
        return qa

    def tensor(self, name: str, info: dict[str, Any]) -> jax.Array:
        if name not in self.names:
            raise _Invalid(f"tensor {name!r} is in the qjax metadata but not in the file")
        dtype = jnp.dtype(info["dtype"])
        stored = _storage_dtype(dtype, name)
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
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            raise _Invalid(
                f"tensor {name!r} is {dtype.name}, which JAX would truncate to "
                f"{jax.dtypes.canonicalize_dtype(dtype).name}; enable 64-bit types with "
                "jax.config.update('jax_enable_x64', True) before loading"
            )
        self.used.add(name)
        return jnp.asarray(array)


def _decode_spec(fields: dict[str, Any]) -> QuantSpec:
    fields = dict(fields)
    granularity = fields.get("granularity")
    if isinstance(granularity, dict):
        granularity = dict(granularity)
        if granularity.get("explicit") is not None:
            granularity["explicit"] = tuple(granularity["explicit"])
        fields["granularity"] = Granularity(**granularity)
    return QuantSpec(**fields)


def _check_qarray(qa: QArray, path: Path) -> None:
    """Checks that the parts of a loaded QArray fit its spec, as dequantize assumes."""
    problems = []
    target = qa.spec.target
    if not isinstance(qa.packed, bool) or not isinstance(qa.pad, int):
        problems.append(f"packed {qa.packed!r} / pad {qa.pad!r} are not a bool / an int")
    elif qa.packed and (target.bits >= 8 or qa.data.ndim == 0):
        problems.append(f"packed storage of {target.name} values of shape {qa.data.shape}")
    elif not 0 <= qa.pad < (target.packs if qa.packed else 1):
        problems.append(f"pad {qa.pad} out of range")
    expected_data = jnp.dtype(jnp.uint8) if qa.packed else target.storage
    if qa.data.dtype != expected_data:
        problems.append(f"data is {qa.data.dtype.name}, expected {expected_data.name}")
    if qa.scale.dtype != jnp.dtype(qa.spec.scale_dtype):
        problems.append(f"scale is {qa.scale.dtype.name}, expected {qa.spec.scale_dtype}")
    if (qa.offset is None) != (qa.spec.formulation == "scale"):
        problems.append(f"offset is {'missing' if qa.offset is None else 'unexpected'}")
    elif qa.offset is not None and qa.offset.shape != qa.scale.shape:
        problems.append(f"offset shape {qa.offset.shape} != scale shape {qa.scale.shape}")
    if not problems and not _divides(qa.scale.shape, qa.shape):
        problems.append(f"scale shape {qa.scale.shape} does not divide shape {qa.shape}")
    if not isinstance(qa.float_dtype, str) or not jnp.issubdtype(qa.float_dtype, jnp.floating):
        problems.append(f"float_dtype {qa.float_dtype!r} is not a float dtype name")
    if problems:
        raise _Invalid(f"QArray at {_show(path)} is inconsistent: {'; '.join(problems)}")


def _divides(params: Iterable[int], shape: tuple[int, ...]) -> bool:
    params = tuple(params)
    return len(params) == len(shape) and all(
        (n == 0 and d == 0) or (n > 0 and d % n == 0) for n, d in zip(params, shape)
    )


# Shared helpers.


def _storage_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The dtype a tensor is stored as: itself, or a raw unsigned view of the same size."""
    if dtype.name in _NATIVE_DTYPES:
        return dtype
    known = jnp.issubdtype(dtype, jnp.number) and jnp.dtype(dtype.name) == dtype
    if not known or dtype.itemsize not in _RAW_VIEWS:
        raise TypeError(
            f"cannot store tensor {name!r} of dtype {dtype}: qjax.io holds bool, integer "
            "and floating-point arrays (including the ml_dtypes types)"
        )
    return _RAW_VIEWS[dtype.itemsize]


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.asarray(array, order="C").reshape(-1).view(np.uint8))


def _tensor_name(path: Path, part: str | None = None) -> str:
    name = "/".join(_escape(key) if isinstance(key, str) else str(key) for key in path)
    if name == "__metadata__":  # safetensors reserves this key for its metadata
        name = "%5F" + name[1:]
    return name if part is None else f"{name}:{part}"


def _escape(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F").replace(":", "%3A")


def _show(path: Path) -> str:
    return repr("/".join(str(key) for key in path)) if path else "the root"


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())
