#pragma once

// RazorAttention KV cache (razor-gguf).
//
// Retrieval KV heads keep every token in a full cache (kv_retr). Every other ("local") KV head keeps
// n_sink attention sinks, the n_window most recent positions and one compensation row per query in a
// small ring (a llama_kv_cache of its own): the mean of the evicted keys and values, weighted by their count l
// through a log(l) term in the attention mask. Eviction depends only on positions, so every local head of a
// ring evicts the same tokens; only the running sums (Σk, Σv) are per layer and head. They live in an
// F32 "compensation state" tensor per layer, one column per sequence, and are updated inside the graph.
//
// Semantics (exact per token, independent of the ubatch size): a query at position p of a local head
// sees positions < n_sink, positions in (p - n_window, p] and a compensation row over every position
// in [n_sink, p - n_window] of its sequence.
//
// Windows per layer (razor.layer_window_scale, KV-Compress's variable compression rates, allocated per layer by
// embed-heads): the local heads of layer il keep window(il) recent positions, one ring per distinct window. Eviction
// then depends on positions and the ring: the fold state and plan are per ring.
//
// Pinned tokens (razor.n_pin, off by default; needs the compensation row off): each sequence may pin up to n_pin
// positions (llama_razor_set_pins) that every local head then keeps beside its sinks and window, in n_pin rows of
// each ring set aside per sequence (beside the scratch rows, never handed out by the ring). A pinned token is
// copied into its pin row when it is decoded; a query at p of a local head sees it from p - window on, when its
// ring row is hidden, so it is never counted twice. Which tokens to pin: a read of the prompt can record what the
// retrieval heads (which see every token) attend to from the prompt's last tokens (llama_razor_pin_capture /
// llama_razor_pin_scores); the prompt is then read again with the chosen positions pinned.
//
// Interleaved sliding-window models (Gemma 2/3 and the other models llama.cpp serves with llama_kv_cache_iswa):
// only the global (full-attention) layers are split; the sliding-window layers keep llama.cpp's own SWA cache
// (kv_swa), unchanged.

#include "llama-kv-cache.h"

#include <functional>
#include <memory>
#include <vector>

struct llama_model_loader;
struct llama_cparams;

struct llama_razor_config {
    bool     enabled   = false;
    uint32_t n_sink    = 4;
    uint32_t n_window  = 512;
    uint32_t n_layer   = 0;
    uint32_t n_head_kv = 0;

    // razor.compensation: the log(l)-weighted mean row of the evicted tokens (SPEC); off = sinks + window only,
    // with neither the sums, nor the scratch rows, nor the fold in the graph
    bool compensation = true;

    // razor.n_pin: rows per sequence and ring for pinned tokens (0 = none)
    uint32_t n_pin = 0;

    std::vector<int32_t> head_map; // [n_layer*n_head_kv], layer-major, 1 = retrieval (0 in sliding-window layers)

    // sliding-window layers (iSWA models): served by the stock SWA cache, neither retrieval nor local heads
    std::vector<bool> layer_swa; // [n_layer]

    // razor.kv_budget (fraction of the full cache) / razor.kv_budget_bytes: when set, each context derives its
    // window from the budget (llama_razor_fit_budget); 0 = unset. A razor.window given at load time wins
    float   kv_budget       = 0.0f;
    int64_t kv_budget_bytes = 0;
    // the budget is the model's default (written by embed-heads), not one given at load time: a context it
    // cannot serve (the retrieval heads alone exceed it) runs razor.window instead of failing
    bool    kv_budget_from_model = false;

    bool has_budget() const { return kv_budget > 0.0f || kv_budget_bytes > 0; }

    // ring rows set aside for the margin (LLAMA_RAZOR_MARGIN for a window fitted to a budget); otherwise the
    // margin takes what the padding leaves
    uint32_t n_margin_min = 0;

    // razor.layer_window_scale: layer il's local heads keep max(1, round(scale*n_window)) recent positions; empty =
    // n_window for every layer. embed-heads writes scales averaging 1 over the local heads, so n_window (and a budget)
    // buys about the memory of a uniform window. razor.layer_windows = false (a kv_override) ignores them
    std::vector<float> layer_window_scale; // [n_layer]

    uint32_t window(uint32_t il) const;
    uint32_t max_window() const; // over the layers with local heads

    bool     is_swa     (uint32_t il) const { return !layer_swa.empty() && layer_swa[il]; }
    uint32_t n_retrieval(uint32_t il) const;
    uint32_t n_local    (uint32_t il) const { return is_swa(il) ? 0 : n_head_kv - n_retrieval(il); }
};

// evicted rows kept in the ring beyond the window, so that trims of that many tokens are exact (every graph
// re-adds them to the sums: keep decode cheap)
#define LLAMA_RAZOR_MARGIN 64u

// a local ring of a context, per stream: sinks + window of each of its n_seq_stream sequences, the margin,
// one ubatch of new tokens and, with the compensation row, one scratch row per query, padded to 256 cells (the
// flash-attention kernels' KV stride). The razor cache splits batches into ubatches of n_ubatch tokens (at most the context's):
// max(32, window/4) plus what the padding leaves, so that this slack costs about half the window, not 2 x n_ubatch
struct llama_razor_ring {
    uint32_t n_window = 0;
    uint32_t size     = 0;
    uint32_t n_ubatch = 0;
    uint32_t n_margin = 0;
};

// the rings of a context, one per distinct window of cfg (ascending), sharing the smallest ring's ubatch
std::vector<llama_razor_ring> llama_razor_rings_for(const llama_razor_config & cfg, uint32_t n_seq_stream, uint32_t n_ubatch, uint32_t kv_size);

struct llama_model;

// cells of the stock SWA cache of an iSWA model for a context (llama_kv_cache_iswa's rule)
uint32_t llama_razor_swa_size(const llama_hparams & hp, bool swa_full, bool unified, uint32_t kv_size, uint32_t n_seq_max, uint32_t n_ubatch);

// the bytes a razor cache of cfg would allocate for a context, without allocating: out[0] retrieval cache,
// out[1] local rings, out[2] compensation sums (each at most 256 bytes per tensor above the allocation),
// out[3] a stock cache of the same context, out[4] the stock SWA cache of an iSWA model's sliding-window
// layers (in both: the razor cache keeps it)
void llama_razor_bytes_for(
        const llama_model & model,
 const llama_razor_config & cfg,
                ggml_type   type_k,
                ggml_type   type_v,
                     bool   unified,
                     bool   swa_full,
                 uint32_t   kv_size,
                 uint32_t   n_seq_max,
                 uint32_t   n_ubatch,
                  int64_t   out[5]);

// sets cfg.n_window (with layer scales: the base they multiply) to the largest window whose cache fits cfg's budget for this context (no-op without a
// budget); false when the budget covers the full cache (the stock cache fits), throws when even a window of
// one token does not fit, naming the smallest budget possible
bool llama_razor_fit_budget(
        const llama_model & model,
       llama_razor_config & cfg,
                ggml_type   type_k,
                ggml_type   type_v,
                     bool   swa_full,
      const llama_cparams & cparams);

// reads the razor.* metadata (kv_overrides apply: razor.enabled, razor.n_sink, razor.window,
// razor.retrieval_ratio re-applied to the stored scores); nullptr when the model carries no head map
std::shared_ptr<llama_razor_config> llama_razor_config_load(llama_model_loader & ml, const llama_hparams & hparams);

// nullptr when the razor cache can serve this model and context, otherwise the reason it cannot
const char * llama_razor_unsupported(const llama_model & model, const llama_razor_config & cfg, const llama_cparams & cparams);

struct llama_memory_params;

// the razor cache for a context of model, or nullptr (after one log line saying why, when razor is on)
// when the stock memory should serve it: razor off, a model or context razor cannot run, no local head
llama_memory_i * llama_razor_create_memory(
        const llama_model & model,
 const llama_razor_config & cfg,
const llama_memory_params & params,
      const llama_cparams & cparams);

class llama_kv_cache_razor : public llama_memory_i {
public:
    // the stored sums lag the eviction frontier by up to n_margin positions: the rows in between stay in
    // the ring and are re-added every graph, so trimming up to n_margin tokens is exact
    struct seq_state {
        uint32_t  l = 0;  // number of tokens in the stored sums
        llama_pos g = -1; // every cached position in [n_sink, g] is in the stored sums
    };

    // the local heads of the layers with one window: their ring and the fold state of its sequences
    struct ring_group {
        llama_razor_ring geom;
        uint32_t n_scratch = 0;         // compensation rows per stream (one per query of a ubatch)
        uint32_t n_pin_rows = 0;        // pin rows per stream: n_pin per sequence of the stream, before the scratch rows
        llama_hparams hparams;          // n_head_kv_arr = the local heads of this ring's layers, 0 elsewhere
        std::unique_ptr<llama_kv_cache> kv;
        std::vector<seq_state> seqs;    // [n_seq_max]

        uint32_t n_window() const { return geom.n_window; }
        uint32_t n_margin() const { return geom.n_margin; }
        uint32_t pin_base() const { return geom.size - n_scratch - n_pin_rows; }
    };

    // the pinned positions of a sequence (ascending) and whether each one's rows hold its token
    struct pin_state {
        std::vector<llama_pos> pos;
        std::vector<uint8_t>   filled;
    };

    // kv_swa: the stock cache of an iSWA model's sliding-window layers (nullptr for other models)
    llama_kv_cache_razor(
            const llama_model & model,
     const llama_razor_config & cfg,
                    ggml_type   type_k,
                    ggml_type   type_v,
                         bool   offload,
                         bool   unified,
                     uint32_t   kv_size,
                     uint32_t   n_seq_max,
                     uint32_t   n_ubatch,
std::unique_ptr<llama_kv_cache> kv_swa);

    ~llama_kv_cache_razor() = default;

    //
    // llama_memory_i
    //

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override;

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id)                                                          override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    //
    // razor API
    //

    llama_kv_cache * get_retr() const { return kv_retr.get(); } // nullptr when no head is a retrieval head
    uint32_t n_rings() const { return rings.size(); }
    const ring_group & get_ring(uint32_t r) const { return *rings[r]; }
    llama_kv_cache * get_loc(uint32_t r) const { return rings[r]->kv.get(); }
    int32_t ring_of(int32_t il) const { return ring_idx[il]; } // -1 for layers without local heads
    llama_kv_cache * get_swa () const { return kv_swa.get(); }  // nullptr unless the model is iSWA

    const llama_razor_config & get_config() const { return cfg; }

    uint32_t n_retrieval(int32_t il) const { return cfg.n_retrieval(il); }
    uint32_t n_local    (int32_t il) const { return cfg.n_local(il); }

    // KV head order [retrieval..., local...] of layer il and its inverse
    const std::vector<int32_t> & perm    (int32_t il) const { return perms[il]; }
    const std::vector<int32_t> & inv_perm(int32_t il) const { return inv_perms[il]; }
    // the first KV head of layer il's retrieval heads where they are contiguous at either end of the layer's
    // heads (0: first, n_local: last; then the head groups are views and need no permutation), else -1
    int32_t retr_head0(int32_t il) const { return retr_head0s[il]; }

    ggml_tensor * get_comp(int32_t il) const { return comp[il]; }

    // pinned tokens: false when there are more than n_pin positions (positions below n_sink are sinks already
    // and dropped). The rows fill as the pinned positions are decoded
    bool set_pins(llama_seq_id seq_id, std::vector<llama_pos> pos);
    const pin_state & get_pins(llama_seq_id seq_id) const { return pins[seq_id]; }
    // the ring row (within its stream) of pin j of seq_id
    uint32_t pin_col(uint32_t r, llama_seq_id seq_id, uint32_t j) const;

    // the retrieval heads' attention of the next graphs' queries, per key, kept for llama_razor_pin_scores
    // (split layers with retrieval heads; nullptr elsewhere)
    ggml_tensor * get_pin_score(int32_t il) const { return pin_score.empty() ? nullptr : pin_score[il]; }
    bool pin_capture() const { return capture; }
    void set_pin_capture(bool on);
    // out[pos] (pos < n): that attention summed over the layers, for each position of seq_id in the retrieval
    // cache; false without a retrieval cache
    bool pin_scores(llama_seq_id seq_id, float * out, int32_t n) const;

    uint32_t get_n_ubatch() const { return n_ubatch; }

    // bytes: retrieval cache, local rings, compensation state, a stock cache of the same context, and the stock
    // SWA cache of an iSWA model (0 otherwise; counted in the stock equivalent too)
    void kv_bytes(int64_t out[5]) const;

    // bytes of ring r's KV (its part of out[1] above)
    int64_t ring_bytes(uint32_t r) const;

    // fold plan of one ubatch; computed in apply() once the ubatch has been placed in kv_loc
    struct fold_plan {
        uint32_t n_tokens = 0;
        uint32_t n_seqs   = 0;

        uint32_t n_rows = 0;             // rows per sequence: n_margin + n_tokens
        std::vector<int32_t> rows;       // [n_seqs*n_rows] kv_loc rows (stream*size + cell) evicted but not in the stored
                                         //   sums, n_rows per sequence in position order, padded with row 0
        std::vector<std::vector<std::pair<uint32_t, llama_pos>>> hide; // per sequence: (mask column, pos) of cached
                                         //   evicted cells, by position: hidden from the queries that evicted them
        std::vector<int32_t> pick;       // [n_tokens + n_seqs] running-sum row giving each query's and sequence's sums
        std::vector<float>   scale;      // [n_tokens + n_seqs] 1/l for the queries (0 when l == 0), 1 for the sequences
        std::vector<int64_t> state_cols; // [n_seqs] column of each ubatch sequence in the comp state
        std::vector<int64_t> scratch;    // [n_tokens] kv_loc row receiving each query's compensation row
        std::vector<float>   log_l;      // [n_tokens] mask value of the compensation row (-inf when l == 0)
        std::vector<uint32_t> scratch_col; // [n_tokens] column of the compensation row in the query's mask row

        std::vector<int32_t> pin_src;    // kv_loc rows (stream*size + cell) of this ubatch's pinned tokens
        std::vector<int64_t> pin_dst;    // the pin rows they are copied into
        std::vector<std::vector<std::pair<uint32_t, llama_pos>>> pinned; // per sequence: (mask column, pos) of the
                                         //   filled pins, shown to the queries they have left the window of
    };

    // places the plan of ubatch in ring r into plan and advances that ring's fold state
    bool plan_ubatch(uint32_t r, const llama_ubatch & ubatch, fold_plan & plan);

private:
    const llama_model & model;
    const llama_razor_config cfg;

    // a copy with n_head_kv_arr = retrieval head counts (the cache keeps a reference)
    llama_hparams hparams_retr;

    const uint32_t n_seq_max;
    const bool     unified;
    uint32_t       n_ubatch = 0; // of every ring

    std::unique_ptr<llama_kv_cache> kv_retr;
    std::unique_ptr<llama_kv_cache> kv_swa;

    std::vector<std::unique_ptr<ring_group>> rings; // ascending window
    std::vector<int32_t> ring_idx;                  // [n_layer] ring of the layer's local heads, -1 without

    std::vector<std::vector<int32_t>> perms;
    std::vector<std::vector<int32_t>> inv_perms;
    std::vector<int32_t> retr_head0s;

    // compensation state: per layer with local heads, F32 [n_embd_k_loc + n_embd_v_loc, n_seq_max] sums
    std::vector<ggml_tensor *> comp;
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> comp_bufs;

    std::vector<pin_state> pins;           // [n_seq_max]
    std::vector<ggml_tensor *> pin_score;  // per layer, F32 [retrieval cache size] (with n_pin only)
    bool capture = false;

    // drops the pins of seq_id (-1: every sequence) whose positions are in [p0, p1), or all of them
    void unpin(llama_seq_id seq_id, llama_pos p0, llama_pos p1);
    void drop_pins(llama_seq_id seq_id, const char * caller, const char * what);
    // fn(tensor, offset, bytes) for the K and V pin rows of seq_id in every ring layer
    void for_each_pin_block(llama_seq_id s, const std::function<void(ggml_tensor *, size_t, size_t)> & fn) const;

    int64_t bytes_full_equiv = 0;

    // waits for the context's last graph: seq ops read and write the sums outside the graph, and on an
    // asynchronous backend (CUDA) that graph may still be updating them when llama_decode has returned
    std::function<void()> sync_graph;

    void comp_col_get(int32_t il, llama_seq_id s, std::vector<float> & dst) const;
    void comp_col_set(int32_t il, llama_seq_id s, const std::vector<float> & src);

    bool any_folded(llama_seq_id s) const;
    void reset_seq(llama_seq_id s);

    // positions move (seq_add, seq_div) and the rotated compensation sums cannot follow: sequences with folded
    // tokens lose their row (one warning each, naming caller and what it does); the others stay exact
    void reset_folded(llama_seq_id seq_id, const char * caller, const char * what);

    friend void llama_razor_set_graph_sync(llama_memory_i * mem, std::function<void()> sync);
};

class llama_kv_cache_razor_context : public llama_memory_context_i {
public:
    using slot_info_vec_t = llama_kv_cache::slot_info_vec_t;

    llama_kv_cache_razor_context(llama_memory_status status);

    // full-cache context, for reserving worst-case graphs
    llama_kv_cache_razor_context(llama_kv_cache_razor * kv);

    // update context
    llama_kv_cache_razor_context(llama_kv_cache_razor * kv, llama_context * lctx, bool optimize);

    // batch context
    llama_kv_cache_razor_context(
            llama_kv_cache_razor * kv,
            slot_info_vec_t sinfos_retr,
            std::vector<slot_info_vec_t> sinfos_loc,
            slot_info_vec_t sinfos_swa,
            std::vector<llama_ubatch> ubatches);

    virtual ~llama_kv_cache_razor_context();

    bool next()  override;
    bool apply() override;

    llama_memory_status  get_status() const override;
    const llama_ubatch & get_ubatch() const override;

    const llama_kv_cache_context * get_retr() const; // nullptr without retrieval heads
    const llama_kv_cache_context * get_loc (uint32_t r) const;
    const llama_kv_cache_context * get_swa () const; // nullptr unless the model is iSWA

    const llama_kv_cache_razor * get_razor() const { return kv; }

    const llama_kv_cache_razor::fold_plan & get_plan(uint32_t r) const { return plans[r]; }

private:
    llama_kv_cache_razor * kv = nullptr;

    size_t i_next = 0;

    std::vector<llama_ubatch> ubatches;

    llama_memory_context_ptr ctx_retr;
    std::vector<llama_memory_context_ptr> ctx_loc; // per ring
    llama_memory_context_ptr ctx_swa;

    llama_memory_status status;

    llama_memory_status combined_status() const;

    std::vector<llama_kv_cache_razor::fold_plan> plans; // per ring
};

//
// graph
//

struct llm_graph_context;

class llm_graph_input_attn_kv_razor : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_kv_razor(
            const llama_hparams & hparams,
            const llama_cparams & cparams,
            const llama_kv_cache_razor_context * mctx);

    void set_input(const llama_ubatch * ubatch) override;

    bool can_reuse(const llm_graph_params & params) override;

    const llama_kv_cache_razor_context * mctx_razor;

    // per local ring
    struct ring_inp {
        ggml_tensor * k_idxs      = nullptr; // I64 [n_tokens]
        ggml_tensor * v_idxs      = nullptr; // I64 [n_tokens]
        ggml_tensor * kq_mask     = nullptr; // F32/F16 [n_kv_ring, n_tokens/n_stream, 1, n_stream]

        ggml_tensor * fold_rows   = nullptr; // I32 [n_rows*n_seqs]
        ggml_tensor * fold_pick   = nullptr; // I32 [n_tokens + n_seqs]
        ggml_tensor * fold_scale  = nullptr; // F32 [1, n_tokens + n_seqs]
        ggml_tensor * scratch_idx = nullptr; // I64 [n_tokens]

        ggml_tensor * pin_src     = nullptr; // I32 [n_pinned]: only in graphs of ubatches holding pinned tokens
        ggml_tensor * pin_dst     = nullptr; // I64 [n_pinned]
    };
    std::vector<ring_inp> rings;

    ggml_tensor * state_get   = nullptr; // I32 [n_seqs]: the ubatch's sequences (every ring's)
    ggml_tensor * state_set   = nullptr; // I64 [n_seqs]

    std::vector<ggml_tensor *> perm;     // per layer, I32 [n_head_kv, n_tokens], only for layers with both head
                                         // kinds where the retrieval heads are not contiguous at one end

    bool capture = false;                // the graph records the retrieval heads' attention (llama_razor_pin_capture)
    std::vector<ggml_tensor *> inv_perm;
};

// iSWA models: the global layers run build_attn() over the razor input, the sliding-window layers over a stock
// input of the SWA cache (llm_graph_input_attn_kv_iswa::razor_base / razor_swa)
class llm_graph_input_attn_kv_iswa_razor : public llm_graph_input_attn_kv_iswa {
public:
    llm_graph_input_attn_kv_iswa_razor(
            const llama_hparams & hparams,
            const llama_cparams & cparams,
            std::unique_ptr<llm_graph_input_attn_kv_razor> inp_razor,
            std::unique_ptr<llm_graph_input_attn_kv>       inp_swa);

    void set_input(const llama_ubatch * ubatch) override;

    bool can_reuse(const llm_graph_params & params) override;

    std::unique_ptr<llm_graph_input_attn_kv_razor> inp_razor;
    std::unique_ptr<llm_graph_input_attn_kv>       inp_swa;
};

// extra graph nodes the razor attention needs (head permutation, fold, split attention), 0 without razor
uint32_t llama_razor_n_graph_nodes(const llama_memory_i * mem);

// how the razor cache waits for the context's in-flight graph before it touches its sums (no-op otherwise)
void llama_razor_set_graph_sync(llama_memory_i * mem, std::function<void()> sync);

// the razor graph input, or nullptr when mctx is not a razor context
llm_graph_input_attn_kv * llama_razor_build_attn_inp(const llm_graph_context & g, const llama_memory_context_i * mctx);

// the same for an iSWA model's graph (build_attn_inp_kv_iswa), or nullptr when mctx is not a razor context
llm_graph_input_attn_kv_iswa * llama_razor_build_attn_inp_iswa(const llm_graph_context & g, const llama_memory_context_i * mctx);

// attention output [n_embd_head_v*n_head, n_tokens] of layer il, or nullptr for layers without local heads
// (those run the stock path over the retrieval cache, which then holds all of their heads)
ggml_tensor * llama_razor_build_attn(
        const llm_graph_context & g,
        llm_graph_input_attn_kv * inp,
        ggml_tensor * q_cur,
        ggml_tensor * k_cur,
        ggml_tensor * v_cur,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        float         kq_scale,
        int           il);
