# Two entry points: `make demo` (the main job) and `make test` (what CI runs).
# Everything installs into ./.venv from PyPI; nothing else is needed but Python 3.11+ and a
# Rust toolchain (cargo), which builds the native transport (native/, the calloutkit-native
# distribution) during the install. Without Rust, `pip install calloutkit` runs on grpc.aio.
# Every install comes from requirements/*.lock (exact versions with hashes), so a fresh
# machine gets the same versions every time; `make lock` refreshes the locks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean protos lock bench bench-instructions wheels

# Both distributions editable: calloutkit (pure Python, setuptools) and calloutkit-native
# (native/, maturin, a release build). The build backends come from the lock too
# (--no-build-isolation), so installing them fetches nothing unpinned. calloutkit-native is
# not in the lock: it is built here from its folder, and a directory has no hash to check.
# (The rm: the module older checkouts built inside src/, now a distribution of its own.)
$(STAMP): pyproject.toml requirements/dev.lock native/pyproject.toml native/Cargo.toml \
		native/Cargo.lock native/calloutkit_native.pyi $(wildcard native/src/*.rs)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes \
		-r requirements/dev.lock
	rm -f src/calloutkit/_native.*so
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps \
		--no-build-isolation -e . -e ./native
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/calloutkit demo

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/mypy
	cargo fmt --check --manifest-path native/Cargo.toml
	cargo clippy --quiet --release --manifest-path native/Cargo.toml -- -D warnings

# The Rust unit tests (the wire rules of native/src/grpc.rs, x509 reading) before the suite,
# which drives the same code over real sockets.
test: lint
	cargo test --quiet --release --manifest-path native/Cargo.toml
	$(BIN)/pytest

# Refresh the locks after changing a dependency in pyproject.toml (or to take new releases);
# tests/test_lock.py fails while pyproject.toml and the lock disagree. Then `make protos` when
# the locked grpcio-tools moved, and raise the grpcio floor to match (tests/test_lock.py says).
LOCK := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock'
lock: $(STAMP)
	$(LOCK) pyproject.toml requirements/tools.in --extra dev --extra examples --extra fast --extra metrics --extra otel \
		-o requirements/dev.lock
	$(LOCK) requirements/bench.in -c requirements/dev.lock -o requirements/bench.lock

# The two wheels into $(DIST): calloutkit (pure Python, any platform) and calloutkit-native
# (abi3: one wheel per platform serves every Python >= 3.11; release build, reusing
# native/target). Installing them needs no Rust toolchain: `pip install dist/*.whl`.
# (build/ goes first: setuptools would pack a module deleted since the last build.)
DIST ?= dist
wheels: $(STAMP)
	rm -rf build
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps \
		--no-build-isolation --wheel-dir $(DIST) . ./native

# Regenerate src/calloutkit/_generated/coprocess from proto/coprocess/*.proto (Tyk plugins).
protos: $(STAMP)
	$(BIN)/python -m calloutkit.tyk.codegen

# The side-by-side benchmark suite (bench/run.py; about 20 minutes on 2 cores). Load comes
# from wrk and h2load, installed from the system's packages when missing.
bench: $(STAMP)
	@command -v wrk >/dev/null && command -v h2load >/dev/null || \
		$$(command -v sudo) apt-get install -y --no-install-recommends wrk nghttp2-client
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes \
		-r requirements/bench.lock
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Instructions per one-message stream under valgrind (bench/instructions.py; about 10
# minutes): the comparison with the floor that machine noise cannot move.
bench-instructions: $(STAMP)
	@command -v valgrind >/dev/null && command -v h2load >/dev/null || \
		$$(command -v sudo) apt-get install -y --no-install-recommends valgrind nghttp2-client
	$(BIN)/python bench/instructions.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
