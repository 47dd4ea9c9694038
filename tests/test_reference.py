"""The fast kernels against the plain reference blocks of run.c (`--reference`: matmul_reference()
and attention_reference(), a row dot per output and a softmax over exactly the keys a query may
see). The same ./run computes the logits both ways, in chunks (the attention tiles) and token by
token (Flash-Decoding; 300 tokens, so full attention's decode splits its keys into two ranges),
on every tiny model family the suite builds with transformers, for every KV cache type and every
attention kind: full, a window, StreamingLLM sinks + window, LM-Infinite. f32 weights, so with
an f32 cache the only differences are summation order: within 1e-5 of the largest logit
(measured: at most 1.8e-6).

An f16 or q8 cache adds one step that is not the kernels': the two runs compute each key and
value row with different matmuls (float partial sums against double sums), ~1e-7 of the row apart,
and round it to the cache's type; the few elements that lie that close to a rounding midpoint are
stored one step apart (f16: one ulp, on 0.1-0.3% of the elements here; q8: one step of max/127,
on 0-5 elements per run), and the logits show it. An instrumented build that gave the fast run
the reference's rounding of exactly those elements brought every f16 and q8 cell within 1.5e-6,
so that is the whole difference. Such a flip moves one stored element by one step where the
rounding itself moves every element by up to half a step, so a flip costs a fraction of what
storing the cache in that type costs at all: that cost, the reference's own logits with the
cache in that type against an f32 cache, is their bound, on top of 1e-5. Measured (7 families x
4 kinds x 3 token sequences, built as ./run is, with -ffp-contract=off and portable -O2): f16 up
to 2.7e-4, 0.43 of it; q8 up to 2.1e-3, 0.22 of it. (tests/kernel_driver.c holds the attention
kernels to 1e-5 against attention_reference() itself on one f16 or q8 cache, with sinks and
LM-Infinite, where both read the same stored rows.)"""
import numpy as np
import pytest
from conftest import engine_logits, export, run
from test_engine import TINY, build_hf, rel_err

BOUND = 1e-5
SEQ = 300
KV_TYPES = ["f32", "f16", "q8"]
ATTENTION = {
    "full": [],
    "window": ["--window", 16],
    "sinks": ["--sinks", 4, "--window", 16],
    "lminf": ["--lminf", "--sinks", 5, "--window", 24, "--lminf-limit", 12],
}


def families():
    """The architectures and shapes test_engine.py, test_windows.py and test_rope.py build (its
    odd-sized q8_0 mix and the unwindowed Mistral add nothing at f32 weights)."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config
    return {
        "llama_gqa": LlamaConfig(**TINY, rope_theta=5e5),
        # head_dim 24 != hidden / heads, one kv head, vocab 301, tied classifier
        "llama_tied_odd": LlamaConfig(**{**TINY, "hidden_size": 72, "num_attention_heads": 3,
                                         "head_dim": 24, "num_key_value_heads": 1,
                                         "vocab_size": 301, "intermediate_size": 100},
                                      tie_word_embeddings=True),
        "mistral_window16": MistralConfig(**TINY, sliding_window=16),
        "qwen2_bias": Qwen2Config(**TINY, rope_theta=1e6),
        # layer 0 full, layer 1 sliding
        "qwen2_w16_mixed": Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16,
                                       max_window_layers=1),
        "qwen3_qk_norm": Qwen3Config(**{**TINY, "head_dim": 24}, tie_word_embeddings=True),
        # fused qkv and gate_up, half the head rotated, head_dim 64 (decode's 64-channel
        # value loop), one kv head
        "phi3_partial": Phi3Config(**{**TINY, "hidden_size": 128, "num_attention_heads": 2,
                                      "num_key_value_heads": 1}, partial_rotary_factor=0.5,
                                   sliding_window=None, pad_token_id=None, bos_token_id=None,
                                   eos_token_id=None),
    }


@pytest.fixture(scope="module", params=list(families()))
def family(request, tmp_path_factory):
    """(name, f32 model file, token ids): each family built and exported once."""
    name = request.param
    cfg = families()[name]
    d = tmp_path_factory.mktemp(name)
    build_hf(name, cfg, d / "hf")
    ids = [int(i) for i in np.random.default_rng(3).integers(0, cfg.vocab_size, SEQ)]
    return name, export(d / "hf", d / "f32.bin", "f32"), ids


def logits(model, ids, tmp_path, *args, chunk=None):
    """One thread: the same sums (no kernel's result depends on the thread count), and no
    OpenMP threads spinning for a core on a busy machine."""
    return engine_logits(model, ids, tmp_path, chunk, extra=["--threads", 1, *args])


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_kernels_equal_the_reference(family, tmp_path, kind):
    name, model, ids = family
    # the reference blocks give the same bits however the text is chunked: one run serves both
    ref = {kv: logits(model, ids, tmp_path, *ATTENTION[kind], "--kv-type", kv, "--reference")
           for kv in KV_TYPES}
    failures = []
    for kv in KV_TYPES:
        # what storing the cache in this type costs the reference (0 for f32)
        rounding = rel_err(ref[kv], ref["f32"])
        for chunk in (7, 1):   # tiles over chunks of 7; one row at a time: the decode path
            fast = logits(model, ids, tmp_path, *ATTENTION[kind], "--kv-type", kv, chunk=chunk)
            err = rel_err(fast, ref[kv])
            print(f"\n[reference] {name} {kind} {kv} chunk {chunk}: {err:.2e} "
                  f"(cache rounding {rounding:.1e})")
            if err > BOUND + rounding:
                failures.append(f"{kv} chunk {chunk}: {err:.2e} > {BOUND} + {rounding:.1e}")
        assert not np.array_equal(fast, ref[kv]), "--reference must be another code path"
    assert not failures, f"{name} {kind}: " + "; ".join(failures)


def test_smollm2_kernels_equal_the_reference(smollm2_gguf, tmp_path):
    model = export(smollm2_gguf, tmp_path / "smol-f32.bin", "f32")
    ids = [i * 97 % 49152 for i in range(1, 41)]
    out = {"ref": logits(model, ids, tmp_path, "--reference"),
           "chunk": logits(model, ids, tmp_path, chunk=16),
           "decode": logits(model, ids, tmp_path, chunk=1)}
    ref = out["ref"]
    for name in ("chunk", "decode"):
        err = rel_err(out[name], ref)
        print(f"\n[reference] SmolLM2 f32 {name}: {err:.2e}")
        assert err <= BOUND


def test_reference_banner(family, tmp_path):
    """The run says which blocks it used."""
    r = run(family[1], "-m", "logits", "-i", "1 2 3", "--logits-out", tmp_path / "x.f32",
            "--reference")
    assert "plain reference loops" in r.stderr
