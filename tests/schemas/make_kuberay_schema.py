"""Regenerate kuberay-v1.7.0.json: KubeRay's RayCluster and RayJob as a JSON Schema.

Transcribed from the KubeRay v1.7.0 CRD field reference (ray-project/ray
doc/source/cluster/kubernetes/references/api.md, vendored there from ray-project/kuberay
docs/reference/api.md at tag v1.7.0): every spec field with its type, and the enums and
minimums of its Validation column. Unknown fields are errors at every KubeRay level;
embedded Kubernetes types point into k8s-v1.33-defs.json. Nested KubeRay structs that
grokstudy does not use are only checked to be objects.

    python tests/schemas/make_kuberay_schema.py
"""

from __future__ import annotations

import json
from pathlib import Path

K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"
STR, BOOL, INT, NUM = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}, {"type": "number"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
UNUSED = {"type": "object"}  # a KubeRay struct grokstudy does not use: type-checked only
MANAGED_BY = {"type": "string", "enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]}


def k8s(name: str) -> dict:
    return {"$ref": K8S + name}


def ref(name: str) -> dict:
    return {"$ref": "#/$defs/" + name}


def enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


def struct(properties: dict, required: tuple[str, ...] = ()) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


DEFS = {
    "AuthOptions": struct({"mode": enum("disabled", "token"), "secretName": STR, "enableK8sTokenAuth": BOOL}),
    "AutoscalerOptions": struct(
        {
            "resources": k8s("io.k8s.api.core.v1.ResourceRequirements"),
            "image": STR,
            "imagePullPolicy": STR,
            "securityContext": k8s("io.k8s.api.core.v1.SecurityContext"),
            "idleTimeoutSeconds": INT,
            "upscalingMode": enum("Default", "Aggressive", "Conservative"),
            "version": enum("v1", "v2"),
            "env": array(k8s("io.k8s.api.core.v1.EnvVar")),
            "envFrom": array(k8s("io.k8s.api.core.v1.EnvFromSource")),
            "volumeMounts": array(k8s("io.k8s.api.core.v1.VolumeMount")),
            "command": array(STR),
            "args": array(STR),
        }
    ),
    "IngressOptions": struct(
        {
            "host": STR,
            "path": STR,
            "pathType": enum("Exact", "Prefix", "ImplementationSpecific"),
            "tls": array(UNUSED),
        }
    ),
    "HeadGroupSpec": struct(
        {
            "template": k8s("io.k8s.api.core.v1.PodTemplateSpec"),
            "headService": k8s("io.k8s.api.core.v1.Service"),
            "enableIngress": BOOL,
            "ingressOptions": ref("IngressOptions"),
            "resources": STRING_MAP,
            "labels": STRING_MAP,
            "rayStartParams": STRING_MAP,
            "serviceType": STR,
        },
        required=("template",),
    ),
    "ScaleStrategy": struct({"workersToDelete": array(STR)}),
    "WorkerGroupSpec": struct(
        {
            "suspend": BOOL,
            "groupName": STR,
            "replicas": INT,
            "minReplicas": INT,
            "maxReplicas": INT,
            "idleTimeoutSeconds": INT,
            "priority": INT,
            "resources": STRING_MAP,
            "labels": STRING_MAP,
            "rayStartParams": STRING_MAP,
            "template": k8s("io.k8s.api.core.v1.PodTemplateSpec"),
            "scaleStrategy": ref("ScaleStrategy"),
            "numOfHosts": INT,
        },
        required=("groupName", "template"),
    ),
    "RayClusterSpec": struct(
        {
            "upgradeStrategy": struct({"type": enum("Recreate", "None")}),
            "authOptions": ref("AuthOptions"),
            "suspend": BOOL,
            "managedBy": MANAGED_BY,
            "autoscalerOptions": ref("AutoscalerOptions"),
            "headServiceAnnotations": STRING_MAP,
            "enableInTreeAutoscaling": BOOL,
            "gcsFaultToleranceOptions": UNUSED,
            "historyServerOptions": UNUSED,
            "networkPolicy": UNUSED,
            "tlsOptions": struct({"enabled": BOOL}),
            "headGroupSpec": ref("HeadGroupSpec"),
            "rayVersion": STR,
            "workerGroupSpecs": array(ref("WorkerGroupSpec")),
        },
        required=("headGroupSpec",),
    ),
    "RayJobSpec": struct(
        {
            "activeDeadlineSeconds": INT,
            "backoffLimit": INT,
            "rayClusterSpec": ref("RayClusterSpec"),
            "submitterPodTemplate": k8s("io.k8s.api.core.v1.PodTemplateSpec"),
            "metadata": STRING_MAP,
            "clusterSelector": STRING_MAP,
            "submitterConfig": struct({"backoffLimit": INT}),
            "managedBy": MANAGED_BY,
            "deletionStrategy": UNUSED,
            "entrypoint": STR,
            "runtimeEnvYAML": STR,
            "jobId": STR,
            "submissionMode": enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
            "entrypointResources": STR,
            "entrypointNumCpus": NUM,
            "entrypointNumGpus": NUM,
            "ttlSecondsAfterFinished": INT,
            "preRunningDeadlineSeconds": {"type": "integer", "minimum": 1},
            "shutdownAfterJobFinishes": BOOL,
            "suspend": BOOL,
        }
    ),
}


def resource(kind: str, spec: str) -> dict:
    return struct(
        {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": k8s("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
            "spec": ref(spec),
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )


def main() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://grokstudy.invalid/schemas/kuberay-v1.7.0.json",
        "$comment": " ".join(__doc__.split("\n\n")[1].split()),
        "$defs": {
            **DEFS,
            "RayCluster": resource("RayCluster", "RayClusterSpec"),
            "RayJob": resource("RayJob", "RayJobSpec"),
        },
    }
    target = Path(__file__).with_name("kuberay-v1.7.0.json")
    target.write_text(json.dumps(schema, indent=1) + "\n")
    print(f"{target}: {len(schema['$defs'])} definitions")


if __name__ == "__main__":
    main()
