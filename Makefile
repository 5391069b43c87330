# hdslb: `make setup` installs everything (idempotent); `make test` and `make demo` run it first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KREL := $(shell uname -r)
APT_PKGS := python3-bpfcc python3-venv linux-headers-amd64 libbpf1 iproute2 nftables curl nginx-light iperf3 ethtool procps util-linux
STAMP := $(VENV)/.setup-stamp

BENCH_PKGS := wrk haproxy bpftool netsniff-ng gcc linux-perf
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: setup test test-unit test-bpf test-e2e demo bench bench-quick soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PKGS); fi
	@# bcc compiles against /lib/modules/$(KREL)/build; this kernel ships no headers of its own, so link Debian's.
	@if [ ! -e /lib/modules/$(KREL)/build ]; then \
	  hdr=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1); \
	  mkdir -p /lib/modules/$(KREL); \
	  ln -sfn $$hdr /lib/modules/$(KREL)/build; \
	  ln -sfn $${hdr%-amd64}-common /lib/modules/$(KREL)/source; fi
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	@# Debian's bcc is pure Python over libbcc: link it in (never `pip install bcc`, an unrelated package).
	@sp=$$($(PY) -c 'import site; print(site.getsitepackages()[0])'); ln -sfn /usr/lib/python3/dist-packages/bcc $$sp/bcc
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# The tiers wait on real time far more than they compute (daemons starting, timeouts running out, traffic): two
# pytest-xdist workers, each taking a whole file at a time (a module's lab is shared by its tests), the longest
# tier first so the short files even out the end. TEST_JOBS=1 runs them one after another, in one process.
TEST_JOBS ?= 2
test: setup
	$(PY) -m pytest -q $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile) tests/e2e tests/bpf tests/unit

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-bpf: setup
	$(PY) -m pytest -q tests/bpf

test-e2e: setup
	$(PY) -m pytest -q tests/e2e

demo: setup
	$(PY) -m hdslb.lab.demo

# Peers and tools only the benchmarks use; never needed by `make test`.
$(BENCH_STAMP): $(STAMP)
	@if ! dpkg -s $(BENCH_PKGS) >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BENCH_PKGS); fi
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench.run

bench-quick: $(BENCH_STAMP)
	$(PY) -m bench.run --quick

# ~10 min of traffic and churn against hdslbd in a netns lab, then invariants (bench/soak.py); not part of `make test`.
soak: $(BENCH_STAMP)
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) build *.egg-info
