"""Our GGUF metadata reader against the `gguf` package (on the real SmolLM2 model and on
files written by `gguf.GGUFWriter`) and against synthetic files from a tiny writer here,
which can also write what no well-behaved writer would: bad magic, odd versions, truncation,
unknown types, absurd lengths."""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gpupanel.adapters import gguf as reader_mod
from gpupanel.adapters.gguf import (
    GgufArray,
    GgufError,
    read_header,
    read_metadata,
    read_shape,
)
from gpupanel.core.estimate import shape_from_metadata
from gpupanel.errors import GpuPanelError

# --- a tiny GGUF writer (type numbers spelled out, independent of the module under test) ---

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
FORMATS = {
    U8: "B",
    I8: "b",
    U16: "H",
    I16: "h",
    U32: "I",
    I32: "i",
    F32: "f",
    BOOL: "?",
    U64: "Q",
    I64: "q",
    F64: "d",
}


def encode_value(vtype: int, value: Any) -> bytes:
    """One value; an array is given as (item_type, items)."""
    if vtype in FORMATS:
        return struct.pack("<" + FORMATS[vtype], value)
    if vtype == STR:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARR:
        item_type, items = value
        body = b"".join(encode_value(item_type, item) for item in items)
        return struct.pack("<IQ", item_type, len(items)) + body
    raise AssertionError(f"test writer cannot encode type {vtype}")


def encode_kv(key: str, vtype: int, value: Any) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", vtype) + encode_value(vtype, value)


def gguf_bytes(
    kvs: Sequence[tuple[str, int, Any]],
    version: int = 3,
    magic: bytes = b"GGUF",
    tensor_count: int = 0,
    kv_count: int | None = None,
) -> bytes:
    """A GGUF header with these (key, type, value) pairs and no tensor infos."""
    head = magic + struct.pack(
        "<IQQ", version, tensor_count, len(kvs) if kv_count is None else kv_count
    )
    return head + b"".join(encode_kv(*kv) for kv in kvs)


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def llama_kvs(**overrides: tuple[int, Any]) -> list[tuple[str, int, Any]]:
    """The keys a llama shape needs, typed as llama.cpp writes them, with overrides."""
    fields: dict[str, tuple[int, Any]] = {
        "general.architecture": (STR, "llama"),
        "llama.block_count": (U32, 4),
        "llama.context_length": (U32, 4096),
        "llama.embedding_length": (U32, 512),
        "llama.attention.head_count": (U32, 8),
        "llama.attention.head_count_kv": (U32, 2),
    }
    fields.update(overrides)
    return [(key, vtype, value) for key, (vtype, value) in fields.items()]


# Every scalar type at its edges, and an array of each.
EVERY_TYPE: list[tuple[str, int, Any]] = [
    ("t.u8", U8, 255),
    ("t.i8", I8, -128),
    ("t.u16", U16, 65535),
    ("t.i16", I16, -32768),
    ("t.u32", U32, 2**32 - 1),
    ("t.i32", I32, -(2**31)),
    ("t.f32", F32, 1.5),
    ("t.bool.true", BOOL, True),
    ("t.bool.false", BOOL, False),
    ("t.str", STR, "héllo ✓ wörld"),
    ("t.str.empty", STR, ""),
    ("t.u64", U64, 2**64 - 1),
    ("t.i64", I64, -(2**63)),
    ("t.f64", F64, math.pi),
    ("a.u8", ARR, (U8, [0, 1, 255])),
    ("a.i8", ARR, (I8, [-128, 0, 127])),
    ("a.u16", ARR, (U16, [0, 65535])),
    ("a.i16", ARR, (I16, [-32768, 32767])),
    ("a.u32", ARR, (U32, [1, 2**32 - 1])),
    ("a.i32", ARR, (I32, [-1, 2**31 - 1])),
    ("a.f32", ARR, (F32, [0.25, -2.0])),
    ("a.bool", ARR, (BOOL, [True, False, True])),
    ("a.str", ARR, (STR, ["a", "", "✓✓"])),
    ("a.u64", ARR, (U64, [2**64 - 1, 0])),
    ("a.i64", ARR, (I64, [-(2**63), 2**63 - 1])),
    ("a.f64", ARR, (F64, [math.e, -0.5])),
    ("a.empty", ARR, (U32, [])),
    ("a.nested", ARR, (ARR, [(I32, [1, 2]), (STR, ["x"]), (U8, [])])),
]
EXPECTED_EVERY_TYPE: dict[str, Any] = {
    **{k: v for k, t, v in EVERY_TYPE if t != ARR},
    **{k: list(v[1]) for k, t, v in EVERY_TYPE if t == ARR and k != "a.nested"},
    "a.nested": [[1, 2], ["x"], []],
}


# --- the `gguf` package as the reference ---


def reference_value(field: Any) -> Any:
    """A `gguf.ReaderField`'s value: `contents()` in newer versions, else from its parts."""
    if hasattr(field, "contents"):
        return field.contents()
    from gguf import GGUFValueType

    def text(part: Any) -> str:
        return bytes(part).decode("utf-8")

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [text(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if main == GGUFValueType.STRING:
        return text(field.parts[-1])
    return field.parts[-1].tolist()[0]


def gguf_reader(path: Path) -> Any:
    """The `gguf` package's reader of `path`."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is a test dependency")
    return gguf.GGUFReader(path)


def reference_metadata(path: Path, reader: Any = None) -> dict[str, tuple[list[int], Any]]:
    """Key -> (value types, value) as the `gguf` package reads them, less its own
    `GGUF.*` pseudo-keys (version and counts, which are not metadata)."""
    reader = reader or gguf_reader(path)
    return {
        name: ([int(t) for t in field.types], reference_value(field))
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }


def assert_same_as_reference(
    ours_full: dict[str, Any],
    ours_skipping: dict[str, Any],
    reference: dict[str, tuple[list[int], Any]],
    skip_over: int,
) -> None:
    """Every key, with the same value (and Python type); skipped arrays with the same count."""
    assert set(ours_full) == set(reference)
    assert set(ours_skipping) == set(reference)
    for key, (types, expected) in reference.items():
        full, skipping = ours_full[key], ours_skipping[key]
        if types[0] == ARR:
            assert isinstance(full, list), key
            assert len(full) == len(expected), key
            assert full == expected, key
            if len(expected) > skip_over:
                assert skipping == GgufArray(types[-1], len(expected)), key
            else:
                assert skipping == expected, key
        else:
            assert type(full) is type(expected), key
            assert full == expected, key
            assert skipping == expected, key


# --- the real SmolLM2 model ---


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Path:
    """The SmolLM2 GGUF (tests/conftest.py says where it comes from)."""
    return smollm2_gguf


@pytest.fixture(scope="module")
def smollm2_reader(smollm2: Path) -> Any:
    """The `gguf` package's reading of SmolLM2 (seconds: done once)."""
    return gguf_reader(smollm2)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2: Path, smollm2_reader: Any) -> dict[str, tuple[list[int], Any]]:
    return reference_metadata(smollm2, smollm2_reader)


def test_smollm2_every_key_matches_the_gguf_package(
    smollm2: Path, smollm2_reference: dict[str, tuple[list[int], Any]]
) -> None:
    full = read_metadata(smollm2, skip_arrays_over=None)
    skipping = read_metadata(smollm2)
    assert_same_as_reference(full, skipping, smollm2_reference, skip_over=1024)
    # The vocabulary is what the default skips; the small arrays are still read.
    assert isinstance(skipping["tokenizer.ggml.tokens"], GgufArray)
    assert skipping["tokenizer.ggml.tokens"].type_name == "string"
    assert skipping["general.languages"] == ["en"]


def test_smollm2_header_counts_match_the_gguf_package(smollm2: Path, smollm2_reader: Any) -> None:
    reference = smollm2_reader
    header = read_header(smollm2)
    assert header.version == reference_value(reference.fields["GGUF.version"])
    assert header.tensor_count == len(reference.tensors)
    assert len(header.metadata) == reference_value(reference.fields["GGUF.kv_count"])


def test_smollm2_shape(smollm2: Path, smollm2_reference: dict[str, tuple[list[int], Any]]) -> None:
    values = {key: value for key, (_, value) in smollm2_reference.items()}
    shape = read_shape(smollm2)
    assert shape == shape_from_metadata(values)
    arch = values["general.architecture"]
    assert shape.architecture == arch
    assert shape.block_count == values[f"{arch}.block_count"]
    assert shape.head_count == values[f"{arch}.attention.head_count"]
    assert shape.head_count_kv == values[f"{arch}.attention.head_count_kv"]
    assert shape.embedding_length == values[f"{arch}.embedding_length"]
    assert shape.context_length == values[f"{arch}.context_length"]
    assert (
        shape.kv_head_dim
        == values[f"{arch}.embedding_length"] // values[f"{arch}.attention.head_count"]
    )
    # What the file says, for the record (SmolLM2-135M).
    assert (shape.architecture, shape.block_count, shape.head_count, shape.head_count_kv) == (
        "llama",
        30,
        9,
        3,
    )
    assert (shape.embedding_length, shape.context_length, shape.kv_head_dim) == (576, 8192, 64)


def test_smollm2_header_read_time(smollm2: Path) -> None:
    """Best of 3, not asserted: shown with `pytest -s` (the gguf package takes seconds on this file)."""
    timings = {}
    for label, skip in (("skipping long arrays", 1024), ("reading every array", None)):
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            read_metadata(smollm2, skip_arrays_over=skip)
            best = min(best, time.perf_counter() - start)
        timings[label] = best * 1000
    print("\nSmolLM2 header:", ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()))


# --- synthetic files ---


def test_every_value_type(tmp_path: Path) -> None:
    path = write(tmp_path, gguf_bytes(EVERY_TYPE))
    assert read_metadata(path, skip_arrays_over=None) == EXPECTED_EVERY_TYPE
    assert read_metadata(path) == EXPECTED_EVERY_TYPE
    for key, value in read_metadata(path).items():
        assert type(value) is type(EXPECTED_EVERY_TYPE[key]), key


def test_every_value_type_as_the_gguf_package_reads_it(tmp_path: Path) -> None:
    """Checks the test writer too: the gguf package reads its files the same way."""
    flat = [kv for kv in EVERY_TYPE if kv[0] != "a.nested"]  # GGUFReader can't nest arrays
    path = write(tmp_path, gguf_bytes(flat))
    reference = reference_metadata(path)
    assert_same_as_reference(
        read_metadata(path, skip_arrays_over=None),
        read_metadata(path, skip_arrays_over=2),
        reference,
        skip_over=2,
    )


def test_file_written_by_the_gguf_package(tmp_path: Path) -> None:
    """An encoder we did not write: `gguf.GGUFWriter`, with every type it can write."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is a test dependency")
    t = gguf.GGUFValueType
    path = tmp_path / "written.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("w.u8", 200)
    writer.add_int8("w.i8", -100)
    writer.add_uint16("w.u16", 60000)
    writer.add_int16("w.i16", -30000)
    writer.add_uint32("w.u32", 4_000_000_000)
    writer.add_int32("w.i32", -2_000_000_000)
    writer.add_float32("w.f32", 0.125)
    writer.add_bool("w.bool", True)
    writer.add_string("w.str", "ünïcode")
    writer.add_uint64("w.u64", 2**63 + 5)
    writer.add_int64("w.i64", -(2**62))
    writer.add_float64("w.f64", 1 / 3)
    writer.add_key_value("w.a.u16", [1, 2, 3], t.ARRAY, t.UINT16)
    writer.add_key_value("w.a.f32", [0.5, 1.5], t.ARRAY, t.FLOAT32)
    writer.add_array("w.a.str", ["x", "yy", "zzz"])
    writer.add_block_count(12)
    writer.add_context_length(2048)
    writer.add_embedding_length(768)
    writer.add_head_count(12)
    writer.add_head_count_kv([4] * 6 + [6] * 6)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    meta = read_metadata(path)
    assert {k: v for k, v in meta.items() if k.startswith("w.")} == {
        "w.u8": 200,
        "w.i8": -100,
        "w.u16": 60000,
        "w.i16": -30000,
        "w.u32": 4_000_000_000,
        "w.i32": -2_000_000_000,
        "w.f32": 0.125,
        "w.bool": True,
        "w.str": "ünïcode",
        "w.u64": 2**63 + 5,
        "w.i64": -(2**62),
        "w.f64": 1 / 3,
        "w.a.u16": [1, 2, 3],
        "w.a.f32": [0.5, 1.5],
        "w.a.str": ["x", "yy", "zzz"],
    }
    reference = reference_metadata(path)
    assert_same_as_reference(
        read_metadata(path, skip_arrays_over=None), meta, reference, skip_over=1024
    )
    shape = read_shape(path)
    assert (shape.block_count, shape.head_count, shape.head_count_kv) == (12, 12, 6)
    assert shape.kv_head_dim == 64


def test_per_layer_head_count_kv(tmp_path: Path) -> None:
    per_layer = [0, 4, 4, 8]  # e.g. a model with an attention-free first layer
    path = write(
        tmp_path,
        gguf_bytes(llama_kvs(**{"llama.attention.head_count_kv": (ARR, (I32, per_layer))})),
    )
    assert read_metadata(path)["llama.attention.head_count_kv"] == per_layer
    shape = read_shape(path)
    assert shape.head_count_kv == 8
    assert shape.head_count == 8


def test_integer_keys_of_any_integer_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        gguf_bytes(
            llama_kvs(
                **{
                    "llama.block_count": (U64, 32),
                    "llama.context_length": (U16, 8192),
                    "llama.embedding_length": (I64, 4096),
                    "llama.attention.head_count": (U8, 32),
                    "llama.attention.head_count_kv": (I16, 8),
                    "llama.attention.key_length": (I32, 128),
                }
            )
        ),
    )
    shape = read_shape(path)
    assert (shape.block_count, shape.context_length, shape.embedding_length) == (32, 8192, 4096)
    assert (shape.head_count, shape.head_count_kv, shape.head_dim) == (32, 8, 128)


@pytest.mark.parametrize("version", [2, 3])
def test_versions_2_and_3(tmp_path: Path, version: int) -> None:
    path = write(tmp_path, gguf_bytes(llama_kvs(), version=version, tensor_count=7))
    header = read_header(path)
    assert header.version == version
    assert header.tensor_count == 7
    assert header.metadata["llama.block_count"] == 4


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    path = write(tmp_path, gguf_bytes(llama_kvs(), version=version))
    with pytest.raises(GgufError, match=rf"model\.gguf: unsupported GGUF version {version}\b"):
        read_metadata(path)


def test_big_endian_file_is_named_as_such(tmp_path: Path) -> None:
    path = write(tmp_path, gguf_bytes(llama_kvs(), version=0x03000000))
    with pytest.raises(GgufError, match="big-endian"):
        read_metadata(path)


def test_bad_magic(tmp_path: Path) -> None:
    path = write(tmp_path, b"PK\x03\x04" + bytes(40), name="archive.zip")
    with pytest.raises(GgufError) as info:
        read_metadata(path)
    assert str(info.value) == f"{path}: not a GGUF file (magic b'PK\\x03\\x04')"
    assert isinstance(info.value, GpuPanelError)


@pytest.mark.parametrize("data", [b"", b"GGU", b"GGUF\x03\x00\x00\x00"])
def test_too_short_for_a_header(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data)
    with pytest.raises(GgufError, match=r"model\.gguf: not a GGUF file \(too short"):
        read_metadata(path)


def test_truncated_names_the_key(tmp_path: Path) -> None:
    data = gguf_bytes(llama_kvs())  # 6 keys
    full = read_metadata(write(tmp_path, data, "full.gguf"))
    # Cut in the middle of the value of the 3rd key, llama.context_length (a u32).
    cut = data.index(b"llama.context_length") + len("llama.context_length") + 4 + 2
    path = write(tmp_path, data[:cut])
    with pytest.raises(GgufError) as info:
        read_metadata(path)
    assert str(info.value) == f"{path}: truncated in key 3 of 6 ('llama.context_length')"
    assert len(full) == 6


def test_every_truncation_is_a_gguf_error(tmp_path: Path) -> None:
    """Cut the file at every byte: always a GgufError naming the file, never anything else."""
    kvs = [*EVERY_TYPE, ("big.str", ARR, (STR, ["tok"] * 20)), ("big.u32", ARR, (U32, [7] * 20))]
    data = gguf_bytes(kvs)
    for skip in (None, 4):
        assert len(read_metadata(write(tmp_path, data), skip_arrays_over=skip)) == len(kvs)
        for cut in range(len(data)):
            path = write(tmp_path, data[:cut], name="cut.gguf")
            with pytest.raises(GgufError, match=r"cut\.gguf: (truncated|not a GGUF file)"):
                read_metadata(path, skip_arrays_over=skip)


def test_more_keys_declared_than_present(tmp_path: Path) -> None:
    path = write(tmp_path, gguf_bytes(llama_kvs(), kv_count=24))
    with pytest.raises(GgufError, match=r"model\.gguf: truncated in key 7 of 24$"):
        read_metadata(path)


@pytest.mark.parametrize(
    "value",
    [
        struct.pack("<I", 13) + bytes(8),
        struct.pack("<IIQ", ARR, 13, 1) + bytes(8),
        struct.pack("<IIQ", ARR, ARR, 1) + struct.pack("<IQ", 13, 1) + bytes(8),
    ],
    ids=["scalar", "array item", "nested array item"],
)
def test_unknown_value_type(tmp_path: Path, value: bytes) -> None:
    data = gguf_bytes(llama_kvs()[:1], kv_count=2) + struct.pack("<Q", 3) + b"bad" + value
    path = write(tmp_path, data)
    for skip in (None, 0):
        with pytest.raises(
            GgufError, match=r"model\.gguf: unknown value type 13 in key 2 of 2 \('bad'\)"
        ):
            read_metadata(path, skip_arrays_over=skip)


HEAD_1 = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
HUGE = 2**62


@pytest.mark.parametrize(
    "data",
    [
        b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, HUGE),
        HEAD_1 + struct.pack("<IQ", STR, HUGE),
        HEAD_1 + struct.pack("<IIQ", ARR, U32, HUGE),
        HEAD_1 + struct.pack("<IIQ", ARR, STR, HUGE),
        HEAD_1 + struct.pack("<IIQ", ARR, ARR, HUGE),
        HEAD_1 + struct.pack("<IIQQ", ARR, STR, 1, HUGE),
        HEAD_1 + struct.pack("<IIQIQ", ARR, ARR, 1, U64, HUGE),
    ],
    ids=[
        "key",
        "string",
        "u32 array",
        "string array",
        "nested array",
        "string in array",
        "inner array",
    ],
)
def test_absurd_lengths_read_as_truncation(tmp_path: Path, data: bytes) -> None:
    """A corrupt length must not allocate gigabytes or loop for ages: it reads as truncation."""
    path = write(tmp_path, data + bytes(64))
    for skip in (None, 0):
        with pytest.raises(GgufError, match=r"model\.gguf: truncated in key 1 of 1"):
            read_metadata(path, skip_arrays_over=skip)


def test_skipped_arrays_become_placeholders(tmp_path: Path) -> None:
    kvs = [
        ("tokens", ARR, (STR, [f"tok{i}" for i in range(50)])),
        ("after.tokens", U32, 1),
        ("types", ARR, (I32, list(range(50)))),
        ("after.types", STR, "two"),
        ("nested", ARR, (ARR, [(STR, ["a", "bb"]), (U64, [1, 2, 3])])),
        ("after.nested", F32, 3.0),
        ("exactly", ARR, (U8, list(range(10)))),
    ]
    path = write(tmp_path, gguf_bytes(kvs))
    meta = read_metadata(path, skip_arrays_over=10)
    assert meta == {
        "tokens": GgufArray(STR, 50),
        "after.tokens": 1,
        "types": GgufArray(I32, 50),
        "after.types": "two",
        "nested": [["a", "bb"], [1, 2, 3]],
        "after.nested": 3.0,
        "exactly": list(range(10)),
    }
    assert meta["types"].type_name == "i32"
    skip_all = read_metadata(path, skip_arrays_over=0)
    assert skip_all["nested"] == GgufArray(ARR, 2)
    assert skip_all["after.nested"] == 3.0
    assert read_metadata(path, skip_arrays_over=None)["tokens"][49] == "tok49"


@pytest.mark.parametrize("chunk", [8, 9, 13, 64, 1 << 20])
def test_skipping_strings_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Skipping walks string lengths through chunks; with tiny chunks, lengths and strings
    straddle every boundary, and strings longer than a chunk are seeked over."""
    monkeypatch.setattr(reader_mod, "_CHUNK", chunk)
    strings = [("x" * (i % 37)) for i in range(300)] + ["y" * 5000, "", "z"]
    kvs = [
        ("strings", ARR, (STR, strings)),
        ("after", U64, 42),
        ("last", ARR, (STR, ["q"] * 20)),
    ]
    path = write(tmp_path, gguf_bytes(kvs) + b"tensor infos and data follow")
    assert read_metadata(path, skip_arrays_over=5) == {
        "strings": GgufArray(STR, len(strings)),
        "after": 42,
        "last": GgufArray(STR, 20),
    }
    # Truncated within the skipped strings, still a clean error.
    data = gguf_bytes(kvs)
    for cut in (40, 2000, 9000, len(data) - 30):
        cut_path = write(tmp_path, data[:cut], name="cut.gguf")
        with pytest.raises(GgufError, match=r"cut\.gguf: truncated in key"):
            read_metadata(cut_path, skip_arrays_over=5)


def test_reads_only_the_header(tmp_path: Path) -> None:
    """Whatever follows the metadata (tensor infos, data) is never read or checked."""
    path = write(tmp_path, gguf_bytes(llama_kvs(), tensor_count=3) + b"\xff" * 1000)
    assert read_header(path).metadata["general.architecture"] == "llama"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"
    with pytest.raises(GgufError, match=r"absent\.gguf: cannot read"):
        read_metadata(path)
    with pytest.raises(GgufError, match=r"cannot read"):
        read_metadata(tmp_path)  # a directory


def test_read_shape_names_the_file_and_the_missing_key(tmp_path: Path) -> None:
    kvs = [kv for kv in llama_kvs() if kv[0] != "llama.attention.head_count"]
    path = write(tmp_path, gguf_bytes(kvs))
    with pytest.raises(
        GgufError, match=r"model\.gguf: metadata has no usable 'llama\.attention\.head_count'"
    ):
        read_shape(path)
    no_arch = write(tmp_path, gguf_bytes(llama_kvs()[1:]), name="noarch.gguf")
    with pytest.raises(GgufError, match=r"noarch\.gguf: metadata has no 'general\.architecture'"):
        read_shape(no_arch)


def test_key_that_is_not_utf8(tmp_path: Path) -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2) + b"\xff\xfe"
    path = write(tmp_path, data + struct.pack("<IB", U8, 1))
    with pytest.raises(GgufError, match=r"model\.gguf: key 1 of 1 is not UTF-8"):
        read_metadata(path)
