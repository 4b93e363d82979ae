#!/usr/bin/env bash
# Installs warren on distributions without dpkg (what the .deb does):
# binaries, systemd units, the sudoers snippet, man pages, completions, and the
# "warren" group; enables the helper's socket when systemd runs.
#
#   sudo packaging/install.sh                 # install into /usr/local
#   sudo packaging/install.sh --uninstall     # remove everything it installed
#   PREFIX=/opt/warren DESTDIR=/tmp/stage packaging/install.sh   # staged, no group/systemctl
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
bindir=$PREFIX/bin
unitdir=${UNITDIR:-/etc/systemd/system}
userunitdir=${USERUNITDIR:-/etc/systemd/user}
files=(
  "$bindir/warren" "$bindir/warren-helper" "$bindir/warren-worker"
  "$unitdir/warren-helper.socket" "$unitdir/warren-helper.service"
  "$userunitdir/warren-proxy.service" "$userunitdir/warren-instance@.service"
  /etc/sudoers.d/warren
  "$PREFIX/share/bash-completion/completions/warren"
  "$PREFIX/share/zsh/site-functions/_warren"
  "$PREFIX/share/fish/vendor_completions.d/warren.fish"
)
live() { [[ -z $DESTDIR ]]; }

if [[ ${1:-} == --uninstall ]]; then
  if live && [[ -d /run/systemd/system ]]; then
    systemctl disable --now warren-helper.socket warren-helper.service >/dev/null 2>&1 || true
  fi
  for f in "${files[@]}"; do rm -f "$DESTDIR$f"; done
  rm -f "$DESTDIR$PREFIX"/share/man/man1/warren*.1 "$DESTDIR$PREFIX"/share/man/man8/warren-helper*.8
  if live; then
    rm -rf /run/warren
    getent group warren >/dev/null && groupdel warren || true
    [[ -d /run/systemd/system ]] && systemctl daemon-reload || true
  fi
  echo "warren uninstalled"
  exit 0
fi

[[ $(id -u) -eq 0 || -n $DESTDIR ]] || { echo "run as root (or set DESTDIR)" >&2; exit 1; }
cargo build --release --locked --bins
target=${CARGO_TARGET_DIR:-target}
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
"$target/release/warren" generate-man "$gen"
"$target/release/warren-helper" generate-man "$gen"

inst() { install -D -m "$1" "$2" "$DESTDIR$3"; }
inst 755 "$target/release/warren" "$bindir/warren"
inst 755 "$target/release/warren-helper" "$bindir/warren-helper"
inst 755 "$target/release/warren-worker" "$bindir/warren-worker"
for u in warren-helper.socket warren-helper.service; do
  sed "s#/usr/bin/#$bindir/#g" "systemd/$u" >"$gen/$u"
  inst 644 "$gen/$u" "$unitdir/$u"
done
for u in warren-proxy.service warren-instance@.service; do
  sed "s#/usr/bin/#$bindir/#g" "systemd/user/$u" >"$gen/$u"
  inst 644 "$gen/$u" "$userunitdir/$u"
done
sed "s#/usr/bin/warren-helper#$bindir/warren-helper#g" packaging/sudoers.d/warren >"$gen/sudoers"
visudo -c -q -f "$gen/sudoers"
inst 440 "$gen/sudoers" /etc/sudoers.d/warren
for m in "$gen"/*.1; do inst 644 "$m" "$PREFIX/share/man/man1/$(basename "$m")"; done
for m in "$gen"/*.8; do inst 644 "$m" "$PREFIX/share/man/man8/$(basename "$m")"; done
"$target/release/warren" completions bash >"$gen/c.bash"
"$target/release/warren" completions zsh >"$gen/c.zsh"
"$target/release/warren" completions fish >"$gen/c.fish"
inst 644 "$gen/c.bash" "$PREFIX/share/bash-completion/completions/warren"
inst 644 "$gen/c.zsh" "$PREFIX/share/zsh/site-functions/_warren"
inst 644 "$gen/c.fish" "$PREFIX/share/fish/vendor_completions.d/warren.fish"

if live; then
  getent group warren >/dev/null || groupadd --system warren
  if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable --now warren-helper.socket
  fi
fi
echo "warren installed under $DESTDIR$PREFIX; add users with: sudo usermod -aG warren USER"
