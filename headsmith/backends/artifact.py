"""Artifact directories: written atomically, read back with every checksum verified.

Layout::

    OUT/
      manifest.json        format version, source + sha256, pass specs and reports, ModelSpec,
                           backend, files and their sha256
      weights.safetensors  every weight the program reads (tied weights stored once, see "aliases")
      program.pt2          the program as a torch.export archive, weights lifted to inputs (so they are
                           not stored twice)
      tokenizer/           the tokenizer files, when the model has one
      draft_<name>.*       the decode graph of each speculative draft (``passes/draft.py``); its weights are
                           the target's where they are the same tensors, else ``draft_<name>.*`` entries
      ...                  backend files (ONNX, TVM, TensorRT engines)

``write_artifact`` builds everything in a temporary directory beside OUT and renames it into place at the
end, so a failed conversion leaves nothing half-written; an existing OUT is replaced only with
``force=True`` and never when OUT is (or contains, or is inside) the input.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, fx

from .._version import __version__
from ..errors import ArtifactError, BackendError, OutputExistsError
from ..fxutil import get_tensor
from ..merging import engine_call
from ..program import INPUT_NAMES, ModelInfo, ModelSpec, Program, SourceInfo, default_positions
from .lowering import DraftLowering, draft_lowerings

FORMAT = "headsmith-artifact"
FORMAT_VERSION = 1
BACKENDS = ("torch", "onnx", "tvm", "tensorrt")


def check_output_path(out: Path, source: object, force: bool) -> Path:
    """Refuse an existing output (without ``force``) and any output that overlaps the input."""
    out = out.expanduser()
    if source is not None:
        src = Path(str(source)).expanduser()
        if src.exists():
            a, b = out.resolve(), src.resolve()
            if a == b or b in a.parents or a in b.parents:
                raise OutputExistsError(f"output {out} overlaps the input {src}; headsmith never writes into "
                                        "its input", "choose an output directory outside the model's folder")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists", "pass --force to replace it, or choose another path")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory", "choose another path")
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def split_aliases(weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Store each tensor once: (unique tensors, alias name -> stored name)."""
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    by_id: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in by_id and t.numel() > 0:
            aliases[name] = by_id[key]
            continue
        by_id[key] = name
        unique[name] = t.detach().contiguous()
    return unique, aliases


def graph_weights(gm: fx.GraphModule) -> dict[str, Tensor]:
    """Every ``get_attr`` target of the graph and its tensor (aliases included)."""
    out: dict[str, Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) not in out:
            out[str(node.target)] = get_tensor(gm, str(node.target))
    return out


class LiftedProgram(torch.nn.Module):
    """Calls a graph whose weights were turned into leading inputs: ``forward(weights, *inputs)``."""

    def __init__(self, gm: fx.GraphModule, names: list[str]) -> None:
        super().__init__()
        self.gm = gm
        self.names = names

    def forward(self, weights: dict[str, Tensor], *inputs: Tensor) -> Any:
        return self.gm(*[weights[n] for n in self.names], *inputs)


def lift_weights(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``gm`` whose ``get_attr`` nodes are placeholders (in front of the real inputs)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    names: list[str] = []
    by_target: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) not in by_target:
            ph = graph.placeholder(f"w{len(names)}")
            ph.meta = dict(node.meta)
            by_target[str(node.target)] = ph
            names.append(str(node.target))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            env[node] = by_target[str(node.target)]
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(torch.nn.Module(), graph), names


def export_program(gm: fx.GraphModule, weights: dict[str, Tensor], example: tuple[Tensor, ...],
                   dynamic: tuple[Any, ...] | None = None) -> Any:
    """``torch.export`` the graph with weights as inputs and dynamic batch / sequence dims."""
    lifted, names = lift_weights(gm)
    module = LiftedProgram(lifted, names)
    if dynamic is None:
        dyn = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
        dynamic = tuple(dyn for _ in example)
    w_shapes = {n: None for n in names}
    args = ({n: weights[n] for n in names}, *example)
    try:
        ep = torch.export.export(module, args, dynamic_shapes=(w_shapes, tuple(dynamic)), strict=False)
    except Exception as e:  # report torch.export's first line; the cause stays chained
        raise BackendError(f"torch.export of the rewritten program failed: {str(e).strip().splitlines()[0][:300]}") from e
    ep.example_inputs = None  # the example weights would otherwise be saved into the .pt2
    return ep


def export_step_programs(program: Program, directory: Path, weights: dict[str, Tensor],
                         drafts: list[DraftLowering] | None = None) -> dict[str, Any]:
    """Write ``prefill.pt2``, ``decode.pt2`` and each draft's ``draft_<name>.pt2`` (weights lifted); returns the
    manifest fields (cache layout, drafts)."""
    from ..passes.kv_cache import decode_example, decode_graph, layout_dict, prefill_graph
    from ..passes.kv_scores import policy_record

    pre, entries = prefill_graph(program, ring=True)
    dec, _ = decode_graph(program, ring=True)
    ids, pos, mask = program.example_inputs(batch=2, seq=8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=65536)
    ep = export_program(pre, weights, (ids, pos, mask), ({0: batch, 1: seq},) * 3)
    torch.export.save(ep, str(directory / "prefill.pt2"))
    with torch.no_grad():
        cache = [c.contiguous() for c in pre(ids, pos, mask)[1:1 + len(entries)]]
    example, dynamic, _ = decode_example(cache, entries, ids.shape[0], program.info.vocab_size)
    ep = export_program(dec, weights, example, dynamic)
    torch.export.save(ep, str(directory / "decode.pt2"))
    records: dict[str, Any] = {}
    for d in drafts or []:
        graph, mine = decode_graph(d.program, ring=True)
        example, dynamic, _ = decode_example([cache[i] for i in d.cache], mine, ids.shape[0], program.info.vocab_size)
        torch.export.save(export_program(graph, weights, example, dynamic), str(directory / d.file(".pt2")))
        records[d.name] = {**d.record, "decode": d.file(".pt2")}
    staged = _export_stages(program, directory, weights, (ids, pos, mask), batch, seq)
    return {"cache": layout_dict(entries), **policy_record(program), **({"drafts": records} if records else {}),
            **staged}


def _export_stages(program: Program, directory: Path, weights: dict[str, Tensor], example: tuple[Tensor, ...],
                   batch: Any, seq: Any) -> dict[str, Any]:
    """``prefill_stage{s}.pt2`` of a ``prefill-prune`` plan and the manifest's ``prefill_prune`` record ({} without
    a plan)."""
    if program.prefill_prune is None:
        return {}
    from ..passes.prefill_stages import prefill_stages

    stages, _ = prefill_stages(program)
    records = []
    for s, st in enumerate(stages):
        file = f"prefill_stage{s}.pt2"
        torch.export.save(export_program(st.gm, weights, example, ({0: batch, 1: seq},) * 3), str(directory / file))
        records.append({"graph": file, "entries": st.entries, "inputs": st.inputs, "outputs": st.outputs,
                        "score_layer": st.score_layer})
        with torch.no_grad():  # the next stage traces on this one's residual stream
            example = (st.gm(*example)[0].contiguous(), *example[1:])
    return {"prefill_prune": {**program.prefill_prune.to_dict(), "stages": records}}


def write_artifact(program: Program, out: Path, backend: str = "torch", force: bool = False,
                   progress: Any = None, options: dict[str, Any] | None = None) -> Path:
    """Write ``program`` as an artifact directory (atomically); returns ``out``."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    out = check_output_path(out, None, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _fill(program, tmp, backend, progress, options)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _say(progress: Any, text: str) -> None:
    if progress is not None:
        progress(text)


def _fill(program: Program, tmp: Path, backend: str, progress: Any, options: dict[str, Any] | None) -> None:
    options = dict(options or {})
    export = options.pop("export", None)
    if export not in (None, "hf"):
        raise BackendError(f"unknown export format {export!r}", "use --export hf")
    hf_dir = None
    if export == "hf":
        from .hf_export import export_hf
        _say(progress, "writing the Hugging Face checkpoint (hf/)")
        hf_dir = export_hf(program, tmp / "hf").name
    drafts = draft_lowerings(program)
    weights = graph_weights(program.gm)
    for d in drafts:
        weights.update(graph_weights(d.program.gm))
    unique, aliases = split_aliases(weights)
    _say(progress, "writing weights.safetensors")
    save_file(unique, str(tmp / "weights.safetensors"), metadata={"format": "pt"})
    _say(progress, "exporting program.pt2 (torch.export)")
    example, dynamic = program.example_inputs(batch=2, seq=16), None
    if program.token_merge is not None:  # a merged graph has one length (static shapes per merge step)
        example = program.example_inputs(batch=2, seq=program.token_merge.length)
        dynamic = tuple({0: torch.export.Dim("batch", min=1, max=1024)} for _ in example)
    ep = export_program(program.gm, weights, example, dynamic)
    torch.export.save(ep, str(tmp / "program.pt2"))
    if program.tokenizer is not None:
        program.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    backend_info: dict[str, Any] = {"name": "torch", "program": "program.pt2"}
    if backend == "torch" and program.info.task == "causal-lm":
        _say(progress, "exporting prefill.pt2 and decode.pt2 (KV cache as inputs/outputs)")
        backend_info.update(prefill="prefill.pt2", decode="decode.pt2",
                            **export_step_programs(program, tmp, weights, drafts))
    if backend != "torch":
        from . import lower
        backend_info = lower(backend, program, tmp, progress, options)
    if program.token_merge is not None:
        backend_info["token_merge"] = program.token_merge.to_dict()
    spec = program.spec()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "headsmith_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": asdict(program.source),
        "passes": list(program.history),
        "reports": _jsonable(list(program.reports)),
        "model": spec.to_dict(),
        "info": asdict(program.info),
        "inputs": list(INPUT_NAMES),
        "weights": {"file": "weights.safetensors", "aliases": aliases},
        "decode_weight_bytes": program.decode_weight_bytes(),
        "backend": backend_info,
        "hf_checkpoint": hf_dir,
    }
    manifest["files"] = {str(p.relative_to(tmp)): sha256_of(p) for p in sorted(tmp.rglob("*"))
                         if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Artifact:
    """An artifact read back from disk; call it like a Program (``artifact(input_ids)``)."""

    path: Path
    manifest: dict[str, Any]
    spec: ModelSpec
    info: ModelInfo
    source: SourceInfo
    weights: dict[str, Tensor]
    tokenizer: Any = None
    _module: Any = field(default=None, repr=False)

    @property
    def backend(self) -> str:
        return str(self.manifest["backend"]["name"])

    def module(self) -> Any:
        if self._module is None:
            from .. import ops as _ops  # noqa: F401  (the program calls torch.ops.headsmith)
            from ..passes import kv_cache as _kv  # noqa: F401  (registers headsmith.cache_point)
            ep = torch.export.load(str(self.path / "program.pt2"))
            self._module = ep.module()
            self.weights = ordered_weights(self._module, self.weights)
        return self._module

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 position_ids: Tensor | None = None) -> Tensor:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = default_positions(attention_mask, self.info.task)
        def run(ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
            return self.module()(self.weights, ids, pos, mask.to(torch.int64))
        with torch.no_grad():
            return engine_call(self.manifest["backend"].get("token_merge"), run, input_ids, attention_mask,
                               position_ids)


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ArtifactError(f"no such artifact: {path}", "give the output directory of `headsmith convert`")
    mf = path / "manifest.json"
    if not mf.exists():
        raise ArtifactError(f"{path} is not a headsmith artifact: it has no manifest.json",
                            "give the output directory of `headsmith convert`")
    try:
        manifest = json.loads(mf.read_text())
    except ValueError as e:
        raise ArtifactError(f"{mf} is not valid JSON: {e}", "re-run `headsmith convert`") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf} is not a headsmith manifest")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest['format_version']}, newer than this headsmith "
                            f"reads ({FORMAT_VERSION})", "upgrade headsmith")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    for rel, digest in manifest.get("files", {}).items():
        f = path / rel
        if not f.exists():
            raise ArtifactError(f"artifact file {rel} is missing from {path}", "re-run `headsmith convert`")
        if sha256_of(f) != digest:
            raise ArtifactError(f"checksum mismatch for {rel} in {path}: the artifact was modified or corrupted",
                                "re-run `headsmith convert`")


def read_artifact(path: Path | str, verify: bool = True) -> Artifact:
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    weights = load_file(str(path / manifest["weights"]["file"]))
    for alias, target in manifest["weights"].get("aliases", {}).items():
        weights[alias] = weights[target]
    info_d = dict(manifest["info"])
    info_d["eos_token_ids"] = tuple(info_d.get("eos_token_ids", ()))
    info = ModelInfo(**info_d)
    tokenizer = None
    if (path / "tokenizer").exists():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return Artifact(path=path, manifest=manifest, spec=ModelSpec.from_dict(manifest["model"]), info=info,
                    source=SourceInfo(**manifest["source"]), weights=weights, tokenizer=tokenizer)


def ordered_weights(module: Any, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights dict in the key order the exported program was traced with (its input check is ordered)."""
    keys = module._in_spec.child(0).child(0).context
    return {k: weights[k] for k in keys}
