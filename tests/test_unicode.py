"""Every code point is classed and normalized as HF tokenizers does it.

HF tokenizers takes its character classes from three places, each with its own Unicode version
(tools/gen_unicode.py says which): the Oniguruma regexes of the Split / ByteLevel pre-tokenizers
(\\p{L}, \\p{N}, \\s), Rust's char::is_numeric in the Digits pre-tokenizer, and the NFC
normalizer's crate. tokenizer.c's tables (tokenizer_unicode.h) must agree with all three.

Each test puts every code point of U+0000..U+3FFFF (and the tags and variation selectors of
plane 14) into one text, each between two copies of a delimiter of known class, has HF
pre-tokenize (or normalize) it and compares the pieces with tests/unicode_driver.c, which runs
tokenizer.c's own scanners on the same text. A code point whose class differs changes where a
piece starts, next to it.
"""
import array
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export as te  # noqa: E402  (the regexes export.py recognizes)

CODE_POINTS = [c for c in list(range(0x40000)) + list(range(0xE0000, 0xE0200))
               if not 0xD800 <= c <= 0xDFFF]
# A letter, a number and a symbol; for Llama 3 also the apostrophe of its case-insensitive
# contractions ('s, 'll, ...), where case folding is Unicode's too (U+017F folds to s).
DELIMITERS = {"gpt2": "a1!", "llama3": "a1!'", "smollm": "a1!"}


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("unicode") / "unicode_driver")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-o", exe,
                    os.path.join(ROOT, "tests", "unicode_driver.c")], check=True)
    return exe


def hf_pre_tokenizer(kind):
    """The pre-tokenizer of each family's tokenizer.json."""
    from tokenizers import Regex, pre_tokenizers as pt
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=kind != "llama3")
    if kind == "gpt2":
        return byte_level
    if kind == "llama3":
        return pt.Sequence([pt.Split(Regex(te.LLAMA3_REGEX), behavior="isolated", invert=False),
                            byte_level])
    return pt.Sequence([pt.Digits(individual_digits=True), byte_level])   # SmolLM2


def c_piece_starts(driver, kind, text):
    out = subprocess.run([driver, "split", kind], input=text.encode(), capture_output=True,
                         check=True).stdout
    return array.array("I", out).tolist()


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "smollm"])
def test_classes_match_hf(driver, kind):
    """Where the pieces start in D c0 D c1 D ... D, for each delimiter D: tokenizer.c == HF."""
    pre = hf_pre_tokenizer(kind)
    wrong = set()
    for d in DELIMITERS[kind]:
        text = d + d.join(map(chr, CODE_POINTS)) + d
        want = [start for _, (start, _) in pre.pre_tokenize_str(text)]
        got = c_piece_starts(driver, kind, text)
        if got != want:
            # code point k sits at index 2k + 1: a differing start there is its own, one at the
            # delimiter after it too (the scan runs left to right)
            for at in set(got) ^ set(want):
                k = (at - 1) // 2
                if 0 <= k < len(CODE_POINTS):
                    wrong.add(CODE_POINTS[k])
    print(f"\n[{kind}] {len(CODE_POINTS)} code points x {len(DELIMITERS[kind])} delimiters: "
          f"{len(wrong)} split unlike HF "
          f"{' '.join(f'U+{c:04X}' for c in sorted(wrong)[:12])}")
    assert not wrong


# Each code point alone, between combining marks of classes 220 and 230 or 1 (so that reordering
# and blocking show), and after a base letter it may compose with.
NFC_TEMPLATES = ["{}", "a{}\u0316\u0301", "\u0334{}\u0301\u0334", "e{}\u0301", "\u1100{}"]


def test_nfc_matches_hf(driver):
    """tokenizer.c's NFC == HF's normalizers.NFC (Qwen2's normalizer) on every code point."""
    from tokenizers import normalizers
    nfc = normalizers.NFC()
    chars = [chr(c) for c in CODE_POINTS if c != 10]    # "\n" separates the items
    wrong = set()
    for template in NFC_TEMPLATES:
        items = [template.format(c) for c in chars]
        text = "\n".join(items)
        want = nfc.normalize_str(text).split("\n")
        got = subprocess.run([driver, "nfc"], input=text.encode(), capture_output=True,
                             check=True).stdout.decode().split("\n")
        assert len(got) == len(want) == len(items)
        wrong.update(ord(chars[k]) for k in range(len(items)) if got[k] != want[k])
    print(f"\n[nfc] {len(chars)} code points x {len(NFC_TEMPLATES)} contexts: {len(wrong)} "
          f"normalized unlike HF {' '.join(f'U+{c:04X}' for c in sorted(wrong)[:12])}")
    assert not wrong
