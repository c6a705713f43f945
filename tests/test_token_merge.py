"""Token merging (``token-merge``, ToMe): one merge step keeps exactly what a numpy reference of bipartite soft
matching keeps; proportional attention (``key_bias = log size``) equals attention over the merged keys repeated
``size`` times; ``r=0`` is exact; the ONNX Runtime and torch artifacts run the eager program's merges; bad options
and models it does not fit give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import headsmith
from headsmith import merging, ops
from headsmith.backends.artifact import read_artifact, write_artifact
from headsmith.errors import HeadsmithError
from headsmith.eval.metrics import mean_pool
from headsmith.runtime.engine import engine_for

from .conftest import _ROOT, tiny_program


def reference_merge(x: np.ndarray, keys: np.ndarray, sizes: np.ndarray, r: int, protect: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ToMe's bipartite soft matching for one row, in loops: ``x[T,E]``, ``keys[H,T,C]``, ``sizes[T]`` -> merged
    tokens, sizes and the slot of every input token (kept A tokens by descending match, then the B tokens)."""
    metric = keys.mean(0)
    metric = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    a, b = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    score = {}
    for i, ta in enumerate(a):
        sims = [metric[ta] @ metric[tb] if sizes[tb] > 0 else -1e4 for tb in b]
        best = int(np.argmax(sims))
        value = sims[best] if sizes[ta] > 0 else 1e4 - i
        score[i] = (-2e4 if i < (protect + 1) // 2 else value, best)
    order = sorted(score, key=lambda i: -score[i][0])
    merged, kept = order[:r], order[r:]
    sums = {j: x[b[j]] * sizes[b[j]] for j in range(len(b))}
    size_b = {j: sizes[b[j]] for j in range(len(b))}
    for i in merged:
        j = score[i][1]
        sums[j] = sums[j] + x[a[i]] * sizes[a[i]]
        size_b[j] += sizes[a[i]]
    new_sizes = np.array([sizes[a[i]] for i in kept] + [size_b[j] for j in range(len(b))])
    rows = [x[a[i]] * sizes[a[i]] for i in kept] + [sums[j] for j in range(len(b))]
    new_x = np.stack(rows) / np.maximum(new_sizes, 1.0)[:, None]
    slot = np.zeros(len(x), dtype=np.int64)
    for k, i in enumerate(kept):
        slot[a[i]] = k
    for i in merged:
        slot[a[i]] = len(kept) + score[i][1]
    for j in range(len(b)):
        slot[b[j]] = len(kept) + j
    return new_x, new_sizes, slot


def test_one_merge_step_keeps_what_the_numpy_reference_keeps() -> None:
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(2, 20, 6, generator=g), torch.randn(2, 3, 20, 5, generator=g)
    mask = torch.ones(2, 20, dtype=torch.int64)
    mask[1, 13:] = 0
    sizes, origin = merging.initial_state(mask)
    sizes = sizes * torch.randint(1, 4, (2, 20), generator=g)  # tokens that already stand for several
    new_x, new_sizes, new_origin = merging.bipartite_merge(x, merging.key_metric(keys), sizes, origin, r=6, protect=1)
    assert new_x.shape == (2, 14, 6)
    for row in range(2):
        ref_x, ref_sizes, ref_slot = reference_merge(x[row].numpy(), keys[row].numpy(), sizes[row].numpy(), 6, 1)
        np.testing.assert_allclose(new_sizes[row].numpy(), ref_sizes)
        np.testing.assert_allclose(new_x[row].numpy(), ref_x, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(new_origin[row].numpy(), ref_slot)
    slot = int(new_origin[0, 0])  # the protected token stays a kept A token of its own size
    assert slot < 10 - 6 and float(new_sizes[0, slot]) == float(sizes[0, 0])
    assert float(new_sizes[1].sum()) == float(sizes[1].sum())  # padding merged first: no real token lost


def test_proportional_attention_is_attention_over_repeated_keys() -> None:
    """A key of size s with bias log s draws what s copies of it would."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    sizes = torch.tensor([[1.0, 3.0, 2.0]])
    out = ops.attention(q, k, v, sizes > 0, causal=False, key_bias=torch.log(sizes))
    rep = torch.tensor([0, 1, 1, 1, 2, 2])
    ref = ops.attention(q, k[:, :, rep], v[:, :, rep], torch.ones(1, 6, dtype=torch.bool), causal=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_unmerge_mean_pool_is_the_size_weighted_mean() -> None:
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(2))
    sizes, origin = merging.initial_state(torch.ones(1, 16, dtype=torch.int64))
    for _ in range(2):
        x, sizes, origin = merging.bipartite_merge(x, x, sizes, origin, r=4)
    full = merging.unmerge(x, origin, 16)
    weighted = (x * sizes[..., None]).sum(1) / sizes.sum()
    torch.testing.assert_close(mean_pool(full, torch.ones(1, 16, dtype=torch.int64)), weighted)


def inputs(length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 128, (2, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, length, dtype=torch.int64)
    mask[1, length - 9:] = 0
    return ids, mask


def test_r0_is_exact_and_merging_shortens_every_later_layer() -> None:
    program = tiny_program("bert")
    ids, mask = inputs()
    ref = program(ids, mask)
    same = program.apply("token-merge(r=0, length=32)")
    real = mask.bool()
    torch.testing.assert_close(same(ids, mask)[real], ref[real], rtol=1e-5, atol=1e-5)
    merged = program.apply("token-merge(r=6, length=32)")
    assert merged.token_merge == merging.MergeSchedule(6, (0, 1), 1, "hidden", 32)
    out = merged(ids, mask)
    assert out.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(mean_pool(out, mask), mean_pool(ref, mask))
    assert float(cos.min()) > 0.5 and not torch.allclose(out[real], ref[real])
    shapes = merged.shapes()
    lengths = [shapes[n][2] for n in merged.gm.graph.nodes if n.target is torch.ops.headsmith.attention.default]
    assert lengths == [32, 26]  # layer 1 runs on 32 - 6 tokens


@pytest.mark.parametrize(("backend", "metric"), [("onnx", "hidden"), ("onnx", "keys"), ("torch", "hidden")])
def test_artifacts_merge_as_the_program_does(backend: str, metric: str) -> None:
    merged = tiny_program("bert").apply(f"token-merge(r=6, length=32, metric={metric})")
    out = write_artifact(merged, _ROOT / f"tome-{backend}-{metric}", backend=backend, force=True)
    engine = engine_for(read_artifact(out))
    assert read_artifact(out).manifest["backend"]["token_merge"]["length"] == 32
    for length in (24, 32, 7):
        ids, mask = inputs(length)
        pos = torch.arange(length).expand(2, -1)
        got, ref = engine.forward(ids, mask, pos), merged(ids, mask)
        assert got.shape == ref.shape
        cos = torch.nn.functional.cosine_similarity(mean_pool(got, mask), mean_pool(ref, mask))
        assert float(cos.min()) > 0.9999, (length, cos)
    with pytest.raises(ValueError, match="runs at 32 at most"):
        engine.forward(*inputs(40), torch.arange(40).expand(2, -1))


@pytest.mark.parametrize(("spec", "match"), [
    ("token-merge(r=3)", "even"),
    ("token-merge(r=-2)", "even"),
    ("token-merge(r=4, length=31)", "even number of tokens"),
    ("token-merge(r=2, protect=-1)", "protect"),
    ("token-merge(r=2, metric=values)", "hidden or keys"),
])
def test_bad_options_are_refused(spec: str, match: str) -> None:
    with pytest.raises(HeadsmithError, match=match):
        headsmith.passes.parse_passes(spec)


def test_models_and_backends_it_does_not_fit_are_refused() -> None:
    with pytest.raises(HeadsmithError, match="causal LM"):
        tiny_program("llama").apply("token-merge(r=4)")
    with pytest.raises(HeadsmithError, match="no layer 5"):
        tiny_program("bert").apply("token-merge(r=4, layers=[5])")
    with pytest.raises(HeadsmithError, match="at least 14 tokens"):
        tiny_program("bert").apply("token-merge(r=4, length=12)")
    merged = tiny_program("bert").apply("token-merge(r=4, length=32)")
    with pytest.raises(HeadsmithError, match="once"):
        merged.apply("token-merge(r=4)")
    with pytest.raises(HeadsmithError, match="not built for the tvm backend"):
        write_artifact(merged, _ROOT / "tome-tvm", backend="tvm", force=True)


def test_hf_export_and_cli_eval_bench_of_a_merged_encoder(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from headsmith.cli import main

    merged = tiny_program("bert").apply("token-merge(r=6, length=32)")
    with pytest.raises(HeadsmithError, match="merges tokens"):
        write_artifact(merged, _ROOT / "tome-hf", backend="torch", force=True, options={"export": "hf"})
    out = write_artifact(merged, _ROOT / "tome-cli", backend="onnx", force=True)
    assert main(["eval", str(out), "--json", "--max-tokens", "256"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.5 < result["embedding_cosine"] <= 1.0 and -1.0 <= result["similarity_spearman"] <= 1.0
    assert main(["bench", str(out), "--json", "--contexts", "16,32"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert [r["context"] for r in bench["contexts"]] == [16, 32] and bench["contexts"][0]["sentences_s"] > 0
    assert main(["bench", str(out), "--contexts", "64"]) != 0
