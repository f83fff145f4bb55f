# syntax=docker/dockerfile:1
# Build: docker build -t kube-converge:dev .
#   (add --build-arg VERSION=... --build-arg REVISION=$(git rev-parse HEAD) for the labels)
# Reproducible inputs: pinned toolchain image, Cargo.lock (--locked), Debian packages from the
# same release; the build does not embed timestamps.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends pkg-config libnftnl-dev libmnl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so they are cached across source changes.
COPY Cargo.toml Cargo.lock ./
# Every workspace member's manifest (cargo loads them all); only the agent is built, and the
# simulator (sim/) and the real-cluster tier (tests/) never enter the image.
COPY agent/Cargo.toml agent/Cargo.toml
COPY sim/Cargo.toml sim/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
RUN mkdir -p agent/src && echo 'fn main() {}' > agent/src/main.rs && touch agent/src/lib.rs \
    && cargo build --release --locked -p kube-converge \
    && rm -rf agent/src
COPY agent agent
RUN touch agent/src/main.rs agent/src/lib.rs && cargo build --release --locked -p kube-converge

FROM debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
# The readers talk to the kernel directly (nf_tables and IPVS netlink, the legacy iptables
# table's getsockopt): no iptables or nft binary is needed. libnftnl and libmnl are linked.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnftnl11 libmnl0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kube-converge /usr/local/bin/kube-converge
LABEL org.opencontainers.image.title="kube-converge" \
      org.opencontainers.image.description="Per-node kube-proxy dataplane convergence lag, measured from the kernel" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/kube-converge/kube-converge" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
USER 0
ENTRYPOINT ["/usr/local/bin/kube-converge"]
CMD ["agent"]
