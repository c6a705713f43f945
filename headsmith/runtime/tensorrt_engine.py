"""``TensorRTEngine``: runs the serialized engines of a TensorRT artifact on an NVIDIA GPU.

Letters: B batch, T new tokens, P cached tokens, H KV heads, D head dim, V vocab.

Same protocol as the other engines (``prefill`` / ``decode`` / ``forward``; int64 torch tensors in, float32
torch tensors out). The engines follow the ONNX contract (``decode`` takes ``past[B,H,P,D]`` and returns
``present[B,H,P+T,D]``); the cache (:class:`TrtCache`) stays in GPU memory between steps and only the
inputs and the logits cross the bus. GPU memory and copies go through the CUDA driver API (``libcuda``,
loaded with ctypes), so no CUDA-enabled torch or cuda-python is needed.

Before an engine is deserialized the machine is checked: the TensorRT flavour and version recorded in the
manifest must be importable, and a CUDA driver with at least one GPU must be present. Anything missing is a
:class:`~headsmith.errors.BackendError` saying what (no GPU, no driver, wrong TensorRT), never a crash.
TensorRT-RTX's support matrix lists compute capability 7.5, 8.6, 8.9 and 12.0; on other GPUs (H100 is
9.0) a failed deserialization says so.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import BackendError
from ..program import ModelInfo, ModelSpec

RTX_COMPUTE_CAPABILITIES = ("7.5", "8.6", "8.9", "12.0")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
_CC_MAJOR, _CC_MINOR = 75, 76  # CUdevice_attribute values


class CudaDriver:
    """The few CUDA driver calls the engine needs (device memory, copies, one stream)."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            raise BackendError("TensorRT engines need an NVIDIA GPU, but no CUDA driver (libcuda.so.1) is installed "
                               "on this machine", "run the artifact on a machine with an NVIDIA GPU and driver, or "
                               "convert with --backend onnx or --backend tvm for the CPU") from None
        self.check(self.lib.cuInit(0), "cuInit")
        count = ctypes.c_int(0)
        self.check(self.lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if count.value == 0:
            raise BackendError("TensorRT engines need an NVIDIA GPU, but the CUDA driver sees none",
                               "run the artifact on a machine with an NVIDIA GPU")
        self.device = ctypes.c_int(0)
        self.check(self.lib.cuDeviceGet(ctypes.byref(self.device), 0), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), self.device), "cuDevicePrimaryCtxRetain")
        self.check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        self.stream = ctypes.c_void_p()
        self.check(self.lib.cuStreamCreate(ctypes.byref(self.stream), 0), "cuStreamCreate")
        self.lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        self.lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        self.lib.cuMemcpyDtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t]
        self.lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]

    def check(self, code: int, what: str) -> None:
        if code == 0:
            return
        text = ctypes.c_char_p()
        self.lib.cuGetErrorString(code, ctypes.byref(text))
        message = text.value.decode() if text.value else f"error {code}"
        raise BackendError(f"CUDA {what} failed: {message}", "check the GPU and its driver (nvidia-smi)")

    @property
    def compute_capability(self) -> str:
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, self.device), "cuDeviceGetAttribute")
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, self.device), "cuDeviceGetAttribute")
        return f"{major.value}.{minor.value}"

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64(0)
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cuMemAlloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cuMemFree_v2(ptr)

    def to_device(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        ptr = self.alloc(array.nbytes)
        if array.nbytes:
            self.check(self.lib.cuMemcpyHtoD_v2(ptr, array.ctypes.data, array.nbytes), "cuMemcpyHtoD")
        return ptr

    def to_host(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.nbytes:
            self.check(self.lib.cuMemcpyDtoH_v2(out.ctypes.data, ptr, out.nbytes), "cuMemcpyDtoH")
        return out

    def synchronize(self) -> None:
        self.check(self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")


@dataclass
class DeviceTensor:
    ptr: int
    shape: tuple[int, ...]
    dtype: Any


@dataclass
class TrtCache:
    """The present tensors of the last step, in GPU memory (``[B,H,length,D]`` each)."""

    tensors: list[DeviceTensor]
    seq_dims: list[int]
    driver: CudaDriver = field(repr=False)

    @property
    def length(self) -> int:
        return int(self.tensors[0].shape[self.seq_dims[0]]) if self.tensors else 0

    def replace(self, tensors: list[DeviceTensor]) -> None:
        for t in self.tensors:
            self.driver.free(t.ptr)
        self.tensors = tensors

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens (a copy through the host)."""
        if length >= self.length:
            return
        kept = []
        for t, d in zip(self.tensors, self.seq_dims):
            host = self.driver.to_host(t.ptr, t.shape, t.dtype)
            part = np.take(host, np.arange(length), axis=d)
            kept.append(DeviceTensor(self.driver.to_device(part), part.shape, t.dtype))
        self.replace(kept)


def import_flavour(flavour: str, version: str) -> Any:
    """The TensorRT module an artifact was built with, or a BackendError naming what to install."""
    module_name = _MODULES.get(flavour)
    if module_name is None:
        raise BackendError(f"unknown TensorRT flavour {flavour!r} in the manifest", "re-run `headsmith convert`")
    try:
        trt = importlib.import_module(module_name)
    except ImportError:
        raise BackendError(f"the engines were built with {flavour} {version}, which is not installed",
                           f"pip install {flavour}=={version}") from None
    if str(trt.__version__) != version:
        raise BackendError(f"the engines were built with {flavour} {version}, but {trt.__version__} is installed "
                           "(serialized engines only load in the version that built them)",
                           f"pip install {flavour}=={version}, or convert again")
    return trt


@dataclass
class TensorRTEngine:
    """Runs ``prefill.engine`` / ``decode.engine`` (or ``model.engine``) (see the module docstring)."""

    info: ModelInfo
    spec: ModelSpec
    backend: dict[str, Any]
    trt: Any
    driver: CudaDriver
    contexts: dict[str, Any]
    engines: dict[str, Any]
    name: str = "tensorrt"

    @staticmethod
    def from_artifact(artifact: Any) -> TensorRTEngine:
        backend = artifact.manifest["backend"]
        flavour, version = str(backend.get("flavour")), str(backend.get("version"))
        trt = import_flavour(flavour, version)
        driver = CudaDriver()
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engines: dict[str, Any] = {}
        contexts: dict[str, Any] = {}
        for key in ("prefill", "decode", "forward"):
            if key not in backend:
                continue
            path = artifact.path / backend[key]
            if not path.exists():
                raise BackendError(f"TensorRT engine {path} is missing", "re-run `headsmith convert --backend tensorrt`")
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                cc = driver.compute_capability
                hint = "convert again with the installed TensorRT"
                if flavour == "tensorrt-rtx" and cc not in RTX_COMPUTE_CAPABILITIES:
                    hint = (f"TensorRT-RTX supports compute capability {', '.join(RTX_COMPUTE_CAPABILITIES)}; "
                            f"this GPU is {cc}: install TensorRT (the tensorrt module) and convert again")
                raise BackendError(f"{flavour} {version} could not load {path.name} on this GPU (compute "
                                   f"capability {cc})", hint)
            engines[key] = engine
            contexts[key] = engine.create_execution_context()
        return TensorRTEngine(artifact.info, artifact.spec, backend, trt, driver, contexts, engines)

    @property
    def seq_dims(self) -> list[int]:
        return [int(e["seq_dim"]) for e in self.backend.get("cache", [])]

    def _run(self, key: str, inputs: dict[str, DeviceTensor]) -> dict[str, DeviceTensor]:
        """Run one engine on device inputs; returns every output (freshly allocated)."""
        engine, context = self.engines[key], self.contexts[key]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) != self.trt.TensorIOMode.INPUT:
                continue
            if name not in inputs:
                raise BackendError(f"engine {key} needs input {name}")
            context.set_input_shape(name, inputs[name].shape)
            context.set_tensor_address(name, inputs[name].ptr)
        outputs: dict[str, DeviceTensor] = {}
        for name in names:
            if engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                continue
            shape = tuple(int(s) for s in context.get_tensor_shape(name))
            dtype = np.dtype(self.trt.nptype(engine.get_tensor_dtype(name)))
            ptr = self.driver.alloc(int(np.prod(shape)) * dtype.itemsize)
            context.set_tensor_address(name, ptr)
            outputs[name] = DeviceTensor(ptr, shape, dtype)
        if not context.execute_async_v3(self.driver.stream.value or 0):
            raise BackendError(f"TensorRT failed to run the {key} engine")
        self.driver.synchronize()
        return outputs

    def _feeds(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> dict[str, DeviceTensor]:
        feeds = {}
        for name, value in (("input_ids", input_ids), ("position_ids", position_ids),
                            ("attention_mask", attention_mask)):
            array = value.to(torch.int64).contiguous().numpy()
            feeds[name] = DeviceTensor(self.driver.to_device(array), array.shape, array.dtype)
        return feeds

    def _take(self, outputs: dict[str, DeviceTensor], name: str) -> Tensor:
        t = outputs.pop(name)
        host = self.driver.to_host(t.ptr, t.shape, t.dtype)
        self.driver.free(t.ptr)
        return torch.from_numpy(host)

    def _free(self, tensors: dict[str, DeviceTensor]) -> None:
        for t in tensors.values():
            self.driver.free(t.ptr)

    def _presents(self, outputs: dict[str, DeviceTensor]) -> list[DeviceTensor]:
        return [outputs.pop(f"present_{e['name'].replace('.', '_')}") for e in self.backend.get("cache", [])]

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]:
        from .engine import check_inputs

        check_inputs(input_ids, attention_mask, position_ids)
        feeds = self._feeds(input_ids, position_ids, attention_mask)
        outputs = self._run("prefill", feeds)
        self._free(feeds)
        logits = self._take(outputs, "logits")
        cache = TrtCache(self._presents(outputs), self.seq_dims, self.driver)
        self._free(outputs)
        return logits, cache

    def decode(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: TrtCache) -> tuple[Tensor, Any]:
        feeds = self._feeds(input_ids, position_ids, attention_mask)
        for e, t in zip(self.backend.get("cache", []), cache.tensors):
            feeds[f"past_{e['name'].replace('.', '_')}"] = t
        outputs = self._run("decode", feeds)
        self._free({k: v for k, v in feeds.items() if not k.startswith("past_")})
        logits = self._take(outputs, "logits")
        cache.replace(self._presents(outputs))
        self._free(outputs)
        return logits, cache

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        if "forward" in self.backend:
            feeds = self._feeds(input_ids, position_ids, attention_mask)
            outputs = self._run("forward", feeds)
            self._free(feeds)
            name = next(iter(outputs))
            hidden = self._take(outputs, name)
            self._free(outputs)
            return hidden
        b = input_ids.shape[0]
        empty = []
        for e in self.backend.get("cache", []):
            shape = tuple(b if i == 0 else 0 if i == int(e["seq_dim"]) else int(d) for i, d in enumerate(e["shape"]))
            empty.append(DeviceTensor(self.driver.alloc(0), shape, np.dtype(np.float32)))
        logits, cache = self.decode(input_ids, attention_mask, position_ids, TrtCache(empty, self.seq_dims, self.driver))
        cache.replace([])
        return logits
