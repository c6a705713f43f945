"""Artifacts (atomic write, checksums, read back) and the CLI, including every bad-input error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headsmith
from headsmith.backends import artifact as artifact_mod
from headsmith.cli import main
from headsmith.errors import ArtifactError, BackendError, LoadError, OutputExistsError

from .conftest import tiny_dir, tiny_program


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- artifacts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3", "bert"])
def test_convert_writes_an_artifact_that_runs(arch: str, tmp_out: Path) -> None:
    program = tiny_program(arch)
    headsmith.convert(program, tmp_out, passes="dce")
    files = sorted(p.name for p in tmp_out.iterdir())
    steps = [] if arch == "bert" else ["decode.pt2", "prefill.pt2"]
    assert files == sorted(["manifest.json", "program.pt2", "tokenizer", "weights.safetensors", *steps])
    manifest = json.loads((tmp_out / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["passes"][-1] == "dce"
    assert manifest["source"]["sha256"] == program.source.sha256
    assert manifest["model"]["n_layers"] == 2
    assert {"program.pt2", "weights.safetensors", "tokenizer/tokenizer.json", *steps} <= set(manifest["files"])
    art = headsmith.load_artifact(tmp_out)
    ids, pos, mask = program.example_inputs(2, 13, pad=3)
    assert float((art(ids, mask, pos) - program(ids, mask, pos))[mask.bool()].abs().max()) <= 1e-5
    assert not list(tmp_out.parent.glob(".out.tmp-*"))


def test_checksum_mismatch_is_an_error(tmp_out: Path) -> None:
    headsmith.convert(tiny_program("llama"), tmp_out)
    with open(tmp_out / "weights.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="checksum mismatch for weights.safetensors"):
        headsmith.load_artifact(tmp_out)


def test_existing_output_is_refused_then_replaced_with_force(tmp_out: Path) -> None:
    tmp_out.mkdir()
    (tmp_out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        headsmith.convert(tiny_program("llama"), tmp_out)
    assert (tmp_out / "keep.txt").read_text() == "mine"
    headsmith.convert(tiny_program("llama"), tmp_out, force=True)
    assert not (tmp_out / "keep.txt").exists()
    assert (tmp_out / "manifest.json").exists()


def test_failed_conversion_leaves_nothing(tmp_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise BackendError("simulated failure while lowering")

    monkeypatch.setattr(artifact_mod, "export_program", broken)
    with pytest.raises(BackendError):
        headsmith.convert(tiny_program("llama"), tmp_out)
    assert not tmp_out.exists()
    assert list(tmp_out.parent.iterdir()) == []


def test_never_writes_into_the_input(capsys: pytest.CaptureFixture[str]) -> None:
    src = tiny_dir("llama")
    before = sorted(p.name for p in src.iterdir())
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(src / "out"), "--force")
    assert code == 2
    assert "overlaps the input" in err
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(src), "--force")
    assert code == 2
    assert sorted(p.name for p in src.iterdir()) == before


# ---- CLI ------------------------------------------------------------------------------------------------
def test_cli_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "inspect", str(tiny_dir("gemma3")), "--json")
    assert code == 0
    d = json.loads(out)
    assert d["n_layers"] == 2
    assert d["kv_bytes_per_token_fp16"] == 2 * 2 * 1 * 16 * 2
    assert [(x["n_heads"], x["n_kv_heads"], x["head_dim"], x["kind"]) for x in d["layers"]] == [
        (4, 1, 16, "sliding"), (4, 1, 16, "causal")]
    assert d["params"] > 0


def test_cli_inspect_table_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "inspect", str(tiny_dir("llama")))
    assert code == 0
    assert "LlamaForCausalLM" in out and "KV cache per token" in out
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0
    assert "raise-attention (exact)" in out and "dce (exact)" in out


def test_cli_convert_and_inspect_artifact(capsys: pytest.CaptureFixture[str], tmp_out: Path) -> None:
    code, out, _ = run_cli(capsys, "convert", str(tiny_dir("qwen2")), "--passes", "dce", "--backend", "torch",
                           "-o", str(tmp_out))
    assert code == 0, out
    assert (tmp_out / "manifest.json").exists()
    code, out, _ = run_cli(capsys, "inspect", str(tmp_out), "--json")
    assert code == 0
    assert json.loads(out)["passes"][-1] == "dce"


@pytest.mark.parametrize(("args", "message"), [
    (["--passes", "dce, gqa(kv_heads=1"], "malformed pass spec: expected ')'"),
    (["--passes", "dce, nope"], "unknown pass 'nope'"),
    (["--passes", "dce(level=2)"], "pass 'dce' has no option 'level'"),
    (["--backend", "cuda"], "unknown backend 'cuda'"),
])
def test_cli_bad_spec_and_options(capsys: pytest.CaptureFixture[str], tmp_out: Path, args: list[str],
                                  message: str) -> None:
    code, _, err = run_cli(capsys, "convert", str(tiny_dir("llama")), "-o", str(tmp_out), *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not tmp_out.exists()


def test_cli_caret_under_the_column(capsys: pytest.CaptureFixture[str], tmp_out: Path) -> None:
    code, _, err = run_cli(capsys, "convert", str(tiny_dir("llama")), "-o", str(tmp_out), "--passes",
                           "dce(x==1)")
    assert code == 2
    lines = err.splitlines()
    spec_line = next(i for i, line in enumerate(lines) if line.strip() == "dce(x==1)")
    assert lines[spec_line + 1].index("^") == lines[spec_line].index("=") + 1


def test_cli_wrong_option_type(capsys: pytest.CaptureFixture[str], tmp_out: Path) -> None:
    from .test_passes_framework import Toy  # noqa: F401  (registers toy-options)
    code, _, err = run_cli(capsys, "convert", str(tiny_dir("llama")), "-o", str(tmp_out), "--passes",
                           "toy-options(n=lots)")
    assert code == 2
    assert "option 'n' of pass 'toy-options' expects an integer, got 'lots'" in err


def test_cli_missing_path_and_not_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nothing"))
    assert code == 2 and "no such file or directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "empty"))
    assert code == 2 and "is not a model directory: it has no config.json" in err


def test_cli_truncated_safetensors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir("llama"), bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "inspect", str(bad))
    assert code == 2
    assert "model.safetensors is truncated" in err
    weights.write_bytes(b"\x05\x00")
    with pytest.raises(LoadError, match="is corrupt"):
        headsmith.load(bad)


def test_cli_unsupported_architecture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                                               "d_model": 64, "num_layers": 1, "vocab_size": 32}))
    (d / "model.safetensors").write_bytes(_empty_safetensors())
    code, _, err = run_cli(capsys, "inspect", str(d))
    assert code == 2
    assert "unsupported architecture 'T5ForConditionalGeneration'" in err
    (d / "config.json").write_text(json.dumps({"model_type": "not-a-real-model"}))
    code, _, err = run_cli(capsys, "inspect", str(d))
    assert code == 2
    assert "unsupported architecture 'not-a-real-model'" in err


def test_cli_output_exists(capsys: pytest.CaptureFixture[str], tmp_out: Path) -> None:
    tmp_out.mkdir()
    code, _, err = run_cli(capsys, "convert", str(tiny_dir("llama")), "-o", str(tmp_out))
    assert code == 2
    assert "already exists" in err and "--force" in err


def test_pickled_weights_need_opt_in(tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    shutil.copytree(tiny_dir("llama"), d)
    from safetensors.torch import load_file
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(LoadError, match="holds only pickled weights"):
        headsmith.load(d)
    program = headsmith.load(d, allow_pickle=True)
    ids, pos, mask = program.example_inputs(1, 7)
    assert torch.allclose(program(ids, mask, pos), tiny_program("llama")(ids, mask, pos), atol=1e-5)


def test_console_script_exit_code(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "headsmith.cli", "convert", str(tmp_path / "missing"), "-o",
                             str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: no such file or directory" in result.stderr


def _empty_safetensors() -> bytes:
    header = b'{"__metadata__":{"format":"pt"}}'
    return len(header).to_bytes(8, "little") + header
