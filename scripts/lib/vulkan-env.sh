# shellcheck shell=bash
# The Vulkan build environment, sourced by scripts/build-vulkan (bash; expects
# to be run from the repository root).
#
# Installs what it needs, idempotently:
#   glslc                 (ggml compiles its compute shaders to SPIR-V at build time)
#   libvulkan1            (the Vulkan loader, linked as -lvulkan)
#   mesa-vulkan-drivers   (Mesa's drivers: lavapipe, the CPU software driver that
#                          CI runs on, and v3dv for the Raspberry Pi 5's GPU)
#   vulkan-tools          (vulkaninfo, to see which devices the loader finds)
#   cmake, a C/C++ compiler, libclang (ggml's build and bindgen, as scripts/install-deps)
# and the Vulkan and SPIR-V headers from Debian 13 (trixie) in a private prefix,
# target/vulkan-sdk/: Debian 12's headers (1.3.239) are too old for the ggml in
# llama-cpp-sys-2 0.1.161 (it uses vk::LayerSettingEXT). The two header
# packages, libvulkan-dev and spirv-headers, are fetched with `apt-get download`
# through a private sources list and lists directory under that prefix (the
# system's apt sources and state are not touched) and unpacked with `dpkg -x`;
# no trixie package is installed. Debian 12's loader and glslc work with them.
#
# Then exports:
#   VULKAN_SDK  the prefix's usr/, which everything looks at: CMake's FindVulkan
#               takes the headers from $VULKAN_SDK/include and the loader from
#               $VULKAN_SDK/lib, ggml's CMake looks for SPIRV-HeadersConfig.cmake
#               under it, and llama-cpp-sys-2 adds $VULKAN_SDK/lib to the link
#               path for -lvulkan. $VULKAN_SDK/lib/libvulkan.so is a link to the
#               system's libvulkan.so.1 (the development link that libvulkan-dev
#               would provide), so no Debian 12 libvulkan-dev, with its old
#               headers, is needed or used.
#   GGML_VK_VISIBLE_DEVICES=0
#               ggml skips CPU-type Vulkan devices such as lavapipe unless they
#               are named here; on a machine without a GPU, lavapipe is device 0.
#               Only set if unset, so a machine with a GPU can pick its own.

VULKAN_SDK_PREFIX="$PWD/target/vulkan-sdk"
# The suite the headers come from; the packages are recorded in $VULKAN_SDK_PREFIX/debs/.
VULKAN_SDK_SUITE=trixie

# shellcheck source=scripts/lib/apt-need.sh
. scripts/lib/apt-need.sh
apt_need vulkan-env glslc libvulkan1 mesa-vulkan-drivers vulkan-tools debian-archive-keyring cmake build-essential clang libclang-dev

# The trixie headers, fetched once: the stamp is written after a complete unpack.
if [ ! -f "$VULKAN_SDK_PREFIX/.unpacked" ]; then
    rm -rf "$VULKAN_SDK_PREFIX"
    apt_unpack vulkan-env "$VULKAN_SDK_PREFIX" "$VULKAN_SDK_SUITE" libvulkan-dev spirv-headers
    # The loader's development link, to the system's (Debian 12) loader; the
    # package's own libvulkan.so, under usr/lib/<multiarch>/, is a relative
    # link that dangles here.
    ln -sfn "/usr/lib/$(gcc -print-multiarch)/libvulkan.so.1" "$VULKAN_SDK_PREFIX/usr/lib/libvulkan.so"
    touch "$VULKAN_SDK_PREFIX/.unpacked"
fi

export VULKAN_SDK="$VULKAN_SDK_PREFIX/usr"
export GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}"
