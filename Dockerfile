# Outrigger sidecar image.
#
# The listeners bind 127.0.0.1 (SPEC 1 and 7): as a sidecar, Outrigger shares
# the pod's network namespace with the app, which reaches it on localhost.
# Do not change them to 0.0.0.0 here; that would expose the proxy (and the
# admin API with POST /reload) to the whole pod network. Consequences:
#   - Kubernetes httpGet probes come from the node, not from loopback: the
#     Helm chart (helm/outrigger) uses exec probes that run inside the pod.
#   - `docker run -p 15001:15001` cannot reach a loopback listener; to try
#     the image locally use `docker run --network host ...`, or mount a
#     config whose listen/admin hosts are set explicitly.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric UID so Kubernetes `runAsNonRoot: true` can verify it.
RUN groupadd --system --gid 10001 outrigger \
    && useradd --system --uid 10001 --gid outrigger --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin outrigger

WORKDIR /src
# README.md is named by pyproject.toml's `readme`, so the build needs it.
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
RUN pip install --no-cache-dir . \
    && rm -rf /src

# Default config: the example config and policies, at the path the CMD uses.
# In Kubernetes a ConfigMap is mounted over /etc/outrigger instead.
COPY config.example.yaml /etc/outrigger/config.yaml
COPY policies/ /etc/outrigger/policies/

WORKDIR /etc/outrigger
USER 10001:10001

EXPOSE 15000 15001

# Outrigger handles SIGTERM itself (graceful drain), so it can run as PID 1.
STOPSIGNAL SIGTERM

# For plain `docker run`; Kubernetes ignores this and uses the chart's probes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; o = u.build_opener(u.ProxyHandler({})); sys.exit(0 if o.open('http://127.0.0.1:15000/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["outrigger"]
CMD ["run", "-c", "/etc/outrigger/config.yaml"]
