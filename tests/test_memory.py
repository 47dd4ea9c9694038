"""The context memory (--memory: InfLLM's blocks, Xiao et al. 2024, retrieved by Quest's bound,
Tang et al. 2024).

1. Exactness on tiny random models (Llama and Qwen2, GQA 4/2, 80 tokens, chunks of 8 and of 1),
   for every KV cache type. With --reference (the plain loops):
   (a) --window 16 --sinks 0 --memory --memory-true-pos with every block retrievable is full
       attention bit for bit (and full attention is HF's, f32, within 1e-5);
   (b) --memory --memory-blocks 0 is --sinks 4 --window 16 bit for bit.
   With the fast kernels the same pairs agree to rounding: the memory's attention is the plain
   loop, the other side's the tiled kernels. f32: within 1e-4 of the largest logit (measured:
   at most 1.1e-6). f16 and q8: rounding differences in one layer's output can move a later
   layer's stored key one rounding step (test_reference.py explains it), so their bound adds
   what storing the cache in that type costs at all (measured: at most 2.5e-5 for (a) and (b),
   1.6e-4 for one block against --reference at q8; bounds 3.3e-4 .. 1.1e-2). And one block
   (--memory-blocks 1) is neither sinks + window nor full attention (0.5 .. 1.1 of the largest
   logit apart): the memory is used.
2. memory_write(), memory_bounds() and memory_select() on random keys and queries
   (tests/memory_driver.c) against numpy: the stored keys (f16: numpy's rounding; q8: int8 of
   max|x| / 127 per head), each block's channel-wise bounds, the scores
   sum_h sum_i max(qbar_h,i M_i, qbar_h,i m_i) of the chunk's mean queries, and the K best
   eligible blocks (ties to the lower block). Quest's bound: no single query's q . k over a
   block's keys exceeds the block's score for that query.
3. Bad settings: one error line, exit 2.
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
# (a): every block retrievable, keys at their true positions, no sinks: full attention
MEMORY_ALL = ["--window", 16, "--sinks", 0, "--memory", "--memory-true-pos", "--memory-block", 8,
              "--memory-blocks", 100]
# (b): nothing retrieved: sinks + window
MEMORY_NONE = [*SINKS_WINDOW, "--memory", "--memory-blocks", 0, "--memory-block", 8]
# one block of 8 retrieved per chunk and kv head (InfLLM's placement)
MEMORY_ONE = [*SINKS_WINDOW, "--memory", "--memory-blocks", 1, "--memory-block", 8]


def families():
    from transformers import LlamaConfig, Qwen2Config
    return {"llama_gqa": LlamaConfig(**TINY, rope_theta=5e5), "qwen2_bias": Qwen2Config(**TINY, rope_theta=1e6)}


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
    assert np.array_equal(ref["all"], ref["full"]), f"(a) {rel_err(ref['all'], ref['full']):.3g}"
    assert np.array_equal(ref["none"], ref["sinks"]), f"(b) {rel_err(ref['none'], ref['sinks']):.3g}"
    hf_err = rel_err(ref["full"], hf)
    if kv == "f32":
        assert hf_err <= HF_BOUND
    bound = FAST_BOUND
    if kv != "f32":   # what storing the cache in this type costs at all (test_reference.py)
        bound += rel_err(logits(model, ids, d, "--reference", "--chunk", chunk), ref["full"])
    errs = {rule: rel_err(fast[rule], want) for rule, want in
            [("all", fast["full"]), ("none", fast["sinks"]), ("one", ref["one"])]}
    off = {rule: rel_err(fast["one"], fast[rule]) for rule in ("sinks", "full")}
    print(f"\n[{name} {kv} chunk {chunk}] fast: (a) {errs['all']:.3g} (b) {errs['none']:.3g} "
          f"one block vs --reference {errs['one']:.3g} (bound {bound:.3g}); one block differs from "
          f"sinks + window by {off['sinks']:.3g}, from full attention by {off['full']:.3g}; "
          f"--reference full attention vs HF {hf_err:.3g}")
    assert max(errs.values()) <= bound
    assert min(off.values()) > 0.05, "one retrieved block must change the logits"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return export(tiny_llama(d / "hf"), d / "f32.bin"), d


def test_memory_asan(tiny_model):
    """One case under ASan/UBSan (conftest's tiny Llama, GQA 4/2): (a) with a q8 cache bit for
    bit, and one block (f32 cache: the two builds round differently, which a q8 cache can turn
    into a step) within the fast bound of ./run."""
    model, d = tiny_model
    asan = need(RUN_ASAN, "build it with make run-asan")
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 256, SEQ)]
    base = ["--kv-type", "q8", "--chunk", 8]
    full = logits(model, ids, d, "--reference", *base, binary=asan)
    assert np.array_equal(logits(model, ids, d, "--reference", *base, *MEMORY_ALL, binary=asan), full)
    one = logits(model, ids, d, "--chunk", 8, *MEMORY_ONE, binary=asan)
    assert rel_err(one, logits(model, ids, d, "--chunk", 8, *MEMORY_ONE)) <= FAST_BOUND
    assert rel_err(one, logits(model, ids, d, "--chunk", 8, *SINKS_WINDOW)) > 0.05


# ---------------------------------------------------------------------------------------------
# memory_select() and the bounds, through tests/memory_driver.c

@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("memory") / "memory_driver")
    r = subprocess.run([os.environ.get("CC", "cc"), "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g",
                        "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-o", exe,
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


def call_driver(exe, kv, n_kv, group, H, B, K, n_sink, W, N, T, step, keys, q):
    args = [kv, n_kv, group, H, B, K, n_sink, W, N, T, step]
    stdin = " ".join(f"{v:.9g}" for v in np.concatenate([keys.ravel(), q.ravel()]))
    r = subprocess.run([exe, *map(str, args)], input=stdin, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
    out = {"stored": {}, "bounds": {}, "score": {}, "single": {}, "chosen": {}}
    for line in r.stdout.splitlines():
        tag, *f = line.split()
        if tag == "stored":
            out[tag][int(f[0])] = np.array(f[1:], dtype=np.float32)
        elif tag == "bounds":
            out[tag][int(f[0]), int(f[1])] = np.array(f[2:], dtype=np.float32).reshape(2, H)
        elif tag == "score":
            out[tag][int(f[0]), int(f[1])] = float(f[2])
        elif tag == "single":
            out[tag][int(f[0]), int(f[1]), int(f[2])] = float(f[3])
        else:
            out[tag][int(f[0])] = [int(b) for b in f[1:]]
    return out


def expected(keys, q, n_kv, group, H, B, K, n_sink, W, N, T):
    """numpy's bounds (n_blocks, n_kv, 2, H), scores {(g, b)} and chosen blocks {g}."""
    n_blocks = -(-N // B)
    k = keys.reshape(N, n_kv, H).astype(np.float64)
    bounds = np.stack([np.stack([k[b * B:(b + 1) * B].max(0), k[b * B:(b + 1) * B].min(0)], 1)
                       for b in range(n_blocks)])
    lo_last = max(N - 1 - W + 1, 0)   # the last query's first window position
    eligible = range(n_sink // B, (lo_last - 1) // B + 1) if lo_last > n_sink else range(0)
    qbar = q.astype(np.float64).reshape(T, n_kv, group, H).mean(0)
    scores, chosen = {}, {}
    for g in range(n_kv):
        for b in eligible:
            hi, lo = bounds[b, g]
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
    got_bounds = np.stack([np.stack([got["bounds"][b, g] for g in range(n_kv)]) for b in range(len(bounds))])
    assert np.abs(got_bounds - bounds).max() <= 1e-6 * np.abs(keys).max()
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
    "budget 0": (["--memory", "--window", 16, "--memory-budget", 0], "--memory-budget 0"),
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
