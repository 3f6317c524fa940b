"""The deployment files under cluster/ and the Dockerfile, checked without a cloud or Docker.

- `ray up` configs go through Ray's own cluster-config preparation and validation.
- Kubernetes manifests are validated against vendored schemas (tests/schemas/): the
  core Kubernetes kinds from kubernetes-validate, KubeRay's RayCluster/RayJob from its
  v1.7.0 CRD field reference. No network at test time.
- Versions may not drift: Ray, Python and MLflow agree across the Dockerfile,
  cluster/constraints.txt and every image and rayVersion under cluster/.
- The image installs with the same script as the Makefile (and so CI).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RAY_UP_CONFIGS = ("aws.yaml", "gcp.yaml")
MLFLOW_URI_IN_CLUSTER = "http://mlflow.grokstudy.svc.cluster.local:5000"


# ---- helpers -----------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    """cluster/constraints.txt as {lowercase name: version}."""
    pins = {}
    for line in (CLUSTER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    steps, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        op, _, args = line.partition(" ")
        steps.append((op.upper(), args.strip()))
    return steps


def _k8s_docs() -> list[tuple[str, dict]]:
    return [
        (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in sorted((CLUSTER / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _schema_validator(api_version: str, kind: str) -> Draft202012Validator:
    core = json.loads((SCHEMAS / "k8s-v1.33-defs.json").read_text())
    kuberay = json.loads((SCHEMAS / "kuberay-v1.7.0.json").read_text())
    registry = Registry().with_resources([(s["$id"], Resource.from_contents(s)) for s in (core, kuberay)])
    roots = {
        ("ray.io/v1", "RayCluster"): f"{kuberay['$id']}#/$defs/RayCluster",
        ("ray.io/v1", "RayJob"): f"{kuberay['$id']}#/$defs/RayJob",
        ("apps/v1", "Deployment"): f"{core['$id']}#/$defs/io.k8s.api.apps.v1.Deployment",
        ("apps/v1", "StatefulSet"): f"{core['$id']}#/$defs/io.k8s.api.apps.v1.StatefulSet",
        ("v1", "Service"): f"{core['$id']}#/$defs/io.k8s.api.core.v1.Service",
        ("v1", "Secret"): f"{core['$id']}#/$defs/io.k8s.api.core.v1.Secret",
    }
    assert (api_version, kind) in roots, f"no vendored schema for {api_version} {kind}"
    return Draft202012Validator({"$ref": roots[api_version, kind]}, registry=registry)


def _schema_errors(doc: dict) -> list[str]:
    validator = _schema_validator(doc["apiVersion"], doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _doc(kind: str, name: str) -> dict:
    return next(d for label, d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _ray_up(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# ---- ray up ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_ray_up_configs_pass_rays_own_cluster_config_validation(name):
    # Checked against ray 2.60.0: `ray up` calls these (commands._bootstrap_config) before it
    # talks to the cloud: merge the provider defaults, then validate against
    # ray/autoscaler/ray-schema.json plus Ray's cross-field rules.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(_ray_up(name))))


def test_a_misspelled_key_in_a_ray_up_config_is_rejected():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _ray_up("aws.yaml")
    config["available_node_types"]["gpu_1x"]["min_worker"] = 1
    with pytest.raises(ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_ray_up_configs_keep_trials_off_the_head_and_autoscale_gpu_workers(name):
    config = _ray_up(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--num-gpus=0" in start
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers, "no worker node types"
    for worker in workers.values():
        assert worker["resources"]["GPU"] >= 1
        assert worker["min_workers"] == 0 < worker["max_workers"]


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_ray_up_configs_turn_token_auth_on_and_ship_the_token_from_a_file(name):
    config = _ray_up(name)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        ray_start = [c for c in commands if "ray start" in c]
        assert ray_start and all("RAY_AUTH_MODE=token" in c for c in ray_start)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    # A token is 64 hex digits (secrets.token_hex(32)); none may be written in the file.
    assert not re.search(r"\b[0-9a-f]{64}\b", (CLUSTER / name).read_text())


# ---- Kubernetes --------------------------------------------------------------------------


@pytest.mark.parametrize("label,doc", _k8s_docs(), ids=[label for label, _ in _k8s_docs()])
def test_kubernetes_manifests_validate_against_the_kuberay_and_core_schemas(label, doc):
    assert _schema_errors(doc) == []


def test_the_vendored_schemas_reject_misspelled_and_invalid_fields():
    cluster = copy.deepcopy(_doc("RayCluster", "grokstudy"))
    cluster["spec"]["authOptions"]["mode"] = "tokens"
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = _schema_errors(cluster)
    assert any("'tokens' is not one of" in e for e in errors)
    assert any("'resource' was unexpected" in e for e in errors)

    deployment = copy.deepcopy(_doc("Deployment", "mlflow"))
    deployment["spec"]["replica"] = 2
    assert any("'replica' was unexpected" in e for e in _schema_errors(deployment))


def test_raycluster_has_token_auth_a_cpu_only_head_and_a_gpu_group_that_tolerates_gpu_nodes():
    spec = _doc("RayCluster", "grokstudy")["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    for container in _containers(head["template"]):
        for amounts in container.get("resources", {}).values():
            assert "nvidia.com/gpu" not in amounts
    [gpu] = spec["workerGroupSpecs"]
    [worker] = _containers(gpu["template"])
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    tolerations = gpu["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"] and spec["enableInTreeAutoscaling"] is True
    for container in (*_containers(head["template"]), worker):
        assert _env(container)["MLFLOW_TRACKING_URI"]["value"] == MLFLOW_URI_IN_CLUSTER


def test_rayjob_runs_a_shipped_study_on_the_raycluster_with_mlflow_in_its_runtime_env():
    job = _doc("RayJob", "grokstudy-quickstart")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": _doc("RayCluster", "grokstudy")["metadata"]["name"]}
    argv = job["entrypoint"].split()
    assert argv[:2] == ["grokstudy", "run"]
    # The image copies studies/ to /home/ray/grokstudy/studies (see the Dockerfile).
    study = argv[2].removeprefix("/home/ray/grokstudy/")
    assert (REPO / study).is_file(), f"{argv[2]} is not a shipped study"
    storage = argv[argv.index("--set") + 1]
    assert re.fullmatch(r"run\.storage=(s3|gs)://.+", storage), "Tune storage must be shared by all nodes"
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == MLFLOW_URI_IN_CLUSTER


def test_mlflow_manifest_serves_postgres_and_proxied_artifacts_to_in_cluster_names():
    service = _doc("Service", "mlflow")
    deployment = _doc("Deployment", "mlflow")
    [container] = _containers(deployment["spec"]["template"])
    env = _env(container)
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert "--serve-artifacts" in (CLUSTER / "mlflow.Dockerfile").read_text()
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    host_port = MLFLOW_URI_IN_CLUSTER.removeprefix("http://")
    assert host_port in allowed and "mlflow:5000" in allowed
    # The URI the Ray pods use names this Service, in this namespace, on this port.
    name, namespace = host_port.split(".")[:2]
    assert (service["metadata"]["name"], service["metadata"]["namespace"]) == (name, namespace)
    assert [p["port"] for p in service["spec"]["ports"]] == [int(host_port.rsplit(":", 1)[1])]
    assert _doc("StatefulSet", "mlflow-postgres")["spec"]["volumeClaimTemplates"]


def test_kubernetes_manifests_reference_secrets_and_never_inline_them():
    for label, doc in _k8s_docs():
        assert doc["kind"] != "Secret", f"{label}: secrets are created by the user, not shipped"
        text = yaml.safe_dump(doc)
        assert not re.search(r"\b[0-9a-f]{64}\b", text)
        pod = doc["spec"].get("template") or doc["spec"].get("headGroupSpec", {}).get("template")
        for container in _containers(pod) if pod else []:
            for name, var in _env(container).items():
                if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", name):
                    assert "valueFrom" in var and "value" not in var, f"{label}: {name} is inlined"


# ---- Docker Compose ----------------------------------------------------------------------


def test_compose_file_references_only_services_and_volumes_it_defines():
    compose = yaml.safe_load((CLUSTER / "mlflow-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert set(depends) <= set(services), f"{name} depends on an undefined service"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    build = services["mlflow"]["build"]
    assert (CLUSTER / build["context"] / build["dockerfile"]).is_file()


def test_compose_services_are_health_checked_and_started_in_order():
    services = yaml.safe_load((CLUSTER / "mlflow-compose.yaml").read_text())["services"]
    for name in ("postgres", "minio", "mlflow"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    depends = services["mlflow"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["create-bucket"]["condition"] == "service_completed_successfully"
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_compose_takes_every_credential_from_the_environment():
    text = (CLUSTER / "mlflow-compose.yaml").read_text()
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert f"${{{var}:?" in text
    for service in yaml.safe_load(text)["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${"), f"{key} is written in the file"


# ---- versions ----------------------------------------------------------------------------


def _image_tags() -> dict[str, str]:
    """Every Ray image named under cluster/ and in the Dockerfile: {where: image}."""
    images = {f"{name}: docker.image": _ray_up(name)["docker"]["image"] for name in RAY_UP_CONFIGS}
    for label, doc in _k8s_docs():
        if doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster":
            spec = doc["spec"]
            pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
            for pod in pods:
                for c in _containers(pod):
                    images[f"{label}: {c['name']}"] = c["image"]
    [from_arg] = [
        a for op, a in _dockerfile(REPO / "Dockerfile") if op == "ARG" and a.startswith("RAY_IMAGE=")
    ]
    images["Dockerfile: ARG RAY_IMAGE"] = from_arg.removeprefix("RAY_IMAGE=")
    return images


def test_ray_and_python_versions_agree_across_the_dockerfile_constraints_and_cluster_files():
    ray_version = _pins()["ray"]
    for where, image in _image_tags().items():
        tag = image.rsplit(":", 1)[1]
        assert re.fullmatch(rf"{re.escape(ray_version)}-py311-(gpu|cpu|cu\d+)", tag), f"{where}: {image}"
    assert _ray_up("aws.yaml")["docker"]["image"] == _ray_up("gcp.yaml")["docker"]["image"]
    assert _doc("RayCluster", "grokstudy")["spec"]["rayVersion"] == ray_version
    # The Dockerfile's documented CPU variant is the same Ray and Python.
    assert f"rayproject/ray:{ray_version}-py311-cpu" in (REPO / "Dockerfile").read_text()
    # The Python of the images is the one pyproject.toml allows and CI runs.
    assert 'requires-python = ">=3.11"' in (REPO / "pyproject.toml").read_text()
    # The development environment runs the pinned Ray too.
    assert metadata.version("ray") == ray_version


def test_mlflow_server_images_run_the_pinned_mlflow():
    mlflow_version = _pins()["mlflow"]
    [arg] = [
        a
        for op, a in _dockerfile(CLUSTER / "mlflow.Dockerfile")
        if op == "ARG" and a.startswith("MLFLOW_VERSION=")
    ]
    assert arg == f"MLFLOW_VERSION={mlflow_version}"
    [container] = _containers(_doc("Deployment", "mlflow")["spec"]["template"])
    assert container["image"].endswith(f"grokstudy-mlflow:{mlflow_version}")
    compose = yaml.safe_load((CLUSTER / "mlflow-compose.yaml").read_text())
    assert compose["services"]["mlflow"]["image"].endswith(f":{mlflow_version}")


# ---- the image's install steps -----------------------------------------------------------


def test_the_dockerfile_installs_with_the_same_script_as_the_makefile():
    assert "cluster/install.sh" in (REPO / "Makefile").read_text()
    steps = _dockerfile(REPO / "Dockerfile")
    ops = [op for op, _ in steps]
    assert steps[ops.index("FROM")][1] == "${RAY_IMAGE}"
    runs = [i for i, (op, args) in enumerate(steps) if op == "RUN" and "install" in args]
    assert all("sh cluster/install.sh" in steps[i][1] for i in runs)
    assert not any(op == "RUN" and "pip" in args for op, args in steps), "install through install.sh"
    deps, package = runs
    assert "GROKSTUDY_PART=deps" in steps[deps][1] and "GROKSTUDY_PART=package" in steps[package][1]

    def copied_before(i: int) -> set[str]:
        return {src for op, args in steps[:i] if op == "COPY" for src in args.split()[1:-1]}

    # Dependencies are installed from the files that decide them, before the package
    # is copied, so a code change does not rebuild the dependency layer.
    assert copied_before(deps) == {"pyproject.toml", "cluster/install.sh", "cluster/constraints.txt"}
    assert "grokstudy/" in copied_before(package) - copied_before(deps)
    # CI installs through the same two stages (Makefile setup), so a broken step fails CI.
    makefile = (REPO / "Makefile").read_text()
    assert "GROKSTUDY_PART=deps cluster/install.sh" in makefile
    assert "GROKSTUDY_PART=package cluster/install.sh" in makefile
    assert makefile.index("GROKSTUDY_PART=deps") < makefile.index("GROKSTUDY_PART=package")
    # Unprivileged at build and run time; nothing secret baked in.
    users = [args for op, args in steps if op == "USER"]
    assert users and users[0] == "ray" and ops.index("USER") < deps
    for op, args in steps:
        if op in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"TOKEN=|PASSWORD|SECRET|ACCESS_KEY", args), f"{op} {args}"
    assert any(op == "LABEL" and "org.opencontainers.image.title" in args for op, args in steps)


def test_the_install_script_and_local_cluster_script_are_valid_shell():
    for shell, script in (("sh", "install.sh"), ("bash", "install.sh"), ("bash", "local.sh")):
        subprocess.run([shell, "-n", str(CLUSTER / script)], check=True)


def test_the_install_script_lets_our_pins_win_over_the_ray_images_lock(tmp_path):
    ray_lock = tmp_path / "requirements_compiled.txt"
    ray_lock.write_text(
        "--extra-index-url https://example.invalid/simple\n"
        "NumPy==1.26.4\n"
        "grpcio==1.74.0 ; python_version >= '3.9'\n"
        "pyyaml==6.0.1\n"
    )
    env = {**os.environ, "GROKSTUDY_PART": "constraints", "EXTRA_CONSTRAINTS": str(ray_lock)}
    out = subprocess.run(
        ["sh", str(CLUSTER / "install.sh")], env=env, check=True, capture_output=True, text=True
    ).stdout.splitlines()
    ours = (CLUSTER / "constraints.txt").read_text().splitlines()
    assert out[: len(ours)] == ours
    # Ray's pins fill in only what we leave open; names compare like pip compares them.
    assert out[len(ours) :] == ["grpcio==1.74.0 ; python_version >= '3.9'"]


def test_the_install_script_refuses_an_unknown_stage():
    result = subprocess.run(
        ["sh", str(CLUSTER / "install.sh")],
        env={**os.environ, "GROKSTUDY_PART": "everything"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "GROKSTUDY_PART" in result.stderr


def test_the_build_context_leaves_out_local_state_and_tokens():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "**/auth_token", "**/.env"} <= ignored
