# Builds the agent (with its eBPF datapath embedded) and ships it in a slim
# image. The build stage installs exactly what scripts/setup.sh installs.
FROM rust:1.95-bookworm AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev \
    && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install nightly --profile minimal --component rust-src \
    && PATH=/usr/lib/llvm-22/bin:$PATH LLVM_SYS_220_PREFIX=/usr/lib/llvm-22 \
       cargo install --locked bpf-linker@0.13.0 --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release -p loxilb-agent

FROM debian:bookworm-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iproute2 bpftool ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/loxilb-agent /usr/local/bin/loxilb-agent
ENTRYPOINT ["/usr/local/bin/loxilb-agent"]
