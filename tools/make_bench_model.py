"""A Llama-3.2-1B-shaped model with random weights, for speed comparisons only: 16 layers, dim
2048, 32 query heads and 8 kv heads of 64, feed-forward 8192, tied embeddings, RoPE theta
500000, 131072 positions. It borrows SmolLM2's tokenizer (a 49152-token GPT-2 BPE; the real
Llama 3.2 has 128256 tokens), so both engines can load it. Written as an F16 GGUF with the gguf
package; `make bench-compare` quantizes it to Q8_0 with llama.cpp's llama-quantize and exports
that file with export.py, so both engines read the same int8 weights.

    python tools/make_bench_model.py --tokenizer-from SmolLM2.gguf --out bench-1b.F16.gguf"""
import argparse
import os

import numpy as np
import gguf

DIM, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 2048, 16, 32, 8, 64, 8192

# the tokenizer fields copied from the donor model, with their gguf writer types
TOKENIZER_STRINGS = ["tokenizer.ggml.model", "tokenizer.ggml.pre"]
TOKENIZER_IDS = ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                 "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"]


def field_value(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [int(f.parts[i][0]) for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-from", required=True, help="a GGUF whose gpt2 tokenizer to copy")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    donor = gguf.GGUFReader(args.tokenizer_from)
    tokens = field_value(donor, "tokenizer.ggml.tokens")
    vocab = len(tokens)
    w = gguf.GGUFWriter(args.out + ".tmp", "llama")
    w.add_name("bench-1b (random weights, Llama-3.2-1B shape)")
    w.add_block_count(LAYERS)
    w.add_context_length(131072)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_token_list(tokens)
    w.add_token_types(field_value(donor, "tokenizer.ggml.token_type"))
    w.add_token_merges(field_value(donor, "tokenizer.ggml.merges"))
    for key in TOKENIZER_STRINGS:
        w.add_string(key, field_value(donor, key))
    for key in TOKENIZER_IDS:
        w.add_uint32(key, field_value(donor, key))
    w.add_bool("tokenizer.ggml.add_bos_token", False)

    rng = np.random.default_rng(args.seed)

    def matrix(rows, cols):   # (rows, cols) as PyTorch stores a Linear's weight
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", matrix(vocab, DIM))
    w.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32))
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(DIM, dtype=np.float32))
        w.add_tensor(b + "attn_q.weight", matrix(HEADS * HEAD_DIM, DIM))
        w.add_tensor(b + "attn_k.weight", matrix(KV_HEADS * HEAD_DIM, DIM))
        w.add_tensor(b + "attn_v.weight", matrix(KV_HEADS * HEAD_DIM, DIM))
        w.add_tensor(b + "attn_output.weight", matrix(DIM, HEADS * HEAD_DIM))
        w.add_tensor(b + "ffn_norm.weight", np.ones(DIM, dtype=np.float32))
        w.add_tensor(b + "ffn_gate.weight", matrix(FFN, DIM))
        w.add_tensor(b + "ffn_up.weight", matrix(FFN, DIM))
        w.add_tensor(b + "ffn_down.weight", matrix(DIM, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
