# shellcheck shell=bash
# Mesa's lavapipe (a Vulkan driver that runs on the CPU) for the Vulkan tests on a machine
# without a GPU, sourced by scripts/test-vulkan after scripts/lib/vulkan-env.sh.
#
# Debian 12's lavapipe (Mesa 22.3) crashes inside ggml's Vulkan graphs: SIGSEGV in its queue
# thread, deterministically in the trained-model tests with an F32 cache, although the same
# graphs run through `mistrald generate`. Mesa 25's lavapipe runs every test. So on Debian 12
# the driver from bookworm-backports' mesa-vulkan-drivers (Mesa 25.0, built for Debian 12: it
# needs LLVM 15 and the libraries Debian 12's mesa-vulkan-drivers already brought in) is
# fetched with `apt-get download` through a private sources list and unpacked with `dpkg -x`
# into target/vulkan-sdk/lavapipe/ (nothing is installed); its ICD manifest is rewritten to
# the unpacked library. Where the system's Mesa is 23 or newer, its own lavapipe is used.
#
# Exports VK_ICD_FILENAMES, the Vulkan loader's list of driver manifests, naming lavapipe's
# alone: the tests then run on lavapipe even on a machine that has a GPU (ggml sees it as
# Vulkan0; vulkan-env.sh sets GGML_VK_VISIBLE_DEVICES=0 so that ggml uses a CPU device).

LAVAPIPE_PREFIX="$PWD/target/vulkan-sdk/lavapipe"

lavapipe_system_manifest() {
    local m
    for m in /usr/share/vulkan/icd.d/lvp_icd.*.json /usr/share/vulkan/icd.d/lvp_icd.json; do
        [ -f "$m" ] && { echo "$m"; return 0; }
    done
    return 1
}

mesa_version=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
if [ -n "$mesa_version" ] && dpkg --compare-versions "$mesa_version" ge 23; then
    VK_ICD_FILENAMES=$(lavapipe_system_manifest) || {
        echo "lavapipe-env: mesa-vulkan-drivers $mesa_version has no lavapipe manifest" >&2
        exit 1
    }
else
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    if [ "$codename" != bookworm ]; then
        echo "lavapipe-env: the system's Mesa is $mesa_version (lavapipe before Mesa 23 crashes in ggml's graphs) and no newer one is known for '$codename'; install Mesa 23 or newer" >&2
        exit 1
    fi
    # Fetched once: the stamp is written after a complete unpack.
    if [ ! -f "$LAVAPIPE_PREFIX/.unpacked" ]; then
        rm -rf "$LAVAPIPE_PREFIX"
        apt_unpack lavapipe-env "$LAVAPIPE_PREFIX" bookworm-backports mesa-vulkan-drivers
        lib=$(find "$LAVAPIPE_PREFIX/usr" -name libvulkan_lvp.so | head -n 1)
        manifest=$(find "$LAVAPIPE_PREFIX/usr" -name 'lvp_icd*.json' | head -n 1)
        [ -n "$lib" ] && [ -n "$manifest" ] || {
            echo "lavapipe-env: no lavapipe in the fetched mesa-vulkan-drivers" >&2
            exit 1
        }
        sed "s#\"library_path\": *\"[^\"]*\"#\"library_path\": \"$lib\"#" "$manifest" >"$LAVAPIPE_PREFIX/lvp_icd.json"
        touch "$LAVAPIPE_PREFIX/.unpacked"
    fi
    VK_ICD_FILENAMES="$LAVAPIPE_PREFIX/lvp_icd.json"
fi
export VK_ICD_FILENAMES
echo "lavapipe-env: Vulkan driver manifest $VK_ICD_FILENAMES" >&2
