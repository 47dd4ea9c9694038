"""The measurement modes: -m ppl against HF transformers' logits, its chunk invariance and CSV,
-m bench's table and JSON, -m passkey's prompts and table.

The perplexity reference is computed here from HF's own logits (float64 log-softmax), never
from ./run's output. The real-model perplexity check lives in test_smollm2.py.
"""
import json
import re

import numpy as np
import pytest
import torch
from conftest import export, run

SEQ = 1100   # tokens: more than two 512-token chunks, so chunk boundaries fall inside the text
# Bounds, relative, about 10x the differences measured (f32 logits, float64 sums on both sides):
PPL_BOUND = 3e-6     # perplexity vs HF: 2.4e-7 measured (./run prints 4 decimals: ~1e-7 of 892)
CHUNK_BOUND = 1e-6   # perplexity between chunk sizes 1 / 64 / 512: 0 measured at 6 decimals
NLL_BOUND = 1e-6     # a mean NLL (a CSV bucket of 256, --ppl-tokens 300) vs HF: 1.1e-7 measured
SE_BOUND = 1e-5      # the perplexity's ± vs HF: printed to 5 decimals (~1e-7 of ~30)
POINT_BOUND = 1e-5   # a plotted point's perplexity (16..350 tokens, 6-decimal CSV): 1.2e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with peaked logits (large init), its export, ids and HF logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048,
                      initializer_range=0.2, rms_norm_eps=1e-5)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    d = tmp_path_factory.mktemp("measure")
    model.save_pretrained(d / "hf")
    bin_path = export(d / "hf", d / "f32.bin", "f32")
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)  # token t+1 from 0..t
    return d, bin_path, ids[0].tolist(), nll.numpy(), logits


PPL_LINE = r"perplexity ([0-9.]+) ± ([0-9.]+) over (\d+) predicted tokens \(mean NLL ([0-9.]+) ± ([0-9.]+)\)"


def engine_ppl(model, ids, *extra, with_se=False):
    """(perplexity, predicted tokens, mean NLL), and with_se their standard errors (ppl's, NLL's)."""
    r = run(model, "-m", "ppl", "--ids", "-i", " ".join(map(str, ids)), *extra)
    m = re.search(PPL_LINE, r.stdout)
    assert m, f"no perplexity line in: {r.stdout!r}"
    got = float(m.group(1)), int(m.group(3)), float(m.group(4))
    return got + (float(m.group(2)), float(m.group(5))) if with_se else got


def test_ppl_matches_hf(tiny):
    d, model, ids, nll, logits = tiny
    want = float(np.exp(nll.mean()))
    # the test can fail: predicting token t from 0..t (an off-by-one) gives a clearly different value
    wrong = float(np.exp(-torch.log_softmax(logits[1:], -1).gather(1, torch.tensor(ids[1:])[:, None]).mean().item()))
    assert abs(wrong - want) / want > 1e-2
    got, n, _ = engine_ppl(model, ids)
    err = abs(got - want) / want
    print(f"\n[ppl] engine {got:.4f}, HF {want:.4f}: relative {err:.2e} (bound {PPL_BOUND})")
    assert n == len(ids) - 1
    assert err <= PPL_BOUND


def test_ppl_standard_error_matches_hf(tiny):
    """The ± of the perplexity: the standard error of the mean NLL (sample sd / sqrt(n), as
    llama.cpp's perplexity tool), carried through exp; here from HF's per-token NLLs."""
    d, model, ids, nll, _ = tiny
    se = nll.std(ddof=1) / np.sqrt(len(nll))
    want = float(np.exp(nll.mean()) * se)
    got_ppl, n, mean, got, got_nll = engine_ppl(model, ids, with_se=True)
    err = abs(got - want) / want
    print(f"\n[ppl ±] engine {got_ppl:.4f} ± {got:.5f}, HF ± {want:.5f} (NLL ± {got_nll} vs {se:.6f}): "
          f"relative {err:.2e} (bound {SE_BOUND})")
    assert abs(got_nll - se) <= 1e-6
    assert err <= SE_BOUND


def test_ppl_same_for_every_chunk_size(tiny, tmp_path):
    d, model, ids, nll, _ = tiny
    results = {}
    for chunk in (1, 64, 512):
        csv = tmp_path / f"c{chunk}.csv"
        results[chunk] = engine_ppl(model, ids, "--chunk", chunk, "--ppl-csv", csv, "--ppl-bucket", 256)
        rows = np.genfromtxt(csv, delimiter=",", names=True)
        # buckets of 256 predicted tokens, the last one partial; they cover 1..n-1 exactly once
        assert list(rows["first"]) == [1, 257, 513, 769, 1025]
        assert list(rows["last"]) == [256, 512, 768, 1024, SEQ - 1]
        assert rows["tokens"].sum() == SEQ - 1
        spans = zip(rows["first"].astype(int), rows["last"].astype(int))
        want = np.array([nll[a - 1:b].mean() for a, b in spans])
        err = float(np.max(np.abs(rows["mean_nll"] - want) / want))
        print(f"\n[ppl CSV, chunk {chunk}] bucket mean NLL vs HF: worst relative difference "
              f"{err:.2e} (bound {NLL_BOUND})")
        assert err <= NLL_BOUND, f"CSV buckets, chunk {chunk}: {rows['mean_nll']} vs {want}"
    base = results[512][0]
    for chunk, (ppl, n, _) in results.items():
        print(f"[ppl] chunk {chunk}: {ppl:.6f}, relative to chunk 512 {abs(ppl - base) / base:.2e} "
              f"(bound {CHUNK_BOUND})")
        assert n == SEQ - 1
        assert abs(ppl - base) / base <= CHUNK_BOUND


def test_ppl_first_n_tokens(tiny):
    d, model, ids, nll, _ = tiny
    got, n, mean = engine_ppl(model, ids, "--ppl-tokens", 300)
    want = nll[:299].mean()
    err = abs(mean - want) / want
    print(f"\n[ppl first 300 tokens] mean NLL {mean} vs HF {want:.8f}: relative {err:.2e} "
          f"(bound {NLL_BOUND})")
    assert n == 299
    assert err <= NLL_BOUND


def test_ppl_text_longer_than_context_is_refused(tiny):
    d, model, ids, _, _ = tiny
    r = run(model, "-m", "ppl", "--ids", "-i", " ".join(map(str, ids)), "-c", 512, check=False)
    assert r.returncode != 0
    assert "context holds 512" in r.stderr and "--ppl-tokens" in r.stderr


def test_bench_table_and_json(tiny):
    d, model, _, _, _ = tiny
    args = ["-m", "bench", "--bench-pp", "16,40", "--bench-tg", "5", "--bench-depth", "0,30", "-r", 2, "--threads", 1]
    r = run(model, *args)
    rows = [line for line in r.stdout.splitlines() if re.match(r"\| (pp|tg)\d+ \|", line)]
    assert [tuple(x.split("|")[1:5]) for x in rows] == [
        (" pp16 ", " 0 ", " 1 ", " f32 "), (" pp40 ", " 0 ", " 1 ", " f32 "), (" tg5 ", " 0 ", " 1 ", " f32 "),
        (" pp16 ", " 30 ", " 1 ", " f32 "), (" pp40 ", " 30 ", " 1 ", " f32 "), (" tg5 ", " 30 ", " 1 ", " f32 ")]
    # 2 layers x 2 kv heads x 16 head_dim x (K and V) x 4 bytes
    assert "KV cache f32 512 bytes/token" in r.stdout
    j = json.loads(run(model, *args, "--json").stdout)
    assert [(x["test"], x["depth"], x["reps"]) for x in j["results"]] == [
        ("pp16", 0, 2), ("pp40", 0, 2), ("tg5", 0, 2), ("pp16", 30, 2), ("pp40", 30, 2), ("tg5", 30, 2)]
    assert all(x["tokens_per_s"] > 0 and x["kv_bytes_per_token"] == 512 for x in j["results"])
    assert j["peak_rss_mb"] > 0


def test_bench_needs_a_context_that_fits(tiny):
    d, model, _, _, _ = tiny
    r = run(model, "-m", "bench", "--bench-pp", 64, "--bench-depth", 100, "-c", 128, check=False)
    assert r.returncode != 0 and "context" in r.stderr and "Traceback" not in r.stderr


def test_plot_points_join_buckets(tiny, tmp_path):
    """tools/plot_ppl.py's --per-octave points: each is the perplexity of the tokens it spans
    (checked against HF's NLL), the spans tile the text, and each (but the last) is at least
    the fraction of an octave asked for."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("plot_ppl", Path(__file__).parent.parent / "tools" / "plot_ppl.py")
    plot_ppl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_ppl)
    d, model, ids, nll, _ = tiny
    csv = tmp_path / "b16.csv"
    engine_ppl(model, ids, "--ppl-csv", csv, "--ppl-bucket", 16)
    x, _ = plot_ppl.read_curve(csv, 0)
    assert x == [min(16 * i, SEQ - 1) for i in range(1, 70)]   # every bucket its own point
    x, y = plot_ppl.read_curve(csv, 4)
    assert 10 < len(x) < 69
    starts = [1] + [e + 1 for e in x[:-1]]
    assert x[-1] == SEQ - 1
    want = np.array([np.exp(nll[first - 1:last].mean()) for first, last in zip(starts, x)])
    err = float(np.max(np.abs(np.array(y) - want) / want))
    print(f"\n[plot points] {len(x)} points' perplexity vs HF: worst relative difference {err:.2e} "
          f"(bound {POINT_BOUND})")
    assert err <= POINT_BOUND
    for first, last in zip(starts, x):
        if last != x[-1]:
            assert last + 1 - first >= (1 - 2 ** -0.25) * (last + 1)
