# Pylon — the two commands: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Builds go outside the checkout so repeated runs (and CI on the same machine) reuse them.
export CARGO_TARGET_DIR ?= /var/tmp/pylon-target
export CARGO_TERM_COLOR ?= never

# Debian 12 packages the build and the demo need (the Dockerfile's build stage installs the same)…
DEB_PACKAGES := build-essential pkg-config clang libclang-dev \
	libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev \
	libvulkan-dev mesa-vulkan-drivers libssl-dev ca-certificates curl \
	xvfb chromium-bsu \
	libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-pulseaudio pulseaudio libasound2-plugins
# …and what the tests and browser benchmarks add (PostgreSQL comes from deploy/ci-postgres.sh).
TEST_PACKAGES := chromium chromium-driver procps libsdl2-tests vulkan-tools evtest iproute2 nftables

CATALOG_HTTP ?= 127.0.0.1:8080
RELAY_HTTP ?= 127.0.0.1:8081
DATA_DIR ?= .pylon

.PHONY: help deps rust build release demo test lint fmt bench frame-path frame-path-title latency audio-latency bench-opus bench-capacity bench-cascade bench-checker bench-indexer bench-relay clean

help:
	@echo "make demo        install what is missing, build, start indexer + relay + render node, print the URL to play"
	@echo "make test        every test (unit, Vulkan/FFmpeg integration, Chromium end to end) plus fmt and clippy"
	@echo "make frame-path  per-stage frame timing report (benchmark)"
	@echo "make frame-path-title  the same on a captured studio title: Vulkan present layer vs XShm (TITLE=program, default SDL2's testvulkan)"
	@echo "make bench       criterion benchmarks of the frame stages"
	@echo "make bench-capacity proof-of-capacity cost: node GPU time against the checker's verification"
	@echo "make bench-checker  one check's cost: checker CPU and bytes, the node's frame path, nodes per checker core per minute"
	@echo "make bench-indexer  matching decisions/s (10,000 nodes, 1,000 relays) and API session creations/s"
	@echo "make bench-cascade  a relay → relay cascade: per-hop delays, the node's upstream with 1 and 3 relays"
	@echo "make bench-relay  relay CPU, memory and added latency per viewer, side by side with Janus (JSON last line)"
	@echo "make latency     click-to-photon in headless Chromium; last line is JSON {p50_ms, p95_ms, samples}"
	@echo "make audio-latency  glass-to-ear of the demo's sound in headless Chromium, its shares, the audio thread's CPU"
	@echo "make bench-opus  the node's Opus encoder at each complexity: CPU per second of sound against complexity 10, SNR"

# Installs only the Debian packages that are missing (idempotent; needs root for apt-get).
deps:
	@missing=$$(for p in $(DEB_PACKAGES) $(EXTRA_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing missing Debian packages: $$missing"; \
		if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	else echo "Debian packages: all present"; fi
	@$(MAKE) --no-print-directory rust

rust:
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust 1.88 or newer with rustup (https://rustup.rs)"; exit 1; }
	@v=$$(rustc --version | awk '{print $$2}'); \
	if [ "$$(printf '%s\n1.88.0\n' "$$v" | sort -V | head -1)" != 1.88.0 ]; then echo "Rust $$v is too old: Pylon needs 1.88 or newer (rustup update)"; exit 1; fi

build:
	@$(MAKE) --no-print-directory deps EXTRA_PACKAGES="$(TEST_PACKAGES)"
	cargo build --workspace --all-targets

release: deps
	cargo build --release -p pylon-server -p pylon-relay -p pylon-indexer --bins

demo: release
	@mkdir -p $(DATA_DIR)/logs
	@bash deploy/demo.sh "$(CARGO_TARGET_DIR)/release" "$(DATA_DIR)" "$(CATALOG_HTTP)" "$(RELAY_HTTP)"

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The indexer's tests run on SQLite and, through deploy/ci-postgres.sh, on PostgreSQL too;
# its API contract test uses schemathesis from deploy/python-tools.sh.
test: build
	@url=$$(bash deploy/ci-postgres.sh) || { echo "could not start PostgreSQL for the indexer tests"; exit 1; }; \
	echo "PostgreSQL for the indexer tests: $$url"; \
	tools=$$(bash deploy/python-tools.sh) || { echo "could not install the Python test tools"; exit 1; }; \
	PYLON_TEST_POSTGRES="$$url" PYLON_PYTHON_TOOLS="$$tools" cargo test --workspace --all-targets
	@$(MAKE) --no-print-directory lint

bench: deps
	cargo bench -p pylon-benches

frame-path: deps
	cargo run --release -p pylon-benches --bin frame-path -- --frames 600

# The frame path on a captured studio title — through its Vulkan present layer, and with
# the layer off (XShm) — beside the demo's direct path, at 1280x720. An OpenGL game has no
# layer path: TITLE=/usr/games/chromium-bsu TITLE_ARGS="--title-arg=-w --title-arg=-na".
TITLE ?= /usr/libexec/installed-tests/SDL2/testvulkan
TITLE_ARGS ?= --title-arg=--geometry --title-arg=1280x720
frame-path-title: deps
	cargo run --release -p pylon-benches --bin frame-path -- --frames 300 --title $(TITLE) $(TITLE_ARGS)

latency:
	@$(MAKE) --no-print-directory deps EXTRA_PACKAGES="$(TEST_PACKAGES)"
	cargo build --release -p pylon-benches --bin latency
	"$(CARGO_TARGET_DIR)/release/latency" --trials 90

audio-latency:
	@$(MAKE) --no-print-directory deps EXTRA_PACKAGES="$(TEST_PACKAGES)"
	cargo build --release -p pylon-benches --bin audio-latency
	"$(CARGO_TARGET_DIR)/release/audio-latency"

# The node's Opus encoder at each complexity: CPU per second of sound (ratio to libopus's
# default 10, same run) and fidelity (SNR after opusdec).
bench-opus: deps
	cargo build --release -p pylon-benches --bin opus-cost
	"$(CARGO_TARGET_DIR)/release/opus-cost"

# The relay under N synthetic WebRTC viewers, side by side with Debian's Janus; the last
# line is one JSON object. VIEWERS=50 BENCH_SECONDS=30 to change the load; SOAK=600 adds a soak.
VIEWERS ?= 20
BENCH_SECONDS ?= 20
SOAK ?= 0
bench-relay:
	@$(MAKE) --no-print-directory deps EXTRA_PACKAGES="janus"
	cargo build --release -p pylon-relay -p pylon-benches --bin pylon-relay --bin relay-bench
	"$(CARGO_TARGET_DIR)/release/relay-bench" --viewers $(VIEWERS) --seconds $(BENCH_SECONDS) --soak-seconds $(SOAK)

# A relay → relay cascade: one player, SPECTATORS behind each of two relays pulling from
# the player's; per-hop delays and the node's upstream with 1 and 3 relays (JSON last line).
SPECTATORS ?= 4
bench-cascade: deps
	cargo build --release -p pylon-relay -p pylon-server -p pylon-indexer -p pylon-benches --bin pylon-relay --bin pylon-server --bin pylon-indexer --bin cascade-bench
	"$(CARGO_TARGET_DIR)/release/cascade-bench" --spectators $(SPECTATORS) --seconds $(BENCH_SECONDS)

# The proof of capacity: node GPU time against the checker's derive + verify, per size.
bench-capacity: deps
	cargo build --release -p pylon-benches --bin capacity-bench
	"$(CARGO_TARGET_DIR)/release/capacity-bench"

# What one check costs, on the checker (a child process) and on the node.
bench-checker: deps
	cargo build --release -p pylon-checker -p pylon-benches --bin pylon-checker --bin checker-cost
	"$(CARGO_TARGET_DIR)/release/checker-cost"

bench-indexer: deps
	cargo build --release -p pylon-benches --bin indexer-bench
	"$(CARGO_TARGET_DIR)/release/indexer-bench" --postgres "$$(bash deploy/ci-postgres.sh)"

clean:
	cargo clean
	rm -rf $(DATA_DIR)
