"""-m chat against transformers: a scripted two-turn conversation on SmolLM2-135M-Instruct (f32 export
of the GGUF), greedy, each reply printed as ids, must equal HF generate() on the conversation built
by the model's own chat template (tokenizer.apply_chat_template); past a full context, its replies
equal an explicit --sinks 4 --window N run. The Llama 3 and Llama 2 ([INST]) templates are checked
on tiny random Llamas with tokenizers trained here."""
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, export, run, tiny_llama

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


def tokenize(model, text, *flags):
    return [int(x) for x in run(model, "-m", "tokenize", "-i", text, *flags).stdout.split()]


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


DOC = ("The Rhine is a river that begins in the Swiss Alps, flows through Lake Constance, forms part of "
       "the border between Germany and France, and reaches the North Sea in the Netherlands. It is about "
       "1,230 kilometres long.")


def test_chat_with_a_document(smol, tmp_path):
    """-m chat -f FILE (and --show-prompt): the document opens the first user message, a blank line before the first
    question from stdin. The question is typed over two lines (a trailing backslash continues it)
    with an arrow key's escape sequence in it, which is dropped. Turn 1 must equal HF generate() on
    the template of that message; the end-of-turn token is not counted in the stats."""
    model, tok, hf = smol
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    question = "Where does the river end?\nAnswer in one sentence."
    typed = "Where does the \x1b[Ariver end?\\\nAnswer in one\x1b[D sentence.\nHow long is it?\n"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": DOC + "\n\n" + question}]
    ids = template_ids(tok, messages)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=STEPS, eos_token_id=eos,
                          pad_token_id=eos)
    reply = out[0, len(ids):].tolist()
    assert reply[-1] == eos, "HF's reply does not end within STEPS tokens"
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    r = run(model, "-m", "chat", "-f", doc, "-t", 0, "--ids", "--system", SYSTEM, "-n", STEPS, "--show-prompt",
            input=typed)
    # --show-prompt: the rendered turn and the ids the model reads, HF's template ids
    shown = re.search(r"--- the model reads \((\d+) tokens\) ---\n(.*?)\n--- as ids ---\n([\d ]+)\n", r.stderr, re.S)
    assert shown and [int(x) for x in shown.group(3).split()] == ids, r.stderr
    assert shown.group(2) == tok.decode(ids), shown.group(2)
    lines = r.stdout.split("\n")
    assert len(lines) == 3, r.stdout
    assert [int(x) for x in lines[0].split()] == reply[:-1], (tok.decode(reply), lines[0])
    fed = [int(n) for n in re.findall(r"^prompt (\d+) tokens", r.stderr, re.M)]
    assert fed[0] == len(ids), r.stderr
    counted = [int(n) for n in re.findall(r"decode [\d.]+ tok/s \((\d+) tokens\)", r.stderr)]
    assert counted[0] == len(reply) - 1, r.stderr
    # -i TEXT is the same document
    r_i = run(model, "-m", "chat", "-i", DOC, "-t", 0, "--ids", "--system", SYSTEM, "-n", STEPS, input=typed)
    assert r_i.stdout == r.stdout


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


# ----------------------------------------------------------------------------
# The Llama 3 and Llama 2 chat templates, on tiny random Llamas with tokenizers trained here

# The templates as Meta-Llama-3-8B-Instruct and Llama-2-7b-chat-hf ship them in
# tokenizer_config.json (export.py picks run.c's format by their marker tokens).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
# run.c's turns for them (chat_formats[CHAT_LLAMA3], [CHAT_LLAMA2_INST]): the first turn with
# and without a system prompt, a later turn's user message, and what closes a reply before it.
RUN_C_TURNS = {
    "llama3": {"system": "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>"
                         "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "user": "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "close": "<|eot_id|>"},
    "llama2": {"system": "[INST] <<SYS>>\n{}\n<</SYS>>\n\n{} [/INST]", "user": "[INST] {} [/INST]",
               "close": " </s><s>"},
}
TRAIN_WORDS = ("the of and to in a is that for it as was with be by on not this are or from at "
               "which but have an they you were she there been one all we their has would when "
               "if so no will more what up out who green sky blue sun yellow grass plants light "
               "energy water leaf sugar air life").split()
TRAIN_TEXTS = [SYSTEM, *QUESTIONS, "[INST] <<SYS>>\n\n<</SYS>> [/INST]"]
TRAIN_TEXTS += [" ".join(TRAIN_WORDS[i::7]) for i in range(7)] * 3


def llama3_tokenizer():
    """Byte-level BPE with Llama 3's split regex and special tokens; BOS first, as Llama 3's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    sys.path.insert(0, ROOT)
    import export as exporter   # its copy of Llama 3's split regex, which tokenizer.c implements
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    split = pre_tokenizers.Split(Regex(exporter.LLAMA3_REGEX), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "chat_template": LLAMA3_TEMPLATE}
    return tok, config


def llama2_tokenizer():
    """SentencePiece-style BPE laid out as Llama 2's tokenizer.json: "▁" prepended and spaces
    made "▁" by the normalizer (HF's legacy Llama), <s> first. Trained word by word, so no piece
    crosses a word boundary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never",
                                                 split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.pre_tokenizer = None   # as in Llama 2's tokenizer.json: the normalizer does it all
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "chat_template": LLAMA2_TEMPLATE}
    return tok, config


# name: (tokenizer, the whole-word tokens replies are drawn from, reply length). A reply must
# re-tokenize to itself when HF's template re-renders it for turn 2: Llama 3's template trims a
# reply, so one bare word; Llama 2's strips it and the pieces start with "▁", so three words.
TEMPLATES = {"llama3": (llama3_tokenizer, r"[a-z]{3,}", 1),
             "llama2": (llama2_tokenizer, "\u2581[a-z]{3,}", 3)}


@pytest.fixture(scope="module", params=list(TEMPLATES))
def templated(request, tmp_path_factory):
    """A tiny random Llama (conftest.tiny_llama) with that tokenizer and template, exported by
    export.py from the HF directory; its output layer scores only whole-word tokens (the other
    rows zeroed, these scaled up so one of them wins), so a reply re-tokenizes to itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name = request.param
    make, word, steps = TEMPLATES[name]
    d = tmp_path_factory.mktemp(name)
    tok, config = make()
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    hf_tok = AutoTokenizer.from_pretrained(d)
    tiny_llama(d, vocab_size=len(hf_tok), bos_token_id=hf_tok.bos_token_id,
               eos_token_id=hf_tok.eos_token_id, max_position_embeddings=256)
    encode = lambda text: hf_tok.encode(text, add_special_tokens=False)
    words = [i for t, i in hf_tok.get_vocab().items()
             if re.fullmatch(word, t) and encode(t.lstrip("\u2581")) == [i]]
    assert len(words) >= 10, words
    # no piece is a run of spaces, so a stray or missing space piece changes a turn's length
    assert not [t for t in hf_tok.get_vocab() if re.fullmatch("[\u2581\u0120 ]{2,}", t)]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        keep = torch.zeros(len(hf_tok), 1)
        keep[words] = 10
        model.lm_head.weight.mul_(keep)
    model.save_pretrained(d)
    return name, export(d, d / "f32.bin"), hf_tok, model, steps


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_llama_chat_templates_match_hf(templated, system):
    """A two-turn greedy chat on the Llama 3 and Llama 2 ([INST]) templates, with and without
    --system: what run.c feeds each turn is what HF's apply_chat_template gives (turn 1: the
    whole prompt; turn 2: what follows reply 1 when the template re-renders the conversation),
    and every reply token is HF's argmax over that conversation."""
    name, model, tok, hf, steps = templated
    first = [{"role": "system", "content": system}] if system else []
    first.append({"role": "user", "content": QUESTIONS[0]})
    prompt1 = template_ids(tok, first)
    with_system = ["--system", system] if system else []
    r = run(model, "-m", "chat", "-t", 0, "--ids", "-n", steps, *with_system,
            input="".join(q + "\n" for q in QUESTIONS))
    replies = [[int(x) for x in line.split()] for line in r.stdout.split("\n")[:-1]]
    assert len(replies) == 2 and all(len(reply) == steps for reply in replies), r.stdout
    messages = first + [{"role": "assistant", "content": tok.decode(replies[0])},
                        {"role": "user", "content": QUESTIONS[1]}]
    conversation = template_ids(tok, messages)
    head = prompt1 + replies[0]
    assert conversation[:len(head)] == head, "reply 1 does not re-tokenize to the generated ids"
    prompt2 = conversation[len(head):]

    # turn 1 is run.c's turn text encoded from the start of a text (with the model's BOS); the
    # number of ids fed at each turn is the template's
    turns = RUN_C_TURNS[name]
    if system:
        turn1 = turns["system"].format(system, QUESTIONS[0])
    else:
        turn1 = turns["user"].format(QUESTIONS[0])
    ours1 = tokenize(model, turn1, "--bos")
    names = tok.convert_ids_to_tokens
    assert ours1 == prompt1, f"turn 1: run.c {names(ours1)}, HF {names(prompt1)}"
    fed = [int(n) for n in re.findall(r"^prompt (\d+) tokens", r.stderr, re.M)]
    ours2 = tokenize(model, turns["close"] + turns["user"].format(QUESTIONS[1]))
    assert fed == [len(prompt1), len(prompt2)], (f"fed {fed}, HF {len(prompt1)} + {len(prompt2)}; "
                                                 f"turn 2: HF {names(prompt2)}, "
                                                 f"run.c's text alone {names(ours2)}")

    # each reply token is HF's argmax over the conversation, up to a near tie
    with torch.no_grad():
        logits = hf(torch.tensor([conversation + replies[1]])).logits[0].numpy()
    rows = [len(prompt1) - 1 + i for i in range(steps)]   # the rows that predict reply 1, then 2
    rows += [len(conversation) - 1 + i for i in range(steps)]
    chosen = replies[0] + replies[1]
    gap = logits[rows].max(-1) - logits[rows, chosen]
    tol = 1e-5 * np.abs(logits).max()
    print(f"\n[chat {name}{' + system' if system else ''}] fed {len(prompt1)} + {len(prompt2)} "
          f"ids as HF's template; replies {replies}: max gap below HF's argmax {gap.max():.3g} "
          f"(tolerance {tol:.3g})")
    assert gap.max() <= tol
