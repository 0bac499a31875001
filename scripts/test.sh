#!/usr/bin/env bash
# The whole test suite: installs what it lacks (as root), then runs every test, including
# the loop-device tests (root) and the QEMU end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
  bash scripts/install-deps.sh
else
  echo "test.sh: not root: cannot install packages, and the root-only tests will fail" >&2
fi
# A test that needs root, a tool or QEMU fails here instead of skipping (src/testing.rs).
export EDGE_OTA_REQUIRE_ALL=1
# The device binary carries no build-side code (chunker, writer) and no legacy zstd decoders.
device_deps=$(cargo tree -p edge-ota -e normal,features --prefix none --no-dedupe)
if grep -Eq '^fastcdc |zstd-safe feature "legacy"|edge-ota-format feature "build"' <<<"$device_deps"; then
  echo "test.sh: the device build pulls in build-side code or zstd's legacy decoders:" >&2
  grep -E '^fastcdc |zstd-safe feature "legacy"|edge-ota-format feature "build"' <<<"$device_deps" >&2
  exit 1
fi
cargo test --workspace --exclude qemu-tests
# Crash tests: the updater killed at each step that commits state.
cargo test --features failpoints --test crash_points
# End to end in QEMU (TCG): builds the kernel, images and bundles first (cached in build/qemu).
# The power-loss test (tests/power_loss.rs) records a whole update and checks every crash
# state of it: its summary line is printed below.
mkdir -p build/qemu && rm -f build/qemu/timings.txt build/qemu/power-loss.txt
cargo test -p qemu-tests -- --test-threads=2
if [ -f build/qemu/timings.txt ]; then
  echo "QEMU scenario times:"
  sed 's/^/  /' build/qemu/timings.txt
fi
if [ -f build/qemu/power-loss.txt ]; then
  echo "Power loss at every flush (docs/power-loss.md):"
  sed 's/^/  /' build/qemu/power-loss.txt
else
  echo "test.sh: the power-loss test wrote no summary (build/qemu/power-loss.txt)" >&2
  exit 1
fi
