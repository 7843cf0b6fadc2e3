"""The real test bed: a Kubernetes control plane built from Go modules and a libvirt daemon with QEMU guests.

Tests and the demo start these parts through this package; nothing here is a mock.
"""
