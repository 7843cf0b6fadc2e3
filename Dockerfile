# The vmop operator image: `docker build -t vmop:0.1.0 .`, run by manifests/daemonset.yaml.
#
# Debian's own Python and libvirt bindings (python3-libvirt) rather than compiling libvirt-python: no
# compiler or headers are needed anywhere, and the bindings match the libvirt client library they were
# built against. The base is an argument so that a mirror of it can be named (`--build-arg
# BASE_IMAGE=registry.example.com/debian:bookworm-slim`); it must be Debian 12, whose python3 is the 3.11
# that pyproject.toml requires.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS runtime
# qemu-utils: the storage check reads each qcow2 image's header with qemu-img (one file at a time) to
# confine its backing chain to the allowed directories before any of it reaches the domain definition.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-libvirt qemu-utils \
 && rm -rf /var/lib/apt/lists/*

# pip and venv's bundled wheels are needed only to install, so they stay in this stage.
FROM runtime AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
# --system-site-packages: the venv sees Debian's libvirt module, which pip then counts as libvirt-python.
RUN python3 -m venv --system-site-packages /opt/vmop
# Only what the package is built from: the layers below are reused until pyproject.toml or controller/ change.
COPY pyproject.toml /src/
COPY controller /src/controller
# The Kubernetes client's asyncio twin (kubernetes.aio, 70 MB) is never imported: the operator
# takes its configuration (and posts Events) from the synchronous client, and makes its own requests with
# aiohttp, as kopf does. Bytecode is compiled here, so that imports
# are fast on a read-only root file system, where nothing could be cached; unchecked hashes stay valid
# whatever the copy below does to the files' times. -f: the install already left timestamp-checked
# bytecode for a few modules (attrs), which Python found stale in the image and recompiled on every start.
RUN /opt/vmop/bin/pip install --no-cache-dir --no-compile /src \
 && /opt/vmop/bin/pip uninstall --yes pip setuptools \
 && rm -r /opt/vmop/lib/python3.11/site-packages/kubernetes/aio \
 && /opt/vmop/bin/python -m compileall -q -f --invalidation-mode unchecked-hash /opt/vmop

FROM runtime
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="vmop" \
      org.opencontainers.image.description="Runs libvirt VMs from VirtualMachine resources; shuts them down gracefully" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
COPY --from=build /opt/vmop /opt/vmop
ENV PATH=/opt/vmop/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Root, deliberately: libvirtd's socket is root:libvirt 0770, and the libvirt group's id differs from host
# to host, so no fixed non-root user or group in the image can open it on every node. The DaemonSet keeps
# root harmless instead: all capabilities dropped, no privilege escalation, a read-only root file system.
USER 0
# Exec form: the operator is PID 1 and receives the kubelet's SIGTERM itself (guests are left running).
ENTRYPOINT ["vmop"]
