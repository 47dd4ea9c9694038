"""RoPE scaling (linear, dynamic NTK, YaRN, Llama 3, LongRoPE) against the real references.

1. run.c's rope_frequencies() (through tests/rope_driver.c) reproduces hand-worked values of each
   method's formula (R1-R2, L1, D1-D2, Y1-Y6, G1, P1: the formula evaluated for one published
   setting, e.g. YaRN's a = 0.1 ln 4 + 1 = 1.13862944), and transformers' own rope init functions
   (ROPE_INIT_FUNCTIONS, the models' compute_default_rope_parameters) on configs that go through
   export.py's resolution first: rel err <= 1e-6 on every inverse frequency and attention factor.
2. Logits parity with HF transformers (float32, eager) on tiny random models of every rope type,
   in one prefill that runs well past original_max_position_embeddings (64 -> 300 tokens), and
   for longrope on both sides of the short/long switch; a chunked prefill equals HF forward calls
   of the same chunks (dynamic and longrope decide per call, and cached keys keep their angles),
   and so does decode, one token per call, past L0 (-m logits --chunk 1 and -m generate).
3. Command-line overrides give the logits of the same weights exported with that scaling.
4. export.py: Phi-3 (fused qkv / gate_up, partial rotary, longrope, sliding window), v4 and v5
   config spellings, llama.cpp's rope_freqs tensor and rope keys in GGUF, and clear refusals.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, export, run

sys.path.insert(0, ROOT)
import export as ex  # noqa: E402  (its config resolution is what the file stores)

REL = 1e-6         # inverse frequencies and attention factors, relative
LOGIT_BOUND = 1e-5  # max |engine - HF| / max |HF|: up to 3.4e-6 measured (Phi-3, 300 tokens)
L0, SEQ = 64, 300   # original context of the tiny models, and a prefill well past it
TYPES = ex.ROPE_TYPES


# ----------------------------------------------------------------------------
# 1. rope_frequencies() through tests/rope_driver.c

@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    """rope_driver.c built plain and with AddressSanitizer + UBSan."""
    d = tmp_path_factory.mktemp("rope")
    cc = os.environ.get("CC", "cc")
    out = []
    for name, flags in [("rope_driver", ["-O2"]),
                        ("rope_driver_asan", ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"])]:
        exe = str(d / name)
        r = subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", *flags, "-o", exe,
                            os.path.join(ROOT, "tests", "rope_driver.c"), "-lm"], capture_output=True, text=True)
        assert r.returncode == 0, f"compiling rope_driver.c failed:\n{r.stderr}"
        out.append(exe)
    return out


@pytest.fixture(scope="module")
def driver(drivers):
    return drivers[0]


def c_rope(driver, seq_len=None, short=None, long=None, **fields):
    """(a, inv_freq) from run.c for these LayerConfig fields (floats are passed as float32 text)."""
    args = [f"{k}={int(v) if isinstance(v, (bool, int, np.integer)) else repr(float(v))}" for k, v in fields.items()]
    if seq_len is not None:
        args.append(f"seq_len={int(seq_len)}")
    for key, values in (("short", short), ("long", long)):
        if values is not None:
            args.append(key + "=" + ",".join(repr(float(np.float32(x))) for x in values))
    r = subprocess.run([driver, *args], capture_output=True, text=True)
    assert r.returncode == 0, f"rope_driver {' '.join(args)} failed: {r.stderr}"
    out = np.array([float(x) for x in r.stdout.split()], dtype=np.float64)
    return out[0], out[1:]


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / np.abs(want)))


def check(name, got, expected):
    """expected: {index: value}; prints and asserts the worst relative error."""
    idx = list(expected)
    err = rel(got[idx], [expected[i] for i in idx])
    print(f"\n[{name}] worst rel err {err:.2g} over {len(idx)} values")
    assert err <= REL, f"{name}: {dict(zip(idx, got[idx]))} vs {expected}"


def plain(b, d):
    return 1.0 / np.float64(b) ** (np.arange(0, d, 2) / d)


def test_spec_default_and_linear(driver):
    a, f = c_rope(driver, rope_type=TYPES["default"], rotary_dim=128, rope_theta=1e4)
    assert a == 1.0
    check("R1", f, {0: 1.0, 1: 0.865964323, 32: 0.01, 63: 1.15478198e-4})
    _, f = c_rope(driver, rope_type=TYPES["default"], rotary_dim=128, rope_theta=5e5)
    check("R2", f, {1: 0.814617234, 32: 0.00141421356, 63: 2.45514079e-6})
    _, f = c_rope(driver, rope_type=TYPES["default"], rotary_dim=96, rope_theta=1e4)
    check("R (d=96)", f, {1: 0.825404185, 24: 0.01, 47: 1.21152766e-4})
    a, f = c_rope(driver, rope_type=TYPES["linear"], rotary_dim=128, rope_theta=1e4, factor=4.0)
    assert a == 1.0
    check("L1", f, {0: 0.25, 32: 0.0025, 63: 2.88695496e-5})


def test_spec_dynamic(driver):
    cfg = dict(rope_type=TYPES["dynamic"], rotary_dim=128, rope_theta=1e4, factor=2.0, orig_ctx=4096)
    a, f = c_rope(driver, seq_len=8192, **cfg)
    assert a == 1.0
    check("D1", f, {63: 3.84927328e-5, 1: 0.850994291})
    base = f[1] ** (-64.0)  # inv_freq[1] = b'^(-2/128)
    print(f"\n[D1] b'(8192) = {base:.6f} (spec 30527.736749)")
    assert abs(base / 30527.736749 - 1) <= 64 * REL  # b' is read back through a 64th power
    for L, f1, f63 in [(4097, 0.865957613, 1.1542184e-4), (6144, 0.856488914, 5.77390992e-5),
                       (16384, 0.839625743, 1.64968855e-5)]:
        check(f"dynamic L={L}", c_rope(driver, seq_len=L, **cfg)[1], {1: f1, 63: f63})
    _, default = c_rope(driver, rope_type=TYPES["default"], rotary_dim=128, rope_theta=1e4)
    for L in (4096, 100, 1):  # D2: L <= M leaves b' = b exactly
        _, f = c_rope(driver, seq_len=L, **cfg)
        assert np.array_equal(f, default), f"D2: dynamic at L={L} <= M differs from the default table"


def ramp_of(f, b, d, s):
    """YaRN's ramp per pair, read back from a table: inv = p (1 - r) + (p / s) r."""
    p = plain(b, d)
    return (p - f) / (p - p / s)


def test_spec_yarn(driver):
    y1 = dict(rope_type=TYPES["yarn"], rotary_dim=128, rope_theta=1e6, factor=4.0, orig_ctx=32768)
    a, f = c_rope(driver, **y1)
    check("Y1 a", np.array([a]), {0: 1.13862944})
    ratio = plain(1e6, 128) / f
    # Y1: range (23, 40): pairs up to 23 keep their frequency, 40 and up are divided by s
    assert np.allclose(ratio[:24], 1, rtol=REL, atol=0) and np.allclose(ratio[40:], 4, rtol=REL, atol=0)
    assert np.all((ratio[24:40] > 1 + 1e-3) & (ratio[24:40] < 4 - 1e-3)), "Y1: ramp outside (23, 40)"
    check("Y2", f, {0: 1.0, 23: 0.00697830585, 24: 0.00537532149, 31: 0.000802959728, 40: 4.44569853e-5,
                    63: 3.1023444e-7})
    a6, f6 = c_rope(driver, attention_factor=1.0, **y1)
    assert a6 == 1.0 and np.array_equal(f6, f), "Y6: an explicit attention_factor changes only a"

    y3 = dict(rope_type=TYPES["yarn"], rotary_dim=128, rope_theta=1e4, factor=16.0, orig_ctx=4096)
    a, f = c_rope(driver, **y3)
    check("Y3 a", np.array([a]), {0: 1.27725887})
    r = ramp_of(f, 1e4, 128, 16.0)
    assert np.all(np.abs(r[:21]) < 1e-5) and np.all(np.abs(r[46:] - 1) < 1e-5), "Y3: range is not (20, 46)"
    check("Y3", f, {21: 0.04694086, 33: 0.00460043547, 46: 8.33450895e-5, 63: 7.2173874e-6})
    a, f = c_rope(driver, **{**y3, "factor": 4.0})
    check("Y3 s=4", np.concatenate([[a], f]), {0: 1.13862944, 34: 0.00541227702, 64: 2.88695496e-5})

    y4 = dict(rope_type=TYPES["yarn"], rotary_dim=64, rope_theta=150000.0, factor=32.0, orig_ctx=4096)
    a, f = c_rope(driver, yarn_truncate=0, **y4)
    check("Y4 no-truncate", np.concatenate([[a], f]), {0: 1.34657359, 10: 0.0317056962, 14: 0.00386035932})
    r = ramp_of(f, 150000.0, 64, 32.0)
    assert abs(r[9] - 0.0974956) < 1e-5 and abs(r[13] - 0.527361) < 1e-5, f"Y4 ramp {r[9]}, {r[13]}"
    assert abs(r[8]) < 1e-5 and abs(r[17] - (17 - 8.09278) / (17.39802 - 8.09278)) < 1e-5 and abs(r[18] - 1) < 1e-5
    _, f = c_rope(driver, yarn_truncate=1, **y4)
    check("Y4 truncate", f, {9: 0.0316207523, 13: 0.00406955471})

    y5 = dict(rope_type=TYPES["yarn"], rotary_dim=128, rope_theta=1e4, factor=40.0, orig_ctx=4096)
    a, f = c_rope(driver, mscale=1.0, mscale_all_dim=1.0, **y5)
    assert abs(a - 1.0) <= REL, f"Y5: mscale = mscale_all_dim gives a = {a}"
    a2, f2 = c_rope(driver, mscale=1.0, **y5)
    check("Y5 fallback", np.array([a2]), {0: 1.36888795})
    assert np.array_equal(f, f2), "Y5: mscale must not change the frequencies"


def test_spec_llama3(driver):
    g1 = dict(rope_type=TYPES["llama3"], rotary_dim=128, rope_theta=5e5, factor=8.0, orig_ctx=8192,
              low_freq_factor=1.0, high_freq_factor=4.0)
    a, f = c_rope(driver, **g1)
    assert a == 1.0
    check("G1", f, {0: 1.0, 28: 0.00321144599, 29: 0.00216657076, 30: 0.00137189357, 31: 0.000856751413,
                    34: 0.000178507813, 35: 9.55621235e-5, 63: 3.06892599e-7})
    assert np.allclose(f[:29], plain(5e5, 128)[:29], rtol=REL, atol=0), "G1: high-frequency pairs must not change"
    _, f = c_rope(driver, **{**g1, "factor": 32.0})
    check("G1 s=32", f, {30: 0.00129054793, 31: 0.000762541203, 63: 7.67231497e-8})


def test_spec_longrope(driver):
    rng = np.random.default_rng(5)
    short = np.concatenate([[1.08], rng.uniform(1, 1.5, 46), [1.5]]).astype(np.float32)
    long = np.concatenate([[1.0], rng.uniform(1, 2, 46), [2.0]]).astype(np.float32)
    p1 = dict(rope_type=TYPES["longrope"], rotary_dim=96, rope_theta=1e4, factor=32.0, orig_ctx=4096,
              short=short, long=long)
    a, f = c_rope(driver, seq_len=4096, **p1)  # seq_len <= L0: the short list
    check("P1", np.concatenate([[a], f]), {0: 1.19023807, 1: 0.925925926})
    check("P1 short", f, dict(enumerate(plain(1e4, 96) / short.astype(np.float64))))
    a2, f = c_rope(driver, seq_len=4097, **p1)  # beyond L0: the long list, same a
    assert a2 == a
    check("P1 long", f, {47: 6.05763829e-5, **dict(enumerate(plain(1e4, 96) / long.astype(np.float64)))})
    a, _ = c_rope(driver, **{**p1, "factor": 16.0, "orig_ctx": 8192})
    check("P1 s=16", np.array([a]), {0: 1.14354375})
    a, _ = c_rope(driver, **{**p1, "attention_factor": 1.5})
    assert a == 1.5
    a, _ = c_rope(driver, **{**p1, "factor": 1.0})
    assert a == 1.0, "longrope with s <= 1 has a = 1"


def test_sanitizer_build_agrees(drivers):
    """Every method once more through the ASan/UBSan build: clean, and the same numbers."""
    rng = np.random.default_rng(9)
    lists = dict(short=rng.uniform(1, 2, 8), long=rng.uniform(1, 4, 8))
    cases = [dict(rope_type=TYPES["default"]), dict(rope_type=TYPES["linear"], factor=4.0),
             dict(rope_type=TYPES["dynamic"], factor=2.0, seq_len=300),
             dict(rope_type=TYPES["yarn"], factor=4.0, yarn_truncate=0, mscale=2.0, mscale_all_dim=1.0),
             dict(rope_type=TYPES["llama3"], factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
             dict(rope_type=TYPES["longrope"], factor=4.0, seq_len=64, **lists),
             dict(rope_type=TYPES["longrope"], factor=4.0, seq_len=65, **lists)]
    for case in cases:
        fields = dict(rotary_dim=16, rope_theta=1e4, orig_ctx=64, **case)
        a, f = c_rope(drivers[0], **fields)
        a2, f2 = c_rope(drivers[1], **fields)
        assert a == a2 and np.array_equal(f, f2), case


# --- against transformers' rope init functions, through export.py's resolution ----------

def hf_reference(arch, raw, seq_len):
    """(a, inv_freq) as transformers computes them for this config.json, float32. seq_len goes in
    as a tensor, as the model's forward (dynamic_rope_update) passes it."""
    from transformers import LlamaConfig, Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    cls, rotary = (Phi3Config, Phi3RotaryEmbedding) if arch == "phi3" else (LlamaConfig, LlamaRotaryEmbedding)
    cfg = cls(**{k: v for k, v in raw.items() if k != "architectures"})
    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":
        inv, a = rotary.compute_default_rope_parameters(cfg)
    else:
        inv, a = ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=None if seq_len is None else torch.tensor(seq_len))
    assert inv.dtype == torch.float32
    return float(a), inv.numpy()


def c_from_config(driver, arch, raw, seq_len):
    """(a, inv_freq) from run.c for the LayerConfig export.py writes for this config.json."""
    name = {"phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    cfg = {**ex.COMMON_DEFAULTS, **ex.ARCHS[name][1], **raw}
    head_dim = cfg["head_dim"] or cfg["hidden_size"] // cfg["num_attention_heads"]
    prf = None
    if arch == "llama" and (cfg.get("rope_parameters") or {}).get("partial_rotary_factor"):
        # export.py refuses this (the Llama model ignores or breaks on it), but HF's init functions
        # honour it, and so must rope_frequencies(): resolve without it, then narrow the rotation
        cfg["rope_parameters"] = dict(cfg["rope_parameters"])
        prf = cfg["rope_parameters"].pop("partial_rotary_factor")
    rope, factors = ex.hf_rope(cfg, arch, head_dim)
    fields = {k: v for k, v in rope.items()}
    if prf:
        fields["rotary_dim"] = int(head_dim * prf)
    if seq_len is None:
        seq_len = fields.get("orig_ctx") or cfg["max_position_embeddings"]
    return c_rope(driver, seq_len=seq_len, short=factors.get("rope.short_factor"),
                  long=factors.get("rope.long_factor"), **fields)


def _lists(n, seed):
    rng = np.random.default_rng(seed)
    return [float(x) for x in rng.uniform(1.0, 1.6, n)], [float(x) for x in rng.uniform(1.0, 6.0, n)]


def hf_cases():
    """(name, arch, config.json fields, seq_lens) covering every branch of every method."""
    def llama(head_dim, max_pos, rp=None, **kw):
        return {"hidden_size": 64, "num_attention_heads": 4, "head_dim": head_dim, "max_position_embeddings": max_pos,
                **({"rope_parameters": rp} if rp else {}), **kw}
    s96, l96 = _lists(48, 1)
    s16, l16 = _lists(16, 2)
    s8, l8 = _lists(8, 3)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    return [
        ("default 1e4/128", "llama", llama(128, 4096, rope_theta=1e4), [None]),
        ("default 5e5/64", "llama", llama(64, 4096, rope_theta=5e5), [None]),
        ("default 1e6/16", "llama", llama(16, 4096, rope_theta=1e6), [None]),
        ("default phi3 prf 0.5", "phi3", {"hidden_size": 128, "num_attention_heads": 4, "partial_rotary_factor": 0.5},
         [None]),
        ("linear 4", "llama", llama(128, 4096, {"rope_type": "linear", "factor": 4.0}), [None]),
        ("linear 2.5 prf .5", "llama", llama(64, 4096, {"rope_type": "linear", "factor": 2.5,
                                                         "partial_rotary_factor": 0.5}), [None]),
        ("dynamic 2", "llama", llama(128, 4096, {"rope_type": "dynamic", "factor": 2.0}),
         [None, 100, 4096, 4097, 6144, 8192, 16384, 100000]),
        ("dynamic 3 d16", "llama", llama(16, 64, {"rope_type": "dynamic", "factor": 3.0}), [64, 65, 300, 1000]),
        ("yarn Y1", "llama", llama(128, 131072, yarn), [None]),
        ("yarn implicit factor", "llama", llama(128, 131072, {**yarn, "factor": None}), [None]),
        ("yarn Y3", "llama", llama(128, 65536, {**yarn, "factor": 16.0, "rope_theta": 1e4,
                                                "original_max_position_embeddings": 4096}), [None]),
        ("yarn Y4 no truncate", "llama", llama(64, 131072, {**yarn, "factor": 32.0, "rope_theta": 150000.0,
                                                            "original_max_position_embeddings": 4096,
                                                            "truncate": False}), [None]),
        ("yarn betas 16/2", "llama", llama(64, 8192, {**yarn, "beta_fast": 16, "beta_slow": 2, "rope_theta": 1e4,
                                                      "original_max_position_embeddings": 2048}), [None]),
        ("yarn attention_factor", "llama", llama(128, 131072, {**yarn, "attention_factor": 1.3}), [None]),
        ("yarn mscale 1/1", "llama", llama(128, 131072, {**yarn, "factor": 40.0, "mscale": 1.0,
                                                         "mscale_all_dim": 1.0}), [None]),
        ("yarn mscale .7/.3", "llama", llama(128, 131072, {**yarn, "mscale": 0.7, "mscale_all_dim": 0.3}), [None]),
        ("yarn tiny d32", "llama", llama(32, 256, {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 64}), [None]),
        ("yarn prf .5", "llama", llama(64, 256, {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5,
                                                 "original_max_position_embeddings": 64}), [None]),
        ("llama3 G1", "llama", llama(128, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "rope_theta": 5e5,
                                                   "original_max_position_embeddings": 8192}), [None]),
        ("llama3 s=32", "llama", llama(64, 131072, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "rope_theta": 5e5,
                                                    "original_max_position_embeddings": 8192}), [None]),
        ("llama3 tiny d32 lf2 hf8", "llama", llama(32, 256, {"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                                            "original_max_position_embeddings": 64}), [None]),
        ("longrope phi3-128k", "phi3", {"hidden_size": 3072, "num_attention_heads": 32,
                                        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                                        "rope_scaling": {"type": "longrope", "short_factor": s96, "long_factor": l96}},
         [1, 4096, 4097, 131072]),
        ("longrope llama explicit", "llama", llama(32, 256, {"rope_type": "longrope", "short_factor": s16,
                                                             "long_factor": l16, "factor": 3.0,
                                                             "attention_factor": 1.25,
                                                             "original_max_position_embeddings": 64}), [64, 65]),
        # a top-level original_max_position_embeddings beats the rope dict's (Phi-3 keeps it there);
        # Phi3Config always has one (default 4096), so there the dict's value never counts
        ("yarn top-level L0 wins", "llama", llama(32, 256, {"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 32},
                                                   original_max_position_embeddings=64), [None]),
        ("longrope phi3 L0 default 4096", "phi3", {"hidden_size": 128, "num_attention_heads": 4,
                                                   "max_position_embeddings": 16384,
                                                   "rope_scaling": {"type": "longrope", "short_factor": s16,
                                                                    "long_factor": l16,
                                                                    "original_max_position_embeddings": 64}},
         [65, 4096, 4097]),
        ("longrope phi3 prf .5", "phi3", {"hidden_size": 128, "num_attention_heads": 4, "max_position_embeddings": 256,
                                          "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5,
                                          "rope_scaling": {"type": "longrope", "short_factor": s8, "long_factor": l8}},
         [64, 65]),
    ]


@pytest.mark.parametrize("name,arch,raw,seq_lens", hf_cases(), ids=[c[0] for c in hf_cases()])
def test_matches_hf_init_functions(driver, name, arch, raw, seq_lens):
    raw = {"num_hidden_layers": 1, "vocab_size": 32, "intermediate_size": 32, "pad_token_id": None, **raw}
    worst = 0.0
    for L in seq_lens:
        a_hf, f_hf = hf_reference(arch, raw, L)
        a_c, f_c = c_from_config(driver, arch, raw, L)
        assert f_c.shape == f_hf.shape, f"{name}: {f_c.size} frequencies, HF has {f_hf.size}"
        err = max(rel(f_c, f_hf), rel([a_c], [a_hf]))
        worst = max(worst, err)
        assert err <= REL, f"{name} seq_len {L}: rel err {err:.3g}; a {a_c} vs HF {a_hf}"
    print(f"\n[{name}] vs transformers: worst rel err {worst:.2g} over seq_len {seq_lens}")


# ----------------------------------------------------------------------------
# 2. Logits parity on tiny random models

def build_hf(name, cfg, path):
    """A random float32 eager model of cfg saved to path (norms randomised, as in test_engine)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(sum(map(ord, name)))
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def fresh(hf_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def engine(model_file, ids, out, *options):
    """Logits of every position from ./run -m logits, in ONE forward call over all of ids."""
    n = len(ids)
    run(model_file, "-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", out, "-c", n, "--chunk", n,
        *options)
    return np.fromfile(out, dtype="<f4").reshape(n, -1)


def rel_logits(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, vocab_size=256, rms_norm_eps=1e-5, initializer_range=0.08,
              pad_token_id=None, bos_token_id=None, eos_token_id=None)
PHI3 = dict(COMMON, hidden_size=128)
del PHI3["head_dim"]


def parity_cases():
    from transformers import LlamaConfig, Phi3Config
    s16, l16 = _lists(16, 4)
    s8, l8 = _lists(8, 5)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0}
    return {
        "linear": (LlamaConfig(**COMMON, max_position_embeddings=256,
                               rope_parameters={"rope_type": "linear", "factor": 4.0}), [SEQ]),
        # M = max_position_embeddings = 64: a prefill of 50 keeps the base, 300 grows it
        "dynamic": (LlamaConfig(**COMMON, max_position_embeddings=L0,
                                rope_parameters={"rope_type": "dynamic", "factor": 2.0}), [50, SEQ]),
        "yarn": (LlamaConfig(**COMMON, max_position_embeddings=256, rope_parameters=yarn), [SEQ]),
        "yarn_attention_factor": (LlamaConfig(**COMMON, max_position_embeddings=256,
                                              rope_parameters={**yarn, "attention_factor": 1.3}), [SEQ]),
        # beta_fast 4 puts the ramp's low end above 0 at L0 = 64: range (1, 6) of 16 pairs
        "yarn_betas_no_truncate": (LlamaConfig(**COMMON, max_position_embeddings=256,
                                               rope_parameters={**yarn, "beta_fast": 4.0, "beta_slow": 0.5,
                                                                "truncate": False}), [SEQ]),
        "yarn_mscale": (LlamaConfig(**COMMON, max_position_embeddings=256,
                                    rope_parameters={**yarn, "mscale": 2.0, "mscale_all_dim": 1.0}), [SEQ]),
        # d 32, theta 1e4, L0 64: pairs 0-1 high, 2-4 smooth, 5-15 low frequency
        "llama3": (LlamaConfig(**COMMON, max_position_embeddings=256,
                               rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": L0}),
                   [SEQ]),
        # LlamaForCausalLM takes longrope (the init function and the per-call switch are shared)
        "longrope_llama": (LlamaConfig(**COMMON, max_position_embeddings=256,
                                       rope_parameters={"rope_type": "longrope", "short_factor": s16,
                                                        "long_factor": l16, "original_max_position_embeddings": L0}),
                           [L0, L0 + 1, SEQ]),
        "phi3_default_window": (Phi3Config(**PHI3, max_position_embeddings=512, sliding_window=48), [SEQ]),
        # Phi-3-mini-128k style: top-level original_max_position_embeddings, factors in rope_scaling,
        # half the head rotated (Phi-4-mini style), every layer sliding
        "phi3_longrope_partial": (Phi3Config(**PHI3, max_position_embeddings=256, original_max_position_embeddings=L0,
                                             partial_rotary_factor=0.5, sliding_window=100,
                                             rope_scaling={"type": "longrope", "short_factor": s8,
                                                           "long_factor": l8}), [L0, L0 + 1, SEQ]),
    }


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory):
    """{name: (dir, HF model, seq lens, f32 model file)}, built lazily."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg, lens = parity_cases()[name]
            d = tmp_path_factory.mktemp(name)
            model = build_hf(name, cfg, d / "hf")
            cache[name] = (d, model, lens, export(d / "hf", d / "f32.bin", "f32"))
        return cache[name]
    return get


IDS = torch.randint(0, 256, (SEQ,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.mark.parametrize("name", list(parity_cases()))
def test_logits_match_hf(parity_models, name):
    d, _, lens, model_file = parity_models(name)
    model = fresh(d / "hf")  # dynamic NTK keeps state between calls: lens go shortest first, as one process each
    refs = []
    for n in lens:
        ids = IDS[:n]
        ref = hf_logits(model, ids)
        got = engine(model_file, ids, d / f"logits_{n}.f32")
        err = rel_logits(got, ref)
        print(f"\n[{name}, prefill {n}, L0 {L0}] max |err| {np.abs(got - ref).max():.3g}, relative {err:.3g}")
        assert err <= LOGIT_BOUND
        refs.append(ref)
    if len(refs) > 1:  # the first two lengths straddle the switch: HF's tables differ for the same positions
        n = len(refs[0])
        assert np.abs(refs[1][:n] - refs[0]).max() > 1e-3 * np.abs(refs[0]).max(), f"{name}: no switch at {lens[:2]}"


@pytest.mark.parametrize("name", ["dynamic", "longrope_llama"])
def test_chunked_prefill_matches_hf_calls(parity_models, name):
    """Prefill in chunks of 50 = HF forward calls of 50 tokens with a KV cache: each call sees
    seq_len = its last position + 1 (dynamic grows its base, longrope switches to the long list at
    the second call) and the keys already cached keep the rotation they were written with."""
    from transformers import DynamicCache
    d, _, _, model_file = parity_models(name)
    model, chunk = fresh(d / "hf"), 50
    cache, refs = DynamicCache(config=model.config), []
    with torch.no_grad():
        for a in range(0, SEQ, chunk):
            out = model(torch.tensor([IDS[a:a + chunk]]), past_key_values=cache, use_cache=True)
            refs.append(out.logits[0].numpy())
    ref = np.concatenate(refs)
    got = engine(model_file, IDS, d / "chunked.f32", "--chunk", chunk)
    whole = engine(model_file, IDS, d / "whole.f32")
    err = rel_logits(got, ref)
    print(f"\n[{name}, chunks of {chunk}] vs HF calls of {chunk}: relative {err:.3g}; "
          f"vs one call: {rel_logits(got, whole):.3g}")
    assert err <= LOGIT_BOUND
    assert rel_logits(got, whole) > 1e-3  # chunking really changes the result for these types


DECODE_PROMPT, DECODE_END = 40, 120  # a prompt inside L0 = 64, then one token per call to past it


@contextlib.contextmanager
def torch_one_thread():
    """For many calls of one token on a tiny model: torch's threads then only wait for each
    other (on a shared 2-core machine 120 such calls took 20 s with 2 threads, 0.5 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hf_by_calls(hf_dir, ids, first, frozen=False):
    """HF's logits of ids fed as one call of `first` tokens, then one call per token, through a
    DynamicCache (what generate() does). Each call recomputes the tables for its seq_len = last
    position + 1 (HF's dynamic_rope_update). frozen: the rotary embedding keeps its first table,
    as an engine that skipped the update for one-token calls would."""
    from transformers import DynamicCache
    model = fresh(hf_dir)  # dynamic NTK keeps state between calls: a new model each time
    if frozen:
        model.model.rotary_emb.rope_type = "default"  # dynamic_rope_update then leaves inv_freq
    cache, out = DynamicCache(config=model.config), []
    calls = [(0, first)] + [(p, p + 1) for p in range(first, len(ids))]
    with torch.no_grad(), torch_one_thread():
        for a, b in calls:
            logits = model(torch.tensor([ids[a:b]]), past_key_values=cache, use_cache=True).logits
            out.append(logits[0].numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("name", ["dynamic", "longrope_llama", "phi3_longrope_partial"])
def test_decode_token_by_token_matches_hf(parity_models, name):
    """Decode past L0 one token per forward call (T = 1), where dynamic NTK grows its base at
    every step and LongRoPE switches to the long list at position L0:
    (a) -m logits --chunk 1 (every position its own call) = HF calls of one token, all logits;
    (b) -m generate -t 0 after a 40-token prompt: every chosen token is HF's argmax (or within
        the bound of it: a near tie) along the same calls, and the ids are HF generate()'s up
        to the first near tie (for Phi-3 up to L0, see below)."""
    d, _, _, model_file = parity_models(name)
    ids = IDS[:DECODE_END]
    # --threads 1 here and below: 120 one-token calls on a tiny model (threads only wait there)
    got = engine(model_file, ids, d / "decode.f32", "--chunk", 1, "--threads", 1)
    ref = hf_by_calls(d / "hf", ids, 1)
    stale = hf_by_calls(d / "hf", ids, 1, frozen=True)
    err, stale_err = rel_logits(got, ref), rel_logits(stale, ref)
    print(f"\n[{name}, {DECODE_END} tokens one per call] vs HF calls of one: relative {err:.3g} "
          f"(bound {LOGIT_BOUND}); HF with its first table kept: {stale_err:.3g}")
    assert err <= LOGIT_BOUND
    assert stale_err > 10 * LOGIT_BOUND  # the per-call update really matters here

    prompt, n_new = ids[:DECODE_PROMPT], DECODE_END - DECODE_PROMPT
    r = run(model_file, "-m", "generate", "--ids", "-i", " ".join(map(str, prompt)), "-n", n_new,
            "-t", 0, "-c", DECODE_END, "--threads", 1)
    chosen = [int(x) for x in r.stdout.split()]
    assert len(chosen) == n_new, r.stdout
    ref = hf_by_calls(d / "hf", prompt + chosen, DECODE_PROMPT)[DECODE_PROMPT - 1:-1]
    gap = ref.max(-1) - ref[np.arange(n_new), chosen]  # how far below HF's best each choice is
    tol = LOGIT_BOUND * np.abs(ref).max()
    model = fresh(d / "hf")
    x = torch.tensor([prompt])
    with torch.no_grad(), torch_one_thread():
        hf_ids = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                max_new_tokens=n_new, pad_token_id=0)[0, DECODE_PROMPT:].tolist()
    same = next((i for i, (a, b) in enumerate(zip(chosen, hf_ids)) if a != b), n_new)
    # HF's Phi3ForCausalLM.prepare_inputs_for_generation drops the cache when the text first
    # passes L0 and re-reads it all (every key then rotated with the long factors); longrun
    # keeps the cached keys, as HF's forward calls do: generate() agrees up to that step only
    agree = L0 - DECODE_PROMPT + 1 if name.startswith("phi3") else n_new
    print(f"[{name} generate] {n_new} tokens after {DECODE_PROMPT}: max gap below HF's argmax "
          f"{gap.max():.3g} (tolerance {tol:.3g}); identical to HF generate() for the first {same}")
    assert gap.max() <= tol, f"step {int(gap.argmax())}: {gap.max():.3g} below HF's best"
    assert same >= agree or gap[same] <= tol  # a divergence only at a near tie


def test_phi3_sliding_window_is_exported_and_matters(parity_models):
    """Phi3Model masks with sliding_window in eager attention: the file says so, and the window
    changes HF's own logits (so the parity above tests it)."""
    d, model, _, model_file = parity_models("phi3_default_window")
    blob = open(model_file, "rb").read()
    n_layers = ex.HEADER.unpack_from(blob, 0)[3]
    for layer in range(n_layers):
        lc = dict(zip([f for f, _ in ex.LAYER_FIELDS], ex.LAYER.unpack_from(blob, 128 + 64 * layer)))
        assert (lc["attn_kind"], lc["window"]) == (ex.ATTN_SLIDING, 48), lc
    ref = hf_logits(model, IDS)
    model.config.sliding_window = None
    try:
        full = hf_logits(model, IDS)
    finally:
        model.config.sliding_window = 48
    assert np.abs(ref[:48] - full[:48]).max() <= 1e-6 and np.abs(ref[48:] - full[48:]).max() > 1e-3


# ----------------------------------------------------------------------------
# 3. Command-line overrides = the same scaling written into config.json

OVERRIDES = [
    # (name, ./run options, the rope_parameters that must give the same logits)
    ("yarn", ["--rope-scaling", "yarn", "--rope-factor", 4, "--rope-orig-ctx", L0],
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0}),
    ("yarn_all_options", ["--rope-scaling", "yarn", "--rope-factor", 3, "--rope-orig-ctx", 48,
                          "--yarn-beta-fast", 4, "--yarn-beta-slow", 0.5, "--yarn-attn-factor", 1.25],
     {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 48, "beta_fast": 4.0,
      "beta_slow": 0.5, "attention_factor": 1.25}),
    ("linear", ["--rope-scaling", "linear", "--rope-factor", 2.5], {"rope_type": "linear", "factor": 2.5}),
    # dynamic's original length is the trained context (max_position_embeddings = 64 here)
    ("dynamic", ["--rope-scaling", "dynamic", "--rope-factor", 2], {"rope_type": "dynamic", "factor": 2.0}),
    ("llama3", ["--rope-scaling", "llama3", "--rope-factor", 8, "--rope-orig-ctx", 32],
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32}),
    ("theta", ["--rope-theta", 5e5], {"rope_type": "default", "rope_theta": 5e5}),
    ("theta_and_yarn", ["--rope-theta", 1e5, "--rope-scaling", "yarn", "--rope-factor", 8],
     {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e5, "original_max_position_embeddings": L0}),
]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A default-RoPE tiny Llama, trained context 64, its HF directory and f32 export."""
    from transformers import LlamaConfig
    d = tmp_path_factory.mktemp("override")
    build_hf("override", LlamaConfig(**COMMON, max_position_embeddings=L0), d / "hf")
    return d, export(d / "hf", d / "base.bin", "f32")


def with_rope(src, dst, rope_parameters):
    """A copy of the HF directory src (same weights) whose config.json has these rope parameters."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f != "config.json":
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["rope_parameters"] = {"rope_theta": cfg["rope_parameters"]["rope_theta"], **rope_parameters}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=1)
    return dst


@pytest.mark.parametrize("name,options,rope_parameters", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_command_line_equals_config(base_model, name, options, rope_parameters):
    d, base = base_model
    hf_dir = with_rope(d / "hf", d / f"hf_{name}", rope_parameters)
    scaled = export(hf_dir, d / f"{name}.bin", "f32")
    ids = IDS[:200]
    by_option = engine(base, ids, d / f"{name}_option.f32", *options)
    by_config = engine(scaled, ids, d / f"{name}_config.f32")
    ref = hf_logits(fresh(hf_dir), ids)
    same, err = float(np.abs(by_option - by_config).max()), rel_logits(by_config, ref)
    print(f"\n[{name}] {' '.join(map(str, options))}: |option - config| {same:.3g}; config vs HF rel err {err:.3g}")
    assert same <= 1e-6 * np.abs(by_config).max()
    assert err <= LOGIT_BOUND
    # and the override really changes something
    plain_logits = engine(base, ids, d / f"{name}_plain.f32")
    assert np.abs(plain_logits - by_option).max() > 1e-4


def test_rope_scaling_none_undoes_the_file(base_model):
    """A yarn-exported model run with --rope-scaling none is the default-RoPE model again."""
    d, base = base_model
    hf_dir = with_rope(d / "hf", d / "hf_undo", OVERRIDES[0][2])
    scaled = export(hf_dir, d / "undo.bin", "f32")
    ids = IDS[:100]
    got = engine(scaled, ids, d / "undo.f32", "--rope-scaling", "none")
    assert np.abs(got - engine(base, ids, d / "undo_base.f32")).max() == 0


# ----------------------------------------------------------------------------
# 4. export.py: config spellings, Phi-3, GGUF, refusals

def v4_spelling(cfg, legacy_type=False):
    """config.json as transformers 4.x wrote it: rope_scaling (null for default) + top-level rope_theta
    (and partial_rotary_factor / original_max_position_embeddings where the model keeps them)."""
    cfg = dict(cfg)
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    if "partial_rotary_factor" in rp:
        cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    if "original_max_position_embeddings" in cfg:  # Phi-3: top level only
        rp.pop("original_max_position_embeddings", None)
    kind = rp.pop("rope_type", None) or rp.pop("type", "default")
    rp.pop("type", None)
    cfg["rope_scaling"] = None if kind == "default" else {("type" if legacy_type else "rope_type"): kind, **rp}
    return cfg


SPELLING_CASES = ["linear", "dynamic", "yarn_betas_no_truncate", "llama3", "longrope_llama", "phi3_longrope_partial",
                  "phi3_default_window"]


@pytest.mark.parametrize("name", SPELLING_CASES)
def test_v4_and_v5_spellings_export_identically(parity_models, name):
    d, _, _, v5_file = parity_models(name)
    model = fresh(d / "hf")  # (dynamic NTK keeps state between calls: start from a new model)
    v5 = json.load(open(d / "hf" / "config.json"))
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    ids = IDS[:100]
    for legacy in (False, True):
        v4_dir = d / f"hf_v4_{legacy}"
        shutil.copytree(d / "hf", v4_dir)
        json.dump(v4_spelling(v5, legacy), open(v4_dir / "config.json", "w"), indent=1)
        v4_file = export(v4_dir, d / f"v4_{legacy}.bin", "f32")
        assert open(v4_file, "rb").read() == open(v5_file, "rb").read(), f"{name}: v4 spelling exports differently"
        # transformers reads the v4 spelling as the same model
        assert np.array_equal(hf_logits(fresh(v4_dir), ids), hf_logits(model, ids))


def test_phi3_fused_weights_are_split(parity_models):
    """blk.N.wq/wk/wv are qkv_proj's rows q | k | v, w_gate/w_up gate_up_proj's gate | up."""
    from safetensors.numpy import load_file
    d, _, _, model_file = parity_models("phi3_longrope_partial")
    hf = load_file(str(d / "hf" / "model.safetensors"))
    blob = open(model_file, "rb").read()
    n_tensors, table = ex.HEADER.unpack_from(blob, 0)[15], ex.HEADER.unpack_from(blob, 0)[16]
    tensors = {}
    for i in range(n_tensors):
        e = dict(zip([f for f, _ in ex.TENSOR_FIELDS], ex.TENSOR.unpack_from(blob, table + 80 * i)))
        tensors[e["name"].rstrip(b"\0").decode()] = np.frombuffer(blob, "<f4", e["rows"] * e["cols"],
                                                                  e["offset"]).reshape(e["rows"], -1)
    Q, K, F = 4 * 32, 2 * 32, PHI3["intermediate_size"]  # Phi3: head_dim = hidden_size / heads = 32
    for layer in range(PHI3["num_hidden_layers"]):
        qkv = hf[f"model.layers.{layer}.self_attn.qkv_proj.weight"]
        gate_up = hf[f"model.layers.{layer}.mlp.gate_up_proj.weight"]
        b = f"blk.{layer}."
        assert np.array_equal(tensors[b + "wq"], qkv[:Q]) and np.array_equal(tensors[b + "wk"], qkv[Q:Q + K])
        assert np.array_equal(tensors[b + "wv"], qkv[Q + K:])
        assert np.array_equal(tensors[b + "w_gate"], gate_up[:F]) and np.array_equal(tensors[b + "w_up"], gate_up[F:])
    assert tensors["rope.short_factor"].shape == (8, 1)


def export_error(source, tmp_path):
    r = subprocess.run([PYTHON, os.path.join(ROOT, "export.py"), str(source), str(tmp_path / "out.bin")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and not os.path.exists(tmp_path / "out.bin")
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_refusals(base_model, parity_models, tmp_path):
    d, _ = base_model
    # HF's Llama ignores partial_rotary_factor with default RoPE and fails with a scaled one
    msg = export_error(edited_copy(d / "hf", tmp_path / "prf", partial_rotary_factor=0.5), tmp_path)
    assert "partial_rotary_factor" in msg
    phi3 = parity_models("phi3_default_window")[0] / "hf"
    msg = export_error(edited_copy(phi3, tmp_path / "phi3_linear", rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), tmp_path)
    assert "linear" in msg and "Phi3" in msg
    msg = export_error(edited_copy(phi3, tmp_path / "phi3_short", rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0] * 15, "long_factor": [1.0] * 16, "rope_theta": 1e4}), tmp_path)
    assert "short_factor" in msg
    msg = export_error(edited_copy(d / "hf", tmp_path / "yarn0", rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "attention_factor": 0.0, "rope_theta": 1e4}), tmp_path)
    assert "attention_factor" in msg


# --- GGUF ----------------------------------------------------------------------------------

def gguf_meta(**keys):
    """A meta() like read_gguf's over a dict of 'llama.'-prefixed keys."""
    def meta(key, default=None):
        if key not in keys and default is None:
            raise ex.ExportError(f"no {key}")
        return keys.get(key, default)
    return meta


def test_gguf_rope_keys():
    base = {"llama.rope.freq_base": 1e4}
    rope, factors = ex.gguf_rope(gguf_meta(**base), 64, 2048)
    assert rope["rope_type"] == TYPES["default"] and not factors
    # the type defaults to linear in llama.cpp; an explicit "none" ignores the factor
    rope, _ = ex.gguf_rope(gguf_meta(**base, **{"llama.rope.scaling.factor": 4.0}), 64, 2048)
    assert (rope["rope_type"], rope["factor"]) == (TYPES["linear"], 4.0)
    rope, _ = ex.gguf_rope(gguf_meta(**base, **{"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}),
                           64, 2048)
    assert rope["rope_type"] == TYPES["default"]
    # linear with an attn_factor: a per-pair divisor s and a fixed scale -> the longrope form
    rope, factors = ex.gguf_rope(gguf_meta(**base, **{"llama.rope.scaling.type": "linear",
                                                      "llama.rope.scaling.factor": 4.0,
                                                      "llama.rope.scaling.attn_factor": 0.8}), 64, 2048)
    assert rope["rope_type"] == TYPES["longrope"] and rope["attention_factor"] == 0.8 and rope["factor"] == 1.0
    assert np.array_equal(factors["rope.short_factor"], np.full(32, 4.0, np.float32))
    # yarn: llama.cpp multiplies attn_factor by its own 0.1 ln s + 1
    keys = {**base, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 4096}
    rope, _ = ex.gguf_rope(gguf_meta(**keys), 64, 16384)
    assert (rope["rope_type"], rope["orig_ctx"], rope["attention_factor"]) == (TYPES["yarn"], 4096, 0.0)
    rope, _ = ex.gguf_rope(gguf_meta(**keys, **{"llama.rope.scaling.attn_factor": 0.5,
                                                "llama.rope.scaling.yarn_beta_fast": 16.0}), 64, 16384)
    assert abs(rope["attention_factor"] - 0.5 * (0.1 * np.log(4) + 1)) < 1e-12 and rope["beta_fast"] == 16.0
    for bad in [{"llama.rope.scaling.yarn_log_multiplier": 0.1}, {"llama.rope.scaling.yarn_ext_factor": 0.5}]:
        with pytest.raises(ex.ExportError):
            ex.gguf_rope(gguf_meta(**keys, **bad), 64, 16384)
    with pytest.raises(ex.ExportError, match="yarn"):
        ex.gguf_rope(gguf_meta(**keys), 64, 16384, np.ones(32, np.float32))
    with pytest.raises(ex.ExportError, match="longrope"):
        ex.gguf_rope(gguf_meta(**base, **{"llama.rope.scaling.type": "longrope"}), 64, 2048)
    with pytest.raises(ex.ExportError, match="rope_freqs"):
        ex.gguf_rope(gguf_meta(**base), 64, 2048, np.ones(31, np.float32))


def write_llama_gguf(path, model, cfg, rope_freqs=None, yarn=None):
    """A llama-architecture GGUF of an HF Llama model as llama.cpp's converter lays it out (q/k
    rows permuted to Meta's interleaved order), with a rope_freqs tensor or yarn keys."""
    import gguf
    H = cfg.head_dim

    def meta_order(w, n_head):  # HF row h*(H/2) + j -> Meta row 2j + h (llama.cpp's convert_hf_to_gguf permute)
        return w.reshape(n_head, 2, H // 2, -1).swapaxes(1, 2).reshape(w.shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(H)
    w.add_value_length(H)
    w.add_rope_dimension_count(H)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn["factor"])
        w.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for ours, theirs in [("attn_norm", "input_layernorm"), ("attn_v", "self_attn.v_proj"),
                             ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", meta_order(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", meta_order(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_rope_freqs_matches_hf_llama3(parity_models):
    """llama.cpp stores Llama 3.1 scaling as divisors ff_i = f_i / f'_i (rope_freqs.weight); the
    export gives HF's llama3 logits (one 300-token prefill)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    d, model, _, _ = parity_models("llama3")
    cfg = model.config
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, None)
    unscaled, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    ff = (unscaled.double() / scaled.double()).numpy()
    assert ff.min() == 1.0 and ff.max() == 8.0 and ((ff > 1) & (ff < 8)).sum() == 3  # every branch
    write_llama_gguf(d / "llama3.gguf", model, cfg, ff)
    model_file = export(d / "llama3.gguf", d / "gguf.bin", "f32")
    blob = open(model_file, "rb").read()
    lc = dict(zip([f for f, _ in ex.LAYER_FIELDS], ex.LAYER.unpack_from(blob, 128)))
    assert lc["rope_type"] == TYPES["longrope"] and lc["attention_factor"] == 1.0 and lc["orig_ctx"] == 256
    got = engine(model_file, IDS, d / "gguf.f32")
    ref = hf_logits(model, IDS)
    err = rel_logits(got, ref)
    print(f"\n[gguf rope_freqs vs HF llama3] max |err| {np.abs(got - ref).max():.3g}, relative {err:.3g}")
    assert err <= LOGIT_BOUND


def test_gguf_yarn_matches_hf(parity_models):
    """llama.cpp's yarn keys (type, factor, original context; beta 32/1, floor/ceil range and
    0.1 ln s + 1 implied) give HF's default YaRN."""
    d, model, _, _ = parity_models("yarn")
    write_llama_gguf(d / "yarn.gguf", model, model.config, yarn=model.config.rope_parameters)
    model_file = export(d / "yarn.gguf", d / "gguf.bin", "f32")
    got, ref = engine(model_file, IDS, d / "gguf.f32"), hf_logits(model, IDS)
    err = rel_logits(got, ref)
    print(f"\n[gguf yarn vs HF yarn] max |err| {np.abs(got - ref).max():.3g}, relative {err:.3g}")
    assert err <= LOGIT_BOUND
