# syntax=docker/dockerfile:1
# The mailrelay image: one image for the operator and for the relay pods it creates.
#
#   docker build -t registry.example.com/mailrelay:0.1.0 .
#   make image          # the same with buildah, no Docker daemon (scripts/image.sh; PYTHON_IMAGE= a base)
#   docker run --rm registry.example.com/mailrelay:0.1.0 operator --all-namespaces --standalone
#   docker run --rm -v "$PWD/relay.yaml:/etc/mailrelay/relay.yaml:ro" registry.example.com/mailrelay:0.1.0 relay --config /etc/mailrelay/relay.yaml
#
# Stage 1 builds wheels for mailrelay and every dependency; stage 2 installs them from those
# wheels only (no index, no compiler) and runs as an unprivileged user. The base is any Python
# 3.11+ image with pip: python:3.11-slim, or Debian's python3 and python3-pip (pip is run as
# `python3 -m pip`; PIP_BREAK_SYSTEM_PACKAGES lets it install into a Debian system Python).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /src
# Only what the wheel needs (see .dockerignore): metadata first, then the two packages.
COPY pyproject.toml README.md ./
COPY relay/ relay/
COPY operator/ operator/
RUN python3 -m pip wheel --wheel-dir /wheels .

# ------------------------------------------------------------------------------------------ final
FROM ${PYTHON_IMAGE} AS final
# The mailrelay version the builder made a wheel of (pyproject.toml; a test keeps them equal).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mailrelay" \
      org.opencontainers.image.description="Kubernetes-native SMTP relays: mailrelay relay (the relay process) and mailrelay operator (the kopf operator)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    MAILRELAY_CONFIG=/etc/mailrelay/config/relay.yaml
# MAILRELAY_CONFIG: where a relay pod mounts its config, so `kubectl exec POD -- mailrelay queue
# list` needs no path.
# The wheels are bind-mounted from the builder for this one step, so they never become a layer.
# /usr/sbin/sendmail is mailrelay under the name sendmail (`mailrelay sendmail`, for cron and
# programs that call sendmail; MAILRELAY_SERVER names the relay).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m pip install --no-index --find-links=/wheels "mailrelay==${VERSION}" \
 && ln -s /usr/local/bin/mailrelay /usr/sbin/sendmail \
 && groupadd --system --gid 10001 mailrelay \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/mailrelay --create-home --shell /usr/sbin/nologin mailrelay
# The relay's spool (a volume in Kubernetes) and its configuration directory.
RUN mkdir -p /var/spool/mailrelay /etc/mailrelay \
 && chown 10001:10001 /var/spool/mailrelay
WORKDIR /var/lib/mailrelay
USER 10001:10001
# Documentation only: SMTP listeners (whatever ports a MailRelay declares), the relay's metrics
# and health endpoint (9090) and the operator's liveness endpoint (8080).
EXPOSE 25 587 9090 8080
ENTRYPOINT ["mailrelay"]
CMD ["--help"]
