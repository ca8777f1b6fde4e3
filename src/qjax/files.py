"""The file layer: float checkpoints in (``.safetensors``, ``.npz``), one atomic writer out.

:func:`qjax.save` / :func:`qjax.load` (the qjax format, :mod:`qjax.io`) and the ``qjax``
command read and write files through here, so the checks below hold everywhere:

* **One atomic writer**, :func:`write_atomically`: the file is written next to its
  target under a short hidden temporary name, flushed, ``fsync``-ed and renamed over the
  target, so a crash, a full disk or Ctrl-C never leaves a half-written file there.

  - It writes only to a regular file or a new path. A directory, a device node (such as
    ``/dev/null``), a FIFO or a socket at the path is refused with a ``ValueError``.
  - A symbolic link is written **through**: its target is replaced (atomically, in the
    target's directory) and the link stays a link. A dangling link creates its target.
  - Permissions follow the umask like ``numpy.save``: a new file gets ``0o666 & ~umask``;
    a file that is replaced keeps its permission bits.
  - The temporary name is shortened to fit the file system's name limit (``NAME_MAX``), so
    any valid file name works, including 255-byte ones.
  - A full disk is an ``OSError`` (``ENOSPC``) saying "no space left on <path>", naming the
    target, never the temporary file.

* **Float checkpoint readers** (:func:`open_checkpoint`) list a file's tensors without
  reading them and read one tensor at a time, so quantizing streams. A damaged file (a
  bit-flipped zip, a malformed ``.npy`` header, a bad safetensors header) is a one-line
  ``ValueError`` naming the file.

* **Streaming float writers** (:func:`write_safetensors`, :func:`write_npz`) take the
  list of tensors up front and ask for each array in turn, so only one needs to exist.

The checkpoint operations the ``qjax`` command runs on top of it are in
:mod:`qjax.checkpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import secrets
import stat
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO, Union

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

__all__ = [
    "FLOAT_SUFFIXES",
    "FloatCheckpoint",
    "TensorInfo",
    "check_target",
    "file_kind",
    "load_function",
    "open_checkpoint",
    "read_batches",
    "tensor_path",
    "write_atomically",
    "write_npz",
    "write_safetensors",
]

PathLike = Union[str, "os.PathLike[str]"]

FLOAT_SUFFIXES = (".safetensors", ".npz")
"""The float checkpoint formats read by :func:`open_checkpoint` and written back."""

ST_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
"""safetensors dtype codes and the NumPy / ml_dtypes dtypes they hold."""

ST_CODES = {dtype: code for code, dtype in ST_DTYPES.items()}
_BYTE_CODES = ("F8_E4M3", "F8_E5M2")
"""Codes that safetensors' NumPy reader cannot make arrays of: read as bytes instead."""

_NPZ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tokenize.TokenError,
    SyntaxError,
    ValueError,
    TypeError,
    KeyError,
    EOFError,
    struct.error,
    zlib.error,
    NotImplementedError,
    OverflowError,
    RecursionError,
)
"""What NumPy and zipfile raise on a damaged ``.npz`` (its ``.npy`` headers are parsed with
``ast.literal_eval``, hence the tokenizer and syntax errors)."""

_TEMPORARY_SUFFIX_BYTES = len(".") + 16 + len(".tmp")


# --------------------------------------------------------------------------- the writer


def check_target(path: PathLike) -> str:
    """The file a write to ``path`` replaces or creates, after checking it may be written.

    Symbolic links are followed (written through); see the module docstring.

    Returns:
      The real path to write: ``path`` itself, or the final target of a link.

    Raises:
      FileNotFoundError: when the directory to write into does not exist.
      ValueError: when ``path`` is a directory, a device node, a FIFO or a socket.

    Examples:
      >>> import os, tempfile
      >>> from qjax.files import check_target
      >>> check_target(os.devnull)
      Traceback (most recent call last):
        ...
      ValueError: /dev/null: is a character device, not a regular file; qjax writes only ...
    """
    shown = os.fspath(path)
    target = os.path.realpath(shown) if os.path.islink(shown) else os.path.abspath(shown)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise ValueError(
            f"{shown}: is a {file_kind(mode)}, not a regular file; qjax writes only regular "
            "files or new paths: choose another output path"
        )
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"directory {directory} does not exist", shown)
    return target


def write_atomically(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Runs ``write(f)`` on a temporary file next to ``path``, then renames it over ``path``.

    The one writer behind :func:`qjax.save`, ``qjax quantize`` and ``qjax dequantize``.
    See the module docstring for what it refuses, links, permissions and full disks.

    Args:
      path: the file to create or replace.
      write: writes the whole content to the binary file it is given.

    Raises:
      FileNotFoundError, ValueError: from :func:`check_target`.
      OSError: when the write fails (``ENOSPC``: "no space left on <path>"); the target
        is then left as it was.

    Examples:
      >>> import os, pathlib, tempfile
      >>> from qjax.files import write_atomically
      >>> path = pathlib.Path(tempfile.mkdtemp()) / ("x" * 251 + ".bin")  # a 255-byte name
      >>> write_atomically(path, lambda f: f.write(b"hello"))
      >>> path.read_bytes(), os.listdir(path.parent) == [path.name]
      (b'hello', True)
    """
    shown = os.fspath(path)
    target = check_target(shown)
    directory = os.path.dirname(target)
    temporary = os.path.join(directory, _temporary_name(directory, os.path.basename(target)))
    try:
        keep_mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else None
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # minus umask
        with os.fdopen(fd, "wb") as f:
            if keep_mode is not None:
                os.fchmod(f.fileno(), keep_mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if isinstance(e, OSError):
            raise _name_the_target(e, shown, temporary) from None
        raise
    _fsync_directory(directory)


def _temporary_name(directory: str, name: str) -> str:
    """``.<name>.<16 hex>.tmp``, with ``name`` cut to fit the directory's NAME_MAX."""
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    room = max(1, limit - 1 - _TEMPORARY_SUFFIX_BYTES)
    short = os.fsencode(name)[:room].decode("utf-8", "ignore") or "q"
    return f".{short}.{secrets.token_hex(8)}.tmp"


def _name_the_target(e: OSError, shown: str, temporary: str) -> OSError:
    """The error to show for a failed write: the target's name, never the temporary one."""
    if e.errno == errno.ENOSPC:
        return OSError(e.errno, f"no space left on {shown} (an existing file is unchanged)")
    if e.errno == getattr(errno, "EDQUOT", None):
        return OSError(e.errno, f"disk quota exceeded on {shown} (an existing file is unchanged)")
    if e.filename in (None, temporary) or e.filename2 == temporary:
        return type(e)(e.errno, e.strerror or str(e), shown)
    return e


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``"directory"``, ``"FIFO"``, ``"character device"``...

    Examples:
      >>> import os
      >>> from qjax.files import file_kind
      >>> file_kind(os.stat(os.devnull).st_mode)
      'character device'
    """
    kinds = (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
    )
    return next((kind for test, kind in kinds if test(mode)), "special file")


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


# --------------------------------------------------------------------------- float writers

Item = tuple[str, tuple[int, ...], np.dtype]
"""A tensor to write: its name, shape and dtype."""

Producer = Callable[[str, np.dtype], np.ndarray]
"""Called once per item, in the order written: returns that tensor's array."""


def write_safetensors(
    path: PathLike,
    items: Sequence[Item],
    produce: Producer,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Streams tensors into a ``.safetensors`` file, atomically: the header, then each tensor.

    ``produce(name, dtype)`` is called once per item, so only one tensor needs to exist at a
    time. Tensors are laid out by decreasing item size, which keeps each one aligned.

    Raises:
      ValueError: for a dtype safetensors cannot hold, or a duplicate or reserved name.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from safetensors.numpy import load_file
      >>> from qjax.files import write_safetensors
      >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
      >>> write_safetensors(path, [("a.b", (2,), np.dtype(np.int64))],
      ...                   lambda name, dtype: np.arange(2, dtype=dtype))
      >>> load_file(path)
      {'a.b': array([0, 1])}
    """
    items = sorted(items, key=lambda item: -item[2].itemsize)
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in items:
        if dtype not in ST_CODES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {dtype} to .safetensors")
        if name in header or name == "__metadata__":
            raise ValueError(f"cannot write tensor {name!r}: duplicate or reserved name")
        size = math.prod(shape) * dtype.itemsize
        entry = {"dtype": ST_CODES[dtype], "shape": list(shape)}
        header[name] = entry | {"data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = dict(metadata or {"format": "np"})
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype in items:
            array = np.asarray(produce(name, dtype), order="C")
            if array.shape != shape or array.dtype != dtype:
                raise AssertionError(f"{name}: produced {array.dtype}{array.shape}")
            f.write(array.reshape(-1).view(np.uint8).data)

    write_atomically(path, write)


def write_npz(path: PathLike, items: Sequence[Item], produce: Producer) -> None:
    """Streams tensors into an uncompressed ``.npz`` archive, as ``np.savez`` lays it out.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from qjax.files import write_npz
      >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
      >>> write_npz(path, [("w", (2,), np.dtype(np.float32))], lambda n, d: np.ones(2, d))
      >>> dict(np.load(path))
      {'w': array([1., 1.], dtype=float32)}
    """

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, _, dtype in items:
                array = produce(name, dtype)
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    write_atomically(path, write)


# --------------------------------------------------------------------------- float readers


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a float checkpoint, before it is read."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class FloatCheckpoint:
    """A float checkpoint on disk: its tensor list, and each tensor read on its own."""

    def __init__(self, path: str):
        self.path = path

    def tensors(self) -> list[TensorInfo]:
        """Every tensor's name, shape and dtype, in file order, without reading data."""
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        """One tensor as a NumPy array that owns its memory."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """The file's own string metadata (a safetensors header's ``__metadata__``)."""
        return {}


class SafetensorsCheckpoint(FloatCheckpoint):
    """A ``.safetensors`` file, each tensor read through a fresh ``safe_open``.

    ``safe_open`` memory-maps the file, and every page a read touches stays resident (and
    counts toward RSS) while the map lives. With one handle kept open for the whole run,
    quantizing a 1 GiB checkpoint peaked at 1.6 GB RSS; reopening per tensor, at 0.65 GB.
    """

    def tensors(self) -> list[TensorInfo]:
        out = []
        with self._open() as f:
            for name in f.keys():
                info = f.get_slice(name)
                code = info.get_dtype()
                if code not in ST_DTYPES:
                    raise ValueError(
                        f"{self.path}: tensor {name!r} has dtype {code}, which qjax does not "
                        f"read; supported: {', '.join(ST_DTYPES)}"
                    )
                shape = tuple(int(d) for d in info.get_shape())
                out.append(TensorInfo(name, shape, ST_DTYPES[code]))
        return out

    def read(self, name: str) -> np.ndarray:
        with self._open() as f:
            try:
                info = f.get_slice(name)
                code = info.get_dtype()
                if code in _BYTE_CODES:  # NumPy has no float8 type for safetensors to make
                    return self._read_bytes(name, code, tuple(info.get_shape()))
                return f.get_tensor(name)
            except (SafetensorError, ValueError, TypeError) as e:
                raise ValueError(_one_line(f"{self.path}: tensor {name!r}: {e}")) from None

    def metadata(self) -> dict[str, str]:
        with self._open() as f:
            return dict(f.metadata() or {})

    def _read_bytes(self, name: str, code: str, shape: tuple[int, ...]) -> np.ndarray:
        """A tensor read as its bytes and viewed as its ml_dtypes type, from the header
        ``safe_open`` has just checked (offsets inside the file)."""
        with open(self.path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            start, end = json.loads(f.read(size))[name]["data_offsets"]
            f.seek(8 + size + start)
            raw = np.frombuffer(f.read(end - start), np.uint8).copy()
        return raw.view(ST_DTYPES[code]).reshape(shape)

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        try:
            f = safe_open(self.path, framework="numpy")
        except SafetensorError as e:
            message = f"{self.path}: not a valid safetensors file (truncated or corrupted?): {e}"
            raise ValueError(_one_line(message)) from None
        with f:
            yield f


class NpzCheckpoint(FloatCheckpoint):
    """A ``.npz`` archive (``np.savez``). Headers are read without loading the arrays."""

    def tensors(self) -> list[TensorInfo]:
        out = []
        with self._guard("not a valid .npz archive"), zipfile.ZipFile(self.path) as zf:
            names = zf.namelist()
            for member in names:
                if not member.endswith(".npy"):
                    raise ValueError(
                        f"member {member!r} is not a .npy array; qjax reads .npz archives "
                        "written by numpy.savez"
                    )
                if names.count(member) > 1:
                    raise ValueError(f"member {member!r} appears twice")
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(f)
                    declared = math.prod(shape) * dtype.itemsize
                    if declared > zf.getinfo(member).file_size:
                        raise ValueError(
                            f"array {member[:-4]!r} is damaged: its header declares shape "
                            f"{shape} ({declared} bytes), more than the member's "
                            f"{zf.getinfo(member).file_size} bytes"
                        )
                dtype = dtype.newbyteorder("=")  # read() gives native byte order
                if dtype.hasobject or dtype.kind not in "biuf" or dtype.names:
                    raise ValueError(
                        f"array {member[:-4]!r} has dtype {dtype}; qjax reads bool, integer "
                        "and float arrays (no Python objects, strings or records)"
                    )
                out.append(TensorInfo(member[:-4], tuple(int(d) for d in shape), dtype))
        return out

    def read(self, name: str) -> np.ndarray:
        with self._guard(f"array {name!r} cannot be read"):
            with np.load(self.path, allow_pickle=False) as npz:
                array = npz[name]
            native = array.dtype.newbyteorder("=")
            return array if array.dtype == native else array.astype(native)

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.filename:  # e.g. no permission: the path and the reason say it all
                raise
            raise ValueError(_one_line(f"{self.path}: {what} ({e.strerror or e})")) from None
        except _NPZ_ERRORS as e:
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise ValueError(_one_line(f"{self.path}: {what} ({detail})")) from None


def open_checkpoint(path: PathLike) -> FloatCheckpoint:
    """A reader for a ``.safetensors`` or ``.npz`` float checkpoint, picked by suffix.

    Raises:
      FileNotFoundError: for a missing file.
      ValueError: for an unknown suffix or something that is not a regular file.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from qjax.files import open_checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
      >>> np.savez(path, w=np.ones((2, 3), np.float32))
      >>> reader = open_checkpoint(path)
      >>> reader.tensors(), reader.read("w").shape
      ([TensorInfo(name='w', shape=(2, 3), dtype=dtype('float32'))], (2, 3))
    """
    path = os.fspath(path)
    mode = os.stat(path).st_mode  # FileNotFoundError / PermissionError name the path
    suffix = os.path.splitext(path)[1].lower()
    sharded = stat.S_ISDIR(mode) or suffix == ".json"
    hint = (
        "; a sharded checkpoint (an index .json and its model-0000k-of-0000n.safetensors "
        "shards) is quantized one shard file at a time, each into its own output under the "
        "shard's name, next to a copy of the index (the README's command-line section)"
        if sharded
        else ""
    )
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: is a {file_kind(mode)}, not a checkpoint file{hint}")
    if suffix == ".safetensors":
        return SafetensorsCheckpoint(path)
    if suffix == ".npz":
        return NpzCheckpoint(path)
    raise ValueError(
        f"{path}: unknown suffix {suffix or '(none)'!r}; qjax reads float checkpoints as "
        f".safetensors or .npz{hint}"
    )


def read_batches(path: PathLike, flag: str = "calibration data") -> list[np.ndarray]:
    """Calibration batches from a file: a ``.npy`` array (its first axis indexes the
    batches) or a ``.npz`` archive (one batch per array, in name order). No pickles.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from qjax.files import read_batches
      >>> path = os.path.join(tempfile.mkdtemp(), "batches.npy")
      >>> np.save(path, np.zeros((3, 8, 16), np.float32))
      >>> [b.shape for b in read_batches(path)]
      [(8, 16), (8, 16), (8, 16)]
    """
    path = os.fspath(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"{flag} {path}: is a {file_kind(mode)}, not a .npy or .npz file")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            batches = list(np.load(path, allow_pickle=False))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                batches = [archive[name] for name in sorted(archive.files)]
        else:
            raise ValueError(
                f"{flag} {path}: unknown suffix {suffix or '(none)'!r}; give a "
                ".npy array (first axis: batches) or a .npz archive"
            )
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # pickles: ValueError
        raise ValueError(f"{flag} {path}: cannot read it ({_one_line(str(e))})") from None
    if not batches:
        raise ValueError(f"{flag} {path}: holds no batches")
    return batches


def load_function(target: str, flag: str = "function") -> Callable[..., Any]:
    """The function ``FILE.py:NAME`` or ``package.module:NAME`` names (user code, run as is).

    Examples:
      >>> from qjax.files import load_function
      >>> load_function("os.path:join")("a", "b")
      'a/b'
    """
    import importlib
    import importlib.util

    where, sep, name = target.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"{flag} {target!r}: give FILE.py:FUNCTION or package.module:FUNCTION")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"{flag} {target!r}: no such file {where!r}")
        spec = importlib.util.spec_from_file_location(
            f"_qjax_user_{os.path.splitext(os.path.basename(where))[0]}", where
        )
    try:
        if where.endswith(".py"):
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:  # the user's code: its error, in one line
        raise ValueError(
            f"{flag} {target!r}: importing {where!r} failed: {type(e).__name__}: {e}"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{flag} {target!r}: {where!r} has no function {name!r}")
    return function


# --------------------------------------------------------------------------- names


def tensor_path(name: str) -> tuple[str, ...]:
    """Splits a tensor name on ``.`` and ``/``: ``"Dense_0.kernel"`` -> ``("Dense_0", "kernel")``.

    The path is what rules match (joined with ``/``) and how ``qjax quantize`` nests its
    output; the original name is stored beside it and given back by ``qjax dequantize``.

    Raises:
      ValueError: for a name with an empty part.

    Examples:
      >>> from qjax.files import tensor_path
      >>> tensor_path("params/layers.0.mlp.kernel")
      ('params', 'layers', '0', 'mlp', 'kernel')
    """
    path = tuple(re.split(r"[./]", name))
    if not all(path):
        raise ValueError(
            f"tensor name {name!r} has an empty part between '.' or '/' separators; rename "
            "it (qjax splits names on '.' and '/' into parameter paths)"
        )
    return path


def _one_line(message: str) -> str:
    return " ".join(message.split())
