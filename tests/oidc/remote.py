"""An agent for a world whose authorization server is reached over https (tests/world.py
builds the rest): its bundle endpoint served over https with a certificate of the test's
CA, and the environment of a child the test starts that must trust that CA."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.helpers import AgentProcess, free_port, write_config
from tests.world import World, entry_table, table


def start_agent(
    w: World,
    servers: str,
    bundle_cert: tuple[Path, Path],
    settings: str = "",
    **inject: Any,
) -> AgentProcess:
    """The agent for the world's cgroup (its TLS listener on a port of its own, and these
    [inject] settings), the bundle endpoint on https with bundle_cert; settings: other
    tables, before servers."""
    w.entries_path.write_text(entry_table("workload", w.spiffe_id, [w.selector]))
    inject_table = table(
        "[inject]",
        listen_port=w.proxy_port,
        listen_port6=w.proxy_port,
        tls_listen_port=free_port(),
        managed_cgroups=[f"/{w.cg.name}"],
        **inject,
    )
    cfg = write_config(w.tmp, extra=inject_table + settings + servers, bundle_port=w.bundle_port)
    # helpers.write_config writes the [bundle_endpoint] table: the certificate goes in it
    cert, key = bundle_cert
    cfg.write_text(
        cfg.read_text().replace(
            "[bundle_endpoint]\n",
            f'[bundle_endpoint]\ncert_file = "{cert}"\nkey_file = "{key}"\n',
            1,
        )
    )
    w.agent = w.enter(AgentProcess(cfg, w.tmp))
    w.agent.wait_ready()
    return w.agent


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """os.environ with these values while a child is started inside (then restored)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
