# Outrigger sidecar image (docs/deploy.md).
#
# Two stages: the builder makes wheels of Outrigger and every dependency; the
# final stage installs those wheels into a venv, offline, and carries no
# build tools. Works on the official python image and on the Debian-based
# stand-in scripts/image-test.sh builds (both have python3 -m venv).
#
# Listeners bind 127.0.0.1 (SPEC 1 and 7): as a sidecar, Outrigger shares
# the pod's network namespace with the app, which reaches it on localhost.
# The Helm chart keeps the admin listener on loopback too and probes it with
# exec probes run inside the container. To try the image outside a pod, use
# `docker run --network host ...` or mount a config with other listen hosts.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# README.md is named by pyproject.toml's `readme`, so the build needs it.
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --quiet --wheel-dir /wheels '.[fleet]'

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OUTRIGGER_HEALTHCHECK_URL=http://127.0.0.1:15000/healthz

# A fixed numeric UID so Kubernetes `runAsNonRoot: true` can verify it.
RUN groupadd --gid 10001 outrigger \
    && useradd --no-log-init --uid 10001 --gid outrigger --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin outrigger

# Offline install from the builder's wheels (bind-mounted: no copy stays in a layer).
# Byte code is compiled here, so nothing is written under / at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check \
       --no-index --find-links=/wheels 'outrigger[fleet]' \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/outrigger

# Default config: the example config and policies, at the path the CMD uses.
# In Kubernetes a ConfigMap is mounted over /etc/outrigger instead.
COPY config.example.yaml /etc/outrigger/config.yaml
COPY policies/ /etc/outrigger/policies/
# The example keeps its store beside the config (read-only here): point it at the volume.
RUN sed -i 's|^data_dir: .*|data_dir: /var/lib/outrigger|' /etc/outrigger/config.yaml

# data_dir (SPEC 11): the durable delivery store. The only path Outrigger
# writes to, so the root filesystem can be read-only.
VOLUME ["/var/lib/outrigger"]

WORKDIR /etc/outrigger
USER 10001:10001

EXPOSE 15000 15001

# Outrigger handles SIGTERM itself (graceful drain), so it can run as PID 1.
STOPSIGNAL SIGTERM

# For plain `docker run`; Kubernetes ignores this and uses the chart's probes.
# The image has no curl: stdlib urllib, ignoring any HTTP_PROXY in the environment.
# Set OUTRIGGER_HEALTHCHECK_URL when a mounted config moves the admin listener.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-I", "-S", "-c", "import os, sys, urllib.request as u; o = u.build_opener(u.ProxyHandler({})); sys.exit(0 if o.open(os.environ['OUTRIGGER_HEALTHCHECK_URL'], timeout=2).status == 200 else 1)"]

ENTRYPOINT ["outrigger"]
CMD ["run", "-c", "/etc/outrigger/config.yaml"]
