#!/usr/bin/env bash
# Build llama.cpp's llama-quantize, llama-imatrix and llama-perplexity from the source inside the PyPI
# sdist of llama-cpp-python (the same llama.cpp the test extra's binding is built from), into
# exports/llama.cpp/build/bin, where benchmarks/gguf.py looks for them. About 6 minutes on 2 cores.
set -euo pipefail
version="${1:-0.3.36}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/exports/llama.cpp"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp" -q
tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
rm -rf "$dest"
mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp" "$dest"
cmake -S "$dest" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > /dev/null
cmake --build "$dest/build" -j"$(nproc)" --target llama-quantize llama-imatrix llama-perplexity > /dev/null
ls "$dest/build/bin"
