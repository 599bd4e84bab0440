# Sourced by the benchmarks: builds the release sidecar, the fake provider and one example, and
# sets RELEASE_DIR to where they are (CARGO_TARGET_DIR honoured). Needs ROOT and log.
release_build() {
    local example=$1
    log "cargo build --release --bin llm-sidecar --bin llm-sidecar-fake-provider --example $example"
    (cd "$ROOT" && cargo build --release --bin llm-sidecar --bin llm-sidecar-fake-provider --example "$example") >&2
    local target_dir="${CARGO_TARGET_DIR:-target}"
    case "$target_dir" in /*) ;; *) target_dir="$ROOT/$target_dir" ;; esac
    RELEASE_DIR="$target_dir/release"
}
