"""The immutable telemetry model: GPU samples and host samples, and their JSON form.

One JSON form for all of them (docs/api.md, "JSON shapes"): `jsonable()` turns a dataclass into
plain JSON values field by field, and `from_jsonable()` is its exact inverse, driven by the
dataclasses' fields and type hints. The Snapshot that holds them is in
`gpupanel.core.snapshot`. GPUs are identified by UUID; the index is for display.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union


def jsonable(value: Any) -> Any:
    """Turn dataclasses, tuples, sets and mappings into plain JSON values, field by field."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [jsonable(v) for v in sorted(value, key=repr)]
    return value


def from_jsonable(tp: Any, value: Any) -> Any:
    """The inverse of `jsonable()`: rebuild a value of type `tp` from its JSON form.

    Driven by the type alone, so it needs no change when a dataclass gains a field:
    dataclasses are rebuilt field by field from their type hints (keys the class does not
    have are ignored; a missing field takes its default, or None when it may be None), lists
    become the tuples, sets and lists the hints name, objects keyed by numbers become
    mappings keyed by int, `X | None` keeps None. Scalars pass as they are (an int where a
    float is expected becomes a float). A value of the wrong shape raises ValueError.
    The per-type work is done once and cached.
    """
    return _decoder(tp)(value)


_Decoder = Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _items(value: Any, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list for {what}, got {type(value).__name__}")
    return value


@functools.cache
def _decoder(tp: Any) -> _Decoder:
    """How to rebuild a value of type `tp` from JSON (cached per type)."""
    if tp is Any or tp is object:
        return _identity
    if tp is float:
        return _as_float
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return _union_decoder(args)
    if origin is Literal:
        return _identity
    if origin is tuple or tp is tuple:
        if not args:
            return lambda v: tuple(_items(v, "tuple"))
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder(args[0])
            return lambda v: tuple([item(x) for x in _items(v, str(tp))])
        parts = tuple(_decoder(a) for a in args)
        return lambda v: tuple([d(x) for d, x in zip(parts, _items(v, str(tp)), strict=False)])
    if origin in (list, collections.abc.Sequence, collections.abc.MutableSequence) or tp is list:
        item = _decoder(args[0]) if args else _identity
        return lambda v: [item(x) for x in _items(v, str(tp))]
    if origin in (set, frozenset, collections.abc.Set, collections.abc.MutableSet):
        item = _decoder(args[0]) if args else _identity
        make = set if origin in (set, collections.abc.MutableSet) else frozenset
        return lambda v: make(item(x) for x in _items(v, str(tp)))
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping) or tp is dict:
        key = _key_decoder(args[0]) if args else _identity
        val = _decoder(args[1]) if args else _identity

        def mapping(v: Any) -> dict[Any, Any]:
            if not isinstance(v, Mapping):
                raise ValueError(f"expected an object for {tp}, got {type(v).__name__}")
            return {key(k): val(x) for k, x in v.items()}

        return mapping
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return functools.partial(_decode_dataclass, tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    return _identity


def _key_decoder(tp: Any) -> _Decoder:
    """JSON object keys are strings: numbers come back as int (or float)."""
    if tp is int:
        return int
    if tp is float:
        return float
    return _decoder(tp)


def _union_decoder(args: tuple[Any, ...]) -> _Decoder:
    arms = tuple(a for a in args if a is not type(None))
    nullable = len(arms) < len(args)
    if len(arms) == 1:
        only = _decoder(arms[0])
        return lambda v: None if v is None and nullable else only(v)
    plain = tuple(a for a in arms if a in (str, int, float, bool))
    decoders = tuple(_decoder(a) for a in arms)

    def union(v: Any) -> Any:
        if v is None and nullable:
            return None
        if plain and isinstance(v, plain):
            return v
        for decode in decoders:
            try:
                return decode(v)
            except (ValueError, TypeError):
                continue
        return v

    return union


@dataclass(frozen=True, slots=True)
class _FieldCodec:
    name: str
    decode: _Decoder
    required: bool
    nullable: bool


@functools.cache
def _codecs(cls: type) -> tuple[_FieldCodec, ...]:
    """The init fields of dataclass `cls` with their decoders (computed once per class)."""
    hints = _type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, Any)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        nullable = type(None) in typing.get_args(tp) or tp is Any
        out.append(_FieldCodec(f.name, _decoder(tp), required, nullable))
    return tuple(out)


def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of `cls`; a hint that cannot be resolved counts as Any."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError, AttributeError):
        module = sys.modules.get(cls.__module__)
        namespace = dict(vars(module)) if module else {}
        hints: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            tp: Any = f.type
            if isinstance(tp, str):
                try:
                    tp = eval(tp, namespace, dict(vars(cls)))
                except Exception:
                    tp = Any
            hints[f.name] = tp
        return hints


def _decode_dataclass(cls: type, value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected an object for {cls.__name__}, got {type(value).__name__}")
    kwargs: dict[str, Any] = {}
    for c in _codecs(cls):
        if c.name in value:
            kwargs[c.name] = c.decode(value[c.name])
        elif c.required:
            if not c.nullable:
                raise ValueError(f"{cls.__name__}: missing field {c.name!r}")
            kwargs[c.name] = None
    return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class Memory:
    """GPU memory in bytes; a field is None when the card cannot say."""

    total: int | None
    used: int | None
    free: int | None


@dataclass(frozen=True, slots=True)
class Utilization:
    """GPU and memory-controller utilisation in percent over the driver's last period."""

    gpu: int | None
    memory: int | None


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process holding memory on a GPU (host PID).

    `worker` is the id of the managed worker whose process tree owns it, None otherwise.
    """

    pid: int
    used_memory: int | None
    worker: str | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one instant. `lost` marks a card that stopped answering (fields are None)."""

    uuid: str
    index: int
    name: str | None
    memory: Memory
    utilization: Utilization
    power_w: float | None
    power_limit_w: float | None
    temperature_c: int | None
    processes: tuple[GpuProcess, ...] = ()
    pci_bus_id: str | None = None
    lost: bool = False
    simulated: bool = False

    @classmethod
    def lost_gpu(cls, uuid: str, index: int, *, simulated: bool = False) -> GpuSample:
        """A placeholder for a GPU that was there and no longer answers."""
        return cls(
            uuid=uuid,
            index=index,
            name=None,
            memory=Memory(None, None, None),
            utilization=Utilization(None, None),
            power_w=None,
            power_limit_w=None,
            temperature_c=None,
            lost=True,
            simulated=simulated,
        )


@dataclass(frozen=True, slots=True)
class ProcessStats:
    """A process tree rooted at `pid`: CPU (percent of one core), RSS, listening ports."""

    pid: int
    alive: bool
    cpu_percent: float | None = None
    rss: int | None = None
    tree_pids: tuple[int, ...] = ()
    listening_ports: tuple[int, ...] = ()
    create_time: float | None = None


@dataclass(frozen=True, slots=True)
class PortStats:
    """Who listens on a TCP port on this host and how many connections are established."""

    port: int
    listener_pid: int | None
    established: int


@dataclass(frozen=True, slots=True)
class HostSample:
    """Host-side telemetry for the processes and ports the control plane cares about."""

    cpu_percent: float | None
    memory_total: int | None
    memory_used: int | None
    processes: Mapping[int, ProcessStats] = field(default_factory=dict)
    ports: Mapping[int, PortStats] = field(default_factory=dict)
