# Pylon images: `docker build --target relay -t pylon-relay .`, `--target server`,
# `--target server-chromium-bsu` (a render node image with a studio title installed),
# `--target indexer` and `--target checker`.
# The render node needs the NVIDIA container runtime for GPU access (Vulkan ICD and NVENC
# come from the host driver at run time: --gpus all, NVIDIA_DRIVER_CAPABILITIES=all); without
# a GPU it renders on Mesa lavapipe and encodes with libx264.

FROM debian:bookworm AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config clang libclang-dev \
      libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev \
      libvulkan-dev mesa-vulkan-drivers libssl-dev ca-certificates curl \
      libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN cargo build --release --bins

FROM debian:bookworm-slim AS relay
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libssl3 ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pylon-relay /usr/local/bin/pylon-relay
EXPOSE 8080/tcp 3478/udp 4433/udp
ENTRYPOINT ["pylon-relay", "--http-addr", "0.0.0.0:8080", "--webrtc-addr", "0.0.0.0:3478", "--quic-addr", "0.0.0.0:4433", "--data-dir", "/var/lib/pylon"]

# The control plane: SQLite in /var/lib/pylon-indexer by default, PostgreSQL when
# DATABASE_URL names one; the admin token from PYLON_ADMIN_TOKEN or --admin-token-file.
FROM debian:bookworm-slim AS indexer
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pylon-indexer /usr/local/bin/pylon-indexer
EXPOSE 8090/tcp
ENTRYPOINT ["pylon-indexer", "--addr", "0.0.0.0:8090", "--data-dir", "/var/lib/pylon-indexer"]

# A pool's checker: give it --indexer (or PYLON_INDEXER) and --id, keep /var/lib/pylon-checker
# (its key) on a volume, and approve it on the indexer once it has registered.
FROM debian:bookworm-slim AS checker
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libavcodec59 libavutil57 libswresample4 ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pylon-checker /usr/local/bin/pylon-checker
EXPOSE 9600/tcp
ENTRYPOINT ["pylon-checker", "--metrics-addr", "0.0.0.0:9600", "--data-dir", "/var/lib/pylon-checker"]

FROM debian:bookworm-slim AS server
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 \
      libvulkan1 mesa-vulkan-drivers ca-certificates xvfb \
      libgstreamer1.0-0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-pulseaudio \
      pulseaudio libasound2-plugins && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_DRIVER_CAPABILITIES=compute,video,graphics,utility
COPY --from=build /src/target/release/pylon-server /usr/local/bin/pylon-server
# The Vulkan present layer that studio titles run with (the node finds it here).
COPY --from=build /src/target/release/deps/libpylon_vklayer.so /usr/lib/pylon/libpylon_vklayer.so
EXPOSE 9100/tcp
ENTRYPOINT ["pylon-server", "--metrics-addr", "0.0.0.0:9100"]

# A studio title as a container: the node image plus the game and its launch spec. The
# node runs each session's sandbox (Xvfb, home, process group, unprivileged user) inside
# the container exactly as on a host; the spec is the same JSON the indexer stores.
FROM server AS server-chromium-bsu
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      chromium-bsu && rm -rf /var/lib/apt/lists/*
COPY deploy/titles/chromium-bsu.json /etc/pylon/titles/chromium-bsu.json
ENV PYLON_TITLE_SPECS=/etc/pylon/titles/chromium-bsu.json
