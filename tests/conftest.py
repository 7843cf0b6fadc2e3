pytest_plugins = ["testbed.pytest_controlplane", "testbed.pytest_libvirt", "testbed.pytest_node"]
