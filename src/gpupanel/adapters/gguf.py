"""A small reader for the metadata header of a GGUF model file.

We need a handful of keys (architecture, layer and head counts, context length) to estimate
a model's KV cache before it is loaded (`gpupanel.core.estimate`). The `gguf` package can read
them, but it maps the whole file and parses every tokenizer string into numpy arrays: seconds
for a 100 MB model. This reader streams only the key/value header through a buffered file
object, never touches the tensor data, and skips (reads past) long arrays such as
`tokenizer.ggml.tokens`, so it takes milliseconds and its result stays small.

Layout (little-endian; see the "GGUF header" section of the runtimes reference): magic `GGUF`,
u32 version (2 or 3), u64 tensor_count, u64 kv_count, then kv_count pairs of
u64 key length + key bytes, u32 value type, value.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from gpupanel.core.estimate import ModelShape, ShapeError, shape_from_metadata
from gpupanel.errors import GgufError

__all__ = ["GgufArray", "GgufError", "GgufHeader", "read_header", "read_metadata", "read_shape"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_SKIP_ARRAYS_OVER = 1024
"""Arrays longer than this are skipped by default: per-layer values fit, vocabularies don't."""

# Value types of the GGUF spec.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = range(10)
UINT64, INT64, FLOAT64 = 10, 11, 12

_SCALAR_FORMATS = {
    UINT8: "B",
    INT8: "b",
    UINT16: "H",
    INT16: "h",
    UINT32: "I",
    INT32: "i",
    FLOAT32: "f",
    BOOL: "?",
    UINT64: "Q",
    INT64: "q",
    FLOAT64: "d",
}
"""`struct` format of each fixed-size type; strings and arrays are variable-sized."""
_SCALARS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")
_ARRAY_HEADER = struct.Struct("<IQ")
_TYPE_NAMES = {
    UINT8: "u8",
    INT8: "i8",
    UINT16: "u16",
    INT16: "i16",
    UINT32: "u32",
    INT32: "i32",
    FLOAT32: "f32",
    BOOL: "bool",
    STRING: "string",
    ARRAY: "array",
    UINT64: "u64",
    INT64: "i64",
    FLOAT64: "f64",
}
_BUFFER = 1 << 16
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class GgufArray:
    """Stands in for an array that was skipped because it was too long to be worth reading."""

    item_type: int
    count: int

    @property
    def type_name(self) -> str:
        """The item type as the spec names it (`string`, `i32`, ...)."""
        return _TYPE_NAMES.get(self.item_type, str(self.item_type))


@dataclass(frozen=True, slots=True)
class GgufHeader:
    """What a GGUF header holds, short of the tensor descriptions."""

    version: int
    tensor_count: int
    metadata: dict[str, Any]


class _Truncated(Exception):
    """The file ended (or declared a length past its end) inside the header."""


class _UnknownType(Exception):
    """A value type outside the spec; carries the type number."""

    def __init__(self, value_type: int) -> None:
        super().__init__(value_type)
        self.value_type = value_type


class _Reader:
    """Bounds-checked little-endian reads from a buffered binary stream.

    Every length read from the file is checked against the bytes left before anything is
    allocated, so a corrupt length (2**60) reads as truncation instead of exhausting memory.
    """

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream = stream
        self.left = size

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise _Truncated
        data = self.stream.read(n)
        if len(data) != n:
            raise _Truncated
        self.left -= n
        return data

    def skip(self, n: int) -> None:
        if n > self.left:
            raise _Truncated
        self.stream.seek(n, os.SEEK_CUR)
        self.left -= n

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = _U64.unpack(self.take(8))[0]
        return value

    def string(self, errors: str = "replace") -> str:
        return self.take(self.u64()).decode("utf-8", errors)

    def value(self, value_type: int, skip_over: int | None) -> Any:
        """One value of `value_type`; arrays longer than `skip_over` become a `GgufArray`."""
        scalar = _SCALARS.get(value_type)
        if scalar is not None:
            return scalar.unpack(self.take(scalar.size))[0]
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            item_type, count = _ARRAY_HEADER.unpack(self.take(_ARRAY_HEADER.size))
            if skip_over is not None and count > skip_over:
                self.skip_items(item_type, count)
                return GgufArray(item_type, count)
            return self.items(item_type, count, skip_over)
        raise _UnknownType(value_type)

    def items(self, item_type: int, count: int, skip_over: int | None) -> list[Any]:
        """`count` items of `item_type`: numbers in one `struct` call, others one by one."""
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is not None:
            if count * _SCALARS[item_type].size > self.left:
                raise _Truncated
            unpacker = struct.Struct(f"<{count}{fmt}")
            return list(unpacker.unpack(self.take(unpacker.size)))
        if item_type == STRING:
            if count * 8 > self.left:  # every string has at least its 8-byte length
                raise _Truncated
            return [self.string() for _ in range(count)]
        if item_type != ARRAY:
            raise _UnknownType(item_type)
        if count * _ARRAY_HEADER.size > self.left:
            raise _Truncated
        return [self.value(ARRAY, skip_over) for _ in range(count)]

    def skip_items(self, item_type: int, count: int) -> None:
        """Read past `count` items without building them: one seek for fixed-size types."""
        scalar = _SCALARS.get(item_type)
        if scalar is not None:
            self.skip(scalar.size * count)
        elif item_type == STRING:
            self.skip_strings(count)
        elif item_type == ARRAY:
            for _ in range(count):
                inner_type, inner_count = _ARRAY_HEADER.unpack(self.take(_ARRAY_HEADER.size))
                self.skip_items(inner_type, inner_count)
        else:
            raise _UnknownType(item_type)

    def skip_strings(self, count: int) -> None:
        """Read past `count` strings, walking their lengths through large chunks.

        A vocabulary holds ~50k strings; a read and a seek per string would cost more than
        the rest of the header, so we walk the lengths with `unpack_from` over chunks of
        `_CHUNK` bytes. A length field cut off by the chunk's end raises `struct.error`
        (free in the common case), and we refill there.
        """
        if count * 8 > self.left:  # every string has at least its 8-byte length
            raise _Truncated
        unpack_from = _U64.unpack_from
        chunk = self.take(min(self.left, _CHUNK))
        pos = 0
        for _ in range(count):
            try:
                (length,) = unpack_from(chunk, pos)
            except struct.error:
                chunk, pos = self._refill(chunk, pos), 0
                try:
                    (length,) = unpack_from(chunk, pos)
                except struct.error:
                    raise _Truncated from None
            pos += 8 + length
        if pos > len(chunk):
            self.skip(pos - len(chunk))  # the last string runs past the chunk
        elif pos < len(chunk):
            unread = len(chunk) - pos  # give back what we read beyond the last string
            self.stream.seek(-unread, os.SEEK_CUR)
            self.left += unread

    def _refill(self, chunk: bytes, pos: int) -> bytes:
        """The next chunk from offset `pos` of `chunk`, which may point past its end."""
        if pos > len(chunk):
            self.skip(pos - len(chunk))
            return self.take(min(self.left, _CHUNK))
        return chunk[pos:] + self.take(min(self.left, _CHUNK))


def read_header(
    path: str | os.PathLike[str], skip_arrays_over: int | None = DEFAULT_SKIP_ARRAYS_OVER
) -> GgufHeader:
    """The version, tensor count and metadata of the GGUF file at `path`.

    Arrays longer than `skip_arrays_over` are read past and recorded as `GgufArray`
    placeholders; `None` reads every array in full. Raises `GgufError` naming the file when it
    cannot be opened, is not GGUF, has an unsupported version, is truncated, or holds a value
    type outside the spec.
    """
    name = os.fspath(path)
    try:
        with open(path, "rb", buffering=_BUFFER) as stream:
            size = os.fstat(stream.fileno()).st_size
            return _parse(name, _Reader(stream, size), skip_arrays_over)
    except OSError as exc:
        raise GgufError(f"{name}: cannot read ({exc.strerror or exc})") from exc


def read_metadata(
    path: str | os.PathLike[str], skip_arrays_over: int | None = DEFAULT_SKIP_ARRAYS_OVER
) -> dict[str, Any]:
    """The key/value metadata of the GGUF file at `path` (see `read_header`).

    Integers and floats come back as `int`/`float`, bools as `bool`, strings as `str`, arrays
    as lists (or `GgufArray` when longer than `skip_arrays_over`).
    """
    return read_header(path, skip_arrays_over).metadata


def read_shape(path: str | os.PathLike[str]) -> ModelShape:
    """The KV-cache shape of the model in the GGUF file at `path`."""
    try:
        return shape_from_metadata(read_metadata(path))
    except ShapeError as exc:
        raise GgufError(f"{os.fspath(path)}: {exc}") from exc


def _parse(name: str, reader: _Reader, skip_over: int | None) -> GgufHeader:
    """The header from `reader`, with errors turned into `GgufError` messages naming `name`."""
    try:
        magic, version, tensor_count, kv_count = _HEADER.unpack(reader.take(_HEADER.size))
    except _Truncated:
        raise GgufError(f"{name}: not a GGUF file (too short for a header)") from None
    if magic != MAGIC:
        raise GgufError(f"{name}: not a GGUF file (magic {magic!r})")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        detail = " (a big-endian file?)" if swapped in SUPPORTED_VERSIONS else ""
        raise GgufError(
            f"{name}: unsupported GGUF version {version}{detail}; "
            f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    metadata: dict[str, Any] = {}
    key = ""
    index = 0
    try:
        while index < kv_count:
            index += 1
            key = ""
            key = reader.string(errors="strict")
            metadata[key] = reader.value(reader.u32(), skip_over)
    except _Truncated:
        where = f" ({key!r})" if key else ""
        raise GgufError(f"{name}: truncated in key {index} of {kv_count}{where}") from None
    except _UnknownType as exc:
        raise GgufError(
            f"{name}: unknown value type {exc.value_type} in key {index} of {kv_count} ({key!r})"
        ) from None
    except UnicodeDecodeError:
        raise GgufError(f"{name}: key {index} of {kv_count} is not UTF-8") from None
    return GgufHeader(version=version, tensor_count=tensor_count, metadata=metadata)
