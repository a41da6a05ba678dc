#include "llama-razor.h"

#include "ggml-backend.h"

#include <string>

#define LLAMA_RAZOR_BASE_COMMIT "0c1e57098"

uint32_t llama_razor_patch_version(void) {
    return LLAMA_RAZOR_PATCH_VERSION;
}

const char * llama_razor_base_commit(void) {
    return LLAMA_RAZOR_BASE_COMMIT;
}

const char * llama_razor_backends(void) {
    static std::string s;
    s.clear();
    for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
        if (!s.empty()) {
            s += ",";
        }
        s += ggml_backend_reg_name(ggml_backend_reg_get(i));
    }
    return s.c_str();
}
