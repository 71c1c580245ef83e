# syntax=docker/dockerfile:1
# The one image of profiles-sync: every role (engine, controller, sync Jobs) is the same binary.
#
#   docker build -t ghcr.io/profiles-sync/profiles-sync:0.1.0 .
#
# Stage 1 builds the release binary; stage 2 is distroless with only that binary. The binary
# links glibc dynamically (SQLite is compiled in, TLS is rustls: no OpenSSL), so the runtime is
# distroless/cc (glibc + libgcc, no shell, no package manager) rather than distroless/static.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Cargo.toml declares the benches, so cargo wants their files even to build the binary.
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
# `demo` compiles in this example (include_str!).
COPY deploy/examples/sqlite.yaml deploy/examples/sqlite.yaml
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin profiles-sync \
    && install -D target/release/profiles-sync /out/profiles-sync

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="profiles-sync" \
      org.opencontainers.image.description="Identity-resolved customer profiles and their events, landed in your own warehouse" \
      org.opencontainers.image.source="https://github.com/profiles-sync/profiles-sync" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/profiles-sync /usr/local/bin/profiles-sync
# distroless's nonroot user; the chart and deploy/ run it with runAsNonRoot and a read-only
# root filesystem, so the store lives on the mounted volume (/var/lib/profiles-sync) only.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/profiles-sync"]
