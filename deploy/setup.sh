#!/usr/bin/env bash
# gridckpt set-up for Debian 12 (bookworm) and 13 (trixie). Run as root.
#
# Installs what gridckpt needs and nothing else: RabbitMQ, a C compiler, Python with venv,
# iproute2/util-linux/procps, CRIU >= 4 (from apt when its `criu check` passes, otherwise
# built from the newer Debian suite's source package into /usr/local), and the gridckpt
# package into a virtualenv. Idempotent; takes well under 5 s when everything is present.
# It starts no service (deploy/test.sh and deploy/demo.sh do what they need).
#
# Usage: deploy/setup.sh [--check]
#   --check   report what is missing and change nothing (exit 0: all present, 1: work to do)
#
# Environment:
#   GRIDCKPT_VENV           virtualenv to install into (default: <repo>/.venv)
#   GRIDCKPT_EDITABLE       1: `pip install -e`, 0: regular install; default: keep the venv's
#                           current mode (a developer's editable install stays editable)
#   GRIDCKPT_PYTHON         interpreter for the venv (default: /usr/bin/python3)
#   GRIDCKPT_CRIU_SUITE     Debian suite whose CRIU source is built (default: trixie)
#   GRIDCKPT_CRIU_PREFIX    install prefix of a source-built CRIU (default: /usr/local)
#   GRIDCKPT_BUILD_DIR      where CRIU is built (default: /var/cache/gridckpt/build)
#   GRIDCKPT_DEBIAN_MIRROR  mirror URI for the deb-src line (default: the one the machine's
#                           own apt sources name)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(rabbitmq-server gcc build-essential python3 python3-venv python3-dev
              iproute2 util-linux procps)
CRIU_BUILD_DEPS=(build-essential pkg-config libprotobuf-dev libprotobuf-c-dev
                 protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev
                 libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev
                 libaio-dev libdrm-dev uuid-dev xz-utils)
CRIU_MIN_MAJOR=4
STAMP_NAME=".gridckpt-install-stamp"

CHECK_ONLY=0
TODO=()
APT_UPDATED=0

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# Record work that --check would do; returns 0 when the caller should go on and do it.
need() {
    TODO+=("$1")
    if (( CHECK_ONLY )); then log "missing: $1"; return 1; fi
    log "$1"
}

# ---------------------------------------------------------------- apt helpers

apt_update_once() {
    if (( APT_UPDATED == 0 )); then
        log "apt-get update"
        apt-get update -qq || apt-get update   # second run shows the full error
        APT_UPDATED=1
    fi
}

# Prints the packages from "$@" that dpkg does not list as installed.
missing_packages() {
    local p status
    for p in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [[ "$status" == ii* ]] || printf '%s\n' "$p"
    done
}

apt_install_missing() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    (( ${#missing[@]} == 0 )) && return 0
    need "apt-get install ${missing[*]}" || return 0
    apt_update_once
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# ---------------------------------------------------------------- Debian mirror

# Prints the first Debian main-archive mirror URI named by the apt sources under $1
# (sources.list, then sources.list.d/*.list and *.sources (deb822) in name order, as apt reads
# them) for the release $2. Each entry gets a rank, the lowest wins, file order breaks ties:
#   0  suite is the release, component main, URI path ends in /debian (a Debian mirror)
#   1  suite is the release, component main (a mirror under another path)
#   2  URI path ends in /debian (e.g. only -updates or -security-like suites are listed)
# Third-party repositories (other components, other paths) and disabled entries never win.
debian_mirror() {
    local etc="$1" codename="$2" f files=()
    [[ -f "$etc/sources.list" ]] && files+=("$etc/sources.list")
    while IFS= read -r f; do files+=("$f"); done < <(
        find "$etc/sources.list.d" -maxdepth 1 -type f \( -name '*.list' -o -name '*.sources' \) 2>/dev/null | LC_ALL=C sort)
    (( ${#files[@]} )) || return 1
    for f in "${files[@]}"; do
        if [[ "$f" == *.sources ]]; then deb822_uris "$f" "$codename"; else oneline_uris "$f" "$codename"; fi
    done | awk 'NF == 2' | sort -s -k1,1n | awk 'NR == 1 {print $2}' | grep .
}

# awk helper shared by both formats: print "<rank> <uri>" for one (uri, suite, components).
# shellcheck disable=SC2016
RANK_AWK='
    function rank(uri, suite, comps,   r) {
        if (uri !~ /^https?:\/\//) return
        sub(/\/+$/, "", uri)
        if (suite == code && (" " comps " ") ~ / main /) r = (uri ~ /\/debian$/) ? 0 : 1
        else if (uri ~ /\/debian$/) r = 2
        else return
        print r, uri
    }'

# One-line format: "deb [options] URI suite component...".
oneline_uris() {
    awk -v code="$2" "$RANK_AWK"'
        { sub(/#.*/, "") }
        $1 != "deb" && $1 != "deb-src" { next }
        {
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            comps = ""
            for (j = i + 2; j <= NF; j++) comps = comps " " $j
            rank($i, $(i + 1), comps)
        }' "$1"
}

# deb822 format: paragraphs with Types:, URIs:, Suites:, Components:, Enabled:.
deb822_uris() {
    awk -v code="$2" "$RANK_AWK"'
        function flush(   n, m, u, s, i, j) {
            if (types ~ /(^|[ \t])deb(-src)?([ \t]|$)/ && enabled != "no") {
                n = split(uris, u, " "); m = split(suites, s, " ")
                for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) rank(u[i], s[j], comps)
            }
            types = uris = suites = comps = enabled = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        /^[ \t]/ { next }                       # continuation line (e.g. an inline key)
        {
            key = tolower($1); sub(/:.*/, "", key)
            val = $0; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "components") comps = val
            else if (key == "enabled") { enabled = tolower(val); gsub(/[ \t]/, "", enabled) }
        }
        END { flush() }' "$1"
}

# ---------------------------------------------------------------- CRIU

criu_path() {
    command -v criu 2>/dev/null || return 1
}

# criu_major BINARY -> the major version number ("0" when unreadable)
criu_major() {
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9]*\).*/\1/p' | head -n1)
    printf '%s\n' "${v:-0}"
}

criu_usable() {
    local bin="$1"
    [[ -x "$bin" ]] || return 1
    (( $(criu_major "$bin") >= CRIU_MIN_MAJOR )) || return 1
    "$bin" check >/dev/null 2>&1
}

# Makes `apt-get source criu/<suite>` work: when apt does not know that suite's sources yet,
# adds its deb-src line on the machine's own mirror and runs apt-get update. The line names
# Debian's keyring (signed-by) like a stock deb822 entry does, so that apt sees no conflicting
# Signed-By for the same suite; if apt rejects it anyway, it is retried without signed-by.
ensure_deb_src() {
    local suite="$1" mirror list keyring=/usr/share/keyrings/debian-archive-keyring.gpg opts
    if apt-get source --print-uris "criu/${suite}" >/dev/null 2>&1; then
        return 0
    fi
    mirror="${GRIDCKPT_DEBIAN_MIRROR:-}"
    if [[ -z "$mirror" ]]; then
        mirror=$(debian_mirror /etc/apt "$(os_codename)") ||
            die "no Debian mirror found in /etc/apt/sources.list{,.d} (set GRIDCKPT_DEBIAN_MIRROR=URI)"
    fi
    list="/etc/apt/sources.list.d/gridckpt-${suite}-src.list"
    for opts in "[signed-by=${keyring}] " ""; do
        [[ -n "$opts" && ! -r "$keyring" ]] && continue
        log "adding 'deb-src ${opts}${mirror} ${suite} main' to $list"
        printf '# added by gridckpt deploy/setup.sh to build CRIU from source\ndeb-src %s%s %s main\n' \
            "$opts" "$mirror" "$suite" > "$list"
        log "apt-get update"
        if apt-get update -qq >&2 && apt-get source --print-uris "criu/${suite}" >/dev/null 2>&1; then
            APT_UPDATED=1
            return 0
        fi
    done
    rm -f "$list"
    apt-get update -qq >&2 || true
    die "apt cannot find the source package criu/${suite} on ${mirror}"
}

# build_criu PREFIX BUILD_DIR SUITE: upstream CRIU from the Debian source package.
build_criu() {
    local prefix="$1" build="$2" suite="$3" orig src
    ensure_deb_src "$suite"
    apt_install_missing "${CRIU_BUILD_DEPS[@]}"
    mkdir -p "$build"
    cd "$build"
    orig=$(find_orig_tarball "$build")
    if [[ -z "$orig" ]]; then
        log "apt-get source --download-only criu/${suite} in $build"
        # The Debian packaging tarball is not needed; the mirror may miss it (404), in which
        # case apt-get fails overall while the orig tarball is already downloaded.
        apt-get source --download-only "criu/${suite}" >&2 || log "apt-get source failed; looking for the upstream tarball"
        orig=$(find_orig_tarball "$build")
    fi
    if [[ -z "$orig" ]]; then
        fetch_orig_tarball "$suite"
        orig=$(find_orig_tarball "$build")
    fi
    [[ -n "$orig" ]] || die "could not download the CRIU source (criu/${suite}) from the Debian mirror"
    log "unpacking $orig"
    src="$build/criu-src"
    rm -rf "$src"
    mkdir -p "$src"
    tar -xf "$orig" -C "$src" --strip-components=1
    log "building CRIU ($(nproc) jobs) in $src"
    make -C "$src" -j"$(nproc)" criu >"$build/make.log" 2>&1 ||
        { tail -n 30 "$build/make.log" >&2; die "CRIU build failed (log: $build/make.log)"; }
    make -C "$src" install-criu PREFIX="$prefix" >>"$build/make.log" 2>&1 ||
        { tail -n 30 "$build/make.log" >&2; die "CRIU install failed (log: $build/make.log)"; }
    log "installed $prefix/sbin/criu ($("$prefix/sbin/criu" --version | head -n1))"
}

find_orig_tarball() {
    find "$1" -maxdepth 1 -name 'criu_*.orig.tar.*' ! -name '*.asc' -printf '%T@ %p\n' 2>/dev/null |
        sort -rn | awk 'NR == 1 {print $2}'
}

# Fallback: fetch only the upstream tarball, hash-checked by apt's own helper.
fetch_orig_tarball() {
    local suite="$1" uri name _size hash
    read -r uri name _size hash < <(apt-get source --print-uris "criu/${suite}" 2>/dev/null |
        awk '/\.orig\.tar\./ && !/\.asc/ {gsub(/\047/, "", $1); print $1, $2, $3, $4; exit}') || true
    [[ -n "${uri:-}" ]] || return 0
    log "downloading $name"
    /usr/lib/apt/apt-helper download-file "$uri" "$name" "$hash" >&2 || log "download of $uri failed"
}

ensure_criu() {
    local bin prefix suite
    prefix="${GRIDCKPT_CRIU_PREFIX:-/usr/local}"
    suite="${GRIDCKPT_CRIU_SUITE:-trixie}"
    if bin=$(criu_path) && criu_usable "$bin"; then
        log "CRIU ok: $bin ($("$bin" --version | head -n1))"
        return 0
    fi
    if [[ -x "$prefix/sbin/criu" ]] && criu_usable "$prefix/sbin/criu"; then
        log "CRIU ok: $prefix/sbin/criu"
        return 0
    fi
    # apt first, when its candidate is new enough (trixie and later).
    local cand
    cand=$(apt-cache policy criu 2>/dev/null | sed -n 's/^ *Candidate: *\([0-9]*\).*/\1/p')
    if [[ -n "$cand" && "$cand" =~ ^[0-9]+$ ]] && (( cand >= CRIU_MIN_MAJOR )); then
        need "apt-get install criu (candidate ${cand}.x)" || return 0
        apt_update_once
        if apt-get install -y -qq --no-install-recommends criu && criu_usable /usr/sbin/criu; then
            log "CRIU ok from apt: /usr/sbin/criu"
            return 0
        fi
        log "apt's criu does not pass 'criu check'; building from source"
    fi
    need "build CRIU >= ${CRIU_MIN_MAJOR} from the ${suite} source package into ${prefix}" || return 0
    build_criu "$prefix" "${GRIDCKPT_BUILD_DIR:-/var/cache/gridckpt/build}" "$suite"
    criu_usable "$prefix/sbin/criu" ||
        { "$prefix/sbin/criu" check >&2 || true; die "$prefix/sbin/criu does not pass 'criu check' on this kernel"; }
    log "CRIU ok: $prefix/sbin/criu"
}

os_codename() {
    local c=""
    if [[ -r /etc/os-release ]]; then
        # shellcheck disable=SC1091
        c=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    fi
    printf '%s\n' "${c:-unknown}"
}

# ---------------------------------------------------------------- Python

# A hash of everything that goes into the installed package.
source_hash() {
    (
        cd "$REPO"
        {
            find . -maxdepth 1 -type f \( -name pyproject.toml -o -name setup.py -o -name setup.cfg -o -name MANIFEST.in \)
            find orchestrator nodeagent interpose -type d \( -name __pycache__ -o -name build \) -prune -o \
                -type f \( -name '*.py' -o -name '*.c' -o -name '*.h' -o -name Makefile -o -name '*.toml' -o -name '*.json' \) -print 2>/dev/null || true
        } | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1
    )
}

# clean_copy SRC DST: the source tree without VCS data, virtualenvs and build artefacts.
clean_copy() {
    mkdir -p "$2"
    tar -C "$1" -cf - --exclude-vcs --exclude=./.venv --exclude=./venv --exclude=./build \
        --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude=.hypothesis --exclude=./store --exclude='./interpose/build' \
        --exclude='./interpose/*.so' . | tar -C "$2" -xf -
}

venv_is_editable() {
    grep -qs '"editable": *true' "$1"/lib/python3*/site-packages/gridckpt-*.dist-info/direct_url.json
}

ensure_venv() {
    local venv="${GRIDCKPT_VENV:-$REPO/.venv}" py="${GRIDCKPT_PYTHON:-/usr/bin/python3}"
    local mode want stamp
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        need "create virtualenv $venv" || return 0
        [[ -x "$py" ]] || py=$(command -v python3)
        "$py" -m venv --clear "$venv"
    fi
    case "${GRIDCKPT_EDITABLE:-}" in
        1) mode=editable ;;
        0) mode=regular ;;
        *) if venv_is_editable "$venv"; then mode=editable; else mode=regular; fi ;;
    esac
    want="$(source_hash) $mode"
    stamp=$(cat "$venv/$STAMP_NAME" 2>/dev/null || true)
    if [[ "$stamp" == "$want" && -x "$venv/bin/gridckpt" ]]; then
        log "gridckpt ok in $venv ($mode install, source unchanged)"
        return 0
    fi
    need "pip install ($mode) ${REPO}[test] into $venv" || return 0
    rm -f "$venv/$STAMP_NAME"
    local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
    if [[ $mode == editable ]]; then
        "${pip[@]}" -e "${REPO}[test]"
    else
        # Built from a clean copy (what a fresh clone holds), so no stale build/ or egg-info in
        # the working tree leaks into the wheel, and none is left behind. pip reinstalls a local
        # directory even when the version is unchanged.
        local copy
        copy=$(mktemp -d /tmp/gridckpt-src.XXXXXX)
        clean_copy "$REPO" "$copy/gridckpt"
        "${pip[@]}" "${copy}/gridckpt[test]" || { rm -rf "$copy"; die "pip install failed"; }
        rm -rf "$copy"
    fi
    "$venv/bin/gridckpt" --help >/dev/null || die "$venv/bin/gridckpt --help failed after install"
    printf '%s\n' "$want" > "$venv/$STAMP_NAME"
    log "gridckpt installed in $venv ($mode)"
}

# ---------------------------------------------------------------- main

main() {
    case "${1:-}" in
        --check) CHECK_ONLY=1 ;;
        "") ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; return 0 ;;
        *) printf 'usage: %s [--check]\n' "$0" >&2; return 2 ;;
    esac
    (( EUID == 0 )) || { printf '[setup] error: run as root (sudo %s)\n' "$0" >&2; return 2; }
    local t0=$SECONDS codename
    codename=$(os_codename)
    case "$codename" in
        bookworm|trixie) ;;
        *) log "warning: tested on Debian bookworm and trixie, this is '$codename'" ;;
    esac
    apt_install_missing "${APT_PACKAGES[@]}"
    ensure_criu
    ensure_venv
    if (( CHECK_ONLY )); then
        if (( ${#TODO[@]} )); then log "${#TODO[@]} thing(s) to do"; return 1; fi
        log "everything present"
        return 0
    fi
    log "done in $(( SECONDS - t0 )) s"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
