// razor-rpc-server: a worker of llama.cpp's RPC backend (ggml-rpc) serving this machine's devices, so that
// the layers of a model (and their KV cache, razor's included) can live on other machines. The razor cache
// uses only stock ggml ops, so a worker needs nothing of razor's own: this is llama.cpp's tools/rpc server
// reduced to what razor-gguf needs (the llama.cpp source vendored by llama-cpp-python does not ship it).
//
// The RPC protocol has no authentication and no encryption: listen on a trusted network only.

#include "ggml-backend.h"
#include "ggml-rpc.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

static void usage(const char * argv0) {
    fprintf(stderr,
            "usage: %s [--host HOST] [--port PORT] [--threads N] [--device NAME[,NAME...]]\n"
            "  --host    address to listen on (default 127.0.0.1: this machine only)\n"
            "  --port    TCP port (default 50052)\n"
            "  --threads CPU threads of a CPU device (default: all cores)\n"
            "  --device  devices to serve, by ggml name (default: every GPU, else the CPU)\n", argv0);
}

int main(int argc, char ** argv) {
    std::string host = "127.0.0.1";
    int port = 50052;
    int n_threads = (int) std::max(1u, std::thread::hardware_concurrency());
    std::string device_names;

    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const bool has_value = i + 1 < argc;
        if ((a == "--host" || a == "-H") && has_value) {
            host = argv[++i];
        } else if ((a == "--port" || a == "-p") && has_value) {
            port = std::atoi(argv[++i]);
        } else if ((a == "--threads" || a == "-t") && has_value) {
            n_threads = std::atoi(argv[++i]);
        } else if ((a == "--device" || a == "-d") && has_value) {
            device_names = argv[++i];
        } else if (a == "--help" || a == "-h") {
            usage(argv[0]);
            return 0;
        } else {
            fprintf(stderr, "razor-rpc-server: unknown or incomplete argument '%s'\n", a.c_str());
            usage(argv[0]);
            return 2;
        }
    }
    if (port < 1 || port > 65535 || n_threads < 1) {
        fprintf(stderr, "razor-rpc-server: --port must be in 1..65535 and --threads at least 1\n");
        return 2;
    }

    ggml_backend_load_all();

    std::vector<ggml_backend_dev_t> devices;
    if (!device_names.empty()) {
        size_t start = 0;
        while (start <= device_names.size()) {
            const size_t end = std::min(device_names.find(',', start), device_names.size());
            const std::string name = device_names.substr(start, end - start);
            ggml_backend_dev_t dev = ggml_backend_dev_by_name(name.c_str());
            if (!dev) {
                fprintf(stderr, "razor-rpc-server: no device named '%s'\n", name.c_str());
                return 2;
            }
            devices.push_back(dev);
            start = end + 1;
        }
    } else {
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) {
                devices.push_back(dev);
            }
        }
        if (devices.empty()) {
            devices.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
        }
    }

    if (host != "127.0.0.1" && host != "localhost" && host != "::1") {
        fprintf(stderr, "razor-rpc-server: WARNING: listening on %s: the RPC protocol has no authentication, "
                        "anyone who can reach this port can run code on these devices; use a trusted network only\n",
                host.c_str());
    }
    const std::string endpoint = host + ":" + std::to_string(port);
    fflush(stdout);
    ggml_backend_rpc_start_server(endpoint.c_str(), nullptr, (size_t) n_threads, devices.size(), devices.data());
    // returns only when the server could not start (the port taken, say)
    fprintf(stderr, "razor-rpc-server: could not serve on %s\n", endpoint.c_str());
    return 1;
}
