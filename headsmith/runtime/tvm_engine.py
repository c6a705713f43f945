"""``TvmEngine``: runs a TVM artifact (``model.so``, see ``headsmith/backends/tvm_backend.py``) in the Relax VM.

Letters: B batch, T new tokens, P cached tokens, C cache capacity, H KV heads, D head dim, V vocab.

Same protocol as the other engines (``prefill`` / ``decode`` / ``forward``, int64 torch tensors in,
float32 torch tensors out; tensors cross into TVM through DLPack without copies). The cache is
:class:`TvmCache`: per entry one torch buffer ``[B,H,C,D]`` that the library's ``decode`` writes the new
keys/values into in place (rows ``P..P+T``), so a step copies nothing; a step that would pass the capacity
first grows every buffer to twice the size. Weights are read from ``weights.safetensors``, copied to
64-byte aligned memory (TVM's kernels assume it) and packed once by the library's ``transform_params``.

Before anything is loaded the manifest's target is checked against this machine: a CUDA library needs a
CUDA GPU whose compute capability runs the recorded arch, an ``llvm`` library needs every ISA extension it
was compiled for. A mismatch is a :class:`~headsmith.errors.BackendError` saying what is missing.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import BackendError
from ..program import ModelInfo, ModelSpec
from .ring import Ring, rings_of, step_size

ALIGNMENT = 64  # bytes; TVM's generated code assumes it for every buffer


@dataclass
class TvmCache:
    """Capacity buffers ``[B,H,C,D]`` whose first ``length`` rows are valid: torch tensors (shared with TVM)
    on CPU, TVM tensors on a GPU."""

    tensors: list[Any]
    seq_dims: list[int]
    device: Any
    length: int = 0
    """Tokens seen."""
    rings: list[Ring | None] = field(default_factory=list)
    """Per entry its ring (a fixed ``S + W`` rows, see ``ring.py``; CPU only) or None."""

    def __post_init__(self) -> None:
        if not self.rings:
            self.rings = [None] * len(self.tensors)

    @property
    def capacity(self) -> int:
        """Rows of the entries that grow (ring entries never do); 0 when every entry is a ring."""
        grows = [i for i, r in enumerate(self.rings) if r is None]
        return int(self.tensors[grows[0]].shape[self.seq_dims[grows[0]]]) if grows else 0

    def rows(self, i: int, seen: int | None = None) -> int:
        """Valid rows of entry ``i`` after ``seen`` tokens (default: now)."""
        seen = self.length if seen is None else seen
        ring = self.rings[i]
        return ring.slots(seen) if ring is not None else seen

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` rows (grows to at least twice the capacity, keeping the valid rows; ring
        entries keep their size)."""
        if tokens <= self.capacity or all(r is not None for r in self.rings):
            return
        size = max(tokens, 2 * self.capacity)
        grown = []
        for i, (t, d) in enumerate(zip(self.tensors, self.seq_dims)):
            if self.rings[i] is not None:
                grown.append(t)
                continue
            shape = list(t.shape)
            shape[d] = size
            new = empty(shape, self.device)
            copy_rows(new, t, d, self.length, self.device)
            grown.append(new)
        self.tensors = grown

    def step(self, new: int) -> None:
        """After a decode step of ``new`` tokens: ring entries file the step's token into its row."""
        for t, d, r in zip(self.tensors, self.seq_dims, self.rings):
            move = r.after_step(self.length, new) if r is not None else None
            if move is not None and move[1] >= 0:
                t.narrow(d, move[1], 1).copy_(t.narrow(d, move[0], 1))
        self.length += new

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens (speculative decoding's rollback)."""
        for r in self.rings:
            if r is not None:
                r.check_truncate(self.length, length)
        self.length = min(self.length, max(0, length))

    def valid(self) -> list[Tensor]:
        """The cache as torch ``[B,H,rows,D]`` tensors (views on CPU; ring entries in slot order)."""
        return [_to_torch(t).narrow(d, 0, self.rows(i)) for i, (t, d) in enumerate(zip(self.tensors, self.seq_dims))]


def on_cpu(device: Any) -> bool:
    return int(device.dlpack_device_type()) == 1


def empty(shape: list[int], device: Any) -> Any:
    """A float32 cache buffer: an aligned torch tensor on CPU, a TVM tensor elsewhere."""
    if on_cpu(device):
        return aligned_empty(shape)
    import tvm
    return tvm.runtime.empty(tuple(shape), "float32", device)


def copy_rows(dst: Any, src: Any, dim: int, rows: int, device: Any) -> None:
    """``dst[..., :rows, ...] = src[..., :rows, ...]`` along ``dim`` (``src`` torch or TVM)."""
    if on_cpu(device):
        dst.narrow(dim, 0, rows).copy_(_to_torch(src).narrow(dim, 0, rows))
        return
    host = dst.numpy()
    index = [slice(None)] * host.ndim
    index[dim] = slice(0, rows)
    host[tuple(index)] = _to_torch(src).numpy()[tuple(index)]
    dst.copyfrom(host)


def aligned_empty(shape: list[int] | tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised tensor whose data starts on a 64-byte boundary."""
    numel = 1
    for size in shape:
        numel *= int(size)
    pad = ALIGNMENT // torch.tensor([], dtype=dtype).element_size()
    raw = torch.empty(numel + pad, dtype=dtype)
    offset = (-raw.data_ptr() % ALIGNMENT) // raw.element_size()
    return raw.narrow(0, offset, numel).view(tuple(int(size) for size in shape))


def aligned(t: Tensor) -> Tensor:
    """``t`` itself when contiguous, detached and 64-byte aligned, else an aligned copy."""
    t = t.detach()
    if t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0:
        return t
    out = aligned_empty(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


def _load_cuda_runtime() -> None:
    """TVM's CUDA runtime library: ``import tvm`` loads it, except in runtime-only mode
    (``TVM_USE_RUNTIME_LIB=1``, a deployment without the 260 MB compiler library), where it is loaded here."""
    from tvm.base import _LOADED_LIBS
    if "tvm_runtime_cuda" in _LOADED_LIBS or "tvm_runtime" not in _LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", mode="RTLD_LOCAL",
            extra_lib_paths=[Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent])
    except (OSError, RuntimeError):  # no CUDA runtime here: tvm.cuda(0) then reports no device
        pass


def _register_cuda_compile(arch: str) -> None:
    """A TVM CUDA library carries the CUDA C++ that TVM generated (no CUDA toolkit is needed to convert); the
    runtime compiles it when the library loads, through the ``tvm_callback_cuda_compile`` hook. TVM's own hook
    asks the compiler's current target for the arch, which a runtime-only TVM does not have: this one compiles
    for the arch the manifest records (NVRTC through cuda-bindings, or nvcc with TVM_CUDA_COMPILE_MODE=nvcc)."""
    import os

    import tvm_ffi
    from tvm.support import nvcc

    mode = os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower()

    def compile_cuda(code: str) -> bytes:
        return nvcc.compile_cuda(code, target_format="fatbin" if mode == "nvcc" else "cubin", arch=arch,
                                 compiler=mode)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def check_target(record: dict[str, Any], path: Path) -> Any:
    """The TVM device for ``record`` (the manifest's target) on this machine, or a BackendError."""
    import tvm

    kind = record.get("kind")
    spec = record.get("spec", kind)
    if kind == "cuda":
        _load_cuda_runtime()
        dev = tvm.cuda(0)
        if not dev.exist:
            raise BackendError(f"artifact {path} was compiled for {spec}, but no CUDA GPU (or CUDA driver) is "
                               "visible on this machine",
                               "run it on a machine with an NVIDIA GPU, or convert again with --tvm-target llvm")
        have = dev.compute_version  # e.g. "9.0"
        major, _, minor = str(have).partition(".")
        arch = str(record.get("arch", "sm_80"))
        want = arch.removeprefix("sm_").rstrip("a")
        if major != want[:-1] or int(minor or 0) < int(want[-1]):
            raise BackendError(f"artifact {path} was compiled for {arch}, but this GPU has compute capability "
                               f"{have}", f"convert again with --tvm-target cuda:sm_{major}{minor}")
        _register_cuda_compile(arch)
        return dev
    if kind != "llvm":
        raise BackendError(f"artifact {path} has an unknown TVM target {record!r}", "re-run `headsmith convert`")
    triple = str(record.get("mtriple", ""))
    machine = platform.machine()
    if triple and not triple.startswith(machine):
        raise BackendError(f"artifact {path} was compiled for {triple}, but this machine is {machine}",
                           "convert again on this machine (--backend tvm)")
    from ..backends.tvm_backend import host_features
    missing = sorted(set(record.get("features", [])) - host_features())
    if missing:
        raise BackendError(f"artifact {path} was compiled for CPU {record.get('mcpu')!r}, which has "
                           f"{', '.join(missing)}; this machine's CPU lacks them",
                           "convert again here (--tvm-target llvm picks this CPU) or with a portable CPU "
                           "such as --tvm-target llvm:x86-64-v3")
    return tvm.cpu(0)


@dataclass
class TvmEngine:
    """Runs ``model.so`` with the Relax VM (see the module docstring)."""

    info: ModelInfo
    spec: ModelSpec
    backend: dict[str, Any]
    vm: Any
    params: list[Any]
    device: Any
    name: str = "tvm"
    _keep: list[Any] = field(default_factory=list, repr=False)

    @staticmethod
    def from_artifact(artifact: Any, threads: int | None = None) -> TvmEngine:
        import tvm
        from tvm.runtime.vm import VirtualMachine  # (not tvm.relax: the runtime-only TVM has no compiler)

        backend = artifact.manifest["backend"]
        device = check_target(backend.get("target", {}), artifact.path)
        library = artifact.path / backend["library"]
        if not library.exists():
            raise BackendError(f"TVM library {library} is missing", "re-run `headsmith convert --backend tvm`")
        if threads is not None:
            tvm.get_global_func("runtime.config_threadpool")(0, int(threads))
        try:
            vm = VirtualMachine(tvm.runtime.load_module(str(library)), device)
        except Exception as e:  # TVM raises for a library its runtime cannot load
            raise BackendError(f"cannot load {library}: {str(e).strip().splitlines()[0][:300]}",
                               "convert again with this headsmith and TVM version") from e
        raw = []
        for name in backend["params"]:
            if name not in artifact.weights:
                raise BackendError(f"weight {name} of the TVM library is missing from weights.safetensors",
                                   "re-run `headsmith convert --backend tvm`")
            raw.append(_to_device(aligned(artifact.weights[name]), device))
        params = list(vm["transform_params"](raw))
        return TvmEngine(artifact.info, artifact.spec, backend, vm, params, device, _keep=raw)

    @property
    def seq_dims(self) -> list[int]:
        return [int(e["seq_dim"]) for e in self.backend.get("cache", [])]

    @property
    def rings(self) -> list[Ring | None]:
        return rings_of(self.backend.get("cache", []))

    def new_cache(self, batch: int, capacity: int = 256, rings: bool = True) -> TvmCache:
        """Empty buffers (ring entries: their ``S + W`` rows; ``rings=False``: every entry ``capacity`` rows)."""
        tensors, plan = [], self.rings if rings else [None] * len(self.seq_dims)
        for e, r in zip(self.backend.get("cache", []), plan):
            size = r.capacity if r is not None else capacity
            shape = [batch if i == 0 else size if i == int(e["seq_dim"]) else int(d) for i, d in enumerate(e["shape"])]
            tensors.append(empty(shape, self.device))
        return TvmCache(tensors, self.seq_dims, self.device, rings=list(plan))

    def _call(self, fn: str, *args: Any) -> Any:
        return self.vm[fn](*[_to_device(aligned(a), self.device) if isinstance(a, Tensor) else a for a in args],
                           *self.params)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]:
        from .engine import check_inputs

        check_inputs(input_ids, attention_mask, position_ids)
        b, t = input_ids.shape
        out = self._call("prefill", input_ids.to(torch.int64), position_ids.to(torch.int64),
                         attention_mask.to(torch.int64))
        cache = self.new_cache(b, capacity=max(256, 2 * t))
        for buf, d, value, r in zip(cache.tensors, cache.seq_dims, list(out)[1:], cache.rings):
            if r is not None:  # the prompt's presents hold every token: keep the ring's slots
                kept = _to_torch(value).index_select(d, torch.from_numpy(r.tokens(t)))
                copy_rows(buf, kept, d, r.slots(t), self.device)
            else:
                copy_rows(buf, value, d, t, self.device)
        cache.length = t
        return _to_torch(out[0]), cache

    def decode(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: TvmCache) -> tuple[Tensor, Any]:
        from .engine import decode_in_steps, ring_tensors

        t = input_ids.shape[1]
        total = attention_mask.shape[1]
        if total != cache.length + t:
            raise BackendError(f"decode got an attention mask of {total} tokens for {cache.length} cached + {t} new")
        if cache.length > 0 and step_size(cache.rings, cache.length, t) < t:
            return decode_in_steps(self, input_ids, attention_mask, position_ids, cache, cache.rings)
        cache.reserve(total)
        if on_cpu(self.device):  # the library writes into these buffers: they must be TVM-compatible as they are
            cache.tensors = [aligned(t) for t in cache.tensors]
        # a cache without rings (a forward's) keeps every token: its ring layers take the whole attention mask
        ringed = any(r is not None for r in cache.rings)
        rings = ring_tensors(cache.rings if ringed else self.rings, attention_mask, cache.length if ringed else 0)
        out = self._call("decode", input_ids.to(torch.int64), position_ids.to(torch.int64),
                         attention_mask.to(torch.int64), *cache.tensors, *rings)
        cache.step(t)
        return _to_torch(out[0]), cache

    @property
    def drafts(self) -> dict[str, dict[str, Any]]:
        return self.backend.get("drafts", {})  # type: ignore[no-any-return]

    def draft_decode(self, name: str, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                     cache: TvmCache) -> Tensor:
        """A speculative draft's decode step: its function writes the new rows of the entries of the layers it
        runs (the others keep stale rows until the runtime truncates the step away)."""
        record = self.drafts[name]
        t, total = input_ids.shape[1], attention_mask.shape[1]
        if total != cache.length + t:
            raise BackendError(f"decode got an attention mask of {total} tokens for {cache.length} cached + {t} new")
        cache.reserve(total)
        if on_cpu(self.device):
            cache.tensors = [aligned(x) for x in cache.tensors]
        out = self._call(record["decode"], input_ids.to(torch.int64), position_ids.to(torch.int64),
                         attention_mask.to(torch.int64), *(cache.tensors[i] for i in record["cache"]))
        cache.step(t)
        return _to_torch(out[0])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        if "forward" in self.backend.get("functions", []):
            out = self._call("forward", input_ids.to(torch.int64), position_ids.to(torch.int64),
                             attention_mask.to(torch.int64))
            return _to_torch(out[0] if _is_sequence(out) else out)
        logits, _ = self.decode(input_ids, attention_mask, position_ids,
                                self.new_cache(input_ids.shape[0], input_ids.shape[1], rings=False))
        return logits


def _is_sequence(value: Any) -> bool:
    return not hasattr(value, "__dlpack__") and hasattr(value, "__len__")


def _to_device(t: Tensor, device: Any) -> Any:
    """A torch CPU tensor as an argument for ``device`` (itself on CPU, a device copy on a GPU)."""
    if on_cpu(device):
        return t
    import tvm
    return tvm.runtime.tensor(t.numpy(), device)


def _to_torch(value: Any) -> Tensor:
    """A TVM tensor as a torch CPU tensor (zero-copy on CPU)."""
    tensor = torch.from_dlpack(value)
    return tensor if tensor.device.type == "cpu" else tensor.cpu()
