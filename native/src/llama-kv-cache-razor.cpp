#include "llama-kv-cache-razor.h"

#include "llama-impl.h"
#include "llama-arch.h"
#include "llama-memory.h"
#include "llama-io.h"
#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-model.h"
#include "llama-model-loader.h"
#include "llama-context.h"
#include "llama-razor.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

//
// configuration
//

uint32_t llama_razor_config::n_retrieval(uint32_t il) const {
    uint32_t n = 0;
    for (uint32_t h = 0; h < n_head_kv; ++h) {
        n += head_map[il*n_head_kv + h] != 0;
    }
    return n;
}

uint32_t llama_razor_config::window(uint32_t il) const {
    if (layer_window_scale.empty()) {
        return n_window;
    }
    return (uint32_t) std::max(1.0, std::round((double) layer_window_scale[il]*n_window));
}

uint32_t llama_razor_config::max_window() const {
    uint32_t w = 0;
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (n_local(il) > 0) {
            w = std::max(w, window(il));
        }
    }
    return std::max(w, 1u);
}

namespace {

const llama_model_kv_override * razor_override(const llama_model_loader & ml, const char * key) {
    const auto it = ml.kv_overrides.find(key);
    return it == ml.kv_overrides.end() ? nullptr : &it->second;
}

// a non-negative integer key: kv_overrides first (INT), then the GGUF (any integer type)
bool razor_get_uint(const llama_model_loader & ml, const char * key, uint32_t & out) {
    if (const auto * o = razor_override(ml, key)) {
        if (o->tag != LLAMA_KV_OVERRIDE_TYPE_INT || o->val_i64 < 0 || o->val_i64 > INT32_MAX) {
            throw std::runtime_error(format("razor: override %s must be a non-negative integer", key));
        }
        out = (uint32_t) o->val_i64;
        return true;
    }
    const int k = gguf_find_key(ml.metadata, key);
    if (k < 0) {
        return false;
    }
    switch (gguf_get_kv_type(ml.metadata, k)) {
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(ml.metadata, k); return true;
        case GGUF_TYPE_INT32:  out = (uint32_t) std::max(0, gguf_get_val_i32(ml.metadata, k)); return true;
        case GGUF_TYPE_UINT64: out = (uint32_t) std::min<uint64_t>(gguf_get_val_u64(ml.metadata, k), INT32_MAX); return true;
        default: throw std::runtime_error(format("razor: metadata key %s must be an integer", key));
    }
}

bool razor_get_bool(const llama_model_loader & ml, const char * key, bool & out) {
    if (const auto * o = razor_override(ml, key)) {
        if (o->tag != LLAMA_KV_OVERRIDE_TYPE_BOOL) {
            throw std::runtime_error(format("razor: override %s must be a bool", key));
        }
        out = o->val_bool;
        return true;
    }
    const int k = gguf_find_key(ml.metadata, key);
    if (k < 0 || gguf_get_kv_type(ml.metadata, k) != GGUF_TYPE_BOOL) {
        return false;
    }
    out = gguf_get_val_bool(ml.metadata, k);
    return true;
}

bool razor_get_float(const llama_model_loader & ml, const char * key, float & out, bool override_only) {
    if (const auto * o = razor_override(ml, key)) {
        if (o->tag == LLAMA_KV_OVERRIDE_TYPE_FLOAT) {
            out = (float) o->val_f64;
        } else if (o->tag == LLAMA_KV_OVERRIDE_TYPE_INT) {
            out = (float) o->val_i64;
        } else {
            throw std::runtime_error(format("razor: override %s must be a number", key));
        }
        return true;
    }
    if (override_only) {
        return false;
    }
    const int k = gguf_find_key(ml.metadata, key);
    if (k < 0 || gguf_get_kv_type(ml.metadata, k) != GGUF_TYPE_FLOAT32) {
        return false;
    }
    out = gguf_get_val_f32(ml.metadata, k);
    return true;
}

bool razor_get_f32_arr(const llama_model_loader & ml, const char * key, std::vector<float> & out) {
    const int k = gguf_find_key(ml.metadata, key);
    if (k < 0 || gguf_get_kv_type(ml.metadata, k) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ml.metadata, k) != GGUF_TYPE_FLOAT32) {
        return false;
    }
    const float * data = (const float *) gguf_get_arr_data(ml.metadata, k);
    out.assign(data, data + gguf_get_arr_n(ml.metadata, k));
    return true;
}

// top ceil(ratio*n) heads by score among the eligible ones (not in a sliding-window layer), ties by index: the
// rule of razor_gguf.scoring.select_heads
void razor_select_top(const std::vector<float> & score, float ratio, const llama_razor_config & cfg, std::vector<int32_t> & sel) {
    const size_t n_all = score.size();
    std::vector<size_t> order;
    for (size_t i = 0; i < n_all; ++i) {
        if (!cfg.is_swa(i/cfg.n_head_kv)) {
            order.push_back(i);
        }
    }
    const size_t n = ratio > 0.0f ? std::min(order.size(), (size_t) std::ceil((double) ratio*n_all - 1e-9)) : 0;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return score[a] > score[b]; });
    for (size_t i = 0; i < n; ++i) {
        sel[order[i]] = 1;
    }
}

// a signed 64-bit key (byte counts): kv_overrides first (INT), then the GGUF (any integer type)
bool razor_get_i64(const llama_model_loader & ml, const char * key, int64_t & out) {
    if (const auto * o = razor_override(ml, key)) {
        if (o->tag != LLAMA_KV_OVERRIDE_TYPE_INT) {
            throw std::runtime_error(format("razor: override %s must be an integer", key));
        }
        out = o->val_i64;
        return true;
    }
    const int k = gguf_find_key(ml.metadata, key);
    if (k < 0) {
        return false;
    }
    switch (gguf_get_kv_type(ml.metadata, k)) {
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(ml.metadata, k); return true;
        case GGUF_TYPE_INT32:  out = gguf_get_val_i32(ml.metadata, k); return true;
        case GGUF_TYPE_UINT64: out = (int64_t) std::min<uint64_t>(gguf_get_val_u64(ml.metadata, k), INT64_MAX); return true;
        case GGUF_TYPE_INT64:  out = gguf_get_val_i64(ml.metadata, k); return true;
        default: throw std::runtime_error(format("razor: metadata key %s must be an integer", key));
    }
}

} // namespace

static llama_razor_ring razor_ring_for(const llama_razor_config & cfg, uint32_t n_window, uint32_t n_seq_stream, uint32_t n_ubatch, uint32_t kv_size) {
    const uint32_t n_keep = n_seq_stream*(cfg.n_sink + n_window + cfg.n_pin);
    // the slack (one ubatch of new tokens, plus a scratch row per query with the compensation row) costs at
    // most about half the window
    const uint32_t n_ub0 = std::max(1u, std::min(n_ubatch, std::max(32u, n_window/4)));
    const uint32_t k = cfg.compensation ? 2 : 1; // ring rows per ubatch token

    llama_razor_ring r;
    r.n_window = n_window;
    r.size = GGML_PAD(std::min(n_keep + cfg.n_margin_min + n_ub0, kv_size) + (k - 1)*n_ub0, 256);
    if ((uint64_t) n_keep + cfg.n_margin_min + (uint64_t) k*n_ubatch <= r.size) {
        // the context's ubatch fits the padded ring: no split (the same ubatch boundaries as the stock cache)
        r.n_ubatch = n_ubatch;
    } else {
        // the padding first keeps recently evicted rows (they make trims of that many tokens exact), then
        // holds larger ubatches: fewer graphs per prompt
        const uint32_t n_spare = r.size - std::min(r.size, n_keep + k*n_ub0);
        r.n_ubatch = std::min(n_ubatch, n_ub0 + (n_spare - std::min(n_spare, LLAMA_RAZOR_MARGIN))/k);
    }
    r.n_margin = (uint32_t) std::clamp<int64_t>((int64_t) r.size - n_keep - (int64_t) k*r.n_ubatch, 0, LLAMA_RAZOR_MARGIN);
    return r;
}

std::vector<llama_razor_ring> llama_razor_rings_for(const llama_razor_config & cfg, uint32_t n_seq_stream, uint32_t n_ubatch, uint32_t kv_size) {
    std::vector<uint32_t> windows;
    for (uint32_t il = 0; il < cfg.n_layer; ++il) {
        if (cfg.n_local(il) > 0) {
            windows.push_back(cfg.window(il));
        }
    }
    std::sort(windows.begin(), windows.end());
    windows.erase(std::unique(windows.begin(), windows.end()), windows.end());

    std::vector<llama_razor_ring> rings;
    uint32_t n_ub = n_ubatch;
    for (uint32_t w : windows) {
        rings.push_back(razor_ring_for(cfg, w, n_seq_stream, n_ubatch, kv_size));
        n_ub = std::min(n_ub, rings.back().n_ubatch);
    }
    // one ubatch split for every ring: the smallest ring's; the others give the rows this frees to their margin
    const uint32_t k = cfg.compensation ? 2 : 1;
    for (auto & r : rings) {
        const int64_t n_keep = (int64_t) n_seq_stream*(cfg.n_sink + r.n_window + cfg.n_pin);
        r.n_ubatch = n_ub;
        r.n_margin = (uint32_t) std::clamp<int64_t>((int64_t) r.size - n_keep - (int64_t) k*n_ub, 0, LLAMA_RAZOR_MARGIN);
    }
    return rings;
}

// the context's local rings are no larger than the context (else there is nothing to save)
static bool razor_ring_fits(const llama_razor_config & cfg, const llama_cparams & cparams) {
    for (const auto & r : llama_razor_rings_for(cfg, cparams.kv_unified ? cparams.n_seq_max : 1, cparams.n_ubatch, UINT32_MAX)) {
        if (r.size > GGML_PAD(cparams.n_ctx_seq, 256)) {
            return false;
        }
    }
    return true;
}

std::shared_ptr<llama_razor_config> llama_razor_config_load(llama_model_loader & ml, const llama_hparams & hparams) {
    const int k_map = gguf_find_key(ml.metadata, "razor.head_map");
    if (k_map < 0) {
        bool enabled = false;
        if (razor_get_bool(ml, "razor.enabled", enabled) && enabled) {
            LLAMA_LOG_WARN("razor: razor.enabled is set but the model has no razor.head_map (run razor-gguf embed-heads): using the stock KV cache\n");
        }
        return nullptr;
    }

    auto cfg = std::make_shared<llama_razor_config>();

    cfg->n_layer   = hparams.n_layer_all;
    cfg->n_head_kv = hparams.n_head_kv(0);

    if (gguf_get_kv_type(ml.metadata, k_map) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ml.metadata, k_map) != GGUF_TYPE_INT32) {
        LLAMA_LOG_WARN("razor: razor.head_map must be an int32 array: razor disabled\n");
        return cfg;
    }
    for (uint32_t il = 0; il < cfg->n_layer; ++il) {
        if (hparams.n_head_kv(il) != cfg->n_head_kv) {
            LLAMA_LOG_WARN("razor: layers with different KV head counts are not supported: razor disabled\n");
            return cfg;
        }
    }
    const size_t n_map = gguf_get_arr_n(ml.metadata, k_map);
    if (n_map != (size_t) cfg->n_layer*cfg->n_head_kv) {
        LLAMA_LOG_WARN("razor: razor.head_map has %zu entries but the model has %u layers x %u KV heads: razor disabled\n",
                n_map, cfg->n_layer, cfg->n_head_kv);
        return cfg;
    }
    const int32_t * map = (const int32_t *) gguf_get_arr_data(ml.metadata, k_map);
    cfg->head_map.assign(map, map + n_map);

    // the sliding-window layers of an iSWA model keep the stock SWA cache: no head of theirs is split
    cfg->layer_swa.assign(cfg->n_layer, false);
    for (uint32_t il = 0; il < cfg->n_layer; ++il) {
        cfg->layer_swa[il] = hparams.swa_type != LLAMA_SWA_TYPE_NONE && hparams.is_swa(il);
        if (cfg->layer_swa[il]) {
            std::fill_n(cfg->head_map.begin() + il*cfg->n_head_kv, cfg->n_head_kv, 0);
        }
    }

    cfg->enabled = true;
    razor_get_bool(ml, "razor.enabled", cfg->enabled);
    razor_get_uint(ml, "razor.n_sink",  cfg->n_sink);
    razor_get_uint(ml, "razor.window",  cfg->n_window);
    razor_get_bool(ml, "razor.compensation", cfg->compensation);
    razor_get_uint(ml, "razor.n_pin", cfg->n_pin);
    if (cfg->n_pin > 0 && cfg->compensation) {
        // the fold would sum a pinned token into the compensation row as well
        throw std::runtime_error("razor: razor.n_pin (pinned tokens) needs razor.compensation = false");
    }

    // a memory budget sets the window per context (llama_razor_fit_budget); a window given at load time wins
    // over a budget stored in the model, both given at load time is a mistake
    const bool window_override = razor_override(ml, "razor.window") != nullptr;
    const bool budget_override = razor_override(ml, "razor.kv_budget") || razor_override(ml, "razor.kv_budget_bytes");
    if (window_override && budget_override) {
        throw std::runtime_error("razor: razor.window and razor.kv_budget given together: set one of them");
    }
    if (!window_override) {
        razor_get_float(ml, "razor.kv_budget", cfg->kv_budget, /*override_only =*/ false);
        razor_get_i64  (ml, "razor.kv_budget_bytes", cfg->kv_budget_bytes);
        if (razor_override(ml, "razor.kv_budget")) {
            cfg->kv_budget_bytes = 0; // one budget: the one given at load time
        } else if (razor_override(ml, "razor.kv_budget_bytes")) {
            cfg->kv_budget = 0.0f;
        } else {
            cfg->kv_budget_from_model = cfg->has_budget();
        }
        if (!(cfg->kv_budget >= 0.0f && cfg->kv_budget <= 1.0f) || cfg->kv_budget_bytes < 0) {
            throw std::runtime_error("razor: razor.kv_budget must be in (0, 1] and razor.kv_budget_bytes > 0");
        }
    }

    if (cfg->n_window < 1) {
        LLAMA_LOG_WARN("razor: razor.window must be >= 1: razor disabled\n");
        cfg->enabled = false;
        return cfg;
    }

    // windows per layer, unless razor.layer_windows = false
    bool layer_windows = true;
    razor_get_bool(ml, "razor.layer_windows", layer_windows);
    if (layer_windows && razor_get_f32_arr(ml, "razor.layer_window_scale", cfg->layer_window_scale)) {
        if (cfg->layer_window_scale.size() != cfg->n_layer) {
            throw std::runtime_error(format("razor: razor.layer_window_scale has %zu entries but the model has %u layers",
                    cfg->layer_window_scale.size(), cfg->n_layer));
        }
        for (float x : cfg->layer_window_scale) {
            if (!(std::isfinite(x) && x > 0.0f)) {
                throw std::runtime_error("razor: razor.layer_window_scale entries must be finite and > 0");
            }
        }
    }

    // a retrieval ratio given at load time re-selects the heads from the stored scores
    float ratio = 0.0f;
    if (razor_get_float(ml, "razor.retrieval_ratio", ratio, /*override_only =*/ true)) {
        std::vector<float> echo, induction;
        if (!razor_get_f32_arr(ml, "razor.echo_scores", echo) || !razor_get_f32_arr(ml, "razor.induction_scores", induction) ||
                echo.size() != n_map || induction.size() != n_map) {
            throw std::runtime_error("razor: razor.retrieval_ratio override needs razor.echo_scores and razor.induction_scores in the model");
        }
        if (!(ratio >= 0.0f && ratio <= 1.0f)) {
            throw std::runtime_error("razor: razor.retrieval_ratio must be in [0, 1]");
        }
        float echo_ratio = 0.01f;
        razor_get_float(ml, "razor.selection.echo_ratio", echo_ratio, false);
        echo_ratio = std::min(echo_ratio, ratio);

        std::fill(cfg->head_map.begin(), cfg->head_map.end(), 0);
        razor_select_top(induction, std::max(0.0f, ratio - echo_ratio), *cfg, cfg->head_map);
        razor_select_top(echo, echo_ratio, *cfg, cfg->head_map);
    }

    uint32_t n_retr = 0;
    uint32_t n_swa  = 0;
    for (uint32_t il = 0; il < cfg->n_layer; ++il) {
        n_retr += cfg->n_retrieval(il);
        n_swa  += cfg->is_swa(il);
    }
    LLAMA_LOG_INFO("razor: %s, n_sink = %u, window = %u%s, compensation = %s, n_pin = %u, retrieval KV heads = %u/%zu (%.1f%%)%s\n",
            cfg->enabled ? "enabled" : "disabled", cfg->n_sink, cfg->n_window,
            cfg->layer_window_scale.empty() ? "" : " (scaled per layer)", cfg->compensation ? "on" : "off", cfg->n_pin,
            n_retr, n_map, 100.0*n_retr/n_map,
            n_swa ? format(", %u of %u layers sliding-window (stock SWA cache)", n_swa, cfg->n_layer).c_str() : "");
    if (cfg->has_budget()) {
        LLAMA_LOG_INFO("razor: kv_budget = %s: the window is set per context\n", cfg->kv_budget_bytes > 0 ?
                format("%.2f MiB", cfg->kv_budget_bytes/1048576.0).c_str() : format("%.3f of the full cache", cfg->kv_budget).c_str());
    }

    return cfg;
}

const char * llama_razor_unsupported(const llama_model & model, const llama_razor_config & cfg, const llama_cparams & cparams) {
    const auto & hp = model.hparams;
    if (hp.n_layer_kv_from_start >= 0 || model.arch == LLM_ARCH_GEMMA3N || model.arch == LLM_ARCH_GEMMA4 ||
            model.arch == LLM_ARCH_GEMMA4_ASSISTANT) {
        return "layers that share another layer's KV cache are not supported";
    }
    if (hp.use_alibi) {
        return "ALiBi is not supported";
    }
    for (const auto & layer : model.layers) {
        if (layer.attn_sinks) {
            return "learned attention sinks (gpt-oss) are not supported";
        }
    }
    if (hp.is_mla() || hp.n_embd_head_k(0) != hp.n_embd_head_v(0)) {
        return "MLA / different K and V head sizes are not supported";
    }
    if (hp.n_head(0) % std::max(1u, cfg.n_head_kv) != 0) {
        return "the query heads are not a multiple of the KV heads";
    }
    if (cparams.training) {
        return "training contexts are not supported";
    }
    if (!cparams.causal_attn) {
        return "non-causal attention is not supported";
    }
    if (cparams.n_ctx_seq <= cfg.n_sink + cfg.max_window()) {
        return "the window covers the whole context, nothing would be evicted";
    }
    // the ring holds a ubatch of new tokens (and a scratch row per query) on top of sinks + window + margin
    if (!razor_ring_fits(cfg, cparams)) {
        return "the local ring (sinks + window + margin + its ubatch and scratch rows) is larger than the context, nothing to save";
    }
    return nullptr;
}

uint32_t llama_razor_swa_size(const llama_hparams & hp, bool swa_full, bool unified, uint32_t kv_size, uint32_t n_seq_max, uint32_t n_ubatch) {
    if (swa_full) {
        return kv_size;
    }
    // llama_kv_cache_iswa: the window of every sequence in a stream plus one ubatch, padded to 256
    return GGML_PAD(std::min(kv_size, hp.n_swa*(unified ? n_seq_max : 1) + n_ubatch), 256);
}

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
                  int64_t   out[5]) {
    const auto & hp = model.hparams;
    const int64_t n_stream = unified ? 1 : n_seq_max;
    const auto rings = llama_razor_rings_for(cfg, unified ? n_seq_max : 1, n_ubatch, kv_size);
    auto ring_size = [&](uint32_t il) {
        for (const auto & r : rings) {
            if (r.n_window == cfg.window(il)) {
                return r.size;
            }
        }
        GGML_ABORT("razor: no ring for layer %u", il);
    };
    const uint32_t size_swa = llama_razor_swa_size(hp, swa_full, unified, kv_size, n_seq_max, n_ubatch);
    // ggml_backend_alloc_ctx_tensors pads every tensor to the buffer's alignment: count a generous 256 bytes
    auto tensor = [](int64_t bytes) { return GGML_PAD(bytes, 256); };
    out[0] = out[1] = out[2] = out[3] = out[4] = 0;
    for (uint32_t il = 0; il < cfg.n_layer; ++il) {
        if (cfg.is_swa(il)) {
            out[4] += tensor((int64_t) size_swa*n_stream*ggml_row_size(type_k, hp.n_embd_k_gqa(il))) +
                      tensor((int64_t) size_swa*n_stream*ggml_row_size(type_v, hp.n_embd_v_gqa(il)));
            continue;
        }
        const uint32_t n_retr = cfg.n_retrieval(il);
        const uint32_t n_loc  = cfg.n_local(il);
        const int64_t dk = hp.n_embd_head_k(il);
        const int64_t dv = hp.n_embd_head_v(il);
        if (n_retr > 0) {
            out[0] += tensor((int64_t) kv_size*n_stream*ggml_row_size(type_k, dk*n_retr)) +
                      tensor((int64_t) kv_size*n_stream*ggml_row_size(type_v, dv*n_retr));
        }
        if (n_loc > 0) {
            const uint32_t ring = ring_size(il);
            out[1] += tensor((int64_t) ring*n_stream*ggml_row_size(type_k, dk*n_loc)) +
                      tensor((int64_t) ring*n_stream*ggml_row_size(type_v, dv*n_loc));
            out[2] += cfg.compensation ? tensor((int64_t) n_seq_max*(dk + dv)*n_loc*(int64_t) sizeof(float)) : 0;
            out[2] += cfg.n_pin > 0 && n_retr > 0 ? tensor((int64_t) kv_size*(int64_t) sizeof(float)) : 0;
        }
        out[3] += (int64_t) kv_size*n_stream*(ggml_row_size(type_k, hp.n_embd_k_gqa(il)) + ggml_row_size(type_v, hp.n_embd_v_gqa(il)));
    }
    out[3] += out[4];
}

bool llama_razor_fit_budget(
        const llama_model & model,
       llama_razor_config & cfg,
                ggml_type   type_k,
                ggml_type   type_v,
                     bool   swa_full,
      const llama_cparams & cparams) {
    if (!cfg.has_budget()) {
        return true;
    }
    const uint32_t kv_size = cparams.n_ctx_seq;
    // a window chosen for a budget keeps a full margin: chats that trim their last reply stay exact
    const uint32_t n_margin_window = cfg.n_margin_min;
    cfg.n_margin_min = LLAMA_RAZOR_MARGIN;
    auto with_window = [&](uint32_t window) {
        llama_razor_config c = cfg;
        c.n_window = window;
        return c;
    };
    auto bytes = [&](uint32_t window, int64_t b[5]) {
        llama_razor_bytes_for(model, with_window(window), type_k, type_v, cparams.kv_unified, swa_full, kv_size,
                cparams.n_seq_max, cparams.n_ubatch, b);
        return b[0] + b[1] + b[2] + b[4];
    };
    int64_t b[5];
    bytes(1, b);
    const int64_t full   = b[3];
    const int64_t budget = cfg.kv_budget_bytes > 0 ? cfg.kv_budget_bytes : (int64_t) std::floor((double) cfg.kv_budget*full);
    if (budget >= full) {
        return false; // the stock cache fits
    }
    const int64_t smallest = b[0] + b[1] + b[2] + b[4];
    if (smallest > budget && cfg.kv_budget_from_model) {
        LLAMA_LOG_INFO("razor: the model's kv_budget %.3f is below the smallest razor cache for n_ctx = %u (%.3f): "
                "window = razor.window (%u)\n", (double) budget/full, kv_size, (double) smallest/full, cfg.n_window);
        cfg.kv_budget = 0.0f;
        cfg.kv_budget_bytes = 0;
        cfg.n_margin_min = n_margin_window;
        return true;
    }
    if (smallest > budget) {
        throw std::runtime_error(format(
            "razor: kv_budget %.3f of the full cache (%.2f MiB) is below the smallest razor cache for n_ctx = %u: "
            "%.3f (%.2f MiB; the retrieval heads alone take %.3f%s)", (double) budget/full, budget/1048576.0, kv_size,
            (double) smallest/full, smallest/1048576.0, (double) b[0]/full,
            b[4] ? format(", the sliding-window layers %.3f", (double) b[4]/full).c_str() : ""));
    }
    // the largest window that fits; it must leave something to evict and keep the ring within the context
    uint32_t lo = 1;
    uint32_t hi = kv_size > cfg.n_sink + 1 ? kv_size - cfg.n_sink - 1 : 1;
    auto fits = [&](uint32_t w) {
        int64_t bw[5];
        const auto c = with_window(w);
        return c.n_sink + c.max_window() < kv_size && bytes(w, bw) <= budget && razor_ring_fits(c, cparams);
    };
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo + 1)/2;
        if (fits(mid)) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    cfg.n_window = lo;
    bytes(lo, b);
    LLAMA_LOG_INFO("razor: kv_budget %.3f of the full cache (%.2f of %.2f MiB) at n_ctx = %u: window = %u, %.3f allocated\n",
            (double) budget/full, budget/1048576.0, full/1048576.0, kv_size, lo, (double) (b[0] + b[1] + b[2] + b[4])/full);
    return true;
}

llama_memory_i * llama_razor_create_memory(
        const llama_model & model,
 const llama_razor_config & cfg_model,
const llama_memory_params & params,
      const llama_cparams & cparams) {
    if (!cfg_model.enabled) {
        return nullptr;
    }
    // the window this context runs (a budget sets it per context)
    llama_razor_config cfg = cfg_model;
    if (!llama_razor_fit_budget(model, cfg, params.type_k, params.type_v, params.swa_full, cparams)) {
        LLAMA_LOG_INFO("create_memory: razor: the kv_budget covers the full cache: using the stock KV cache\n");
        return nullptr;
    }
    const char * why =
        llm_arch_is_recurrent(model.arch) || llm_arch_is_hybrid(model.arch) ? "recurrent and hybrid models are not supported" :
        params.ctx_type != LLAMA_CONTEXT_TYPE_DEFAULT                       ? "only default contexts are supported" :
        llama_razor_unsupported(model, cfg, cparams);
    uint32_t n_local = 0;
    for (uint32_t il = 0; il < model.hparams.n_layer_all; ++il) {
        n_local += cfg.n_local(il);
    }
    if (why) {
        LLAMA_LOG_WARN("create_memory: razor: %s: using the stock KV cache\n", why);
        return nullptr;
    }
    if (n_local == 0) {
        LLAMA_LOG_INFO("create_memory: razor: every KV head%s is a retrieval head: using the stock KV cache\n",
                model.hparams.swa_type != LLAMA_SWA_TYPE_NONE ? " of the global-attention layers" : "");
        return nullptr;
    }

    // an iSWA model's sliding-window layers: the cache llama_kv_cache_iswa would give them
    std::unique_ptr<llama_kv_cache> kv_swa;
    if (model.hparams.swa_type != LLAMA_SWA_TYPE_NONE) {
        const auto & hp = model.hparams;
        const uint32_t size_swa = llama_razor_swa_size(hp, params.swa_full, cparams.kv_unified, cparams.n_ctx_seq,
                cparams.n_seq_max, cparams.n_ubatch);
        LLAMA_LOG_INFO("%s: razor: creating SWA KV cache, size = %u cells\n", __func__, size_swa);
        kv_swa = std::make_unique<llama_kv_cache>(
                model, hp, params.type_k, params.type_v, !cparams.flash_attn, cparams.offload_kqv, cparams.kv_unified,
                size_swa, cparams.n_seq_max, 1, hp.n_swa, hp.swa_type, nullptr,
                [&](int32_t il) { return hp.is_swa(il); }, nullptr, nullptr);
    }
    return new llama_kv_cache_razor(model, cfg, params.type_k, params.type_v,
            cparams.offload_kqv, cparams.kv_unified, cparams.n_ctx_seq, cparams.n_seq_max, cparams.n_ubatch, std::move(kv_swa));
}

//
// llama_kv_cache_razor
//

llama_kv_cache_razor::llama_kv_cache_razor(
        const llama_model & model,
 const llama_razor_config & cfg,
                ggml_type   type_k,
                ggml_type   type_v,
                     bool   offload,
                     bool   unified,
                 uint32_t   kv_size,
                 uint32_t   n_seq_max,
                 uint32_t   n_ubatch,
std::unique_ptr<llama_kv_cache> kv_swa) :
    model(model), cfg(cfg), hparams_retr(model.hparams),
    n_seq_max(n_seq_max), unified(unified), kv_swa(std::move(kv_swa)) {
    const auto & hp = model.hparams;
    const uint32_t n_layer = hp.n_layer_all;

    GGML_ASSERT(cfg.n_layer == n_layer);

    for (const auto & geom : llama_razor_rings_for(cfg, unified ? n_seq_max : 1, n_ubatch, kv_size)) {
        auto rg = std::make_unique<ring_group>();
        rg->geom      = geom;
        rg->n_scratch = cfg.compensation ? geom.n_ubatch : 0;
        rg->n_pin_rows = cfg.n_pin*(unified ? n_seq_max : 1);
        rg->hparams   = model.hparams;
        rg->seqs.assign(n_seq_max, seq_state{});
        rings.push_back(std::move(rg));
        this->n_ubatch = geom.n_ubatch;
    }
    GGML_ASSERT(!rings.empty());

    bool any_retr = false;
    perms.resize(n_layer);
    inv_perms.resize(n_layer);
    retr_head0s.assign(n_layer, -1);
    ring_idx.assign(n_layer, -1);
    for (uint32_t il = 0; il < n_layer; ++il) {
        hparams_retr.n_head_kv_arr[il] = cfg.n_retrieval(il);
        any_retr = any_retr || cfg.n_retrieval(il) > 0;
        for (uint32_t r = 0; r < rings.size(); ++r) {
            const bool mine = cfg.n_local(il) > 0 && rings[r]->n_window() == cfg.window(il);
            rings[r]->hparams.n_head_kv_arr[il] = mine ? cfg.n_local(il) : 0;
            if (mine) {
                ring_idx[il] = r;
            }
        }

        auto & p = perms[il];
        for (uint32_t h = 0; h < cfg.n_head_kv; ++h) {
            if (cfg.head_map[il*cfg.n_head_kv + h]) {
                p.push_back(h);
            }
        }
        for (uint32_t h = 0; h < cfg.n_head_kv; ++h) {
            if (!cfg.head_map[il*cfg.n_head_kv + h]) {
                p.push_back(h);
            }
        }
        inv_perms[il].resize(p.size());
        for (size_t i = 0; i < p.size(); ++i) {
            inv_perms[il][p[i]] = i;
        }
        // retrieval heads first (p is the identity) or last (p is a rotation by n_local)
        const uint32_t n_r = cfg.n_retrieval(il);
        const uint32_t n_h = p.size();
        bool first = true, last = true;
        for (uint32_t i = 0; i < n_h; ++i) {
            first = first && p[i] == (int32_t) i;
            last  = last  && p[i] == (int32_t) ((i + n_h - n_r) % n_h);
        }
        retr_head0s[il] = first ? 0 : last ? (int32_t) (n_h - n_r) : -1;
    }

    const layer_filter_cb filter_retr = [&](int32_t il) { return cfg.n_retrieval(il) > 0; };

    // the V caches are never transposed: with per-layer head counts a transposed V would be padded to
    // the widest layer ([TAG_V_CACHE_VARIABLE]), and the local ring needs whole-row scratch writes
    if (any_retr) {
        LLAMA_LOG_INFO("%s: creating retrieval KV cache, size = %u cells\n", __func__, kv_size);
        kv_retr = std::make_unique<llama_kv_cache>(
                model, hparams_retr, type_k, type_v, /*v_trans =*/ false, offload, unified, kv_size, n_seq_max, 1,
                0, LLAMA_SWA_TYPE_NONE, nullptr, filter_retr, nullptr, nullptr, "retr_");
    }

    // rings: sinks + window of every sequence in a stream, the margin, one ubatch of new tokens, the scratch rows
    for (uint32_t r = 0; r < rings.size(); ++r) {
        auto & rg = *rings[r];
        uint32_t n_lay = 0;
        for (uint32_t il = 0; il < n_layer; ++il) {
            n_lay += ring_idx[il] == (int32_t) r;
        }
        LLAMA_LOG_INFO("%s: creating local KV cache, size = %u cells, %u layers (n_sink = %u, window = %u, ubatch = %u, scratch = %u, margin = %u, pin rows = %u)\n",
                __func__, rg.geom.size, n_lay, cfg.n_sink, rg.n_window(), rg.geom.n_ubatch, rg.n_scratch, rg.n_margin(), rg.n_pin_rows);
        const layer_filter_cb filter_loc = [&](int32_t il) { return ring_idx[il] == (int32_t) r; };
        rg.kv = std::make_unique<llama_kv_cache>(
                model, rg.hparams, type_k, type_v, /*v_trans =*/ false, offload, unified, rg.geom.size, n_seq_max, 1,
                // recycling follows the stored sums (window + margin); the window itself is applied to the mask per query
                rg.n_window() + rg.n_margin(), LLAMA_SWA_TYPE_STANDARD, nullptr, filter_loc, nullptr, nullptr,
                rings.size() == 1 ? "loc_" : format("loc%u_", r).c_str());
        // one sequence per stream: place tokens by position, so that the cache layout does not depend on its history
        rg.kv->set_sinks_and_reserved(cfg.n_sink, rg.n_pin_rows + rg.n_scratch, /*pos_ring =*/ !unified || n_seq_max == 1);
    }

    // compensation state, next to each layer's KV
    struct buft_cmp {
        bool operator()(ggml_backend_buffer_type_t a, ggml_backend_buffer_type_t b) const {
            return strcmp(ggml_backend_buft_name(a), ggml_backend_buft_name(b)) < 0;
        }
    };
    std::map<ggml_backend_buffer_type_t, ggml_context_ptr, buft_cmp> ctx_map;

    // and, with pins, the retrieval heads' attention per key for llama_razor_pin_scores
    comp.assign(n_layer, nullptr);
    pins.assign(n_seq_max, pin_state{});
    if (cfg.n_pin > 0) {
        pin_score.assign(n_layer, nullptr);
    }
    for (uint32_t il = 0; il < n_layer; ++il) {
        const bool want_comp  = cfg.compensation && cfg.n_local(il) > 0;
        const bool want_score = cfg.n_pin > 0 && cfg.n_local(il) > 0 && cfg.n_retrieval(il) > 0;
        if (!want_comp && !want_score) {
            continue;
        }
        ggml_backend_buffer_type_t buft = offload ? ggml_backend_dev_buffer_type(model.dev_layer(il)) : ggml_backend_cpu_buffer_type();
        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params params = { size_t(2*n_layer*ggml_tensor_overhead()), nullptr, true };
            it = ctx_map.emplace(buft, ggml_context_ptr(ggml_init(params))).first;
        }
        if (want_comp) {
            const auto & hl = rings[ring_idx[il]]->hparams;
            const int64_t n_embd = hl.n_embd_k_gqa(il) + hl.n_embd_v_gqa(il);
            comp[il] = ggml_new_tensor_2d(it->second.get(), GGML_TYPE_F32, n_embd, n_seq_max);
            ggml_format_name(comp[il], "razor_comp_l%d", il);
        }
        if (want_score) {
            pin_score[il] = ggml_new_tensor_1d(it->second.get(), GGML_TYPE_F32, kv_size);
            ggml_format_name(pin_score[il], "razor_pin_score_l%d", il);
        }
    }
    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = hp.no_alloc ? ggml_backend_buft_alloc_buffer(buft, 0)
                                                : ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (!buf) {
            throw std::runtime_error("razor: failed to allocate the compensation state buffer");
        }
        if (hp.no_alloc) {
            for (ggml_tensor * t = ggml_get_first_tensor(ctx.get()); t; t = ggml_get_next_tensor(ctx.get(), t)) {
                t->buffer = buf;
            }
        }
        ggml_backend_buffer_clear(buf, 0);
        comp_bufs.emplace_back(std::move(ctx), buf);
    }

    // what a stock cache of this context would allocate (for an iSWA model: its full cache of the global layers
    // and the same SWA cache)
    const int64_t n_stream = unified ? 1 : n_seq_max;
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (!cfg.is_swa(il)) {
            bytes_full_equiv += (int64_t) kv_size*n_stream*(ggml_row_size(type_k, hp.n_embd_k_gqa(il)) + ggml_row_size(type_v, hp.n_embd_v_gqa(il)));
        }
    }

    int64_t b[5];
    kv_bytes(b);
    LLAMA_LOG_INFO("%s: KV bytes: retrieval %.2f MiB + local %.2f MiB + compensation %.2f MiB + SWA %.2f MiB = %.2f MiB (full cache %.2f MiB, %.1f%%)\n",
            __func__, b[0]/1048576.0, b[1]/1048576.0, b[2]/1048576.0, b[4]/1048576.0, (b[0] + b[1] + b[2] + b[4])/1048576.0,
            b[3]/1048576.0, 100.0*(b[0] + b[1] + b[2] + b[4])/std::max<int64_t>(1, b[3]));
}

void llama_kv_cache_razor::kv_bytes(int64_t out[5]) const {
    auto sum = [](const std::map<ggml_backend_buffer_type_t, size_t> & mb) {
        int64_t s = 0;
        for (const auto & [buft, size] : mb) {
            s += size;
        }
        return s;
    };
    out[0] = kv_retr ? sum(kv_retr->memory_breakdown()) : 0;
    out[1] = 0;
    for (uint32_t r = 0; r < rings.size(); ++r) {
        out[1] += ring_bytes(r);
    }
    out[2] = 0;
    for (const auto & [ctx, buf] : comp_bufs) {
        out[2] += model.hparams.no_alloc ? ggml_backend_alloc_ctx_tensors_from_buft_size(ctx.get(), ggml_backend_buffer_get_type(buf.get()))
                                         : ggml_backend_buffer_get_size(buf.get());
    }
    out[4] = kv_swa ? sum(kv_swa->memory_breakdown()) : 0;
    out[3] = bytes_full_equiv + out[4];
}

int64_t llama_kv_cache_razor::ring_bytes(uint32_t r) const {
    int64_t s = 0;
    for (const auto & [buft, size] : rings[r]->kv->memory_breakdown()) {
        s += size;
    }
    return s;
}

llama_memory_context_ptr llama_kv_cache_razor::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    // the rings have room for ubatches of this->n_ubatch tokens (at most the context's)
    n_ubatch = std::min(n_ubatch, this->n_ubatch);

    for (int attempt = 0; attempt < 2; ++attempt) {
        const bool simple = attempt == 0;
        if (simple && !unified) {
            continue; // separate streams need equal splits
        }

        balloc.split_reset();

        std::vector<llama_ubatch> ubatches;
        while (true) {
            auto ubatch = simple ? balloc.split_simple(n_ubatch) : balloc.split_equal(n_ubatch, !unified, 0);
            if (ubatch.n_tokens == 0) {
                break;
            }
            ubatches.push_back(std::move(ubatch)); // NOLINT
        }
        if (balloc.get_n_used() < balloc.get_n_tokens()) {
            continue;
        }

        llama_kv_cache::slot_info_vec_t sinfos_retr;
        if (kv_retr) {
            sinfos_retr = kv_retr->prepare(ubatches);
            if (sinfos_retr.empty()) {
                continue;
            }
        }
        std::vector<llama_kv_cache::slot_info_vec_t> sinfos_loc;
        for (const auto & rg : rings) {
            sinfos_loc.push_back(rg->kv->prepare(ubatches));
            if (sinfos_loc.back().empty()) {
                break;
            }
        }
        if (sinfos_loc.back().empty()) {
            continue;
        }
        llama_kv_cache::slot_info_vec_t sinfos_swa;
        if (kv_swa) {
            sinfos_swa = kv_swa->prepare(ubatches);
            if (sinfos_swa.empty()) {
                continue;
            }
        }

        return std::make_unique<llama_kv_cache_razor_context>(this, std::move(sinfos_retr), std::move(sinfos_loc),
                std::move(sinfos_swa), std::move(ubatches));
    }

    return std::make_unique<llama_kv_cache_razor_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
}

llama_memory_context_ptr llama_kv_cache_razor::init_full() {
    return std::make_unique<llama_kv_cache_razor_context>(this);
}

llama_memory_context_ptr llama_kv_cache_razor::init_update(llama_context * lctx, bool optimize) {
    return std::make_unique<llama_kv_cache_razor_context>(this, lctx, optimize);
}

bool llama_kv_cache_razor::get_can_shift() const {
    // shifting would have to re-rotate the compensation sums: not supported (as for a non-full SWA cache)
    return false;
}

void llama_kv_cache_razor::clear(bool data) {
    if (kv_retr) {
        kv_retr->clear(data);
    }
    for (auto & rg : rings) {
        rg->kv->clear(data);
    }
    if (kv_swa) {
        kv_swa->clear(data);
    }
    for (llama_seq_id s = 0; s < (llama_seq_id) n_seq_max; ++s) {
        reset_seq(s);
    }
    pins.assign(n_seq_max, pin_state{});
    if (data) {
        for (auto & [ctx, buf] : comp_bufs) {
            ggml_backend_buffer_clear(buf.get(), 0);
        }
    }
}

bool llama_kv_cache_razor::any_folded(llama_seq_id s) const {
    for (const auto & rg : rings) {
        if (rg->seqs[s].l > 0) {
            return true;
        }
    }
    return false;
}

void llama_kv_cache_razor::reset_seq(llama_seq_id s) {
    // the graph adds new rows to the stored sums: they must start from zero
    if (any_folded(s)) {
        std::vector<float> zero;
        for (size_t il = 0; il < comp.size(); ++il) {
            if (comp[il]) {
                zero.assign(comp[il]->ne[0], 0.0f);
                comp_col_set(il, s, zero);
            }
        }
    }
    for (auto & rg : rings) {
        rg->seqs[s] = seq_state{};
    }
}

void llama_kv_cache_razor::comp_col_get(int32_t il, llama_seq_id s, std::vector<float> & dst) const {
    if (sync_graph) {
        sync_graph();
    }
    ggml_tensor * t = comp[il];
    dst.resize(t->ne[0]);
    ggml_backend_tensor_get(t, dst.data(), s*t->nb[1], t->ne[0]*sizeof(float));
}

void llama_kv_cache_razor::comp_col_set(int32_t il, llama_seq_id s, const std::vector<float> & src) {
    if (sync_graph) {
        sync_graph();
    }
    ggml_tensor * t = comp[il];
    ggml_backend_tensor_set(t, src.data(), s*t->nb[1], t->ne[0]*sizeof(float));
}

bool llama_kv_cache_razor::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    const bool tail = p1 == std::numeric_limits<llama_pos>::max();
    const llama_pos n_sink = cfg.n_sink;

    enum action { KEEP, RESET };
    std::vector<std::pair<llama_seq_id, action>> todo;

    // decide for every sequence first, so that a refusal leaves the cache untouched
    for (llama_seq_id s = 0; s < (llama_seq_id) n_seq_max; ++s) {
        if (seq_id >= 0 && s != seq_id) {
            continue;
        }
        if (!any_folded(s)) {
            todo.emplace_back(s, KEEP);         // nothing in the stored sums yet
        } else if (tail && p0 <= n_sink) {
            todo.emplace_back(s, RESET);        // every summed token goes
        } else {
            for (const auto & rg : rings) {
                const auto & st = rg->seqs[s];
                if (st.l == 0) {
                    continue;
                }
                // tail: the next query at p0 evicts [n_sink, p0 - W]: the stored sums must not go beyond that;
                // otherwise a hole in the summed history cannot be undone
                if (tail ? p0 - (llama_pos) rg->n_window() < st.g : (p0 <= st.g && p1 > n_sink)) {
                    return false;
                }
            }
            todo.emplace_back(s, KEEP);
        }
    }

    for (const auto & [s, act] : todo) {
        if (act == RESET) {
            reset_seq(s);
        }
    }
    unpin(seq_id, p0, p1); // the rows of removed pinned positions refill when those positions are decoded again

    bool res = true;
    if (kv_retr) {
        res = kv_retr->seq_rm(seq_id, p0, p1) && res;
    }
    for (auto & rg : rings) {
        res = rg->kv->seq_rm(seq_id, p0, p1) && res;
    }
    if (kv_swa) {
        res = kv_swa->seq_rm(seq_id, p0, p1) && res;
    }
    return res;
}

void llama_kv_cache_razor::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    if (seq_id_src == seq_id_dst) {
        return;
    }
    drop_pins(seq_id_dst, __func__, "copying into");
    for (uint8_t f : pins[seq_id_src].filled) {
        if (f) {
            LLAMA_LOG_WARN("%s: razor: the pinned tokens of sequence %d are not copied to sequence %d\n", __func__, seq_id_src, seq_id_dst);
            break;
        }
    }
    if (kv_retr) {
        kv_retr->seq_cp(seq_id_src, seq_id_dst, p0, p1);
    }
    for (auto & rg : rings) {
        rg->kv->seq_cp(seq_id_src, seq_id_dst, p0, p1);
    }
    if (kv_swa) {
        kv_swa->seq_cp(seq_id_src, seq_id_dst, p0, p1);
    }

    const bool whole = p0 <= 0 && (p1 < 0 || p1 > seq_pos_max(seq_id_src));
    if (!whole || !any_folded(seq_id_src)) {
        reset_seq(seq_id_dst);
        return;
    }
    for (auto & rg : rings) {
        rg->seqs[seq_id_dst] = rg->seqs[seq_id_src];
    }
    std::vector<float> col;
    for (size_t il = 0; il < comp.size(); ++il) {
        if (comp[il]) {
            comp_col_get(il, seq_id_src, col);
            comp_col_set(il, seq_id_dst, col);
        }
    }
}

void llama_kv_cache_razor::seq_keep(llama_seq_id seq_id) {
    if (kv_retr) {
        kv_retr->seq_keep(seq_id);
    }
    for (auto & rg : rings) {
        rg->kv->seq_keep(seq_id);
    }
    if (kv_swa) {
        kv_swa->seq_keep(seq_id);
    }
    for (llama_seq_id s = 0; s < (llama_seq_id) n_seq_max; ++s) {
        if (s != seq_id) {
            reset_seq(s);
            pins[s] = pin_state{};
        }
    }
}

void llama_kv_cache_razor::reset_folded(llama_seq_id seq_id, const char * caller, const char * what) {
    for (llama_seq_id s = 0; s < (llama_seq_id) n_seq_max; ++s) {
        if ((seq_id < 0 || s == seq_id) && any_folded(s)) {
            if (cfg.compensation) {
                LLAMA_LOG_WARN("%s: razor: %s sequence %d whose evicted tokens are folded; its compensation row is dropped\n", caller, what, s);
            }
            reset_seq(s);
        }
    }
}

bool llama_kv_cache_razor::set_pins(llama_seq_id seq_id, std::vector<llama_pos> pos) {
    GGML_ASSERT(seq_id >= 0 && (uint32_t) seq_id < n_seq_max);
    std::sort(pos.begin(), pos.end());
    pos.erase(std::unique(pos.begin(), pos.end()), pos.end());
    pos.erase(pos.begin(), std::lower_bound(pos.begin(), pos.end(), (llama_pos) cfg.n_sink));
    if (pos.size() > cfg.n_pin) {
        return false;
    }
    auto & ps = pins[seq_id];
    ps.filled.assign(pos.size(), 0);
    ps.pos = std::move(pos);
    return true;
}

uint32_t llama_kv_cache_razor::pin_col(uint32_t r, llama_seq_id seq_id, uint32_t j) const {
    return rings[r]->pin_base() + (unified ? (uint32_t) seq_id : 0u)*cfg.n_pin + j;
}

void llama_kv_cache_razor::unpin(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    for (llama_seq_id s = 0; s < (llama_seq_id) n_seq_max; ++s) {
        if (seq_id >= 0 && s != seq_id) {
            continue;
        }
        auto & ps = pins[s];
        for (size_t j = 0; j < ps.pos.size(); ++j) {
            if (ps.pos[j] >= p0 && ps.pos[j] < p1) {
                ps.filled[j] = 0;
            }
        }
    }
}

void llama_kv_cache_razor::drop_pins(llama_seq_id seq_id, const char * caller, const char * what) {
    for (llama_seq_id s = 0; s < (llama_seq_id) n_seq_max; ++s) {
        if (seq_id >= 0 && s != seq_id) {
            continue;
        }
        // a pin row holds its key rotated at the old position: it cannot follow a shift
        if (std::find(pins[s].filled.begin(), pins[s].filled.end(), 1) != pins[s].filled.end()) {
            LLAMA_LOG_WARN("%s: razor: %s sequence %d, whose pinned tokens are dropped\n", caller, what, s);
        }
        pins[s] = pin_state{};
    }
}

void llama_kv_cache_razor::set_pin_capture(bool on) {
    if (on && !capture) {
        if (sync_graph) {
            sync_graph();
        }
        for (ggml_tensor * t : pin_score) {
            if (t) {
                ggml_backend_tensor_memset(t, 0, 0, ggml_nbytes(t));
            }
        }
    }
    capture = on;
}

bool llama_kv_cache_razor::pin_scores(llama_seq_id seq_id, float * out, int32_t n) const {
    if (!kv_retr || pin_score.empty()) {
        return false;
    }
    if (sync_graph) {
        sync_graph();
    }
    std::fill(out, out + n, 0.0f);
    std::vector<float> col;
    for (ggml_tensor * t : pin_score) {
        if (!t) {
            continue;
        }
        col.resize(ggml_nelements(t));
        ggml_backend_tensor_get(t, col.data(), 0, ggml_nbytes(t));
        for (const auto & [pos, cell] : kv_retr->get_cells(seq_id).seq_pos_get(seq_id)) {
            if (pos < n) {
                out[pos] += col[cell];
            }
        }
    }
    return true;
}

void llama_kv_cache_razor::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    reset_folded(seq_id, __func__, "shifting");
    drop_pins(seq_id, __func__, "shifting");
    if (kv_retr) {
        kv_retr->seq_add(seq_id, p0, p1, shift);
    }
    for (auto & rg : rings) {
        rg->kv->seq_add(seq_id, p0, p1, shift);
    }
    if (kv_swa) {
        kv_swa->seq_add(seq_id, p0, p1, shift);
    }
}

void llama_kv_cache_razor::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    reset_folded(seq_id, __func__, "dividing positions of");
    drop_pins(seq_id, __func__, "dividing positions of");
    if (kv_retr) {
        kv_retr->seq_div(seq_id, p0, p1, d);
    }
    for (auto & rg : rings) {
        rg->kv->seq_div(seq_id, p0, p1, d);
    }
    if (kv_swa) {
        kv_swa->seq_div(seq_id, p0, p1, d);
    }
}

llama_pos llama_kv_cache_razor::seq_pos_min(llama_seq_id seq_id) const {
    // as llama_kv_cache_iswa: the SWA cache holds only the recent positions, and callers that reuse a cached
    // prefix must know it (the local ring's evicted positions live on in the compensation row instead)
    if (kv_swa) {
        return kv_swa->seq_pos_min(seq_id);
    }
    if (kv_retr) {
        return kv_retr->seq_pos_min(seq_id);
    }
    llama_pos p = -1;
    for (const auto & rg : rings) {
        p = std::max(p, rg->kv->seq_pos_min(seq_id));
    }
    return p;
}

llama_pos llama_kv_cache_razor::seq_pos_max(llama_seq_id seq_id) const {
    return kv_retr ? kv_retr->seq_pos_max(seq_id) : rings[0]->kv->seq_pos_max(seq_id);
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_razor::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> mb;
    for (const auto & rg : rings) {
        for (const auto & [buft, size] : rg->kv->memory_breakdown()) {
            mb[buft] += size;
        }
    }
    if (kv_retr) {
        for (const auto & [buft, size] : kv_retr->memory_breakdown()) {
            mb[buft] += size;
        }
    }
    if (kv_swa) {
        for (const auto & [buft, size] : kv_swa->memory_breakdown()) {
            mb[buft] += size;
        }
    }
    for (const auto & [ctx, buf] : comp_bufs) {
        mb[ggml_backend_buffer_get_type(buf.get())] += ggml_backend_buffer_get_size(buf.get());
    }
    return mb;
}

static const uint32_t RAZOR_STATE_MAGIC = 0x525a5231; // "RZR1"

void llama_kv_cache_razor::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    if (kv_retr && (flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) == 0) {
        kv_retr->state_write(io, seq_id, flags);
    }
    for (const auto & rg : rings) {
        rg->kv->state_write(io, seq_id, flags);
    }
    if (kv_swa) {
        kv_swa->state_write(io, seq_id, flags);
    }

    // one ring: the layout of a cache with one window everywhere
    io.write(&RAZOR_STATE_MAGIC, sizeof(RAZOR_STATE_MAGIC));
    const uint32_t n = seq_id < 0 ? n_seq_max : 1;
    io.write(&n, sizeof(n));
    for (const auto & rg : rings) {
        for (uint32_t i = 0; i < n; ++i) {
            const auto & st = rg->seqs[seq_id < 0 ? i : seq_id];
            io.write(&st.l, sizeof(st.l));
            io.write(&st.g, sizeof(st.g));
        }
    }
    for (ggml_tensor * t : comp) {
        if (!t) {
            continue;
        }
        if (seq_id < 0) {
            io.write_tensor(t, 0, ggml_nbytes(t));
        } else {
            io.write_tensor(t, seq_id*t->nb[1], t->nb[1]);
        }
    }

    // pins (only with razor.n_pin: the layout without them is unchanged): positions, fill flags, the rows
    for (uint32_t i = 0; i < n && cfg.n_pin > 0; ++i) {
        const llama_seq_id s = seq_id < 0 ? (llama_seq_id) i : seq_id;
        const auto & ps = pins[s];
        const uint32_t np = ps.pos.size();
        io.write(&np, sizeof(np));
        io.write(ps.pos.data(), np*sizeof(llama_pos));
        io.write(ps.filled.data(), np*sizeof(uint8_t));
        for_each_pin_block(s, [&](ggml_tensor * t, size_t offs, size_t size) { io.write_tensor(t, offs, size); });
    }
}

void llama_kv_cache_razor::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    if (kv_retr && (flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) == 0) {
        kv_retr->state_read(io, seq_id, flags);
    }
    for (auto & rg : rings) {
        rg->kv->state_read(io, seq_id, flags);
    }
    if (kv_swa) {
        kv_swa->state_read(io, seq_id, flags);
    }

    uint32_t magic = 0, n = 0;
    io.read(&magic, sizeof(magic));
    io.read(&n, sizeof(n));
    if (magic != RAZOR_STATE_MAGIC || n != (seq_id < 0 ? n_seq_max : 1u)) {
        throw std::runtime_error("razor: the saved state was not written by a razor cache of this configuration");
    }
    std::vector<seq_state> st((size_t) n*rings.size());
    for (auto & s : st) {
        io.read(&s.l, sizeof(s.l));
        io.read(&s.g, sizeof(s.g));
    }
    for (ggml_tensor * t : comp) {
        if (!t) {
            continue;
        }
        if (seq_id < 0) {
            io.read_tensor(t, 0, ggml_nbytes(t));
        } else {
            io.read_tensor(t, seq_id*t->nb[1], t->nb[1]);
        }
    }
    for (uint32_t r = 0; r < rings.size(); ++r) {
        for (uint32_t i = 0; i < n; ++i) {
            rings[r]->seqs[seq_id < 0 ? i : seq_id] = st[(size_t) r*n + i];
        }
    }

    for (uint32_t i = 0; i < n && cfg.n_pin > 0; ++i) {
        const llama_seq_id s = seq_id < 0 ? (llama_seq_id) i : seq_id;
        uint32_t np = 0;
        io.read(&np, sizeof(np));
        if (np > cfg.n_pin) {
            throw std::runtime_error("razor: the saved state has more pinned tokens than razor.n_pin");
        }
        auto & ps = pins[s];
        ps.pos.resize(np);
        ps.filled.resize(np);
        io.read(ps.pos.data(), np*sizeof(llama_pos));
        io.read(ps.filled.data(), np*sizeof(uint8_t));
        for_each_pin_block(s, [&](ggml_tensor * t, size_t offs, size_t size) { io.read_tensor(t, offs, size); });
    }
}

void llama_kv_cache_razor::for_each_pin_block(llama_seq_id s, const std::function<void(ggml_tensor *, size_t, size_t)> & fn) const {
    // metadata only: one view of each ring layer's V (llama_kv_cache exposes only K's storage)
    ggml_init_params params = { (size_t) 2*cfg.n_layer*ggml_tensor_overhead(), nullptr, true };
    ggml_context_ptr ctx(ggml_init(params));
    llama_kv_cache::slot_info sinfo;
    sinfo.s0 = sinfo.s1 = 0;
    for (uint32_t r = 0; r < rings.size(); ++r) {
        const auto & rg = *rings[r];
        const uint64_t row0 = (uint64_t) rg.kv->get_stream(s)*rg.geom.size + pin_col(r, s, 0);
        for (uint32_t il = 0; il < cfg.n_layer; ++il) {
            if (ring_idx[il] != (int32_t) r) {
                continue;
            }
            // the layer's V storage: the source of any view of it
            ggml_tensor * v = rg.kv->get_v(ctx.get(), il, rg.geom.size, sinfo)->view_src;
            for (ggml_tensor * t : { rg.kv->get_k_storage(il), v }) {
                fn(t, row0*t->nb[1], (size_t) cfg.n_pin*t->nb[1]);
            }
        }
    }
}

bool llama_kv_cache_razor::plan_ubatch(uint32_t r, const llama_ubatch & ub, fold_plan & P) {
    auto & rg = *rings[r];
    auto & seqs = rg.seqs;
    const llama_kv_cache * kv_loc = rg.kv.get();
    const uint32_t n_margin  = rg.n_margin();
    const uint32_t n_scratch = rg.n_scratch;

    const uint32_t T  = ub.n_tokens;
    const uint32_t NS = ub.n_seqs_unq;
    const uint32_t NR = n_margin + T; // rows per sequence: evicted, not yet in the stored sums
    const uint32_t R  = T + NS;

    const llama_pos S = cfg.n_sink;
    const llama_pos W = rg.n_window();

    const uint32_t size    = kv_loc->get_size();
    const uint32_t n_strm  = unified ? 1 : NS;
    const uint32_t n_tps   = T/n_strm;

    P.n_tokens = T;
    P.n_seqs   = NS;
    P.n_rows   = NR;
    P.rows.assign((size_t) NR*NS, 0);
    P.pick.assign(R, 0);
    P.scale.assign(R, 0.0f);
    P.state_cols.assign(NS, 0);
    P.scratch.assign(T, 0);
    P.log_l.assign(T, -INFINITY);
    P.scratch_col.assign(T, 0);
    P.hide.assign(NS, {});
    P.pin_src.clear();
    P.pin_dst.clear();
    P.pinned.assign(NS, {});

    for (uint32_t t = 0; t < T; ++t) {
        if (ub.n_seq_id[t] != 1) {
            LLAMA_LOG_ERROR("%s: razor: a token shared by several sequences is not supported\n", __func__);
            return false;
        }
    }

    // per sequence: the cached evicted cells in position order; those past the stored sums are summed in the graph
    std::vector<std::vector<llama_pos>> row_pos(NS);
    std::vector<llama_pos> g_new(NS);
    for (uint32_t js = 0; js < NS; ++js) {
        const llama_seq_id s = ub.seq_id_unq[js];
        const auto & st = seqs[s];

        llama_pos p_last = -1;
        for (uint32_t t = 0; t < T; ++t) {
            if (ub.seq_id[t][0] == s) {
                p_last = std::max(p_last, ub.pos[t]);
            }
        }
        P.state_cols[js] = s;

        // after this ubatch [n_sink, p_last + 1 - W] is evicted; the sums keep up to n_margin positions behind
        const llama_pos f_new = p_last + 1 - W;
        g_new[js] = std::max(st.g, f_new - (llama_pos) n_margin);

        const uint32_t strm = kv_loc->get_stream(s);
        for (const auto & [pos, cell] : kv_loc->get_cells(s).seq_pos_get(s)) {
            if (pos < S) {
                continue;
            }
            if (pos > f_new) {
                break;
            }
            P.hide[js].emplace_back(cell, pos);
            if (pos <= st.g) {
                continue;
            }
            if (cfg.compensation) {
                if (row_pos[js].size() >= NR) {
                    LLAMA_LOG_ERROR("%s: razor: sequence %d jumps ahead by more than a ubatch: cannot fold\n", __func__, s);
                    return false;
                }
                P.rows[(size_t) js*NR + row_pos[js].size()] = strm*size + cell;
            }
            row_pos[js].push_back(pos);
        }
    }

    // each query: the running sum (stored sums, then the rows in position order) up to the last row that left
    // its window, over its count
    for (uint32_t t = 0; t < T; ++t) {
        const llama_seq_id s  = ub.seq_id[t][0];
        const uint32_t     js = ub.seq_idx[s];
        const auto & st = seqs[s];

        uint32_t n_c = 0;
        while (n_c < row_pos[js].size() && row_pos[js][n_c] <= ub.pos[t] - W) {
            ++n_c;
        }
        const uint32_t l = st.l + n_c;
        P.pick[t] = js*(NR + 1) + n_c;
        if (l > 0) {
            P.scale[t] = 1.0f/l;
            P.log_l[t] = logf((float) l);
        }

        if (n_scratch > 0) {
            const uint32_t ii = t % n_tps;
            P.scratch_col[t] = size - n_scratch + ii;
            P.scratch[t]     = (int64_t) kv_loc->get_stream(s)*size + size - n_scratch + ii;
        }
    }

    // pinned tokens of this ubatch: copied from their ring cell into their pin row by the graph
    for (uint32_t t = 0; t < T && cfg.n_pin > 0; ++t) {
        const llama_seq_id s = ub.seq_id[t][0];
        auto & ps = pins[s];
        const auto it = std::lower_bound(ps.pos.begin(), ps.pos.end(), ub.pos[t]);
        if (it == ps.pos.end() || *it != ub.pos[t]) {
            continue;
        }
        const uint32_t j = it - ps.pos.begin();
        const auto & sp = kv_loc->get_cells(s).seq_pos_get(s);
        const auto c = sp.lower_bound({ ub.pos[t], 0u });
        GGML_ASSERT(c != sp.end() && c->first == ub.pos[t]);
        const uint64_t strm = kv_loc->get_stream(s);
        P.pin_src.push_back((int32_t) (strm*size + c->second));
        P.pin_dst.push_back((int64_t) (strm*size + pin_col(r, s, j)));
        ps.filled[j] = 1;
    }
    for (uint32_t js = 0; js < NS && cfg.n_pin > 0; ++js) {
        const llama_seq_id s = ub.seq_id_unq[js];
        const auto & ps = pins[s];
        for (uint32_t j = 0; j < ps.pos.size(); ++j) {
            if (ps.filled[j]) {
                P.pinned[js].emplace_back(pin_col(r, s, j), ps.pos[j]);
            }
        }
    }

    // the new stored sums of each sequence: everything up to g_new
    for (uint32_t js = 0; js < NS; ++js) {
        const llama_seq_id s = ub.seq_id_unq[js];
        auto & st = seqs[s];
        uint32_t n_s = 0;
        while (n_s < row_pos[js].size() && row_pos[js][n_s] <= g_new[js]) {
            ++n_s;
        }
        P.pick [T + js] = js*(NR + 1) + n_s;
        P.scale[T + js] = 1.0f;

        st.l += n_s;
        st.g  = g_new[js];
    }

    return true;
}

//
// llama_kv_cache_razor_context
//

llama_kv_cache_razor_context::llama_kv_cache_razor_context(llama_memory_status status) : status(status) {}

llama_kv_cache_razor_context::llama_kv_cache_razor_context(llama_kv_cache_razor * kv) :
    kv(kv),
    ctx_retr(kv->get_retr() ? kv->get_retr()->init_full() : nullptr),
    ctx_swa (kv->get_swa() ? kv->get_swa()->init_full() : nullptr) {
    for (uint32_t r = 0; r < kv->n_rings(); ++r) {
        ctx_loc.push_back(kv->get_loc(r)->init_full());
    }
    plans.resize(kv->n_rings());
    status = combined_status();
}

llama_kv_cache_razor_context::llama_kv_cache_razor_context(llama_kv_cache_razor * kv, llama_context * lctx, bool optimize) :
    kv(kv),
    ctx_retr(kv->get_retr() ? kv->get_retr()->init_update(lctx, optimize) : nullptr),
    ctx_swa (kv->get_swa() ? kv->get_swa()->init_update(lctx, optimize) : nullptr) {
    for (uint32_t r = 0; r < kv->n_rings(); ++r) {
        ctx_loc.push_back(kv->get_loc(r)->init_update(lctx, optimize));
    }
    plans.resize(kv->n_rings());
    status = combined_status();
}

llama_kv_cache_razor_context::llama_kv_cache_razor_context(
        llama_kv_cache_razor * kv,
        slot_info_vec_t sinfos_retr,
        std::vector<slot_info_vec_t> sinfos_loc,
        slot_info_vec_t sinfos_swa,
        std::vector<llama_ubatch> ubatches) :
    kv(kv),
    ubatches(std::move(ubatches)),
    ctx_retr(kv->get_retr() ? new llama_kv_cache_context(kv->get_retr(), std::move(sinfos_retr), this->ubatches) : nullptr),
    ctx_swa (kv->get_swa() ? new llama_kv_cache_context(kv->get_swa(), std::move(sinfos_swa), this->ubatches) : nullptr),
    status(LLAMA_MEMORY_STATUS_SUCCESS) {
    for (uint32_t r = 0; r < kv->n_rings(); ++r) {
        ctx_loc.emplace_back(new llama_kv_cache_context(kv->get_loc(r), std::move(sinfos_loc[r]), this->ubatches));
    }
    plans.resize(kv->n_rings());
}

llama_memory_status llama_kv_cache_razor_context::combined_status() const {
    llama_memory_status res = ctx_loc[0]->get_status();
    for (size_t r = 1; r < ctx_loc.size(); ++r) {
        res = llama_memory_status_combine(res, ctx_loc[r]->get_status());
    }
    for (const auto & c : { &ctx_retr, &ctx_swa }) {
        if (*c) {
            res = llama_memory_status_combine(res, (*c)->get_status());
        }
    }
    return res;
}

llama_kv_cache_razor_context::~llama_kv_cache_razor_context() = default;

bool llama_kv_cache_razor_context::next() {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);

    if (ctx_retr) {
        ctx_retr->next();
    }
    for (auto & c : ctx_loc) {
        c->next();
    }
    if (ctx_swa) {
        ctx_swa->next();
    }

    return ++i_next < ubatches.size();
}

bool llama_kv_cache_razor_context::apply() {
    assert(!llama_memory_status_is_fail(status));

    bool res = true;
    if (ctx_retr) {
        res = ctx_retr->apply() && res;
    }
    for (auto & c : ctx_loc) {
        res = c->apply() && res;
    }
    if (ctx_swa) {
        res = ctx_swa->apply() && res;
    }

    // batch contexts: the ubatch is in place, plan the fold of the tokens leaving each ring's window
    for (uint32_t r = 0; r < plans.size() && res && !ubatches.empty(); ++r) {
        res = kv->plan_ubatch(r, ubatches[i_next], plans[r]);
    }
    return res;
}

llama_memory_status llama_kv_cache_razor_context::get_status() const {
    return status;
}

const llama_ubatch & llama_kv_cache_razor_context::get_ubatch() const {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return ubatches[i_next];
}

const llama_kv_cache_context * llama_kv_cache_razor_context::get_retr() const {
    return static_cast<const llama_kv_cache_context *>(ctx_retr.get());
}

const llama_kv_cache_context * llama_kv_cache_razor_context::get_loc(uint32_t r) const {
    return static_cast<const llama_kv_cache_context *>(ctx_loc[r].get());
}

const llama_kv_cache_context * llama_kv_cache_razor_context::get_swa() const {
    return static_cast<const llama_kv_cache_context *>(ctx_swa.get());
}

//
// graph input
//

llm_graph_input_attn_kv_razor::llm_graph_input_attn_kv_razor(
        const llama_hparams & hparams,
        const llama_cparams & cparams,
        const llama_kv_cache_razor_context * mctx) :
    llm_graph_input_attn_kv(hparams, cparams, mctx->get_retr()),
    mctx_razor(mctx) {
    razor = true;
}

// the cache's own mask hides positions older than window + margin; the evicted ones still cached (the
// margin) are hidden here per query, and each query's compensation row gets log(l)
template <typename T>
static void razor_fill_mask_cols(T * data, int64_t n_kv, const llama_kv_cache_razor::fold_plan & P, const llama_ubatch * ub, uint32_t n_window, bool compensation) {
    const T drop = llama_cast<T>(-INFINITY);
    for (uint32_t t = 0; t < P.n_tokens; ++t) {
        T * row = data + (int64_t) t*n_kv;
        for (const auto & [cell, pos] : P.hide[ub->seq_idx[ub->seq_id[t][0]]]) {
            if (pos > ub->pos[t] - (llama_pos) n_window) {
                break;
            }
            row[cell] = drop;
        }
        if (compensation) {
            row[P.scratch_col[t]] = llama_cast<T>(P.log_l[t]);
        }
        // a pinned token is read from its pin row once its ring row is hidden
        for (const auto & [col, pos] : P.pinned[ub->seq_idx[ub->seq_id[t][0]]]) {
            if (pos <= ub->pos[t] - (llama_pos) n_window) {
                row[col] = llama_cast<T>(0.0f);
            }
        }
    }
}

static bool razor_is_set(const ggml_tensor * t) {
    return t && t->buffer;
}

void llm_graph_input_attn_kv_razor::set_input(const llama_ubatch * ubatch) {
    const auto * kv = mctx_razor->get_razor();
    const bool comp = kv->get_config().compensation;

    if (mctx) {
        llm_graph_input_attn_kv::set_input(ubatch);
    } else {
        if (razor_is_set(self_k_rot)) {
            mctx_razor->get_loc(0)->set_input_k_rot(self_k_rot);
        }
        if (razor_is_set(self_v_rot)) {
            mctx_razor->get_loc(0)->set_input_v_rot(self_v_rot);
        }
    }

    for (uint32_t r = 0; r < rings.size(); ++r) {
        const auto * loc = mctx_razor->get_loc(r);
        const auto & P   = mctx_razor->get_plan(r);
        const auto & ri  = rings[r];
        const uint32_t n_window = kv->get_ring(r).n_window();

        if (razor_is_set(ri.k_idxs)) {
            loc->set_input_k_idxs(ri.k_idxs, ubatch);
        }
        if (razor_is_set(ri.v_idxs)) {
            loc->set_input_v_idxs(ri.v_idxs, ubatch);
        }
        if (razor_is_set(ri.kq_mask)) {
            loc->set_input_kq_mask(ri.kq_mask, ubatch, cparams.causal_attn);
            if (ri.kq_mask->type == GGML_TYPE_F16) {
                razor_fill_mask_cols((ggml_fp16_t *) ri.kq_mask->data, ri.kq_mask->ne[0], P, ubatch, n_window, comp);
            } else {
                razor_fill_mask_cols((float *) ri.kq_mask->data, ri.kq_mask->ne[0], P, ubatch, n_window, comp);
            }
        }

        GGML_ASSERT(P.n_tokens == ubatch->n_tokens);

        if (razor_is_set(ri.fold_rows)) {
            memcpy(ri.fold_rows->data, P.rows.data(), P.rows.size()*sizeof(int32_t));
        }
        if (razor_is_set(ri.fold_pick)) {
            memcpy(ri.fold_pick->data, P.pick.data(), P.pick.size()*sizeof(int32_t));
        }
        if (razor_is_set(ri.fold_scale)) {
            memcpy(ri.fold_scale->data, P.scale.data(), P.scale.size()*sizeof(float));
        }
        if (razor_is_set(ri.scratch_idx)) {
            memcpy(ri.scratch_idx->data, P.scratch.data(), P.scratch.size()*sizeof(int64_t));
        }
        if (razor_is_set(ri.pin_src)) {
            GGML_ASSERT((size_t) ri.pin_src->ne[0] == P.pin_src.size());
            memcpy(ri.pin_src->data, P.pin_src.data(), P.pin_src.size()*sizeof(int32_t));
            memcpy(ri.pin_dst->data, P.pin_dst.data(), P.pin_dst.size()*sizeof(int64_t));
        }
    }

    const auto & P = mctx_razor->get_plan(0); // the ubatch's sequences: the same in every ring's plan
    if (razor_is_set(state_get)) {
        for (uint32_t i = 0; i < P.n_seqs; ++i) {
            ((int32_t *) state_get->data)[i] = (int32_t) P.state_cols[i];
        }
    }
    if (razor_is_set(state_set)) {
        memcpy(state_set->data, P.state_cols.data(), P.state_cols.size()*sizeof(int64_t));
    }

    for (size_t il = 0; il < perm.size(); ++il) {
        for (auto [t, src] : { std::make_pair(perm[il], &kv->perm(il)), std::make_pair(inv_perm[il], &kv->inv_perm(il)) }) {
            if (!razor_is_set(t)) {
                continue;
            }
            int32_t * data = (int32_t *) t->data;
            for (int64_t i = 0; i < t->ne[1]; ++i) {
                std::copy(src->begin(), src->end(), data + i*t->ne[0]);
            }
        }
    }
}

static bool razor_mask_fits(const ggml_tensor * mask, const llama_kv_cache_context * mctx, const llm_graph_params & params) {
    const int64_t n_stream = params.cparams.kv_unified ? 1 : params.ubatch.n_seqs_unq;
    return mask->ne[0] == mctx->get_n_kv() && mask->ne[1] == params.ubatch.n_tokens/n_stream && mask->ne[3] == n_stream;
}

bool llm_graph_input_attn_kv_razor::can_reuse(const llm_graph_params & params) {
    mctx_razor = static_cast<const llama_kv_cache_razor_context *>(params.mctx);
    mctx       = mctx_razor->get_retr();

    const int64_t T  = params.ubatch.n_tokens;
    const int64_t NS = params.ubatch.n_seqs_unq;

    bool res = true;
    if (mctx) {
        res &= self_k_idxs->ne[0] == T;
        res &= razor_mask_fits(self_kq_mask, mctx, params);
    }
    for (uint32_t r = 0; r < rings.size(); ++r) {
        const auto & ri = rings[r];
        res &= ri.k_idxs->ne[0] == T;
        res &= razor_mask_fits(ri.kq_mask, mctx_razor->get_loc(r), params);
        if (ri.fold_rows) {
            res &= ri.fold_rows->ne[0] == (mctx_razor->get_razor()->get_ring(r).n_margin() + T)*NS;
            res &= ri.fold_pick->ne[0] == T + NS;
        }
        res &= (ri.pin_src ? (size_t) ri.pin_src->ne[0] : 0u) == mctx_razor->get_plan(r).pin_src.size();
    }
    res &= capture == mctx_razor->get_razor()->pin_capture();
    if (state_get) {
        res &= state_get->ne[0] == NS;
    }
    for (ggml_tensor * t : perm) {
        res &= t == nullptr || t->ne[1] == T;
    }
    return res;
}

static ggml_tensor * razor_new_mask(ggml_context * ctx, const llama_kv_cache_context * mctx, const llama_ubatch & ubatch, const llama_cparams & cparams, const char * name) {
    const int64_t n_stream = cparams.kv_unified ? 1 : ubatch.n_seqs_unq;
    ggml_tensor * res = ggml_new_tensor_4d(ctx, cparams.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32,
            mctx->get_n_kv(), ubatch.n_tokens/n_stream, 1, n_stream);
    ggml_set_input(res);
    ggml_set_name(res, name);
    return res;
}

static ggml_tensor * razor_new_input(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
    ggml_tensor * res = ne1 > 0 ? ggml_new_tensor_2d(ctx, type, ne0, ne1) : ggml_new_tensor_1d(ctx, type, ne0);
    ggml_set_input(res);
    ggml_set_name(res, name);
    return res;
}

static std::unique_ptr<llm_graph_input_attn_kv_razor> razor_new_attn_inp(const llm_graph_context & g, const llama_kv_cache_razor_context * rc) {
    ggml_context * ctx0 = g.ctx0;
    const llama_ubatch & ub = g.ubatch;
    const int64_t T  = ub.n_tokens;
    const int64_t NS = ub.n_seqs_unq;

    auto inp = std::make_unique<llm_graph_input_attn_kv_razor>(g.hparams, g.cparams, rc);

    const auto * retr = rc->get_retr();
    const auto * loc  = rc->get_loc(0);

    if (retr) {
        inp->self_k_idxs      = retr->build_input_k_idxs(ctx0, ub);
        inp->self_v_idxs      = retr->build_input_v_idxs(ctx0, ub);
        inp->self_kq_mask     = razor_new_mask(ctx0, retr, ub, g.cparams, "attn_inp_kq_mask");
        inp->self_kq_mask_cnv = inp->self_kq_mask;
    }
    // the Hadamard rotations depend only on the cache type and head size: the same for both caches
    inp->self_k_rot = (retr ? retr : loc)->build_input_k_rot(ctx0);
    inp->self_v_rot = (retr ? retr : loc)->build_input_v_rot(ctx0);

    const auto * kv = rc->get_razor();
    inp->rings.resize(kv->n_rings());
    for (uint32_t r = 0; r < kv->n_rings(); ++r) {
        const auto * cl = rc->get_loc(r);
        auto & ri = inp->rings[r];
        ri.k_idxs  = cl->build_input_k_idxs(ctx0, ub);
        ri.v_idxs  = cl->build_input_v_idxs(ctx0, ub);
        ri.kq_mask = razor_new_mask(ctx0, cl, ub, g.cparams, "razor_inp_kq_mask_loc");
        if (kv->get_config().compensation) {
            ri.fold_rows   = razor_new_input(ctx0, GGML_TYPE_I32, (kv->get_ring(r).n_margin() + T)*NS, 0, "razor_inp_fold_rows");
            ri.fold_pick   = razor_new_input(ctx0, GGML_TYPE_I32, T + NS, 0, "razor_inp_fold_pick");
            ri.fold_scale  = razor_new_input(ctx0, GGML_TYPE_F32, 1, T + NS, "razor_inp_fold_scale");
            ri.scratch_idx = razor_new_input(ctx0, GGML_TYPE_I64, T, 0, "razor_inp_scratch");
        }
        // the pin copies of this ubatch; a graph reserved for sizing (no plan) gets the most a ubatch can hold
        const auto & P = rc->get_plan(r);
        const int64_t n_pinned = P.n_tokens == 0 ? std::min<int64_t>(T, (int64_t) kv->get_config().n_pin*NS) : (int64_t) P.pin_src.size();
        if (n_pinned > 0) {
            ri.pin_src = razor_new_input(ctx0, GGML_TYPE_I32, n_pinned, 0, "razor_inp_pin_src");
            ri.pin_dst = razor_new_input(ctx0, GGML_TYPE_I64, n_pinned, 0, "razor_inp_pin_dst");
        }
    }
    inp->capture = kv->pin_capture();
    if (kv->get_config().compensation) {
        inp->state_get = razor_new_input(ctx0, GGML_TYPE_I32, NS, 0, "razor_inp_state_get");
        inp->state_set = razor_new_input(ctx0, GGML_TYPE_I64, NS, 0, "razor_inp_state_set");
    }

    const uint32_t n_layer = g.hparams.n_layer_all;
    inp->perm.assign(n_layer, nullptr);
    inp->inv_perm.assign(n_layer, nullptr);
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (kv->n_retrieval(il) > 0 && kv->n_local(il) > 0 && kv->retr_head0(il) < 0) {
            const int64_t n_head_kv = kv->perm(il).size();
            inp->perm[il]     = razor_new_input(ctx0, GGML_TYPE_I32, n_head_kv, T, "razor_inp_perm");
            inp->inv_perm[il] = razor_new_input(ctx0, GGML_TYPE_I32, n_head_kv, T, "razor_inp_inv_perm");
        }
    }

    return inp;
}

llm_graph_input_attn_kv * llama_razor_build_attn_inp(const llm_graph_context & g, const llama_memory_context_i * mctx) {
    const auto * rc = dynamic_cast<const llama_kv_cache_razor_context *>(mctx);
    if (!rc) {
        return nullptr;
    }
    return (llm_graph_input_attn_kv *) g.res->add_input(razor_new_attn_inp(g, rc));
}

llm_graph_input_attn_kv_iswa_razor::llm_graph_input_attn_kv_iswa_razor(
        const llama_hparams & hparams,
        const llama_cparams & cparams,
        std::unique_ptr<llm_graph_input_attn_kv_razor> inp_razor,
        std::unique_ptr<llm_graph_input_attn_kv>       inp_swa) :
    llm_graph_input_attn_kv_iswa(hparams, cparams, nullptr),
    inp_razor(std::move(inp_razor)),
    inp_swa(std::move(inp_swa)) {
    razor_base = this->inp_razor.get();
    razor_swa  = this->inp_swa.get();
}

void llm_graph_input_attn_kv_iswa_razor::set_input(const llama_ubatch * ubatch) {
    inp_razor->set_input(ubatch);
    inp_swa->set_input(ubatch); // the stock input: the SWA cache masks by its own window
}

bool llm_graph_input_attn_kv_iswa_razor::can_reuse(const llm_graph_params & params) {
    bool res = inp_razor->can_reuse(params);

    inp_swa->mctx = static_cast<const llama_kv_cache_razor_context *>(params.mctx)->get_swa();
    res &= inp_swa->self_k_idxs->ne[0] == params.ubatch.n_tokens;
    res &= razor_mask_fits(inp_swa->self_kq_mask, inp_swa->mctx, params);
    return res;
}

llm_graph_input_attn_kv_iswa * llama_razor_build_attn_inp_iswa(const llm_graph_context & g, const llama_memory_context_i * mctx) {
    const auto * rc = dynamic_cast<const llama_kv_cache_razor_context *>(mctx);
    if (!rc) {
        return nullptr;
    }
    const auto * swa = rc->get_swa();
    GGML_ASSERT(swa && "razor: an iSWA graph needs the razor cache's SWA cache");

    auto inp_swa = std::make_unique<llm_graph_input_attn_kv>(g.hparams, g.cparams, swa);
    inp_swa->self_k_idxs      = swa->build_input_k_idxs(g.ctx0, g.ubatch);
    inp_swa->self_v_idxs      = swa->build_input_v_idxs(g.ctx0, g.ubatch);
    inp_swa->self_kq_mask     = razor_new_mask(g.ctx0, swa, g.ubatch, g.cparams, "attn_inp_kq_mask_swa");
    inp_swa->self_kq_mask_cnv = inp_swa->self_kq_mask;
    inp_swa->self_k_rot       = swa->build_input_k_rot(g.ctx0);
    inp_swa->self_v_rot       = swa->build_input_v_rot(g.ctx0);

    auto inp = std::make_unique<llm_graph_input_attn_kv_iswa_razor>(g.hparams, g.cparams, razor_new_attn_inp(g, rc), std::move(inp_swa));
    return (llm_graph_input_attn_kv_iswa *) g.res->add_input(std::move(inp));
}

void llama_razor_set_graph_sync(llama_memory_i * mem, std::function<void()> sync) {
    if (auto * kv = dynamic_cast<llama_kv_cache_razor *>(mem)) {
        kv->sync_graph = std::move(sync);
    }
}

uint32_t llama_razor_n_graph_nodes(const llama_memory_i * mem) {
    const auto * kv = dynamic_cast<const llama_kv_cache_razor *>(mem);
    if (!kv) {
        return 0;
    }
    uint32_t n = 0;
    for (uint32_t il = 0; il < kv->get_config().n_layer; ++il) {
        n += kv->n_local(il) > 0 ? 128 : 0; // ~80 tensors (views included) per split layer, with headroom
        n += kv->n_local(il) > 0 && kv->get_config().n_pin > 0 ? 16 : 0; // pin copies, attention capture
    }
    return n;
}

// a view with the geometry of ref whose parent is the last write into the same cache tensor, so that the
// attention depends on that write explicitly
static ggml_tensor * razor_view_like(ggml_context * ctx, ggml_tensor * parent, const ggml_tensor * ref) {
    GGML_ASSERT(parent->view_src == ref->view_src && parent->view_offs == 0);
    return ggml_view_4d(ctx, parent, ref->ne[0], ref->ne[1], ref->ne[2], ref->ne[3], ref->nb[1], ref->nb[2], ref->nb[3], ref->view_offs);
}

// 4. the attention outputs of both head groups back in the model's head order: [d_v*n_head, T]. inv_perm: nullptr
// where the groups are contiguous, the retrieval heads first (retr_first) or last
static ggml_tensor * razor_merge_heads(ggml_context * ctx, ggml_tensor * inv_perm, bool retr_first, ggml_tensor * out_r,
        ggml_tensor * out_l, int64_t d_group, int64_t n_r, int64_t n_l, int64_t T) {
    if (n_r == 0) {
        return out_l;
    }
    if (!inv_perm) { // each output is [d_group*n, T]: concatenated along the rows, no head dimension needed
        return retr_first ? ggml_concat(ctx, out_r, out_l, 0) : ggml_concat(ctx, out_l, out_r, 0);
    }
    ggml_tensor * out = ggml_concat(ctx, ggml_reshape_3d(ctx, out_r, d_group, n_r, T), ggml_reshape_3d(ctx, out_l, d_group, n_l, T), 1);
    out = ggml_get_rows(ctx, out, inv_perm);
    return ggml_reshape_2d(ctx, out, d_group*(n_r + n_l), T);
}

// the compensation row of the local heads of layer il: adds the tokens that leave the window to the running
// sums and writes each query's row (sums / l) into its scratch row of the ring. k_st, v_st: the ring's stores of
// this ubatch, replaced by the scratch writes (the attention's K and V)
static void razor_build_fold(const llm_graph_context & g, const llm_graph_input_attn_kv_razor * inp,
        const llm_graph_input_attn_kv_razor::ring_inp & ri, const llama_kv_cache_razor * kv, int il, int64_t T,
        ggml_tensor *& k_st, ggml_tensor *& v_st) {
    ggml_context * ctx0 = g.ctx0;
    ggml_cgraph  * gf   = g.gf;

    ggml_tensor * k2 = ggml_reshape_2d(ctx0, k_st, k_st->ne[0], ggml_nelements(k_st)/k_st->ne[0]);
    ggml_tensor * v2 = ggml_reshape_2d(ctx0, v_st, v_st->ne[0], ggml_nelements(v_st)/v_st->ne[0]);

    const int64_t nek = k2->ne[0];
    const int64_t nev = v2->ne[0];

    const int64_t NS  = inp->state_get->ne[0];
    const int64_t NR  = ri.fold_rows->ne[0]/NS; // rows per sequence

    ggml_tensor * comp = kv->get_comp(il);                                    // F32 [E = nek + nev, n_seq_max]
    ggml_tensor * ek = ggml_get_rows(ctx0, k2,   ri.fold_rows);                // F32 [nek, NR*NS] (dequantized)
    ggml_tensor * ev = ggml_get_rows(ctx0, v2,   ri.fold_rows);                // F32 [nev, NR*NS]
    ggml_tensor * s0 = ggml_get_rows(ctx0, comp, inp->state_get);              // F32 [E, NS]
    ggml_tensor * x  = ggml_concat(ctx0,
            ggml_reshape_3d(ctx0, s0, nek + nev, 1, NS),
            ggml_reshape_3d(ctx0, ggml_concat(ctx0, ek, ev, 0), nek + nev, NR, NS), 1); // [E, 1 + NR, NS]

    // running sums per sequence, added one row at a time in position order (cumsum is sequential): the
    // same float operations whatever the ubatch split, so prefill and token-by-token decode agree bitwise
    ggml_tensor * c = ggml_cumsum(ctx0, ggml_cont(ctx0, ggml_permute(ctx0, x, 1, 0, 2, 3)));   // [1 + NR, E, NS]
    c = ggml_reshape_2d(ctx0, ggml_cont(ctx0, ggml_permute(ctx0, c, 1, 0, 2, 3)), nek + nev, (NR + 1)*NS);

    // each query's sum / l, then each sequence's new sums
    ggml_tensor * r = ggml_mul(ctx0, ggml_get_rows(ctx0, c, ri.fold_pick), ri.fold_scale); // [E, T + NS]
    g.cb(r, "razor_fold", il);

    ggml_tensor * ck = ggml_view_2d(ctx0, r, nek, T, r->nb[1], 0);
    ggml_tensor * cv = ggml_view_2d(ctx0, r, nev, T, r->nb[1], nek*ggml_element_size(r));
    k_st = ggml_set_rows(ctx0, k2, ck, ri.scratch_idx);
    v_st = ggml_set_rows(ctx0, v2, cv, ri.scratch_idx);
    ggml_build_forward_expand(gf, k_st);
    ggml_build_forward_expand(gf, v_st);

    // the state is read (s0) before it is written: the write consumes r
    ggml_tensor * sums = ggml_view_2d(ctx0, r, nek + nev, NS, r->nb[1], T*r->nb[1]);
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, comp, sums, inp->state_set));
}

ggml_tensor * llama_razor_build_attn(
        const llm_graph_context & g,
        llm_graph_input_attn_kv * inp_base,
        ggml_tensor * q_cur,
        ggml_tensor * k_cur,
        ggml_tensor * v_cur,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        float         kq_scale,
        int           il) {
    auto * inp = static_cast<llm_graph_input_attn_kv_razor *>(inp_base);
    const auto * kv = inp->mctx_razor->get_razor();

    const int64_t n_l = kv->n_local(il);
    const int64_t n_r = kv->n_retrieval(il);
    if (n_l == 0) {
        return nullptr;
    }
    if (kq_b || sinks) {
        GGML_ABORT("razor: attention bias and attention sinks are not supported (layer %d)", il);
    }

    ggml_context * ctx0 = g.ctx0;
    ggml_cgraph  * gf   = g.gf;

    const int64_t d_k       = q_cur->ne[0];
    const int64_t n_head    = q_cur->ne[1];
    const int64_t T         = q_cur->ne[2];
    const int64_t n_head_kv = k_cur->ne[1];
    const int64_t d_v       = v_cur->ne[0];
    const int64_t n_gqa     = n_head/n_head_kv;

    // 1. the two head groups: views where the retrieval heads are contiguous at one end of the layer's heads (as
    // `embed-heads --reorder-heads` stores them), else the KV heads gathered in the order [retrieval..., local...];
    // a query head follows its KV head
    ggml_tensor * q_r = nullptr, * k_r = nullptr, * v_r = nullptr;
    ggml_tensor * q_l = q_cur,   * k_l = k_cur,   * v_l = v_cur;
    const int64_t h0_r = inp->perm[il] ? 0 : kv->retr_head0(il); // where each group starts in the heads it views
    const int64_t h0_l = h0_r == 0 ? n_r : 0;
    if (n_r > 0) {
        ggml_tensor * q3 = ggml_reshape_3d(ctx0, ggml_is_contiguous(q_cur) ? q_cur : ggml_cont(ctx0, q_cur), d_k*n_gqa, n_head_kv, T);
        ggml_tensor * qp = q3, * kp = k_cur, * vp = v_cur;
        if (inp->perm[il]) {
            qp = ggml_get_rows(ctx0, q3,    inp->perm[il]);
            kp = ggml_get_rows(ctx0, k_cur, inp->perm[il]);
            vp = ggml_get_rows(ctx0, v_cur, inp->perm[il]);
        }

        const size_t rq = ggml_row_size(qp->type, d_k);
        q_r = ggml_view_3d(ctx0, qp, d_k, n_gqa*n_r, T, rq, qp->nb[2], n_gqa*h0_r*rq);
        q_l = ggml_view_3d(ctx0, qp, d_k, n_gqa*n_l, T, rq, qp->nb[2], n_gqa*h0_l*rq);
        k_r = ggml_view_3d(ctx0, kp, d_k, n_r, T, kp->nb[1], kp->nb[2], h0_r*kp->nb[1]);
        k_l = ggml_view_3d(ctx0, kp, d_k, n_l, T, kp->nb[1], kp->nb[2], h0_l*kp->nb[1]);
        v_r = ggml_view_3d(ctx0, vp, d_v, n_r, T, vp->nb[1], vp->nb[2], h0_r*vp->nb[1]);
        v_l = ggml_view_3d(ctx0, vp, d_v, n_l, T, vp->nb[1], vp->nb[2], h0_l*vp->nb[1]);
    }

    // 2. retrieval heads: the stock path over the full cache
    ggml_tensor * out_r = nullptr;
    if (n_r > 0) {
        const auto * cr = inp->mctx_razor->get_retr();
        ggml_tensor * k_st = cr->cpy_k(ctx0, k_r, inp->self_k_idxs, il);
        ggml_tensor * v_st = cr->cpy_v(ctx0, v_r, inp->self_v_idxs, il);
        ggml_build_forward_expand(gf, k_st);
        ggml_build_forward_expand(gf, v_st);

        ggml_tensor * k = razor_view_like(ctx0, k_st, cr->get_k(ctx0, il));
        ggml_tensor * v = razor_view_like(ctx0, v_st, cr->get_v(ctx0, il));
        out_r = g.build_attn_mha(q_r, k, v, nullptr, inp->self_kq_mask_cnv, nullptr, nullptr, 0, kq_scale, il);

        // llama_razor_pin_capture: the softmax attention of this ubatch's queries over every cached key, summed
        // over queries and retrieval heads (one sequence per capture, so one stream)
        if (inp->capture && kv->get_pin_score(il) && k->ne[3] == 1) {
            ggml_tensor * kq = ggml_mul_mat(ctx0, ggml_permute(ctx0, k, 0, 2, 1, 3), ggml_permute(ctx0, q_r, 0, 2, 1, 3)); // [n_kv, T, n_head_r]
            kq = ggml_soft_max_ext(ctx0, kq, inp->self_kq_mask_cnv, kq_scale, 0.0f);
            const int64_t n_kv = kq->ne[0];
            ggml_tensor * sc = ggml_sum_rows(ctx0, ggml_cont(ctx0, ggml_transpose(ctx0, ggml_reshape_2d(ctx0, kq, n_kv, ggml_nelements(kq)/n_kv))));
            ggml_build_forward_expand(gf, ggml_cpy(ctx0, ggml_reshape_1d(ctx0, sc, n_kv), ggml_view_1d(ctx0, kv->get_pin_score(il), n_kv, 0)));
        }
    }

    // 3. local heads: store the new tokens in the ring, and with the compensation row fold the tokens that
    // leave the window; without it the evicted rows are only masked
    const int32_t ring = kv->ring_of(il);
    const auto * cl = inp->mctx_razor->get_loc(ring);
    const auto & ri = inp->rings[ring];

    ggml_tensor * k_st = cl->cpy_k(ctx0, k_l, ri.k_idxs, il);
    ggml_tensor * v_st = cl->cpy_v(ctx0, v_l, ri.v_idxs, il);
    if (kv->get_config().compensation) {
        razor_build_fold(g, inp, ri, kv, il, T, k_st, v_st);
    }
    // pinned tokens of this ubatch: from their new ring cell into their pin row
    if (ri.pin_src) {
        for (ggml_tensor ** st : { &k_st, &v_st }) {
            ggml_tensor * x2 = ggml_reshape_2d(ctx0, *st, (*st)->ne[0], ggml_nelements(*st)/(*st)->ne[0]);
            *st = ggml_set_rows(ctx0, x2, ggml_get_rows(ctx0, x2, ri.pin_src), ri.pin_dst);
        }
    }
    ggml_build_forward_expand(gf, k_st);
    ggml_build_forward_expand(gf, v_st);

    ggml_tensor * k = razor_view_like(ctx0, k_st, cl->get_k(ctx0, il));
    ggml_tensor * v = razor_view_like(ctx0, v_st, cl->get_v(ctx0, il));
    ggml_tensor * out_l = g.build_attn_mha(q_l, k, v, nullptr, ri.kq_mask, nullptr, nullptr, 0, kq_scale, il);

    return razor_merge_heads(ctx0, inp->inv_perm[il], h0_r == 0, out_r, out_l, d_v*n_gqa, n_r, n_l, T);
}

//
// C API
//

int32_t llama_razor_kv_bytes(const struct llama_context * ctx, int64_t out[4]) {
    llama_memory_t mem = llama_get_memory(ctx);
    if (!mem) {
        return -1;
    }
    if (const auto * rz = dynamic_cast<const llama_kv_cache_razor *>(mem)) {
        int64_t b[5];
        rz->kv_bytes(b);
        std::copy(b, b + 4, out);
        return 1;
    }
    int64_t total = 0;
    for (const auto & [buft, size] : mem->memory_breakdown()) {
        total += size;
    }
    out[0] = total;
    out[1] = 0;
    out[2] = 0;
    out[3] = total;
    return 0;
}

int64_t llama_razor_kv_bytes_swa(const struct llama_context * ctx) {
    const auto * rz = dynamic_cast<const llama_kv_cache_razor *>(llama_get_memory(ctx));
    if (!rz) {
        return 0;
    }
    int64_t b[5];
    rz->kv_bytes(b);
    return b[4];
}

int32_t llama_razor_head_map(const struct llama_context * ctx, int32_t * out, int32_t n) {
    const auto * rz = dynamic_cast<const llama_kv_cache_razor *>(llama_get_memory(ctx));
    if (!rz) {
        return 0;
    }
    const auto & map = rz->get_config().head_map;
    for (int32_t i = 0; i < std::min<int32_t>(n, map.size()); ++i) {
        out[i] = map[i];
    }
    return (int32_t) map.size();
}

int32_t llama_razor_window(const struct llama_context * ctx, uint32_t * n_sink, uint32_t * n_window) {
    const auto * rz = dynamic_cast<const llama_kv_cache_razor *>(llama_get_memory(ctx));
    if (!rz) {
        return 0;
    }
    *n_sink   = rz->get_config().n_sink;
    *n_window = rz->get_config().n_window;
    return 1;
}

int32_t llama_razor_layer_windows(const struct llama_context * ctx, uint32_t * out, int32_t n) {
    const auto * rz = dynamic_cast<const llama_kv_cache_razor *>(llama_get_memory(ctx));
    if (!rz) {
        return 0;
    }
    const auto & cfg = rz->get_config();
    for (int32_t il = 0; il < std::min<int32_t>(n, cfg.n_layer); ++il) {
        out[il] = cfg.n_local(il) > 0 ? cfg.window(il) : 0;
    }
    return (int32_t) cfg.n_layer;
}

int32_t llama_razor_ring_bytes(const struct llama_context * ctx, uint32_t * windows, int64_t * bytes, int32_t n) {
    const auto * rz = dynamic_cast<const llama_kv_cache_razor *>(llama_get_memory(ctx));
    if (!rz) {
        return 0;
    }
    for (int32_t r = 0; r < std::min<int32_t>(n, rz->n_rings()); ++r) {
        windows[r] = rz->get_ring(r).n_window();
        bytes[r]   = rz->ring_bytes(r);
    }
    return (int32_t) rz->n_rings();
}

int32_t llama_razor_n_ubatch(const struct llama_context * ctx) {
    const auto * rz = dynamic_cast<const llama_kv_cache_razor *>(llama_get_memory(ctx));
    return rz ? (int32_t) rz->get_n_ubatch() : 0;
}

int32_t llama_razor_n_pin(const struct llama_context * ctx) {
    const auto * rz = dynamic_cast<const llama_kv_cache_razor *>(llama_get_memory(ctx));
    return rz ? (int32_t) rz->get_config().n_pin : 0;
}

int32_t llama_razor_set_pins(struct llama_context * ctx, llama_seq_id seq_id, const llama_pos * pos, int32_t n) {
    auto * rz = dynamic_cast<llama_kv_cache_razor *>(llama_get_memory(ctx));
    if (!rz || rz->get_config().n_pin == 0 || seq_id < 0 || (uint32_t) seq_id >= llama_n_seq_max(ctx) || n < 0) {
        return -1;
    }
    if (!rz->set_pins(seq_id, std::vector<llama_pos>(pos, pos + n))) {
        return -1;
    }
    return (int32_t) rz->get_pins(seq_id).pos.size();
}

int32_t llama_razor_pin_capture(struct llama_context * ctx, bool on) {
    auto * rz = dynamic_cast<llama_kv_cache_razor *>(llama_get_memory(ctx));
    if (!rz || rz->get_config().n_pin == 0 || !rz->get_retr()) {
        return -1;
    }
    rz->set_pin_capture(on);
    return 0;
}

int32_t llama_razor_pin_scores(struct llama_context * ctx, llama_seq_id seq_id, float * out, int32_t n) {
    const auto * rz = dynamic_cast<const llama_kv_cache_razor *>(llama_get_memory(ctx));
    if (!rz || seq_id < 0 || (uint32_t) seq_id >= llama_n_seq_max(ctx) || n < 0 || !rz->pin_scores(seq_id, out, n)) {
        return -1;
    }
    return n;
}
