"""pytest fixtures for the libvirt half of the bed: one daemon per session, guests per test.

One daemon serves the whole session because guests are cheap to isolate by name while a daemon plus the
KVM verdict costs a second or more. A missing package or a failed image build fails the tests that asked
for the bed instead of skipping them: a skipped e2e suite reads as green.
"""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

if TYPE_CHECKING:
    import libvirt

    from testbed.libvirthost import GuestKind, LibvirtHost

_KEPT_LOGS = pytest.StashKey[Path]()
_guest_numbers = itertools.count(1)


class GuestFactory(Protocol):
    def __call__(
        self,
        kind: GuestKind,
        *,
        memory_mib: int | None = None,
        ignore_presses: int = 0,
        shutdown_delay: float = 0.0,
    ) -> libvirt.virDomain: ...


@pytest.fixture(scope="session")
def libvirt_host(request: pytest.FixtureRequest) -> Iterator[LibvirtHost]:
    """A started session libvirtd; its logs and guest consoles go to test-logs/ when any test failed."""
    try:
        # imported here so that a missing libvirt-python fails the e2e tests, not the collection of all
        from testbed.libvirthost import LibvirtHost  # noqa: PLC0415

        host = LibvirtHost.start()
    except Exception as exc:
        pytest.fail(f"the libvirt half of the test bed did not start: {exc}", pytrace=False)
    yield host
    failed = request.session.testsfailed > 0
    host.stop(keep=failed)
    if failed:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = Path(request.config.rootpath) / "test-logs" / f"libvirt-{stamp}"
        host.save_logs(dest)
        request.config.stash[_KEPT_LOGS] = dest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Said in the summary because fixture teardown output is captured and shown only for a failing test."""
    kept = config.stash.get(_KEPT_LOGS, None)
    if kept is not None:
        terminalreporter.write_line(f"libvirt daemon log and guest consoles of this failed session: {kept}")


@pytest.fixture
def guest_factory(libvirt_host: LibvirtHost, request: pytest.FixtureRequest) -> Iterator[GuestFactory]:
    """Creates running guests named after the test (so consoles in kept logs are easy to match) and
    removes them when the test ends, whatever state the test left them in."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    names: list[str] = []

    def create(
        kind: GuestKind,
        *,
        memory_mib: int | None = None,
        ignore_presses: int = 0,
        shutdown_delay: float = 0.0,
    ) -> libvirt.virDomain:
        name = f"{stem}-{kind}-{next(_guest_numbers)}"
        names.append(name)
        return libvirt_host.create_guest(
            name, kind, memory_mib=memory_mib, ignore_presses=ignore_presses, shutdown_delay=shutdown_delay
        )

    yield create
    for name in names:
        libvirt_host.remove_guest(name)
