"""Operator settings: flags, their environment fallbacks, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.settings import from_args


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-a")
    monkeypatch.setenv("VMOP_ALLOWED_STORAGE_DIRS", "/srv/a:/srv/b")
    monkeypatch.setenv("VMOP_VIRT_TYPE", "qemu")
    settings = from_args([])
    assert settings.node_name == "node-a"
    assert settings.allowed_storage_dirs == (Path("/srv/a"), Path("/srv/b"))
    assert settings.host.virt_type == "qemu"
    assert settings.libvirt_uri == "qemu:///system"
    assert settings.resync.total_seconds() == 300


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-a")
    settings = from_args(["--node-name", "node-b", "--allowed-storage-dir", "/x", "--allowed-storage-dir", "/y"])
    assert settings.node_name == "node-b"
    assert settings.allowed_storage_dirs == (Path("/x"), Path("/y"))


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        ([], "--node-name"),
        (["--node-name", "n", "--agent-timeout", "0"], "--agent-timeout must be positive"),
        (["--node-name", "n", "--api-timeout", "0"], "--api-timeout must be positive"),
        (["--node-name", "n", "--memory-ceiling-mib", "0"], "--memory-ceiling-mib must be positive"),
        (["--node-name", "n", "--max-vcpus-per-vm", "-1"], "--max-vcpus-per-vm must be positive"),
        (["--node-name", "n", "--max-memory-mib-per-vm", "lots"], "invalid int value"),
        # libvirt gives a graceful destroy up after 15 s: the plain destroy (SIGKILL) must come first.
        (["--node-name", "n", "--graceful-destroy-timeout", "15"], "must be below 15"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    with pytest.raises(SystemExit) as exited:
        from_args(argv)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_the_node_lock_defaults_to_the_host_directory_the_daemonset_mounts() -> None:
    settings = from_args(["--node-name", "n"])
    assert settings.node_lock_file == Path("/var/run/vmop/node.lock")
    assert settings.graceful_destroy_timeout == 5


def test_the_node_policy_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMOP_ALLOWED_NETWORKS", "tenants, nat ,")
    monkeypatch.setenv("VMOP_MEMORY_CEILING_MIB", "20480")
    settings = from_args(
        ["--node-name", "n", "--allowed-bridge", "br0", "--allowed-bridge", "br1", "--max-vcpus-per-vm", "8"]
    )
    policy = settings.policy
    assert policy.allowed_bridges == frozenset({"br0", "br1"})
    assert policy.allowed_networks == frozenset({"tenants", "nat"})
    assert policy.max_vcpus == 8
    assert policy.max_memory_mib is None
    assert policy.memory_ceiling_mib == 20480


def test_by_default_no_network_is_allowed_and_the_ceiling_is_the_node_s_memory() -> None:
    settings = from_args(["--node-name", "n"])
    assert settings.policy.allowed_bridges == frozenset()
    assert settings.policy.allowed_networks == frozenset()
    assert settings.policy.memory_ceiling_mib is None
    assert settings.host.interface_filter is None
