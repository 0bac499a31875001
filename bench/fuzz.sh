#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer, fuzz/) of every parser of untrusted input:
# runs each target in turn for SECONDS_PER_TARGET, starting from the committed seeds
# (fuzz/seeds/<target>/) copied into a scratch corpus, so the repository is not modified.
# Not run by CI: run it by hand. Prints a line per target and, last, exactly one line:
#   fuzz: T targets, N execs, C crashes
# A crash (panic, failed assertion, sanitizer report, timeout, over-allocation) stops its
# target; the artifact path and the log are printed, and the script exits 1.
#
# Usage: bench/fuzz.sh [SECONDS_PER_TARGET]   (default 300)
# Environment: BENCH_DIR (default /var/tmp/edge-ota-bench; the work is under $BENCH_DIR/fuzz),
#   FUZZ_TARGETS (default: all seven), FUZZ_SANITIZER (address, the default, or none),
#   FUZZ_ARGS (extra libFuzzer arguments, e.g. "-seed=1").
set -euo pipefail
secs=${1:-300}
[[ $secs =~ ^[0-9]+$ && $secs -gt 0 ]] || { echo "usage: bench/fuzz.sh [SECONDS_PER_TARGET]" >&2; exit 2; }
top=$(cd "$(dirname "$0")/.." && pwd)
work=${BENCH_DIR:-/var/tmp/edge-ota-bench}/fuzz
sanitizer=${FUZZ_SANITIZER:-address}
read -r -a targets <<< "${FUZZ_TARGETS:-bundle_head manifest chunk_decode delta_frame grubenv uboot_env config}"
read -r -a extra <<< "${FUZZ_ARGS:-}"

# cargo-fuzz passes nightly-only flags (-Zsanitizer, ...): allowed on a stable toolchain.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked >&2
fi
(cd "$top/fuzz" && cargo fuzz build --sanitizer "$sanitizer" >&2)
bin_dir=$top/fuzz/target/$(rustc -vV | sed -n "s/^host: //p")/release

# Per target: longest input, dictionary, extra libFuzzer limits. A single allocation of the
# malloc limit or more is a crash (needs a sanitizer's malloc hooks: not with
# FUZZ_SANITIZER=none). The limits are the format's own: a chunk is at most 4 MiB and a delta
# literal frame 8 MiB (those harnesses also bound the Rust heap exactly; this catches zstd's
# C allocations); a bundle head may hold a 32 MiB manifest, 64 MiB once decompressed.
declare -A max_len=([bundle_head]=32768 [manifest]=16384 [chunk_decode]=32768
  [delta_frame]=65536 [grubenv]=1024 [uboot_env]=8192 [config]=8192)
declare -A dict=([bundle_head]=manifest [manifest]=manifest [chunk_decode]= [delta_frame]=
  [grubenv]=grubenv [uboot_env]=uboot_env [config]=config)
declare -A limits=([bundle_head]="-malloc_limit_mb=65" [chunk_decode]="-malloc_limit_mb=5"
  [delta_frame]="-malloc_limit_mb=9")

run_id=$(date +%Y%m%d-%H%M%S)
mkdir -p "$work/logs/$run_id"
total_execs=0
total_crashes=0
for t in "${targets[@]}"; do
  [ -n "${max_len[$t]+x}" ] || { echo "bench/fuzz.sh: unknown target $t" >&2; exit 2; }
  corpus=$work/corpus/$t
  artifacts=$work/artifacts/$run_id/$t
  log=$work/logs/$run_id/$t.log
  mkdir -p "$corpus" "$artifacts"
  # The scratch corpus keeps what earlier runs found; the seeds are copied in every time.
  cp "$top/fuzz/seeds/$t/"* "$corpus/"
  args=(-max_total_time="$secs" -max_len="${max_len[$t]}" -timeout=10 -rss_limit_mb=2048
    -print_final_stats=1 -artifact_prefix="$artifacts/")
  [ -z "${dict[$t]}" ] || args+=(-dict="$top/fuzz/dicts/${dict[$t]}.dict")
  [ -z "${limits[$t]:-}" ] || args+=(${limits[$t]})
  rc=0
  ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0 \
    "$bin_dir/$t" "${args[@]}" "${extra[@]}" "$corpus" >"$log" 2>&1 || rc=$?

  execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
  if [ -z "$execs" ]; then # no final stats (killed?): the last status line's count
    execs=$(sed -n 's/^#\([0-9]*\)[[:space:]].*/\1/p' "$log" | tail -n 1)
  fi
  execs=${execs:-0}
  crash_files=()
  for f in "$artifacts"/crash-* "$artifacts"/leak-* "$artifacts"/timeout-* "$artifacts"/oom-*; do
    [ -e "$f" ] && crash_files+=("$f")
  done
  crashes=${#crash_files[@]}
  if [ "$rc" != 0 ] && [ "$crashes" = 0 ]; then
    crashes=1 # libFuzzer failed without writing an artifact: count it, show the log
    echo "$t: libFuzzer exited $rc without an artifact; log: $log" >&2
    tail -n 20 "$log" >&2
  fi
  cov=$(sed -n 's/^#[0-9]*.*cov: \([0-9]*\).*/\1/p' "$log" | tail -n 1)
  size=$(find "$corpus" -type f | wc -l)
  echo "$t: $execs execs, $crashes crashes, cov ${cov:-?}, corpus $size files (log: $log)"
  for f in "${crash_files[@]}"; do
    echo "  crash artifact: $f"
    grep -m 3 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|==ERROR" "$log" | sed 's/^/    /' || true
  done
  total_execs=$((total_execs + execs))
  total_crashes=$((total_crashes + crashes))
done
echo "fuzz: ${#targets[@]} targets, $total_execs execs, $total_crashes crashes"
[ "$total_crashes" = 0 ]
