#!/usr/bin/env bash
# Builds every example plugin into plugins/dist/<name>.wasm (WebAssembly
# components for wasm32-wasip2), installing the rustup target if missing.
set -euo pipefail
cd "$(dirname "$0")"

target=wasm32-wasip2
if command -v rustup >/dev/null 2>&1; then
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
fi

# Plugins are built on their own: not with the daemon's target dir, nor with
# its native CPU flags (.cargo/config.toml at the repository root).
export CARGO_TARGET_DIR="$PWD/target"
export RUSTFLAGS=""
cargo build --release --target "$target" --workspace --quiet

mkdir -p dist
for crate in moderation format template; do
    cp "target/$target/release/$crate.wasm" "dist/$crate.wasm.tmp"
    mv "dist/$crate.wasm.tmp" "dist/$crate.wasm"
done
echo "plugins: built $(ls dist/*.wasm | tr '\n' ' ')"
