#!/usr/bin/env python3
"""Generate tokenizer_unicode.h: the Unicode tables tokenizer.c needs.

    pip install -r tools/requirements.txt
    python3 tools/gen_unicode.py > tokenizer_unicode.h

The tables follow HF tokenizers (the version pinned in tests/requirements.txt), whose parts
classify characters with three different Unicode versions, each matched here (measured by
tests/test_unicode.py, which holds every code point to the installed tokenizers):
  regex classes   the Split / ByteLevel regexes run on Oniguruma: \\p{L}, \\p{N}, \\s of
                  Unicode 16.0 (unicodedataplus 16.0.0.post1)
  Digits          the Digits pre-tokenizer (SmolLM2's digit split) asks Rust's char::is_numeric,
                  Unicode 17.0 for the Rust that built the pinned wheel (unicodedata2 17.0.1)
  NFC             the NFC normalizer is the unicode-normalization-alignments crate, whose
                  tables are Unicode 9.0: the 16.0 data restricted to the code points assigned
                  by 9.0 (their decompositions, combining classes and compositions are stable
                  by the Unicode stability policy; later code points are unassigned to it)

Tables (all sorted, searched by binary search in tokenizer.c):
  tok_class_ranges  code point ranges that are letters \\p{L}, numbers \\p{N}, White_Space \\s,
                    or numeric to Rust (Nd Nl No of its version); a bit each
  tok_ccc_ranges    canonical combining class of every code point whose class is not 0
  tok_nfd_*         full canonical decomposition (NFD) of every code point that has one,
                    except Hangul syllables, which tokenizer.c decomposes arithmetically
  tok_comp_pairs    (first, second) -> primary composite, for NFC composition
The regex classes follow Oniguruma: \\p{L} = Lu Ll Lt Lm Lo, \\p{N} = Nd Nl No, \\s = the
White_Space property (not Python's str.isspace, which adds U+001C..U+001F).
"""
import sys

import unicodedata2 as digits_ud        # Rust char::is_numeric's version
import unicodedataplus as regex_ud      # Oniguruma's version, and Age for the NFC data

REGEX_VERSION, DIGITS_VERSION, NFC_VERSION = "16.0.0", "17.0.0", "9.0.0"

# White_Space (PropList.txt); unicodedata does not expose the property. Unchanged since 6.3.
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
               (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
CLS_L, CLS_N, CLS_S, CLS_D = 1, 2, 4, 8
MAX_CP = 0x110000
HANGUL_S0, HANGUL_COUNT = 0xAC00, 11172


def version(s):
    return tuple(int(x) for x in s.split("."))


def check_versions():
    for mod, want in ((regex_ud, REGEX_VERSION), (digits_ud, DIGITS_VERSION)):
        if mod.unidata_version != want:
            sys.exit(f"{mod.__name__} has Unicode {mod.unidata_version}, want {want}: "
                     f"pip install -r tools/requirements.txt")


def ranges(values):
    """[(start, end, value)] for maximal runs of equal nonzero value over all code points."""
    out, start, cur = [], 0, 0
    for cp in range(MAX_CP + 1):
        v = values(cp) if cp < MAX_CP else 0
        if v != cur:
            if cur:
                out.append((start, cp - 1, cur))
            start, cur = cp, v
    return out


def char_class(cp, ws):
    if cp in ws:
        cls = CLS_S
    else:
        cat = regex_ud.category(chr(cp))[0]
        cls = CLS_L if cat == "L" else CLS_N if cat == "N" else 0
    if digits_ud.category(chr(cp))[0] == "N":
        cls |= CLS_D
    return cls


def nfc_known(cp, nfc_version=version(NFC_VERSION)):
    """Assigned by NFC_VERSION: the code points the normalizer's tables know."""
    age = regex_ud.age(chr(cp))
    return age != "Unassigned" and version(age) <= nfc_version


def nfc_tables():
    """(ccc ranges, [(cp, pool offset, length)], pool, [(first, second, composite)])."""
    ccc = ranges(lambda cp: regex_ud.combining(chr(cp)) if nfc_known(cp) else 0)
    nfd, pool, comp = [], [], []
    for cp in range(MAX_CP):
        if 0xD800 <= cp <= 0xDFFF or HANGUL_S0 <= cp < HANGUL_S0 + HANGUL_COUNT:
            continue
        if not nfc_known(cp):
            continue
        c = chr(cp)
        d = regex_ud.normalize("NFD", c)
        if d != c:
            nfd.append((cp, len(pool), len(d)))
            pool.extend(ord(x) for x in d)
        dm = regex_ud.decomposition(c)
        if dm and not dm.startswith("<"):
            parts = [int(x, 16) for x in dm.split()]
            # a primary composite: a two-code-point mapping that NFC puts back together
            if len(parts) == 2 and regex_ud.normalize("NFC", chr(parts[0]) + chr(parts[1])) == c:
                comp.append((parts[0], parts[1], cp))
    comp.sort()
    return ccc, nfd, pool, comp


def main():
    check_versions()
    ws = set(cp for a, b in WHITE_SPACE for cp in range(a, b + 1))
    classes = ranges(lambda cp: char_class(cp, ws))
    ccc, nfd, pool, comp = nfc_tables()

    w = sys.stdout.write
    w("// tokenizer_unicode.h - generated by tools/gen_unicode.py. Do not edit; rerun the script.\n"
      "// The Unicode versions of HF tokenizers' parts:\n"
      f"//   regex classes \\p{{L}} \\p{{N}} \\s (Oniguruma)      Unicode {REGEX_VERSION} "
      "(unicodedataplus)\n"
      f"//   Digits pre-tokenizer (Rust char::is_numeric)  Unicode {DIGITS_VERSION} (unicodedata2)\n"
      f"//   NFC normalizer                                Unicode {NFC_VERSION} (code points "
      "assigned later\n"
      "//                                                 are left alone)\n")
    w("#ifndef TOKENIZER_UNICODE_H\n#define TOKENIZER_UNICODE_H\n\n#include <stdint.h>\n\n")
    w(f"#define TOK_UNICODE_VERSION \"{REGEX_VERSION}\"\n")
    w(f"#define TOK_DIGITS_UNICODE_VERSION \"{DIGITS_VERSION}\"\n")
    w(f"#define TOK_NFC_UNICODE_VERSION \"{NFC_VERSION}\"\n")
    w("#define TOK_CLS_L 1  // \\p{L}\n#define TOK_CLS_N 2  // \\p{N}\n"
      "#define TOK_CLS_S 4  // \\s (White_Space)\n"
      "#define TOK_CLS_D 8  // numeric to the Digits pre-tokenizer (Rust char::is_numeric)\n\n")

    def table(decl, rows, fmt, per_line):
        w(decl + " = {\n")
        for i in range(0, len(rows), per_line):
            w("    " + " ".join(fmt(r) for r in rows[i:i + per_line]) + "\n")
        w("};\n")

    w("typedef struct { uint32_t lo, hi, value; } TokRange;\n\n")
    w(f"#define TOK_N_CLASS_RANGES {len(classes)}\n")
    table("static const TokRange tok_class_ranges[TOK_N_CLASS_RANGES]", classes,
          lambda r: "{0x%X,0x%X,%d}," % r, 6)
    w(f"\n#define TOK_N_CCC_RANGES {len(ccc)}\n")
    table("static const TokRange tok_ccc_ranges[TOK_N_CCC_RANGES]", ccc, lambda r: "{0x%X,0x%X,%d}," % r, 6)
    w(f"\n// NFD of code point tok_nfd_cp[i] is tok_nfd_pool[off .. off+len), off = tok_nfd_at[i] >> 8,\n"
      f"// len = tok_nfd_at[i] & 0xFF.\n#define TOK_N_NFD {len(nfd)}\n")
    table("static const uint32_t tok_nfd_cp[TOK_N_NFD]", nfd, lambda r: "0x%X," % r[0], 12)
    table("static const uint32_t tok_nfd_at[TOK_N_NFD]", nfd, lambda r: "0x%X," % (r[1] << 8 | r[2]), 12)
    w(f"#define TOK_NFD_POOL {len(pool)}\n")
    table("static const uint32_t tok_nfd_pool[TOK_NFD_POOL]", pool, lambda r: "0x%X," % r, 12)
    w(f"\n// Primary composites: (first, second) -> composite, sorted by (first, second).\n"
      f"#define TOK_N_COMP {len(comp)}\n")
    table("static const uint32_t tok_comp_pairs[TOK_N_COMP][3]", comp, lambda r: "{0x%X,0x%X,0x%X}," % r, 5)
    w("\n#endif // TOKENIZER_UNICODE_H\n")


if __name__ == "__main__":
    main()
