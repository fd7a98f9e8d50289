# Two commands on a fresh machine: `make demo` and `make test`.
# Each target installs what it needs: Debian packages (as root), a .venv, pip packages.

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
APT_PKGS := python3-venv fuse3 libfuse3-3 libfuse2 btrfs-progs fio bindfs memcached zstd openssl
EXTRAS   := test,lab,plot,memcached,fusepy
PYTEST_ARGS ?=

.PHONY: all deps apt venv test test-fast demo bench clean help

help:
	@echo "make demo   - mount a cached filesystem on an embedded tmem host, run a workload, show hit rates and v0/v1 keying"
	@echo "make test   - run the whole test suite (installs what it needs)"
	@echo "make bench  - run the benchmarks (ratios against baselines measured in the same run)"
	@echo "make clean  - remove the virtualenv and build leftovers"

deps: apt venv

# Debian packages: install only those missing, so a warm machine pays nothing.
apt:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root to install them)"; exit 1; fi; \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: deps
	$(PY) -m pytest -q -m "not slow and not mount" $(PYTEST_ARGS)

demo: deps
	$(PY) -m guestfs demo

bench: deps
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_lab.py
	$(PY) benchmarks/bench_fuse.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
