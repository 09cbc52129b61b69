# Corral: `make demo` and `make test` are all a fresh Debian 12 machine needs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
DEBUG_BIN := $(CURDIR)/target/debug
RELEASE_BIN := $(CURDIR)/target/release

.PHONY: help deps build test unit e2e lint demo demo-stop bench sweep package clean

help:
	@echo "make demo       install what is missing, build, start a coordinator and 3 namespace VMs with a PostgreSQL cluster"
	@echo "make demo-stop  remove the demo"
	@echo "make test       install what is missing, fmt --check, clippy -D warnings, every test"
	@echo "make bench      agent footprint, switchover, bootstrap, failover (PostgreSQL, MariaDB, Redis; lan and wan profiles), no false failover (5 min busy, 5 min slow links), allowlist, fleet (1,000 simulated nodes), backup throughput and enrollment-flood benchmarks (release build)"
	@echo "make sweep      remove namespaces left by killed test runs"
	@echo "make package    Debian packages (cargo-deb)"

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	scripts/check-structure.sh

# Unit tests and the namespace end-to-end tests (root: they create
# namespaces). Labs are independent, so tests run in parallel.
test: lint build
	CORRAL_BIN_DIR=$(DEBUG_BIN) $(CARGO) test --workspace

demo: build
	@CORRAL_BIN_DIR=$(DEBUG_BIN) scripts/demo.sh

demo-stop:
	@scripts/demo.sh stop

bench: deps
	$(CARGO) build --release --workspace --bins
	CORRAL_BIN_DIR=$(RELEASE_BIN) $(CARGO) bench -p corral-tests --bench agent_footprint
	CORRAL_BIN_DIR=$(RELEASE_BIN) $(CARGO) bench -p corral-tests --bench switchover
	CORRAL_BIN_DIR=$(RELEASE_BIN) $(CARGO) bench -p corral-tests --bench failover
	CORRAL_BIN_DIR=$(RELEASE_BIN) $(CARGO) bench -p corral-tests --bench allowlist
	CORRAL_BIN_DIR=$(RELEASE_BIN) $(CARGO) bench -p corral-tests --bench fleet
	CORRAL_BIN_DIR=$(RELEASE_BIN) $(CARGO) bench -p corral-tests --bench backup
	CORRAL_BIN_DIR=$(RELEASE_BIN) CORRAL_FLOOD_COUNT=10000 $(CARGO) bench -p corral-tests --bench enroll_flood
	CORRAL_BIN_DIR=$(RELEASE_BIN) CORRAL_BENCH_ENGINE=mariadb CORRAL_BENCH_SYNC=1 $(CARGO) bench -p corral-tests --bench switchover
	CORRAL_BIN_DIR=$(RELEASE_BIN) CORRAL_BENCH_SYNC=1 CORRAL_BENCH_VIA=uri $(CARGO) bench -p corral-tests --bench failover
	CORRAL_BIN_DIR=$(RELEASE_BIN) CORRAL_BENCH_ENGINE=mariadb CORRAL_BENCH_SYNC=1 $(CARGO) bench -p corral-tests --bench failover
	CORRAL_BIN_DIR=$(RELEASE_BIN) CORRAL_BENCH_ENGINE=redis CORRAL_BENCH_WAIT=1 $(CARGO) bench -p corral-tests --bench failover
	CORRAL_BIN_DIR=$(RELEASE_BIN) CORRAL_BENCH_PROFILE=wan CORRAL_BENCH_FAILOVERS=10 $(CARGO) bench -p corral-tests --bench failover
	# No false failover: the two 90 s tests of `make test` at full length.
	CORRAL_BIN_DIR=$(RELEASE_BIN) CORRAL_BUSY_SECONDS=300 $(CARGO) test --release -p corral-tests --test busy -- --nocapture
	CORRAL_BIN_DIR=$(RELEASE_BIN) CORRAL_SLOW_SECONDS=300 $(CARGO) test --release -p corral-tests --test slow_links -- --nocapture

sweep:
	@scripts/sweep-labs.sh

package: deps
	@command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --locked
	$(CARGO) build --release --workspace --bins
	$(CARGO) deb -p corral-agent --no-build
	$(CARGO) deb -p corral-coordinator --no-build

clean:
	$(CARGO) clean
