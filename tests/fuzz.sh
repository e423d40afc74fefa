#!/usr/bin/env bash
# Fuzzes the RESP codec (libs/resp) with the cargo-fuzz targets in fuzz/fuzz_targets/.
#
#   tests/fuzz.sh                  run every target for $FUZZ_SECONDS (default 60) seconds each
#   tests/fuzz.sh request_decoder  run one target (request_decoder, reply_decoder, frame_round_trip)
#   tests/fuzz.sh --check          only build the targets (for CI)
#   FUZZ_SECONDS=600 tests/fuzz.sh reply_decoder
#
# Installs cargo-fuzz if missing. cargo-fuzz passes nightly-only flags (-Zsanitizer=address and
# sancov), so the builds run on the stable toolchain with RUSTC_BOOTSTRAP=1. Targets build with
# AddressSanitizer and debug assertions; libFuzzer treats a panic, an RSS above 2 GB or a single
# allocation above that as a crash. Prints one summary line per target; on a crash, prints the
# panic or sanitizer report and the artifact (the input, under fuzz/artifacts/<target>/), and
# exits non-zero.
# Inputs found along the way accumulate in fuzz/corpus/<target>/ and seed the next run; full
# libFuzzer logs go to fuzz/target/logs/<target>.log. Reproduce a crash with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <artifact>
# and print its input with `cargo fuzz fmt <target> <artifact>` (or `xxd <artifact>`).
set -euo pipefail

cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [[ "${1:-}" == "--check" ]]; then
    cargo fuzz build
    exit 0
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# A libFuzzer final stat (-print_final_stats) from the current target's log.
stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -n 1; }

mkdir -p fuzz/target/logs
failed=()
for target in "${targets[@]}"; do
    log="fuzz/target/logs/$target.log"
    status=0
    cargo fuzz run "$target" -- \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    if [[ $status -eq 0 ]]; then
        seconds="$(sed -n 's/^Done .* in \([0-9]*\) second.*/\1/p' "$log")"
        printf '%-18s ok     %s execs in %ss (%s/s), peak RSS %s MB, corpus %s\n' "$target" \
            "$(stat number_of_executed_units)" "$seconds" "$(stat average_exec_per_sec)" \
            "$(stat peak_rss_mb)" "$(find "fuzz/corpus/$target" -type f | wc -l)"
    else
        failed+=("$target")
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        echo "$target FAILED (exit $status); log: $log" >&2
        # The panic or sanitizer report (cargo-fuzz's own backtrace follows it in the log).
        grep -E -m 3 -A 4 'panicked at|==ERROR|ERROR: libFuzzer|SUMMARY: libFuzzer' "$log" >&2 \
            || tail -n 20 "$log" >&2
        if [[ -n "$artifact" ]]; then
            echo "$target crash input: $artifact" >&2
            echo "  reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run $target $artifact" >&2
        fi
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzzing failed: ${failed[*]}" >&2
    exit 1
fi
