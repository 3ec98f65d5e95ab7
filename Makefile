# SPDX-License-Identifier: Apache-2.0
# The two commands a newcomer needs:
#   make demo   set up, then serve a sample image end to end (in the test guest
#               when this kernel has no on-demand cachefiles)
#   make test   set up, then run every test: unit, fake kernel, registry, native
#               EROFS mounts, and the real-kernel suite in the QEMU guest
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup kernel test test-fast demo bench clean

# The Debian packages come first: they include python3-venv, which `python3 -m venv` needs.
# The base interpreter gets nothing: everything Python goes into $(VENV).
setup:
	scripts/install-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@echo "setup: Debian packages and $(VENV) with ondemand-d (editable, C shim built) are ready"

# Both guest kernels: tests/vm boots 6.12 (fscache) and 7.2 (fanotify on file-backed EROFS).
# A fresh machine spends about 8 + 20 minutes here, once; later runs reuse the cache.
kernel: setup
	$(PY) -m ondemand_d.guest.kernel --kind 6.12 --kind 7.2

# pytest exits 5 when it collected nothing: that is a failure of the run, not a pass.
test: kernel
	$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest tests -m "not vm" $(PYTEST_ARGS)

demo: setup  # the guest's kernel is built on first use, only where it is needed
	$(VENV)/bin/ondemand-d demo

bench: setup
	$(PY) bench/bench_daemon.py
	$(PY) bench/bench_build.py
	$(PY) bench/bench_registry.py
	$(PY) bench/bench_guest.py

clean:
	rm -rf $(VENV) build *.egg-info ondemand_d/_shim*.so
