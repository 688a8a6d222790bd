# Every target that runs code first makes sure .venv/ holds the package and its test tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps test test-lines lint check mutate demo crds bench bench-daemon clean

# Debian packages the demo and the integration tests run: installed when missing, if we may.
SYSTEM_TOOLS := containerd ctr runc unshare promtool systemd-analyze cc
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	[ -x /bin/busybox ] || missing="$$missing busybox"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages for:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	      containerd runc busybox-static util-linux prometheus systemd gcc libc6-dev >/dev/null; \
	  else echo "missing:$$missing (as root: apt-get install containerd runc busybox-static util-linux prometheus systemd gcc libc6-dev)"; fi; \
	fi

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: system-deps setup lint
	$(BIN)/pytest
	$(MAKE) --no-print-directory test-lines

# The tests on the real daemon again, on the other containerd lines Debian serves:
# trixie's 1.7 and sid's 2.1 (our users' Windows workers run 2.x). Their packages are
# fetched with a private apt configuration and unpacked under .cache/, never installed.
CONTAINERD_LINES ?= trixie sid
LINES_DIR := $(CURDIR)/.cache/containerd
test-lines: system-deps setup
	@for suite in $(CONTAINERD_LINES); do \
	  .ci/fetch-containerd $$suite $(LINES_DIR)/$$suite || exit 1; \
	  echo "== the containerd tests on $$suite's containerd"; \
	  OBR_CONTAINERD_BIN=$(LINES_DIR)/$$suite/root/usr/bin PATH="$(LINES_DIR)/$$suite/root/usr/bin:$$PATH" \
	    $(BIN)/pytest -m containerd || exit 1; \
	done

# The fast loop while changing code: lint and the tests that need neither containerd nor seconds
# each (make test runs those too).
check: lint
	$(BIN)/pytest -q -m "not containerd and not slow"

lint: setup
	$(BIN)/ruff check controller tests examples bench tools
	$(BIN)/mypy controller tests tools
	$(BIN)/lint-imports
	$(BIN)/python tools/ps_parse.py examples/windows/*.ps1
	$(BIN)/python tools/function_length.py controller --max-lines 60

# The mutation run over the safety rules (docs/development.md): breaks each rule on purpose and
# checks a test fails. Slow (a minute or so, two mutants at a time), so not part of `make test`.
mutate: setup
	$(BIN)/python tools/mutate.py

demo: system-deps setup
	$(BIN)/python examples/demo.py

# Each benchmark prints its rows against a baseline run in the same process (a target missed is
# printed, not fatal): removal against the floor on two clocks at 800 and 2,000 orphans, the
# planner at scale, store reads and start-up, and the daemon's CPU beside a busy worker on a
# 5,000-result store against the same on an empty one (BENCH_BUSY_SECONDS each; 5 minutes).
BENCH_BUSY_SECONDS ?= 300
# At 50,000 results: a resync that verifies stamps, the planner at 500,000 snapshots, where a pass's
# time goes, and the daemon beside a busy worker at interval 5s with all, half or none of the
# results' snapshots missing (BENCH_BIG_BUSY_SECONDS each).
BENCH_BIG_BUSY_SECONDS ?= 60
bench: system-deps setup
	-$(BIN)/python bench/removal_bench.py --orphans 800 2000
	-$(BIN)/python bench/planner_scale.py
	-$(BIN)/python bench/planner_scale.py --snapshots 500000 --results 50000 --target-seconds 3 --target-mb 1500
	-$(BIN)/python bench/store_scale.py
	-$(BIN)/python bench/store_scale.py --results 50000 --no-startup
	-$(BIN)/python bench/pass_scale.py --results 50000 --drift none,half,all
	-$(BIN)/python bench/daemon_bench.py --idle 10 --changes 5 --busy $(BENCH_BUSY_SECONDS)
	-$(BIN)/python bench/daemon_bench.py --busy-only --busy $(BENCH_BUSY_SECONDS) --big 5000 --drift all,half,none --interval 5s
	-$(BIN)/python bench/daemon_bench.py --busy-only --busy $(BENCH_BIG_BUSY_SECONDS) --big 50000 --drift all,half,none --interval 5s

bench-daemon: setup
	$(BIN)/python bench/daemon_bench.py

# The CRD and the README's policy reference are generated from controller/model/policy.py.
crds: setup
	$(BIN)/python -m controller.config.crd

clean:
	rm -rf $(VENV) demo-run .cache .pytest_cache .mypy_cache .ruff_cache
