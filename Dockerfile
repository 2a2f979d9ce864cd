# syntax=docker/dockerfile:1
# The Kynara sidecar image: the daemon alone, non-root, on the shipped policies.
#
#   docker build -t kynara-sidecar .
#   docker run --rm -v kynara-run:/run/kynara -v kynara-audit:/var/lib/kynara \
#       kynara-sidecar
#   docker exec <container> kynara-sidecar verify     # walks the audit chain
#
# The builder stage turns the sources into wheels; the runtime stage installs
# only those wheels into a venv, so no sources, build tools or test
# dependencies reach the image. No engine runs in CI: tests/test_dockerfile.py
# checks what this file copies and builds and installs the same wheels.

# Both stages share one base, so the wheels match the runtime's Python and libc.
# NOTE: a tag moves with security fixes; pin a digest (python:3.11-slim@sha256:
# ...) through --build-arg when a release must be rebuilt byte for byte.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
WORKDIR /src
# Only what the two wheels are built from; .dockerignore keeps the rest
# (tests, clients, caches, .git) out of the build context as well.
COPY pyproject.toml README.md ./
COPY kynara_sidecar/ kynara_sidecar/
COPY protos/ protos/
# Wheels for kynara-protos, the daemon and its runtime dependencies only (no
# [test] extra). --only-binary: the base has no compiler, so a dependency
# without a wheel for this platform fails here, by name, instead of half
# building; add build-essential to this stage only if that ever happens.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip wheel --only-binary=:all: --wheel-dir /wheels ./protos .

FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="kynara-sidecar" \
      org.opencontainers.image.description="The Kynara permission daemon for AI agents"

# A fixed, numeric uid/gid: Kubernetes' runAsNonRoot can check it, and volume
# ownership stays the same across rebuilds. /var/lib/kynara keeps the audit
# log to the daemon (0750); /run/kynara must let the agent reach the socket.
RUN groupadd --system --gid 10001 kynara \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin kynara \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/kynara \
    && install -d -o 10001 -g 10001 -m 0755 /run/kynara

# The wheels are bind-mounted, not copied, so they add no layer to the image.
# --no-index: nothing but the builder's wheels. pip and setuptools then leave
# the venv (about 24 MB): nothing imports them at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        kynara-sidecar \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools

# Policies and config stay root-owned and read-only to the daemon: a
# compromised daemon cannot rewrite the rules it enforces.
COPY config/docker.yaml /etc/kynara/kynara.yaml
COPY config/policies/ /etc/kynara/policies/

# KYNARA_CONFIG lets `docker exec ... kynara-sidecar verify` find the audit log.
# Bytecode was compiled at install and the daemon writes only to the two volumes
# below, so the root filesystem may be mounted read-only (docker run --read-only).
ENV PATH="/opt/venv/bin:${PATH}" \
    KYNARA_CONFIG=/etc/kynara/kynara.yaml \
    PYTHONDONTWRITEBYTECODE=1

# The audit log must outlive the container; the socket directory is shared with
# the agent container. A fresh named volume takes the ownership set above.
# The socket is created with agent.socket_mode (0660 by default), so an agent
# container running as another uid in the pod's group (fsGroup) can connect.
VOLUME ["/var/lib/kynara", "/run/kynara"]
WORKDIR /var/lib/kynara

# No EXPOSE: every listener binds loopback in docker.yaml, reached from inside
# the pod only. A manifest that binds health or metrics to the pod address
# declares those containerPorts itself.
# No HEALTHCHECK: Kubernetes ignores it and probes the gRPC health port itself
# (grpc: {port: 50152}); a check here would need a probe binary or a Python
# process importing grpc (~0.2 s and 30 MB here) every interval.
USER 10001:10001
# The daemon is PID 1 and installs its own SIGTERM handler: it reports not
# serving, drains, writes the stop marker and closes the audit log.
STOPSIGNAL SIGTERM
ENTRYPOINT ["kynara-sidecar"]
CMD ["run", "--config", "/etc/kynara/kynara.yaml"]
