#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time each.
#
#   bash scripts/fuzz.sh [SECONDS]        # default 30 s per target (or $FUZZ_SECONDS)
#   FUZZ_TARGETS="parse_ids seed_load" bash scripts/fuzz.sh 60
#
# Works on the stable toolchain: targets are built with `--sanitizer none` (cargo-fuzz only
# needs nightly features for -Zsanitizer; the code under test is safe Rust, so AddressSanitizer
# adds little). FUZZ_SANITIZER=address opts into ASan, which needs RUSTC_BOOTSTRAP=1 on stable
# (set here when asked for) and a build about twice as slow.
#
# Installs cargo-fuzz (`cargo install cargo-fuzz --locked`) when it is missing. Builds into
# fuzz/target (never the main crate's target/). New corpus entries go to fuzz/corpus/<target>
# (ignored by git); the committed seeds are fuzz/seeds/<target>. A crash leaves its input in
# fuzz/artifacts/<target>/ and makes the script exit 1 after all targets have run; copy the
# input to tests/fixtures/fuzz-regressions/<target>/ so `cargo test --test fuzz_props` replays
# it. Wall time: about (cold build) + 5 x SECONDS; see the report in the fuzz/ README.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECONDS_PER_TARGET="${1:-${FUZZ_SECONDS:-30}}"
SANITIZER="${FUZZ_SANITIZER:-none}"
ALL_TARGETS="decode_command parse_ids merge_patch canonical_json seed_load"
TARGETS="${FUZZ_TARGETS:-$ALL_TARGETS}"

if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || [ "$SECONDS_PER_TARGET" -lt 1 ]; then
    echo "fuzz.sh: SECONDS must be a positive integer, got '$SECONDS_PER_TARGET'" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

if [ "$SANITIZER" != "none" ]; then
    export RUSTC_BOOTSTRAP=1
fi

start=$(date +%s)
echo "fuzz.sh: building targets (sanitizer: $SANITIZER)"
(cd fuzz && cargo fuzz build --sanitizer "$SANITIZER")
built=$(date +%s)
echo "fuzz.sh: build took $((built - start)) s"

passed=0
failed=0
failed_targets=""
for t in $TARGETS; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t/last-run.log"
    echo "fuzz.sh: $t for ${SECONDS_PER_TARGET} s"
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: runaway memory is a bug.
    # -dict: JSON tokens and the schema's field names (the ids target gets them too: harmless).
    if (cd fuzz && cargo fuzz run --sanitizer "$SANITIZER" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -dict=dicts/json.dict -print_final_stats=1) >"$log" 2>&1; then
        passed=$((passed + 1))
        status=ok
    else
        failed=$((failed + 1))
        failed_targets="$failed_targets $t"
        status=FAILED
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 || true)
    echo "fuzz.sh: $t $status: ${runs:-?} runs, ${rate:-?} exec/s, ${cov:-cov: ?}"
    if [ "$status" = FAILED ]; then
        grep -E "panicked at|Test unit written to|ERROR: libFuzzer" "$log" | head -5 || true
        # CI throws its clone away: print each crashing input so the log alone reproduces it.
        for f in "fuzz/artifacts/$t"/crash-* "fuzz/artifacts/$t"/timeout-* "fuzz/artifacts/$t"/oom-*; do
            [ -f "$f" ] || continue
            if [ "$(wc -c <"$f")" -le 65536 ]; then
                echo "fuzz.sh: $f (base64): $(base64 -w0 "$f")"
            fi
        done
        echo "fuzz.sh: full log in $log"
    fi
done

end=$(date +%s)
echo "fuzz.sh: total wall time $((end - start)) s (build $((built - start)) s)"
echo "fuzz.sh: $passed targets clean, $failed crashed"
if [ "$failed" -gt 0 ]; then
    echo "fuzz.sh: crashing targets:$failed_targets (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
