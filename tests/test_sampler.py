"""The sampler of run.c (through tests/sampler_driver.c) against HF transformers' logits processors:
greedy = argmax (also after the repetition penalty), seeds reproduce, the set of tokens that can be
drawn equals what TemperatureLogitsWarper -> TopK -> TopP -> MinP keep, and draw frequencies follow
HF's renormalised probabilities."""
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampler")
    cc = os.environ.get("CC", "cc")
    src = os.path.join(ROOT, "tests", "sampler_driver.c")
    plain, asan = str(d / "sampler_driver"), str(d / "sampler_driver_asan")
    for exe, flags in [(plain, ["-O2"]),
                       (asan, ["-O1", "-g", "-fsanitize=address,undefined,float-cast-overflow",
                               "-fno-sanitize-recover=all"])]:
        r = subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", *flags, "-o", exe, src, "-lm"],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"compiling sampler_driver.c failed:\n{r.stderr}"
    return plain, asan


def draw(binary, logits, n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0, last_n=64, seed=1,
         recent=()):
    """n sampled ids from run.c's sample() on these logits (float32)."""
    logits = np.asarray(logits, dtype=np.float32)
    text = (f"{len(logits)}\n{temperature!r} {top_k} {top_p!r} {min_p!r} {penalty!r} {last_n} {seed}\n"
            f"{len(recent)} {' '.join(map(str, recent))}\n"
            + " ".join("%.9g" % x for x in logits) + f"\n{n}\n")
    r = subprocess.run([binary], input=text, capture_output=True, text=True)
    assert r.returncode == 0, f"sampler_driver failed ({r.returncode}):\n{r.stderr[-3000:]}"
    ids = np.array([int(x) for x in r.stdout.split()], dtype=np.int64)
    assert len(ids) == n
    return ids


def hf_scores(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0, last_n=64, recent=()):
    """HF's processed scores, in generate()'s order; filtered tokens are -inf. top_k 0, top_p 1,
    min_p 0, penalty 1 are "off", as generate() leaves those processors out."""
    scores = torch.tensor(np.asarray(logits, dtype=np.float32))[None]
    window = list(recent)[-last_n:] if last_n > 0 else []
    ids = torch.tensor([window], dtype=torch.long)
    if penalty != 1.0 and window:
        scores = RepetitionPenaltyLogitsProcessor(float(penalty))(ids, scores)
    if temperature == 0:
        return scores[0].numpy()
    scores = TemperatureLogitsWarper(float(temperature))(ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(int(top_k))(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(float(top_p))(ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(float(min_p))(ids, scores)
    return scores[0].numpy()


def hf_probs(logits, **settings):
    s = torch.tensor(hf_scores(logits, **settings)).double()
    return torch.softmax(s, -1).numpy()


def assert_clear_boundaries(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, **_):
    """A test distribution must not put a threshold within float rounding of a token: then
    'which tokens survive' has one right answer."""
    p = np.exp((np.float64(logits) - np.max(logits)) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    sp = p[order]
    if 0 < top_k < len(p):
        assert sp[top_k - 1] - sp[top_k] > 1e-6 * sp[0], "top-k boundary tie"
        sp = sp[:top_k]
    if top_p < 1.0:
        before = np.concatenate([[0.0], np.cumsum(sp)[:-1]]) / sp.sum()
        # (the most likely token, with nothing before it, is always kept)
        assert np.min(np.abs(before[1:] - top_p), initial=1) > 1e-4, "top-p threshold within rounding of a token"
        sp = sp[before < top_p]
    if min_p > 0.0 and len(sp) > 1:
        assert np.min(np.abs(sp[1:] / sp[0] - min_p)) > 1e-4, "min-p threshold within rounding of a token"


# ---------------------------------------------------------------------------------------------
# (a) temperature 0 is argmax, also after the repetition penalty

def test_greedy_is_argmax(drivers):
    plain, _ = drivers
    rng = np.random.default_rng(0)
    for trial in range(20):
        V = int(rng.integers(2, 3000))
        logits = rng.normal(0, 3, V).astype(np.float32)
        if trial % 4 == 0:   # a tie for the maximum: the first index wins, as numpy's and torch's argmax
            j, k = sorted(rng.choice(V, 2, replace=False))
            logits[j] = logits[k] = logits.max() + 1
        # other settings are ignored at temperature 0
        got = draw(plain, logits, 3, temperature=0.0, top_k=int(rng.integers(0, 5)), top_p=0.5, min_p=0.3,
                   seed=trial + 1)
        assert (got == np.argmax(logits)).all(), f"trial {trial}: got {got}, argmax {np.argmax(logits)}"


def test_greedy_with_repetition_penalty_matches_hf(drivers):
    plain, _ = drivers
    rng = np.random.default_rng(1)
    changed = 0
    for trial in range(40):
        V = int(rng.integers(20, 400))
        logits = rng.normal(0, 2, V).astype(np.float32)
        top = np.argsort(-logits)[:6]
        # recent tokens: the top few (so the penalty can change the winner), repeats, and others
        recent = list(rng.choice(top, int(rng.integers(1, 6)))) + list(rng.integers(0, V, int(rng.integers(0, 40))))
        recent = [int(x) for x in rng.permutation(recent)]
        penalty = float(np.float32(rng.choice([0.5, 1.1, 1.5, 2.0, 5.0])))
        last_n = int(rng.choice([0, 1, 4, 16, 64]))
        hf = hf_scores(logits, temperature=0, penalty=penalty, last_n=last_n, recent=recent)
        want = int(np.argmax(hf))
        s = np.sort(hf)[::-1]
        if s[0] - s[1] < 1e-5 * max(1.0, abs(s[0])):   # a rounding tie: no single right answer
            continue
        got = draw(plain, logits, 2, temperature=0.0, penalty=penalty, last_n=last_n, recent=recent, seed=trial + 1)
        assert (got == want).all(), (f"trial {trial}: V {V} penalty {penalty} last_n {last_n} recent {recent}: "
                                     f"got {got}, HF argmax {want} (unpenalised {np.argmax(logits)})")
        changed += want != int(np.argmax(logits))
    print(f"\n[sampler] repetition penalty changed the greedy choice in {changed} of 40 cases")
    assert changed >= 5, "the cases do not exercise the penalty"


# ---------------------------------------------------------------------------------------------
# (b) seeds

def test_same_seed_same_draws_different_seed_different(drivers):
    plain, _ = drivers
    logits = np.random.default_rng(2).normal(0, 1.5, 200).astype(np.float32)
    for settings in [dict(temperature=1.0), dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
                     dict(temperature=1.2, top_p=0.9), dict(temperature=1.0, min_p=0.1)]:
        a = draw(plain, logits, 200, seed=12345, **settings)
        b = draw(plain, logits, 200, seed=12345, **settings)
        c = draw(plain, logits, 200, seed=12346, **settings)
        d = draw(plain, logits, 200, seed=0, **settings)
        assert (a == b).all(), f"{settings}: the same seed gave different draws"
        assert (a != c).sum() > 50, f"{settings}: seeds 12345 and 12346 gave (nearly) the same draws"
        assert (a != d).sum() > 50, f"{settings}: seeds 12345 and 0 gave (nearly) the same draws"
        assert len(set(a.tolist())) > 5, f"{settings}: 200 draws hardly vary"


# ---------------------------------------------------------------------------------------------
# (c) the set of tokens that can be drawn = the set HF keeps

def _spread(V, lo, hi, seed):
    """V distinct logits evenly spread over [lo, hi], in a shuffled order."""
    return np.random.default_rng(seed).permutation(np.linspace(hi, lo, V)).astype(np.float32)


FLAT50 = _spread(50, -1.2, 1.2, 10)    # every token >= ~0.6%: all 50 appear in 3000 draws
STEEP50 = _spread(50, -6.0, 6.0, 11)   # a steep head and a long negligible tail

SET_CASES = [
    ("all", FLAT50, dict()),
    ("top-k 10", STEEP50, dict(top_k=10)),
    ("top-k 1", STEEP50, dict(top_k=1)),
    ("top-k 1 hot", FLAT50, dict(top_k=1, temperature=50.0)),
    ("top-k > V", FLAT50, dict(top_k=100)),
    ("top-p 0.5", STEEP50, dict(top_p=0.5)),
    ("top-p 0.9 T0.7", STEEP50, dict(top_p=0.9, temperature=0.7)),
    ("top-p 0.93 T2", STEEP50, dict(top_p=0.93, temperature=2.0)),
    ("top-p tiny", STEEP50, dict(top_p=1e-6)),
    ("top-p tiny flat", FLAT50, dict(top_p=0.01)),
    ("min-p 0.5", STEEP50, dict(min_p=0.5)),
    ("min-p 0.2 T1.5", STEEP50, dict(min_p=0.2, temperature=1.5)),
    ("min-p 0.15 flat", FLAT50, dict(min_p=0.15)),
    ("min-p 1", STEEP50, dict(min_p=1.0)),
    ("k+p", STEEP50, dict(top_k=8, top_p=0.8)),
    ("k+p+min-p", FLAT50, dict(top_k=20, top_p=0.8, min_p=0.3)),
    ("k+min-p", FLAT50, dict(top_k=25, min_p=0.45)),
    ("p+min-p", STEEP50, dict(top_p=0.95, min_p=0.05, temperature=1.3)),
    ("defaults", STEEP50, dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)),
    ("penalty+p", STEEP50, dict(top_p=0.9, penalty=1.8, last_n=8,
                                recent=[int(i) for i in np.argsort(-STEEP50)[[0, 2, 2, 40, 5, 1, 30, 9, 0, 11]]])),
]


@pytest.mark.parametrize("name,logits,settings", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_drawn_set_equals_hf_kept_set(drivers, name, logits, settings):
    plain, _ = drivers
    assert_clear_boundaries(logits, **settings)
    probs = hf_probs(logits, **settings)
    kept = set(np.flatnonzero(probs > 0).tolist())
    assert kept, "HF keeps nothing?"
    assert probs[probs > 0].min() >= 0.004, f"{name}: a kept token is too rare to be sure to appear"
    got = draw(plain, logits, 3000, seed=7, **settings)
    seen = set(got.tolist())
    assert seen == kept, (f"{name}: drew {len(seen)} distinct ids, HF keeps {len(kept)}; "
                          f"drawn but not kept {sorted(seen - kept)}, kept but never drawn {sorted(kept - seen)}")


NEAR_UNIFORM = [
    # The most likely token is always in HF's nucleus, however small top_p is; on a near-uniform
    # distribution it is below (1 - top_p) / (V - 1).
    ("V50 one slightly ahead", np.array([0.01 if i == 7 else 0.0 for i in range(50)], np.float32), dict(top_p=0.01)),
    ("V2", np.array([0.08, 0.0], np.float32), dict(top_p=0.3)),
    ("V1000 flat hot", _spread(1000, -1.0, 1.0, 12), dict(top_p=1e-6, temperature=100.0)),
]


@pytest.mark.parametrize("name,logits,settings", NEAR_UNIFORM, ids=[c[0] for c in NEAR_UNIFORM])
def test_tiny_top_p_on_near_uniform_keeps_the_best(drivers, name, logits, settings):
    _, asan = drivers   # an out-of-bounds read here must be reported, not return a stray id
    kept = set(np.flatnonzero(hf_probs(logits, **settings) > 0).tolist())
    assert kept == {int(np.argmax(logits))}
    got = draw(asan, logits, 50, seed=3, **settings)
    assert set(got.tolist()) == kept, f"{name}: drew {sorted(set(got.tolist()))}, HF keeps {sorted(kept)}"


def test_sampler_is_clean_under_asan(drivers):
    _, asan = drivers
    for name, logits, settings in SET_CASES:
        draw(asan, logits, 300, seed=11, **settings)


# ---------------------------------------------------------------------------------------------
# (d) frequencies follow HF's renormalised probabilities

@pytest.mark.parametrize("settings", [dict(temperature=0.9, top_k=12, top_p=0.9, min_p=0.05),
                                      dict(temperature=1.0)], ids=["k+p+min-p", "plain"])
def test_frequencies_match_hf_probabilities(drivers, settings):
    plain, _ = drivers
    logits = _spread(30, -2.5, 2.5, 13) if settings.get("top_k") is None else STEEP50
    assert_clear_boundaries(logits, **settings)
    p = hf_probs(logits, **settings)
    n = 20000
    got = draw(plain, logits, n, seed=2024, **settings)
    freq = np.bincount(got, minlength=len(p)) / n
    worst = np.abs(freq - p).max()
    nz = p > 0
    chi2 = float((((freq[nz] - p[nz]) * n) ** 2 / (p[nz] * n)).sum())
    df = int(nz.sum()) - 1
    print(f"\n[sampler] {settings}: {df + 1} tokens, max |freq - p| {worst:.4f}, chi2 {chi2:.1f} (df {df})")
    assert (freq[~nz] == 0).all(), "drew a token HF filters out"
    assert worst < 0.015
    # chi2 / df is ~1 for a faithful sampler; df + 6 sqrt(2 df) is far in the tail (p < 1e-5)
    assert chi2 < df + 6 * np.sqrt(2 * df)


def driver_run(binary, text):
    return subprocess.run([binary], input=text, capture_output=True, text=True)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_a_non_finite_logit_is_an_error(drivers, bad):
    """A broken model's NaN or infinite logit is refused with one error line, not sampled from."""
    r = driver_run(drivers[1], f"4\n1.0 0 1.0 0.0 1.0 64 1\n0\n1 2 {bad} 3\n1\n")
    assert r.returncode == 1 and r.stderr.startswith("error: the model gave token 2 the logit"), r.stderr
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (1, 1.0, 0.0), (0, 1.0, 0.1), (0, 0.5, 0.0),
                                               (3, 0.9, 0.05)])
def test_a_tiny_temperature_is_greedy(drivers, top_k, top_p, min_p):
    """logits / 1e-38 overflow float: the sampler scales (l - max) instead, so the result is the
    argmax, as the limit of a vanishing temperature is."""
    logits = [30.0, 29.5, -12.0, 31.0, 8.0]
    ids = draw(drivers[1], logits, 20, temperature=1e-38, top_k=top_k, top_p=top_p, min_p=min_p)
    assert set(ids.tolist()) == {3}


def test_a_penalty_that_overflows_the_logits(drivers):
    """A 1e-3 penalty divides a huge positive logit to +inf: that token takes all the mass; a
    1e3 penalty multiplies a huge negative one to -inf: it can never be drawn."""
    logits = [3e38, 1.0, -3e38, 2.0]
    ids = draw(drivers[1], logits, 20, penalty=1e-3, recent=[0], top_k=0)
    assert set(ids.tolist()) == {0}
    ids = draw(drivers[1], logits, 200, penalty=1e3, recent=[2], top_k=0, min_p=0.0)
    assert 2 not in set(ids.tolist()) and len(set(ids.tolist())) >= 1
