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
