// tokenizer.c - text <-> token ids for longrun, exactly as Hugging Face tokenizers does it.
//
// Two model kinds, as HF tokenizers runs them, both read from the tokenizer section of the
// model file (layout in model.h):
//   TOK_SPM       SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama)
//   TOK_BYTE_BPE  byte-level BPE with merge ranks and a regex pre-tokenizer (GPT-2, Llama 3,
//                 Qwen2/2.5/3, SmolLM2), written out by hand in C
//
// How to read this file:
//   UTF-8        decoding with U+FFFD for invalid bytes, exactly as Python's errors="replace"
//   Unicode      \p{L} \p{N} \s classes, digits and NFC, from the generated tokenizer_unicode.h
//                (each in the Unicode version HF tokenizers uses for it)
//   tables       hash tables: vocab string -> id, (left, right) -> merge, word cache
//   load         validate the whole section, then build the tables
//   BPE          the merge loop: a heap of candidate pairs, stale entries skipped when popped
//   pre-tokenize the GPT-2, Llama 3 / Qwen2 and SmolLM2 regexes as hand-written scanners
//   encode       special tokens (absorbing whitespace as HF lstrip/rstrip), dummy prefix, pieces,
//                BPE, byte fallback
//   decode       ids -> exact bytes, and a streaming decoder that is safe for a terminal
//
// API (run.c #includes this file; it also compiles alone, e.g. for a fuzz driver):
//   int tokenizer_load(Tokenizer *t, const uint8_t *section, size_t size,
//                      char *err, size_t err_len)
//       0 on success; -1 with a one-line reason in err. The section must stay mapped while
//       t is in use (pieces point into it). Nothing here exits or prints.
//   void tokenizer_free(Tokenizer *t)
//   size_t tokenizer_encode(Tokenizer *t, const char *text, size_t len, int add_bos, int **ids)
//       ids of text, as HF's encode(text.decode("utf-8", errors="replace"),
//       add_special_tokens=False), with BOS first if add_bos and the model has one.
//       *ids is malloc'd (free() it); on out of memory returns 0 with *ids = NULL.
//       Uses scratch buffers inside t: one Tokenizer per thread.
//   size_t tokenizer_encode_continued(Tokenizer *t, const char *text, size_t len, int **ids)
//       the same for a text that goes on from one encoded before (a chat turn): no BOS, and
//       SentencePiece adds no dummy prefix to its first run of text.
//   size_t tokenizer_encode_first(Tokenizer *t, const char *text, size_t len, int add_bos,
//                                 size_t want, int **ids)
//       at least the first `want` ids of text (all of them when want is 0), tokenizing only
//       a prefix of a long text when a word boundary makes that exact.
//   size_t tokenizer_decode(const Tokenizer *t, const int *ids, size_t n, char **out)
//       the exact bytes (special tokens as their text), malloc'd and NUL-terminated.
//   TokenStream: tokenizer_stream_init / _put / _flush print token by token, holding back an
//       incomplete UTF-8 character and escaping control characters.
//   tokenizer_bos_id, _eos_id, _eot_id (-1: none), tokenizer_add_bos (the model's policy),
//   tokenizer_vocab_size, tokenizer_chat_template, tokenizer_piece.
//   size_t utf8_valid_prefix(const char *s, size_t n): bytes before the first invalid UTF-8.
// Invalid UTF-8 input is replaced by U+FFFD, one per maximal invalid subpart (what Python
// does), before anything else, so the ids equal HF's for the replaced string.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "tokenizer_unicode.h"

// ----------------------------------------------------------------------------
// UTF-8

// For a lead byte: how many continuation bytes follow (-1: not a lead byte), and the
// range the first continuation byte must lie in (Unicode Table 3-7: no overlongs,
// no surrogates, nothing above U+10FFFF).
static int utf8_expect(uint8_t b, uint8_t *lo, uint8_t *hi) {
    *lo = 0x80;
    *hi = 0xBF;
    if (b < 0x80) return 0;
    if (b < 0xC2) return -1;
    if (b < 0xE0) return 1;
    if (b == 0xE0) *lo = 0xA0;
    if (b == 0xED) *hi = 0x9F;
    if (b < 0xF0) return 2;
    if (b == 0xF0) *lo = 0x90;
    if (b == 0xF4) *hi = 0x8F;
    if (b < 0xF5) return 3;
    return -1;
}

// Decode the character at s[i] (i < n). Returns the bytes consumed; an invalid sequence
// consumes its maximal valid prefix (at least one byte) and yields U+FFFD.
static size_t utf8_next(const uint8_t *s, size_t n, size_t i, uint32_t *cp) {
    uint8_t lo, hi, b = s[i];
    int need = utf8_expect(b, &lo, &hi);
    if (need == 0) {
        *cp = b;
        return 1;
    }
    *cp = 0xFFFD;
    if (need < 0) return 1;
    uint32_t c = b & (0x3F >> need);
    for (int k = 1; k <= need; k++) {
        if (i + k >= n || s[i + k] < lo || s[i + k] > hi) return k;
        c = c << 6 | (s[i + k] & 0x3F);
        lo = 0x80;
        hi = 0xBF;
    }
    *cp = c;
    return need + 1;
}

// The length of the longest valid UTF-8 prefix of s[0..n): n if all of it is valid.
size_t utf8_valid_prefix(const char *text, size_t n) {
    const uint8_t *s = (const uint8_t *)text;
    size_t i = 0;
    while (i < n) {  // stop at the first invalid sequence: it consumes less than its lead promises
        uint32_t c;
        uint8_t lo, hi;
        int need = utf8_expect(s[i], &lo, &hi);
        if (need < 0 || utf8_next(s, n, i, &c) != (size_t)need + 1) break;
        i += need + 1;
    }
    return i;
}

// Encode the code point c as UTF-8 into out; returns the byte count (1 to 4).
static size_t utf8_put(uint8_t *out, uint32_t c) {
    if (c < 0x80) {
        out[0] = c;
        return 1;
    }
    if (c < 0x800) {
        out[0] = 0xC0 | c >> 6;
        out[1] = 0x80 | (c & 0x3F);
        return 2;
    }
    if (c < 0x10000) {
        out[0] = 0xE0 | c >> 12;
        out[1] = 0x80 | (c >> 6 & 0x3F);
        out[2] = 0x80 | (c & 0x3F);
        return 3;
    }
    out[0] = 0xF0 | c >> 18;
    out[1] = 0x80 | (c >> 12 & 0x3F);
    out[2] = 0x80 | (c >> 6 & 0x3F);
    out[3] = 0x80 | (c & 0x3F);
    return 4;
}

// ----------------------------------------------------------------------------
// Unicode classes and NFC (tables generated by tools/gen_unicode.py)

static uint32_t range_lookup(const TokRange *r, size_t n, uint32_t c) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < r[mid].lo) hi = mid;
        else if (c > r[mid].hi) lo = mid + 1;
        else return r[mid].value;
    }
    return 0;
}

// TOK_CLS_L, TOK_CLS_N, TOK_CLS_S or 0 ("other": punctuation, symbols, marks ...), plus
// TOK_CLS_D for the characters the Digits pre-tokenizer splits off.
static uint8_t char_class(uint32_t c) {
    if (c < 128) {
        if ((c | 32) >= 'a' && (c | 32) <= 'z') return TOK_CLS_L;
        if (c >= '0' && c <= '9') return TOK_CLS_N | TOK_CLS_D;
        return (c == ' ' || (c >= 9 && c <= 13)) ? TOK_CLS_S : 0;
    }
    return range_lookup(tok_class_ranges, TOK_N_CLASS_RANGES, c);
}

static uint32_t ccc(uint32_t c) {
    return c < 0x300 ? 0 : range_lookup(tok_ccc_ranges, TOK_N_CCC_RANGES, c);
}

// Hangul syllables decompose and compose arithmetically: S = 0xAC00 + (l * 21 + v) * 28 + t for
// jamo indices l, v, t (the Unicode standard's conjoining-jamo rule, as Python's
// unicodedata.normalize applies it).
enum {
    H_S0 = 0xAC00,
    H_L0 = 0x1100,
    H_V0 = 0x1161,
    H_T0 = 0x11A7,
    H_VN = 21,
    H_TN = 28,
    H_N = 11172
};

// Append the full canonical decomposition of c to out; returns the count (at most 18).
static size_t nfd_char(uint32_t c, uint32_t *out) {
    if (c >= H_S0 && c < H_S0 + H_N) {
        uint32_t s = c - H_S0, t = s % H_TN;
        out[0] = H_L0 + s / (H_VN * H_TN);
        out[1] = H_V0 + s % (H_VN * H_TN) / H_TN;
        if (t) out[2] = H_T0 + t;
        return t ? 3 : 2;
    }
    size_t lo = 0, hi = TOK_N_NFD;
    while (c >= 0xC0 && lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < tok_nfd_cp[mid]) hi = mid;
        else if (c > tok_nfd_cp[mid]) lo = mid + 1;
        else {
            uint32_t at = tok_nfd_at[mid], len = at & 0xFF;
            memcpy(out, tok_nfd_pool + (at >> 8), len * sizeof(uint32_t));
            return len;
        }
    }
    out[0] = c;
    return 1;
}

// The primary composite of a + b, or 0.
static uint32_t compose(uint32_t a, uint32_t b) {
    if (a >= H_L0 && a < H_L0 + 19 && b >= H_V0 && b < H_V0 + H_VN)
        return H_S0 + ((a - H_L0) * H_VN + (b - H_V0)) * H_TN;
    if (a >= H_S0 && a < H_S0 + H_N && (a - H_S0) % H_TN == 0 && b > H_T0 && b < H_T0 + H_TN)
        return a + (b - H_T0);
    size_t lo = 0, hi = TOK_N_COMP;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const uint32_t *p = tok_comp_pairs[mid];
        if (a < p[0] || (a == p[0] && b < p[1])) hi = mid;
        else if (a > p[0] || b > p[1]) lo = mid + 1;
        else return p[2];
    }
    return 0;
}

// NFC of the code points c[0..n) in place (NFC is never longer than NFD, and the caller
// gives room for the NFD). Returns the new count. Steps: decompose, put combining marks in
// canonical order, then compose each mark with the last starter unless blocked (UAX #15).
static size_t nfc(uint32_t *c, size_t n, uint32_t *tmp) {
    size_t m = 0;
    for (size_t i = 0; i < n; i++) m += nfd_char(c[i], tmp + m);
    for (size_t i = 1; i < m; i++) {  // stable insertion sort of each run of non-zero classes
        uint32_t x = tmp[i], cx = ccc(x);
        size_t j = i;
        while (cx && j > 0 && ccc(tmp[j - 1]) > cx) {
            tmp[j] = tmp[j - 1];
            j--;
        }
        tmp[j] = x;
    }
    size_t out = 0, starter = 0;
    int have_starter = 0;
    uint32_t last_cc = 0;
    for (size_t i = 0; i < m; i++) {
        uint32_t x = tmp[i], cx = ccc(x), comp;
        if (have_starter && (last_cc < cx || (last_cc == 0 && out == starter + 1)) &&
            (comp = compose(c[starter], x)) != 0) {
            c[starter] = comp;
            continue;
        }
        if (cx == 0) {
            starter = out;
            have_starter = 1;
        }
        last_cc = cx;
        c[out++] = x;
    }
    return out;
}

// ----------------------------------------------------------------------------
// The Tokenizer and its hash tables

// A merge: left + right -> result, best rank first.
typedef struct {
    uint32_t rank, result;
    uint64_t key;                 // left << 32 | right, + 1 so that 0 marks an empty slot
} PairSlot;

// A cached piece: its bytes cache_bytes[key_off..+key_len), its ids cache_ids[ids_off..+n_ids).
typedef struct {
    uint64_t hash;
    uint32_t key_off, key_len, ids_off, n_ids;
} CacheSlot;

enum { CACHE_SLOTS = 1 << 16, CACHE_MAX_KEY = 64, CACHE_BYTES = 1 << 22, CACHE_IDS = 1 << 20 };

// A growing array of ids; oom is set once an allocation failed, and later pushes do nothing.
typedef struct {
    int *v;
    size_t n, cap;
    int oom;
} IdVec;

// A candidate merge of the symbols at pos and next[pos], valid while both still hold
// the ids it was made from.
typedef struct {
    uint32_t rank, pos, left, right, result;
} Cand;

typedef struct {
    uint32_t kind, pre, prefix, flags, n_tokens, chat;
    int bos_id, eos_id, eot_id, unk_id;
    const TokEntry *entries;     // (n_tokens,) points into the section
    const uint8_t *strings;      // the section's string bytes
    uint32_t *vocab;             // open-addressed: id + 1 of each non-special string, 0 = empty
    size_t vocab_mask;
    PairSlot *pairs;             // open-addressed merge table
    size_t pairs_mask;
    // id of each single byte: its byte-level char, or SPM <0xNN>; -1 none
    int byte_id[256];
    int spm_word_id;             // SPM: id of "▁" where merges never cross a word start, else -1
    int *specials;               // ids matched whole in the text, by first byte, longest first
    // specials[special_start[b] .. special_start[b+1]) start with byte b
    size_t special_start[257];
    CacheSlot *cache;            // byte-level BPE: piece bytes -> ids, cleared when full
    uint8_t *cache_bytes;
    int *cache_ids;
    size_t cache_n, cache_nbytes, cache_nids;
    // scratch, grown on demand and reused by every encode call
    int *sym, *prev, *next;      // BPE symbols: id, linked list
    size_t sym_cap;
    Cand *heap;
    size_t heap_cap;
    uint32_t *cps, *cps2;        // pre-tokenizer / NFC code points
    uint32_t *offs;              // byte offset of each code point
    uint8_t *cls;                // its class
    size_t cp_cap;
    uint8_t *buf;                // SPM: the segment with "▁" for spaces
    size_t buf_cap;
    uint8_t *nbuf;               // a segment after NFC
    size_t nbuf_cap;
} Tokenizer;

static uint64_t hash_bytes(const uint8_t *s, size_t n) {
    uint64_t h = 1469598103934665603ull;   // FNV-1a
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

// A token's TokType, without the strip flags above it (model.h).
static uint32_t token_type(const Tokenizer *t, int id) {
    return t->entries[id].type & TOK_TYPE_MASK;
}

static int is_special_type(uint32_t type) {
    return type == TOK_CONTROL || type == TOK_USER_DEFINED || type == TOK_UNKNOWN;
}

static const uint8_t *piece_bytes(const Tokenizer *t, int id, size_t *len) {
    *len = t->entries[id].len;
    return t->strings + t->entries[id].offset;
}

// The id of a non-special token spelled s[0..n), or -1.
static int vocab_find(const Tokenizer *t, const uint8_t *s, size_t n) {
    for (size_t i = hash_bytes(s, n) & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        uint32_t v = t->vocab[i];
        if (v == 0) return -1;
        size_t len;
        const uint8_t *p = piece_bytes(t, v - 1, &len);
        if (len == n && memcmp(p, s, n) == 0) return v - 1;
    }
}

static const PairSlot *pair_find(const Tokenizer *t, int left, int right) {
    uint64_t key = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;
    for (size_t i = hash_u64(key) & t->pairs_mask;; i = (i + 1) & t->pairs_mask) {
        if (t->pairs[i].key == key) return &t->pairs[i];
        if (t->pairs[i].key == 0) return NULL;
    }
}

static size_t table_size(size_t n) {  // a power of two at least twice n
    size_t s = 16;
    while (s < 2 * n) s *= 2;
    return s;
}

// ----------------------------------------------------------------------------
// Loading: check every offset, count, length and id against the section, then index it.
// Each step below returns 0, or -1 with a one-line reason in err; tokenizer_load frees what
// the steps before the failing one built.

// Write the reason the section is refused into err and return -1.
#define LOAD_FAIL(...)                       \
    do {                                     \
        snprintf(err, err_len, __VA_ARGS__); \
        return -1;                           \
    } while (0)

void tokenizer_free(Tokenizer *t) {
    void *owned[] = { t->vocab, t->pairs, t->specials, t->cache, t->cache_bytes, t->cache_ids,
                      t->sym, t->prev, t->next, t->heap, t->cps, t->cps2, t->offs, t->cls,
                      t->buf, t->nbuf };
    for (size_t i = 0; i < sizeof(owned) / sizeof(owned[0]); i++)
        free(owned[i]);
    memset(t, 0, sizeof(*t));
}

// 1 if the table [off, off + count * elem) lies inside a section of `size` bytes.
static int table_fits(uint64_t off, uint64_t count, uint64_t elem, uint64_t size) {
    return off <= size && count <= (size - off) / elem;
}

// The value of an upper-case hexadecimal digit, or -1.
static int hex_digit(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// "<0xNN>" -> NN, or -1.
static int byte_piece_value(const uint8_t *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int hi = hex_digit(s[3]);
    int lo = hex_digit(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

static const Tokenizer *sort_ctx;  // qsort has no context argument

static int compare_specials(const void *a, const void *b) {
    size_t la, lb;
    const uint8_t *pa = piece_bytes(sort_ctx, *(const int *)a, &la);
    const uint8_t *pb = piece_bytes(sort_ctx, *(const int *)b, &lb);
    if (pa[0] != pb[0]) return pa[0] - pb[0];
    if (la != lb) return la > lb ? -1 : 1;  // longest first, so the first match is the longest
    return *(const int *)a - *(const int *)b;
}

// The header's own fields: magic, version, known kinds and flags, counts in range, and the
// kind going with its pre-tokenizer and prefix scheme.
static int check_header_fields(const TokHeader *h, char *err, size_t err_len) {
    if (h->magic != LR_TOK_MAGIC) LOAD_FAIL("bad magic 0x%08X", h->magic);
    if (h->version != LR_TOK_VERSION)
        LOAD_FAIL("version %u, this build reads %d; re-export with export.py", h->version,
                  LR_TOK_VERSION);
    if (h->kind >= TOK_KIND_COUNT) LOAD_FAIL("unknown kind %u", h->kind);
    if (h->pre >= TOK_PRE_COUNT) LOAD_FAIL("unknown pre-tokenizer %u", h->pre);
    if (h->prefix >= TOK_PREFIX_COUNT) LOAD_FAIL("unknown prefix scheme %u", h->prefix);
    if ((h->kind == TOK_SPM) != (h->pre == TOK_PRE_NONE) ||
        (h->kind == TOK_BYTE_BPE && h->prefix != TOK_PREFIX_NONE))
        LOAD_FAIL("kind %u does not go with pre-tokenizer %u / prefix %u", h->kind, h->pre,
                  h->prefix);
    if (h->flags & ~(TOK_FLAG_ADD_BOS | TOK_FLAG_NFC | TOK_FLAG_IGNORE_MERGES))
        LOAD_FAIL("unknown flags 0x%X", h->flags);
    if (h->chat_template >= CHAT_COUNT) LOAD_FAIL("unknown chat template %u", h->chat_template);
    if (h->n_tokens == 0 || h->n_tokens > (1u << 24))
        LOAD_FAIL("n_tokens %u out of range [1, 2^24]", h->n_tokens);
    if (h->n_merges > (1u << 26)) LOAD_FAIL("n_merges %u out of range", h->n_merges);
    return 0;
}

// The three tables inside the section (the two of 4-byte fields aligned), and the special
// token ids -1 or a token.
static int check_header_tables(const TokHeader *h, size_t size, char *err, size_t err_len) {
    if (h->entries_offset % 4 ||
        !table_fits(h->entries_offset, h->n_tokens, sizeof(TokEntry), size))
        LOAD_FAIL("token table (offset %llu, %u entries) misaligned or past the end (%zu bytes)",
                  (unsigned long long)h->entries_offset, h->n_tokens, size);
    if (h->merges_offset % 4 || !table_fits(h->merges_offset, h->n_merges, sizeof(TokMerge), size))
        LOAD_FAIL("merge table (offset %llu, %u entries) misaligned or past the end (%zu bytes)",
                  (unsigned long long)h->merges_offset, h->n_merges, size);
    if (!table_fits(h->strings_offset, h->strings_size, 1, size) || h->strings_size > UINT32_MAX)
        LOAD_FAIL("strings (offset %llu, %llu bytes) run past the end (%zu bytes)",
                  (unsigned long long)h->strings_offset, (unsigned long long)h->strings_size,
                  size);
    int ids[4] = { h->bos_id, h->eos_id, h->eot_id, h->unk_id };
    const char *id_names[4] = { "bos_id", "eos_id", "eot_id", "unk_id" };
    for (int k = 0; k < 4; k++)
        if (ids[k] < -1 || ids[k] >= (int)h->n_tokens)
            LOAD_FAIL("%s %d out of range", id_names[k], ids[k]);
    return 0;
}

// Read and check the header into *h, and take its settings into t.
static int read_header(Tokenizer *t, TokHeader *h, const uint8_t *section, size_t size,
                       char *err, size_t err_len) {
    if (size < sizeof(*h))
        LOAD_FAIL("%zu bytes, shorter than its %d-byte header", size, LR_TOK_HEADER_SIZE);
    memcpy(h, section, sizeof(*h));
    if (check_header_fields(h, err, err_len) < 0 || check_header_tables(h, size, err, err_len) < 0)
        return -1;
    t->kind = h->kind;
    t->pre = h->pre;
    t->prefix = h->prefix;
    t->flags = h->flags;
    t->n_tokens = h->n_tokens;
    t->chat = h->chat_template;
    t->bos_id = h->bos_id;
    t->eos_id = h->eos_id;
    t->eot_id = h->eot_id >= 0 ? h->eot_id : h->eos_id;   // no end-of-turn token: end of text
    t->unk_id = h->unk_id;
    t->entries = (const TokEntry *)(section + h->entries_offset);
    t->strings = section + h->strings_offset;
    return 0;
}

// Every token: a string inside the string table, a known type; byte tokens spelled <0xNN>
// (and only in SPM models), special tokens valid UTF-8 (else a match would split a character).
// Fills t->byte_id from the byte tokens and counts the non-empty special tokens.
static int check_tokens(Tokenizer *t, uint64_t strings_size, size_t *n_special, char *err,
                        size_t err_len) {
    for (int b = 0; b < 256; b++)
        t->byte_id[b] = -1;
    *n_special = 0;
    for (uint32_t i = 0; i < t->n_tokens; i++) {
        const TokEntry *e = &t->entries[i];
        uint32_t type = token_type(t, i);
        uint32_t strip = e->type & ~TOK_TYPE_MASK;
        if (e->offset > strings_size || e->len > strings_size - e->offset)
            LOAD_FAIL("token %u string (offset %u, %u bytes) outside the string table", i,
                      e->offset, e->len);
        if (type < TOK_NORMAL || type >= TOK_TYPE_END || (strip & ~(TOK_LSTRIP | TOK_RSTRIP)))
            LOAD_FAIL("token %u has unknown type %u", i, e->type);
        if (strip && type != TOK_CONTROL && type != TOK_USER_DEFINED)
            LOAD_FAIL("token %u strips whitespace but is not a special token", i);
        if (e->len == 0 && type != TOK_UNUSED) LOAD_FAIL("token %u is empty", i);
        size_t len;
        const uint8_t *p = piece_bytes(t, i, &len);
        if (type == TOK_BYTE) {
            int v = byte_piece_value(p, len);
            if (v < 0 || t->kind != TOK_SPM)
                LOAD_FAIL("byte token %u is not <0xNN> in an SPM model", i);
            if (t->byte_id[v] < 0) t->byte_id[v] = i;
        }
        if (is_special_type(type) && utf8_valid_prefix((const char *)p, len) < len)
            LOAD_FAIL("special token %u is not valid UTF-8", i);
        *n_special += is_special_type(type) && len > 0;
    }
    return 0;
}

// The vocabulary hash of the non-special strings (each string at most once; in a byte-level
// model the one-byte strings are the byte tokens), and the special tokens sorted by first byte,
// longest first, with the start of each first byte's bucket.
static int index_vocab(Tokenizer *t, size_t n_special, char *err, size_t err_len) {
    t->vocab_mask = table_size(t->n_tokens) - 1;
    t->vocab = calloc(t->vocab_mask + 1, sizeof(uint32_t));
    t->specials = malloc((n_special + 1) * sizeof(int));
    if (!t->vocab || !t->specials) LOAD_FAIL("out of memory loading the tokenizer");
    size_t n = 0;
    for (uint32_t i = 0; i < t->n_tokens; i++) {
        size_t len;
        const uint8_t *p = piece_bytes(t, i, &len);
        if (len == 0) continue;
        if (is_special_type(token_type(t, i))) {
            t->specials[n++] = i;
            continue;
        }
        int twin = vocab_find(t, p, len);
        if (twin >= 0) LOAD_FAIL("tokens %d and %u are the same string (%zu bytes)", twin, i, len);
        size_t k = hash_bytes(p, len) & t->vocab_mask;
        while (t->vocab[k]) k = (k + 1) & t->vocab_mask;
        t->vocab[k] = i + 1;
        if (t->kind == TOK_BYTE_BPE && len == 1 && t->byte_id[p[0]] < 0) t->byte_id[p[0]] = i;
    }
    sort_ctx = t;
    qsort(t->specials, n, sizeof(int), compare_specials);
    for (size_t i = 0, b = 0; b <= 256; b++) {  // bucket boundaries by first byte
        while (i < n && t->strings[t->entries[t->specials[i]].offset] < b) i++;
        t->special_start[b] = i;
    }
    return 0;
}

// The merge table: every merge must spell its result exactly (left + right); of two merges of
// the same pair the first (better) rank stays. SPM models whose merges never put anything
// before a "▁" get t->spm_word_id, so that encode_spm can merge word by word.
static int index_merges(Tokenizer *t, const TokMerge *merges, uint32_t n_merges, char *err,
                        size_t err_len) {
    int crosses_words = 0;
    t->pairs_mask = table_size(n_merges) - 1;
    t->pairs = calloc(t->pairs_mask + 1, sizeof(PairSlot));
    if (!t->pairs) LOAD_FAIL("out of memory loading the tokenizer");
    for (uint32_t i = 0; i < n_merges; i++) {
        TokMerge m = merges[i];
        if (m.left >= t->n_tokens || m.right >= t->n_tokens || m.result >= t->n_tokens)
            LOAD_FAIL("merge %u has a token id out of range (%u %u -> %u)", i, m.left, m.right,
                      m.result);
        size_t ll, lr, lm;
        const uint8_t *pl = piece_bytes(t, m.left, &ll);
        const uint8_t *pr = piece_bytes(t, m.right, &lr);
        const uint8_t *pm = piece_bytes(t, m.result, &lm);
        if (ll == 0 || lr == 0 || lm != ll + lr || memcmp(pm, pl, ll) || memcmp(pm + ll, pr, lr))
            LOAD_FAIL("merge %u: token %u is not token %u followed by token %u", i, m.result,
                      m.left, m.right);
        if (lr >= 3 && !memcmp(pr, "\xE2\x96\x81", 3)) crosses_words = 1;   // X + "▁..."
        if (pair_find(t, m.left, m.right)) continue;
        uint64_t key = ((uint64_t)m.left << 32 | m.right) + 1;
        size_t k = hash_u64(key) & t->pairs_mask;
        while (t->pairs[k].key) k = (k + 1) & t->pairs_mask;
        t->pairs[k] = (PairSlot){ m.rank, m.result, key };
    }
    t->spm_word_id = t->kind == TOK_SPM && !crosses_words
            ? vocab_find(t, (const uint8_t *)"\xE2\x96\x81", 3)
            : -1;
    return 0;
}

int tokenizer_load(Tokenizer *t, const uint8_t *section, size_t size, char *err, size_t err_len) {
    memset(t, 0, sizeof(*t));
    TokHeader h;
    size_t n_special;
    if (read_header(t, &h, section, size, err, err_len) < 0 ||
        check_tokens(t, h.strings_size, &n_special, err, err_len) < 0 ||
        index_vocab(t, n_special, err, err_len) < 0 ||
        index_merges(t, (const TokMerge *)(section + h.merges_offset), h.n_merges, err,
                     err_len) < 0) {
        tokenizer_free(t);
        return -1;
    }
    return 0;
}

int tokenizer_bos_id(const Tokenizer *t) { return t->bos_id; }
int tokenizer_eos_id(const Tokenizer *t) { return t->eos_id; }
int tokenizer_eot_id(const Tokenizer *t) { return t->eot_id; }
int tokenizer_add_bos(const Tokenizer *t) {
    return (t->flags & TOK_FLAG_ADD_BOS) && t->bos_id >= 0;
}
int tokenizer_vocab_size(const Tokenizer *t) { return (int)t->n_tokens; }
int tokenizer_chat_template(const Tokenizer *t) { return (int)t->chat; }
// The stored spelling of a token (model.h: SPM keeps "▁", byte-level is raw bytes).
const char *tokenizer_piece(const Tokenizer *t, int id, size_t *len) {
    return (const char *)piece_bytes(t, id, len);
}

// ----------------------------------------------------------------------------
// BPE: merge adjacent symbols, best rank first (ties: leftmost), in O(n log n)
//
// llama2.c rescans every pair after each merge (O(n^2)); here every adjacent pair that has a
// merge sits in a min-heap keyed by (rank, position). Merging a and b into a kills b and
// pushes the two new pairs (prev, a) and (a, next). Pairs that involved the old a or b stay
// in the heap and are skipped when popped: a symbol's id only ever gets longer, so a
// candidate is still valid iff both its symbols still hold the ids it recorded.

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 1;
    size_t c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return 0;
    *p = q;
    *cap = c;
    return 1;
}

static void vec_push(IdVec *v, int id) {
    if (v->oom || !grow((void **)&v->v, &v->cap, v->n + 1, sizeof(int))) {
        v->oom = 1;
        return;
    }
    v->v[v->n++] = id;
}

static int cand_less(const Cand *a, const Cand *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static int heap_push(Tokenizer *t, size_t *n, Cand c) {
    if (!grow((void **)&t->heap, &t->heap_cap, *n + 1, sizeof(Cand))) return 0;
    size_t i = (*n)++;
    while (i > 0 && cand_less(&c, &t->heap[(i - 1) / 2])) {
        t->heap[i] = t->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    t->heap[i] = c;
    return 1;
}

static Cand heap_pop(Tokenizer *t, size_t *n) {
    Cand top = t->heap[0], last = t->heap[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && cand_less(&t->heap[c + 1], &t->heap[c])) c++;
        if (!cand_less(&t->heap[c], &last)) break;
        t->heap[i] = t->heap[c];
        i = c;
    }
    if (*n) t->heap[i] = last;
    return top;
}

// Push the pair starting at symbol i if it has a merge.
static int push_pair(Tokenizer *t, size_t *hn, int i) {
    if (i < 0 || t->next[i] < 0) return 1;
    int j = t->next[i];
    const PairSlot *p = pair_find(t, t->sym[i], t->sym[j]);
    if (!p) return 1;
    return heap_push(
            t, hn,
            (Cand){ p->rank, (uint32_t)i, (uint32_t)t->sym[i], (uint32_t)t->sym[j], p->result });
}

// Merge the symbols t->sym[first..end) and append the resulting ids to out.
static void bpe(Tokenizer *t, size_t first, size_t end, IdVec *out) {
    size_t hn = 0;
    for (size_t i = first; i < end; i++) {
        t->prev[i] = i > first ? (int)i - 1 : -1;
        t->next[i] = i + 1 < end ? (int)i + 1 : -1;
    }
    for (size_t i = first; i + 1 < end; i++) {
        if (!push_pair(t, &hn, i)) {
            out->oom = 1;
            return;
        }
    }
    while (hn > 0) {
        Cand c = heap_pop(t, &hn);
        int a = c.pos, b = t->next[a];
        if (b < 0 || t->sym[a] != (int)c.left || t->sym[b] != (int)c.right) continue;  // stale
        t->sym[a] = c.result;
        t->next[a] = t->next[b];
        if (t->next[b] >= 0) t->prev[t->next[b]] = a;
        t->sym[b] = -1;
        if (!push_pair(t, &hn, t->prev[a]) || !push_pair(t, &hn, a)) {
            out->oom = 1;
            return;
        }
    }
    for (int i = first < end ? (int)first : -1; i >= 0; i = t->next[i]) vec_push(out, t->sym[i]);
}

static int reserve_symbols(Tokenizer *t, size_t n) {
    size_t cap = t->sym_cap, cap2 = t->sym_cap, cap3 = t->sym_cap;
    int ok = grow((void **)&t->sym, &cap, n, sizeof(int)) &&
            grow((void **)&t->prev, &cap2, n, sizeof(int)) &&
            grow((void **)&t->next, &cap3, n, sizeof(int));
    if (ok) t->sym_cap = cap;
    return ok;
}

// ----------------------------------------------------------------------------
// Pre-tokenizers: each Split regex of the tokenizer.json files (GPT-2, Llama 3, Qwen2, SmolLM)
// as a scanner over the code points of a segment
//
// Each function returns where the piece that starts at code point i ends. Alternation is
// ordered, as in the regex: the first alternative that matches wins, not the longest.

#define IS(k, c) (cls[k] & (c))
#define OTHER(k) (!IS(k, TOK_CLS_L | TOK_CLS_N | TOK_CLS_S))

static size_t run_of(const uint8_t *cls, size_t i, size_t n, uint8_t c) {
    while (i < n && IS(i, c)) i++;
    return i;
}

static size_t run_other(const uint8_t *cls, size_t i, size_t n) {
    while (i < n && OTHER(i)) i++;
    return i;
}

// Length of a contraction 's 't 're 've 'm 'll 'd after the apostrophe at i, or 0.
// With fold (Llama 3's (?i:...)) letters match either case; Oniguruma's case folding also
// takes U+017F (long s) for s.
static size_t contraction(const uint32_t *cp, size_t i, size_t n, int fold) {
    if (cp[i] != '\'' || i + 1 >= n) return 0;
    uint32_t a = cp[i + 1], b = i + 2 < n ? cp[i + 2] : 0;
    if (fold) {
        if (a == 0x17F) a = 's';
        if (a < 128) a |= 32;
        if (b < 128 && ((b | 32) >= 'a' && (b | 32) <= 'z')) b |= 32;
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

// \s+(?!\S)|\s+ at i (cp[i] is whitespace): a run of whitespace gives its last character
// back to the next piece unless it ends the text.
static size_t whitespace_piece(const uint8_t *cls, size_t i, size_t n) {
    size_t k = run_of(cls, i, n, TOK_CLS_S);
    if (k == n) return n;
    return k - i >= 2 ? k - 1 : i + 1;
}

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
static size_t gpt2_piece(const uint32_t *cp, const uint8_t *cls, size_t i, size_t n) {
    size_t k = contraction(cp, i, n, 0);
    if (k) return i + k;
    size_t j = i + (cp[i] == ' ' && i + 1 < n);
    if (IS(j, TOK_CLS_L)) return run_of(cls, j, n, TOK_CLS_L);
    if (IS(j, TOK_CLS_N)) return run_of(cls, j, n, TOK_CLS_N);
    if (OTHER(j)) return run_other(cls, j, n);
    return whitespace_piece(cls, i, n);
}

// Llama 3 (max_digits 3) and Qwen2 (max_digits 1):
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
//     | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+   (one regex, cut at a '|')
static size_t llama3_piece(const uint32_t *cp, const uint8_t *cls, size_t i, size_t n,
                           size_t max_digits) {
    size_t k = contraction(cp, i, n, 1);
    if (k) return i + k;
    int newline = cp[i] == '\r' || cp[i] == '\n';
    if (IS(i, TOK_CLS_L)) return run_of(cls, i, n, TOK_CLS_L);
    if (!newline && !IS(i, TOK_CLS_N) && i + 1 < n && IS(i + 1, TOK_CLS_L))
        return run_of(cls, i + 1, n, TOK_CLS_L);
    if (IS(i, TOK_CLS_N)) {
        k = run_of(cls, i, n, TOK_CLS_N);
        return k - i > max_digits ? i + max_digits : k;
    }
    size_t j = i + (cp[i] == ' ' && i + 1 < n);
    if (OTHER(j)) {
        k = run_other(cls, j, n);
        while (k < n && (cp[k] == '\r' || cp[k] == '\n')) k++;
        return k;
    }
    k = run_of(cls, i, n, TOK_CLS_S);  // \s*[\r\n]+ : up to the last newline of the run
    for (size_t p = k; p > i; p--)
        if (cp[p - 1] == '\r' || cp[p - 1] == '\n') return p;
    return whitespace_piece(cls, i, n);
}

// End of the piece starting at i of the code points [0, n) of a segment.
static size_t next_piece(const Tokenizer *t, const uint32_t *cp, const uint8_t *cls, size_t i,
                         size_t n) {
    switch (t->pre) {
    case TOK_PRE_LLAMA3: return llama3_piece(cp, cls, i, n, 3);
    case TOK_PRE_QWEN2: return llama3_piece(cp, cls, i, n, 1);
    default: return gpt2_piece(cp, cls, i, n);   // GPT-2, and SmolLM within a run
    }
}

// The end of the stretch starting at code point i that the split regex sees as a whole text.
// SmolLM's HF Sequence[Digits(individual_digits), ByteLevel] splits off each digit first, so
// the GPT-2 regex runs on each stretch between digits; the other families see the segment.
// HF's Digits takes Rust's char::is_numeric, whose Unicode version is not the regex's:
// hence its own class bit, TOK_CLS_D.
static size_t pre_split_end(const Tokenizer *t, const uint8_t *cls, size_t i, size_t n) {
    if (t->pre != TOK_PRE_SMOLLM) return n;
    if (IS(i, TOK_CLS_D)) return i + 1;
    while (i < n && !IS(i, TOK_CLS_D)) i++;
    return i;
}

// The end of the piece that starts at code point i of the segment t->cps[0..n). *stretch is
// the end of the current stretch (start with 0): found again only once i reaches it.
static size_t piece_end(const Tokenizer *t, size_t i, size_t n, size_t *stretch) {
    if (i >= *stretch) *stretch = pre_split_end(t, t->cls, i, n);
    return next_piece(t, t->cps, t->cls, i, *stretch);
}

// ----------------------------------------------------------------------------
// Encoding

// The word cache (~10 MB) is allocated by the first byte-level encode: loading and decoding
// never need it. 0 when out of memory.
static int reserve_cache(Tokenizer *t) {
    if (t->cache) return 1;
    t->cache = calloc(CACHE_SLOTS, sizeof(CacheSlot));
    t->cache_bytes = malloc(CACHE_BYTES);
    t->cache_ids = malloc(CACHE_IDS * sizeof(int));
    if (t->cache && t->cache_bytes && t->cache_ids) return 1;
    free(t->cache);
    free(t->cache_bytes);
    free(t->cache_ids);
    t->cache = NULL;
    t->cache_bytes = NULL;
    t->cache_ids = NULL;
    return 0;
}

// A byte-level piece: from the cache, or whole (ignore_merges), or by BPE over its bytes.
static void encode_piece(Tokenizer *t, const uint8_t *s, size_t n, IdVec *out) {
    if (!reserve_cache(t)) {
        out->oom = 1;
        return;
    }
    uint64_t h = hash_bytes(s, n);
    size_t slot = h & (CACHE_SLOTS - 1);
    int cacheable = n <= CACHE_MAX_KEY;
    for (; cacheable && t->cache[slot].key_len; slot = (slot + 1) & (CACHE_SLOTS - 1)) {
        CacheSlot *c = &t->cache[slot];
        if (c->hash == h && c->key_len == n && memcmp(t->cache_bytes + c->key_off, s, n) == 0) {
            for (uint32_t k = 0; k < c->n_ids; k++) vec_push(out, t->cache_ids[c->ids_off + k]);
            return;
        }
    }
    size_t start = out->n;
    int whole = (t->flags & TOK_FLAG_IGNORE_MERGES) ? vocab_find(t, s, n) : -1;
    if (whole >= 0) {
        vec_push(out, whole);
    } else {
        if (!reserve_symbols(t, n)) {
            out->oom = 1;
            return;
        }
        size_t m = 0;
        for (size_t k = 0; k < n; k++)  // a byte missing from the vocabulary is dropped, as HF does
            if (t->byte_id[s[k]] >= 0) t->sym[m++] = t->byte_id[s[k]];
        bpe(t, 0, m, out);
    }
    if (!cacheable || out->oom) return;
    size_t n_ids = out->n - start;
    if (t->cache_n >= CACHE_SLOTS / 2 || t->cache_nbytes + n > CACHE_BYTES ||
        t->cache_nids + n_ids > CACHE_IDS) {
        memset(t->cache, 0, CACHE_SLOTS * sizeof(CacheSlot));  // full: start over
        t->cache_n = t->cache_nbytes = t->cache_nids = 0;
        slot = h & (CACHE_SLOTS - 1);
    }
    memcpy(t->cache_bytes + t->cache_nbytes, s, n);
    if (n_ids) memcpy(t->cache_ids + t->cache_nids, out->v + start, n_ids * sizeof(int));
    t->cache[slot] = (CacheSlot){ h, (uint32_t)t->cache_nbytes, (uint32_t)n,
                                  (uint32_t)t->cache_nids, (uint32_t)n_ids };
    t->cache_n++;
    t->cache_nbytes += n;
    t->cache_nids += n_ids;
}

// Decode s[0..n) (valid UTF-8) into t->cps / t->offs / t->cls; with NFC, normalize first and
// re-encode into t->nbuf. Returns the code point count; *text points at the bytes to use.
static size_t segment_code_points(Tokenizer *t, const uint8_t **text, size_t *n_bytes, int *oom) {
    const uint8_t *s = *text;
    size_t n = *n_bytes, m = 0;
    size_t cap = t->cp_cap, cap2 = t->cp_cap, cap3 = t->cp_cap, cap4 = t->cp_cap;
    // NFD grows a character to at most 18
    size_t need = (t->flags & TOK_FLAG_NFC) ? 18 * n + 1 : n + 1;
    if (!grow((void **)&t->cps, &cap, need, 4) || !grow((void **)&t->cps2, &cap2, need, 4) ||
        !grow((void **)&t->offs, &cap3, need, 4) || !grow((void **)&t->cls, &cap4, need, 1)) {
        *oom = 1;
        return 0;
    }
    t->cp_cap = cap;
    // the code points and the byte offset of each, as read
    for (size_t i = 0; i < n; m++) {
        t->offs[m] = i;
        i += utf8_next(s, n, i, &t->cps[m]);
    }
    int needs_nfc = 0;
    // any >= U+0300
    for (size_t i = 0; i < n && (t->flags & TOK_FLAG_NFC) && !needs_nfc; i++)
        needs_nfc = s[i] >= 0xCC;
    if (needs_nfc) {   // the normalized text, re-encoded, and its offsets
        m = nfc(t->cps, m, t->cps2);
        if (!grow((void **)&t->nbuf, &t->nbuf_cap, 4 * m + 1, 1)) {
            *oom = 1;
            return 0;
        }
        size_t nb = 0;
        for (size_t i = 0; i < m; i++) {
            t->offs[i] = nb;
            nb += utf8_put(t->nbuf + nb, t->cps[i]);
        }
        *text = t->nbuf;
        *n_bytes = nb;
    }
    for (size_t i = 0; i < m; i++) t->cls[i] = char_class(t->cps[i]);
    t->offs[m] = *n_bytes;
    return m;
}

// SentencePiece: the dummy prefix, spaces -> "▁", one symbol per character (or its
// <0xNN> bytes when the character is not a piece), then BPE. When no merge joins anything to
// a "▁" on its right (t->spm_word_id >= 0; true of sentencepiece's own training), no merge
// crosses the start of a word, so each word is merged alone: the same ids, and small heaps
// instead of one over the whole text.
static void encode_spm(Tokenizer *t, const uint8_t *s, size_t n, int at_text_start, IdVec *out) {
    // at_text_start < 0: the run continues a text encoded before it, so it gets no prefix
    int prefix = t->prefix == TOK_PREFIX_ALL || (t->prefix == TOK_PREFIX_ALWAYS && s[0] != ' ') ||
                 (t->prefix == TOK_PREFIX_FIRST && at_text_start == 1 && s[0] != ' ');
    if (at_text_start < 0) prefix = 0;
    if (!grow((void **)&t->buf, &t->buf_cap, 3 * n + 3, 1) || !reserve_symbols(t, 3 * n + 3)) {
        out->oom = 1;
        return;
    }
    size_t nb = 0;
    if (prefix) {
        memcpy(t->buf, "\xE2\x96\x81", 3);
        nb = 3;
    }
    for (size_t i = 0; i < n; i++) {
        if (s[i] == ' ') {
            memcpy(t->buf + nb, "\xE2\x96\x81", 3);
            nb += 3;
        } else {
            t->buf[nb++] = s[i];
        }
    }
    size_t m = 0;
    for (size_t i = 0; i < nb;) {
        uint32_t c;
        size_t len = utf8_next(t->buf, nb, i, &c);
        int id = vocab_find(t, t->buf + i, len);
        if (id >= 0) t->sym[m++] = id;
        for (size_t k = 0; id < 0 && k < len; k++) {
            int b = t->byte_id[t->buf[i + k]];
            if (b < 0 && t->unk_id < 0) continue;
            if (b < 0 && m > 0 && t->sym[m - 1] == t->unk_id) continue;  // HF fuse_unk
            t->sym[m++] = b >= 0 ? b : t->unk_id;
        }
        i += len;
    }
    // BPE over each word: the symbols up to the next "▁" piece (or all of them, as one word)
    for (size_t first = 0, end = 1; first < m; end++) {
        if (end == m || t->sym[end] == t->spm_word_id) {
            bpe(t, first, end, out);
            first = end;
        }
    }
}

// One run of text between special tokens.
static void encode_segment(Tokenizer *t, const uint8_t *s, size_t n, int at_text_start,
                           IdVec *out) {
    if (n == 0) return;
    size_t m = 0;
    int oom = 0;
    if (t->kind == TOK_BYTE_BPE || (t->flags & TOK_FLAG_NFC))
        m = segment_code_points(t, &s, &n, &oom);
    if (oom) {
        out->oom = 1;
        return;
    }
    if (t->kind == TOK_SPM) {
        encode_spm(t, s, n, at_text_start, out);
        return;
    }
    size_t stretch = 0;
    for (size_t i = 0, j; i < m && !out->oom; i = j) {
        j = piece_end(t, i, m, &stretch);
        encode_piece(t, s + t->offs[i], t->offs[j] - t->offs[i], out);
    }
}

// The longest special token starting at s[0..n), or -1.
static int match_special(const Tokenizer *t, const uint8_t *s, size_t n, size_t *len) {
    for (size_t k = t->special_start[s[0]]; k < t->special_start[s[0] + 1]; k++) {
        int id = t->specials[k];
        const uint8_t *p = piece_bytes(t, id, len);
        if (*len <= n && memcmp(p, s, *len) == 0) return id;
    }
    return -1;
}

// HF AddedToken's lstrip / rstrip (model.h TOK_LSTRIP, TOK_RSTRIP): the White_Space a special
// token absorbs on its left, down to the end of the previous match, and on its right, as
// tokenizers' AddedVocabulary::find_matches does. s is valid UTF-8 here.

// Bytes of the White_Space character that ends at s[end] and starts at or after s[lo], or 0.
static size_t space_before(const uint8_t *s, size_t lo, size_t end) {
    for (size_t k = 1; k <= 3 && k <= end - lo; k++) {   // White_Space is at most 3 bytes
        if ((s[end - k] & 0xC0) == 0x80) continue;       // a continuation byte: look further
        uint32_t c;
        size_t len = utf8_next(s, end, end - k, &c);
        return len == k && (char_class(c) & TOK_CLS_S) ? k : 0;
    }
    return 0;
}

// end, less the run of White_Space that ends there (not going before lo).
static size_t trim_space_end(const uint8_t *s, size_t lo, size_t end) {
    size_t k;
    while ((k = space_before(s, lo, end)) > 0) end -= k;
    return end;
}

// i, past the run of White_Space that starts there.
static size_t skip_space(const uint8_t *s, size_t i, size_t n) {
    while (i < n) {
        uint32_t c;
        size_t len = utf8_next(s, n, i, &c);
        if (!(char_class(c) & TOK_CLS_S)) break;
        i += len;
    }
    return i;
}

// continued: the text goes on from one encoded before (see tokenizer_encode_continued).
static size_t encode_text(Tokenizer *t, const char *text, size_t len, int add_bos, int continued,
                          int **ids) {
    IdVec out = {0};
    const uint8_t *s = (const uint8_t *)text;
    uint8_t *clean = NULL;
    // Invalid UTF-8 -> U+FFFD (3 bytes for each invalid byte at most).
    size_t i;
    if (utf8_valid_prefix(text, len) < len) {
        clean = malloc(3 * len);
        if (!clean) {
            *ids = NULL;
            return 0;
        }
        size_t nb = 0;
        for (i = 0; i < len;) {
            uint32_t c;
            i += utf8_next(s, len, i, &c);
            nb += utf8_put(clean + nb, c);
        }
        s = clean;
        len = nb;
    }
    if (add_bos && t->bos_id >= 0) vec_push(&out, t->bos_id);
    int first = continued ? -1 : 1;   // what the first run of text is to encode_segment
    size_t seg = 0;
    for (i = 0; i < len && !out.oom; i++) {
        size_t n;
        int id = t->special_start[s[i] + 1] > t->special_start[s[i]]
                ? match_special(t, s + i, len - i, &n)
                : -1;
        if (id < 0) continue;
        uint32_t strip = t->entries[id].type;
        size_t end = (strip & TOK_LSTRIP) ? trim_space_end(s, seg, i) : i;
        encode_segment(t, s + seg, end - seg, seg == 0 ? first : 0, &out);
        vec_push(&out, id);
        seg = (strip & TOK_RSTRIP) ? skip_space(s, i + n, len) : i + n;
        i = seg - 1;
    }
    if (!out.oom) encode_segment(t, s + seg, len - seg, seg == 0 ? first : 0, &out);
    free(clean);
    // a terminating 0, so that even an empty result is a valid pointer
    vec_push(&out, 0);
    if (out.oom) {
        free(out.v);
        *ids = NULL;
        return 0;
    }
    out.n--;
    *ids = out.v;
    return out.n;
}

size_t tokenizer_encode(Tokenizer *t, const char *text, size_t len, int add_bos, int **ids) {
    return encode_text(t, text, len, add_bos, 0, ids);
}

// A text that continues one encoded before it (a chat turn after the first): its first run of
// text is the tail of an earlier run, so SentencePiece gives it no dummy "▁" prefix, as when
// HF encodes the whole conversation at once. Byte-level BPE encodes it as tokenizer_encode.
size_t tokenizer_encode_continued(Tokenizer *t, const char *text, size_t len, int **ids) {
    return encode_text(t, text, len, 0, 1, ids);
}

static int ascii_letter(unsigned char c) { return (c | 0x20) >= 'a' && (c | 0x20) <= 'z'; }

// Whether text[0..p) can be tokenized alone as the start of text[0..len): p is a space
// between two ASCII letters ("a b") and no special token spans it. Every pre-tokenizer of
// byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2) ends a piece at the letter and starts the
// next one at the space, and SentencePiece, when its merges never cross a word start, merges
// each "▁"-word alone: the prefix's ids are then the first ids of the whole text.
static int word_boundary(Tokenizer *tok, const char *text, size_t len, size_t p) {
    const unsigned char *s = (const unsigned char *)text;
    if (p == 0 || p + 1 >= len || s[p] != ' ' || !ascii_letter(s[p - 1]) ||
        !ascii_letter(s[p + 1]))
        return 0;
    for (size_t i = p > 256 ? p - 256 : 0; i < p; i++) {   // a special token across p?
        size_t n;
        if (tok->special_start[s[i] + 1] > tok->special_start[s[i]] &&
            match_special(tok, s + i, len - i, &n) >= 0 && i + n > p)
            return 0;
    }
    return 1;
}

// The ids of text, or (want > 0) at least its first `want` ids: then only a prefix that ends
// at a word boundary is tokenized, about 8 bytes a token, doubled until it holds enough, so
// -m ppl --ppl-tokens N on a huge file costs what N tokens cost.
size_t tokenizer_encode_first(Tokenizer *tok, const char *text, size_t len, int add_bos,
                              size_t want, int **ids) {
    int may_cut = want && (tok->kind == TOK_BYTE_BPE || tok->spm_word_id >= 0);
    for (size_t cut = want * 8 + 1024; may_cut && cut < len && cut < SIZE_MAX / 4; cut *= 2) {
        size_t p = cut;
        while (p < len && !word_boundary(tok, text, len, p)) p++;
        if (p >= len) break;
        size_t n = tokenizer_encode(tok, text, p, add_bos, ids);
        if (!*ids || n >= want) return n;
        free(*ids);
    }
    return tokenizer_encode(tok, text, len, add_bos, ids);
}

// ----------------------------------------------------------------------------
// Decoding

// The bytes a token stands for. SPM: "▁" becomes a space and <0xNN> the byte NN.
// Writes at most the stored length into out; returns the count.
static size_t token_text(const Tokenizer *t, int id, uint8_t *out) {
    size_t len;
    const uint8_t *p = piece_bytes(t, id, &len);
    if (t->kind != TOK_SPM) {
        memcpy(out, p, len);
        return len;
    }
    if (token_type(t, id) == TOK_BYTE) {
        out[0] = (uint8_t)byte_piece_value(p, len);
        return 1;
    }
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (i + 2 < len && memcmp(p + i, "\xE2\x96\x81", 3) == 0) {
            out[n++] = ' ';
            i += 2;
        } else {
            out[n++] = p[i];
        }
    }
    return n;
}

// ids -> bytes, like HF decode(ids, skip_special_tokens=False); SPM drops the one leading
// space its dummy prefix added (HF's Strip decoder). Out-of-range ids decode to nothing.
size_t tokenizer_decode(const Tokenizer *t, const int *ids, size_t n, char **out) {
    size_t cap = 1;
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < (int)t->n_tokens) cap += t->entries[ids[i]].len;
    uint8_t *buf = malloc(cap);
    if (!buf) {
        *out = NULL;
        return 0;
    }
    size_t len = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < (int)t->n_tokens) len += token_text(t, ids[i], buf + len);
    if (t->kind == TOK_SPM && t->prefix != TOK_PREFIX_NONE && len > 0 && buf[0] == ' ')
        memmove(buf, buf + 1, --len);
    buf[len] = 0;
    *out = (char *)buf;
    return len;
}

// Streaming output for a terminal: bytes of a character split across tokens are held
// until it is complete; invalid UTF-8 prints U+FFFD; control characters other than \t and
// \n print as \xNN; control tokens (<s>, <|im_end|>) print nothing.
typedef struct {
    const Tokenizer *t;
    uint8_t pending[4];   // the bytes of an incomplete character so far
    int n_pending, need;  // bytes held, bytes the character has in total
    int at_start;         // SPM: drop the dummy-prefix space of the next piece
} TokenStream;

// at_start: the output starts a text (SPM then drops the leading space of the first piece,
// as it does after BOS).
void tokenizer_stream_init(TokenStream *s, const Tokenizer *t, int at_start) {
    memset(s, 0, sizeof(*s));
    s->t = t;
    s->at_start = at_start;
}

static void stream_char(const uint8_t *b, int n, FILE *f) {
    uint32_t c;
    utf8_next(b, n, 0, &c);
    if (c == '\n' || c == '\t' || (c >= 0x20 && c != 0x7F && (c < 0x80 || c >= 0xA0)))
        fwrite(b, 1, n, f);
    else fprintf(f, "\\x%02X", (unsigned)c);
}

static void stream_byte(TokenStream *s, uint8_t b, FILE *f) {
    for (;;) {
        if (s->n_pending == 0) {
            uint8_t lo, hi;
            int need = utf8_expect(b, &lo, &hi);
            if (need < 0) {
                fputs("\xEF\xBF\xBD", f);
                return;
            }
            s->pending[0] = b;
            s->n_pending = 1;
            s->need = need + 1;
        } else {
            uint8_t lo = 0x80, hi = 0xBF;
            if (s->n_pending == 1) utf8_expect(s->pending[0], &lo, &hi);
            if (b < lo || b > hi) {  // the held bytes are an invalid prefix; b starts afresh
                fputs("\xEF\xBF\xBD", f);
                s->n_pending = 0;
                continue;
            }
            s->pending[s->n_pending++] = b;
        }
        if (s->n_pending == s->need) {
            stream_char(s->pending, s->need, f);
            s->n_pending = 0;
        }
        return;
    }
}

void tokenizer_stream_put(TokenStream *s, int id, FILE *f) {
    const Tokenizer *t = s->t;
    if (id < 0 || id >= (int)t->n_tokens) return;
    uint32_t type = token_type(t, id);
    if (type == TOK_CONTROL || type == TOK_UNKNOWN) {
        if (id == t->bos_id) s->at_start = 1;
        return;
    }
    uint8_t small[64],
            *buf = t->entries[id].len <= sizeof(small) ? small : malloc(t->entries[id].len);
    if (!buf) return;
    size_t n = token_text(t, id, buf), i = 0;
    if (s->at_start && t->kind == TOK_SPM && t->prefix != TOK_PREFIX_NONE && n > 0 && buf[0] == ' ')
        i = 1;
    s->at_start = 0;
    for (; i < n; i++) stream_byte(s, buf[i], f);
    if (buf != small) free(buf);
}

// End of output: a character still incomplete prints as U+FFFD.
void tokenizer_stream_flush(TokenStream *s, FILE *f) {
    if (s->n_pending) fputs("\xEF\xBF\xBD", f);
    s->n_pending = 0;
    fflush(f);
}
