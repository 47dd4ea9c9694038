"""More of the measurement modes: --ppl-tokens tokenizes only what it needs, the KL divergence
against a saved base run (--kl-base-save / --kl-base), and -m bench's warm-up, configuration,
CSV and sweeps over --threads and --kv-type.

KL references are computed here in numpy from the logits of `-m logits` runs (float64), never
from the engine's own KL output."""
import json
import re
import time

import numpy as np
import pytest
from conftest import export, run, tiny_llama

PPL_VALUE = r"perplexity ([0-9.]+) .*over (\d+) predicted tokens \(mean NLL ([0-9.]+)"
PPL_LINE = r"perplexity ([0-9.]+) ± ([0-9.]+) over (\d+) predicted tokens \(mean NLL ([0-9.]+) ± ([0-9.]+)\)"


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("measure_more")
    return d, export(smollm2_gguf, d / "q8.bin", "q8_0")


def peak_rss(stdout):
    return float(re.search(r"peak RSS (\d+) MB", stdout).group(1))


def test_ppl_tokens_tokenizes_only_a_prefix(smol, tmp_path):
    """--ppl-tokens 100 on a 9 MB file: the same perplexity as on the first 100 ids of a full
    tokenization, without the memory of tokenizing all 9 MB (which cost +114 MB of peak RSS)."""
    d, model = smol
    rng = np.random.default_rng(1)
    words = open(__file__).read().split()
    text = " ".join(rng.choice(words, 1_500_000))
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text(text)
    small.write_text(text[:3000])
    ids = run(model, "-m", "tokenize", "-f", small).stdout.split()[:100]
    want = re.search(PPL_VALUE, run(model, "-m", "ppl", "--ids", "-i", " ".join(ids), "--threads", 1).stdout)
    base = run(model, "-m", "ppl", "-f", small, "--ppl-tokens", 100, "--threads", 1)
    t0 = time.time()
    r = run(model, "-m", "ppl", "-f", big, "--ppl-tokens", 100, "--threads", 1)
    seconds = time.time() - t0
    got = re.search(PPL_VALUE, r.stdout)
    extra = peak_rss(r.stdout) - peak_rss(base.stdout)
    print(f"\n[ppl-tokens] 9 MB file, 100 tokens: {seconds:.1f} s, peak RSS {extra:+.0f} MB over a 3 KB "
          f"file; perplexity {got.group(1)} (first 100 ids of the full tokenization: {want.group(1)})")
    assert got.groups() == want.groups()
    assert extra < 45   # the text itself (9 MB, read into a doubling buffer); tokenizing it all: +114


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with peaked logits (large init), exported at f32; 300 ids; HF's logits."""
    import torch
    from transformers import AutoModelForCausalLM
    d = tmp_path_factory.mktemp("kl")
    tiny_llama(d / "hf", max_position_embeddings=1024, initializer_range=0.2, rms_norm_eps=1e-5)
    model = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf = model(ids).logits[0].double().numpy()
    return d, export(d / "hf", d / "f32.bin", "f32"), ids[0].tolist(), hf


def kl_reference(base, other, top=32):
    """Per-position KL(base || other) over the base's `top` most probable tokens and the rest as one
    outcome, and whether the most probable tokens agree; float64 from (n, vocab) logits."""
    base, other = base.astype(np.float64), other.astype(np.float64)
    lp = base - np.log(np.exp(base - base.max(1, keepdims=True)).sum(1, keepdims=True)) - base.max(1, keepdims=True)
    lq = other - np.log(np.exp(other - other.max(1, keepdims=True)).sum(1, keepdims=True)) - other.max(1, keepdims=True)
    ids = np.argsort(-base, axis=1, kind="stable")[:, :top]
    tp, tq = np.take_along_axis(lp, ids, 1), np.take_along_axis(lq, ids, 1)
    rest_p, rest_q = 1 - np.exp(tp).sum(1), 1 - np.exp(tq).sum(1)
    kl = (np.exp(tp) * (tp - tq)).sum(1) + rest_p * (np.log(rest_p) - np.log(rest_q))
    return kl, base.argmax(1) == other.argmax(1)


KL_LINE = (r"KL divergence from .*: mean ([-0-9.e]+) ± ([-0-9.e]+) \(max ([-0-9.e]+)\), "
           r"top-1 agreement ([0-9.]+) ± ([0-9.]+) % over (\d+) predicted tokens")


def test_kl_base_matches_numpy_from_logits(tiny, tmp_path):
    """q8 KV against an f32-KV base: the engine's mean KL (and ±, max, top-1 agreement) equal those
    computed in numpy from both runs' -m logits; the f32 run's logits are HF's (to 1e-4 of the KL)."""
    d, model, ids, hf = tiny
    text, base = " ".join(map(str, ids)), tmp_path / "f32.kld"
    run(model, "-m", "ppl", "--ids", "-i", text, "--chunk", 64, "--kl-base-save", base)
    assert base.stat().st_size == 40 + 299 * 392
    r = run(model, "-m", "ppl", "--ids", "-i", text, "--chunk", 64, "--kv-type", "q8", "--kl-base", base)
    got = re.search(KL_LINE, r.stdout)
    assert got, r.stdout
    logits = {}
    for kv in ("f32", "q8"):
        out = tmp_path / f"{kv}.f32"
        run(model, "-m", "logits", "-i", text, "--logits-out", out, "--chunk", 64, "--kv-type", kv)
        logits[kv] = np.fromfile(out, dtype="<f4").reshape(len(ids), -1)[:-1]
    kl, same = kl_reference(logits["f32"], logits["q8"])
    kl_hf, _ = kl_reference(hf[:-1], logits["q8"])
    want = [kl.mean(), kl.std(ddof=1) / np.sqrt(len(kl)), kl.max(), 100 * same.mean()]
    mean, se, kl_max, agree = (float(got.group(i)) for i in (1, 2, 3, 4))
    err = abs(mean - want[0]) / want[0]
    print(f"\n[KL q8 vs f32 KV] engine mean {mean} ± {se} (max {kl_max}), top-1 {agree}%; numpy {want[0]:.6g} "
          f"± {want[1]:.2g} (max {want[2]:.6g}), top-1 {want[3]:.2f}%: relative {err:.1e}; HF as base "
          f"{kl_hf.mean():.6g} ({abs(kl_hf.mean() - mean) / mean:.1e})")
    assert int(got.group(6)) == len(ids) - 1
    assert err <= 1e-4 and abs(kl_hf.mean() - mean) / mean <= 1e-4
    assert abs(se - want[1]) / want[1] <= 0.05 and abs(kl_max - want[2]) / want[2] <= 1e-4   # se: 2 digits
    assert abs(agree - want[3]) <= 0.005
    assert 0 < want[0] and want[3] < 100   # q8 does move the distribution: the test can fail


def test_kl_base_refuses_another_text_or_model(tiny, tmp_path):
    d, model, ids, _ = tiny
    base = tmp_path / "base.kld"
    run(model, "-m", "ppl", "--ids", "-i", " ".join(map(str, ids)), "--kl-base-save", base)

    def refused(ids, base=base):
        r = run(model, "-m", "ppl", "--ids", "-i", " ".join(map(str, ids)), "--kl-base", base, check=False)
        assert r.returncode == 1 and r.stdout == "", r.stdout
        return r.stderr

    assert "another text" in refused(ids[:-1] + [(ids[-1] + 1) % 256])
    assert "holds a text of 300 tokens; this one has 299" in refused(ids[:-1])
    blob = bytearray(base.read_bytes())
    blob[16:20] = (320).to_bytes(4, "little")   # KLHeader.vocab
    (tmp_path / "vocab.kld").write_bytes(blob)
    assert "vocabulary of 320 tokens; this model has 256" in refused(ids, tmp_path / "vocab.kld")
    (tmp_path / "cut.kld").write_bytes(base.read_bytes()[:-5])
    assert "is 117243 bytes" in refused(ids, tmp_path / "cut.kld")
    r = run(model, "-m", "ppl", "--ids", "-i", "1 2 3", "--kl-base-save", base, "--ppl-csv", tmp_path / "x.csv",
            check=False)
    assert r.returncode == 2 and "one output file" in r.stderr


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def test_bench_json_carries_the_configuration(tiny):
    d, model, _, _ = tiny
    r = run(model, "-m", "bench", "--bench-pp", 8, "--bench-tg", 2, "-r", 1, "--threads", 1, "--json", "--chunk", 4,
            "--window", 16, "--sinks", 2, "--kv-type", "f16", "--rope-scaling", "linear", "--rope-factor", 2)
    j = json.loads(r.stdout)
    want = {"model": model, "weights": "f32", "cpu": cpu_name(), "chunk": 4, "window": 16, "sinks": 2,
            "lminf": False, "rope_scaling": "linear", "rope_factor": 2, "rope_theta": 10000, "reference": False,
            "warmup": 1}
    assert {k: j["config"][k] for k in want} == want
    assert [(x["test"], x["threads"], x["kv_type"], x["kv_bytes_per_token"]) for x in j["results"]] == [
        ("pp8", 1, "f16", 256), ("tg2", 1, "f16", 256)]   # 2 layers x 2 heads x 16 x (K, V) x 2 bytes


def test_bench_sweeps_threads_and_kv_types_as_csv(tiny):
    """--threads 1,2 --kv-type f32,q8: a row per combination, each with the whole configuration; a
    list is refused outside bench. Bytes per token from the shape: f32 4 bytes an element; q8 one,
    plus a float scale per head vector of 16."""
    import csv
    import io
    d, model, _, _ = tiny
    r = run(model, "-m", "bench", "--bench-pp", 8, "--bench-tg", 2, "-r", 1, "--threads", "1,2",
            "--kv-type", "f32,q8", "--csv", "--bench-depth", "0,4")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    got = [(x["kv_type"], x["depth"], x["threads"], x["test"], x["kv_bytes_per_token"]) for x in rows]
    want = [(kv, depth, threads, test, str(2 * 2 * 2 * (64 if kv == "f32" else 20)))
            for kv in ("f32", "q8") for depth in ("0", "4") for threads in ("1", "2") for test in ("pp8", "tg2")]
    assert got == want
    assert all(x["model"] == model and x["weights"] == "f32" and x["cpu"] == cpu_name() and x["reps"] == "1"
               and float(x["tokens_per_s"]) > 0 for x in rows)
    for args in (["-i", "1 2", "--ids", "--threads", "1,2"], ["-i", "1 2", "--ids", "--kv-type", "f32,q8"],
                 ["-i", "1 2", "--ids", "--csv"], ["-m", "bench", "--csv", "--json"]):
        bad = run(model, *args, check=False)
        assert bad.returncode == 2 and bad.stderr.startswith("error: "), args
