#!/usr/bin/env bash
# Builds the Debian package: release binaries, man pages and shell completions
# generated from the CLI definitions (clap), then cargo-deb. Prints the .deb path.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --version 3.8.0 >&2
cargo build --release --locked --bins >&2
target=${CARGO_TARGET_DIR:-target}
gen=target/generated   # where the deb metadata looks (unprivileged/Cargo.toml)
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions"
"$target/release/warren" generate-man "$gen/man"
"$target/release/warren-helper" generate-man "$gen/man"
"$target/release/warren" completions bash >"$gen/completions/warren.bash"
"$target/release/warren" completions zsh >"$gen/completions/_warren"
"$target/release/warren" completions fish >"$gen/completions/warren.fish"
cargo deb -p warren --no-build --locked 2>&1 | tail -1
