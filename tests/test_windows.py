"""Windows, sinks and a bounded KV cache: sliding windows (Mistral), StreamingLLM (Xiao et al.
2023) and LM-Infinite (Han et al. 2023).

1. Model-native sliding windows against HF transformers (eager, f32): Mistral with every layer
   windowed and Qwen2 with full and windowed layers, W = 16 over 200 tokens, one prefill and token
   by token, and with the KV cache stored as f16 and q8.
2. --sinks/--window and --lminf with nothing evicted give full attention's logits.
3. StreamingLLM and LM-Infinite after eviction against references written here from the two
   papers' code (mit-han-lab/streaming-llm: StartRecentKVCache + pos-shift attention, keys
   cached before RoPE and rotated by cache slot at every step; Glaciohound/LM-Infinite: the
   Λ-shaped mask, far global keys at the capped distance), with RoPE from the HF model's rotary
   embedding: on default RoPE and on YaRN and Llama 3 scaled models (YaRN's attention factor
   applied once to every query, the sinks' too). Each reference is first checked against HF on
   a case where it must equal full attention. --lminf alone is the paper's defaults.
4. Memory stays bounded: a 200K-token stream with --sinks 4 --window 2048 peaks at the RSS of
   a 20K one, and the cache has the same number of slots.
"""
import contextlib
import re

import numpy as np
import pytest
import torch
from conftest import RUN_ASAN, engine_logits, export, need, run
from test_engine import TINY, build_hf, rel_err

SEQ = 200
F32_BOUND = 1e-5   # max |err| / max |HF|, f32 cache: up to 9.7e-7 measured (Qwen2, token by token)
KV_BOUNDS = {"f16": 2e-3, "q8": 3e-2}   # max |err| / max |HF| with the cache stored in that type


def window_configs():
    from transformers import MistralConfig, Qwen2Config
    common = TINY
    return {
        "mistral_w16": MistralConfig(**common, sliding_window=16),
        # layer 0 full, layer 1 sliding (Qwen2: layer i slides iff i >= max_window_layers)
        "qwen2_w16_mixed": Qwen2Config(**common, use_sliding_window=True, sliding_window=16, max_window_layers=1),
    }


@pytest.fixture(scope="module", params=list(window_configs()))
def windowed(request, tmp_path_factory):
    name = request.param
    cfg = window_configs()[name]
    d = tmp_path_factory.mktemp(name)
    model = build_hf(name, cfg, d / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(5))
    from transformers import AutoModelForCausalLM
    full_cfg = type(cfg)(**{**cfg.to_dict(), "sliding_window": None, "use_sliding_window": False, "layer_types": None})
    full_cfg._attn_implementation = "eager"
    full = AutoModelForCausalLM.from_config(full_cfg, dtype=torch.float32).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
        ref_full = full(ids).logits[0].numpy()   # the same weights with full attention
    assert rel_err(ref_full, ref) > 100 * F32_BOUND, "the window must change HF's answer for this test to mean anything"
    return name, export(d / "hf", d / "f32.bin"), ids[0].tolist(), ref, d


def test_native_window_matches_hf(windowed):
    name, model, ids, ref, d = windowed
    whole = engine_logits(model, ids, d)
    by_token = engine_logits(model, ids, d, chunk=1)
    err, err1 = rel_err(whole, ref), rel_err(by_token, ref)
    print(f"\n[{name}] window 16, {SEQ} tokens: one prefill {err:.3g}, token by token {err1:.3g} (bound {F32_BOUND})")
    assert err <= F32_BOUND and err1 <= F32_BOUND
    # --window above the model's own keeps the model's
    r = run(model, "-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", d / "w1000.f32", "--window", 1000)
    wide = np.fromfile(d / "w1000.f32", dtype="<f4").reshape(len(ids), -1)
    assert "window of 16 keys on" in r.stderr or "windows of 16..1000 keys" in r.stderr, r.stderr
    assert rel_err(wide, ref) <= F32_BOUND


@pytest.mark.parametrize("kv_type", ["f16", "q8"])
def test_kv_types_match_hf(windowed, kv_type):
    name, model, ids, ref, d = windowed
    got = {}
    for chunk in (None, 1):
        out = d / f"kv_{kv_type}_{chunk}.f32"
        r = run(model, "-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", out, "--kv-type", kv_type,
                *(["--chunk", chunk] if chunk else []))
        got[chunk] = np.fromfile(out, dtype="<f4").reshape(len(ids), -1)
    per_token = int(re.search(r"\((\w+), (\d+) bytes/token", r.stderr).group(2))
    err, err1 = rel_err(got[None], ref), rel_err(got[1], ref)
    print(f"\n[{name} kv {kv_type}] {per_token} bytes/token; relative max err {err:.3g}, token by token {err1:.3g} "
          f"(bound {KV_BOUNDS[kv_type]})")
    assert err <= KV_BOUNDS[kv_type] and err1 <= KV_BOUNDS[kv_type]
    assert err > 1e-7   # the values really were rounded
    kv_dim, layers = 2 * 16, 2
    assert per_token == 2 * layers * (kv_dim * 2 if kv_type == "f16" else kv_dim + 2 * 4)


# ---------------------------------------------------------------------------------------------
# References for sinks and LM-Infinite, in float64 from the HF model's weights

@contextlib.contextmanager
def reference_mode():
    """No autograd, one torch thread: the references are many tiny operations, where a second
    thread only waits (on a shared 2-core machine StreamingLLM's took 7.6 s with 2, 0.34 with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


class Reference:
    """A Llama forward pass written out (float64), with the attention rule left to the caller.
    RoPE is the HF model's own: the inverse frequencies and the attention factor (YaRN's, which
    scales cos and sin, so q and k each carry it) of its rotary embedding, whatever the scaling
    method; the methods used here (none, YaRN, Llama 3) fix them once for every length."""

    def __init__(self, hf):
        cfg = hf.config
        self.w = {k: v.detach().double() for k, v in hf.state_dict().items()}
        self.n_layers, self.n_heads, self.n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        rotary = hf.model.rotary_emb
        assert rotary.rope_type in ("default", "linear", "yarn", "llama3"), "one table, any length"
        self.inv_freq = rotary.inv_freq.double()
        self.attn_factor = float(rotary.attention_scaling)
        assert self.inv_freq.shape == (self.hd // 2,)   # the whole head rotated

    def norm(self, x, w):
        return self.w[w] * x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)

    def rope(self, x, pos):
        """x (n, heads, hd) rotated to positions pos (n,), rotate-half pairing as HF."""
        ang = torch.as_tensor(pos, dtype=torch.float64)[:, None] * self.inv_freq[None]
        cos = torch.cat([ang.cos()] * 2, -1)[:, None] * self.attn_factor
        sin = torch.cat([ang.sin()] * 2, -1)[:, None] * self.attn_factor
        half = self.hd // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def qkv(self, l, x):
        p = f"model.layers.{l}.self_attn."
        h = self.norm(x, f"model.layers.{l}.input_layernorm.weight")
        q = (h @ self.w[p + "q_proj.weight"].T).view(len(x), self.n_heads, self.hd)
        k = (h @ self.w[p + "k_proj.weight"].T).view(len(x), self.n_kv, self.hd)
        v = (h @ self.w[p + "v_proj.weight"].T).view(len(x), self.n_kv, self.hd)
        return q, k, v

    def rest_of_layer(self, l, x, att):
        p = f"model.layers.{l}."
        x = x + att.reshape(len(x), -1) @ self.w[p + "self_attn.o_proj.weight"].T
        h = self.norm(x, p + "post_attention_layernorm.weight")
        g, u = h @ self.w[p + "mlp.gate_proj.weight"].T, h @ self.w[p + "mlp.up_proj.weight"].T
        return x + (torch.nn.functional.silu(g) * u) @ self.w[p + "mlp.down_proj.weight"].T

    def logits(self, x):
        return self.norm(x, "model.norm.weight") @ self.w["lm_head.weight"].T

    def expand(self, kv):   # GQA: kv head for each query head
        return kv.repeat_interleave(self.n_heads // self.n_kv, dim=1)


def streaming_llm(ref, ids, start_size, recent_size):
    """mit-han-lab/streaming-llm, token by token: keys cached before RoPE; every step rotates the
    cache's keys by slot index 0..n-1 and the query by n-1; StartRecentKVCache then keeps the first
    start_size and last recent_size entries."""
    cache = [([], []) for _ in range(ref.n_layers)]
    out = []
    for tok in ids:
        x = ref.w["model.embed_tokens.weight"][[tok]]
        for l in range(ref.n_layers):
            q, k, v = ref.qkv(l, x)
            keys, values = cache[l]
            keys.append(k[0]), values.append(v[0])
            n = len(keys)
            K = ref.expand(ref.rope(torch.stack(keys), range(n)))     # (n, heads, hd)
            V = ref.expand(torch.stack(values))
            qr = ref.rope(q, [n - 1])[0]                               # (heads, hd)
            p = torch.softmax(torch.einsum("hd,nhd->hn", qr, K) / ref.hd ** 0.5, -1)
            x = ref.rest_of_layer(l, x, torch.einsum("hn,nhd->hd", p, V)[None])
        out.append(ref.logits(x)[0])
        for keys, values in cache:   # StartRecentKVCache.__call__ after the step
            if len(keys) > start_size + recent_size:
                keys[:] = keys[:start_size] + keys[len(keys) - recent_size:]
                values[:] = values[:start_size] + values[len(values) - recent_size:]
    return torch.stack(out).numpy()


def lm_infinite(ref, ids, n_global, local, limit):
    """Glaciohound/LM-Infinite's Λ attention over the whole text (keys at true positions): key k is
    local if q - k < local (normal RoPE), else global if k < n_global (query rotated at the capped
    distance against the key rotated at 0: unturned, but scaled by the attention factor as every
    key is), else masked; one softmax over both branches."""
    n = len(ids)
    pos = torch.arange(n)
    x = ref.w["model.embed_tokens.weight"][ids]
    dist = pos[:, None] - pos[None, :]
    is_local = (dist >= 0) & (dist < local)
    is_global = (dist >= local) & (pos[None, :] < n_global)
    for l in range(ref.n_layers):
        q, k, v = ref.qkv(l, x)
        K, V = ref.expand(k), ref.expand(v)
        s_local = torch.einsum("qhd,khd->hqk", ref.rope(q, pos), ref.rope(K, pos))
        q_capped, k_at_0 = ref.rope(q, torch.clamp(pos, max=limit)), ref.rope(K, 0 * pos)
        s_global = torch.einsum("qhd,khd->hqk", q_capped, k_at_0)
        s = torch.where(is_local, s_local, torch.where(is_global, s_global, torch.tensor(-torch.inf, dtype=s_local.dtype)))
        p = torch.softmax(s / ref.hd ** 0.5, -1)
        x = ref.rest_of_layer(l, x, torch.einsum("hqk,khd->qhd", p, V))
    return ref.logits(x).numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig
    cfg = LlamaConfig(**TINY, rope_theta=10000.0)
    d = tmp_path_factory.mktemp("llama_sinks")
    hf = build_hf("llama_sinks", cfg, d / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        hf_logits = hf(ids).logits[0].numpy()
    return Reference(hf), export(d / "hf", d / "f32.bin"), ids[0].tolist(), hf_logits, d


def engine(model, ids, d, *args, chunk=None, name="x", binary=None):
    out = d / f"{name}_{chunk}.f32"
    r = run(model, "-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", out, *args,
            *(["--chunk", chunk] if chunk else []), binary=binary)
    return np.fromfile(out, dtype="<f4").reshape(len(ids), -1), r.stderr


def test_references_equal_hf_without_eviction(llama):
    ref, _, ids, hf_logits, _ = llama
    with reference_mode():
        a = streaming_llm(ref, ids, 4, SEQ)                     # the cache never fills
        b = lm_infinite(ref, ids, 4, SEQ, SEQ)                  # every key is local
    print(f"\n[references vs HF] StreamingLLM {rel_err(a, hf_logits):.3g}, LM-Infinite {rel_err(b, hf_logits):.3g}")
    assert rel_err(a, hf_logits) <= 1e-5 and rel_err(b, hf_logits) <= 1e-5


@pytest.mark.parametrize("args", [["--sinks", 4, "--window", SEQ + 10], ["--lminf", "--sinks", 4, "--window", SEQ]])
def test_nothing_evicted_is_full_attention(llama, args):
    _, model, ids, hf_logits, d = llama
    full = engine_logits(model, ids, d)
    got, _ = engine(model, ids, d, *args, name="noevict")
    print(f"\n[{' '.join(map(str, args))}] vs full attention: max |diff| {np.abs(got - full).max():.3g}")
    assert np.abs(got - full).max() <= 1e-6
    assert rel_err(got, hf_logits) <= F32_BOUND


# (start, recent): StreamingLLM's sizes; the engine's window counts the query too: W = recent + 1
@pytest.mark.parametrize("start,recent", [(4, 23), (1, 40), (7, 9)])
def test_streaming_llm_matches_reference(llama, start, recent):
    ref, model, ids, hf_logits, d = llama
    with reference_mode():
        want = streaming_llm(ref, ids, start, recent)
    for chunk in (1, 7, None):
        got, stderr = engine(model, ids, d, "--sinks", start, "--window", recent + 1, chunk=chunk, name="sll")
        err = rel_err(got, want)
        print(f"\n[StreamingLLM {start} sinks + {recent} recent, chunk {chunk or 'all'}] max err {err:.3g}; "
              f"vs full attention {rel_err(got, hf_logits):.3g}")
        assert err <= F32_BOUND
    # the banner: the sinks, and a cache holding the whole text (sized to what the run reaches)
    reach = re.search(r"; context (\d+) tokens", stderr)
    assert f"+ {start} sinks" in stderr and reach and int(reach.group(1)) >= len(ids), stderr
    got, _ = engine(model, ids, d, "--sinks", start, "--window", recent + 1, "--kv-type", "q8", chunk=5, name="asan",
                    binary=need(RUN_ASAN, "make run-asan"))   # the sanitizer build, through the q8 cache
    assert rel_err(got, want) <= KV_BOUNDS["q8"]
    assert rel_err(want, hf_logits) > 10 * F32_BOUND   # eviction changed the answer


@pytest.mark.parametrize("n_global,local,limit", [(5, 32, 32), (10, 48, 20), (1, 16, 16)])
def test_lm_infinite_matches_reference(llama, n_global, local, limit):
    ref, model, ids, hf_logits, d = llama
    with reference_mode():
        want = lm_infinite(ref, ids, n_global, local, limit)
    for chunk in (1, 7, None):
        got, stderr = engine(model, ids, d, "--lminf", "--sinks", n_global, "--window", local, "--lminf-limit", limit,
                             chunk=chunk, name="lminf")
        err = rel_err(got, want)
        print(f"\n[LM-Infinite global {n_global}, local {local}, limit {limit}, chunk {chunk or 'all'}] max err {err:.3g}")
        assert err <= F32_BOUND
    assert f"{n_global} global tokens at distance min(pos, {limit})" in stderr
    assert rel_err(want, hf_logits) > 10 * F32_BOUND


# --- the same rules on RoPE-scaled models ------------------------------------------------------
# A sink's or a global key's query is rotated a second time: with YaRN its attention factor a
# must scale that query once (every score carries a^2, as in full attention), never twice.

SCALED_L0, SCALED_CTX = 32, 128   # original and trained context of the scaled models, both < SEQ
# Tiny models, calls of 1..200 tokens: a second thread only waits, and on a busy machine that
# costs 100x (the other tests run ./run's threaded paths)
ONE_THREAD = ["--threads", 1]
SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0},   # a = 0.1 ln 4 + 1 = 1.139
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0},
}


@pytest.fixture(scope="module", params=list(SCALINGS))
def scaled(request, tmp_path_factory):
    """A tiny Llama with this RoPE scaling (trained context 128 from 32): (name, its reference,
    its export, ids, HF logits, dir)."""
    from transformers import LlamaConfig
    name = request.param
    rope = {**SCALINGS[name], "original_max_position_embeddings": SCALED_L0, "rope_theta": 10000.0}
    cfg = LlamaConfig(**{**TINY, "max_position_embeddings": SCALED_CTX}, rope_parameters=rope)
    d = tmp_path_factory.mktemp(f"scaled_{name}")
    hf = build_hf(f"scaled_{name}", cfg, d / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(11))
    with reference_mode():
        hf_logits = hf(ids).logits[0].numpy()
    return name, Reference(hf), export(d / "hf", d / "f32.bin"), ids[0].tolist(), hf_logits, d


def test_scaled_references_equal_hf_without_eviction(scaled):
    """The references with HF's scaled table and attention factor are HF's model."""
    name, ref, _, ids, hf_logits, _ = scaled
    hd = ref.hd
    plain = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    scaling = float((plain / ref.inv_freq).max())
    with reference_mode():
        a = streaming_llm(ref, ids, 4, SEQ)                     # the cache never fills
        b = lm_infinite(ref, ids, 4, SEQ, SEQ)                  # every key is local
    print(f"\n[{name} references vs HF] a = {ref.attn_factor:.4f}, lowest frequency / "
          f"{scaling:.3g}: "
          f"StreamingLLM {rel_err(a, hf_logits):.3g}, LM-Infinite {rel_err(b, hf_logits):.3g}")
    assert rel_err(a, hf_logits) <= 1e-5 and rel_err(b, hf_logits) <= 1e-5
    assert scaling > 3.9 and (name != "yarn" or ref.attn_factor > 1.1)   # really scaled


SCALED_RULES = {   # name: (./run options, reference)
    "StreamingLLM": (["--sinks", 4, "--window", 24],
                     lambda ref, ids: streaming_llm(ref, ids, 4, 23)),
    "LM-Infinite": (["--lminf", "--sinks", 10, "--window", 48, "--lminf-limit", 20],
                    lambda ref, ids: lm_infinite(ref, ids, 10, 48, 20)),
}


@pytest.mark.parametrize("rule", list(SCALED_RULES))
def test_scaled_sinks_match_reference(scaled, rule):
    """Sinks and LM-Infinite's global keys on a scaled model, as prefill, in chunks and token by
    token, against the reference with HF's inverse frequencies and attention factor."""
    name, ref, model, ids, hf_logits, d = scaled
    options, reference = SCALED_RULES[rule]
    with reference_mode():
        want = reference(ref, ids)
    for chunk in (1, 7, None):
        got, _ = engine(model, ids, d, *options, *ONE_THREAD, chunk=chunk, name=rule)
        err = rel_err(got, want)
        print(f"\n[{name}: {rule} {' '.join(map(str, options))}, chunk {chunk or 'all'}] max err "
              f"{err:.3g} (bound {F32_BOUND}); vs full attention {rel_err(got, hf_logits):.3g}")
        assert err <= F32_BOUND
    assert rel_err(want, hf_logits) > 10 * F32_BOUND   # eviction changed the answer


def test_lminf_defaults(scaled):
    """--lminf alone is LM-Infinite with Han et al.'s defaults: 10 global tokens, the local
    window and the distance cap both the trained context (128 here, on a 200-token text):
    the logits of those values given explicitly, the reference's, and the banner says them."""
    name, ref, model, ids, hf_logits, d = scaled
    alone, banner = engine(model, ids, d, "--lminf", *ONE_THREAD, chunk=7, name="lminf_alone")
    explicit, _ = engine(model, ids, d, "--lminf", "--sinks", 10, "--window", SCALED_CTX,
                         "--lminf-limit", SCALED_CTX, *ONE_THREAD, chunk=7, name="lminf_explicit")
    with reference_mode():
        want = lm_infinite(ref, ids, 10, SCALED_CTX, SCALED_CTX)
    err = rel_err(alone, want)
    diff, evicted = np.abs(alone - explicit).max(), rel_err(want, hf_logits)
    print(f"\n[{name} --lminf] vs explicit defaults: max |diff| {diff:.3g}; vs reference {err:.3g} "
          f"(bound {F32_BOUND}); vs full attention {evicted:.3g}")
    assert diff == 0, "--lminf alone is not the documented defaults"
    assert err <= F32_BOUND
    assert evicted > 10 * F32_BOUND   # the defaults evict on this text
    assert (f"attention: window of {SCALED_CTX} keys on 2 of 2 layers + 10 global tokens at "
            f"distance min(pos, {SCALED_CTX}) (LM-Infinite)") in banner, banner


def test_context_full_goes_on_as_streaming_llm(llama):
    """generate with no window and -c C keeps going past C as 4 sinks + window (the documented
    policy): with a one-token prompt (chunk 1) that is exactly --sinks 4 --window C-4."""
    _, model, ids, _, _ = llama
    c, n = 40, 100
    r = run(model, "-m", "generate", "--ids", "-i", ids[0], "-n", n, "-t", 0, "-c", c)
    same = run(model, "-m", "generate", "--ids", "-i", ids[0], "-n", n, "-t", 0, "--sinks", 4, "--window", c - 4)
    assert len(r.stdout.split()) == n
    assert "context full: going on with 4 sinks + a window of 36" in r.stderr
    assert r.stdout.split() == same.stdout.split()


def peak_rss(stderr):
    return float(re.search(r"peak RSS (\d+) MB", stderr).group(1))


def test_memory_bounded_over_200k_tokens(llama, tmp_path):
    """A 200K-token text streamed through -m ppl with --sinks 4 --window 2048 peaks at the RSS of a 20K one
    (within 4 MB: the text and its ids are held whole), with the same number of cache slots; generate
    runs 40K tokens, far past the window and the trained context, in the memory of 4K (within 1 MB)."""
    _, model, ids, _, _ = llama
    ppl, gen = {}, {}
    for n in (20_000, 200_000):
        text = tmp_path / f"ids_{n}.txt"
        text.write_text(" ".join(str(i * 7 % 320) for i in range(n)))
        p = run(model, "-m", "ppl", "--ids", "-f", text, "--sinks", 4, "--window", 2048, "--threads", 1)
        assert f"over {n - 1} predicted tokens" in p.stdout
        ppl[n] = (peak_rss(p.stdout), re.search(r"(\d+) slots in all", p.stderr).group(1))
    for n in (4_000, 40_000):
        r = run(model, "-m", "generate", "--ids", "-i", ids[0], "-n", n, "-t", 0, "--sinks", 4, "--window", 2048,
                "--threads", 1)
        assert len(r.stdout.split()) == n
        gen[n] = peak_rss(r.stderr)
    print(f"\n[stream] ppl 20K -> 200K tokens: peak RSS {ppl[20_000][0]:.0f} -> {ppl[200_000][0]:.0f} MB, cache slots "
          f"{ppl[20_000][1]} -> {ppl[200_000][1]}; generate 4K -> 40K tokens: {gen[4_000]:.0f} -> {gen[40_000]:.0f} MB")
    assert ppl[20_000][1] == ppl[200_000][1]
    assert abs(ppl[200_000][0] - ppl[20_000][0]) <= 4
    assert abs(gen[40_000] - gen[4_000]) <= 1
