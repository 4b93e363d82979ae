# shellcheck shell=bash
# Installs the system packages warren's tests and tools use, when missing.
# Sourced by scripts/test and scripts/run. Debian/Ubuntu (apt-get).

# command -> Debian package that provides it
WARREN_TEST_DEPS=(
  "ip:iproute2"
  "curl:curl"
  "wireguard-go:wireguard-go"
  "wg:wireguard-tools"
  "nft:nftables"
  "iperf3:iperf3"
  "systemd-socket-activate:systemd"
  "systemd-analyze:systemd"
  "sudo:sudo"
  "visudo:sudo"
  "setpriv:util-linux"
  "python3:python3"
  "dpkg-deb:dpkg"
  "addgroup:adduser"
  "unshare:util-linux"
  "tcpdump:tcpdump"
  "dig:dnsutils"
  "ss:iproute2"
  "systemd-nspawn:systemd-container"
  "mmdebstrap:mmdebstrap"
)

install_missing_deps() {
  local missing=() entry cmd pkg
  for entry in "${WARREN_TEST_DEPS[@]}" "$@"; do
    cmd=${entry%%:*}
    pkg=${entry#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing commands; install these packages by hand: ${missing[*]}" >&2
    return 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

require_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "$1 needs root (network namespaces, TUN devices, test users): run it with sudo" >&2
    exit 1
  fi
}

ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (rustup.rs, or apt-get install cargo) first" >&2
    exit 1
  fi
}
