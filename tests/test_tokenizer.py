"""Tokenizer parity: tokenizer.c (through tests/tok_driver.c) against HF tokenizers and sentencepiece.

Families: (a) the real SmolLM2 tokenizer from its GGUF, (b) a SentencePiece BPE model with byte
fallback trained here (vs sentencepiece and HF's conversion, legacy and non-legacy), (c) byte-level
BPE tokenizers trained here with the GPT-2, Llama 3 and Qwen2 pre-tokenizers. Every family is
compared on the same mixed corpus (>= 200 KB) and checked for decode(encode(x)) == x.
Run from the repo root: python -m pytest tests/test_tokenizer.py -s
"""
import json
import os
import random
import struct
import subprocess
import sys
import time
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export as te  # noqa: E402  (its "Tokenizer section" writes what tokenizer.c reads)

SMOLLM2_GGUF = os.environ.get("SMOLLM2_GGUF", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


# ----------------------------------------------------------------------------
# The corpus

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more what up out who them "
         "can said time people about into than only other new some could these two may first then do any like my now "
         "over such our man me even most made after also did many before must through back years where much your way "
         "well down should because each just those how too little state good very make world still own see men work "
         "long here get both between life being under never day same another know while last might us great old year "
         "off come since against go came right used take three don't it's I'm we've they'll she'd you're THE Don'T").split()

CODE = [
    '#include <stdio.h>\nint main(int argc, char **argv) {\n\tfor (int i = 0; i < argc; i++)\n\t\tprintf("%s\\n", argv[i]);\n\treturn 0;\n}\n',
    'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nprint([fib(i) for i in range(20)])\n',
    'const add = (a, b) => a + b;\nexport default function App() {\n  return <div className="app">{items.map(x => <Item key={x.id} {...x} />)}</div>;\n}\n',
    'fn main() {\n    let v: Vec<u64> = (1..=10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}\n',
    '<!DOCTYPE html>\n<html lang="en">\n  <head><meta charset="utf-8"><title>Test &amp; more</title></head>\n</html>\n',
    'SELECT id, name FROM users WHERE age >= 21 AND name LIKE \'%son\' ORDER BY id DESC LIMIT 100;\n',
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tch := make(chan int, 3)\n\tgo func() { ch <- 42 }()\n\tfmt.Println(<-ch)\n}\n',
]

SCRIPTS = [
    "日本語のテキストと漢字、ひらがな、カタカナ。東京は日本の首都です。",
    "中文分词测试：我们今天去北京天安门广场。这是一个很长的句子，没有空格。",
    "한국어 텍스트입니다. 서울은 대한민국의 수도입니다.",
    "اللغة العربية جميلة جداً، وهي لغة القرآن الكريم. مرحبا بالعالم!",
    "हिन्दी भाषा भारत की राजभाषा है। नमस्ते दुनिया।",
    "Русский язык — один из восточнославянских языков. Привет, мир! Ёлка и ёжик.",
    "Ελληνικά: Γειά σου Κόσμε. עברית: שלום עולם. ไทย: สวัสดีชาวโลก",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 👩🏿‍💻 ❤️‍🔥 🧑🏻‍🤝‍🧑🏾 😀😃😄 1️⃣ #️⃣",
    "Combining: e\u0301 a\u0308 o\u0302\u0323 Z\u0351\u0307\u0358a\u0360\u035dl\u0346g\u0315o n\u0303 \u1100\u1161\u11a8 \u212b \u1e9b\u0323 Å",
    "Full-width ＡＢＣ１２３ and ligatures ﬁ ﬂ, math 𝔸𝕓𝒸 ∑∫√∞ ≠ ≤ ≥, currency €£¥₹₿.",
    "Numbers: 3.14159 2,718,281 1e-10 0x1F 12345678901234567890 ٣٤٥ १२३ ⅫⅣ ½ ² ① 𝟙𝟚",
]


def random_unicode(rng, n):
    """n random assigned code points (no surrogates, private use or unassigned), any script."""
    out = []
    while len(out) < n:
        r = rng.random()
        cp = rng.randrange(0x20, 0x80) if r < 0.3 else rng.randrange(0x80, 0x3000) if r < 0.7 else \
            rng.randrange(0x3000, 0x30000)
        c = chr(cp)
        if unicodedata.category(c) in ("Cn", "Cs", "Co"):
            continue
        out.append(c)
    return "".join(out)


def build_corpus(seed=1234, target=220_000):
    rng = random.Random(seed)
    texts = ["", " ", "  ", "\n", "a", "Hello", " Hello", "  Hello world  ", "Hello\n\n\n  world\t\t x",
             "don't DON'T 'S 'Re 're", "3333333 1234567 12 1", "x  1", "x\n\n1", "   ", "\t\n \r\n  \u3000 x",
             "<|im_start|>user\nHi there<|im_end|>\n", "a<|im_end|>b", "<|endoftext|>", " <|im_start|> x",
             "e\u0301", "\u0301", "ctl \x04\x06\x13\x14\x16\x1d\x00\x7f end", "ſ 's 'ſ 'ſt", "Việt Nam"] + CODE + SCRIPTS
    size = sum(len(t.encode()) for t in texts)
    while size < target:
        r = rng.random()
        if r < 0.3:      # prose
            t = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 80)))
            t = t[0].upper() + t[1:] + rng.choice([".", "!", "?", ".\n\n", ",", ""])
        elif r < 0.4:    # code
            t = rng.choice(CODE)
            t = t[: rng.randrange(len(t) + 1)] if rng.random() < 0.5 else t
        elif r < 0.5:    # numbers
            t = " ".join(str(rng.randrange(10 ** rng.randrange(1, 15))) for _ in range(rng.randrange(1, 10)))
            t += rng.choice(["", "abc", "3.5", "%", " "])
        elif r < 0.6:    # whitespace runs
            t = "".join(rng.choice([" ", "  ", "\t", "\n", "\r\n", "x", "ab", ".", "\u00a0", "\u3000"])
                        for _ in range(rng.randrange(1, 30)))
        elif r < 0.75:   # scripts, emoji, combining marks
            t = rng.choice(SCRIPTS)
            a = rng.randrange(len(t))
            t = t[a: a + rng.randrange(1, 60)]
        elif r < 0.8:    # specials inside text
            t = rng.choice(SPECIALS) + rng.choice(["user\n", " ", "", "Hi "]) + rng.choice(WORDS) + rng.choice(SPECIALS + [""])
        else:            # random Unicode
            t = random_unicode(rng, rng.randrange(1, 40))
        texts.append(t)
        size += len(t.encode())
    return texts


def invalid_utf8(seed=99, n=300):
    rng = random.Random(seed)
    out = [b"\xff", b"\xc3", b"a\x80b", b"\xe2\x82", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80",
           b"ok \xe2\x96 \xf0\x9f\x98\x80 end", b"\xef\xbf\xbd real"]
    for _ in range(n):
        out.append(bytes(rng.choice([rng.randrange(256), 0x80 | rng.randrange(64), 0x61, 0x20, 0xE2, 0xF0])
                         for _ in range(rng.randrange(1, 24))))
    return out


CORPUS = build_corpus()
BAD = invalid_utf8()


# ----------------------------------------------------------------------------
# Running the C tokenizer

@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="session")
def driver(workdir):
    exe = str(workdir / "tok_driver")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-o", exe,
                    os.path.join(ROOT, "tests", "tok_driver.c")], check=True)
    return exe


def c_batch(driver, model, blobs):
    """[(ids, decoded bytes)] for each byte string, in one driver run."""
    data = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    out = subprocess.run([driver, model, "batch"], input=data, capture_output=True, check=True).stdout
    res, pos = [], 0
    for _ in blobs:
        (n,) = struct.unpack_from("<I", out, pos)
        ids = list(struct.unpack_from(f"<{n}i", out, pos + 4))
        pos += 4 + 4 * n
        (m,) = struct.unpack_from("<I", out, pos)
        res.append((ids, out[pos + 4: pos + 4 + m]))
        pos += 4 + m
    assert pos == len(out)
    return res


def write_model(workdir, name, section):
    path = str(workdir / name)
    te.write_tokenizer_only(section, path)
    return path


def compare(name, driver, model, texts, reference, roundtrip=lambda t: t, bad=()):
    """C ids == reference(text) for every text; decode(encode(x)) == roundtrip(x) when given."""
    blobs = [t.encode("utf-8") for t in texts] + list(bad)
    strs = list(texts) + [b.decode("utf-8", errors="replace") for b in bad]
    got = c_batch(driver, model, blobs)
    mismatches, n_tokens, rt_fail = [], 0, []
    for i, (s, (ids, back)) in enumerate(zip(strs, got)):
        want = reference(s)
        n_tokens += len(want)
        if ids != want:
            mismatches.append((s, ids, want))
        exp = roundtrip(s) if i < len(texts) else None
        if exp is not None and back != exp.encode("utf-8"):
            rt_fail.append((s, back))
    print(f"\n[{name}] compared {len(strs)} strings ({sum(len(b) for b in blobs)} bytes, {len(bad)} invalid UTF-8), "
          f"{n_tokens} tokens: {len(mismatches)} id mismatches, {len(rt_fail)} round-trip failures")
    for s, ids, want in mismatches[:5]:
        print("  MISMATCH", repr(s[:80]), "\n    C ", ids[:40], "\n    HF", want[:40])
    for s, back in rt_fail[:5]:
        print("  ROUNDTRIP", repr(s[:80]), back[:120])
    assert not mismatches and not rt_fail


def bench(name, driver, model, text, hf_encode):
    data = text.encode("utf-8")
    out = subprocess.run([driver, model, "bench"], input=data, capture_output=True, check=True).stdout.decode()
    c_mbs = float(out.split()[-2])
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        hf_encode(text)
        best = min(best, time.perf_counter() - t0)
    print(f"\n[bench {name}] {len(data) / 1e6:.2f} MB: C {c_mbs:.1f} MB/s, reference {len(data) / best / 1e6:.1f} MB/s "
          f"(single thread) -> {out.strip()}")


def book_text():
    """About 1.2 MB of mixed text: the corpus, repeated with a different seed."""
    parts, size, seed = [], 0, 7
    while size < 1_200_000:
        for t in build_corpus(seed, 300_000):
            parts.append(t)
            size += len(t.encode())
        seed += 1
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# (a) SmolLM2 from its GGUF

@pytest.fixture(scope="session")
def smollm2(workdir):
    assert os.path.exists(SMOLLM2_GGUF), f"{SMOLLM2_GGUF} not found (make test downloads it; or set SMOLLM2_GGUF)"
    import gguf
    from transformers import AutoTokenizer
    from tokenizers import pre_tokenizers
    section = te.tokenizer_section_from_gguf(gguf.GGUFReader(SMOLLM2_GGUF))
    model = write_model(workdir, "smollm2.bin", section)
    hf = AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM2_GGUF), gguf_file=os.path.basename(SMOLLM2_GGUF))
    backend = hf.backend_tokenizer
    # transformers' GGUF loader ignores tokenizer.ggml.pre = "smollm" and builds a plain GPT-2
    # ByteLevel pre-tokenizer. SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-type)
    # split every digit first: Sequence[Digits(individual_digits), ByteLevel]. Those are the ids
    # the model was trained on, so that is the reference; the difference shows on e.g. "x  1".
    plain = backend.__class__.from_str(backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return model, backend, plain


def test_smollm2_ids(driver, smollm2):
    model, hf, plain = smollm2
    # SmolLM2's vocabulary lacks a few byte tokens (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, ...): HF
    # drops such bytes and so do we, so those strings cannot round-trip.
    missing = "\x04\x06\x13\x14\x16\x1d"
    compare("SmolLM2 GGUF", driver, model, CORPUS, lambda s: hf.encode(s, add_special_tokens=False).ids,
            roundtrip=lambda s: None if any(c in s for c in missing) else s, bad=BAD)
    differ = sum(plain.encode(s, add_special_tokens=False).ids != hf.encode(s, add_special_tokens=False).ids for s in CORPUS)
    print(f"  (transformers' GGUF tokenizer without the digit split differs on {differ} of {len(CORPUS)} strings)")


def test_smollm2_cli_and_bos(workdir, smollm2):
    """./run -m tokenize on a tokenizer-only file: the whole corpus as one prompt file (bytes
    verbatim), and -i with --bos, against HF."""
    model, hf, _ = smollm2
    run_bin = os.environ.get("LONGRUN_BIN", os.path.join(ROOT, "run"))
    assert os.path.exists(run_bin), f"{run_bin} not built (make run)"
    text = "\n".join(CORPUS[:400]) + "".join(SPECIALS)
    path = workdir / "prompt.txt"
    path.write_bytes(text.encode("utf-8"))
    out = subprocess.run([run_bin, model, "-m", "tokenize", "-f", str(path)], capture_output=True, check=True).stdout
    want = hf.encode(text, add_special_tokens=False).ids
    assert [int(x) for x in out.split()] == want
    out = subprocess.run([run_bin, model, "-m", "tokenize", "--bos", "-i", "Hi there"], capture_output=True,
                         check=True).stdout
    bos = hf.token_to_id("<|im_start|>")  # SmolLM2's BOS per its GGUF metadata (tokenizer.ggml.bos_token_id)
    assert [int(x) for x in out.split()] == [bos] + hf.encode("Hi there", add_special_tokens=False).ids
    print(f"\n[run -m tokenize] {len(text.encode())} bytes -> {len(want)} ids, identical to HF")


def test_smollm2_stream(driver, smollm2):
    model, hf, _ = smollm2
    text = "Emoji 👨‍👩‍👧 and 漢字 é, then a bell \x07 and ESC \x1b[31m red"
    ids = hf.encode(text, add_special_tokens=False).ids + [2]
    out = subprocess.run([driver, model, "stream"], input=" ".join(map(str, ids)).encode(), capture_output=True,
                         check=True).stdout
    assert out.decode("utf-8") == text.replace("\x07", "\\x07").replace("\x1b", "\\x1B")
    # A character cut in the middle of its bytes: the streaming decoder waits, then completes it.
    ids = [i for i in hf.encode("😀", add_special_tokens=False).ids]
    assert len(ids) > 1
    out = subprocess.run([driver, model, "stream"], input=" ".join(map(str, ids[:-1])).encode(), capture_output=True,
                         check=True).stdout
    assert out == "\ufffd".encode()  # incomplete at the end of output: one U+FFFD, never raw bytes


def test_smollm2_bench(driver, smollm2):
    model, hf, _ = smollm2
    bench("SmolLM2 vs HF tokenizers", driver, model, book_text(), lambda s: hf.encode(s, add_special_tokens=False))


# ----------------------------------------------------------------------------
# (b) SentencePiece BPE with byte fallback

@pytest.fixture(scope="session")
def spm_model(workdir):
    import sentencepiece as spm
    train = workdir / "spm_train.txt"
    train.write_text("\n".join(t for t in build_corpus(5, 400_000) if t.strip()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(train), model_prefix=str(workdir / "spm"), vocab_size=4000,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
                                   character_coverage=0.98, max_sentence_length=100000, minloglevel=2)
    return str(workdir / "spm.model"), spm.SentencePieceProcessor(model_file=str(workdir / "spm.model"))


def hf_from_spm(workdir, model_path, legacy):
    """HF's own conversion of the .model (LlamaTokenizer), with protobuf parsing done by our reader,
    since the protobuf package is not a test dependency."""
    import importlib
    import shutil
    # by module path: once loaded, `transformers.convert_slow_tokenizer` is also the name of a function
    cst = importlib.import_module("transformers.convert_slow_tokenizer")
    from transformers import AutoTokenizer

    class Proto:  # the attributes SentencePieceExtractor reads from a ModelProto
        def __init__(self, m):
            P = type("P", (), {})
            self.pieces = []
            for piece, score, typ in m["pieces"]:
                p = P()
                p.piece, p.score, p.type = piece, score, typ
                self.pieces.append(p)
            self.trainer_spec = P()
            self.trainer_spec.unk_id, self.trainer_spec.model_type = m["unk_id"], m["model_type"]
            self.normalizer_spec = P()
            self.normalizer_spec.precompiled_charsmap = m["precompiled_charsmap"]

    def init(self, model):
        self.proto = Proto(te.parse_spm_model(open(model, "rb").read()))

    d = workdir / f"hf_spm_{int(legacy)}"
    d.mkdir(exist_ok=True)
    shutil.copy(model_path, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": legacy,
                                                         "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>"}))
    saved = cst.SentencePieceExtractor.__init__
    cst.SentencePieceExtractor.__init__ = init
    try:
        tok = AutoTokenizer.from_pretrained(str(d))
    finally:
        cst.SentencePieceExtractor.__init__ = saved
    assert len(tok) > 1000, "HF conversion of the SentencePiece model failed"
    return tok


def test_spm_vs_sentencepiece(driver, workdir, spm_model):
    path, sp = spm_model
    model = write_model(workdir, "spm_all.bin", te.tokenizer_section_from_spm(path))
    texts = [t for t in CORPUS if not any(s in t for s in ("<s>", "</s>", "<unk>"))]
    compare("SentencePiece (sentencepiece itself)", driver, model, texts, lambda s: sp.encode(s),
            roundtrip=lambda s: s, bad=BAD)


def test_spm_with_merges_across_words(driver, workdir):
    """Trained with split_by_whitespace=False, pieces hold "▁" inside (merges across word
    starts), so tokenizer.c must merge the whole text at once, not word by word."""
    import sentencepiece as spm
    train = workdir / "spm_cross_train.txt"
    words = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
             "have an they you were her she there been one all we their has would when if so no will").split()
    rng = random.Random(4)   # short English-like sentences, so that frequent word pairs merge
    lines = [" ".join(rng.choice(words[:rng.randint(4, len(words))]) for _ in range(rng.randint(5, 20)))
             for _ in range(20000)]
    train.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(train), model_prefix=str(workdir / "spm_cross"), vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_by_whitespace=False,
                                   character_coverage=0.98, max_sentence_length=100000, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(workdir / "spm_cross.model"))
    crossing = [p for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size())) if "\u2581" in p[1:]]
    assert len(crossing) > 20, "the test needs pieces with an inner \u2581"
    model = write_model(workdir, "spm_cross.bin", te.tokenizer_section_from_spm(str(workdir / "spm_cross.model")))
    texts = [t for t in CORPUS if not any(s in t for s in ("<s>", "</s>", "<unk>"))]
    compare(f"SentencePiece, {len(crossing)} pieces across words", driver, model, texts, lambda s: sp.encode(s),
            roundtrip=lambda s: s, bad=BAD)


@pytest.mark.parametrize("legacy", [True, False])
def test_spm_vs_hf(driver, workdir, spm_model, legacy):
    path, sp = spm_model
    hf = hf_from_spm(workdir, path, legacy)
    scheme = hf.backend_tokenizer.pre_tokenizer.prepend_scheme
    prefix = {"always": te.PREFIX_ALWAYS, "first": te.PREFIX_FIRST}[scheme]
    model = write_model(workdir, f"spm_{scheme}.bin", te.tokenizer_section_from_spm(path, prefix=prefix))
    texts = CORPUS + ["<s>Hello", "a</s> b", "<unk> x", " <s> lead"]
    ref = lambda s: hf.encode(s, add_special_tokens=False)
    compare(f"SentencePiece via HF LlamaTokenizer legacy={legacy} (Metaspace {scheme})", driver, model, texts, ref,
            roundtrip=lambda s: None if s.startswith(" ") or "<" in s else s, bad=BAD)
    # The same HF tokenizer saved as tokenizer.json and exported from there (merge ranks from the list).
    tj = json.loads(hf.backend_tokenizer.to_str())
    model2 = write_model(workdir, f"spm_json_{scheme}.bin", te.tokenizer_section_from_json(tj, {"bos_token": "<s>",
                                                                                             "eos_token": "</s>"}))
    compare(f"SentencePiece tokenizer.json export ({scheme})", driver, model2, texts, ref,
            roundtrip=lambda s: None if s.startswith(" ") or "<" in s else s, bad=BAD)


def test_spm_bench(driver, workdir, spm_model):
    path, sp = spm_model
    model = write_model(workdir, "spm_bench.bin", te.tokenizer_section_from_spm(path))
    bench("SentencePiece (vs sentencepiece)", driver, model, book_text(), sp.encode)


# ----------------------------------------------------------------------------
# (c) byte-level BPE: GPT-2, Llama 3 and Qwen2 pre-tokenizers, trained here

def train_byte_level(kind, texts):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(ignore_merges=(kind == "llama3")))
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "smollm":   # StarCoder's and SmolLM's: every digit alone, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        regex = te.LLAMA3_REGEX if kind == "llama3" else te.QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "qwen2"])
def test_byte_level(driver, workdir, kind):
    tok = train_byte_level(kind, build_corpus(11, 300_000))
    section = te.tokenizer_section_from_json(json.loads(tok.to_str()), {"eos_token": "<|endoftext|>"})
    model = write_model(workdir, f"bl_{kind}.bin", section)
    # Qwen2 decodes to the NFC text, as HF's normalizer makes it (its own Unicode 9.0 tables, which
    # tokenizer_unicode.h follows: tests/test_unicode.py)
    nfc = tok.normalizer.normalize_str if kind == "qwen2" else (lambda s: s)
    compare(f"byte-level {kind}", driver, model, CORPUS, lambda s: tok.encode(s, add_special_tokens=False).ids,
            roundtrip=nfc, bad=BAD)
    if kind == "llama3":
        bench("byte-level llama3 vs HF tokenizers", driver, model, book_text(), lambda s: tok.encode(s, add_special_tokens=False))


# ----------------------------------------------------------------------------
# GGUF tokenizer.ggml.pre names: each one of a split tokenizer.c implements gives HF's ids

class GGUFMetadata:
    """The tokenizer.ggml.* fields of a GGUF, as llama.cpp's converter writes them for a HF
    byte-level BPE, for export.tokenizer_section_from_gguf (which reads .fields[key].contents())."""

    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    def __init__(self, tok, pre):
        tj = json.loads(tok.to_str())
        vocab = tj["model"]["vocab"]
        specials = {a["content"] for a in tj["added_tokens"]}
        tokens = sorted(vocab, key=vocab.get)
        values = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                  "tokenizer.ggml.tokens": tokens,
                  "tokenizer.ggml.token_type": [te.T_CONTROL if t in specials else te.T_NORMAL for t in tokens],
                  "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]],
                  "tokenizer.ggml.eos_token_id": vocab["<|endoftext|>"]}
        self.fields = {k: self.Field(v) for k, v in values.items()}


# llama.cpp's llama_vocab::load: the split each name stands for, and whether it sets
# ignore_merges; GGUF keeps no normalizer, and export.py adds Qwen2's NFC for "qwen2" alone.
GGUF_NAMES = {
    "gpt2": "gpt2 gpt-2 default phi-2 mpt olmo jais trillion granite-docling jina-es jina-de jina-v2-es "
            "jina-v2-de jina-v1-en jina-v2-code roberta-bpe gigachat a.x-4.0 mellum modern-bert exaone4",
    "llama3": "llama-bpe llama3 llama-v3 falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
    "llama3 merges": "dbrx smaug-bpe glm4 chatglm-bpe",
    "qwen2": "qwen2",
    "qwen2 no NFC": "deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open",
    "smollm": "smollm starcoder refact command-r codeshell exaone minerva-7b mellum2",
}


def hf_reference(trained, split):
    """The HF tokenizer a GGUF with a name of this split stands for."""
    from tokenizers import Tokenizer
    tj = json.loads(trained[split.split()[0]].to_str())
    if split == "llama3 merges":
        tj["model"]["ignore_merges"] = False
    if split == "qwen2 no NFC":
        tj["normalizer"] = None
    return Tokenizer.from_str(json.dumps(tj))


def test_gguf_pre_names(driver, workdir):
    """Every accepted tokenizer.ggml.pre name (starcoder and refact are SmolLM2's split) gives
    the ids of HF tokenizers running that split; any other name is refused, saying why."""
    texts = CORPUS[:300] + ["x  1", "e\u0301 \u1e9b\u0323", "IT'S 'Ll 12345 ab\r\n\n  x"]
    train = build_corpus(11, 100_000)
    trained = {kind: train_byte_level(kind, train) for kind in ("gpt2", "llama3", "qwen2", "smollm")}
    for split, names in GGUF_NAMES.items():
        hf = hf_reference(trained, split)
        for name in names.split():
            section = te.tokenizer_section_from_gguf(GGUFMetadata(trained[split.split()[0]], name))
            model = write_model(workdir, f"gguf_pre_{name}.bin", section)
            compare(f"GGUF pre {name!r} ({split})", driver, model, texts,
                    lambda s: hf.encode(s, add_special_tokens=False).ids, roundtrip=lambda s: None)
    accepted = set(" ".join(GGUF_NAMES.values()).split())
    assert accepted == set(te.GGUF_PRE), set(te.GGUF_PRE) ^ accepted
    for name in ("deepseek-llm", "gpt-4o", "tekken", "falcon", "bloom", "no-such-split"):
        with pytest.raises(te.TokenizerError) as e:
            te.tokenizer_section_from_gguf(GGUFMetadata(trained["gpt2"], name))
        assert f"{name!r} is refused" in str(e.value) and "GPT-2, Llama 3, Qwen2 and SmolLM" in str(e.value)
    print(f"\n  refused: {e.value}")


# ----------------------------------------------------------------------------
# Added tokens that absorb the whitespace around them (HF AddedToken lstrip / rstrip)

# (content, lstrip, rstrip, special): Phi-3's chat tokens are special and rstrip
STRIP_TOKENS = [("<|end|>", False, True, True), ("<|user|>", False, True, True),
                ("<|assistant|>", False, True, True), ("<|sys|>", True, False, True),
                ("<|both|>", True, True, True), ("<|plain|>", False, False, True),
                ("[word]", True, True, False)]
# White_Space of every width in UTF-8, and U+200B, which is not White_Space
SPACES = ["", " ", "  ", "\n", "\n\n", " \n ", "\t", "\r\n", "\u3000", "\u00a0", "\u2028", "\u0085",
          "\u200b", " \u200b "]


def strip_texts(seed=5, n=800):
    """Chat turns as Phi-3 writes them, and random runs of tokens, words and whitespace."""
    rng = random.Random(seed)
    names = [c for c, *_ in STRIP_TOKENS]
    texts = ["<|user|>\nHello there<|end|>\n<|assistant|>\n Hi! How can I help?<|end|>\n",
             "<|sys|>", " <|sys|>", "x <|both|> y", "<|end|><|end|>", " \n<|both|>\n <|both|>\n ",
             "<|end|>  <|sys|>", "a\u3000<|sys|>\u3000b", "  [word]  x", "x[word]y"]
    for _ in range(n):
        parts = [rng.choice(SPACES) + rng.choice(names + ["word", "x y", "12", "é", ""]) + rng.choice(SPACES)
                 for _ in range(rng.randrange(1, 7))]
        texts.append("".join(parts))
    return texts


def with_strip_tokens(backend):
    """backend with the STRIP_TOKENS added (a copy: tokenizers' add_* change it in place)."""
    from tokenizers import AddedToken, Tokenizer
    tok = Tokenizer.from_str(backend.to_str())
    for content, lstrip, rstrip, special in STRIP_TOKENS:
        added = AddedToken(content, lstrip=lstrip, rstrip=rstrip, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    return tok


@pytest.mark.parametrize("kind", ["byte-level", "spm-legacy", "spm"])
def test_added_tokens_strip_whitespace(driver, workdir, spm_model, kind):
    """lstrip / rstrip added tokens, in a byte-level BPE (Llama 3 split) and in a SentencePiece
    BPE as Phi-3's tokenizer.json has it (legacy Prepend normalizer) and with Metaspace: ids equal
    HF tokenizers' on texts with every kind of whitespace around the tokens."""
    if kind == "byte-level":
        base = train_byte_level("llama3", build_corpus(11, 60_000))
    else:
        base = hf_from_spm(workdir, spm_model[0], legacy=kind == "spm-legacy").backend_tokenizer
    tok = with_strip_tokens(base)
    tj = json.loads(tok.to_str())
    assert any(a["rstrip"] for a in tj["added_tokens"]) and any(a["lstrip"] for a in tj["added_tokens"])
    section = te.tokenizer_section_from_json(tj, {"eos_token": "<|end|>"})
    model = write_model(workdir, f"strip_{kind}.bin", section)
    texts = strip_texts()
    compare(f"lstrip/rstrip added tokens, {kind}", driver, model, texts,
            lambda s: tok.encode(s, add_special_tokens=False).ids, roundtrip=lambda s: None)
    # the whitespace is really absorbed: without the flags HF gives other ids for many texts
    plain = json.loads(tok.to_str())
    for a in plain["added_tokens"]:
        a["lstrip"] = a["rstrip"] = False
    from tokenizers import Tokenizer
    plain = Tokenizer.from_str(json.dumps(plain))
    differ = sum(plain.encode(s, add_special_tokens=False).ids != tok.encode(s, add_special_tokens=False).ids
                 for s in texts)
    print(f"  ({differ} of {len(texts)} texts tokenize differently without lstrip/rstrip)")
    assert differ > len(texts) // 4


# ----------------------------------------------------------------------------
# A damaged section is refused with a message, never a crash

def test_malformed_sections(driver, workdir, smollm2):
    model, _, _ = smollm2
    data = bytearray(open(model, "rb").read())
    rng = random.Random(3)
    refused = 0
    for trial in range(60):
        bad = bytearray(data)
        if trial < 20:   # header fields
            bad[128 + rng.randrange(96)] = rng.randrange(256)
        elif trial < 40:  # token table and merge table
            bad[128 + 96 + rng.randrange(16 * 49152 * 2)] = rng.randrange(256)
        else:            # truncated section: shrink tokenizer_size
            struct.pack_into("<Q", bad, 72, rng.randrange(len(data) - 128))
        path = str(workdir / "bad.bin")
        open(path, "wb").write(bad)
        r = subprocess.run([driver, path, "encode"], input=b"Hello world 123", capture_output=True)
        assert r.returncode in (0, 1), r.stderr
        if r.returncode:
            assert r.stderr.startswith(b"error: "), r.stderr
            refused += 1
    print(f"\n[malformed] {refused} of 60 damaged sections refused, the rest still load (damage in unused bytes)")
    assert refused >= 20
