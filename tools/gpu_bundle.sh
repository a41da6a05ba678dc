#!/usr/bin/env bash
# The GPU checks on a machine that has a GPU, Python with numpy/pytest, and no network (nothing to build with or
# install from): everything it lacks is made here into one folder that travels with the checkout.
#   make DIR   CUDA libraries (tools/check_cuda_build.sh build/cuda ARCH -DGGML_NATIVE=OFF, stripped, as
#              DIR/cuda-libs.tar.xz), wheels of the Python dependencies for the target's Python (DIR/whl) and
#              llama-cpp-python's pure-Python package from .venv (DIR/site); about 22 MB; ccache keeps a rebuild short
#   run DIR ARCHIVE.tgz [STEP ...]
#              on the GPU machine, from the checkout's root: installs DIR's wheels into a temporary folder, points
#              the libraries there and runs the steps in order, packing every output (GPU_OUT, default /tmp/gpu-out)
#              into ARCHIVE after each, so a run stopped at any point keeps what it finished. Steps:
#              tests (tests/test_razor_gpu.py, while both Llama-3-8B twins are written in the background),
#              bench (8k and 32k: the retrieval-first and the gathered twin, each without and with the compensation
#              row), bench128k (131072 tokens: retrieval-first without the row, gathered with it), fit;
#              default: all four, in that order.
# Environment: CUDA_ARCH (90-real), PY_TARGET (3.12), PYTHON on the GPU machine (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 make DIR | run DIR ARCHIVE.tgz [tests|bench|bench128k|fit ...]" >&2; exit 2; }
verb=$1 dir=$2
shift 2

make_bundle() {
  local py=.venv/bin/python libs
  [ -x "$py" ] || { echo "gpu_bundle: run \`make setup\` first" >&2; exit 2; }
  bash tools/check_cuda_build.sh build/cuda "${CUDA_ARCH:-90-real}" -DGGML_NATIVE=OFF \
    -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache || exit 1
  mkdir -p "$dir/whl" "$dir/site"
  libs=$(mktemp -d)
  cp -L build/cuda/bin/lib*.so "$libs/" && strip --strip-unneeded "$libs"/*.so && tar -cJf "$dir/cuda-libs.tar.xz" -C "$libs" . || exit 1
  rm -rf "$libs"
  # the versions .venv runs, as wheels for the target's Python (numpy, pyyaml, tqdm, jinja2 are assumed there)
  local pins
  pins=$("$py" -m pip list --format=freeze 2>/dev/null | grep -iE '^(cffi|pycparser|diskcache|gguf)==')
  # shellcheck disable=SC2086
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_TARGET:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir/whl" $pins || exit 1
  local sp
  sp=$("$py" -c 'import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec("llama_cpp").origin).parents[1])')
  rm -rf "$dir/site/llama_cpp" "$dir"/site/llama_cpp_python-*.dist-info
  cp -r "$sp/llama_cpp" "$sp"/llama_cpp_python-*.dist-info "$dir/site/" || exit 1
  find "$dir/site" -name __pycache__ -prune -exec rm -rf {} +
  du -sh "$dir"
}

run_bundle() {
  local archive=$1 g=${GPU_OUT:-/tmp/gpu-out} t0=$SECONDS py=${PYTHON:-python3}
  shift
  [ $# -gt 0 ] || set -- tests bench bench128k fit
  mkdir -p "$g"
  archive=$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")
  pack() { echo "gpu_bundle: $* ($((SECONDS - t0)) s)" | tee -a "$g/steps.log"; tar czf "$archive" -C "$(dirname "$g")" "$(basename "$g")"; }
  local site lib
  site=$(mktemp -d) lib=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$dir"/whl/*.whl \
    > "$g/setup.log" 2>&1 || { pack "installing the wheels failed"; exit 1; }
  tar -xJf "$dir/cuda-libs.tar.xz" -C "$lib" || { pack "unpacking the libraries failed"; exit 1; }
  export PYTHONPATH=$site:$(cd "$dir/site" && pwd) RAZOR_GGUF_LIB_PATH=$lib PYTHON=$py PYTHONUNBUFFERED=1
  # cuBLAS and the CUDA runtime: the toolkit's, or the nvidia-* wheels PyTorch brought
  local cub
  cub=$(find /usr/local /opt /usr/lib -name 'libcublas.so.1[0-9]*' -print -quit 2>/dev/null)
  export LD_LIBRARY_PATH=$lib${cub:+:$(dirname "$cub")}:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  { nvidia-smi; nproc; "$py" -V; echo "cublas: ${cub:-not found}"; } > "$g/machine.txt" 2>&1
  "$py" -c 'from razor_gguf import _native; _native.load_llama_cpp(); print("gpus", _native.local_gpu_devices())' \
    >> "$g/machine.txt" 2>&1
  pack "setup"
  grep -q "^gpus [1-9]" "$g/machine.txt" || { pack "no GPU device (see machine.txt)"; exit 1; }

  local step
  export BENCH_DECODE=${BENCH_DECODE:-256} BENCH_S=${BENCH_S:-150}
  for step in "$@"; do
    case $step in
      tests)
        tools/gpu_run.sh "$g" none twins & local p=$!
        TESTS_S=${TESTS_S:-170} tools/gpu_run.sh "$g" none tests
        wait $p ;;
      bench)
        BENCH_ARGS=--no-compensation BENCH_TAG=-norow BENCH_FIRST_CTX="8192 32768" BENCH_CTX="8192 32768" \
          tools/gpu_run.sh "$g" none bench
        pack "bench without the row"
        BENCH_FIRST_CTX="8192 32768" BENCH_CTX="8192 32768" tools/gpu_run.sh "$g" none bench ;;
      bench128k)
        BENCH_ARGS=--no-compensation BENCH_TAG=-norow BENCH_FIRST_CTX=131072 BENCH_CTX= tools/gpu_run.sh "$g" none bench
        pack "bench 131072 without the row"
        BENCH_FIRST_CTX= BENCH_CTX=131072 tools/gpu_run.sh "$g" none bench ;;
      fit) FIT_S=${FIT_S:-120} tools/gpu_run.sh "$g" none fit ;;
      *) echo "gpu_bundle: unknown step $step" >&2; exit 2 ;;
    esac
    pack "$step"
  done
}

case $verb in
  make) make_bundle ;;
  run) [ $# -ge 1 ] || { echo "usage: $0 run DIR ARCHIVE.tgz [STEP ...]" >&2; exit 2; }; run_bundle "$@" ;;
  *) echo "gpu_bundle: unknown verb $verb (make or run)" >&2; exit 2 ;;
esac
