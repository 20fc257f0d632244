# Pollen images: `pollen` (coordinator, proxy, CLI, simulations, and the agent for simulated
# fleets; ships data/mnist for the demo) and `pollen-agent` (the edge agent alone). Multi-stage: the Rust toolchain stays in the build
# stage; the runtime stages are Debian slim with CA certificates and one binary each.
#
#   docker build --target pollen -t pollen .
#   docker build --target pollen-agent -t pollen-agent .
#   docker run --rm pollen simulate --rounds 5 --clients 20
#
# docker-compose.yml (deploy/compose/) runs a whole fleet from these two images.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Manifests first, so that a code change does not refetch the crates.
COPY Cargo.toml Cargo.lock ./
COPY proto/Cargo.toml proto/
COPY coordinator/Cargo.toml coordinator/
COPY client/Cargo.toml client/
COPY train/Cargo.toml train/
COPY agent/Cargo.toml agent/
COPY proxy/Cargo.toml proxy/
COPY workflows/Cargo.toml workflows/
COPY bench/Cargo.toml bench/
COPY tests/Cargo.toml tests/
RUN cargo fetch --locked
COPY . .
RUN --mount=type=cache,target=/src/target \
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
