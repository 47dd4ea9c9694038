"""-m chat against transformers: a scripted two-turn conversation on SmolLM2-135M-Instruct (f32 export
of the GGUF), greedy, each reply printed as ids, must equal HF generate() on the conversation built
by the model's own chat template (tokenizer.apply_chat_template); past a full context, its replies
equal an explicit --sinks 4 --window N run."""
import os
import re

import pytest
import torch
from conftest import export, run

SYSTEM = "You are a helpful assistant."   # given, as SmolLM2's template otherwise inserts its own
QUESTIONS = ["What is photosynthesis? Answer in one sentence.", "Why is it important?"]
STEPS = 60
# run.c's ChatML turn (chat_formats[CHAT_CHATML]): the first turn carries the system block; later
# turns start by closing the previous reply.
SYSTEM_FMT = "<|im_start|>system\n{}<|im_end|>\n"
USER_FMT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
CLOSE = "<|im_end|>\n"


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = tmp_path_factory.mktemp("chat")
    where, name = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return export(smollm2_gguf, d / "f32.bin", "f32"), tok, model


def template_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize(model, text):
    return [int(x) for x in run(model, "-m", "tokenize", "-i", text).stdout.split()]


def test_two_turn_chat_matches_transformers(smol):
    model, tok, hf = smol
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos == tok.eos_token_id

    # HF: the conversation through the model's template, a greedy reply per turn
    messages = [{"role": "system", "content": SYSTEM}]
    prompts, replies = [], []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        ids = template_ids(tok, messages)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=STEPS, eos_token_id=eos,
                              pad_token_id=eos)
        reply = out[0, len(ids):].tolist()
        assert reply[-1] == eos and eos not in reply[:-1], f"HF's reply to {q!r} does not end within {STEPS} tokens"
        prompts.append(ids)
        replies.append(reply[:-1])
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    print(f"\n[chat] HF replies: {len(replies[0])} and {len(replies[1])} tokens: "
          f"{tok.decode(replies[0])!r} / {tok.decode(replies[1])!r}")

    # What run.c feeds is what the template gives: turn 1 as text, and turn 2 after the cache's
    # turn 1 + reply 1 (the decoded reply must re-tokenize to the same ids for HF's turn 2 to
    # continue the same token sequence)
    turn1 = SYSTEM_FMT.format(SYSTEM) + USER_FMT.format(QUESTIONS[0])
    turn2 = CLOSE + USER_FMT.format(QUESTIONS[1])
    assert tokenize(model, turn1) == prompts[0]
    head = prompts[0] + replies[0]
    assert prompts[1][:len(head)] == head, "reply 1 does not re-tokenize to the generated ids"
    assert tokenize(model, turn2) == prompts[1][len(head):]

    # our engine: both turns through stdin, greedy, replies as ids
    r = run(model, "-m", "chat", "-t", 0, "--ids", "--system", SYSTEM, "-n", STEPS,
            input="".join(q + "\n" for q in QUESTIONS))
    lines = r.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 3, f"expected two reply lines, got {r.stdout!r}"
    got = [[int(x) for x in line.split()] for line in lines[:2]]
    # the prompt sizes the engine reports per turn: exactly the template's new tokens (no extra BOS)
    fed = [int(n) for n in re.findall(r"^prompt (\d+) tokens", r.stderr, re.M)]
    assert fed == [len(prompts[0]), len(prompts[1]) - len(head)], r.stderr
    for i in range(2):
        same = next((j for j, (a, b) in enumerate(zip(got[i], replies[i])) if a != b), min(len(got[i]), len(replies[i])))
        assert got[i] == replies[i], (f"turn {i + 1}: first difference at token {same}: "
                                      f"ours {tok.decode(got[i])!r}, HF {tok.decode(replies[i])!r}")
    print(f"[chat] both turns identical to HF ({len(got[0])} + {len(got[1])} tokens)")


def test_chat_text_output_is_the_decoded_reply(smol):
    """Without --ids the same replies print as text, one turn after the other."""
    model, tok, _ = smol
    r_ids = run(model, "-m", "chat", "-t", 0, "--ids", "--system", SYSTEM, "-n", STEPS,
                input="".join(q + "\n" for q in QUESTIONS))
    r_txt = run(model, "-m", "chat", "-t", 0, "--system", SYSTEM, "-n", STEPS,
                input="".join(q + "\n" for q in QUESTIONS))
    want = "".join(tok.decode([int(x) for x in line.split()]) + "\n" for line in r_ids.stdout.split("\n")[:2])
    assert r_txt.stdout == want


# A conversation that overflows a 128-slot context at turn 2's prompt: turn 1 and its reply are
# short, turn 2 is long, turns 3 and 4 go on through the window.
FULL_CONTEXT, FULL_STEPS = 128, 30
FULL_TURNS = [
    "What is a mountain hut?",
    "Here is some background before my question. I am planning a trip to the mountains next "
    "month with two friends. We want to hike for three days, sleep in huts, and carry light "
    "packs. None of us has done a multi-day hike before, although we all walk a lot in the city "
    "and go running on weekends. We are worried about the weather, about blisters, and about "
    "getting lost. What should we pack, and how should we prepare our bodies in the weeks before "
    "we leave?",
    "Which of those items matters most?",
    "How heavy should each pack be?",
]


def test_chat_goes_on_past_a_full_context(smol):
    """A conversation longer than its context does not end: when a turn does not fit, the cache
    goes on as StreamingLLM with 4 sinks and a window of the other slots less a chunk (run.c's
    continue_streaming(): chat's chunk is context / 4, the window ring - chunk + 1 keys). Turn 1
    and its reply fit in 4 sinks + that window, so every query before the switch sees all keys
    either way, and every reply must equal a run with --sinks 4 --window N from the start."""
    model, _, _ = smol
    chunk = FULL_CONTEXT // 4
    window = FULL_CONTEXT - 4 - chunk + 1
    stdin = "".join(t + "\n" for t in FULL_TURNS)
    r = run(model, "-m", "chat", "-t", 0, "--ids", "-n", FULL_STEPS, "-c", FULL_CONTEXT,
            input=stdin)
    fed = [int(n) for n in re.findall(r"^prompt (\d+) tokens", r.stderr, re.M)]
    replies = [[int(x) for x in line.split()] for line in r.stdout.split("\n")[:-1]]
    assert len(fed) == len(replies) == len(FULL_TURNS), r.stderr
    # a reply's tokens are fed back, its end token is not: turn 2 starts at fed[0] + len(reply)
    at_switch = fed[0] + len(replies[0])
    assert at_switch <= 4 + window < FULL_CONTEXT < at_switch + fed[1], (at_switch, fed)
    explicit = run(model, "-m", "chat", "-t", 0, "--ids", "-n", FULL_STEPS, "--sinks", 4,
                   "--window", window, "--chunk", chunk, input=stdin)
    assert "context full" not in explicit.stderr
    ours = [[int(x) for x in line.split()] for line in explicit.stdout.split("\n")[:-1]]
    for turn, (a, b) in enumerate(zip(replies, ours)):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert a == b, f"turn {turn + 1}: the replies part at token {same}: {a} vs {b}"
    notice = f"[context full: going on with 4 sinks + a window of {window} (StreamingLLM)"
    assert r.stderr.count("context full") == 1 and notice in r.stderr, r.stderr
    print(f"\n[chat] {len(FULL_TURNS)} turns, {sum(fed) + sum(map(len, replies))} tokens in a "
          f"{FULL_CONTEXT}-slot context: switched at {at_switch}, replies identical to "
          f"--sinks 4 --window {window} --chunk {chunk} ({sum(map(len, replies))} tokens)")

