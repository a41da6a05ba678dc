#!/usr/bin/env bash
# Compile check of the patch series with the CUDA backend, on a machine with the CUDA toolkit (nvcc) but
# possibly no GPU and no driver: configures the project's own CMakeLists (the path `CMAKE_ARGS=-DGGML_CUDA=ON
# make setup` takes) and builds libllama, which links ggml-cuda. Nothing is installed.
# usage: tools/check_cuda_build.sh [BUILD_DIR] [CUDA_ARCH] [CMAKE_ARG ...]   (defaults: build/cuda-check, 90)
# e.g. `tools/check_cuda_build.sh build/cuda 90-real -DGGML_NATIVE=OFF` for libraries to carry to another machine.
# Without a driver, libcuda.so is replaced by an empty stub for the link only (the libraries then run only
# where a driver is installed); without cuBLAS in the toolkit, the nvidia-cublas wheel (CUBLAS_WHEEL) goes
# into BUILD_DIR/cublas-venv. On 2 CPU cores a cold build of one architecture takes about 50 minutes
# (ggml-cuda's template instances; measured with 90-real, nvcc 13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cuda-check}
arch=${2:-90}
shift $(( $# < 2 ? $# : 2 ))
command -v nvcc >/dev/null || { echo "check_cuda_build: nvcc not found (install the CUDA toolkit)" >&2; exit 2; }
cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
py=.venv/bin/python
[ -x "$py" ] || { echo "check_cuda_build: run \`make setup\` first" >&2; exit 2; }
mkdir -p "$build"
build=$(cd "$build" && pwd)
args=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$arch" -DCMAKE_BUILD_TYPE=Release "$@")

if ! ls "$cuda_home"/lib*/libcublas.so* "$cuda_home"/targets/*/lib/libcublas.so* >/dev/null 2>&1; then
  cu_ver=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  [ -x "$build/cublas-venv/bin/pip" ] || "$py" -m venv "$build/cublas-venv"
  # CUBLAS_WHEEL overrides the pick; 13.1.1.3 is the one checked with nvcc 13.0
  [ "$cu_ver" = 12 ] && wheel=nvidia-cublas-cu12 || wheel=nvidia-cublas==13.1.1.3
  "$build/cublas-venv/bin/pip" -q --disable-pip-version-check install "${CUBLAS_WHEEL:-$wheel}"
  nv=$(ls -d "$build"/cublas-venv/lib/python3*/site-packages/nvidia/cu"$cu_ver" 2>/dev/null ||
       ls -d "$build"/cublas-venv/lib/python3*/site-packages/nvidia/cublas)
  nv=$(echo "$nv" | head -1)
  args+=("-DCUDA_cublas_LIBRARY=$(ls "$nv"/lib/libcublas.so.* | head -1)"
         "-DCUDA_cublasLt_LIBRARY=$(ls "$nv"/lib/libcublasLt.so.* | head -1)"
         "-DCMAKE_CUDA_FLAGS=-I$nv/include" "-DCMAKE_CXX_FLAGS=-I$nv/include")
fi
if ! ldconfig -p | grep 'libcuda\.so\b' >/dev/null && ! ls "$cuda_home"/lib*/stubs/libcuda.so >/dev/null 2>&1; then
  # the driver's soname, so that the libraries look for the real libcuda.so.1 where they run
  gcc -shared -Wl,-soname,libcuda.so.1 -x c - -o "$build/libcuda-stub.so" < /dev/null
  # --no-as-needed: the stub defines nothing, and linkers that default to --as-needed (Debian's, Ubuntu's)
  # would drop it, leaving ggml-cuda's driver calls (cuMemCreate, ...) unresolved where it runs
  args+=("-DCUDA_cuda_driver_LIBRARY=$build/libcuda-stub.so" "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--no-as-needed")
fi

.venv/bin/cmake -S . -B "$build" -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" "${args[@]}"
.venv/bin/ninja -C "$build" llama
lib="$build/bin/libllama.so"
needs() { readelf -d "$build/bin/$1" | grep "NEEDED.*\[$2" >/dev/null; }  # no -q: an early exit fails the pipe
needs libllama.so libggml.so && needs libggml.so libggml-cuda.so ||
  { echo "check_cuda_build: $lib does not load ggml-cuda (through libggml)" >&2; exit 1; }
needs libggml-cuda.so libcuda.so.1 || { echo "check_cuda_build: libggml-cuda.so does not load the driver" >&2; exit 1; }
nm -D "$lib" | grep ' T llama_razor_kv_bytes$' >/dev/null || { echo "check_cuda_build: razor entry points missing" >&2; exit 1; }
echo "check_cuda_build: OK: $lib links ggml-cuda (sm_$arch) and exports the razor entry points"
