# llm-sidecar image: a static (musl) binary on distroless, running as a non-root user.
# Build: make image   (or: docker build -t llm-sidecar:<version> .)
#
# The default target (the last stage) is the product image: the llm-sidecar binary only, built
# from the product package; the fake provider is a dev-dependency of it and is not compiled in.
# The fake provider's own image, for `make e2e-kind` only, is the `fake-provider` target:
#   make image-fake   (or: docker build --target fake-provider -t llm-sidecar-fake-provider:<version> .)

FROM rust:1.95-bookworm AS build
ARG TARGETARCH=amd64
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN case "$TARGETARCH" in \
      amd64) echo x86_64-unknown-linux-musl ;; \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported arch $TARGETARCH" >&2; exit 1 ;; \
    esac > /rust-target \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
# Dependencies first, so source edits do not rebuild them. The workspace needs every member's
# manifest to resolve (and to match Cargo.lock under --locked); sources are stubs at this point,
# and the fake provider's stay stubs in this stage: the product build never sees them.
COPY Cargo.toml Cargo.lock ./
COPY fake-provider/Cargo.toml ./fake-provider/
RUN mkdir -p src/config fake-provider/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > fake-provider/src/main.rs && touch fake-provider/src/lib.rs \
 && cargo fetch --locked
COPY src ./src
RUN cargo build --release --locked --package llm-sidecar --bin llm-sidecar --target "$(cat /rust-target)" \
 && cp "target/$(cat /rust-target)/release/llm-sidecar" /llm-sidecar

# The fake provider (tests, demos, kind e2e): built in a stage of its own on top of the first.
FROM build AS fake-build
COPY fake-provider/src ./fake-provider/src
RUN cargo build --release --locked --package llm-sidecar-fake-provider --bin llm-sidecar-fake-provider \
      --target "$(cat /rust-target)" \
 && cp "target/$(cat /rust-target)/release/llm-sidecar-fake-provider" /llm-sidecar-fake-provider

FROM gcr.io/distroless/static-debian12:nonroot AS fake-provider
COPY --from=fake-build /llm-sidecar-fake-provider /usr/local/bin/llm-sidecar-fake-provider
USER 65532:65532
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/llm-sidecar-fake-provider"]
CMD ["--listen", "0.0.0.0:9000"]

# The product image (the default target).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /llm-sidecar /usr/local/bin/llm-sidecar
USER 65532:65532
# Data and admin ports; both bind 127.0.0.1 by default, reachable only from inside the pod.
EXPOSE 4000 4001
ENTRYPOINT ["/usr/local/bin/llm-sidecar"]
CMD ["run"]
