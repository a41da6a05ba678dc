"""Load the patched llama.cpp libraries and bind the razor C entry points.

llama-cpp-python is installed without a llama.cpp of its own; it loads whatever libllama
LLAMA_CPP_LIB_PATH points at when `llama_cpp` is first imported. We point it at our patched
build for that one import only, so child processes and other programs are unaffected.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import pathlib
import sys
from dataclasses import dataclass

import cffi

BINDING_VERSION = "0.3.36"
BASE_COMMIT = "0c1e57098"
MIN_PATCH_VERSION = 6

_CDEF = """
uint32_t     llama_razor_patch_version(void);
const char * llama_razor_base_commit(void);
const char * llama_razor_backends(void);
int32_t      llama_razor_kv_bytes(const void * ctx, int64_t out[4]);
int64_t      llama_razor_kv_bytes_swa(const void * ctx);
int32_t      llama_razor_head_map(const void * ctx, int32_t * out, int32_t n);
int32_t      llama_razor_window(const void * ctx, uint32_t * n_sink, uint32_t * n_window);
int32_t      llama_razor_n_ubatch(const void * ctx);
int32_t      llama_razor_layer_windows(const void * ctx, uint32_t * out, int32_t n);
int32_t      llama_razor_ring_bytes(const void * ctx, uint32_t * windows, int64_t * bytes, int32_t n);
int32_t      llama_razor_n_pin(const void * ctx);
int32_t      llama_razor_set_pins(void * ctx, int32_t seq_id, const int32_t * pos, int32_t n);
int32_t      llama_razor_pin_capture(void * ctx, bool on);
int32_t      llama_razor_pin_scores(void * ctx, int32_t seq_id, float * out, int32_t n);

struct gguf_init_params { bool no_alloc; void ** ctx; };
void *       gguf_init_from_file(const char * fname, struct gguf_init_params params);
int64_t      gguf_find_key(const void * ctx, const char * key);
void         gguf_free(void * ctx);
"""


class NativeLibraryError(RuntimeError):
    """The patched libraries are missing or do not match the installed binding."""


class RpcServerError(ValueError):
    """An RPC worker address that is malformed or does not answer."""


def lib_dir() -> pathlib.Path:
    env = os.environ.get("RAZOR_GGUF_LIB_PATH")
    if env:
        return pathlib.Path(env)
    here = pathlib.Path(__file__).resolve().parent / "lib"
    if here.is_dir():
        return here
    # Running from a source checkout: use the libraries of the installed build.
    try:
        installed = pathlib.Path(importlib.metadata.distribution("razor-gguf").locate_file("razor_gguf/lib"))
    except importlib.metadata.PackageNotFoundError:
        return here
    return installed.resolve() if installed.is_dir() else here


def _lib_file(directory: pathlib.Path) -> pathlib.Path:
    name = {"win32": "llama.dll", "darwin": "libllama.dylib"}.get(sys.platform, "libllama.so")
    return directory / name


@functools.lru_cache(maxsize=None)
def razor_lib():
    """cffi handle on the patched libllama (the same shared object llama_cpp uses)."""
    path = _lib_file(lib_dir())
    if not path.exists():
        raise NativeLibraryError(
            f"patched llama.cpp library not found at {path}; build it with `make setup` "
            "(or `pip install .`)")
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    try:
        lib = ffi.dlopen(str(path))
        lib.llama_razor_patch_version
    except (OSError, AttributeError) as e:
        raise NativeLibraryError(f"{path} is not a razor-patched llama.cpp build: {e}") from None
    return ffi, lib


@dataclass(frozen=True)
class BuildInfo:
    patch_version: int
    base_commit: str
    backends: tuple[str, ...]
    lib_dir: pathlib.Path


def build_info() -> BuildInfo:
    ffi, lib = razor_lib()
    backends = ffi.string(lib.llama_razor_backends()).decode()
    return BuildInfo(
        patch_version=int(lib.llama_razor_patch_version()),
        base_commit=ffi.string(lib.llama_razor_base_commit()).decode(),
        backends=tuple(b for b in backends.split(",") if b),
        lib_dir=lib_dir(),
    )


def _check_match(binding_version: str, info: BuildInfo) -> None:
    if binding_version != BINDING_VERSION:
        raise NativeLibraryError(
            f"llama-cpp-python {binding_version} is installed but the razor libraries are built "
            f"for {BINDING_VERSION}; install llama-cpp-python=={BINDING_VERSION}")
    if info.base_commit != BASE_COMMIT or info.patch_version < MIN_PATCH_VERSION:
        raise NativeLibraryError(
            f"libraries in {info.lib_dir} are llama.cpp {info.base_commit} with razor patch "
            f"{info.patch_version}; this package needs {BASE_COMMIT} with patch >= "
            f"{MIN_PATCH_VERSION}: rebuild with `make setup`")


@functools.lru_cache(maxsize=None)
def load_llama_cpp():
    """Import llama_cpp bound to the patched libraries and check that both sides match."""
    info = build_info()
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None:
        # Someone imported llama_cpp first: it is bound to whatever it found then.
        if pathlib.Path(loaded._base_path).resolve() != info.lib_dir.resolve():
            raise NativeLibraryError(
                f"llama_cpp was imported before razor_gguf and is bound to {loaded._base_path}; "
                "import razor_gguf first")
    else:
        previous = os.environ.get("LLAMA_CPP_LIB_PATH")
        os.environ["LLAMA_CPP_LIB_PATH"] = str(info.lib_dir)
        try:
            import llama_cpp.llama_cpp  # noqa: F401  (binds to LLAMA_CPP_LIB_PATH at import)
        except AttributeError as e:
            # The binding resolves every symbol it mirrors at import time.
            raise NativeLibraryError(
                f"the libraries in {info.lib_dir} lack a symbol llama-cpp-python "
                f"{BINDING_VERSION} needs ({e}); rebuild with `make setup`") from None
        finally:
            if previous is None:
                os.environ.pop("LLAMA_CPP_LIB_PATH", None)
            else:
                os.environ["LLAMA_CPP_LIB_PATH"] = previous
    import llama_cpp

    _check_match(llama_cpp.__version__, info)
    return llama_cpp


@dataclass(frozen=True)
class KVBytes:
    """Allocated KV-cache bytes of a context, by part (llama_razor_kv_bytes)."""

    razor: bool  # the context runs the razor cache (else a stock cache, all in `retrieval`)
    retrieval: int  # full cache of the retrieval heads
    local: int  # sinks + window ring of the local heads, with its scratch rows
    compensation: int  # F32 running sums of the evicted keys and values
    full_equiv: int  # what a stock cache of the same context allocates (a sliding-window model's SWA cache included)
    swa: int = 0  # the stock SWA cache razor keeps for a sliding-window model's sliding-window layers

    @property
    def total(self) -> int:
        return self.retrieval + self.local + self.compensation + self.swa

    @property
    def saving(self) -> float:
        """Fraction of the full cache not allocated (0 for a stock cache)."""
        return 1.0 - self.total / self.full_equiv if self.full_equiv else 0.0


def _ctx_ptr(ctx) -> int:
    """Address of a llama_context from a ctypes pointer (llama_cpp) or an int."""
    import ctypes

    if isinstance(ctx, int):
        return ctx
    return ctypes.cast(ctx, ctypes.c_void_p).value or 0


def kv_bytes(ctx) -> KVBytes:
    ffi, lib = razor_lib()
    out = ffi.new("int64_t[4]")
    p = ffi.cast("void *", _ctx_ptr(ctx))
    rc = lib.llama_razor_kv_bytes(p, out)
    if rc < 0:
        raise ValueError("this context has no KV cache")
    return KVBytes(bool(rc), int(out[0]), int(out[1]), int(out[2]), int(out[3]), int(lib.llama_razor_kv_bytes_swa(p)))


def _int_array(ctx, getter: str, ctype: str) -> list[int] | None:
    """What one of the C API's array getters copies out (sized by a first call without a buffer), None for a
    stock cache (the getter returns 0)."""
    ffi, lib = razor_lib()
    fn = getattr(lib, getter)
    p = ffi.cast("void *", _ctx_ptr(ctx))
    n = fn(p, ffi.NULL, 0)
    if n == 0:
        return None
    buf = ffi.new(f"{ctype}[]", n)
    fn(p, buf, n)
    return [int(x) for x in buf]


def head_map(ctx) -> list[int] | None:
    """The head map in effect ([n_layer*n_head_kv], 1 = retrieval), None for a stock cache."""
    return _int_array(ctx, "llama_razor_head_map", "int32_t")


def gguf_has_key(path: str, *keys: str) -> bool | None:
    """Whether the GGUF at path holds any of these metadata keys, read by ggml's own GGUF parser (its header
    only: no tensor data, fast where gguf-py's reader takes seconds on a large vocabulary); None when the file
    cannot be read as a GGUF (the load that follows reports why)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":  # not ours to report: ggml's parser would print its own line first
                return None
    except OSError:
        return None
    ffi, lib = razor_lib()
    params = ffi.new("struct gguf_init_params *", {"no_alloc": True, "ctx": ffi.NULL})
    g = lib.gguf_init_from_file(os.fsencode(path), params[0])
    if g == ffi.NULL:
        return None
    try:
        return any(lib.gguf_find_key(g, k.encode()) >= 0 for k in keys)
    finally:
        lib.gguf_free(g)


def n_ubatch(ctx) -> int | None:
    """Tokens per ubatch the razor cache runs (at most the context's n_ubatch), None for a stock cache."""
    ffi, lib = razor_lib()
    n = int(lib.llama_razor_n_ubatch(ffi.cast("void *", _ctx_ptr(ctx))))
    return n or None


def window(ctx) -> tuple[int, int] | None:
    """(n_sink, window) in effect, None for a stock cache."""
    ffi, lib = razor_lib()
    s, w = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    if not lib.llama_razor_window(ffi.cast("void *", _ctx_ptr(ctx)), s, w):
        return None
    return int(s[0]), int(w[0])


def layer_windows(ctx) -> list[int] | None:
    """Each layer's window in effect ([n_layer], 0 for layers without local heads), None for a stock cache."""
    return _int_array(ctx, "llama_razor_layer_windows", "uint32_t")


def ring_bytes(ctx) -> list[tuple[int, int]] | None:
    """(window, allocated KV bytes) of each local ring, ascending window; None for a stock cache."""
    ffi, lib = razor_lib()
    p = ffi.cast("void *", _ctx_ptr(ctx))
    n = lib.llama_razor_ring_bytes(p, ffi.NULL, ffi.NULL, 0)
    if n == 0:
        return None
    w, b = ffi.new("uint32_t[]", n), ffi.new("int64_t[]", n)
    lib.llama_razor_ring_bytes(p, w, b, n)
    return [(int(w[i]), int(b[i])) for i in range(n)]


def n_pin(ctx) -> int:
    """Pinned tokens a sequence of this context may hold (razor.n_pin), 0 without pins or for a stock cache."""
    ffi, lib = razor_lib()
    return int(lib.llama_razor_n_pin(ffi.cast("void *", _ctx_ptr(ctx))))


def set_pins(ctx, positions, seq_id: int = 0) -> int:
    """Pin positions of a sequence (llama_razor_set_pins): every local head keeps them; they fill as they are
    decoded. Returns how many were kept (positions below n_sink are sinks already)."""
    ffi, lib = razor_lib()
    pos = [int(x) for x in positions]
    n = lib.llama_razor_set_pins(ffi.cast("void *", _ctx_ptr(ctx)), seq_id, ffi.new("int32_t[]", pos), len(pos))
    if n < 0:
        raise ValueError(f"cannot pin {len(pos)} positions: this context pins at most {n_pin(ctx)}")
    return int(n)


def pin_capture(ctx, on: bool) -> None:
    """Start (clearing it) or stop recording the retrieval heads' attention per key (llama_razor_pin_capture)."""
    ffi, lib = razor_lib()
    if lib.llama_razor_pin_capture(ffi.cast("void *", _ctx_ptr(ctx)), on) < 0:
        raise ValueError("this context has no pins or no retrieval heads")


def pin_scores(ctx, n: int, seq_id: int = 0):
    """The recorded attention per position [n] (numpy float32)."""
    import numpy as np

    ffi, lib = razor_lib()
    out = np.zeros(n, dtype=np.float32)
    if lib.llama_razor_pin_scores(ffi.cast("void *", _ctx_ptr(ctx)), seq_id, ffi.cast("float *", out.ctypes.data), n) < 0:
        raise ValueError("this context has no recorded attention")
    return out


# ----------------------------------------------------------------------------------------------- RPC

_GGML_CDEF = """
void * ggml_backend_reg_by_name(const char * name);
void * ggml_backend_reg_get_proc_address(void * reg, const char * name);
void   ggml_backend_register(void * reg);
size_t ggml_backend_dev_count(void);
void * ggml_backend_dev_get(size_t index);
int    ggml_backend_dev_type(void * device);
void * ggml_backend_dev_backend_reg(void * device);
const char * ggml_backend_reg_name(void * reg);
"""
_rpc_registered: set[str] = set()


@functools.lru_cache(maxsize=None)
def _ggml():
    """cffi handle on the patched libggml (the one libllama uses)."""
    ffi = cffi.FFI()
    ffi.cdef(_GGML_CDEF)
    return ffi, ffi.dlopen(str(lib_dir() / _lib_file(lib_dir()).name.replace("llama", "ggml")))


def local_gpu_devices() -> int:
    """GPU devices of this machine the libraries can use (RPC workers not counted: llama.cpp's
    llama_supports_gpu_offload() is true for any build with the RPC backend)."""
    ffi, ggml = _ggml()
    n = 0
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        reg = ffi.string(ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev))).decode()
        n += ggml.ggml_backend_dev_type(dev) in (1, 2) and reg != "RPC"  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU
    return n


def parse_rpc_servers(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """["HOST:PORT", ...] from "HOST:PORT[,HOST:PORT...]" or a list; RpcServerError for a malformed one."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (x.strip() for x in items):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RpcServerError(f"RPC worker '{item}' is not HOST:PORT")
        out.append(f"{host.strip('[]')}:{int(port)}")
    if not out:
        raise RpcServerError("no RPC worker given")
    return out


def check_rpc_servers(endpoints: str | list[str], timeout: float = 5.0) -> list[str]:
    """The parsed endpoints, once each accepts a TCP connection; RpcServerError naming the first that does not."""
    import socket

    out = parse_rpc_servers(endpoints)
    for e in out:
        host, port = e.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                pass
        except OSError as err:
            raise RpcServerError(f"RPC worker {e} does not answer ({err.strerror or err})") from None
    return out


def add_rpc_servers(endpoints: str | list[str], timeout: float = 5.0) -> None:
    """Register llama.cpp RPC workers (razor-rpc-server) as devices of this process, before a model loads:
    llama.cpp then places offloaded layers (n_gpu_layers) on them. Each worker is first reached over TCP,
    because ggml-rpc aborts the whole process on a worker it cannot connect to."""
    todo = [e for e in parse_rpc_servers(endpoints) if e not in _rpc_registered]
    if not todo:
        return
    check_rpc_servers(todo, timeout)
    ffi, ggml = _ggml()
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    if reg == ffi.NULL:
        raise NativeLibraryError("these libraries were built without the RPC backend (RAZOR_RPC=OFF)")
    add = ffi.cast("void * (*)(const char *)", ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server"))
    for e in todo:
        r = add(e.encode())
        if r == ffi.NULL:
            raise RpcServerError(f"RPC worker {e} serves no device")
        ggml.ggml_backend_register(r)
        _rpc_registered.add(e)
