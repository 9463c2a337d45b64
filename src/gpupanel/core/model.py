"""The immutable telemetry model: GPU samples and host samples, and their JSON form.

One JSON form for all of them (docs/api.md, "JSON shapes"): `jsonable()` turns a dataclass into
plain JSON values field by field, and `from_jsonable()` is its exact inverse, driven by the
dataclasses' fields and type hints. The Snapshot that holds them is in
`gpupanel.core.snapshot`. GPUs are identified by UUID; the index is for display.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union


def jsonable(value: Any) -> Any:
    """Turn dataclasses, tuples and mappings into plain JSON values, field by field."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value


def from_jsonable(tp: Any, value: Any) -> Any:
    """The inverse of `jsonable()`: rebuild a value of type `tp` from its JSON form.

    Driven by the type alone, so it needs no change when a dataclass gains a field:
    dataclasses are rebuilt field by field from their type hints (keys the class does not
    have are ignored; a missing field takes its default, or None when it may be None), lists
    become tuples, objects keyed by numbers become mappings keyed by int, `X | None` keeps
    None, an int where a float is expected becomes a float. A value of the wrong shape
    raises ValueError. The per-type work is done once and cached.
    """
    return _decoder(tp)(value)


_Decoder = Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _items(value: Any, what: object) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list for {what}, got {type(value).__name__}")
    return value


@functools.cache
def _decoder(tp: Any) -> _Decoder:
    """How to rebuild a value of type `tp` from JSON (cached per type)."""
    if tp is float:
        return _as_float
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        arms = [a for a in args if a is not type(None)]
        if len(arms) != 1:
            return _identity  # a union of plain JSON values passes as it is
        only = _decoder(arms[0])
        return lambda v: None if v is None else only(v)
    if origin is tuple:
        item = _decoder(args[0]) if args else _identity
        return lambda v: tuple([item(x) for x in _items(v, tp)])
    if origin in (dict, collections.abc.Mapping):
        key = int if args and args[0] is int else _identity
        val = _decoder(args[1]) if args else _identity

        def mapping(v: Any) -> dict[Any, Any]:
            if not isinstance(v, Mapping):
                raise ValueError(f"expected an object for {tp}, got {type(v).__name__}")
            return {key(k): val(x) for k, x in v.items()}

        return mapping
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return functools.partial(_decode_dataclass, tp)
    return _identity


@dataclass(frozen=True, slots=True)
class _FieldCodec:
    name: str
    decode: _Decoder
    required: bool
    nullable: bool


@functools.cache
def _codecs(cls: type) -> tuple[_FieldCodec, ...]:
    """The init fields of dataclass `cls` with their decoders (computed once per class)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, Any)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        nullable = type(None) in typing.get_args(tp) or tp is Any
        out.append(_FieldCodec(f.name, _decoder(tp), required, nullable))
    return tuple(out)


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
    """One GPU at one instant. `lost` marks a card that stopped answering (fields are None).
    `host` names the node it is on when the plane spans several hosts (docs/cluster.md);
    None on one host."""

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
    host: str | None = None

    @classmethod
    def lost_gpu(
        cls, uuid: str, index: int, *, simulated: bool = False, host: str | None = None
    ) -> GpuSample:
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
            host=host,
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
