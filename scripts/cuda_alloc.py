#!/usr/bin/env python3
"""Allocate GPU memory through the CUDA driver API and hold it: the GPU check's pinned child.

Needs nothing but the NVIDIA driver: `libcuda.so.1` (it ships with the driver) is loaded with
`ctypes`, then `cuInit`, `cuDeviceGet`, `cuCtxCreate`, `cuMemAlloc` (the `_v2` symbols where
the library has them), and the memory is held until standard input closes (the parent closes
it, or dies) or `--hold-s` runs out. `$GPUPANEL_LIBCUDA` names another library to load instead
(the tests' stand-in driver). Standard library only, so it runs on any Python 3.

It prints one JSON line, then holds or exits:

    {"status": "ready", "devices": 1, "name": ..., "uuid": "GPU-...", "bytes": ..., ...}
    {"status": "no_device", "error": "CUDA_ERROR_NO_DEVICE", ...}   (exit 0: an answer)
    {"status": "error", "call": "cuCtxCreate_v2", "error": ..., ...}  (exit 1)
    {"status": "no_library", "error": ...}                           (exit 3)

    CUDA_VISIBLE_DEVICES=GPU-... python3 scripts/cuda_alloc.py [--mib 1024] [--listen]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

LIBCUDA_ENV = "GPUPANEL_LIBCUDA"
DEFAULT_LIBRARY = "libcuda.so.1"
MIB = 1024**2

CUDA_SUCCESS = 0
CUDA_ERROR_NO_DEVICE = 100
_ERROR_NAMES = {  # what cuGetErrorName would say, for a library that lacks it
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    999: "CUDA_ERROR_UNKNOWN",
}


class CudaError(Exception):
    """A driver call returned something other than CUDA_SUCCESS."""

    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.call = call
        self.code = code
        self.name = name


class CudaDriver:
    """The few CUDA driver API calls the check needs, through ctypes.

    Each call uses the newest of the symbols it names that the library exports (`_v2`
    first); `symbols` records which one was used.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.environ.get(LIBCUDA_ENV) or DEFAULT_LIBRARY
        self.lib = ctypes.CDLL(self.path)  # OSError where there is no driver
        self.symbols: dict[str, str] = {}

    def _fn(self, *names: str) -> Any:
        for name in names:
            fn = getattr(self.lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                self.symbols[names[0]] = name
                return fn
        raise CudaError(names[0], -1, f"the library exports none of {', '.join(names)}")

    def _call(self, names: tuple[str, ...], *args: Any) -> None:
        fn = self._fn(*names)
        code = int(fn(*args))
        if code != CUDA_SUCCESS:
            raise CudaError(self.symbols[names[0]], code, self.error_name(code))

    def error_name(self, code: int) -> str:
        fn = getattr(self.lib, "cuGetErrorName", None)
        if fn is not None:
            text = ctypes.c_char_p()
            fn.restype = ctypes.c_int
            if fn(ctypes.c_int(code), ctypes.byref(text)) == CUDA_SUCCESS and text.value:
                return text.value.decode(errors="replace")
        return _ERROR_NAMES.get(code, f"CUresult {code}")

    def init(self) -> None:
        self._call(("cuInit",), ctypes.c_uint(0))

    def driver_version(self) -> int | None:
        version = ctypes.c_int()
        try:
            self._call(("cuDriverGetVersion",), ctypes.byref(version))
        except CudaError:
            return None
        return version.value

    def device_count(self) -> int:
        count = ctypes.c_int()
        self._call(("cuDeviceGetCount",), ctypes.byref(count))
        return count.value

    def device(self, ordinal: int) -> int:
        dev = ctypes.c_int()
        self._call(("cuDeviceGet",), ctypes.byref(dev), ctypes.c_int(ordinal))
        return dev.value

    def name(self, dev: int) -> str:
        buf = ctypes.create_string_buffer(256)
        self._call(("cuDeviceGetName",), buf, ctypes.c_int(len(buf)), ctypes.c_int(dev))
        return buf.value.decode(errors="replace")

    def uuid(self, dev: int) -> str | None:
        """The device's UUID as NVML writes it (GPU-xxxxxxxx-xxxx-...), None if unavailable."""
        raw = (ctypes.c_ubyte * 16)()
        try:
            self._call(("cuDeviceGetUuid_v2", "cuDeviceGetUuid"), raw, ctypes.c_int(dev))
        except CudaError:
            return None
        h = bytes(raw).hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def ctx_create(self, dev: int) -> int:
        ctx = ctypes.c_void_p()
        self._call(
            ("cuCtxCreate_v2", "cuCtxCreate"),
            ctypes.byref(ctx),
            ctypes.c_uint(0),
            ctypes.c_int(dev),
        )
        return int(ctx.value or 0)

    def ctx_destroy(self, ctx: int) -> None:
        self._call(("cuCtxDestroy_v2", "cuCtxDestroy"), ctypes.c_void_p(ctx))

    def mem_alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._call(("cuMemAlloc_v2", "cuMemAlloc"), ctypes.byref(ptr), ctypes.c_size_t(nbytes))
        return ptr.value

    def memset(self, ptr: int, nbytes: int) -> None:
        """Touch the memory (zeros), so it is surely resident, and wait for it."""
        self._call(
            ("cuMemsetD8_v2", "cuMemsetD8"),
            ctypes.c_uint64(ptr),
            ctypes.c_ubyte(0),
            ctypes.c_size_t(nbytes),
        )
        self._call(("cuCtxSynchronize",))

    def mem_free(self, ptr: int) -> None:
        self._call(("cuMemFree_v2", "cuMemFree"), ctypes.c_uint64(ptr))


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so no allocation outlives the check."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def hold(seconds: float) -> None:
    """Until standard input closes (or reads anything), or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sys.stdin], [], [], min(left, 1.0))
        if ready:
            sys.stdin.readline()
            return


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def run(mib: int, listen: bool, hold_s: float, library: str | None = None) -> int:
    """Allocate `mib` MiB on device 0 of what CUDA_VISIBLE_DEVICES leaves visible, report,
    hold, release. The exit status the module's docstring lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        cuda = CudaDriver(library)
    except OSError as exc:
        say(status="no_library", error=str(exc), pid=os.getpid())
        return 3
    nbytes = mib * MIB
    ctx = ptr = 0
    try:
        try:
            cuda.init()
        except CudaError as exc:
            if exc.code == CUDA_ERROR_NO_DEVICE:
                say(status="no_device", error=exc.name, visible=visible, pid=os.getpid())
                return 0
            raise
        count = cuda.device_count()
        if count == 0:
            say(status="no_device", error="cuDeviceGetCount: 0", visible=visible, pid=os.getpid())
            return 0
        dev = cuda.device(0)
        ctx = cuda.ctx_create(dev)
        ptr = cuda.mem_alloc(nbytes)
        cuda.memset(ptr, nbytes)
        sock = None
        if listen:  # a worker-like process: one loopback listener, as the benchmark's
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
        say(
            status="ready",
            pid=os.getpid(),
            devices=count,
            name=cuda.name(dev),
            uuid=cuda.uuid(dev),
            bytes=nbytes,
            port=sock.getsockname()[1] if sock else None,
            visible=visible,
            driver_version=cuda.driver_version(),
            library=cuda.path,
            symbols=cuda.symbols,
        )
        hold(hold_s)
        if sock:
            sock.close()
        return 0
    except CudaError as exc:
        say(status="error", call=exc.call, error=exc.name, code=exc.code, pid=os.getpid())
        return 1
    finally:
        with contextlib.suppress(CudaError):  # the driver frees them at exit anyway
            if ptr:
                cuda.mem_free(ptr)
            if ctx:
                cuda.ctx_destroy(ctx)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=1024, help="MiB to allocate (default 1024)")
    parser.add_argument("--listen", action="store_true", help="also listen on a loopback port")
    parser.add_argument(
        "--hold-s", type=float, default=600.0, help="hold at most this long (default 600)"
    )
    args = parser.parse_args(argv)
    die_with_parent()
    return run(args.mib, args.listen, args.hold_s)


if __name__ == "__main__":
    sys.exit(main())
