#!/usr/bin/env bash
# Fuzz driver for barrage's parsers (cargo-fuzz + libFuzzer, ASan, release + debug assertions).
#
#   fuzz/run.sh build            build every target
#   fuzz/run.sh run N [target..] run each target (default: all) for N seconds, one at a time
#
# Only one stable toolchain is installed; RUSTC_BOOTSTRAP=1 lets it take the -Z sanitizer flags
# cargo-fuzz passes. The committed seeds in fuzz/corpus/<target>/ are read, never written: new
# inputs go to fuzz/work/<target>/ (git-ignored) and crashes to fuzz/artifacts/<target>/.
# Set CARGO_TARGET_DIR to share a build directory; it defaults to fuzz/target.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
export RUSTC_BOOTSTRAP=1
target_dir="${CARGO_TARGET_DIR:-$here/target}"
flags=(-O -a --target-dir "$target_dir")
all_targets=(packet_stream container ws_frames ws_upgrade link_frames ingest_frames token edge_session auth udp tls_records)

usage() {
    echo "usage: $0 build | run SECONDS [target...]" >&2
    exit 2
}

case "${1:-}" in
build)
    cargo fuzz build "${flags[@]}"
    ;;
run)
    secs="${2:-}"
    [[ "$secs" =~ ^[0-9]+$ ]] || usage
    shift 2
    targets=("$@")
    [[ ${#targets[@]} -gt 0 ]] || targets=("${all_targets[@]}")
    cargo fuzz build "${flags[@]}"
    failed=()
    for t in "${targets[@]}"; do
        mkdir -p "work/$t" "corpus/$t"
        echo "== $t: ${secs}s"
        # -rss_limit_mb (libFuzzer default, explicit): ASan holds ~500 MB here; the codecs cap every
        # allocation far below the rest, so exceeding it is a bug.
        if ! cargo fuzz run "${flags[@]}" "$t" "work/$t" "corpus/$t" -- \
            -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1; then
            failed+=("$t")
        fi
    done
    if [[ ${#failed[@]} -gt 0 ]]; then
        echo "FAILED: ${failed[*]} (reproducers in fuzz/artifacts/<target>/)" >&2
        exit 1
    fi
    echo "all targets ran ${secs}s without a failure"
    ;;
*)
    usage
    ;;
esac
