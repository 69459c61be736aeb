# cdc-relay as a container: `docker build -t cdc-relay .`, then `cdc-relay run` by default.
FROM python:3.12-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY cdc_relay ./cdc_relay
RUN pip install --no-cache-dir . && useradd --system --uid 10001 relay

USER relay
ENTRYPOINT ["cdc-relay"]
CMD ["run"]
