"""Write the fuzz harnesses' seed corpus (committed under tests/fuzz/seeds/): small valid inputs
from which libFuzzer's mutations start. Rerun it only when the file format changes:

    .venv/bin/python tests/fuzz/make_seeds.py

model/      tiny random models exported by export.py: Llama f32, Qwen2 q8_0 (biases, a sliding
            layer), Qwen3 f16 (q/k norms, YaRN), and a Llama carrying a byte-level tokenizer
tokenizer/  tokenizer sections alone: byte-level BPE (GPT-2 pre-tokenizer, specials) and
            SentencePiece BPE with byte fallback, both trained here on a few lines of text
text/       prompts for fuzz_text (first byte even: text; odd: token ids)
cli/        command lines for fuzz_cli (arguments separated by NUL bytes)
sample/     option bytes and float32 logits for fuzz_sample: greedy, a tiny temperature, a
            nucleus, infinite and NaN logits, logits a repetition penalty overflows
state/      fuzz_state's settings byte, then a state file ./run --save-state wrote from
            model/llama-f32.bin: full attention (f32 cache, -c 16), --window 4 --sinks 2 with a
            q8 cache, and with a context memory (--memory-block 2 --memory-blocks 2: f16 far,
            q8 at true distances); all --chunk 4. ./run must be built (LONGRUN_BIN names
            another). Only these: `python -c "import make_seeds; make_seeds.write_state_seeds()"`
            in tests/fuzz.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
import export as ex  # noqa: E402

SEEDS = os.path.join(HERE, "seeds")
TEXT = ["Hello world, this is a tiny corpus for a tiny tokenizer.", "Numbers 12345 and 3.14, symbols #@!",
        "Unicode: caf\u00e9, na\u00efve, \u4e2d\u6587, \U0001F600 emoji", "  spaces\tand\nnewlines  ", "def f(x): return x * 2"] * 20


def write(kind, name, data):
    os.makedirs(os.path.join(SEEDS, kind), exist_ok=True)
    with open(os.path.join(SEEDS, kind, name), "wb") as f:
        f.write(data)


def byte_level_json():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return json.loads(tok.to_str())


def spm_section(tmp):
    import sentencepiece as spm
    train = os.path.join(tmp, "train.txt")
    open(train, "w", encoding="utf-8").write("\n".join(TEXT))
    spm.SentencePieceTrainer.train(input=train, model_prefix=os.path.join(tmp, "spm"), vocab_size=360, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    return ex.tokenizer_section_from_spm(os.path.join(tmp, "spm.model"), {"add_bos_token": True})


def tiny_model(tmp, name, cls, dtype, tokenizer_json=None, **cfg):
    import torch
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, cls + "Config")(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                   num_key_value_heads=1, max_position_embeddings=64, **cfg)
    d = os.path.join(tmp, name)
    getattr(transformers, cls + "ForCausalLM")(config).save_pretrained(d)
    if tokenizer_json:
        json.dump(tokenizer_json, open(os.path.join(d, "tokenizer.json"), "w"))
        chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        json.dump({"eos_token": "<|endoftext|>", "chat_template": chatml}, open(os.path.join(d, "tokenizer_config.json"), "w"))
    out = os.path.join(tmp, name + ".bin")
    subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), d, out, "--dtype", dtype], check=True,
                   capture_output=True)
    return open(out, "rb").read()


def main():
    with tempfile.TemporaryDirectory() as tmp:
        bl = byte_level_json()
        write("tokenizer", "byte-level.tok", ex.tokenizer_section_from_json(bl, {"eos_token": "<|endoftext|>"}))
        write("tokenizer", "spm.tok", spm_section(tmp))
        write("model", "llama-f32.bin", tiny_model(tmp, "llama", "Llama", "f32", num_hidden_layers=1, vocab_size=64))
        write("model", "qwen2-q8.bin", tiny_model(tmp, "qwen2", "Qwen2", "q8_0", num_hidden_layers=2, vocab_size=64,
                                                  use_sliding_window=True, sliding_window=4, max_window_layers=1))
        write("model", "qwen3-f16.bin", tiny_model(tmp, "qwen3", "Qwen3", "f16", num_hidden_layers=1, vocab_size=64,
                                                   head_dim=16, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                                              "original_max_position_embeddings": 32}))
        write("model", "llama-tokenizer.bin", tiny_model(tmp, "llama_tok", "Llama", "q8_0", tokenizer_json=bl,
                                                         num_hidden_layers=1, vocab_size=320))
        # the tokenizer file fuzz_text loads: the byte-level one, as a tokenizer-only model file
        ex.write_tokenizer_only(ex.tokenizer_section_from_json(bl, {"eos_token": "<|endoftext|>"}),
                                os.path.join(HERE, "text-tokenizer.bin"))
    for i, t in enumerate(["Hello world", "caf\u00e9 \U0001F600 12345", "<|im_start|>user\nhi<|im_end|>", "  \t\n x"]):
        write("text", f"text{i}", b"\0" + t.encode())
    write("text", "ids", b"\1" + struct.pack("<8H", 0, 1, 2, 255, 256, 300, 319, 65535))
    for i, args in enumerate([["m.bin", "-i", "hi", "-n", "16", "-t", "0.7", "-k", "40"],
                              ["m.bin", "-m", "ppl", "-f", "book.txt", "--sinks", "4", "--window", "2048", "--ppl-csv", "x.csv"],
                              ["m.bin", "-m", "bench", "--bench-pp", "512,1024", "--bench-depth", "0,4096", "-r", "2"],
                              ["m.bin", "-m", "passkey", "--passkey-len", "1024", "--passkey-depth", "0,0.5,1"],
                              ["m.bin", "-i", "x", "--rope-scaling", "yarn", "--rope-factor", "4", "--lminf", "--kv-type", "q8"],
                              ["--help"]]):
        write("cli", f"args{i}", b"\0".join(a.encode() for a in args))
    write_sample_seeds()
    write_state_seeds()
    print("seeds written under", SEEDS)


def write_sample_seeds():
    """16 option bytes (see fuzz_sample.c), then float32 logits."""
    import random
    rng = random.Random(0)
    inf, nan = float("inf"), float("nan")
    cases = {
        "greedy": ([0, 0, 2, 0, 3, 0, 0, 0, 4, 0, 0, 1, 0, 0, 0, 0], [0.5, 1.5, -2, 3.25, 0.0]),
        "tiny-temperature": ([4, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 1, 0, 0, 0, 0], [20.0, 19.0, -3.0, 5.0]),
        "nucleus": ([13, 80, 2, 9, 0, 0, 5, 9, 4, 0, 9, 7, 0, 12, 3, 0], [rng.gauss(0, 3) for _ in range(64)]),
        "infinite": ([13, 80, 1, 0, 5, 30, 4, 0, 12, 0, 9, 7, 0, 5, 1, 0], [inf, 1.0, -inf, 2.0]),
        "nan": ([13, 80, 3, 5, 5, 30, 4, 0, 12, 0, 9, 7, 0, 5, 1, 0], [nan, 1.0, 2.0]),
        "penalty-overflow": ([5, 0, 3, 40, 6, 0, 9, 0, 12, 0, 40, 7, 0, 60, 0, 0], [3e38, -3e38, 1e38, -1e38, 0.5]),
    }
    for name, (options, logits) in cases.items():
        write("sample", name, bytes(options) + struct.pack(f"<{len(logits)}f", *logits))


def write_state_seeds():
    """A settings byte (see fuzz_state.c: bit 0 window + sinks, bits 1-2 the KV type, bit 3 the
    context memory, bit 4 its blocks at true distances), then the state ./run saved after a prompt of
    token ids, with those settings. Small contexts and windows keep each file a few pages (its
    sections are page-aligned)."""
    run = os.environ.get("LONGRUN_BIN", os.path.join(ROOT, "run"))
    model = os.path.join(SEEDS, "model", "llama-f32.bin")
    cases = {"full-f32": (0, ["-c", "16"], 10),
             "window-sinks-q8": (1 | 2 << 1, ["--window", "4", "--sinks", "2", "--kv-type", "q8"], 13)}
    memory = ["--window", "4", "--sinks", "2", "--memory", "--memory-block", "2", "--memory-blocks", "2"]
    cases["memory-f16"] = (1 | 1 << 1 | 1 << 3, [*memory, "--kv-type", "f16"], 13)
    cases["memory-near-q8"] = (1 | 2 << 1 | 1 << 3 | 1 << 4, [*memory, "--memory-distance", "1000", "--kv-type", "q8"],
                               14)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (settings, options, n) in cases.items():
            state = os.path.join(tmp, name)
            ids = " ".join(str(i) for i in range(1, n + 1))
            subprocess.run([run, model, "--ids", "-i", ids, "-n", "1", "-t", "0", "--chunk", "4", *options,
                            "--save-state", state], check=True, capture_output=True)
            write("state", name, bytes([settings]) + open(state, "rb").read())


if __name__ == "__main__":
    main()
