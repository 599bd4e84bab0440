# Sourced by the benchmarks: builds the release sidecar, the fake provider and (optionally) one
# example, and sets RELEASE_DIR to where they are (CARGO_TARGET_DIR honoured). Needs ROOT and log.
release_build() {
    local example=${1:-} extra=()
    [ -n "$example" ] && extra=(--example "$example")
    log "cargo build --release --bin llm-sidecar --bin llm-sidecar-fake-provider ${extra[*]}"
    (cd "$ROOT" && cargo build --release --bin llm-sidecar --bin llm-sidecar-fake-provider "${extra[@]}") >&2
    local target_dir="${CARGO_TARGET_DIR:-target}"
    case "$target_dir" in /*) ;; *) target_dir="$ROOT/$target_dir" ;; esac
    RELEASE_DIR="$target_dir/release"
}

# Sets BIN and FAKE_BIN: LLM_SIDECAR_BIN (and LLM_SIDECAR_FAKE_BIN, by default the fake provider
# next to it) when set, else a release build of both. Needs ROOT, log and die.
release_bins() {
    if [ -n "${LLM_SIDECAR_BIN:-}" ]; then
        BIN="$LLM_SIDECAR_BIN"
        FAKE_BIN="${LLM_SIDECAR_FAKE_BIN:-$(dirname "$BIN")/llm-sidecar-fake-provider}"
    else
        release_build
        BIN="$RELEASE_DIR/llm-sidecar"
        FAKE_BIN="${LLM_SIDECAR_FAKE_BIN:-$RELEASE_DIR/llm-sidecar-fake-provider}"
    fi
    [ -x "$BIN" ] || die "no executable at $BIN"
    [ -x "$FAKE_BIN" ] || die "no executable at $FAKE_BIN"
}
