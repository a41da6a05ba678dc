#pragma once

// RazorAttention (razor-gguf) additions to the llama.cpp C API.
// Everything here is additive: no public llama.h struct changes, so bindings that mirror
// llama.h by hand (llama-cpp-python) keep working against the patched library.

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Bumped whenever the razor patch series changes behaviour or adds entry points.
#define LLAMA_RAZOR_PATCH_VERSION 6

// Version of the razor patch series compiled into this library.
LLAMA_API uint32_t llama_razor_patch_version(void);

// Short hash of the upstream llama.cpp commit the series was applied to.
LLAMA_API const char * llama_razor_base_commit(void);

// Comma-separated ggml backends registered in this build (e.g. "CPU" or "CUDA,CPU").
// The string is owned by the library and stays valid until the next call.
LLAMA_API const char * llama_razor_backends(void);

// Allocated KV-cache bytes of ctx: out[0] retrieval cache, out[1] local ring (sinks + window + scratch + pin rows),
// out[2] compensation state (and with pins the per-layer vectors of llama_razor_pin_capture), out[3] what a stock cache of the same context would allocate (for a
// sliding-window model, its SWA cache included). Returns 1 for a razor cache, 0 for a stock cache
// (out[0] = out[3] = its size), -1 without a KV cache.
LLAMA_API int32_t llama_razor_kv_bytes(const struct llama_context * ctx, int64_t out[4]);

// Bytes of the stock SWA cache a razor cache keeps for an interleaved sliding-window model's
// sliding-window layers (part of the razor cache's total, beside out[0..2] above); 0 otherwise.
LLAMA_API int64_t llama_razor_kv_bytes_swa(const struct llama_context * ctx);

// The head map in effect ([n_layer*n_head_kv], layer-major, 1 = retrieval), copied into out (capacity n).
// Returns the number of entries, 0 when ctx does not run the razor cache.
LLAMA_API int32_t llama_razor_head_map(const struct llama_context * ctx, int32_t * out, int32_t n);

// n_sink and window in effect (with per-layer windows, razor.layer_window_scale: the base window the scales
// multiply); returns 1 for a razor cache, 0 otherwise (outputs untouched).
LLAMA_API int32_t llama_razor_window(const struct llama_context * ctx, uint32_t * n_sink, uint32_t * n_window);

// The window of each layer's local heads ([n_layer], 0 for layers without local heads), copied into out
// (capacity n). Returns n_layer, 0 when ctx does not run the razor cache.
LLAMA_API int32_t llama_razor_layer_windows(const struct llama_context * ctx, uint32_t * out, int32_t n);

// The local rings (one per distinct window, ascending): window and allocated KV bytes of each (their sum is
// llama_razor_kv_bytes' out[1]), copied into windows and bytes (capacity n). Returns the number of rings,
// 0 when ctx does not run the razor cache.
LLAMA_API int32_t llama_razor_ring_bytes(const struct llama_context * ctx, uint32_t * windows, int64_t * bytes, int32_t n);

// Tokens per ubatch the razor cache runs: batches are split into ubatches of at most this many tokens
// (at most the context's n_ubatch; smaller where the local ring has no room for more). 0 for a stock cache.
// Programs comparing razor against the stock cache with equal ubatch boundaries use it as n_ubatch.
LLAMA_API int32_t llama_razor_n_ubatch(const struct llama_context * ctx);

// Pinned tokens (razor.n_pin > 0, a kv_override; needs razor.compensation = false). Capacity per sequence: the
// n_pin of the context (0 for a stock cache or without pins).
LLAMA_API int32_t llama_razor_n_pin(const struct llama_context * ctx);

// Pins positions of seq_id (replacing its pins): every local head keeps them beside its sinks and window. A pinned
// position's rows fill when that position is decoded, so pin before decoding it (llama_memory_clear drops every pin;
// seq_rm of a pinned position empties its rows until it is decoded again). Positions below n_sink are sinks and
// are dropped. Returns the number of pins kept, -1 when there are more than n_pin or ctx has no pins.
LLAMA_API int32_t llama_razor_set_pins(struct llama_context * ctx, llama_seq_id seq_id, const llama_pos * pos, int32_t n);

// While on, every decode records the softmax attention its queries give each cached key in the retrieval heads
// (which keep every token), summed over queries, heads and the layers with both head kinds; switching it on clears
// the record. Decode one sequence's tokens (in one ubatch) at a time while it is on. -1 without pins or without
// retrieval heads.
LLAMA_API int32_t llama_razor_pin_capture(struct llama_context * ctx, bool on);

// That record for seq_id by position: out[p] for p < n (0 for positions the retrieval cache does not hold).
// Returns n, -1 when there is nothing to read.
LLAMA_API int32_t llama_razor_pin_scores(struct llama_context * ctx, llama_seq_id seq_id, float * out, int32_t n);

#ifdef __cplusplus
}
#endif
