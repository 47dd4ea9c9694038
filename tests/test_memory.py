"""The context memory (--memory: InfLLM's blocks, Xiao et al. 2024, retrieved by Quest's bound,
Tang et al. 2024).

1. Exactness on tiny random models (Llama, Llama with YaRN x4 and Qwen2, GQA 4/2, 80 tokens,
   chunks of 8 and of 1),
   for every KV cache type. With --reference (the plain loops):
   (a) --window 16 --sinks 0 --memory --memory-distance 1000 (every block at its true
       distance) with every block retrievable is full attention (and full attention is HF's,
       f32, within 1e-5): to rounding, for the memory's keys are stored rotated to their offset
       in their block and turned the rest of the way when read (f32: within 1e-4 of the largest
       logit; f16 and q8 add what storing the cache in that type costs at all, as below);
   (b) --memory --memory-blocks 0 is --sinks 4 --window 16 bit for bit.
   With the fast kernels the same pairs agree to rounding: the memory's attention is the plain
   loop, the other side's the tiled kernels. f32: within 1e-4 of the largest logit (measured:
   at most 1.1e-6). f16 and q8: rounding differences in one layer's output can move a later
   layer's stored key one rounding step (test_reference.py explains it), so their bound adds
   what storing the cache in that type costs at all (measured: at most 2.5e-5 for (a) and (b),
   1.6e-4 for one block against --reference at q8; bounds 3.3e-4 .. 1.1e-2). And one block
   (--memory-blocks 1) is neither sinks + window nor full attention (0.5 .. 1.1 of the largest
   logit apart): the memory is used; and it differs from one block at its true distance: the
   blocks farther than --memory-distance 32 are moved.
2. memory_write(), memory_bounds() and memory_select() on random keys and queries
   (tests/memory_driver.c) against numpy: the stored keys (f16: numpy's rounding; q8: int8 of
   max|x| / 127 per head), each block's channel-wise bounds, the scores
   sum_h sum_i max(qbar_h,i M_i, qbar_h,i m_i) of the chunk's mean queries, and the K best
   eligible blocks (ties to the lower block). Quest's bound: no single query's q . k over a
   block's keys exceeds the block's score for that query. The int8 steps and scales equal
   numpy's rounding exactly and lie outside the keys' bounds by two steps at most. The driver
   writes its text twice, going back mid-block over rows of +-1000 (mutant seen failing: the
   open block's f32 bounds continued where they do not belong).
3. Bad settings: one error line, exit 2.
4. --memory-score infllm (InfLLM's representative tokens, Xiao et al. 2024): through the driver's
   infllm mode, numpy's own chunk loop (joint softmax over sinks, chosen blocks, remainder and
   window) gives (a) the token scores s_h(t), brute-force sums of the probabilities t receives
   from the queries whose window holds it, (b) the representatives (mean of the top-R keys),
   (c) each chunk's block scores sum_h <qbar_h, r_b,h> and chosen blocks; the represent mode
   checks exact ties (lower position) and two heads of one kv head picking different tokens;
   through ./run, every block retrieved is full attention bit for bit. The driver runs its text
   twice (as passkey's trials do) and the second pass is checked: no block of the first may
   count as complete. Mutants seen failing: ties to the higher position, the query's own
   position left out of its scores, the remainder left out, one head of the group scored,
   blocks completed a position early, the first pass's blocks kept.
"""
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, RUN_ASAN, engine_logits, export, need, run, tiny_llama
from test_engine import TINY, build_hf, rel_err

SEQ = 80
KV_TYPES = ["f32", "f16", "q8"]
HF_BOUND = 1e-5    # --reference full attention against HF, f32 (as test_engine.py)
FAST_BOUND = 1e-4  # the fast kernels' rounding, relative to the largest logit
SINKS_WINDOW = ["--window", 16, "--sinks", 4]
# (a): every block retrievable, at its true distance (D above the text's 80), no sinks: full
# attention
MEMORY_ALL = ["--window", 16, "--sinks", 0, "--memory", "--memory-distance", 1000, "--memory-block",
              8, "--memory-blocks", 100]
# (b): nothing retrieved: sinks + window
MEMORY_NONE = [*SINKS_WINDOW, "--memory", "--memory-blocks", 0, "--memory-block", 8]
# one block of 8 retrieved per chunk and kv head, moved up to 32 positions away if farther
MEMORY_ONE = [*SINKS_WINDOW, "--memory", "--memory-blocks", 1, "--memory-block", 8,
              "--memory-distance", 32]


def families():
    from transformers import LlamaConfig, Qwen2Config
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    return {"llama_gqa": LlamaConfig(**TINY, rope_theta=5e5), "qwen2_bias": Qwen2Config(**TINY, rope_theta=1e6),
            # YaRN's attention factor (1.14 here) scales keys and queries once each, in the memory too
            "llama_yarn": LlamaConfig(**TINY, rope_theta=5e5, rope_scaling=yarn)}


@pytest.fixture(scope="module", params=list(families()))
def family(request, tmp_path_factory):
    """(name, f32 model file, ids, HF's logits, directory)."""
    name = request.param
    cfg = families()[name]
    d = tmp_path_factory.mktemp(name)
    hf = build_hf(name, cfg, d / "hf")
    ids = [int(i) for i in np.random.default_rng(3).integers(0, cfg.vocab_size, SEQ)]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    return name, export(d / "hf", d / "f32.bin"), ids, ref, d


def logits(model, ids, d, *args, binary=None):
    """One thread: a kernel's sums do not depend on it, and no OpenMP thread spins on a busy
    machine."""
    out = os.path.join(str(d), "logits.f32")
    r = run(model, "-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", out, "--threads", 1,
            *args, binary=binary)
    assert "runtime error" not in r.stderr and "Sanitizer" not in r.stderr, r.stderr
    return np.fromfile(out, dtype="<f4").reshape(len(ids), -1)


@pytest.mark.parametrize("chunk", [8, 1])
@pytest.mark.parametrize("kv", KV_TYPES)
def test_memory_exact(family, kv, chunk):
    name, model, ids, hf, d = family
    base = ["--kv-type", kv, "--chunk", chunk]
    ref = {rule: logits(model, ids, d, "--reference", *base, *args) for rule, args in
           [("full", []), ("all", MEMORY_ALL), ("sinks", SINKS_WINDOW), ("none", MEMORY_NONE),
            ("one", MEMORY_ONE)]}
    fast = {rule: logits(model, ids, d, *base, *args) for rule, args in
            [("full", []), ("all", MEMORY_ALL), ("sinks", SINKS_WINDOW), ("none", MEMORY_NONE),
             ("one", MEMORY_ONE)]}
    bound = FAST_BOUND
    if kv != "f32":   # what storing the cache in this type costs at all (test_reference.py)
        bound += rel_err(logits(model, ids, d, "--reference", "--chunk", chunk), ref["full"])
    all_err = rel_err(ref["all"], ref["full"])
    assert all_err <= bound, f"(a) {all_err:.3g}"
    assert np.array_equal(ref["none"], ref["sinks"]), f"(b) {rel_err(ref['none'], ref['sinks']):.3g}"
    hf_err = rel_err(ref["full"], hf)
    if kv == "f32":
        assert hf_err <= HF_BOUND
    errs = {rule: rel_err(fast[rule], want) for rule, want in
            [("all", fast["full"]), ("none", fast["sinks"])]}
    # one block: rows whose choice did not flip (a near tie of two blocks' scores, which a
    # rounding step of a stored q8 key can tip: seen once, rows 77-79 of 80)
    row_err = np.abs(fast["one"] - ref["one"]).max(1) / np.abs(ref["one"]).max()
    flipped = int((row_err > bound).sum())
    off = {rule: rel_err(fast["one"], fast[rule]) for rule in ("sinks", "full")}
    true_distance = logits(model, ids, d, *base, *MEMORY_ONE, "--memory-distance", 1000)
    moved = rel_err(fast["one"], true_distance)
    print(f"\n[{name} {kv} chunk {chunk}] fast: (a) {errs['all']:.3g} (b) {errs['none']:.3g} "
          f"one block vs --reference {np.median(row_err):.3g} median, {flipped} of {SEQ} rows "
          f"above the bound {bound:.3g}; one block differs from "
          f"sinks + window by {off['sinks']:.3g}, from full attention by {off['full']:.3g}; "
          f"--reference (a) {all_err:.3g}, full attention vs HF {hf_err:.3g}; moving far blocks "
          f"to distance 32 changes the logits by {moved:.3g}")
    assert max(errs.values()) <= bound
    assert flipped <= SEQ // 10, "one block: the fast kernels must equal --reference"
    assert min(off.values()) > 0.05, "one retrieved block must change the logits"
    assert moved > 1e-3, "--memory-distance must place the far blocks"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return export(tiny_llama(d / "hf"), d / "f32.bin"), d


def test_memory_asan(tiny_model):
    """One case under ASan/UBSan (conftest's tiny Llama, GQA 4/2): (a) with a q8 cache within
    what the q8 cache costs at all (Quest's and InfLLM's scores), and one block (f32 cache: the
    two builds round differently, which a q8 cache can turn into a step) within the fast bound
    of ./run."""
    model, d = tiny_model
    asan = need(RUN_ASAN, "build it with make run-asan")
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 256, SEQ)]
    base = ["--kv-type", "q8", "--chunk", 8]
    full = logits(model, ids, d, "--reference", *base, binary=asan)
    bound = FAST_BOUND + rel_err(logits(model, ids, d, "--reference", "--chunk", 8, binary=asan), full)
    assert rel_err(logits(model, ids, d, "--reference", *base, *MEMORY_ALL, binary=asan), full) <= bound
    infllm = ["--memory-score", "infllm", "--memory-repr", 2]   # its token scores and representatives
    every = logits(model, ids, d, "--reference", *base, *MEMORY_ALL, *infllm, binary=asan)
    assert rel_err(every, full) <= bound
    assert rel_err(logits(model, ids, d, "--chunk", 8, *MEMORY_ONE, *infllm, binary=asan),
                   logits(model, ids, d, "--chunk", 8, *MEMORY_ONE, *infllm)) <= FAST_BOUND
    one = logits(model, ids, d, "--chunk", 8, *MEMORY_ONE, binary=asan)
    assert rel_err(one, logits(model, ids, d, "--chunk", 8, *MEMORY_ONE)) <= FAST_BOUND
    assert rel_err(one, logits(model, ids, d, "--chunk", 8, *SINKS_WINDOW)) > 0.05


# ---------------------------------------------------------------------------------------------
# memory_select() and the bounds, through tests/memory_driver.c

def openmp():
    """-fopenmp if the compiler has it (the Makefile's rule): memory_select() splits its blocks
    across the threads (OMP_NUM_THREADS, set by driver_lines()) from 64 of them on."""
    r = subprocess.run([os.environ.get("CC", "cc"), "-fopenmp", "-x", "c", "-", "-o", os.devnull],
                       input="int main(void){return 0;}", capture_output=True, text=True)
    return ["-fopenmp"] if r.returncode == 0 else []


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("memory") / "memory_driver")
    r = subprocess.run([os.environ.get("CC", "cc"), "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g",
                        "-fsanitize=address,undefined", "-fno-sanitize-recover=all", *openmp(), "-o", exe,
                        os.path.join(ROOT, "tests", "memory_driver.c"), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, f"compiling memory_driver.c failed:\n{r.stderr}"
    return exe


def stored(keys, kv, H):
    """Keys (N, n_kv * H) as the cache stores them, back in f32 (kv_store's rules)."""
    if kv == "f32":
        return keys
    if kv == "f16":
        return keys.astype(np.float16).astype(np.float32)
    heads = keys.reshape(len(keys), -1, H)
    scale = np.abs(heads).max(-1, keepdims=True) / np.float32(127)
    q = np.rint(heads * np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0))
    return (scale * q).astype(np.float32).reshape(keys.shape)


def driver_lines(exe, args, *arrays, threads=3):
    """memory_driver.c run with args, the arrays' floats on stdin, on `threads` threads: its
    output lines."""
    stdin = " ".join(f"{v:.9g}" for v in np.concatenate([a.ravel() for a in arrays]))
    r = subprocess.run([exe, *map(str, args)], input=stdin, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    assert r.returncode == 0 and not r.stderr, r.stderr
    return r.stdout.splitlines()


def call_driver(exe, kv, n_kv, group, H, B, K, n_sink, W, N, T, step, keys, q, threads=3):
    args = [kv, n_kv, group, H, B, K, n_sink, W, N, T, step]
    out = {"stored": {}, "bounds": {}, "score": {}, "single": {}, "chosen": {}}
    for line in driver_lines(exe, args, keys, q, threads=threads):
        tag, *f = line.split()
        if tag == "stored":
            out[tag][int(f[0])] = np.array(f[1:], dtype=np.float32)
        elif tag == "bounds":   # (scale, codes (2, H))
            codes = np.array(f[3:], dtype=np.int64).reshape(2, H)
            out[tag][int(f[0]), int(f[1])] = (np.float32(f[2]), codes)
        elif tag == "score":
            out[tag][int(f[0]), int(f[1])] = float(f[2])
        elif tag == "single":
            out[tag][int(f[0]), int(f[1]), int(f[2])] = float(f[3])
        else:
            out[tag][int(f[0])] = [int(b) for b in f[1:]]
    return out


def round_out(hi, lo):
    """Bounds hi >= lo (float32, H each) in int8 steps of a scale, rounded outward, as
    round_bounds_out() is specified: scale = max |bound| / 127 in float32, raised an ulp at a time
    while that bound / scale > 127 or 127 scale < it; max codes ceil(hi / scale), min codes
    floor(lo / scale), each moved one more step where the float32 product misses its bound.
    Returns (scale, codes (2, H))."""
    amax = np.float32(max(np.abs(hi).max(), np.abs(lo).max()))
    if amax == 0:
        return np.float32(0), np.zeros((2, len(hi)), np.int64)
    scale = np.float32(amax / np.float32(127))
    while amax / scale > 127 or np.float32(scale * np.float32(127)) < amax:
        scale = np.nextafter(scale, np.float32(np.inf))
    up, down = np.ceil(hi / scale), np.floor(lo / scale)
    up += (up * scale < hi)
    down -= (down * scale > lo)
    return scale, np.stack([up, down]).astype(np.int64)


def expected(keys, q, n_kv, group, H, B, K, n_sink, W, N, T):
    """numpy's bounds {(b, g): (scale, codes)}, scores {(g, b)} and chosen blocks {g}."""
    n_blocks = -(-N // B)
    k = keys.reshape(N, n_kv, H).astype(np.float32)
    bounds = {(b, g): round_out(k[b * B:(b + 1) * B, g].max(0), k[b * B:(b + 1) * B, g].min(0))
              for b in range(n_blocks) for g in range(n_kv)}
    lo_last = max(N - 1 - W + 1, 0)   # the last query's first window position
    eligible = range(n_sink // B, (lo_last - 1) // B + 1) if lo_last > n_sink else range(0)
    qbar = q.astype(np.float64).reshape(T, n_kv, group, H).mean(0)
    scores, chosen = {}, {}
    for g in range(n_kv):
        for b in eligible:   # Quest's bound summed over the group's heads, on the rounded bounds
            scale, codes = bounds[b, g]
            hi, lo = np.float64(scale) * codes
            scores[g, b] = float(np.maximum(qbar[g] * hi, qbar[g] * lo).sum())
        ranked = sorted(eligible, key=lambda b: (-scores[g, b], b))
        chosen[g] = sorted(ranked[:K])
    return bounds, scores, chosen


CASES = {   # n_kv, group, H, B, K, n_sink, W, N, T, step
    "gqa2": (2, 2, 8, 4, 3, 4, 6, 40, 4, 4),
    "gqa3_sinks_not_multiple": (1, 3, 6, 4, 2, 5, 5, 37, 3, 3),
    "k_above_eligible": (2, 2, 8, 8, 50, 2, 10, 45, 5, 7),
    "k0": (2, 2, 8, 4, 0, 4, 6, 40, 4, 4),
    "nothing_eligible": (1, 2, 4, 4, 2, 8, 6, 12, 2, 5),
    "token_by_token": (3, 1, 8, 5, 2, 3, 7, 33, 1, 1),
}


@pytest.mark.parametrize("kv", KV_TYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_select_matches_numpy(driver, case, kv):
    n_kv, group, H, B, K, n_sink, W, N, T, step = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    keys = rng.normal(0, 1, (N, n_kv * H)).astype(np.float32)
    q = rng.normal(0, 1, (T, n_kv * group * H)).astype(np.float32)
    got = call_driver(driver, kv, n_kv, group, H, B, K, n_sink, W, N, T, step, keys, q)
    kept = stored(keys, kv, H)
    got_keys = np.stack([got["stored"][p] for p in range(N)])
    assert np.abs(got_keys - kept).max() <= 1e-6 * np.abs(keys).max()
    bounds, scores, chosen = expected(kept, q, n_kv, group, H, B, K, n_sink, W, N, T)
    assert set(got["bounds"]) == set(bounds)
    k = kept.reshape(N, n_kv, H).astype(np.float64)
    for (b, g), (scale, codes) in bounds.items():
        got_scale, got_codes = got["bounds"][b, g]
        assert got_scale == scale and (got_codes == codes).all(), (b, g, got_scale, scale)
        hi, lo = k[b * B:(b + 1) * B, g].max(0), k[b * B:(b + 1) * B, g].min(0)
        up, down = codes.astype(np.float32) * scale   # outward (in float32), by two steps at most
        assert (np.abs(codes) <= 127).all()
        assert (up >= hi).all() and (up - hi <= 2 * scale).all()
        assert (down <= lo).all() and (lo - down <= 2 * scale).all()
    assert set(got["score"]) == set(scores)
    for gb, s in scores.items():
        assert abs(got["score"][gb] - s) <= 1e-5 * max(1, abs(s)), (gb, got["score"][gb], s)
    assert got["chosen"] == chosen
    n_eligible = len({b for _, b in scores})
    print(f"\n[{case} {kv}] {n_eligible} eligible blocks, K {K}: chosen {chosen}")
    if kv == "f32":   # Quest's bound: no key of a block scores above it, for every single query
        heads = q.reshape(T, n_kv * group, H).astype(np.float64)
        k = keys.reshape(N, n_kv, H).astype(np.float64)
        for (t, h, b), s in got["single"].items():
            dots = k[b * B:(b + 1) * B, h // group] @ heads[t, h]
            assert s >= dots.max() - 1e-5 * np.abs(heads[t, h]).sum() * np.abs(k).max(), (t, h, b)


@pytest.mark.parametrize("kv", KV_TYPES)
def test_planted_block_is_chosen(driver, kv):
    """Block 3's keys are parallel to kv head 1's mean query (group 2: its two heads' means
    concatenated along the same direction), the rest are small noise: K = 1 retrieves block 3 for
    that head. A copy of block 3 at block 6 ties it exactly: the lower block stays."""
    n_kv, group, H, B, K, n_sink, W, N, T = 2, 2, 8, 4, 1, 2, 8, 48, 4
    rng = np.random.default_rng(11)
    keys = rng.normal(0, 0.1, (N, n_kv, H)).astype(np.float32)
    q = rng.normal(0, 1, (T, n_kv, group, H)).astype(np.float32)
    direction = q[:, 1].mean(0).sum(0)   # along both heads' mean queries at once
    keys[3 * B:4 * B, 1] = direction * rng.uniform(1, 2, (B, 1)).astype(np.float32)
    keys[6 * B:7 * B] = keys[3 * B:4 * B]
    keys, q = keys.reshape(N, -1), q.reshape(T, -1)
    got = call_driver(driver, kv, n_kv, group, H, B, K, n_sink, W, N, T, 4, keys, q)
    _, scores, chosen = expected(stored(keys, kv, H), q, n_kv, group, H, B, K, n_sink, W, N, T)
    assert got["score"][1, 3] == got["score"][1, 6] and got["chosen"][1] == [3] == chosen[1]
    assert got["chosen"] == chosen


@pytest.mark.parametrize("threads", [3, 100])
@pytest.mark.parametrize("kv", KV_TYPES)
def test_select_across_threads(driver, kv, threads):
    """98 eligible blocks: each thread takes a run and keeps its own K best, merged after (100
    threads: runs of one block, some empty, each shorter than K). Six copies of one block, in
    all three runs of 3 threads, tie for the top: K = 5 must keep the five lowest of them, as
    one pass over the blocks would. (Built without OpenMP, one pass is all there is.)"""
    n_kv, group, H, B, K, n_sink, W, N, T = 2, 2, 8, 2, 5, 2, 6, 203, 1
    rng = np.random.default_rng(12)
    keys = rng.normal(0, 0.1, (N, n_kv, H)).astype(np.float32)
    q = rng.normal(0, 1, (T, n_kv, group, H)).astype(np.float32)
    copies = [10, 30, 50, 70, 85, 95]
    keys[10 * B:11 * B] = q.mean(0).sum(1) * rng.uniform(1, 2, (B, 1, 1)).astype(np.float32)
    for b in copies[1:]:
        keys[b * B:(b + 1) * B] = keys[10 * B:11 * B]
    keys, q = keys.reshape(N, -1), q.reshape(T, -1)
    got = call_driver(driver, kv, n_kv, group, H, B, K, n_sink, W, N, T, 8, keys, q, threads)
    _, scores, chosen = expected(stored(keys, kv, H), q, n_kv, group, H, B, K, n_sink, W, N, T)
    assert len({b for _, b in scores}) == 98
    assert got["chosen"] == chosen == {0: copies[:5], 1: copies[:5]}


@pytest.mark.parametrize("threads", [1, 3])
def test_select_nan_ranks_last(driver, threads):
    """An infinite key in block 98 (the last eligible) gives its bounds an infinite scale and
    its score NaN: the block ranks last, and the K chosen are numpy's best of the others,
    whatever the threads (without that rule the NaN took the list's last place)."""
    n_kv, group, H, B, K, n_sink, W, N, T = 2, 2, 8, 2, 5, 2, 6, 203, 1
    rng = np.random.default_rng(13)
    keys = rng.normal(0, 1, (N, n_kv * H)).astype(np.float32)
    q = rng.normal(0, 1, (T, n_kv * group * H)).astype(np.float32)
    damaged = keys.copy()
    damaged[98 * B, 3] = np.inf   # kv head 0
    got = call_driver(driver, "f32", n_kv, group, H, B, K, n_sink, W, N, T, 8, damaged, q,
                      threads)
    _, scores, _ = expected(keys, q, n_kv, group, H, B, K, n_sink, W, N, T)
    ranked = sorted((b for g, b in scores if g == 0 and b != 98),
                    key=lambda b: (-scores[0, b], b))
    assert np.isnan(got["score"][0, 98])
    assert got["chosen"][0] == sorted(ranked[:K])


# ---------------------------------------------------------------------------------------------
# Bad settings

BAD = {
    "no window": (["--memory"], "--memory needs --window"),
    "lminf": (["--memory", "--window", 16, "--lminf"], "--lminf"),
    "block 0": (["--memory", "--window", 16, "--memory-block", 0], "--memory-block 0"),
    "block huge": (["--memory", "--window", 16, "--memory-block", 1000000], "--memory-block 1000000"),
    "blocks huge": (["--memory", "--window", 16, "--memory-blocks", 1000000], "--memory-blocks 1000000"),
    "blocks negative": (["--memory", "--window", 16, "--memory-blocks", -1], "--memory-blocks -1"),
    "block without memory": (["--window", 16, "--memory-block", 8], "apply only with --memory"),
    "distance 0": (["--memory", "--window", 16, "--memory-distance", 0], "--memory-distance 0"),
    "distance in window": (["--memory", "--window", 16, "--memory-block", 8, "--memory-distance", 22],
                           "at least W + B - 1 = 23"),
    "distance huge": (["--memory", "--window", 16, "--memory-distance", 1 << 31], "--memory-distance"),
    "distance without memory": (["--window", 16, "--memory-distance", 64], "apply only with --memory"),
    "budget 0": (["--memory", "--window", 16, "--memory-budget", 0], "--memory-budget 0"),
    "score unknown": (["--memory", "--window", 16, "--memory-score", "bounds"],
                      "unknown --memory-score 'bounds' (quest, infllm)"),
    "score without memory": (["--window", 16, "--memory-score", "infllm"], "apply only with --memory"),
    "repr with quest": (["--memory", "--window", 16, "--memory-repr", 2],
                        "--memory-repr applies only with --memory-score infllm"),
    "repr 0": (["--memory", "--window", 16, "--memory-score", "infllm", "--memory-repr", 0], "--memory-repr 0"),
    "repr above block": (["--memory", "--window", 16, "--memory-score", "infllm", "--memory-block", 8,
                          "--memory-repr", 9], "--memory-repr R must be at most --memory-block B"),
    "infllm state": (["--memory", "--window", 16, "--memory-score", "infllm", "--save-state", "s.state"],
                     "--memory-score infllm runs without --save-state"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_settings(tiny_model, case):
    model, d = tiny_model
    args, message = BAD[case]
    r = run(model, "-m", "logits", "-i", "1 2 3", "--logits-out", d / "out.f32", *args, check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert re.match(r"error: ", r.stderr) and message in r.stderr, r.stderr
    assert not os.path.exists(d / "out.f32")


def test_memory_on_file_equals_memory_in_ram(tiny_model, tmp_path):
    """--memory-budget below the store's size moves every layer's rows to a file (mapped, grown
    in place): the logits equal the in-RAM run's bit for bit; a budget below one block of every
    layer is refused."""
    model, d = tiny_model
    ids = list(range(1, 81))
    args = ["--window", 16, "--sinks", 4, "--memory", "--memory-block", 8, "--memory-blocks", 2]
    ram = engine_logits(model, ids, tmp_path, chunk=8, extra=[*map(str, args)])
    out = tmp_path / "file.f32"
    r = run(model, "-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", out, "--chunk", 8,
            *args, "--memory-budget", "0.01", env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert "[memory: past its budget of 0.01 MB" in r.stderr, r.stderr
    on_file = np.fromfile(out, dtype="<f4").reshape(len(ids), -1)
    assert np.array_equal(ram, on_file)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("longrun-memory")]   # deleted
    r = run(model, "-m", "logits", "-i", "1 2 3", "--logits-out", out, *args, "--memory-budget",
            "0.001", check=False)
    assert r.returncode == 1 and "less than one block of every layer" in r.stderr, r.stderr
    r = run(model, "-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", out, *args,
            "--memory-budget", "0.01", check=False, env=dict(os.environ, TMPDIR=str(tmp_path / "gone")))
    assert r.returncode == 1 and r.stderr.splitlines()[-1].endswith(
        "cannot create the context memory's file: No such file or directory"), r.stderr
    print(f"\n[memory] on file == in RAM over {len(ids)} ids")


# ---------------------------------------------------------------------------------------------
# --memory-score infllm: InfLLM's representative tokens (Xiao et al. 2024), through
# tests/memory_driver.c's infllm and represent modes, against numpy

def call_infllm(exe, mode, kv, n_kv, group, H, B, K, n_sink, W, N, T, R, *arrays):
    args = [mode, kv, n_kv, group, H, B, K, n_sink, W, N, T, R]
    out = {"chosen": {}, "score": {}, "tscore": {}, "complete": {}, "repr": {}}
    for line in driver_lines(exe, args, *arrays):
        tag, *f = line.split()
        if tag == "chosen":
            out[tag][int(f[0]), int(f[1])] = [int(b) for b in f[2:]]
        elif tag == "score":
            out[tag][int(f[0]), int(f[1]), int(f[2])] = float(f[3])
        elif tag == "tscore":
            out[tag][int(f[0]), int(f[1]), int(f[2])] = float(f[3])
        elif tag == "complete":
            out[tag][int(f[0])] = int(f[1])
        else:
            out[tag][int(f[0]), int(f[1])] = np.array(f[2:], dtype=np.float64)
    return out


def represent(keys, s, B, R, n_sink, group, b):
    """Block b's representative per query head: the mean of the keys (kv head h // group) of
    the R positions past the sinks with the highest s[h], ties to the lower position."""
    positions = range(max(b * B, n_sink), (b + 1) * B)
    reps = []
    for h in range(len(s)):
        top = sorted(positions, key=lambda p: (-s[h][p], p))[:R]
        reps.append(keys[top, h // group].mean(0))
    return np.array(reps)


def infllm_reference(keys, sink_keys, q, q_sink, q_mem, n_kv, group, H, B, K, n_sink, W, N, T, R,
                     got):
    """numpy's whole chunk loop: per chunk, the scores sum_h <qbar_h, r_b,h> of the complete
    blocks and the K best (ties to the lower block), then every query's joint softmax over its
    sinks, its kv head's chosen blocks and the remainder below its window, and its window; the
    token scores s_h(t) as brute-force sums, over all queries so far whose window holds t, of the
    probability t gets; then the blocks that left every later window get their representatives.
    Checks each chunk's records in got against it; returns the number of checks."""
    n_heads = n_kv * group
    k = keys.reshape(N, n_kv, H).astype(np.float64)
    ks = sink_keys.reshape(N, n_kv, H).astype(np.float64)
    qs = [a.reshape(N, n_heads, H).astype(np.float64) for a in (q, q_sink, q_mem)]
    probs = np.zeros((N, n_heads, N))   # probs[query, head, window position]
    reprs, complete, checks = {}, 0, 0
    for c, p0 in enumerate(range(0, N, T)):
        n = min(T, N - p0)
        qbar = qs[2][p0:p0 + n].mean(0).reshape(n_kv, group * H)
        lo_last = max(p0 + n - W, 0)
        end = min((lo_last - 1) // B + 1 if lo_last > n_sink else 0, complete)
        for g in range(n_kv):
            scores = {b: float(qbar[g] @ reprs[b][g * group:(g + 1) * group].ravel())
                      for b in range(n_sink // B, end)}
            for b, sc in scores.items():
                assert abs(got["score"][c, g, b] - sc) <= 1e-5 * max(1, abs(sc)), (c, g, b)
            assert {gb[2] for gb in got["score"] if gb[:2] == (c, g)} == set(scores)
            ranked = sorted(scores, key=lambda b: (-scores[b], b))
            assert got["chosen"][c, g] == sorted(ranked[:K]), (c, g, scores)
            checks += 1 + len(scores)
        for pos in range(p0, p0 + n):
            lo = max(pos - W + 1, 0)
            for h in range(n_heads):
                g = h // group
                mem = [p for b in got["chosen"][c, g] for p in range(max(b * B, n_sink), min((b + 1) * B, lo))]
                mem += list(range(max(complete * B, n_sink), lo))
                logits = np.concatenate([ks[:min(lo, n_sink), g] @ qs[1][pos, h], k[mem, g] @ qs[2][pos, h],
                                         k[lo:pos + 1, g] @ qs[0][pos, h]]) / np.sqrt(H)
                p = np.exp(logits - logits.max())
                probs[pos, h, lo:pos + 1] = (p / p.sum())[len(logits) - (pos + 1 - lo):]
        s = probs[:p0 + n].sum(0)   # (n_heads, N): s_h(t) over every query so far
        for (cc, h, t), v in got["tscore"].items():
            if cc == c:
                assert abs(v - s[h, t]) <= 1e-5 * max(1, s[h, t]), (c, h, t, v, s[h, t])
                checks += 1
        while (complete + 1) * B <= max(p0 + n - W + 1, 0):
            if (complete + 1) * B > n_sink:
                reprs[complete] = represent(k, s, B, R, n_sink, group, complete)
            complete += 1
        assert got["complete"][c] == complete
    for (b, h), r in got["repr"].items():
        assert np.abs(r - reprs[b][h]).max() <= 1e-5 * np.abs(k).max(), (b, h)
        checks += 1
    assert {b for b, _ in got["repr"]} == set(reprs)
    return checks


INFLLM_CASES = {   # n_kv, group, H, B, K, n_sink, W, N, T, R
    "gqa2_chunks": (2, 2, 8, 4, 2, 2, 6, 48, 4, 2),
    "gqa3_token_by_token": (1, 3, 6, 4, 2, 5, 5, 37, 1, 3),
    "sinks_not_multiple_long_chunk": (2, 2, 4, 5, 3, 3, 8, 50, 7, 4),
}


@pytest.mark.parametrize("kv", ["f32", "q8"])
@pytest.mark.parametrize("case", list(INFLLM_CASES))
def test_infllm_matches_numpy(driver, case, kv):
    """(a) the token scores s_h(t), (b) the representatives, (c) the block scores and the chosen
    blocks of every chunk, on random keys and queries, against numpy's chunk loop."""
    n_kv, group, H, B, K, n_sink, W, N, T, R = INFLLM_CASES[case]
    rng = np.random.default_rng(20 + sorted(INFLLM_CASES).index(case))
    keys = rng.normal(0, 1, (N, n_kv * H)).astype(np.float32)
    q, q_sink, q_mem = (rng.normal(0, 1, (N, n_kv * group * H)).astype(np.float32) for _ in range(3))
    got = call_infllm(driver, "infllm", kv, n_kv, group, H, B, K, n_sink, W, N, T, R, keys, q, q_sink, q_mem)
    checks = infllm_reference(stored(keys, kv, H), keys, q, q_sink, q_mem, n_kv, group, H, B, K, n_sink,
                              W, N, T, R, got)
    n_chosen = sum(len(v) for v in got["chosen"].values())
    print(f"\n[infllm {case} {kv}] {checks} checks, {len(got['repr']) // (n_kv * group)} blocks "
          f"represented, {n_chosen} retrievals")
    assert n_chosen > 0 and got["repr"]


def test_infllm_representatives(driver):
    """block_represent() on given scores: exact ties go to the lower position, and the two
    heads of one kv head (GQA) pick different tokens, so their representatives differ."""
    n_kv, group, H, B, R, n_sink, N = 2, 2, 4, 6, 3, 2, 24
    rng = np.random.default_rng(7)
    keys = rng.normal(0, 1, (N, n_kv * H)).astype(np.float32)
    s = rng.integers(0, 3, (n_kv * group, N)).astype(np.float32)   # many exact ties
    s[0, 6:12] = [5, 1, 1, 5, 0, 5]   # head 0, block 1: 6, 9, 11 (three 5s)
    s[1, 6:12] = [0, 4, 4, 0, 4, 1]   # head 1 (same kv head): 7, 8, 10
    got = call_infllm(driver, "represent", "f32", n_kv, group, H, B, 1, n_sink, N, N, 1, R, keys, s)
    k = keys.reshape(N, n_kv, H).astype(np.float64)
    for b in range(n_sink // B, N // B):
        want = represent(k, s, B, R, n_sink, group, b)
        for h in range(n_kv * group):
            assert np.abs(got["repr"][b, h] - want[h]).max() <= 1e-6, (b, h)
    assert np.allclose(got["repr"][1, 0], k[[6, 9, 11], 0].mean(0), atol=1e-6)
    assert np.allclose(got["repr"][1, 1], k[[7, 8, 10], 0].mean(0), atol=1e-6)
    assert len(got["repr"]) == (N // B - n_sink // B) * n_kv * group


@pytest.mark.parametrize("chunk", [8, 1])
@pytest.mark.parametrize("kv", ["f32", "q8"])
def test_infllm_all_blocks_is_full_attention(tiny_model, kv, chunk):
    """--memory-score infllm with every complete block retrieved, plus the remainder it always
    attends to, at their true distances and no sinks: full attention (--reference; to rounding,
    as test_memory_exact's (a)). One block is neither that nor Quest's choice of one block."""
    model, d = tiny_model
    ids = [int(i) for i in np.random.default_rng(5).integers(0, 256, SEQ)]
    base = ["--reference", "--kv-type", kv, "--chunk", chunk]
    full = logits(model, ids, d, *base)
    bound = FAST_BOUND + rel_err(logits(model, ids, d, "--reference", "--chunk", chunk), full)
    infllm = ["--memory-score", "infllm", "--memory-repr", 2]
    every = logits(model, ids, d, *base, *MEMORY_ALL, *infllm)
    assert rel_err(every, full) <= bound, rel_err(every, full)
    one = logits(model, ids, d, *base, *MEMORY_ONE, *infllm)
    quest = logits(model, ids, d, *base, *MEMORY_ONE)
    print(f"\n[infllm {kv} chunk {chunk}] all blocks: full attention within {rel_err(every, full):.3g}; one block differs from full "
          f"attention by {rel_err(one, full):.3g}, from Quest's one block by {rel_err(one, quest):.3g}")
    assert min(rel_err(one, full), rel_err(one, quest)) > 1e-3
