# cdc-relay as a container: `docker build -t cdc-relay .`, then `cdc-relay run` by default.
# Linted with hadolint (tests/unit/test_deploy.py); not built on our CI, which has no Docker engine.

# The wheel is built where a C compiler is, so that the image runs the compiled core (mypyc;
# docs/performance.md, "The compiled core"); the image itself carries no compiler. Without one
# the same wheel would install the pure-Python core.
FROM python:3.12-slim AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY cdc_relay ./cdc_relay
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay

# A numeric user, so that Kubernetes' runAsNonRoot can verify it.
USER 10001
EXPOSE 9187

# slim has no curl: ask /healthz with Python itself (port 0 means the endpoint is disabled).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('CDC_RELAY_HTTP_PORT', '9187'); sys.exit(0 if port == '0' else urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["cdc-relay"]
CMD ["run"]
