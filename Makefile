# The two commands of the README: `make demo` and `make test`. Each does all set-up itself (idempotent).
.PHONY: setup test lint unit e2e demo bench crd

setup:
	@scripts/setup.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

crd: setup
	.venv/bin/python -m controller.crd > crds/virtualmachines.vmop.dev.yaml

test: lint
	.venv/bin/pytest

demo: setup
	.venv/bin/python -m demo

bench: setup
	.venv/bin/python -m bench
