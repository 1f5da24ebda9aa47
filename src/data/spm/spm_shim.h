// C API of libllava_spm.so (see CMakeLists.txt for why it exists). Strings are (pointer, length);
// functions that fill a caller buffer return the size they need, so callers retry with a larger one.
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {
// A model from the bytes of tokenizer.model; add_dummy_prefix switched off when no_dummy_prefix.
// nullptr on failure, with the reason in err.
void* llava_spm_load(const char* bytes, size_t size, int no_dummy_prefix, char* err, size_t err_cap);
void llava_spm_free(void* model);
int llava_spm_piece_size(const void* model);
// Writes (id, begin byte, end byte) triples; returns the number of pieces, or -1 on failure.
long llava_spm_encode(const void* model, const char* text, size_t size, int64_t* triples, long cap);
// Returns the decoded length (or -1); writes min(length, cap) bytes.
long llava_spm_decode(const void* model, const int* ids, size_t n, char* out, size_t cap);
long llava_spm_id_to_piece(const void* model, int id, char* out, size_t cap);
int llava_spm_piece_to_id(const void* model, const char* piece, size_t size);
// Trains a model on `n` sentences with SentencePieceTrainer options given as `n_options` key/value pairs
// (its flag names, e.g. "model_type", "bpe"). On success returns 0 and a malloc'ed serialized model in
// *proto / *proto_size (release it with llava_spm_free_bytes); on failure -1 with the reason in err.
int llava_spm_train(const char* const* sentences, const size_t* sizes, size_t n, const char* const* options,
                    size_t n_options, char** proto, size_t* proto_size, char* err, size_t err_cap);
void llava_spm_free_bytes(char* bytes);
}
