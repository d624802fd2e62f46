# moat: `make demo` and `make test` install everything a fresh Debian bookworm root machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := bubblewrap runsc qemu-system-x86 busybox-static lz4 e2fsprogs python3-venv python3-pip python3-pandas python3-matplotlib curl gcc libc6-dev openssh-client openssh-server git chromium chromium-driver mmdebstrap umoci skopeo
STAMP := $(VENV)/.installed
# The E2B JS SDKs (tests/test_server_js.py), pinned by tests/js/package-lock.json.
JS_DIR := tests/js
JS_STAMP := $(JS_DIR)/node_modules/.installed
# The older E2B Python SDK (tests/test_server_e2b_legacy.py) in a virtualenv of its own.
LEGACY_VENV ?= /var/tmp/moat-e2b-2.45.1
LEGACY_STAMP := $(LEGACY_VENV)/.installed

.PHONY: install defaults demo test lint bench clean proto

install: $(STAMP) $(JS_STAMP) $(LEGACY_STAMP) defaults

# The default templates (base, code-interpreter): what sandboxes run on when they name none.
# Built in build sandboxes from Debian's packages; cached by content hash after the first time
# (~2 min from scratch here, 0.3 s cached). tests.site_env prints the site mirror's knobs on
# hosts that need them (docs/templates.md), nothing elsewhere.
defaults: $(STAMP)
	set -o pipefail; env $$($(PY) -m tests.site_env) $(PY) -m moat.cli template build --defaults | tail -n 4

$(STAMP): pyproject.toml constraints-dev.txt
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,cluster]' -c constraints-dev.txt
	@ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq  # the kernel is fetched with apt-get download
	$(PY) -m moat.runtime.microvm.setup
	$(PY) -m moat.runtime.gvisor.setup
	touch $(STAMP)

# The SDKs declare Node ">=20.18.1 <21 || >=22"; Debian bookworm's nodejs is 18.20, too old, so
# this needs the machine's own Node (NodeSource's nodejs 20 here, which ships npm).
$(JS_STAMP): $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || \
		{ echo "node >= 20.18.1 and npm are needed (Debian bookworm's nodejs 18 is too old)"; exit 1; }
	@node -e 'const [a, b, c] = process.versions.node.split(".").map(Number); process.exit(a * 1e6 + b * 1e3 + c >= 20018001 ? 0 : 1)' || \
		{ echo "node $$(node --version) is too old: the E2B JS SDKs need >= 20.18.1"; exit 1; }
	npm ci --prefix $(JS_DIR) --no-audit --no-fund --loglevel=error
	touch $@

$(LEGACY_STAMP): tests/e2b-2.45-requirements.txt
	test -x $(LEGACY_VENV)/bin/python || /usr/bin/python3 -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/python -m pip install -q -r tests/e2b-2.45-requirements.txt
	touch $@

demo: install
	$(PY) examples/demo.py

test: install
	PY=$(PY) tests/run_suite.sh  # two pytest processes at once: read its header

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
	rm -rf $(VENV) build *.egg-info $(JS_DIR)/node_modules
