# shellcheck shell=bash
# The aarch64 cross-build environment, sourced by scripts/test-aarch64 and
# scripts/build-deb --target aarch64-unknown-linux-gnu (bash; expects to be run
# from the repository root).
#
# Installs what it needs, idempotently: Debian's gcc/g++-aarch64-linux-gnu,
# libc6-dev-arm64-cross and qemu-user (plus cmake and libclang for ggml's
# build and bindgen), and rustup's aarch64-unknown-linux-gnu target; then
# exports the cross toolchain for cargo, cc, cmake and bindgen, and qemu as the
# runner of target binaries.

AARCH64_TARGET=aarch64-unknown-linux-gnu
AARCH64_SYSROOT=/usr/aarch64-linux-gnu

# shellcheck source=scripts/lib/apt-need.sh
. scripts/lib/apt-need.sh
apt_need aarch64-env gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user cmake clang libclang-dev
rustup target list --installed | grep -qx "$AARCH64_TARGET" || rustup target add "$AARCH64_TARGET"

# Cross toolchain for cc/cmake (C kernels, ggml) and the final link.
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $AARCH64_SYSROOT"
# bindgen (libclang) must see the target's C headers, not the host's.
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--target=$AARCH64_TARGET -isystem $AARCH64_SYSROOT/include"
# .cargo/config.toml builds for the host CPU (target-cpu=native); a cross
# build must not. Target-specific rustflags replace build.rustflags; they must
# not name a target-cpu either: llama-cpp-sys-2 passes it to gcc as -march=,
# and aarch64 gcc knows no -march=generic. Without one, ggml is built for
# armv8-a (GGML_NATIVE off) and rustc for its generic aarch64 baseline.
# (+neon is the aarch64 baseline anyway: a no-op that keeps the list non-empty.)
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+neon"
