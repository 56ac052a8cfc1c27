#!/usr/bin/env bash
# Regenerates the committed seed corpus fuzz/corpus/<target>/ with proto's own encoders
# (fuzz/seedgen). Every seed is a valid input in the layout its target documents.
# Plain stable cargo; honours CARGO_TARGET_DIR.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cargo run --quiet --manifest-path "$here/seedgen/Cargo.toml" -- "$here/corpus"
find "$here/corpus" -type f | sort
