"""The deployment files under cluster/ and the Dockerfile, checked without a cloud or Docker.

- `ray up` configs go through Ray's own cluster-config preparation and validation.
- Kubernetes manifests are validated against vendored schemas (tests/schemas/): the
  core Kubernetes kinds from kubernetes-validate, KubeRay's RayCluster/RayJob from its
  v1.7.0 CRD field reference. No network at test time.
- Versions may not drift: Ray, Python and MLflow agree across the Dockerfile,
  cluster/constraints.txt and every image and rayVersion under cluster/.
- The image installs with the same script as the Makefile (and so CI), and the script's
  choice of torch build (CPU index on a Linux machine without a GPU) is checked with stand-in
  `uname` and `nvidia-smi`, installing nothing.
- A RayJob runs the user's own study file from a ConfigMap: the upload is checked with Ray's
  own packaging code on a directory laid out as the kubelet lays out a ConfigMap volume.
- Security of the kit: MLflow runs its basic auth with credentials from Secrets or the
  environment, never gets the object store's root credentials, and NetworkPolicies let
  only the Ray pods reach it; `local.sh down` kills and deletes only what `up` started.
"""

from __future__ import annotations

import configparser
import copy
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
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
MLFLOW_URI_IN_CLUSTER = "http://mlflow.grokstudy-mlflow.svc.cluster.local:5000"


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
        ("v1", "ConfigMap"): f"{core['$id']}#/$defs/io.k8s.api.core.v1.ConfigMap",
        ("v1", "Namespace"): f"{core['$id']}#/$defs/io.k8s.api.core.v1.Namespace",
        (
            "networking.k8s.io/v1",
            "NetworkPolicy",
        ): f"{core['$id']}#/$defs/io.k8s.api.networking.v1.NetworkPolicy",
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


def _compose() -> dict:
    return yaml.safe_load((CLUSTER / "mlflow-compose.yaml").read_text())


def _ini(text: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read_string(text)
    return parser["mlflow"]


# A URI with a password in it: scheme://user:password@host
PASSWORD_IN_URI = re.compile(r"[a-z0-9+]+://[^/\s:@]+:[^/\s@]+@")


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


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_ray_up_configs_give_every_node_its_own_least_privilege_identity(name):
    """Without one, Ray attaches its default role to the head (AWS: EC2 and S3 full access;
    GCP: project-wide compute.admin and storage.objectAdmin) and workers get the defaults."""
    config = _ray_up(name)
    head_type = config["head_node_type"]
    for node_type, node in config["available_node_types"].items():
        role = "head" if node_type == head_type else "worker"
        node_config = node["node_config"]
        if name == "aws.yaml":
            arn = node_config["IamInstanceProfile"]["Arn"]
            assert arn.endswith(f":instance-profile/grokstudy-{role}"), node_type
        else:
            [account] = node_config["serviceAccounts"]
            assert account["email"].startswith(f"grokstudy-{role}@"), node_type
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # reached through `ray dashboard` (an SSH tunnel)


def test_aws_allows_ssh_from_a_stated_range_and_iam_policies_reach_only_the_study_prefix():
    rules = _ray_up("aws.yaml")["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])
    policies = {
        n: json.loads((CLUSTER / "aws-iam" / f"{n}-policy.json").read_text()) for n in ("head", "worker")
    }
    for name, policy in policies.items():
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert not [a for a in actions if a.endswith("*")], (name, actions)  # no wildcard actions
            if any(a.startswith("s3:") for a in actions):
                resource = statement["Resource"]
                assert resource == "arn:aws:s3:::your-bucket/grokstudy/*" or statement["Condition"][
                    "StringLike"
                ]["s3:prefix"] == ["grokstudy/*", "grokstudy"], (name, statement["Sid"])
    worker_actions = {
        a
        for st in policies["worker"]["Statement"]
        for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])
    }
    assert {a.split(":")[0] for a in worker_actions} == {"s3"}
    head = {st["Sid"]: st for st in policies["head"]["Statement"]}
    assert head["GiveWorkersTheWorkerRoleOnly"]["Resource"].endswith(":role/grokstudy-worker")
    assert head["EndOnlyThisClustersInstances"]["Condition"] == {
        "StringEquals": {"ec2:ResourceTag/ray-cluster-name": _ray_up("aws.yaml")["cluster_name"]}
    }
    trust = json.loads((CLUSTER / "aws-iam" / "trust-policy.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


def test_git_ignores_the_secrets_the_build_context_leaves_out():
    dockerignore = (REPO / ".dockerignore").read_text().splitlines()
    gitignore = set((REPO / ".gitignore").read_text().splitlines())
    secrets = [p for p in dockerignore if p in ("*.db", "**/auth_token", "**/.env")]
    assert len(secrets) == 3 and set(secrets) <= gitignore


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

    policy = copy.deepcopy(_doc("NetworkPolicy", "mlflow"))
    policy["spec"]["ingress"][0]["from"][0]["podSelectors"] = {}
    policy["spec"]["policyTypes"] = "Ingress"
    errors = _schema_errors(policy)
    assert any("'podSelectors' was unexpected" in e for e in errors)
    assert any("is not of type 'array'" in e for e in errors)


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


OWN_STUDY = "rayjob-own-study.yaml"


def _own_study() -> tuple[dict, dict]:
    """(the ConfigMap, the RayJob) of rayjob-own-study.yaml."""
    docs = [d for d in yaml.safe_load_all((CLUSTER / "k8s" / OWN_STUDY).read_text()) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    return docs[0], docs[1]


def _entrypoint_overrides(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == "--set"]


def _configmap_volume(root: Path, data: dict[str, str]) -> Path:
    """A directory laid out as the kubelet mounts a ConfigMap: the files in a timestamped
    directory, `..data` linking to it, and one link per key through `..data`."""
    root.mkdir()
    stamp = root / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir()
    for key, text in data.items():
        (stamp / key).write_text(text)
        (root / key).symlink_to(f"..data/{key}")
    (root / "..data").symlink_to(stamp.name)
    return root


def test_own_study_rayjob_mounts_its_configmap_in_the_submitter_and_uploads_it_as_working_dir():
    config_map, job = _own_study()
    spec = job["spec"]
    assert job["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "grokstudy"
    assert spec["clusterSelector"] == {"ray.io/cluster": _doc("RayCluster", "grokstudy")["metadata"]["name"]}
    # KubeRay (ray-operator/controllers/ray/common/job.go, BuildJobSubmitCommand) runs
    # `ray job submit --runtime-env-json <runtimeEnvYAML as JSON>` in the submitter pod only in
    # K8sJobMode; HTTPMode posts the runtime env to the dashboard without uploading anything.
    assert spec["submissionMode"] == "K8sJobMode"
    pod = spec["submitterPodTemplate"]["spec"]
    # Exactly one volume, the ConfigMap, mounted read-only by the submitter container alone.
    [volume] = pod["volumes"]
    assert volume["configMap"] == {"name": config_map["metadata"]["name"]}
    [container] = _containers(spec["submitterPodTemplate"])
    [mount] = container["volumeMounts"]
    assert mount["name"] == volume["name"] and mount["readOnly"] is True
    # working_dir is that mount, a local path in the submitter pod, so `ray job submit`
    # packages it there and uploads it; the ConfigMap volume's own ..data entries stay out.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == mount["mountPath"]
    assert runtime_env["excludes"] == ["..*"]
    # The driver starts in the unpacked working_dir: the entrypoint runs the file by its key.
    argv = spec["entrypoint"].split()
    assert argv[:3] == ["grokstudy", "run", "study.yaml"] and "study.yaml" in config_map["data"]
    assert "--out" not in argv  # default runs/<name> in the job's working dir; MLflow keeps the results
    storages = [o for o in _entrypoint_overrides(argv) if o.startswith("run.storage=")]
    assert len(storages) == 1 and re.fullmatch(r"run\.storage=(s3|gs)://.+", storages[0])


def test_own_study_configmap_holds_a_study_that_grokstudy_accepts(tmp_path):
    from grokstudy.study import load_study

    config_map, job = _own_study()
    argv = job["spec"]["entrypoint"].split()
    for key, text in config_map["data"].items():
        (tmp_path / key).write_text(text)
    study = load_study(tmp_path / argv[2], _entrypoint_overrides(argv))
    assert study.run.storage.startswith(("s3://", "gs://"))
    # It runs on the GPU workers of raycluster.yaml.
    assert study.resources.gpu > 0


def test_own_study_upload_is_exactly_the_configmaps_files_with_rays_own_packaging(tmp_path):
    """What `ray job submit` does in the submitter pod, with Ray's code: the runtime env as
    KubeRay passes it (runtimeEnvYAML turned into JSON), parsed by the CLI's own parser, the
    working_dir packaged as the Jobs SDK packages it before uploading, then unpacked where
    the driver starts; the entrypoint's study loads from there."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    from grokstudy.study import load_study

    config_map, job = _own_study()
    mount = _configmap_volume(tmp_path / "study", config_map["data"])
    as_json = yaml.safe_load(job["spec"]["runtimeEnvYAML"]) | {"working_dir": str(mount)}
    runtime_env = parse_runtime_env_args(runtime_env_json=json.dumps(as_json))
    package = tmp_path / "package.zip"

    def upload(working_dir: str, excludes: list[str], is_file: bool = False) -> None:
        assert not is_file
        create_package(working_dir, package, include_gitignore=True, excludes=excludes)

    uploaded = upload_working_dir_if_needed(runtime_env, include_gitignore=True, upload_fn=upload)
    assert uploaded["working_dir"].startswith("gcs://_ray_pkg_")
    with zipfile.ZipFile(package) as zipped:
        assert sorted(zipped.namelist()) == sorted(config_map["data"])
        zipped.extractall(tmp_path / "head")
    argv = job["spec"]["entrypoint"].split()
    assert load_study(tmp_path / "head" / argv[2], _entrypoint_overrides(argv)).name


def test_own_study_commands_in_the_readme_and_the_file_apply_the_rayjob_alone():
    config_map, job = _own_study()
    header = (CLUSTER / "k8s" / OWN_STUDY).read_text()
    readme = (CLUSTER / "README.md").read_text()
    apply = re.compile(rf"kubectl apply -f cluster/k8s/{re.escape(OWN_STUDY)} -l (\S+)=(\S+)")
    selectors = {m.groups() for text in (header, readme) for m in apply.finditer(text)}
    # Both name one selector, and it picks the RayJob, never the example ConfigMap, which
    # would overwrite the user's study.
    [(key, value)] = selectors
    assert job["metadata"]["labels"][key] == value
    assert config_map["metadata"]["labels"].get(key) != value
    # The ConfigMap the user makes is the one the RayJob mounts, under the key it runs.
    name, namespace = config_map["metadata"]["name"], config_map["metadata"]["namespace"]
    create = f"kubectl -n {namespace} create configmap {name} --from-file=study.yaml="
    assert create in header and create in readme
    # KubeRay names the submitter's Kubernetes Job after the RayJob.
    logs = f"kubectl -n {namespace} logs -f job/{job['metadata']['name']}"
    assert logs in header and logs in readme
    assert "grokstudy export --experiment " in readme


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
        assert not re.search(r"(?<!sha256:)\b[0-9a-f]{64}\b", text)  # a token (digests aside)
        assert not PASSWORD_IN_URI.search(text), f"{label}: a URI carries a password"
    for label, pod in _pod_templates():
        for container in _containers(pod):
            for name, var in _env(container).items():
                if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", name):
                    assert "valueFrom" in var and "value" not in var, f"{label}: {name} is inlined"


def _mlflow_entrypoint() -> list[str]:
    [entrypoint] = [a for op, a in _dockerfile(CLUSTER / "mlflow.Dockerfile") if op == "ENTRYPOINT"]
    return json.loads(entrypoint)


def test_mlflow_on_kubernetes_runs_basic_auth_with_credentials_from_secrets(tmp_path, monkeypatch):
    # The image turns basic auth on for every deployment, with the `auth` extra installed.
    assert _mlflow_entrypoint()[:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    [install] = [a for op, a in _dockerfile(CLUSTER / "mlflow.Dockerfile") if op == "RUN" and "pip" in a]
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in install

    pod = _doc("Deployment", "mlflow")["spec"]["template"]
    [container] = _containers(pod)
    env = _env(container)
    secret_keys = {
        "MLFLOW_AUTH_ADMIN_USERNAME": ("mlflow-auth", "admin-username"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ("mlflow-auth", "admin-password"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": ("mlflow-auth", "flask-secret-key"),
        "PGPASSWORD": ("mlflow-postgres", "password"),
    }
    for var, (secret, key) in secret_keys.items():
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, var

    # MLFLOW_AUTH_CONFIG_PATH is a file of the ConfigMap mounted into the container.
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = _doc("ConfigMap", volume["configMap"]["name"])
    ini_text = config_map["data"][config_path.name]
    assert _ini(ini_text)["database_uri"] == env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert "admin_password" not in _ini(ini_text)
    host = _ini(ini_text)["database_uri"].split("@")[1].split(":")[0]
    assert (
        _doc("Service", host)["spec"]["selector"]
        == _doc("StatefulSet", host)["spec"]["selector"]["matchLabels"]
    )

    # The installed MLflow reads this file and the pod's environment as intended. Its
    # config reader is loaded by path: the package mlflow.server.auth needs Flask-WTF
    # (the `auth` extra of the server image), which the development environment lacks.
    import mlflow

    reader = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    module_spec = importlib.util.spec_from_file_location("_mlflow_auth_config", reader)
    auth_config = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(auth_config)
    (tmp_path / config_path.name).write_text(ini_text)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / config_path.name))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin-from-secret")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "password-from-secret")
    config = auth_config.read_auth_config()
    assert config.database_uri == env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert (config.admin_username, config.admin_password) == ("admin-from-secret", "password-from-secret")
    assert config.default_permission == "READ"


def test_ray_pods_log_to_mlflow_with_credentials_from_a_secret():
    spec = _doc("RayCluster", "grokstudy")["spec"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        for container in _containers(pod):
            refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert {"name": "grokstudy-mlflow", "optional": True} in refs, container["name"]
            assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} & set(_env(container))
    # Never in a RayJob's runtime env, which `ray job list` shows.
    jobs = [doc for _, doc in _k8s_docs() if doc["kind"] == "RayJob"]
    assert len(jobs) == 2
    for job in jobs:
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert not any(re.search(r"PASSWORD|TOKEN|SECRET", k) for k in runtime_env["env_vars"])
        assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == MLFLOW_URI_IN_CLUSTER


def test_mlflow_on_kubernetes_gets_no_root_credentials_of_the_object_store():
    [container] = _containers(_doc("Deployment", "mlflow")["spec"]["template"])
    for name, var in _env(container).items():
        assert not re.search(r"ROOT|ADMIN", name) or name.startswith("MLFLOW_AUTH_ADMIN_"), name
        ref = var.get("valueFrom", {}).get("secretKeyRef", {})
        assert ref.get("name") in (None, "mlflow-auth", "mlflow-postgres"), name
    # The bucket key comes from mlflow-artifacts only, which the README has you create
    # from a key scoped to the artifact bucket.
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["mlflow-artifacts"]
    readme = (CLUSTER / "README.md").read_text()
    assert "secret generic mlflow-artifacts" in readme and "bucket-scoped" in readme


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are evaluated here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _pod_labels() -> dict[str, tuple[str, dict]]:
    """(namespace, labels) of every kind of pod the kit creates, KubeRay's own labels included."""
    pods = {}
    for label, doc in _k8s_docs():
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pods[label] = (namespace, doc["spec"]["template"]["metadata"]["labels"])
        elif doc["kind"] == "RayCluster":
            spec = doc["spec"]
            # KubeRay labels every pod of a RayCluster ray.io/cluster=<name>.
            for group, template in [
                ("head", spec["headGroupSpec"]["template"]),
                *((g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]),
            ]:
                own = template.get("metadata", {}).get("labels", {})
                pods[f"{label}:{group}"] = (namespace, {**own, "ray.io/cluster": doc["metadata"]["name"]})
        elif doc["kind"] == "RayJob":
            pods[f"{label}:submitter"] = (
                namespace,
                doc["spec"]["submitterPodTemplate"]["metadata"]["labels"],
            )
    return pods


def _admits(peer: dict, policy_namespace: str, namespace: str, labels: dict) -> bool:
    """Does one `from` peer of a policy in `policy_namespace` admit a pod (namespace, labels)?"""
    assert set(peer) <= {"podSelector", "namespaceSelector"}, "no ipBlock peers"
    if "namespaceSelector" in peer:
        ns = peer["namespaceSelector"]
        assert set(ns) == {"matchLabels"} and set(ns["matchLabels"]) == {"kubernetes.io/metadata.name"}
        in_namespace = ns["matchLabels"]["kubernetes.io/metadata.name"] == namespace
    else:
        in_namespace = namespace == policy_namespace
    return in_namespace and _selects(peer.get("podSelector", {}), labels)


def _policies(namespace: str) -> list[dict]:
    return [
        d for _, d in _k8s_docs() if d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == namespace
    ]


def test_network_policies_let_only_the_ray_pods_reach_mlflow_and_only_mlflow_reach_postgres():
    pods = _pod_labels()
    mlflow_pod = _doc("Deployment", "mlflow")["spec"]["template"]
    postgres_pod = _doc("StatefulSet", "mlflow-postgres")["spec"]["template"]
    ray_pods = {p for p in pods if p.startswith("raycluster.yaml:RayCluster/")}
    cases = {
        # policy: (the pod it guards, the port, the pods allowed in)
        "mlflow": (mlflow_pod, "http", ray_pods),
        "mlflow-postgres": (postgres_pod, "postgres", {"mlflow.yaml:Deployment/mlflow"}),
    }
    for name, (guarded, port_name, allowed) in cases.items():
        policy = _doc("NetworkPolicy", name)
        namespace = policy["metadata"]["namespace"]
        assert namespace == "grokstudy-mlflow"
        spec = policy["spec"]
        guarded_label = next(k for k, (_, v) in pods.items() if v == guarded["metadata"]["labels"])
        assert {
            p for p, (ns, labels) in pods.items() if ns == namespace and _selects(spec["podSelector"], labels)
        } == {guarded_label}
        assert spec["policyTypes"] == ["Ingress"]
        [rule] = spec["ingress"]
        [port] = [p for c in _containers(guarded) for p in c["ports"] if p["name"] == port_name]
        assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]
        admitted = {
            p
            for p, (ns, labels) in pods.items()
            if any(_admits(f, namespace, ns, labels) for f in rule["from"])
        }
        assert admitted == allowed, name
    assert len(ray_pods) == 2  # the head and the GPU worker group


def test_every_namespace_denies_by_default_and_rays_ports_open_only_to_its_own_pods():
    pods = _pod_labels()
    for namespace in ("grokstudy", "grokstudy-mlflow"):
        default = [p for p in _policies(namespace) if p["metadata"]["name"] == "default-deny"]
        assert [p["spec"] for p in default] == [{"podSelector": {}, "policyTypes": ["Ingress"]}], namespace
    policy = _doc("NetworkPolicy", "grokstudy-ray")
    ray_pods = {p for p, (ns, labels) in pods.items() if ns == "grokstudy" and "ray.io/cluster" in labels}
    assert {
        p
        for p, (ns, labels) in pods.items()
        if ns == "grokstudy" and _selects(policy["spec"]["podSelector"], labels)
    } == ray_pods
    every_port, dashboard = policy["spec"]["ingress"]
    assert "ports" not in every_port  # GCS, object managers and workers use many ports
    assert {
        p
        for p, (ns, labels) in pods.items()
        if any(_admits(f, "grokstudy", ns, labels) for f in every_port["from"])
    } == ray_pods
    assert dashboard["ports"] == [{"protocol": "TCP", "port": 8265}]
    from_pods = {
        p
        for p, (ns, labels) in pods.items()
        if any(_admits(f, "grokstudy", ns, labels) for f in dashboard["from"])
    }
    assert from_pods == {
        "rayjob.yaml:RayJob/grokstudy-quickstart:submitter",
        "rayjob-own-study.yaml:RayJob/grokstudy-own-study:submitter",
    }
    [operator] = [f for f in dashboard["from"] if "namespaceSelector" in f]
    assert operator == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
    }


def test_mlflow_and_its_secrets_live_outside_the_namespace_the_ray_head_can_patch():
    mlflow_secrets = {"mlflow-postgres", "mlflow-auth", "mlflow-artifacts"}
    for label, doc in _k8s_docs():
        text = yaml.safe_dump(doc)
        if doc["metadata"].get("namespace") == "grokstudy":
            assert not {s for s in mlflow_secrets if re.search(rf"\bname: {s}\b", text)}, label
        if label.startswith("mlflow.yaml") and doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "grokstudy-mlflow", label


def _pod_templates() -> list[tuple[str, dict]]:
    out = []
    for label, doc in _k8s_docs():
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "StatefulSet"):
            out.append((label, spec["template"]))
        elif doc["kind"] == "RayCluster":
            out += [(f"{label}:head", spec["headGroupSpec"]["template"])]
            out += [(f"{label}:{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
        elif doc["kind"] == "RayJob":
            out.append((f"{label}:submitter", spec["submitterPodTemplate"]))
    return out


def test_every_container_runs_unprivileged_with_no_capabilities():
    templates = _pod_templates()
    assert len(templates) == 6
    for label, template in templates:
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}, label
        assert pod["runAsUser"] > 0, label
        for container in _containers(template):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, label
            assert security["capabilities"] == {"drop": ["ALL"]}, label
    # where it works, the root filesystem is read-only too (Ray caches under its home)
    for name in ("mlflow", "mlflow-postgres"):
        kind = "Deployment" if name == "mlflow" else "StatefulSet"
        [container] = _containers(_doc(kind, name)["spec"]["template"])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name


OWN_IMAGES = "registry.example.com/"
"""Images the user builds from this repository (their digest is known once pushed:
cluster/pin-images.sh pins them)."""


def _image_references() -> list[tuple[str, str]]:
    refs = []
    for path in [*sorted((CLUSTER / "k8s").glob("*.yaml")), CLUSTER / "mlflow-compose.yaml"]:
        refs += [(path.name, m) for m in re.findall(r"^\s*image:\s*(\S+)", path.read_text(), re.M)]
    for path in (CLUSTER / "mlflow.Dockerfile",):
        refs += [(path.name, a.split()[0]) for op, a in _dockerfile(path) if op == "FROM"]
    return refs


def test_third_party_images_are_pinned_by_digest_and_the_pin_script_refreshes_them():
    refs = _image_references()
    assert len(refs) >= 5
    for where, image in refs:
        if image.startswith(OWN_IMAGES) or image.startswith("grokstudy-mlflow:"):
            continue
        if image.startswith("quay.io/minio/"):
            assert re.search(r":RELEASE\.\d{4}-\d\d-\d\dT", image), (where, image)  # immutable release tags
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), (where, image)
    script = (CLUSTER / "pin-images.sh").read_text()
    assert "imagetools inspect" in script
    subprocess.run(["bash", "-n", str(CLUSTER / "pin-images.sh")], check=True)


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
    for var in (
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "MLFLOW_MINIO_ACCESS_KEY",
        "MLFLOW_MINIO_SECRET_KEY",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        assert f"${{{var}:?" in text
    assert not PASSWORD_IN_URI.search(text), "a URI carries a password"
    for service in yaml.safe_load(text)["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert str(value).startswith("${"), f"{key} is written in the file"


def test_compose_publishes_nothing_beyond_loopback():
    for name, service in _compose()["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            # Short syntax only ("HOST_IP:HOST_PORT:CONTAINER_PORT"): a long-syntax port
            # without host_ip would publish on 0.0.0.0.
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"


def _bucket_script() -> str:
    """The create-bucket service's shell script, as the container runs it ($$ -> $)."""
    entrypoint = _compose()["services"]["create-bucket"]["entrypoint"]
    assert entrypoint[:2] == ["sh", "-ec"]
    return entrypoint[2].replace("$$", "$")


def test_compose_gives_mlflow_a_bucket_scoped_minio_user_not_the_root_credentials():
    services = _compose()["services"]
    env = services["mlflow"]["environment"]
    assert not any("MINIO_ROOT" in str(value) for value in env.values()), "MLflow gets MinIO's root key"
    assert env["AWS_ACCESS_KEY_ID"] == "${MLFLOW_MINIO_ACCESS_KEY:?set MLFLOW_MINIO_ACCESS_KEY}"
    assert env["AWS_SECRET_ACCESS_KEY"] == "${MLFLOW_MINIO_SECRET_KEY:?set MLFLOW_MINIO_SECRET_KEY}"
    bucket = env["MLFLOW_ARTIFACTS_DESTINATION"].removeprefix("s3://").split("/")[0]

    # create-bucket (the only service with the root credentials besides MinIO itself)
    # makes that user and attaches a policy that reaches the artifact bucket only.
    script = _bucket_script()
    subprocess.run(["sh", "-n", "-c", script], check=True)
    lines = [line.strip() for line in script.splitlines()]
    assert f"mc mb --ignore-existing local/{bucket}" in lines
    assert 'mc admin user add local "$MLFLOW_MINIO_ACCESS_KEY" "$MLFLOW_MINIO_SECRET_KEY"' in lines
    [create] = [line for line in lines if line.startswith("mc admin policy create local ")]
    _, _, _, _, _, policy_name, policy_file = create.split()
    assert f'mc admin policy attach local {policy_name} --user "$MLFLOW_MINIO_ACCESS_KEY"' in lines
    [policy_text] = re.findall(rf"echo '(.*?)' >{re.escape(policy_file)}", script, re.S)
    statements = json.loads(policy_text)["Statement"]
    for statement in statements:
        assert statement["Effect"] == "Allow"
        assert all(a.startswith("s3:") and "*" not in a for a in statement["Action"]), statement
        for resource in statement["Resource"]:
            assert resource in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"), resource
    actions = {a for s in statements for a in s["Action"]}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions


def test_compose_runs_mlflow_with_basic_auth_and_its_users_in_postgres():
    compose = _compose()
    mlflow = compose["services"]["mlflow"]
    env = mlflow["environment"]
    assert _mlflow_entrypoint()[:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert "--app-name" not in mlflow["command"], "the image turns basic auth on"
    for var in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", env[var]), f"{var} must come from the environment"
    [config] = [c for c in mlflow["configs"] if c["target"] == env["MLFLOW_AUTH_CONFIG_PATH"]]
    ini = _ini(compose["configs"][config["source"]]["content"])
    # The users live in the PostgreSQL database of the runs (tables of their own).
    assert ini["database_uri"] == env["MLFLOW_BACKEND_STORE_URI"]
    assert ini["database_uri"].split("@")[1].split(":")[0] in compose["services"]
    assert "admin_password" not in ini


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
        elif doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob":
            for c in _containers(doc["spec"]["submitterPodTemplate"]):
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


# ---- install.sh's choice of torch build, with stand-ins -------------------------------------


class _Index(http.server.BaseHTTPRequestHandler):
    """A stand-in for PyTorch's CPU index that answers every request."""

    asked: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).asked.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def cpu_index():
    """{"answers": the URL of a CPU index that answers, "silent": a URL where nothing listens}."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        silent_port = closed.getsockname()[1]
    yield {
        "answers": f"http://127.0.0.1:{server.server_address[1]}/whl/cpu",
        "silent": f"http://127.0.0.1:{silent_port}/whl/cpu",
    }
    server.shutdown()


def _install_sh(tmp_path: Path, system: str, gpu: bool, part: str = "torch-spec", **env: str):
    """Run install.sh on a PATH of stand-ins: `uname -s` says `system`, `nvidia-smi` exists
    only with `gpu`, and nothing else is on it but the few tools the script needs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("dirname", "mktemp", "rm", "cat", "awk"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "uname").write_text(f"#!/bin/sh\necho {system}\n")
    (bin_dir / "uname").chmod(0o755)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    return subprocess.run(
        [shutil.which("sh"), str(CLUSTER / "install.sh")],
        env={
            "PATH": str(bin_dir),
            "HOME": str(tmp_path),
            "PYTHON": sys.executable,
            "GROKSTUDY_PART": part,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "system,gpu,env,index,expected",
    [
        # A Linux laptop without a GPU: the CPU build, not PyPI's multi-GB CUDA build.
        ("Linux", False, {}, "answers", "torch==2.13.0 --index-url {url}"),
        # Where the CPU index does not answer (offline mirrors, this CI's machines): the
        # default index at once, instead of pip retrying the index and giving up.
        ("Linux", False, {}, "silent", "torch==2.13.0"),
        ("Linux", True, {}, "answers", "torch==2.13.0"),
        ("Darwin", False, {}, "answers", "torch==2.13.0"),
        ("Linux", False, {"TORCH_VARIANT": "cuda"}, "answers", "torch==2.13.0"),
        ("Linux", True, {"TORCH_VARIANT": "cpu"}, "silent", "torch==2.13.0 --index-url {url}"),
        ("Darwin", False, {"TORCH_VARIANT": "cpu"}, "answers", "torch==2.13.0 --index-url {url}"),
        ("Linux", False, {"TORCH_VARIANT": "default"}, "answers", "torch==2.13.0"),
        # TORCH_SPEC is the full override: installed as given.
        ("Linux", False, {"TORCH_SPEC": "torch>=2.13 --pre"}, "answers", "torch>=2.13 --pre"),
        (
            "Linux",
            False,
            {"TORCH_SPEC": "torch", "TORCH_VARIANT": "cpu"},
            "answers",
            "torch --index-url {url}",
        ),
    ],
)
def test_install_sh_picks_torchs_cpu_build_on_linux_without_nvidia_smi(
    tmp_path, cpu_index, system, gpu, env, index, expected
):
    url = cpu_index[index]
    _Index.asked.clear()
    result = _install_sh(tmp_path, system, gpu, TORCH_CPU_INDEX_URL=url, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [expected.format(url=url)]
    # Only the automatic choice on Linux without nvidia-smi asks the index, and says why.
    asks = system == "Linux" and not gpu and not env
    assert _Index.asked == (["/whl/cpu/torch/"] if asks and index == "answers" else [])
    assert ("without nvidia-smi" in result.stderr) == asks
    if asks and index == "silent":
        assert f"{url} does not answer" in result.stderr


def test_install_sh_refuses_a_cuda_build_off_linux_and_an_unknown_variant(tmp_path):
    cuda_on_mac = _install_sh(tmp_path / "mac", "Darwin", False, TORCH_VARIANT="cuda")
    assert cuda_on_mac.returncode == 2 and "Linux" in cuda_on_mac.stderr and not cuda_on_mac.stdout
    unknown = _install_sh(tmp_path / "any", "Linux", False, TORCH_VARIANT="rocm")
    assert unknown.returncode == 2 and "TORCH_VARIANT must be" in unknown.stderr


def test_install_sh_installs_torch_with_the_arguments_it_prints(tmp_path, cpu_index):
    """The deps stage, with a stand-in Python that has no torch and records pip's arguments
    (and runs the real Python for everything else): what it installs is what torch-spec says."""
    log = tmp_path / "pip.log"
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -m ]; then echo "$*" >>{log}; exit 0; fi\n'
        'if [ "$1" = -c ] && [ "$2" = "import torch" ]; then exit 1; fi\n'
        'if [ "$1" = -c ]; then exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    url = cpu_index["answers"]
    result = _install_sh(
        tmp_path / "run", "Linux", False, part="deps", PYTHON=str(python), TORCH_CPU_INDEX_URL=url
    )
    assert result.returncode == 0, result.stderr
    pip = log.read_text().splitlines()
    assert pip[0] == f"-m pip install --quiet torch==2.13.0 --index-url {url}"
    assert pip[1].startswith("-m pip install --quiet -c cluster/constraints.txt -r ")
    assert f"installing torch==2.13.0 --index-url {url}" in result.stdout


def test_the_image_installs_the_torch_it_names_instead_of_guessing_from_the_build_machine():
    # A docker build sees no nvidia-smi, GPU image or not: the automatic choice would put
    # torch's CPU build into the GPU image.
    steps = _dockerfile(REPO / "Dockerfile")
    [deps] = [a for op, a in steps if op == "RUN" and "GROKSTUDY_PART=deps" in a]
    assert "TORCH_VARIANT=default" in deps.split()
    [spec] = [a for op, a in steps if op == "ARG" and a.startswith("TORCH_SPEC=")]
    assert spec == 'TORCH_SPEC="torch==2.13.0"'


def test_the_build_context_leaves_out_local_state_and_tokens():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "**/auth_token", "**/.env"} <= ignored


# ---- local.sh down, without Ray ------------------------------------------------------------
# A cluster directory as `local.sh up` leaves it (pids, state, the ray-tmp link), written by
# hand and pointing at live processes and directories that are not the cluster's.


def _stand_in(*args: str) -> subprocess.Popen:
    """A live process that sleeps, a session leader like a node, with `args` in its command
    line. Reaped as soon as it exits, as init reaps a node's `ray start` (a zombie would
    still count as a member of its session)."""
    code = "import time; time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def _gsray_dir() -> Path:
    """A private Ray temp dir made the way `local.sh up` makes one."""
    made = subprocess.run(["mktemp", "-d", "/tmp/gsray-XXXXXX"], check=True, capture_output=True, text=True)
    return Path(made.stdout.strip())


def _fake_cluster(root: Path, ray_tmp: str, link: Path | None, pids: dict[str, int]) -> Path:
    cluster = root / "cluster"
    cluster.mkdir()
    (cluster / "pids").write_text("".join(f"{name} {pid}\n" for name, pid in pids.items()))
    (cluster / "state").write_text(f"RAY_TMP={ray_tmp}\n")
    if link is not None:
        (cluster / "ray-tmp").symlink_to(link)
    return cluster


def _down(cluster: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER / "local.sh"), "down", "--dir", str(cluster)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_down_stops_only_the_recorded_processes_that_are_still_what_up_started(tmp_path):
    ray_tmp = _gsray_dir()
    # `up` started this head: its command line is `.../ray start ... --temp-dir RAY_TMP/head`.
    head = _stand_in("/venv/bin/ray", "start", "--head", "--temp-dir", f"{ray_tmp}/head")
    # The other recorded PIDs now belong to processes that are not this cluster's: a node of
    # another cluster, another MLflow, and an unrelated program.
    other_node = _stand_in("/venv/bin/ray", "start", "--temp-dir", "/tmp/gsray-0ther0/worker1")
    other_mlflow = _stand_in(
        "/venv/bin/mlflow", "server", "--artifacts-destination", "/elsewhere/mlartifacts"
    )
    unrelated = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        pids = {
            "mlflow": other_mlflow.pid,
            "head": head.pid,
            "worker1": other_node.pid,
            "worker2": unrelated.pid,
            "worker3": 0,
        }
        cluster = _fake_cluster(tmp_path, str(ray_tmp), ray_tmp, pids)
        down = _down(cluster)
        assert down.returncode == 0, down.stderr
        output = down.stdout + down.stderr

        assert head.wait(timeout=10) == -15  # SIGTERM, as `down` stops a node
        for name, proc in (("mlflow", other_mlflow), ("worker1", other_node), ("worker2", unrelated)):
            assert proc.poll() is None, f"{name}: down killed a process that is not the cluster's"
            assert f"not stopping {name}: pid {proc.pid} is no longer the process local.sh started" in output
        assert "skipping 'worker3 0'" in output
        assert "local cluster in" in output and "stopped" in output
        assert not ray_tmp.exists() and not (cluster / "pids").exists()
    finally:
        _stop(head, other_node, other_mlflow, unrelated)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("case", ["a directory elsewhere", "another cluster's temp dir", "a path through .."])
def test_down_refuses_a_temp_dir_that_is_not_this_clusters_and_touches_nothing(tmp_path, case):
    ours, theirs = _gsray_dir(), _gsray_dir()
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    recorded, link = {
        # Even with the link agreeing, only a /tmp/gsray-XXXXXX directory qualifies.
        "a directory elsewhere": (str(elsewhere), elsewhere),
        "another cluster's temp dir": (str(theirs), ours),
        "a path through ..": (f"{ours}/../{theirs.name}", ours),
    }[case]
    target = Path(os.path.realpath(recorded))
    (target / "keep").write_text("not the cluster's")
    # A process that names the recorded dir the way a node names its temp dir: `down`
    # would SIGTERM it as the head and sweep it as a stray if it trusted the state file.
    named = _stand_in("/venv/bin/ray", "start", "--head", "--temp-dir", f"{recorded}/head")
    try:
        cluster = _fake_cluster(tmp_path, recorded, link, {"head": named.pid})
        down = _down(cluster)
        assert down.returncode == 1
        [line] = down.stderr.splitlines()
        assert line.startswith("local.sh: refusing to stop the cluster:") and f"RAY_TMP={recorded}," in line
        assert (target / "keep").read_text() == "not the cluster's"
        assert named.poll() is None
        assert (cluster / "pids").exists() and (cluster / "state").exists()
    finally:
        _stop(named)
        for d in (ours, theirs):
            shutil.rmtree(d, ignore_errors=True)
