"""The operator's image, built from the Dockerfile by buildah as `docker build` would, and run from its archive.

Every check runs against the OCI archive that containerd is given (testbed.image), unpacked into a buildah
container, so that what is tested is what a node would run. A cold cache builds the base and the image
first: a couple of minutes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

from testbed.image import (
    BASE_NAME,
    REPO_ROOT,
    RUNC_ROOT_FLAG,
    ImageBuildError,
    OperatorImage,
    buildah,
    oci_manifest,
    operator_image,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def image() -> OperatorImage:
    return operator_image()


@pytest.fixture(scope="session")
def config(image: OperatorImage) -> dict[str, Any]:
    return oci_manifest(image.archive)[1]


@pytest.fixture(scope="session")
def container(image: OperatorImage) -> Iterator[str]:
    """A working container of the archive's image, read back into buildah's storage for the purpose."""
    name = buildah("from", "--quiet", f"oci-archive:{image.archive}").strip()
    yield name
    buildah("rm", name)
    # Fails while another session's container uses the image; the last one out removes it.
    with contextlib.suppress(ImageBuildError):
        buildah("rmi", image.name)


def run(container: str, *argv: str) -> str:
    """argv in the container, as the image's user with its environment; no network, as nothing here needs one."""
    return buildah("run", "--network=none", RUNC_ROOT_FLAG, container, "--", *argv)


def test_the_base_is_a_build_argument_and_the_image_is_built_on_it(
    image: OperatorImage, config: dict[str, Any]
) -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.MULTILINE)
    assert re.fullmatch(r"localhost/vmop:[0-9a-f]{12}", image.name)
    base = buildah("inspect", "--type=image", "--format={{.OCIv1.RootFS.DiffIDs}}", BASE_NAME)
    (base_layer,) = re.findall(r"sha256:[0-9a-f]{64}", base)
    assert config["rootfs"]["diff_ids"][0] == base_layer, "the image does not start with the local base's layer"
    assert config["config"]["Labels"]["org.opencontainers.image.base.name"] == BASE_NAME


def test_the_entry_point_is_the_operator_in_exec_form_as_root(config: dict[str, Any]) -> None:
    assert config["config"]["Entrypoint"] == ["vmop"]
    assert not config["config"].get("Cmd"), "a default command would be passed to vmop as arguments"
    assert config["config"]["User"] == "0"


def test_the_declared_labels_are_on_the_image(config: dict[str, Any]) -> None:
    declared = re.findall(r"(org\.opencontainers\.image\.[a-z.]+)=", (REPO_ROOT / "Dockerfile").read_text())
    assert {"org.opencontainers.image.title", "org.opencontainers.image.description"} <= set(declared)
    labels = config["config"]["Labels"]
    assert set(declared) <= set(labels)
    assert labels["org.opencontainers.image.title"] == "vmop"


def test_vmop_runs(container: str) -> None:
    assert run(container, "vmop", "--help").startswith("usage: vmop")


def test_debians_libvirt_bindings_are_the_ones_imported(container: str) -> None:
    out = run(
        container,
        "python3",
        "-c",
        "import importlib.metadata, libvirt; "
        "print(libvirt.getVersion(), libvirt.__file__, importlib.metadata.version('libvirt-python'))",
    )
    version, path, distribution = out.split()
    assert int(version) >= 9_000_000
    assert path.startswith("/usr/lib/python3/dist-packages/")
    assert distribution.startswith("9.")


def test_qemu_img_is_there_for_the_storage_check(container: str) -> None:
    assert run(container, "qemu-img", "--version").startswith("qemu-img version")


def test_no_compiler_or_installer_reaches_the_image(container: str) -> None:
    found = run(container, "sh", "-c", "for tool in gcc cc c++ ld pip pip3; do command -v $tool || true; done")
    assert found.split() == []


def test_the_operator_writes_nothing_to_the_root_file_system(container: str, config: dict[str, Any]) -> None:
    """The DaemonSet's root is read-only: every module's bytecode must be in the image, valid, already.

    Bytecode writing is turned back on for the check, so that a missing or stale cache file would show up.
    """
    assert "PYTHONDONTWRITEBYTECODE=1" in config["config"]["Env"]
    written = run(
        container,
        "sh",
        "-c",
        "touch /tmp/.stamp && sleep 1 && env -u PYTHONDONTWRITEBYTECODE vmop --help >/dev/null"
        " && env -u PYTHONDONTWRITEBYTECODE python3 -c 'import controller.__main__, libvirt'"
        " && find / -xdev -newer /tmp/.stamp -not -path /tmp/.stamp",
    )
    assert written.split() == []
