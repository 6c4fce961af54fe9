# shellcheck shell=bash
# apt_need LABEL PACKAGE...: installs those of the Debian packages that are not installed yet
# (one `apt-get update` and one `apt-get install`, through sudo unless root), saying which on
# stderr under LABEL. Sourced by every script that installs packages (install-deps, test-deb,
# build-deb, the scripts/lib/*-env.sh files).
apt_need() {
    local label=$1
    shift
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "$label: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# apt_unpack LABEL DIR SUITE PACKAGE...: downloads the packages from Debian's SUITE through a
# private sources list, lists and cache under DIR/apt (the system's apt sources and state are
# not touched; its apt.conf.d, proxies included, still applies; not sandboxed as _apt, since
# the files go to a directory of the invoking user's), keeps the .debs in DIR/debs and unpacks
# them with `dpkg -x` into DIR (DIR/usr/...). Nothing is installed.
apt_unpack() {
    local label=$1 dir=$2 suite=$3
    shift 3
    echo "$label: fetching $* from $suite into $dir" >&2
    mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/debs"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
        >"$dir/apt/sources.list"
    local apt=(apt-get -qq
        -o Dir::Etc::SourceList="$dir/apt/sources.list"
        -o Dir::Etc::SourceParts=/dev/null
        -o Dir::State::Lists="$dir/apt/lists"
        -o Dir::Cache="$dir/apt/cache"
        -o APT::Sandbox::User="$(id -un)")
    "${apt[@]}" update
    (cd "$dir/debs" && "${apt[@]}" download "$@")
    local deb
    for deb in "$dir"/debs/*.deb; do
        dpkg -x "$deb" "$dir"
    done
    rm -rf "$dir/apt"
}
