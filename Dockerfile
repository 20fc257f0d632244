# Pollen images: `pollen` (coordinator, proxy, CLI, simulations, and the agent for simulated
# fleets; ships data/mnist for the demo) and `pollen-agent` (the edge agent alone).
# Multi-stage: the Rust toolchain stays in the build stage; the runtime stages are Debian slim
# with CA certificates, a system user and Pollen's binaries.
#
#   docker build --target pollen -t pollen .
#   docker build --target pollen-agent -t pollen-agent .
#   docker run --rm pollen simulate --rounds 5 --clients 20
#
# docker-compose.yml (deploy/compose/) runs a whole fleet from these two images.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Crates and build outputs in BuildKit caches: a code change refetches nothing and rebuilds
# only what changed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pollen --bin pollen-agent \
    && install -d /out && install -m 0755 target/release/pollen target/release/pollen-agent /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/pollen --create-home pollen
USER pollen
WORKDIR /var/lib/pollen

FROM runtime AS pollen-agent
COPY --from=build /out/pollen-agent /usr/local/bin/pollen-agent
ENV POLLEN_WORK_DIR=/var/lib/pollen/agent
ENTRYPOINT ["pollen-agent"]

FROM runtime AS pollen
COPY --from=build /out/pollen /out/pollen-agent /usr/local/bin/
# The default spec reads data/mnist relative to the working directory.
COPY --chown=pollen data/mnist /var/lib/pollen/data/mnist
COPY workflows/*.toml /usr/share/pollen/workflows/
EXPOSE 50051 8080
ENTRYPOINT ["pollen"]
CMD ["simulate"]
