# A calloutkit server image: `docker build --build-arg SERVER=path/to/your_callout -t callout .`
# (SERVER is a folder with a server.py, or one .py file; the default is an example). See
# docs/deploy.md. tests/test_deploy.py lints this file and runs its command outside a container.

# -- build: calloutkit, the native transport and their dependencies into a virtual environment
FROM python:3.11-slim-bookworm AS build

# The native transport (native/, the calloutkit-native distribution) is Rust: the toolchain
# comes from the official Rust image, and gcc links the extension. None of it reaches the
# run stage, which gets the built environment only.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH
COPY --from=rust:1.95-slim-bookworm /usr/local/cargo /usr/local/cargo
COPY --from=rust:1.95-slim-bookworm /usr/local/rustup /usr/local/rustup
# Unpinned (DL3008): the base image pins the Debian release, whose gcc gets fixes only.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/calloutkit
COPY pyproject.toml README.md ./
COPY src ./src
COPY native ./native
# Dependencies, and the build backends, at the versions the test suite ran with: the dev lock
# pins them (with hashes, which constraints cannot carry, so only the pins are taken from it).
# calloutkit-native comes from its folder; the `native` extra then finds it installed.
COPY requirements/dev.lock ./requirements/
RUN sed -n 's/^\([A-Za-z0-9._-]*==[^ ;]*\).*/\1/p' requirements/dev.lock > constraints.txt \
    && PIP_CONSTRAINT=/src/constraints.txt /opt/calloutkit/bin/pip install ./native ".[fast,native]"

# -- run: the environment, the server, no build tools, not root ---------------------------------
FROM python:3.11-slim-bookworm

ARG SERVER=examples/add_header
ENV PATH=/opt/calloutkit/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CALLOUTKIT_DISABLE_TLS=true \
    CALLOUTKIT_LOG_FORMAT=json
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin calloutkit
COPY --from=build /opt/calloutkit /opt/calloutkit
WORKDIR /app
COPY ${SERVER} ./server/
USER 10001

# gRPC (plaintext h2c) and the HTTP health port: calloutkit's defaults.
EXPOSE 8080 8000
# Python's own HTTP client: slim images have no curl. Any path answers; 503 while draining.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CALLOUTKIT_HEALTH_CHECK_PORT', '8000') + '/', timeout=2)"]
# Exec form: calloutkit is PID 1 and gets SIGTERM itself, drains, and exits 0.
ENTRYPOINT ["calloutkit", "serve"]
CMD ["server"]
