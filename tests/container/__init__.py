"""The agent's container image on a real runtime (podman + runc): what
tests/integration/test_container.py runs it with."""
