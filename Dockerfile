# llm-sidecar image: a static (musl) binary on distroless, running as a non-root user.
# Build: make image   (or: docker build -t llm-sidecar:<version> .)

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
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/config \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && cargo fetch --locked
COPY src ./src
RUN cargo build --release --locked --bin llm-sidecar --target "$(cat /rust-target)" \
 && cp "target/$(cat /rust-target)/release/llm-sidecar" /llm-sidecar

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /llm-sidecar /usr/local/bin/llm-sidecar
USER 65532:65532
# Data and admin ports; both bind 127.0.0.1 by default, reachable only from inside the pod.
EXPOSE 4000 4001
ENTRYPOINT ["/usr/local/bin/llm-sidecar"]
CMD ["run"]
