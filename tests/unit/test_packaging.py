"""What ships matches the code: image entry point, command line, generated CRD and API page, samples.

Docker cannot run here, so the image is checked where it can break without Docker: the entry point it
names must be the console script pyproject.toml installs, and that script must run. Generated files are
compared with their generators, so that a model change without `make crd` / apidoc fails here first.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller import apidoc, crd, nodepolicy
from controller.api import GROUP, KIND, VERSION, VirtualMachineSpec
from controller.settings import parser
from controller.storage import DEFAULT_ALLOWED_DIRS

NODE_REFUSALS = (
    nodepolicy.STORAGE_NOT_ALLOWED,
    nodepolicy.NETWORK_NOT_ALLOWED,
    nodepolicy.OVER_VM_LIMITS,
    nodepolicy.NODE_MEMORY_FULL,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        elif not stages:
            continue  # an ARG before the first FROM: it belongs to no stage
        stages[-1].append(line)
    return stages


def instruction(stage: list[str], name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage if line.split(None, 1)[0].upper() == name]


def daemonset() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "manifests" / "daemonset.yaml").read_text()))


def test_the_image_entry_point_is_the_console_script_pyproject_installs() -> None:
    runtime = dockerfile_stages()[-1]
    (entrypoint,) = instruction(runtime, "ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form: the operator is PID 1 and gets SIGTERM itself
    assert argv == ["vmop"]
    assert pyproject()["project"]["scripts"]["vmop"] == "controller.__main__:main"
    container = daemonset()["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container, "the DaemonSet must run the image's entry point, not replace it"


def test_the_image_is_debian_with_its_own_libvirt_bindings_and_no_build_tools() -> None:
    """The base is an argument a user can point at a mirror; Debian's python3-libvirt means no compiler."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.MULTILINE)
    *builders, runtime = dockerfile_stages()
    assert instruction(builders[0], "FROM") == ["${BASE_IMAGE} AS runtime"]
    assert instruction(runtime, "FROM") == ["runtime"], "the final stage adds only the venv to the runtime base"
    everything = " ".join(line for stage in (*builders, runtime) for line in stage)
    assert "python3-libvirt" in everything
    for build_tool in ("libvirt-dev", "gcc", "pkg-config"):
        assert build_tool not in everything, f"{build_tool}: nothing is compiled"
    requires = pyproject()["project"]["requires-python"]
    assert requires == ">=3.11", "Debian 12's python3 (3.11) must satisfy requires-python"


def test_the_console_script_target_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Resolved from pyproject.toml rather than from .venv/bin, so that a stale install cannot hide a rename."""
    module, function = pyproject()["project"]["scripts"]["vmop"].split(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: vmop")


def test_help_documents_every_flag_and_its_environment_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for action in parser()._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, f"{action.option_strings} has no help"
        if "--help" not in action.option_strings:
            env = re.match(r"\[([A-Z_]+)", action.help)
            assert env, f"{action.option_strings}: the help names no environment variable"
            assert f"[{env.group(1)}" in text


def test_the_daemonset_passes_only_flags_and_variables_the_operator_knows() -> None:
    container = daemonset()["spec"]["template"]["spec"]["containers"][0]
    parser().parse_args(container.get("args", []))  # exits on an unknown flag
    known = set(re.findall(r"\[([A-Z_]+)", " ".join(a.help or "" for a in parser()._actions)))
    for variable in container.get("env", []):
        assert variable["name"] in known, f"the operator reads no {variable['name']}"


def test_the_committed_crd_is_what_the_models_generate() -> None:
    committed = (ROOT / "crds" / "virtualmachines.vmop.dev.yaml").read_text()
    assert committed == crd.render(), "run `make crd` after changing controller/api.py"


def test_the_api_reference_is_what_the_crd_generates() -> None:
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == apidoc.render(), "run `.venv/bin/python -m controller.apidoc > docs/api.md`"


def test_the_api_reference_names_every_field_of_the_schema() -> None:
    schema = crd.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    page = apidoc.render()

    def fields(node: dict[str, Any]) -> list[str]:
        found = []
        for name, child in node.get("properties", {}).items():
            found.append(name)
            found += fields(child)
            found += fields(child.get("items", {}))
        return found

    for name in fields(schema):
        assert f"| `{name}`" in page


def test_the_argocd_health_check_reads_the_ready_condition() -> None:
    script = (ROOT / "docs" / "argocd-health.lua").read_text()
    assert '"Ready"' in script
    for status in ("Healthy", "Progressing", "Degraded", "Suspended"):
        assert f'"{status}"' in script
    for reason in ("DomainConflict", "InvalidSpec", "ShutdownOverdue", "HypervisorUnreachable", *NODE_REFUSALS):
        assert reason in script


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_samples_are_valid_virtual_machines_with_allowed_paths(path: Path) -> None:
    (manifest,) = list(yaml.safe_load_all(path.read_text()))
    assert manifest["apiVersion"] == f"{GROUP}/{VERSION}"
    assert manifest["kind"] == KIND
    assert "namespace" not in manifest["metadata"], "samples are applied to the user's namespace"
    spec = VirtualMachineSpec.model_validate(manifest["spec"])
    paths = [spec.domain.kernel, spec.domain.initrd, *(d.path for d in spec.domain.disks)]
    allowed = [str(d) + os.sep for d in DEFAULT_ALLOWED_DIRS]
    for file in filter(None, paths):
        assert os.path.normpath(file).startswith(tuple(allowed)), f"{file} is outside the default allow-list"


def test_there_is_a_sample_for_each_shutdown_story() -> None:
    specs = [VirtualMachineSpec.model_validate(yaml.safe_load(p.read_text())["spec"]) for p in SAMPLES]
    policies = [s.shutdown_policy for s in specs]
    assert any(not s.domain.kernel and s.domain.disks for s in specs), "a VM booting from its disk image"
    assert any([m.value for m in p.methods] == ["Agent", "ACPI"] for p in policies)
    assert any(not p.force_after_deadline for p in policies)
    assert any(p.on_delete.value == "Force" for p in policies)
