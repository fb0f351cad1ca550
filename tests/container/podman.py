"""podman for the container test: the image build, containers that are always removed, and
deploy/k8s/daemonset.yaml's pod turned into `podman run` options.

The translation reads the manifest and refuses what it does not know (a securityContext
key, a volume kind, an env source, a subPath): a manifest change the test cannot reproduce
fails the test instead of being silently left out of it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tomllib
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import json_lines, stop_process, wait_for
from tests.kernel import remove_cgroup
from tests.world import toml_value

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
IMAGE = os.environ.get("CREDLESS_IMAGE", "localhost/credless:dev")
# crun refuses this VM's hybrid cgroup layout; runc runs on both layouts. podman's default
# nproc limit is more than some hosts let a container set.
PODMAN = ("podman", "--runtime", "runc")
LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
# Logs kept in the container's own directory, so they go when it is removed (journald may
# not run on a test host).
LOGS = ("--log-driver", "k8s-file")

_PROPAGATION = {"HostToContainer": "rslave", "Bidirectional": "rshared", "None": "rprivate"}
# The pod and container settings translated below, and those that do not change how the
# container runs on one node (scheduling, the API server's view, the kubelet's probes and
# port bookkeeping; the test asks the startupProbe's path itself). Any other fails the test.
_POD_KEYS = frozenset(
    {"hostPID", "hostNetwork", "containers", "volumes", "terminationGracePeriodSeconds"}
    | {"serviceAccountName", "priorityClassName", "dnsPolicy", "tolerations"}
)
_CONTAINER_KEYS = frozenset(
    {"name", "image", "command", "args", "env", "securityContext", "resources", "volumeMounts"}
    | {"ports", "startupProbe", "livenessProbe", "readinessProbe"}
)


def build_image() -> tuple[str, str]:
    """The image of the current source: deploy/k8s/build-image.sh, offline (the base image,
    wheelhouse and apt layer `make image` cached; tests reach only loopback), which rebuilds
    only what the source changed; the image's name and the script's step timings."""
    r = subprocess.run(
        ["bash", str(K8S / "build-image.sh")],
        env={**os.environ, "CREDLESS_IMAGE": IMAGE, "CREDLESS_BUILD_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if r.returncode != 0:
        raise RuntimeError(f"build-image.sh failed ({r.returncode}): {r.stderr[-3000:]}")
    return IMAGE, r.stderr


def load_yaml(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def field_ref_values() -> dict[str, str]:
    """What the kubelet puts in the downward-API fields the manifest uses, on this host."""
    return {"status.hostIP": "127.0.0.1", "spec.nodeName": socket.gethostname()}


def pod_run_args(manifest: dict, sources: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(podman run options, container args) for the DaemonSet's one container. sources:
    the host directory for each volume the test provides itself (the ConfigMap, the
    emptyDir, and the DirectoryOrCreate hostPaths, which on this host are not the test's to
    create or write: /run/credless, /var/lib/credless)."""
    spec = manifest["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    _known("the pod", spec, _POD_KEYS)
    _known("the container", c, _CONTAINER_KEYS)
    opts: list[str] = []
    for key, flag in {"hostPID": "--pid=host", "hostNetwork": "--network=host"}.items():
        if spec.get(key):
            opts.append(flag)
    sc = dict(c.get("securityContext", {}))
    if sc.pop("privileged", False):
        # containerd and CRI-O keep a privileged container in the host's cgroup namespace
        # (daemonset.yaml says why the agent needs that); podman's own default differs
        # between cgroup layouts, so it is said explicitly
        opts += ["--privileged", "--cgroupns=host"]
    if sc.pop("readOnlyRootFilesystem", False):
        # only the manifest's volumes are writable: no tmpfs podman would add on its own
        opts += ["--read-only", "--read-only-tmpfs=false"]
    caps = sc.pop("capabilities", {})
    opts += [f"--cap-add={cap}" for cap in caps.get("add", [])]
    opts += [f"--cap-drop={cap}" for cap in caps.get("drop", [])]
    if sc:
        raise ValueError(f"securityContext keys the test cannot reproduce yet: {sorted(sc)}")
    fields = field_ref_values()
    for env in c.get("env", []):
        if "value" in env:
            opts += ["--env", f"{env['name']}={env['value']}"]
        elif (path := env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")) in fields:
            opts += ["--env", f"{env['name']}={fields[path]}"]
        else:
            raise ValueError(f"env {env['name']}: a source the test cannot reproduce")
    if memory := c.get("resources", {}).get("limits", {}).get("memory"):
        opts.append(f"--memory={_quantity(memory)}")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        if "subPath" in m or "subPathExpr" in m:
            raise ValueError(f"volumeMount {m['name']}: subPath is not reproduced")
        source = _volume_source(volumes[m["name"]], sources)
        mode = [
            "ro" if m.get("readOnly") else "rw",
            _PROPAGATION[m.get("mountPropagation", "None")],
        ]
        opts += ["--volume", f"{source}:{m['mountPath']}:{','.join(mode)}"]
    return opts, [*c.get("command", []), *c.get("args", [])]


def _known(what: str, settings: dict, known: frozenset[str]) -> None:
    if unknown := set(settings) - known:
        raise ValueError(
            f"{what} sets {sorted(unknown)}: teach tests/container/podman.py to run it, or "
            "say there why it does not change how the container runs"
        )


def _volume_source(volume: dict, sources: dict[str, Path]) -> str:
    name = volume["name"]
    if name in sources:
        return str(sources[name])
    host = volume.get("hostPath")
    if host is not None and host.get("type") == "Directory":
        if not Path(host["path"]).is_dir():  # as the kubelet would refuse to start the pod
            raise FileNotFoundError(f"hostPath {host['path']} (type Directory) is missing")
        return str(host["path"])
    raise ValueError(f"volume {name}: {sorted(volume)} needs a source from the test")


def _quantity(q: str) -> str:
    """A Kubernetes memory quantity (Mi, Gi) as podman's (m, g)."""
    for suffix, unit in (("Ki", "k"), ("Mi", "m"), ("Gi", "g")):
        if q.endswith(suffix):
            return q[: -len(suffix)] + unit
    return q


def _toml(table: dict[str, Any], prefix: str = "") -> str:
    """Nested tables of scalars and lists as TOML (the ConfigMap's config is that)."""
    scalars = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    out = (f"[{prefix}]\n" if prefix and scalars else "") + "".join(s + "\n" for s in scalars)
    for k, v in table.items():
        if isinstance(v, dict):
            out += _toml(v, f"{prefix}.{k}" if prefix else k)
    return out


def daemonset_config(
    *,
    proxy_port: int,
    managed_cgroup: str,
    bundle_port: int,
    metrics_port: int,
    pin_name: str,
    servers: str,
) -> str:
    """The ConfigMap's credless.toml as shipped, with what this host and test need instead:
    loopback ports nobody else uses, a pin directory of its own, no kubelet (there is no
    cluster), the test's managed cgroup and MCP servers."""
    configmap = load_yaml("configmap.yaml")
    cfg = tomllib.loads(configmap["data"]["credless.toml"])
    cfg["agent"]["bpf_pin_dir"] = f"/sys/fs/bpf/{pin_name}"
    cfg["metrics"]["listen"] = f"127.0.0.1:{metrics_port}"
    cfg["attest"]["kubelet"] = {"enabled": False}
    cfg["bundle_endpoint"] = {"listen": f"127.0.0.1:{bundle_port}"}
    cfg["inject"] = {
        "listen_port": proxy_port,
        "listen_port6": proxy_port,
        "managed_cgroups": [managed_cgroup],
    }
    return _toml(cfg) + servers


class Podman:
    """Containers made through it are removed by remove_all(), whatever state they are in."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def cmd(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        r = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"podman {args[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
        return r

    def create(self, image: str, name: str, *options: str, args: list[str]) -> str:
        """A created, not yet started, container; its full (64 hex) id."""
        self.names.append(name)
        r = self.cmd("create", "--name", name, *LIMITS, *LOGS, *options, image, *args)
        return r.stdout.strip().splitlines()[-1]

    def start_attached(self, name: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cmd("start", "--attach", name, check=False, timeout=timeout)

    def inspect(self, name: str) -> dict:
        return json.loads(self.cmd("inspect", name).stdout)[0]

    def exists(self, name: str) -> bool:
        return self.cmd("container", "exists", name, check=False).returncode == 0

    def remove_all(self) -> None:
        for name in self.names:
            self.cmd("rm", "--force", "--time", "0", "--ignore", name, check=False)


def remove_cgroup_everywhere(name: str) -> None:
    """The cgroup `/name` and everything below it, in every hierarchy mounted (v2, and the v1
    controllers podman's cgroupfs manager also creates it in), processes killed first."""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mountpoint, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2") and (path := Path(mountpoint) / name).is_dir():
            remove_cgroup(path)


def leftovers(names: list[str], cgroup: str, pin_dir: Path) -> list[str]:
    """What a finished test must not leave: its containers, cgroups, BPF pins."""
    out = [f"container {n}" for n in names if Podman().exists(n)]
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mountpoint, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2") and (Path(mountpoint) / cgroup).exists():
            out.append(f"cgroup {mountpoint}/{cgroup}")
    if pin_dir.exists():
        out.append(f"pin directory {pin_dir}")
    return out


class AgentContainer:
    """`credless run` from the image, as the DaemonSet runs it; stopped (SIGTERM, as the
    kubelet stops a pod) and removed on exit, its pins removed if it left any."""

    def __init__(self, podman: Podman, image: str, tmp: Path, config: str, files: dict[str, str]):
        manifest = load_yaml("daemonset.yaml")
        self.manifest = manifest
        self.podman = podman
        self.name = f"credless-test-agent-{uuid.uuid4().hex[:8]}"
        cfg = tomllib.loads(config)
        self.pin_dir = Path(cfg["agent"]["bpf_pin_dir"])
        self.metrics_port = int(cfg["metrics"]["listen"].rsplit(":", 1)[1])
        probe = manifest["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        self.probe_path = probe["httpGet"]["path"]
        sources = {v: tmp / f"volume-{v}" for v in ("config", "run", "state", "tmp")}
        for d in sources.values():
            d.mkdir()
        (sources["config"] / "credless.toml").write_text(config)
        for fname, text in files.items():
            (sources["config"] / fname).write_text(text)
        opts, args = pod_run_args(manifest, sources)
        self.run_options = opts
        self.stdout_path, self.stderr_path = tmp / "agent.stdout", tmp / "agent.stderr"
        podman.names.append(self.name)
        self.proc = subprocess.Popen(
            [*PODMAN, "run", "--rm", "--name", self.name, *LIMITS, *LOGS, *opts, image, *args],
            stdout=open(self.stdout_path, "wb"),
            stderr=open(self.stderr_path, "wb"),
        )

    def log_events(self) -> list[dict]:
        return json_lines(self.stderr_path)

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Until the agent logs "ready" (BCC compiles the programs at start, as in a pod)."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"agent container exited {self.proc.returncode}: "
                    f"{self.stderr_path.read_text()[-3000:]}"
                )
            return any(e.get("event") == "ready" for e in self.log_events())

        wait_for(ready, timeout, interval=0.2, what="the agent container ready")

    def cgroup(self) -> str:
        """The agent process's cgroup v2 path, as the host's /proc says."""
        pid = self.podman.inspect(self.name)["State"]["Pid"]
        text = Path(f"/proc/{pid}/cgroup").read_text()
        return next(ln[3:] for ln in text.splitlines() if ln.startswith("0::"))

    def __enter__(self) -> AgentContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        # the kubelet's stop: SIGTERM, then SIGKILL after the grace period
        grace = self.manifest["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        self.podman.cmd("stop", "--time", str(grace), "--ignore", self.name, check=False)
        stop_process(self.proc, grace)
        self.podman.cmd("rm", "--force", "--time", "0", "--ignore", self.name, check=False)
        if self.pin_dir.is_dir():  # what a killed agent may leave in the host's bpffs
            for f in self.pin_dir.glob("*"):
                f.unlink()
            self.pin_dir.rmdir()
