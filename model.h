// model.h - the longrun model file, defined once.
//
// A model file is one little-endian blob that export.py writes and run.c mmaps:
//
//   offset 0               FileHeader          (sizeof = LR_HEADER_SIZE)
//   header_size            LayerConfig[n_layers]  attention kind, window, RoPE per layer
//   tensor_table_offset    TensorEntry[n_tensors] name, dtype, shape, offset, size
//   tokenizer_offset       tokenizer section   (tokenizer_size bytes; 0 = none yet)
//   ...                    tensor data, each tensor starting on a LR_ALIGN boundary
//
// Every struct below is made only of 4- and 8-byte fields laid out so that the
// compiler inserts no padding; export.py mirrors them with struct format strings
// and tests/test_format.py checks that both sides agree field by field.
// Weights keep the Hugging Face layout: a matrix is (rows = out features,
// cols = in features), row-major, and q/k rows are in HF's rotate-half order.
#ifndef LONGRUN_MODEL_H
#define LONGRUN_MODEL_H

#include <stdint.h>

#define LR_MAGIC 0x4E52474Cu   // bytes "LGRN" at offset 0
#define LR_VERSION 1           // bump on any layout change; run.c reads exactly this one
#define LR_ALIGN 64            // tensor data alignment in bytes (one cache line / AVX-512 row)
#define LR_Q8_BLOCK 32         // values per scale in a q8_0 tensor
#define LR_NAME_LEN 40         // bytes of a tensor name, NUL padded

// Element types of tensor data.
//   F32, F16, BF16: rows*cols values, row-major.
//   Q8_0: rows*cols int8 values q, then rows*cols/32 float32 scales d, one per block of
//         32 consecutive values in a row (cols % 32 == 0); value = d[block] * q[i].
//         Quants and scales are kept apart so each row of quants is contiguous.
typedef enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_Q8_0 = 3, DT_COUNT } DType;

// How a layer turns positions into rotation frequencies (HF's `rope_type`s, modeling_rope_utils).
typedef enum {
    ROPE_DEFAULT = 0,  // inv_freq[i] = theta^(-2i/d)
    ROPE_LINEAR = 1,   // position interpolation: inv_freq / factor
    ROPE_DYNAMIC = 2,  // dynamic NTK: theta grows with the sequence length
    ROPE_YARN = 3,     // YaRN: per-frequency ramp between interpolation and extrapolation
    ROPE_LLAMA3 = 4,   // Llama 3.1: wavelength bands with low/high freq factors
    ROPE_LONGROPE = 5, // LongRoPE / Phi-3: per-frequency short/long factor lists
    ROPE_COUNT
} RopeType;

// Which keys a layer's queries may see.
typedef enum {
    ATTN_FULL = 0,     // every earlier position
    ATTN_SLIDING = 1,  // key k visible to query q iff q - k < window (W keys incl. itself)
    ATTN_COUNT
} AttnKind;

typedef struct {
    uint32_t magic;               // LR_MAGIC
    uint32_t version;             // LR_VERSION
    uint32_t header_size;         // sizeof(FileHeader); LayerConfig[] starts here
    uint32_t n_layers;
    uint32_t dim;                 // residual stream width (hidden_size)
    uint32_t hidden_dim;          // MLP inner width (intermediate_size)
    uint32_t n_heads;             // query heads
    uint32_t n_kv_heads;          // key/value heads (GQA: n_heads % n_kv_heads == 0)
    uint32_t head_dim;            // per-head width; need not equal dim / n_heads
    uint32_t vocab_size;
    uint32_t max_seq_len;         // trained context (max_position_embeddings)
    float norm_eps;               // RMSNorm epsilon
    uint32_t tied_embeddings;     // 1: classifier reuses tok_embd, no "output" tensor
    uint32_t qkv_bias;            // 1: blk.N.bq/bk/bv present (Qwen2)
    uint32_t qk_norm;             // 1: blk.N.q_norm/k_norm present (Qwen3)
    uint32_t n_tensors;           // entries in the tensor table
    uint64_t tensor_table_offset; // byte offset of TensorEntry[n_tensors]
    uint64_t tokenizer_offset;    // byte offset of the tokenizer section, 8-byte aligned (0: none)
    uint64_t tokenizer_size;      // its size in bytes (0: none)
    uint64_t file_size;           // total file size, so truncation is caught up front
    char arch[32];                // source architecture, NUL padded: "llama", "qwen2", ...
} FileHeader;
#define LR_HEADER_SIZE 128

// One per layer. RoPE fields hold the scaling method's parameters as Hugging Face
// names them; a field a method does not use is 0. run.c computes the frequency
// table from these, so command-line overrides work without re-exporting.
typedef struct {
    uint32_t attn_kind;           // AttnKind
    uint32_t window;              // ATTN_SLIDING: keys visible per query (incl. itself)
    uint32_t rope_type;           // RopeType
    // channels rotated per head: head_dim * partial_rotary_factor; 0 = NoPE
    uint32_t rotary_dim;
    float rope_theta;             // base b
    float factor;                 // s: linear, dynamic, yarn, llama3 (longrope: optional)
    uint32_t orig_ctx;            // original_max_position_embeddings L0 (yarn, llama3, longrope)
    float attention_factor;       // explicit attention factor a; 0 = derive from the method
    float beta_fast, beta_slow;   // yarn correction range (HF defaults 32, 1)
    float mscale, mscale_all_dim; // yarn (DeepSeek style) magnitude parameters; 0 = unset
    float low_freq_factor;        // llama3
    float high_freq_factor;       // llama3
    uint32_t yarn_truncate;       // yarn: 1 = floor/ceil the correction range (HF default)
    uint32_t reserved;            // 0
} LayerConfig;
#define LR_LAYER_CONFIG_SIZE 64

// LongRoPE factor lists, when present, are tensors "rope.short_factor" and
// "rope.long_factor" of shape (rotary_dim / 2,), F32, shared by all layers.

// Tensor names (HF layout, N = layer index):
//   tok_embd (vocab, dim)            output_norm (dim)          output (vocab, dim) if untied
//   blk.N.attn_norm (dim)            blk.N.ffn_norm (dim)
//   blk.N.wq (n_heads*head_dim, dim) blk.N.wk, blk.N.wv (n_kv_heads*head_dim, dim)
//   blk.N.wo (dim, n_heads*head_dim)
//   blk.N.bq (n_heads*head_dim)      blk.N.bk, blk.N.bv (n_kv_heads*head_dim)   if qkv_bias
//   blk.N.q_norm, blk.N.k_norm (head_dim)                                       if qk_norm
//   blk.N.w_gate, blk.N.w_up (hidden_dim, dim)   blk.N.w_down (dim, hidden_dim)
// Vectors (norms, biases, rope factors) are always F32; matrices may be any DType.
typedef struct {
    char name[LR_NAME_LEN];       // NUL padded
    uint32_t dtype;               // DType
    uint32_t n_dims;              // 1 or 2
    uint64_t rows;                // shape[0]
    uint64_t cols;                // shape[1]; 1 for a vector
    uint64_t offset;              // byte offset of the data in the file, LR_ALIGN aligned
    uint64_t size;                // bytes of data
} TensorEntry;
#define LR_TENSOR_ENTRY_SIZE 80

_Static_assert(sizeof(FileHeader) == LR_HEADER_SIZE, "FileHeader has padding");
_Static_assert(sizeof(LayerConfig) == LR_LAYER_CONFIG_SIZE, "LayerConfig has padding");
_Static_assert(sizeof(TensorEntry) == LR_TENSOR_ENTRY_SIZE, "TensorEntry has padding");

// ----------------------------------------------------------------------------
// The tokenizer section (tokenizer.c reads it, export.py writes it)
//
// FileHeader.tokenizer_offset/size locate it; every offset below is relative to the
// start of the section, and tokenizer.c checks every one against tokenizer_size.
//
//   0                TokHeader            (sizeof = LR_TOK_HEADER_SIZE)
//   entries_offset   TokEntry[n_tokens]   one per token id, in id order
//   merges_offset    TokMerge[n_merges]   every merge the BPE may make
//   strings_offset   strings_size bytes   the token strings back to back, no terminators
//
// Token strings are stored as the bytes they decode to, with two exceptions that keep
// the SentencePiece spelling: a SentencePiece piece keeps its "▁" (U+2581) for a space,
// and a byte token is "<0xNN>" with type TOK_BYTE. Byte-level BPE strings are stored
// already mapped back from the GPT-2 byte alphabet ("Ġthe" is stored as " the").
// A tokenizer-only file (export.py --tokenizer-only) is a FileHeader with n_layers = 0,
// n_tensors = 0 and this section.
#define LR_TOK_MAGIC 0x4B4F544Cu   // bytes "LTOK"
#define LR_TOK_VERSION 1

typedef enum {
    TOK_SPM = 0,        // SentencePiece BPE: pieces with "▁", byte fallback (Llama 2, Mistral)
    TOK_BYTE_BPE = 1,   // byte-level BPE over the GPT-2 byte alphabet (GPT-2, Llama 3, Qwen2)
    TOK_KIND_COUNT
} TokKind;

// The pre-tokenizer of a byte-level BPE model: the Split regex of its tokenizer.json.
typedef enum {
    TOK_PRE_NONE = 0,   // TOK_SPM: no split
    TOK_PRE_GPT2 = 1,   // 's|'t|... ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    TOK_PRE_LLAMA3 = 2, // case-insensitive contractions, \p{N}{1,3}, newline runs
    TOK_PRE_QWEN2 = 3,  // the Llama 3 regex with single digits \p{N}
    TOK_PRE_SMOLLM = 4, // every digit alone, then the GPT-2 regex
    TOK_PRE_COUNT
} TokPre;

// Where a SentencePiece model puts its dummy "▁" prefix (sentencepiece's add_dummy_prefix, HF's
// Metaspace prepend_scheme). A segment is a run of text between special tokens.
typedef enum {
    TOK_PREFIX_NONE = 0,    // never
    TOK_PREFIX_ALL = 1,     // every non-empty segment (sentencepiece; HF legacy Prepend normalizer)
    // HF Metaspace "always": every segment not already starting with a space
    TOK_PREFIX_ALWAYS = 2,
    // HF Metaspace "first": only a segment at text start not starting with a space
    TOK_PREFIX_FIRST = 3,
    TOK_PREFIX_COUNT
} TokPrefix;

// Token types, numbered as sentencepiece and GGUF number them.
typedef enum {
    TOK_NORMAL = 1,
    TOK_UNKNOWN = 2,       // <unk>
    TOK_CONTROL = 3,       // special: <s>, <|im_start|>, ... matched whole in the text
    TOK_USER_DEFINED = 4,  // added token: also matched whole in the text
    TOK_UNUSED = 5,
    TOK_BYTE = 6,          // "<0xNN>": SentencePiece byte fallback
    TOK_TYPE_END
} TokType;

// Above its TokType (TokEntry.type & TOK_TYPE_MASK), a TOK_CONTROL or TOK_USER_DEFINED token may
// carry HF AddedToken's strip flags: where the token matches, the whitespace (White_Space) right
// before it (TOK_LSTRIP) or right after it (TOK_RSTRIP) is absorbed into it, as HF tokenizers'
// AddedVocabulary does (Phi-3's <|end|>, <|user|>, ... are rstrip). Readers that predate the
// flags refuse such a token as of unknown type.
#define TOK_TYPE_MASK 0xFFu
#define TOK_LSTRIP 0x100u
#define TOK_RSTRIP 0x200u

// The chat format, detected by export.py from the model's chat_template.
typedef enum {
    CHAT_NONE = 0,
    CHAT_CHATML = 1,
    CHAT_LLAMA3 = 2,
    CHAT_LLAMA2_INST = 3,
    CHAT_COUNT
} ChatTemplate;

#define TOK_FLAG_ADD_BOS 1u        // encode() with add_bos prepends bos_id (tokenizer config)
#define TOK_FLAG_NFC 2u            // normalize each segment to Unicode NFC first (Qwen2)
// a pre-token that is already a vocab entry is emitted whole (Llama 3)
#define TOK_FLAG_IGNORE_MERGES 4u

typedef struct {
    uint32_t magic;            // LR_TOK_MAGIC
    uint32_t version;          // LR_TOK_VERSION
    uint32_t kind;             // TokKind
    uint32_t pre;              // TokPre
    uint32_t prefix;           // TokPrefix (TOK_SPM only)
    uint32_t flags;            // TOK_FLAG_*
    uint32_t n_tokens;         // vocabulary size (ids 0 .. n_tokens-1)
    uint32_t n_merges;
    int32_t bos_id;            // -1: none
    int32_t eos_id;            // -1: none
    int32_t eot_id;            // end of a chat turn (<|im_end|>, <|eot_id|>); eos_id if none
    int32_t unk_id;            // -1: none
    uint32_t chat_template;    // ChatTemplate
    uint32_t reserved[3];      // 0
    uint64_t entries_offset;   // TokEntry[n_tokens], 4-byte aligned
    uint64_t merges_offset;    // TokMerge[n_merges], 4-byte aligned
    uint64_t strings_offset;
    uint64_t strings_size;
} TokHeader;
#define LR_TOK_HEADER_SIZE 96

typedef struct {
    uint32_t offset;   // of the string, from strings_offset
    uint32_t len;      // bytes
    float score;       // SentencePiece score (higher merges first); 0 for byte-level BPE
    uint32_t type;     // TokType, | TOK_LSTRIP / TOK_RSTRIP for a special token
} TokEntry;

// left + right -> result. Lower rank merges first; on equal rank the leftmost pair
// merges first. Byte-level BPE: rank = position in the model's merges list.
// SentencePiece: one rank per result piece, ordered by its score (best first).
typedef struct {
    uint32_t left, right, result, rank;
} TokMerge;

_Static_assert(sizeof(TokHeader) == LR_TOK_HEADER_SIZE, "TokHeader has padding");
_Static_assert(sizeof(TokEntry) == 16, "TokEntry has padding");
_Static_assert(sizeof(TokMerge) == 16, "TokMerge has padding");

// ----------------------------------------------------------------------------
// The state file (run.c writes it with --save-state and maps it with --load-state)
//
// What a run's KV cache (and context memory) holds after a prefill, so that a long document is
// read once and asked many times. Little-endian, native structs, every section at a
// LR_STATE_ALIGN boundary; the sections are exactly as long as the header's counts say:
//
//   0                         StateHeader
//   sections[ST_LAYER_CONFIG] LayerConfig[n_layers]   the RoPE and window settings the run used
//   sections[ST_SLOTS]        StateSlots[n_layers]    each layer's slots, as they are now
//   sections[ST_ROPE_LEN]     uint64[n_layers]        the length each RoPE table was made for
//   sections[ST_TOKENS]       int32[n_tokens]         the text so far, one id per position
//   sections[ST_LOGITS]       float32[vocab_size]     the logits after the last token
//   sections[ST_SINK_KEYS]    float32[n_layers][max_sink][kv_dim]   sinks' f32 copies
//   sections[ST_SINK_VALUES]  the same for the values
//   sections[ST_KEYS]         n_slots rows of row_bytes: the cache's keys in its own type
//   sections[ST_VALUES]       the same for the values
//   sections[ST_MEM_KEYS]     the context memory's keys (--memory): n_layers x memory_positions
//                             rows of row_bytes, layer after layer, row p position p's key as
//                             the memory stores it (unrotated, or rotated to p: true positions)
//   sections[ST_MEM_VALUES]   the same for the values
//   sections[ST_MEM_BOUNDS]   int8[n_layers][blocks][n_kv_heads][2][head_dim]: each block's
//                             channel-wise key maximum, then minimum, in steps of its scale
//                             (the maximum rounded up, the minimum down), blocks =
//                             ceil(memory_positions / memory_block)
//   sections[ST_MEM_BOUND_SCALES] float32[n_layers][blocks][n_kv_heads]: those steps
//
// Without a memory the four memory sections are empty. The block bounds are saved, not
// recomputed from the keys at load: they cost 2 kv_dim bytes per block against the block's
// 2 B rows, and loading stays a copy instead of dequantizing every key.
// Slots no position reached yet are left as holes in the file (no disk blocks), so a state's
// disk use grows with its tokens, not with the context it was made for.
// Versions 1 (no memory fields, 9 sections) and 2 (float32 bounds) are refused: save the
// state again.
#define LR_STATE_MAGIC 0x5453524Cu   // bytes "LRST"
#define LR_STATE_VERSION 4
#define LR_STATE_ALIGN 4096          // a page: the key and value rows are mapped in place

typedef enum {
    ST_LAYER_CONFIG = 0, ST_SLOTS, ST_ROPE_LEN, ST_TOKENS, ST_LOGITS,
    ST_SINK_KEYS, ST_SINK_VALUES, ST_KEYS, ST_VALUES,
    ST_MEM_KEYS, ST_MEM_VALUES, ST_MEM_BOUNDS, ST_MEM_BOUND_SCALES, ST_COUNT
} StateSection;

// What the tokens are: a plain text (generate, ppl, logits), or a chat's opening up to the end
// of its document, where the first question goes on inside the same user message.
typedef enum { STATE_TEXT = 0, STATE_CHAT_DOCUMENT = 1, STATE_KIND_COUNT } StateKind;

typedef struct {
    uint64_t offset, size;        // bytes from the start of the file
} StateSectionEntry;

typedef struct {
    uint32_t magic;               // LR_STATE_MAGIC
    uint32_t version;             // LR_STATE_VERSION
    uint64_t model_fingerprint;   // FNV-1a of the model file (see run.c, model_fingerprint)
    uint64_t file_size;           // this file's size
    uint32_t n_layers, vocab_size;
    uint32_t kv_type;             // 0 f32, 1 f16, 2 q8 (--kv-type)
    uint32_t lminf;               // 1: the sinks are LM-Infinite's global tokens (--lminf)
    uint64_t n_sink;              // --sinks as the run resolved it
    uint64_t window;              // --window (0: the model's own)
    uint64_t limit;               // --lminf-limit as resolved
    uint64_t context;             // slots of a full-attention layer (-c)
    uint32_t max_T;               // the longest chunk the rings make room for (--chunk)
    uint32_t sink_kind;           // 0 StreamingLLM sinks, 1 LM-Infinite global tokens
    uint64_t n_slots;             // every layer's slots
    uint64_t max_sink;            // sink copies per layer
    uint64_t kv_dim;              // values in one position's key (or value)
    uint64_t row_bytes;           // bytes of one slot in the cache's type
    uint64_t n_tokens;            // positions filled
    uint32_t kind;                // StateKind
    uint32_t chat_template;       // ChatTemplate of STATE_CHAT_DOCUMENT (else 0)
    uint32_t n_kv_heads;          // kv heads in a position's key (kv_dim = n_kv_heads head_dim)
    uint32_t head_dim;            // values in one kv head's key
    // The context memory's settings (all 0 without --memory), each of which shaped what the
    // cache holds as --window does; --memory-budget only says where the rows live, and is not
    // recorded:
    uint32_t memory;              // 1: the run kept a context memory (--memory)
    uint32_t memory_block;        // B: positions per block (--memory-block)
    uint32_t memory_blocks;       // K: blocks a chunk retrieves per kv head (--memory-blocks)
    uint32_t memory_distance;     // D of the saving run (a loading run may place at another)
    uint64_t memory_positions;    // positions the memory holds: n_tokens (0 without a memory)
    StateSectionEntry sections[ST_COUNT];
} StateHeader;
#define LR_STATE_HEADER_SIZE 368

// One layer's slots (run.c's LayerSlots): sinks first, then a ring.
typedef struct {
    uint64_t first;               // the layer's first slot
    uint64_t n_sink;              // slots kept for positions 0 .. n_sink-1
    uint64_t ring;                // slots the later positions take in turn
    uint64_t window;              // keys a query sees (UINT64_MAX: all)
    uint64_t fills;               // 1: the layer holds n_sink + ring positions at most
} StateSlots;

_Static_assert(sizeof(StateHeader) == LR_STATE_HEADER_SIZE, "StateHeader has padding");
_Static_assert(sizeof(StateSlots) == 40, "StateSlots has padding");

#endif // LONGRUN_MODEL_H
