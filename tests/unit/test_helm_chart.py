"""The helm chart, rendered by Helm's own engine (helm-python-sdk binds Helm v4's library):
it lints clean in strict mode, every manifest validates against the Kubernetes schemas,
the values schema refuses bad values, and the wiring between values and pods holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from compressor_svc import __main__ as compressor_main
from compressor_svc.config import CompressorConfig
from store_svc import __main__ as store_main
from store_svc.config import ServerSideEncryption, SseMode, StoreConfig
from store_svc.limits import Limits
from store_svc.serving import limits_from_args
from store_svc.signatures import Signer, TrustedKeys, generate_key_pair

CHART = Path(__file__).resolve().parents[2] / "helm" / "deltavault"
SCENARIOS = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "dv", "ml"
CUSTOM_RESOURCES = {"monitoring.coreos.com/v1"}
"""API groups the Kubernetes schemas do not cover (the Prometheus Operator's CRDs)."""


def _values(scenario: Path | None) -> dict[str, Any]:
    loaded: dict[str, Any] = {} if scenario is None else yaml.safe_load(scenario.read_text())
    return loaded


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every manifest the chart renders for ``values`` (NOTES.txt aside)."""
    chart = helm_python.Chart.load(str(CHART))
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(files.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def _find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def _container(manifests: list[dict[str, Any]], component: str) -> dict[str, Any]:
    deployment = _find(manifests, "Deployment", f"{RELEASE}-deltavault-{component}")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _scenario_ids() -> Iterator[Any]:
    yield pytest.param(None, id="defaults")
    for path in SCENARIOS:
        yield pytest.param(path, id=path.stem)


@pytest.mark.parametrize("scenario", list(_scenario_ids()))
def test_chart_lints_and_renders_valid_manifests(scenario: Path | None) -> None:
    values = _values(scenario)
    chart = helm_python.Chart.load(str(CHART))
    chart.validate_schema(values)
    report = helm_python.lint(
        str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == []
    assert all(m["severity"] <= 1 for m in report["messages"]), report["messages"]
    manifests = render(values)
    assert manifests
    for manifest in manifests:
        if manifest["apiVersion"] in CUSTOM_RESOURCES:
            continue
        kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    "bad",
    [
        {"store": {"port": "grpc"}},
        {"store": {"replicas": 2}},
        {"compressor": {"gpu": {"enabled": "yes"}}},
        {"minio": {"enabled": False}},
        {"s3": {"bucket": "Not_A_Bucket"}},
        {"s3": {"endpoint": "https://s3.example.com"}},
        {"tls": {"enabled": True}},
        {"auth": {"enabled": True}},
        {"store": {"encryption": {"mode": "kms"}}},
        {
            "store": {"encryption": {"mode": "c"}},
            "minio": {"enabled": False},
            "s3": {
                "endpoint": "s3.example.com:443",
                "existingSecret": "deltavault-s3",
                "tls": {"enabled": True},
            },
        },
        {
            "store": {"encryption": {"mode": "c", "existingSecret": "deltavault-sse"}},
            "minio": {"enabled": False},
            "s3": {"endpoint": "s3.example.com:443", "existingSecret": "deltavault-s3"},
        },
        {
            "store": {"encryption": {"mode": "c", "existingSecret": "deltavault-sse"}},
            "s3": {"tls": {"enabled": True}},
        },
        {"store": {"encryption": {"mode": "s3"}}},
        {"store": {"signatures": {"require": "true"}}},
        {"store": {"signatures": {"trustedKeys": "deltavault-trusted-keys"}}},
        {"store": {"signatures": {"trustedKeys": {"existingConfigMap": ["a", "b"]}}}},
        {"store": {"signatures": {"trustedKeys": {"existingConfigMap": "Trusted_Keys"}}}},
        {"store": {"signatures": {"trusted": True}}},
        {"compressor": {"signing": {"existingSecret": True}}},
        {"compressor": {"signing": {"existingSecretKey": "keys/ci.key"}}},
        {"compressor": {"signing": {"existingSecretKey": ""}}},
        {"compressor": {"signing": "deltavault-signing"}},
        {"unknown": True},
    ],
    ids=[
        "port-type",
        "two-stores",
        "gpu-flag",
        "no-endpoint",
        "bucket",
        "scheme",
        "tls-without-secret",
        "auth-without-secret",
        "sse-mode",
        "sse-c-without-secret",
        "sse-c-without-https",
        "sse-c-on-bundled-minio",
        "sse-s3-on-bundled-minio",
        "require-signatures-type",
        "trusted-keys-type",
        "trusted-keys-configmap-type",
        "trusted-keys-configmap-name",
        "signatures-unknown-key",
        "signing-secret-type",
        "signing-key-path",
        "signing-key-empty",
        "signing-type",
        "unknown",
    ],
)
def test_values_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmError):
        helm_python.Chart.load(str(CHART)).validate_schema(bad)


def test_probes_use_the_grpc_health_service() -> None:
    manifests = render({})
    for component, port in (("store", 50061), ("compressor", 50062)):
        container = _container(manifests, component)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (component, probe)
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == port


def test_store_environment_follows_the_values() -> None:
    values = _values(CHART / "ci" / "external-s3.yaml")
    env = _env(_container(render(values), "store"))
    s3 = values["s3"]
    assert env["DELTAVAULT_STORE_BACKEND"] == "s3"
    assert env["DELTAVAULT_STORE_ENDPOINT"] == s3["endpoint"]
    assert env["DELTAVAULT_STORE_BUCKET"] == s3["bucket"]
    assert env["DELTAVAULT_STORE_REGION"] == s3["region"]
    assert env["DELTAVAULT_STORE_PREFIX"] == s3["prefix"]
    assert env["DELTAVAULT_STORE_NO_CREATE_BUCKET"] == "true"
    assert env["DELTAVAULT_STORE_HOST"] == "0.0.0.0"
    for variable, key in (
        ("DELTAVAULT_STORE_ACCESS_KEY", s3["accessKeyKey"]),
        ("DELTAVAULT_STORE_SECRET_KEY", s3["secretKeyKey"]),
    ):
        assert env[variable] == {"secretKeyRef": {"name": s3["existingSecret"], "key": key}}


def test_admission_limits_follow_the_values_and_parse_as_the_services_flags() -> None:
    limits = {
        "maxStreams": 64,
        "maxStreamsPerClient": 8,
        "maxStreamBytes": 8 << 30,  # above 2**32: rendered as an integer, not 8.589934592e+09
        "maxStreamBytesPerClient": 1 << 30,
    }
    manifests = render({"store": {"limits": limits}, "compressor": {"limits": limits}})
    expected = Limits(64, 8, 8 << 30, 1 << 30)
    for component, main in (("store", store_main), ("compressor", compressor_main)):
        env = _env(_container(manifests, component))
        prefix = f"DELTAVAULT_{component.upper()}_"
        assert env[f"{prefix}MAX_STREAM_BYTES"] == str(8 << 30)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                if name.startswith(prefix + "MAX_STREAM"):
                    patch.setenv(name, value)
            args = main.build_parser().parse_args([])
        assert limits_from_args(args) == expected


def test_bundled_minio_credentials_are_referenced_not_inlined() -> None:
    manifests = render({})
    secret_name = f"{RELEASE}-deltavault-minio"
    secret = _find(manifests, "Secret", secret_name)
    env = _env(_container(manifests, "store"))
    assert env["DELTAVAULT_STORE_ENDPOINT"] == f"{secret_name}:9000"
    assert env["DELTAVAULT_STORE_ACCESS_KEY"] == {
        "secretKeyRef": {"name": secret_name, "key": "root-user"}
    }
    inlined = set(secret["data"].values())
    for manifest in manifests:
        if manifest["kind"] != "Secret":
            assert not inlined & set(_strings(manifest)), manifest["kind"]


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def test_compressor_finds_the_store_and_its_gpu() -> None:
    manifests = render(_values(CHART / "ci" / "gpu-compressor.yaml"))
    container = _container(manifests, "compressor")
    env = _env(container)
    assert env["DELTAVAULT_COMPRESSOR_STORE"] == f"{RELEASE}-deltavault-store:50061"
    assert env["DELTAVAULT_COMPRESSOR_DEVICE"] == "cuda"
    assert container["image"].endswith("-cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = _find(manifests, "Deployment", f"{RELEASE}-deltavault-compressor")["spec"]
    assert pod["replicas"] == 2
    assert pod["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert not [m for m in manifests if m["kind"] == "HorizontalPodAutoscaler"]
    headless = _find(manifests, "Service", f"{RELEASE}-deltavault-compressor-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"]["app.kubernetes.io/component"] == "compressor"


def test_s3_tls_trusts_the_ca_from_its_secret() -> None:
    manifests = render(_values(CHART / "ci" / "s3-tls.yaml"))
    container = _container(manifests, "store")
    env = _env(container)
    assert env["DELTAVAULT_STORE_SECURE"] == "true"
    assert env["SSL_CERT_FILE"] == "/etc/deltavault/s3-ca/ca.crt"
    volumes = _find(manifests, "Deployment", f"{RELEASE}-deltavault-store")["spec"]["template"][
        "spec"
    ]["volumes"]
    assert {"name": "s3-ca", "secret": {"secretName": "internal-ca"}} in volumes


def _store_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = _find(manifests, "Deployment", f"{RELEASE}-deltavault-store")["spec"][
        "template"
    ]["spec"]
    return pod


def test_sse_c_mounts_only_the_key_read_only_and_passes_its_flags() -> None:
    manifests = render(_values(CHART / "ci" / "sse-c.yaml"))
    container = _container(manifests, "store")
    env = _env(container)
    assert env["DELTAVAULT_STORE_SSE"] == "c"
    key_file = Path(env["DELTAVAULT_STORE_SSE_KEY_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "sse-key"]
    assert mount["readOnly"] is True
    assert key_file.parent == Path(mount["mountPath"])
    (volume,) = [v for v in _store_pod(manifests)["volumes"] if v["name"] == "sse-key"]
    assert volume["secret"] == {
        "secretName": "deltavault-sse",
        "defaultMode": 0o440,
        "items": [{"key": "store.key", "path": key_file.name}],
    }
    # The key goes to the store alone, never to the compressor.
    assert not [
        v
        for v in _container(manifests, "compressor").get("volumeMounts", [])
        if v["name"] == "sse-key"
    ]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if isinstance(value, str) and name.startswith("DELTAVAULT_STORE_SSE"):
                patch.setenv(name, value)
        args = store_main.build_parser().parse_args(["--root", "unused"])
    assert ServerSideEncryption(SseMode(args.sse), args.sse_key_file) == ServerSideEncryption(
        SseMode.C, key_file
    )


@pytest.mark.parametrize("mode", ["none", "s3"])
def test_sse_without_a_customer_key_mounts_nothing(mode: str) -> None:
    values = _values(CHART / "ci" / "external-s3.yaml")
    values["store"] = {"encryption": {"mode": mode}}
    helm_python.Chart.load(str(CHART)).validate_schema(values)
    manifests = render(values)
    env = _env(_container(manifests, "store"))
    assert env["DELTAVAULT_STORE_SSE"] == mode
    assert "DELTAVAULT_STORE_SSE_KEY_FILE" not in env
    assert "sse-key" not in {v["name"] for v in _store_pod(manifests)["volumes"]}


def _pod(manifests: list[dict[str, Any]], component: str) -> dict[str, Any]:
    deployment = _find(manifests, "Deployment", f"{RELEASE}-deltavault-{component}")
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _volume(manifests: list[dict[str, Any]], component: str, name: str) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = _pod(manifests, component)["volumes"]
    (volume,) = [v for v in volumes if v["name"] == name]
    return volume


def _mount(manifests: list[dict[str, Any]], component: str, name: str) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = _container(manifests, component).get("volumeMounts", [])
    (mount,) = [m for m in mounts if m["name"] == name]
    return mount


def _parse(main: Any, prefix: str, env: dict[str, Any], argv: list[str]) -> Any:
    """The service's flags as its parser reads them from the container's plain env."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if isinstance(value, str) and name.startswith(prefix):
                patch.setenv(name, value)
        return main.build_parser().parse_args(argv)


SIGNING_VARIABLES = {
    "DELTAVAULT_COMPRESSOR_SIGNING_KEY",
    "DELTAVAULT_STORE_TRUSTED_KEYS",
    "DELTAVAULT_STORE_REQUIRE_SIGNATURES",
}


def test_signing_mounts_the_keys_read_only_and_passes_their_flags(tmp_path: Path) -> None:
    manifests = render(_values(CHART / "ci" / "signed.yaml"))

    # The compressor: only the private key of the Secret, read-only, as --signing-key.
    compressor_env = _env(_container(manifests, "compressor"))
    key_file = Path(compressor_env["DELTAVAULT_COMPRESSOR_SIGNING_KEY"])
    mount = _mount(manifests, "compressor", "signing-key")
    assert mount["readOnly"] is True
    assert key_file.parent == Path(mount["mountPath"])
    assert _volume(manifests, "compressor", "signing-key")["secret"] == {
        "secretName": "deltavault-signing",
        "defaultMode": 0o440,
        "items": [{"key": "ci.key", "path": key_file.name}],
    }
    args = _parse(compressor_main, "DELTAVAULT_COMPRESSOR_", compressor_env, [])
    assert args.signing_key == key_file

    # The store: the whole ConfigMap of public keys, read-only, as --trusted-keys.
    store_env = _env(_container(manifests, "store"))
    folder = Path(store_env["DELTAVAULT_STORE_TRUSTED_KEYS"])
    mount = _mount(manifests, "store", "trusted-keys")
    assert mount["readOnly"] is True
    assert Path(mount["mountPath"]) == folder
    assert _volume(manifests, "store", "trusted-keys")["configMap"] == {
        "name": "deltavault-trusted-keys"
    }
    assert store_env["DELTAVAULT_STORE_REQUIRE_SIGNATURES"] == "true"
    args = _parse(store_main, "DELTAVAULT_STORE_", store_env, ["--root", "unused"])
    assert args.trusted_keys == folder
    assert args.require_signatures is True

    # Lay the files out as the kubelet would (a Secret item at its path, a ConfigMap item
    # `kubectl create configmap --from-file=keys/ci.pub` made at ci.pub): the compressor's
    # key loads and the store trusts its signer.
    private, public, signer_id = generate_key_pair(tmp_path / "keys", "ci")
    mounted_key = tmp_path / key_file.relative_to("/")
    mounted_key.parent.mkdir(parents=True)
    mounted_key.write_bytes(private.read_bytes())
    mounted_folder = tmp_path / folder.relative_to("/")
    mounted_folder.mkdir(parents=True)
    (mounted_folder / public.name).write_bytes(public.read_bytes())
    assert Signer.from_file(mounted_key).key_id == signer_id
    assert signer_id in TrustedKeys.load(mounted_folder)

    # Each key goes to its own service only.
    assert "trusted-keys" not in {v["name"] for v in _pod(manifests, "compressor")["volumes"]}
    assert "signing-key" not in {v["name"] for v in _pod(manifests, "store")["volumes"]}
    assert "DELTAVAULT_STORE_TRUSTED_KEYS" not in compressor_env
    assert "DELTAVAULT_COMPRESSOR_SIGNING_KEY" not in store_env


def test_signing_is_off_by_default() -> None:
    manifests = render({})
    for component in ("store", "compressor"):
        container = _container(manifests, component)
        assert not SIGNING_VARIABLES & set(_env(container)), component
        names = {m["name"] for m in container["volumeMounts"]}
        names |= {v["name"] for v in _pod(manifests, component)["volumes"]}
        assert not {"signing-key", "trusted-keys"} & names, component
    args = _parse(store_main, "DELTAVAULT_STORE_", _env(_container(manifests, "store")), [])
    assert args.trusted_keys is None
    assert args.require_signatures is False


def test_require_signatures_without_trusted_keys_accepts_any_signer() -> None:
    values = {"store": {"signatures": {"require": True}}}
    helm_python.Chart.load(str(CHART)).validate_schema(values)
    manifests = render(values)
    env = _env(_container(manifests, "store"))
    assert env["DELTAVAULT_STORE_REQUIRE_SIGNATURES"] == "true"
    assert "DELTAVAULT_STORE_TRUSTED_KEYS" not in env
    assert "trusted-keys" not in {v["name"] for v in _pod(manifests, "store")["volumes"]}
    args = _parse(store_main, "DELTAVAULT_STORE_", env, [])
    assert (args.trusted_keys, args.require_signatures) == (None, True)


def test_trusted_keys_without_require_refuses_only_other_signers() -> None:
    values = {"store": {"signatures": {"trustedKeys": {"existingConfigMap": "team-keys"}}}}
    manifests = render(values)
    env = _env(_container(manifests, "store"))
    assert (
        env["DELTAVAULT_STORE_TRUSTED_KEYS"]
        == _mount(manifests, "store", "trusted-keys")["mountPath"]
    )
    assert "DELTAVAULT_STORE_REQUIRE_SIGNATURES" not in env
    assert _volume(manifests, "store", "trusted-keys")["configMap"] == {"name": "team-keys"}
    assert _parse(store_main, "DELTAVAULT_STORE_", env, []).require_signatures is False


def test_signing_key_defaults_to_signing_key_of_the_secret() -> None:
    manifests = render({"compressor": {"signing": {"existingSecret": "ci-signing"}}})
    env = _env(_container(manifests, "compressor"))
    assert env["DELTAVAULT_COMPRESSOR_SIGNING_KEY"] == "/etc/deltavault/signing/signing.key"
    assert _volume(manifests, "compressor", "signing-key")["secret"]["items"] == [
        {"key": "signing.key", "path": "signing.key"}
    ]
    # Signing alone asks nothing of the store.
    assert not SIGNING_VARIABLES & set(_env(_container(manifests, "store")))


def test_tls_serves_the_secrets_files_and_probes_the_health_port() -> None:
    manifests = render(_values(CHART / "ci" / "tls.yaml"))
    for component, prefix, health_port in (
        ("store", "STORE", 50063),
        ("compressor", "COMPRESSOR", 50064),
    ):
        container = _container(manifests, component)
        env = _env(container)
        assert env[f"DELTAVAULT_{prefix}_TLS_CERT"] == "/etc/deltavault/tls/tls.crt"
        assert env[f"DELTAVAULT_{prefix}_TLS_KEY"] == "/etc/deltavault/tls/tls.key"
        assert env[f"DELTAVAULT_{prefix}_TLS_CLIENT_CA"] == "/etc/deltavault/tls/ca.crt"
        assert env[f"DELTAVAULT_{prefix}_HEALTH_PORT"] == str(health_port)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": health_port}
        pod = _find(manifests, "Deployment", f"{RELEASE}-deltavault-{component}")["spec"]
        volumes = pod["template"]["spec"]["volumes"]
        assert {"name": "tls", "secret": {"secretName": "deltavault-tls"}} in volumes
    # The compressor presents the same certificate to the store (mutual TLS).
    client_env = _env(_container(manifests, "compressor"))
    assert client_env["DELTAVAULT_TLS_CA"] == "/etc/deltavault/tls/ca.crt"
    assert client_env["DELTAVAULT_TLS_CERT"] == "/etc/deltavault/tls/tls.crt"
    assert "DELTAVAULT_TLS_CA" not in _env(_container(render({}), "compressor"))


def test_auth_mounts_the_tokens_and_only_the_compressor_holds_its_token() -> None:
    manifests = render(_values(CHART / "ci" / "auth.yaml"))
    for component, prefix in (("store", "STORE"), ("compressor", "COMPRESSOR")):
        env = _env(_container(manifests, component))
        assert env[f"DELTAVAULT_{prefix}_AUTH_TOKENS"] == "/etc/deltavault/auth/tokens.json"
        pod = _find(manifests, "Deployment", f"{RELEASE}-deltavault-{component}")["spec"]
        (auth,) = [v for v in pod["template"]["spec"]["volumes"] if v["name"] == "auth"]
        assert auth["secret"]["secretName"] == "deltavault-auth"
        keys = {item["key"] for item in auth["secret"]["items"]}
        assert keys == (
            {"tokens.json", "compressor-token"} if component == "compressor" else {"tokens.json"}
        )
    compressor_env = _env(_container(manifests, "compressor"))
    assert compressor_env["DELTAVAULT_TOKEN_FILE"] == "/etc/deltavault/auth/compressor-token"
    assert "DELTAVAULT_TOKEN_FILE" not in _env(_container(manifests, "store"))


def test_monitoring_swaps_annotations_for_a_service_monitor() -> None:
    plain = render({})
    assert (
        _find(plain, "Deployment", f"{RELEASE}-deltavault-store")["spec"]["template"]["metadata"][
            "annotations"
        ]["prometheus.io/port"]
        == "9461"
    )
    monitored = render(_values(CHART / "ci" / "monitoring.yaml"))
    monitor = _find(monitored, "ServiceMonitor", f"{RELEASE}-deltavault")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    template = _find(monitored, "Deployment", f"{RELEASE}-deltavault-store")["spec"]["template"]
    assert "annotations" not in template["metadata"]
    service = _find(monitored, "Service", f"{RELEASE}-deltavault-store")
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}


def test_pods_run_locked_down() -> None:
    for manifest in render({}):
        if manifest["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = manifest["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "limits" in container["resources"]


def test_chart_defaults_match_the_services() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    store, compressor = StoreConfig.__dataclass_fields__, CompressorConfig.__dataclass_fields__
    assert values["store"]["port"] == store["port"].default
    assert values["store"]["metricsPort"] == store["metrics_port"].default
    assert values["compressor"]["port"] == compressor["port"].default
    assert values["compressor"]["metricsPort"] == compressor["metrics_port"].default


@pytest.mark.parametrize("scenario", list(_scenario_ids()))
def test_every_variable_the_chart_sets_is_a_flag_of_its_service(scenario: Path | None) -> None:
    parsers = {"store": store_main.build_parser(), "compressor": compressor_main.build_parser()}
    manifests = render(_values(scenario))
    for component, parser in parsers.items():
        flags = {action.dest for action in parser._actions}
        prefix = f"DELTAVAULT_{component.upper()}_"
        for variable in _env(_container(manifests, component)):
            if variable.startswith(prefix):
                assert variable.removeprefix(prefix).lower() in flags, (component, variable)


def test_notes_tell_how_to_reach_the_services() -> None:
    chart = helm_python.Chart.load(str(CHART))
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)[
        "deltavault/templates/NOTES.txt"
    ]
    assert f"port-forward svc/{RELEASE}-deltavault-store 50061:50061" in notes
    assert "export DELTAVAULT_STORE=localhost:50061" in notes
    assert "deltavault ls" in notes
