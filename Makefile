# moat: `make demo` and `make test` install everything a fresh Debian bookworm root machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := bubblewrap runsc qemu-system-x86 busybox-static lz4 e2fsprogs python3-venv python3-pip python3-pandas python3-matplotlib curl gcc libc6-dev
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean proto

install: $(STAMP)

$(STAMP): pyproject.toml constraints-dev.txt
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -c constraints-dev.txt
	@ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq  # the kernel is fetched with apt-get download
	$(PY) -m moat.runtime.microvm.setup
	$(PY) -m moat.runtime.gvisor.setup
	touch $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q
	# The guard's fallback matcher (where no hyperscan wheel loads) gives the same results.
	MOAT_GUARD_MATCHER=ahocorasick $(PY) -m pytest -q tests/test_guard_api.py \
		tests/test_guard_stream.py tests/test_guard_corpus.py tests/test_guard_literals.py \
		tests/test_guard_coverage.py tests/test_guard_binary.py tests/test_guard_linear.py

lint: install
	$(VENV)/bin/ruff format --check src tests bench examples
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy src/moat
	$(VENV)/bin/mypy --explicit-package-bases tests

bench: install
	$(PY) bench/bench_container.py

# The Connect stubs of E2B's envd services (src/moat/envd) from moat's proto/: protoc
# (grpcio-tools' wheel) and the generators pinned to the runtime versions in pyproject.toml.
GEN_VENV ?= /var/tmp/moat-protogen
proto:
	test -x $(GEN_VENV)/bin/python || /usr/bin/python3 -m venv $(GEN_VENV)
	$(GEN_VENV)/bin/pip install -q grpcio-tools protoc-gen-py==0.6.0 protoc-gen-connectrpc==0.12.1
	rm -rf $(GEN_VENV)/out && mkdir -p $(GEN_VENV)/out
	PATH=$(GEN_VENV)/bin:$$PATH $(GEN_VENV)/bin/python -m grpc_tools.protoc -Iproto \
		-I$$($(GEN_VENV)/bin/python -c 'import grpc_tools, os; print(os.path.dirname(grpc_tools.__file__))')/_proto \
		--py_out=$(GEN_VENV)/out --connectrpc_out=$(GEN_VENV)/out \
		proto/moat_envd/process.proto proto/moat_envd/filesystem.proto
	cp $(GEN_VENV)/out/moat_envd/*.py src/moat/envd/

clean:
	rm -rf $(VENV) build *.egg-info
