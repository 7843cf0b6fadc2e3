# syntax=docker/dockerfile:1
# The vmop operator image: `docker build -t vmop:0.1.0 .`, run by manifests/daemonset.yaml.
#
# Two stages so that the compiler and libvirt's headers never reach the nodes: libvirt-python has no
# binary wheels and is compiled against the libvirt client library here, then only the wheels and that
# library (libvirt0: the client side, no daemon) go into the runtime image.

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libvirt-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the package is built from: the layer is reused until pyproject.toml or controller/ change.
COPY pyproject.toml ./
COPY controller ./controller
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="vmop" \
      org.opencontainers.image.description="Runs libvirt VMs from VirtualMachine resources; shuts them down gracefully"
# qemu-utils: the storage check reads each qcow2 image's header with qemu-img (one file at a time) to
# confine its backing chain to the allowed directories before any of it reaches the domain definition.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 qemu-utils \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels vmop
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Root, deliberately: libvirtd's socket is root:libvirt 0770, and the libvirt group's id differs from host
# to host, so no fixed non-root user or group in the image can open it on every node. The DaemonSet keeps
# root harmless instead: all capabilities dropped, no privilege escalation, a read-only root file system.
USER 0
# Exec form: the operator is PID 1 and receives the kubelet's SIGTERM itself (guests are left running).
ENTRYPOINT ["vmop"]
