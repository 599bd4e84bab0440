#!/usr/bin/env bash
# make fake-free (part of `make lint`): the product, package llm-sidecar (its library and the
# llm-sidecar binary, what the image is built from), does not depend on the fake provider.
# `cargo tree --edges normal,build` lists every crate compiled into them; the fake provider,
# package llm-sidecar-fake-provider, may only be a dev-dependency (integration tests, examples).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
FAKE=llm-sidecar-fake-provider

die() {
  echo "fake-free: $*" >&2
  exit 1
}

product=$("$CARGO" tree --locked --package llm-sidecar --edges normal,build --prefix none --format '{p}')
if grep -q "^$FAKE " <<<"$product"; then
  "$CARGO" tree --locked --package llm-sidecar --edges normal,build --invert "$FAKE" >&2 || true
  die "the product depends on the fake provider (the path above); it may only be a dev-dependency"
fi
# The check must be looking for the right name: the fake provider is a dev-dependency.
"$CARGO" tree --locked --package llm-sidecar --edges dev --depth 1 --prefix none --format '{p}' |
  grep -q "^$FAKE " || die "$FAKE is not a dev-dependency of llm-sidecar: renamed? update this check"
echo "fake-free: llm-sidecar does not depend on $FAKE ($(awk '{print $1, $2}' <<<"$product" | sort -u | wc -l) crates in its normal and build dependencies)"
