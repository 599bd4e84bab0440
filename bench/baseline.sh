#!/usr/bin/env bash
# Build another commit's release sidecar for `make bench` to compare with:
#   bash bench/baseline.sh REF        -> prints the binary's path
#   BASELINE_BIN=$(bash bench/baseline.sh REF) bash bench/run.sh
# The commit is checked out in a git worktree under BASELINE_DIR (default: llm-sidecar-baseline in
# the temp dir; outside this tree, where cargo would take it for a member of this workspace) and
# built there with its own target dir (the first build compiles every dependency: several minutes). The pre-redesign build
# the CPU target compares with is 2ad80db (the last commit before the request-path redesign).
set -euo pipefail
REF="${1:?usage: bench/baseline.sh REF}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMIT="$(git -C "$ROOT" rev-parse --short "$REF^{commit}")"
DIR="${BASELINE_DIR:-${TMPDIR:-/tmp}/llm-sidecar-baseline}"
TREE="$DIR/$COMMIT"
mkdir -p "$DIR"
if [ ! -d "$TREE" ]; then
    git -C "$ROOT" worktree add --detach "$TREE" "$COMMIT" >&2
fi
(cd "$TREE" && CARGO_TARGET_DIR="$DIR/target" cargo build --release --locked --bin llm-sidecar >&2)
echo "$DIR/target/release/llm-sidecar"
