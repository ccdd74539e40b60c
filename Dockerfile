# syntax=docker/dockerfile:1
#
# meshproxy's container image: one image for the sidecar (`meshproxy run`), its init container
# (`meshproxy capture`), the control plane (`meshproxy control`) and the injection webhook
# (`meshproxy webhook`), as Istio's proxyv2 image serves the sidecar and its init container.
#
#   docker build -t meshproxy:0.1.0 .
#
# Stage "build" turns the project and every dependency into wheels (compiling one only on a
# platform PyPI publishes no wheel for: that is what its compiler is for). The final stage
# installs those wheels and nothing else (--no-index --only-binary), so it has no compiler, no
# headers and no source tree. It runs as uid/gid 1337, the id Istio's sidecar has and that
# `meshproxy capture` exempts from redirection (its own traffic must not loop back to it).
#
# No HEALTHCHECK: Kubernetes ignores it; the injected sidecar has a readinessProbe on
# :15021/healthz/ready and the manifests in examples/kubernetes/ probe every container.

FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# The compiler is in this stage only and never reaches the image. Its versions are those of the
# pinned base image's Debian release; pinning each package's Debian revision would break the
# build at every Debian point release without making it any more reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshproxy ./meshproxy
COPY control ./control
COPY certs ./certs

# The project's wheel and one wheel per dependency (downloaded, or built here when PyPI has
# none for this platform), all in /wheels.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm AS final

ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="meshproxy" \
      org.opencontainers.image.description="A service-mesh sidecar proxy in Python that speaks Istio's configuration" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# iptables for the init container (`meshproxy capture`: iptables-restore / iptables-save, with
# the nf_tables and legacy backends, iptables-nft-* and iptables-legacy-*), which runs this
# image as root with NET_ADMIN and NET_RAW, as istio-init runs proxyv2. Versions: see the build
# stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 1337 meshproxy \
    && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin meshproxy

# Only wheels, from the build stage, never an index: nothing is compiled or fetched here, and
# the wheels are bind-mounted, so they take no layer of the image. The project's wheel is named
# by file: /wheels holds exactly one meshproxy version, the one pyproject.toml says, whatever
# --build-arg VERSION says (VERSION only labels the image).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --only-binary=:all: --find-links=/wheels \
        /wheels/meshproxy-*.whl

USER 1337:1337
WORKDIR /

# 15001 outbound capture, 15006 inbound capture, 15021 health (/healthz/ready), 15090
# Prometheus (/stats/prometheus); the admin port 15000 listens on localhost only. The control
# plane (15010) and the webhook (15017) choose their ports on their command lines.
EXPOSE 15001 15006 15021 15090

HEALTHCHECK NONE

ENTRYPOINT ["meshproxy"]
CMD ["--help"]
