"""Engine parity with HF transformers on tiny random-init models of every supported architecture.

Each model is built with transformers (float32, eager attention, fixed seed, every norm and bias
randomised so a mistake in them shows), saved with save_pretrained, exported with export.py, and
run through ./run -m logits. The reference is HF's own forward pass on the same weights: for the
f16, bf16 and q8_0 exports, on the weights as those files store them (rounded or quantized by the
rule each type documents, in the test), so every type is held to about the f32 bound.
"""
import numpy as np
import pytest
import torch
from conftest import RUN_ASAN, engine_logits, export, need, run, stored_dtypes

SEQ = 220          # tokens per test sequence
F32_BOUND = 1e-5   # max |engine - HF| / max |HF| at f32 (measured: at most ~2e-6)
# Each stored type against HF run on the weights as that type stores them (torch's f16 / bf16
# conversions, or the q8_0 rule in q8_0_dequantized). f16 and bf16 weights convert to f32
# exactly, so the f32 bound holds; q8_0 matrices meet activations rounded to int16 steps per
# 32-block in the engine (a relative step of 1/32767): measured up to 1e-4 (a truncating
# quantizer: ~2e-2).
BOUNDS = {"f16": F32_BOUND, "bf16": F32_BOUND, "q8_0": 2e-4}


# The shape every tiny test model starts from (test_windows.py uses it too)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=512, initializer_range=0.08, rms_norm_eps=1e-5)


def tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    common = TINY
    return {
        "llama_gqa": LlamaConfig(**common, rope_theta=5e5),
        # odd sizes: head_dim 24 != hidden/heads, one kv head, vocab 301, tied classifier
        "llama_tied_odd": LlamaConfig(**{**common, "hidden_size": 72, "num_attention_heads": 3, "head_dim": 24,
                                         "num_key_value_heads": 1, "vocab_size": 301, "intermediate_size": 100},
                                      tie_word_embeddings=True),
        # head_dim 24 != hidden 64 / 4 heads, untied, odd vocab: at q8_0 the matrices whose column count
        # is a multiple of 32 are quantised and w_down (100 cols) stays f32, so one forward pass mixes
        # storage types (llama_tied_odd, all 72 or 100 columns, has no q8_0-able matrix at all)
        "llama_odd_mixed": LlamaConfig(**{**common, "head_dim": 24, "vocab_size": 301, "intermediate_size": 100}),
        "mistral": MistralConfig(**common, sliding_window=None),
        "mistral_window16": MistralConfig(**common, sliding_window=16),   # every layer sees 16 keys
        "qwen2": Qwen2Config(**common, rope_theta=1e6),
        "qwen3": Qwen3Config(**{**common, "head_dim": 24}, tie_word_embeddings=True),
    }


def build_hf(name, cfg, path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(sum(map(ord, name)))
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():   # HF initialises norms to 1 and biases to 0: randomise them
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(tiny_configs()))
def tiny(request, tmp_path_factory):
    name = request.param
    cfg = tiny_configs()[name]
    d = tmp_path_factory.mktemp(name)
    model = build_hf(name, cfg, d / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    return name, d, ids[0].tolist(), ref


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_f32_matches_hf(tiny):
    name, d, ids, ref = tiny
    model = export(d / "hf", d / "f32.bin", "f32")
    got = engine_logits(model, ids, d)
    err = rel_err(got, ref)
    print(f"\n[{name} f32] max |err| {np.abs(got - ref).max():.3g}, relative {err:.3g} over {SEQ} positions")
    assert err <= F32_BOUND


def q8_0_dequantized(w):
    """A matrix as a q8_0 file holds it, by the rule README and export.py document: per row,
    each block of 32 values x shares the scale d = max|x| / 127 (float32) and stores
    q = round(x / d) (to nearest, ties to even; an all-zero block stays 0); read back as q d."""
    blocks = w.reshape(w.shape[0], -1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.rint(blocks / np.where(d > 0, d, np.float32(1)))
    return (q * d).reshape(w.shape)


def hf_on_stored_weights(d, dtype, ids):
    """HF's logits with every matrix as a dtype file stores it: rounded to float16 / bfloat16
    (torch's .to() rounds to nearest even), or q8_0-quantized where the columns split into
    32-blocks (the others stay f32, as export.py leaves them); vectors stay f32."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():  # a tied embedding is one parameter: rounded once
            if p.ndim != 2:
                continue
            if dtype == "q8_0":
                if p.shape[1] % 32 == 0:
                    p.copy_(torch.from_numpy(q8_0_dequantized(p.numpy())))
            else:
                p.copy_(p.to({"f16": torch.float16, "bf16": torch.bfloat16}[dtype]).float())
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_stored_types_match_hf(tiny, dtype):
    name, d, ids, unrounded = tiny
    model = export(d / "hf", d / f"{dtype}.bin", dtype)
    # the file really stores that type (a silent fallback to f32 would fail the rounded
    # reference only by luck): vectors are f32; q8_0 falls back to f32 only where the columns
    # do not split into 32-blocks
    stored = stored_dtypes(model)
    for tname, (t, rows, cols) in stored.items():
        want = "f32" if cols == 1 or (dtype == "q8_0" and cols % 32) else dtype
        assert t == want, f"{tname} ({rows} x {cols}) is stored as {t}, expected {want}"
    n_mat = sum(c > 1 for _, _, c in stored.values())
    n_typed = sum(c > 1 and t == dtype for t, _, c in stored.values())
    got = engine_logits(model, ids, d)
    ref = hf_on_stored_weights(d, dtype, ids)
    err = rel_err(got, ref)
    print(f"\n[{name} {dtype}] {n_typed}/{n_mat} matrices {dtype}; relative max err {err:.3g} "
          f"against HF on the stored weights (bound {BOUNDS[dtype]}), "
          f"{rel_err(got, unrounded):.3g} against HF on the f32 ones")
    assert err <= BOUNDS[dtype]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_pass(tiny, chunk):
    """Chunks of 1 (token-by-token decode), 7 and 64 give the logits of one whole pass."""
    name, d, ids, _ = tiny
    model = d / "f32.bin"
    if not model.exists():
        export(d / "hf", model, "f32")
    whole = engine_logits(model, ids, d)
    got = engine_logits(model, ids, d, chunk=chunk)
    err = float(np.abs(got - whole).max())
    print(f"\n[{name}] chunk {chunk} vs one pass: max |diff| {err:.3g}")
    assert err <= 1e-5


def test_sanitizer_build_matches(tiny):
    """The ASan/UBSan build runs the same forward pass cleanly, chunked, with the same logits."""
    name, d, ids, ref = tiny
    model = d / "f32.bin"
    if not model.exists():
        export(d / "hf", model, "f32")
    got = engine_logits(model, ids[:64], d, chunk=5, binary=need(RUN_ASAN, "make run-asan"))
    assert rel_err(got, ref[:64]) <= F32_BOUND


def f32_model(d):
    model = d / "f32.bin"
    if not model.exists():
        export(d / "hf", model, "f32")
    return model


GEN_PROMPT, GEN_N = 100, 64


def test_greedy_generation_matches_hf(tiny):
    """-m generate --ids -t 0 picks HF's argmax at every step (prompt of 100 ids, 64 new tokens, which
    crosses the 16-key window of mistral_window16 in the decode path). Judged by HF's logits over
    prompt + generated ids, so a near-tie (|gap| below the f32 bound) may go either way."""
    name, d, ids, _ = tiny
    from transformers import AutoModelForCausalLM
    prompt = ids[:GEN_PROMPT]
    r = run(f32_model(d), "-m", "generate", "--ids", "-i", " ".join(map(str, prompt)), "-n", GEN_N, "-t", 0)
    got = [int(x) for x in r.stdout.split()]
    assert len(got) == GEN_N, f"expected {GEN_N} ids on stdout, got {len(got)}: {r.stdout[:200]!r}"
    model = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(torch.tensor([prompt + got])).logits[0, GEN_PROMPT - 1:-1].numpy()
        # an explicit all-ones mask: otherwise generate() takes every id equal to pad_token_id for padding
        x = torch.tensor([prompt])
        hf_gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=GEN_N,
                                pad_token_id=0)[0, GEN_PROMPT:].tolist()
    gap = ref.max(-1) - ref[np.arange(GEN_N), got]     # how far below HF's best each chosen token is
    tol = F32_BOUND * np.abs(ref).max()
    same = next((i for i, (a, b) in enumerate(zip(got, hf_gen)) if a != b), GEN_N)
    print(f"\n[{name} greedy] {GEN_N} tokens, identical to HF generate() for the first {same}; "
          f"max gap below HF's argmax {gap.max():.3g} (tolerance {tol:.3g})")
    assert gap.max() <= tol, f"step {int(gap.argmax())}: engine chose {got[gap.argmax()]}, HF's best is " \
                             f"{int(ref[gap.argmax()].argmax())}, {gap.max():.3g} higher"


def test_context_length_does_not_change_logits(tiny):
    """-c only sizes the KV cache: the trained context, just enough, or a chunk that fills it exactly give
    the same logits; one slot too few is refused with an error line (unless every layer is windowed)."""
    _, d, ids, _ = tiny
    model = f32_model(d)
    whole = engine_logits(model, ids, d)
    for c, chunk in [(len(ids), 50), (512, None)]:
        out = d / f"ctx_{c}.f32"
        args = ["-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", out, "-c", c]
        run(model, *args, *(["--chunk", chunk] if chunk else []))
        got = np.fromfile(out, dtype="<f4").reshape(len(ids), -1)
        assert np.abs(got - whole).max() <= 1e-5, f"-c {c}: max |diff| {np.abs(got - whole).max():.3g}"
    r = run(model, "-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", d / "short.f32",
            "-c", len(ids) - 1, check=False)
    if "a text of any length" in r.stderr:   # every layer windowed (mistral_window16): -c bounds nothing
        assert r.returncode == 0
        got = np.fromfile(d / "short.f32", dtype="<f4").reshape(len(ids), -1)
        assert np.abs(got - whole).max() <= 1e-5
    else:
        assert r.returncode == 1 and r.stderr.startswith("error:"), f"exit {r.returncode}: {r.stderr[-500:]}"


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
@pytest.mark.parametrize("chunk", [None, 1], ids=["prefill", "decode"])
def test_threads_do_not_change_logits(tiny, chunk, dtype):
    """--threads 1 and --threads 2 give bit-identical logits over 500 tokens, in one prefill pass
    and token by token (where decode's attention cuts more than 256 keys into ranges). run.c
    guarantees it: each parallel loop splits independent outputs (weight rows, tokens, or
    (kv head, key range) jobs whose number follows the key count, not the thread count), and
    no sum runs across threads."""
    name, d, _, ref = tiny
    ids = np.random.default_rng(3).integers(0, ref.shape[1], 500).tolist()
    model = d / f"{dtype}.bin"
    if not model.exists():
        export(d / "hf", model, dtype)
    logits = {}
    for threads in (1, 2):
        out = d / f"threads_{threads}.f32"
        args = ["-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", out,
                "--threads", threads]
        run(model, *args, *(["--chunk", chunk] if chunk else []))
        logits[threads] = np.fromfile(out, dtype="<f4").reshape(len(ids), -1)
    same = np.array_equal(logits[1], logits[2])
    how = "decode" if chunk else "prefill"
    print(f"\n[{name} {dtype} {how}] --threads 2 vs 1: relative max diff "
          f"{rel_err(logits[2], logits[1]):.3g}, bit-identical: {same}")
    assert same
