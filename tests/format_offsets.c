// Prints "Struct.field offset size" for every field of model.h's structs, so
// tests/test_format.py can check export.py's mirror of them field by field.
#include <stddef.h>
#include <stdio.h>

#include "../model.h"

#define FIELD(S, f) printf(#S "." #f " %zu %zu\n", offsetof(S, f), sizeof(((S *)0)->f))

int main(void) {
    FIELD(FileHeader, magic); FIELD(FileHeader, version); FIELD(FileHeader, header_size);
    FIELD(FileHeader, n_layers); FIELD(FileHeader, dim); FIELD(FileHeader, hidden_dim);
    FIELD(FileHeader, n_heads); FIELD(FileHeader, n_kv_heads); FIELD(FileHeader, head_dim);
    FIELD(FileHeader, vocab_size); FIELD(FileHeader, max_seq_len); FIELD(FileHeader, norm_eps);
    FIELD(FileHeader, tied_embeddings); FIELD(FileHeader, qkv_bias); FIELD(FileHeader, qk_norm);
    FIELD(FileHeader, n_tensors); FIELD(FileHeader, tensor_table_offset); FIELD(FileHeader, tokenizer_offset);
    FIELD(FileHeader, tokenizer_size); FIELD(FileHeader, file_size); FIELD(FileHeader, arch);
    FIELD(LayerConfig, attn_kind); FIELD(LayerConfig, window); FIELD(LayerConfig, rope_type);
    FIELD(LayerConfig, rotary_dim); FIELD(LayerConfig, rope_theta); FIELD(LayerConfig, factor);
    FIELD(LayerConfig, orig_ctx); FIELD(LayerConfig, attention_factor); FIELD(LayerConfig, beta_fast);
    FIELD(LayerConfig, beta_slow); FIELD(LayerConfig, mscale); FIELD(LayerConfig, mscale_all_dim);
    FIELD(LayerConfig, low_freq_factor); FIELD(LayerConfig, high_freq_factor); FIELD(LayerConfig, yarn_truncate);
    FIELD(LayerConfig, reserved);
    FIELD(TensorEntry, name); FIELD(TensorEntry, dtype); FIELD(TensorEntry, n_dims); FIELD(TensorEntry, rows);
    FIELD(TensorEntry, cols); FIELD(TensorEntry, offset); FIELD(TensorEntry, size);
    return 0;
}
