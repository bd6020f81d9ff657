#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` from the llama.cpp sources vendored in
# llama-cpp-python's sdist, at exactly the version installed in .venv, so the
# benchmark compares tcserve with the same inference code it embeds.
#
# Everything lands under bench/.cache/ (git-ignored). Skips all work when the
# binary already exists. AMX is switched off: ggml's AMX kernels segfault on
# this VM's CPU, and tcserve's llama-cpp-python was built the same way.
#
# Usage: bench/build_llama_server.sh            (prints the binary path last)
#        JOBS=4 bench/build_llama_server.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CACHE="$ROOT/bench/.cache"
BUILD="$CACHE/llama-server-build"
BIN="$BUILD/bin/llama-server"
JOBS="${JOBS:-2}"

if [[ -x "$BIN" ]]; then
    echo "llama-server already built: $BIN" >&2
    echo "$BIN"
    exit 0
fi

VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
SDIST_DIR="$CACHE/sdist"
SRC_DIR="$CACHE/llama_cpp_python-$VERSION"
mkdir -p "$SDIST_DIR"

TARBALL="$(ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [[ -z "$TARBALL" ]]; then
    echo "downloading llama-cpp-python==$VERSION sdist" >&2
    "$PY" -m pip download --no-binary :all: --no-deps \
        "llama-cpp-python==$VERSION" -d "$SDIST_DIR" >&2
    TARBALL="$(ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz)"
fi
if [[ ! -d "$SRC_DIR" ]]; then
    tar -xzf "$TARBALL" -C "$CACHE"
fi
LLAMA_SRC="$SRC_DIR/vendor/llama.cpp"

# In the vendored llama.cpp (0.3.36) LLAMA_CURL is deprecated and ignored
# (only a warning); HTTPS moved to LLAMA_OPENSSL, which we switch off (the
# benchmark only talks to 127.0.0.1). The server lives under tools/, so
# LLAMA_BUILD_TOOLS must be ON. LLAMA_USE_PREBUILT_UI=OFF stops the build
# from trying to download the web UI from Hugging Face (the server then has
# no embedded UI, which the API does not need).
NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
start=$(date +%s)
CFLAGS="$NOAMX" CXXFLAGS="$NOAMX" cmake -S "$LLAMA_SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF >&2
cmake --build "$BUILD" --target llama-server -j"$JOBS" >&2
end=$(date +%s)
echo "built llama-server in $((end - start)) s (llama-cpp-python $VERSION)" >&2
echo "$BIN"
