# The two commands a new user needs (see README): `make demo` and `make test`.
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build release test demo bench fmt clippy gpu-check fuzz

setup:
	@scripts/setup.sh

build: setup
	@$(ENV) cargo build --workspace

release: setup
	@$(ENV) cargo build --workspace --release

test: build
	@$(ENV) scripts/fetch-model.sh >/dev/null
	@$(ENV) cargo test --workspace --no-fail-fast

demo: release
	@$(ENV) scripts/demo.sh

fmt:
	cargo fmt --all

clippy: setup
	@$(ENV) cargo clippy --workspace --all-targets

gpu-check:
	@scripts/gpu-check.sh $(if $(BUNDLE),--bundle $(BUNDLE)) $(if $(DRY),--cpu-dry-run)

# Fuzz targets at scale (docs/security.md): 100k cases each unless CASES is given.
fuzz: setup
	@$(ENV) PROPTEST_CASES=$(or $(CASES),100000) cargo test -p rsdeep --release --test fuzz_parsers --test fuzz_rendezvous
