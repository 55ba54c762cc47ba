# syntax=docker/dockerfile:1
# line-gateway in a container. Build and run (see README.md, "Deploy"):
#
#   docker build -t line-gateway .
#   docker run --rm -p 8080:8080 --env-file .env --stop-timeout 40 line-gateway
#
# On SIGTERM the gateway drains for up to 25 s (SHUTDOWN_GRACE_S 15 + END_CALL_DRAIN_S 5 + 5 s
# for the last hang-ups). Docker's default stop timeout is 10 s, so give it 40: `docker run
# --stop-timeout 40`, compose's `stop_grace_period: 40s`. tests/test_deploy_files.py runs this
# file's build commands in a clean virtualenv and checks the properties below.

ARG PYTHON_VERSION=3.11

# Build: the pinned lock and the gateway into a virtualenv; only the virtualenv moves on.
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/line-gateway/.venv
ENV PATH=/opt/line-gateway/.venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the lock without its last line (`.`, the gateway itself): this
# layer is rebuilt only when the lock changes.
COPY requirements.txt ./
RUN grep -v -x '[[:space:]]*\.[[:space:]]*' requirements.txt > dependencies.txt \
    && pip install -r dependencies.txt
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
RUN pip install --no-deps . && pip check

# Run: the virtualenv on a slim Python, as an unprivileged user.
FROM python:${PYTHON_VERSION}-slim-bookworm
ENV PATH=/opt/line-gateway/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8080
# A writable home for RECORDINGS_DIR (e.g. /var/lib/line-gateway/recordings on a volume).
RUN groupadd --system --gid 10001 line-gateway \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /var/lib/line-gateway \
        --shell /usr/sbin/nologin line-gateway
COPY --from=build /opt/line-gateway/.venv /opt/line-gateway/.venv
WORKDIR /var/lib/line-gateway
USER 10001:10001
EXPOSE 8080
# SIGTERM starts the drain (readiness off, live calls finish or end gracefully).
STOPSIGNAL SIGTERM
# Liveness only: /readyz turns 503 while draining or when Redis is unreachable, and neither
# should mark the container unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"
ENTRYPOINT ["line-gateway"]
CMD ["serve", "--host", "0.0.0.0"]
