"""Every Kubernetes manifest in launch/k8s/, validated strictly (an unknown field fails) against real schemas.

- Built-in kinds (Service, ServiceAccount, Job) and every pod or Job template embedded in an operator's
  object: the Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships, one set per Kubernetes
  release, in their ``-strict`` form, for EVERY release from the minimum a file's header claims
  ("Kubernetes >= 1.NN") up to the newest one bundled. A release missing from the bundle fails the test.
- PyTorchJob (Kubeflow Training Operator v1): the operator's API models of ``kubeflow-training``
  (``openapi_types``/``attribute_map`` generated from the CRD's Go types), walked key by key.
- TrainJob/TrainingRuntime (Kubeflow Trainer v2, JobSet): the API models of ``kubeflow-trainer-api``
  (pydantic, generated from the Trainer's OpenAPI spec), turned into a JSON Schema with
  ``additionalProperties: false`` on every object.
- What the manifests must say: successPolicy on index 0, the exit-code policy, Guaranteed QoS, a
  /dev/shm that fits the memory limit, a securityContext the ``restricted`` Pod Security Standard accepts,
  the grace period handed to the trainer, the legacy label of the PyTorchJob.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubeflow.training import models as training_v1
from kubeflow_trainer_api import models as trainer_v2
from referencing import Registry, Resource

from elastic_det.errors import FINAL_EXIT_CODES

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "launch" / "k8s"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml"))
NEWEST = kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())  # 1.37 in 1.37.0
FINAL_CODES = set(FINAL_EXIT_CODES)  # 2, 3, 4, 65
RETRYABLE_CODES = {75, 143}  # INFRASTRUCTURE_EXIT_CODE, PREEMPTED_EXIT_CODE


def load(name: str) -> list[dict]:
    with open(K8S / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def claimed_versions(name: str) -> list[str]:
    """Every Kubernetes minor release from the header's "Kubernetes >= 1.NN" to NEWEST."""
    header = "".join(line for line in (K8S / name).read_text().splitlines(keepends=True) if line.startswith("#"))
    found = re.search(r"Kubernetes >= 1\.(\d+)", header)
    assert found, f"{name}: the header must state the minimum Kubernetes version ('Kubernetes >= 1.NN')"
    newest = int(NEWEST.split(".")[1])
    return [f"1.{minor}" for minor in range(int(found.group(1)), newest + 1)]


# ----------------------------------------------------------------------------------------------------------
# Kubernetes schemas (kubernetes-validate's bundle)


def _schema_dir(version: str):
    import importlib.resources

    path = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    assert path.is_dir(), f"kubernetes-validate has no strict schemas for Kubernetes {version}"
    return path


@cache
def _definitions(version: str) -> tuple[Resource, str]:
    contents = json.loads((_schema_dir(version) / "_definitions.json").read_text())
    return Resource.from_contents(contents), contents["$id"]


def validate_k8s(doc: dict, version: str) -> None:
    """A whole built-in object, strictly, against exactly this release's schema (no fallback to an older one)."""
    _schema_dir(version)
    assert kubernetes_validate.validate(doc, version, strict=True) == version


def validate_k8s_part(value: Any, definition: str, version: str) -> None:
    """A piece of an object (a PodTemplateSpec, a JobTemplateSpec, ...) against this release's definition."""
    resource, uri = _definitions(version)
    registry = Registry().with_resource(uri, resource)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": f"{uri}#/$defs/{definition}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(value)


# ----------------------------------------------------------------------------------------------------------
# Kubeflow Training Operator v1 (PyTorchJob): its generated API models, walked strictly

# The Kubernetes types the v1 models refer to, checked against the Kubernetes schemas of each release.
K8S_TYPES = {"V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
             "V1PodTemplateSpec": "io.k8s.api.core.v1.PodTemplateSpec"}


def validate_v1_model(value: Any, type_name: str, version: str, path: str = "") -> None:
    if type_name in K8S_TYPES:
        validate_k8s_part(value, K8S_TYPES[type_name], version)
        return
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        assert isinstance(value, list), f"{path}: expected a list"
        for i, item in enumerate(value):
            validate_v1_model(item, m.group(1), version, f"{path}[{i}]")
        return
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        assert isinstance(value, dict), f"{path}: expected a map"
        for key, item in value.items():
            validate_v1_model(item, m.group(1), version, f"{path}.{key}")
        return
    scalars = {"str": str, "int": int, "bool": bool, "object": object}
    if type_name in scalars:
        assert isinstance(value, scalars[type_name]) and not (type_name == "int" and isinstance(value, bool)), (
            f"{path}: {value!r} is not a {type_name}")
        return
    model = getattr(training_v1, type_name, None)
    assert model is not None, f"{path}: no model {type_name} in kubeflow-training"
    assert isinstance(value, dict), f"{path}: expected an object ({type_name})"
    by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
    unknown = sorted(set(value) - set(by_json))
    assert not unknown, f"{path}: unknown field(s) {unknown} in {type_name}"
    for key, item in value.items():
        validate_v1_model(item, model.openapi_types[by_json[key]], version, f"{path}.{key}")


# ----------------------------------------------------------------------------------------------------------
# Kubeflow Trainer v2 (TrainJob, TrainingRuntime, JobSet): its generated pydantic models as a strict schema

# openapi-generator models Kubernetes' string-or-number formats as objects; on the wire they are scalars.
SCALAR_DEFS = {"IoK8sApimachineryPkgApiResourceQuantity": {"type": ["string", "number"]},
               "IoK8sApimachineryPkgUtilIntstrIntOrString": {"type": ["string", "integer"]}}


def _strict(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


@cache
def trainer_v2_schema(kind: str) -> dict:
    model = {"TrainJob": trainer_v2.TrainerV1alpha1TrainJob,
             "TrainingRuntime": trainer_v2.TrainerV1alpha1TrainingRuntime}[kind]
    schema = model.model_json_schema(by_alias=True)
    for name, replacement in SCALAR_DEFS.items():
        assert name in schema["$defs"] or kind == "TrainJob", f"{name} is not in the {kind} schema any more"
        if name in schema["$defs"]:
            schema["$defs"][name] = replacement
    _strict(schema)
    return schema


def validate_trainer_v2(doc: dict) -> None:
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(trainer_v2_schema(doc["kind"])).iter_errors(doc))
    if error is not None:  # best_match: the innermost reason, not "not valid under any of the given schemas"
        raise error


# ----------------------------------------------------------------------------------------------------------
# One entry point per document


def validate_doc(doc: dict, version: str) -> None:
    kind = doc["kind"]
    if kind == "PyTorchJob":
        assert doc["apiVersion"] == "kubeflow.org/v1"
        validate_v1_model(doc, "KubeflowOrgV1PyTorchJob", version, "PyTorchJob")
    elif kind in ("TrainJob", "TrainingRuntime"):
        assert doc["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
        validate_trainer_v2(doc)
        if kind == "TrainingRuntime":
            for job in doc["spec"]["template"]["spec"]["replicatedJobs"]:
                validate_k8s_part(job["template"], "io.k8s.api.batch.v1.JobTemplateSpec", version)
        else:
            trainer = doc["spec"]["trainer"]
            validate_k8s_part(trainer["resourcesPerNode"], "io.k8s.api.core.v1.ResourceRequirements", version)
            for var in trainer.get("env", []):
                validate_k8s_part(var, "io.k8s.api.core.v1.EnvVar", version)
    else:
        validate_k8s(doc, version)


CASES = [(name, version) for name in MANIFESTS for version in claimed_versions(name)]


def test_the_manifests_are_there():
    assert {"indexed-job.yaml", "pytorchjob.yaml", "trainjob.yaml", "serviceaccount.yaml",
            "rdzv-store.yaml"} <= set(MANIFESTS)


@pytest.mark.parametrize("name, version", CASES, ids=[f"{n}-k8s{v}" for n, v in CASES])
def test_manifest_is_valid_for_every_claimed_kubernetes_release(name, version):
    for doc in load(name):
        validate_doc(doc, version)


# Strictness itself: an unknown field anywhere must fail, or the validation above proves nothing.
def _poke(doc: dict, path: list[str | int]) -> dict:
    bad = copy.deepcopy(doc)
    node = bad
    for key in path:
        node = node[key]
    node["notAField"] = 1
    return bad


POKES = [
    ("indexed-job.yaml", "Job", ["spec"]),
    ("indexed-job.yaml", "Job", ["spec", "template", "spec", "containers", 0, "securityContext"]),
    ("indexed-job.yaml", "Service", ["spec"]),
    ("pytorchjob.yaml", "PyTorchJob", ["spec", "elasticPolicy"]),
    ("pytorchjob.yaml", "PyTorchJob", ["spec", "pytorchReplicaSpecs", "Worker", "template", "spec"]),
    ("trainjob.yaml", "TrainJob", ["spec", "trainer"]),
    ("rdzv-store.yaml", "Deployment", ["spec", "template", "spec", "containers", 0]),
    ("rdzv-store.yaml", "PodDisruptionBudget", ["spec"]),
    ("trainjob.yaml", "TrainingRuntime", ["spec", "template", "spec", "failurePolicy"]),
    ("trainjob.yaml", "TrainingRuntime",
     ["spec", "template", "spec", "replicatedJobs", 0, "template", "spec", "template", "spec", "containers", 0]),
]


@pytest.mark.parametrize("name, kind, path", POKES)
def test_an_unknown_field_fails_validation(name, kind, path):
    (doc,) = [d for d in load(name) if d["kind"] == kind]
    bad = _poke(doc, path)
    with pytest.raises((jsonschema.ValidationError, AssertionError), match="notAField"):
        validate_doc(bad, claimed_versions(name)[0])


def test_pod_condition_without_status_fails_up_to_1_34():
    """The reason every rule writes `status`: the published schemas up to 1.34 require it (1.35 does not)."""
    (job,) = [d for d in load("indexed-job.yaml") if d["kind"] == "Job"]
    bad = copy.deepcopy(job)
    for rule in bad["spec"]["podFailurePolicy"]["rules"]:
        for condition in rule.get("onPodConditions", []):
            del condition["status"]
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(bad, "1.34")
    validate_k8s(bad, "1.35")


# ----------------------------------------------------------------------------------------------------------
# What the manifests must say


def _quantity(text: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text))
    assert m and (m.group(2) in units or not m.group(2)), text
    return float(m.group(1)) * units.get(m.group(2), 1)


def _pods() -> list[tuple[str, dict, dict]]:
    """(file, pod spec, resources of its training container) for every pod template we ship."""
    out = []
    (job,) = [d for d in load("indexed-job.yaml") if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    out.append(("indexed-job.yaml", pod, pod["containers"][0]["resources"]))
    (ptj,) = load("pytorchjob.yaml")
    pod = ptj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    out.append(("pytorchjob.yaml", pod, pod["containers"][0]["resources"]))
    runtime, trainjob = (next(d for d in load("trainjob.yaml") if d["kind"] == k) for k in ("TrainingRuntime",
                                                                                          "TrainJob"))
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    out.append(("trainjob.yaml", pod, trainjob["spec"]["trainer"]["resourcesPerNode"]))
    return out


@pytest.mark.parametrize("name, pod, resources", _pods(), ids=lambda x: x if isinstance(x, str) else "")
def test_pods_are_guaranteed_restricted_and_know_their_grace(name, pod, resources):
    # Guaranteed QoS: CPU and memory requested = limited (GPUs too), so the kubelet evicts these last.
    for res in ("cpu", "memory", "nvidia.com/gpu"):
        assert str(resources["requests"][res]) == str(resources["limits"][res]), (name, res)
    # The in-memory /dev/shm counts against the memory limit: it must fit with room for the processes.
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert _quantity(shm["emptyDir"]["sizeLimit"]) <= _quantity(resources["limits"]["memory"]) / 2, name

    # The `restricted` Pod Security Standard (v1.31+): non-root, no escalation, no capabilities, seccomp.
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        csc = container["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"]["drop"] == ["ALL"]
        assert not csc.get("privileged") and "add" not in csc["capabilities"]
        assert "hostPort" not in json.dumps(container.get("ports", []))
    assert not any(k in pod for k in ("hostNetwork", "hostPID", "hostIPC"))
    allowed = {"emptyDir", "persistentVolumeClaim", "secret", "configMap", "projected", "downwardAPI", "csi",
               "ephemeral", "name"}
    for volume in pod["volumes"]:
        assert set(volume) <= allowed, volume

    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["ELASTIC_DET_GRACE_SECONDS"]["value"] == str(pod["terminationGracePeriodSeconds"])
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]["value"] == "1"
    # Room for the store host's replacement pod before the other supervisors give up (exit 4, final).
    # a replaced pod 0 (the store host) makes the others' attempts fail fast: give up only after minutes
    assert int(env["MAX_STALLED_ATTEMPTS"]["value"]) >= 3 and int(env["MIN_STALL_SECONDS"]["value"]) >= 300
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # never inline; optional: workload identity
        assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert pod["serviceAccountName"] == "elastic-det"


def _exit_code_actions(job_spec: dict, container: str) -> dict[int, str]:
    actions: dict[int, str] = {}
    for rule in job_spec["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes")
        if codes:
            assert codes["operator"] == "In" and codes["containerName"] == container
            for code in codes["values"]:
                actions.setdefault(code, rule["action"])
    return actions


def _indexed_job_specs() -> list[tuple[str, dict, str]]:
    (job,) = [d for d in load("indexed-job.yaml") if d["kind"] == "Job"]
    runtime = next(d for d in load("trainjob.yaml") if d["kind"] == "TrainingRuntime")
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return [("indexed-job.yaml", job["spec"], "trainer"), ("trainjob.yaml", node["template"]["spec"], "node")]


@pytest.mark.parametrize("name, spec, container", _indexed_job_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_job_policy_acts_on_the_supervisor_exit_codes(name, spec, container):
    assert spec["completionMode"] == "Indexed"
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}  # index 0 done = the Job done
    assert spec["backoffLimitPerIndex"] >= 1
    assert spec["podReplacementPolicy"] == "Failed"  # a new pod 0 only once the old one is gone
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert [c["name"] for c in pod["containers"]] == [container]
    actions = _exit_code_actions(spec, container)
    assert {code: actions.get(code) for code in FINAL_CODES} == dict.fromkeys(FINAL_CODES, "FailJob")
    assert {code: actions.get(code) for code in RETRYABLE_CODES} == dict.fromkeys(RETRYABLE_CODES, "Ignore")
    assert 1 not in actions and 137 not in actions  # a crash / OOM kill is counted per index
    assert any(rule["action"] == "Ignore" and {"type": "DisruptionTarget", "status": "True"}
               in rule.get("onPodConditions", []) for rule in spec["podFailurePolicy"]["rules"])


def test_indexed_job_rendezvous_and_service():
    docs = load("indexed-job.yaml")
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    spec = job["spec"]
    assert spec["completions"] == spec["parallelism"] >= 1
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert int(env["MAX_NODES"]["value"]) == spec["parallelism"]
    # the default (RDZV_MODE=external) is the store's Service; pod 0 is the name first-node mode documents
    assert env["RDZV_MODE"]["value"] == "external"
    assert env["RDZV_HOST"]["value"] == _store()["Service"]["metadata"]["name"]
    assert f"{job['metadata']['name']}-0.{svc['metadata']['name']}" in (K8S / "indexed-job.yaml").read_text()
    script = pod["containers"][0]["args"][0]
    shutdown = int(re.search(r"--shutdown-timeout=(\d+)", script).group(1))
    assert pod["terminationGracePeriodSeconds"] > shutdown >= 60
    assert "exec /opt/elastic_det/launch/elastic_run.sh" in script


def test_pytorchjob_is_the_legacy_operator_and_cleans_up_running_pods():
    header = (K8S / "pytorchjob.yaml").read_text().splitlines()[0]
    assert header.startswith("# LEGACY") and "Training Operator v1" in header
    (job,) = load("pytorchjob.yaml")
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    # ExitCode: 128-255 (143 preempted, 137 killed) restart the pod; 1-127 (2, 3, 4 final) fail the job.
    assert worker["restartPolicy"] == "ExitCode"
    policy = job["spec"]["elasticPolicy"]
    assert policy["minReplicas"] <= worker["replicas"] <= policy["maxReplicas"]
    (container,) = worker["template"]["spec"]["containers"]
    assert container["name"] == "pytorch"
    assert {"name": "pytorchjob-port", "containerPort": 29400, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e for e in container["env"]}
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] > int(env["PET_SHUTDOWN_TIMEOUT"]["value"])


def test_trainjob_uses_its_runtime_at_a_fixed_size():
    runtime, trainjob = (next(d for d in load("trainjob.yaml") if d["kind"] == k) for k in ("TrainingRuntime",
                                                                                          "TrainJob"))
    ref = trainjob["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"], ref["apiGroup"]) == ("TrainingRuntime", runtime["metadata"]["name"],
                                                           "trainer.kubeflow.org")
    assert "torch" in runtime["spec"]["mlPolicy"]
    assert trainjob["spec"]["trainer"]["numNodes"] == runtime["spec"]["mlPolicy"]["numNodes"]
    jobset = runtime["spec"]["template"]["spec"]
    (rule,) = jobset["failurePolicy"]["rules"]
    assert (rule["action"], rule["onJobFailureReasons"]) == ("FailJobSet", ["PodFailurePolicy"])
    (node,) = jobset["replicatedJobs"]
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    (container,) = node["template"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1].endswith("launch/elastic_run.sh")
    args = trainjob["spec"]["trainer"]["args"]
    assert args[:2] == ["-m", "elastic_det.train"] and args[args.index("--work-dir") + 1].startswith("s3://")


# ----------------------------------------------------------------------------------------------------------
# The external rendezvous store: the default for preemptible capacity


def _store() -> dict[str, dict]:
    return {d["kind"]: d for d in load("rdzv-store.yaml")}


def test_the_store_is_one_guarded_pod_behind_its_service():
    store = _store()
    deployment, service, pdb = store["Deployment"], store["Service"], store["PodDisruptionBudget"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() and pdb["spec"]["minAvailable"] == 1
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[command.index("-m") + 1] == "elastic_det.store"
    port = int(command[command.index("--port") + 1])
    assert service["spec"]["ports"][0]["targetPort"] == port == container["ports"][0]["containerPort"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["capabilities"] == {
        "drop": ["ALL"]}
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]  # on-demand nodes
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]


def _indexed_job_command(index: int, **env: str) -> str:
    """The Indexed Job's container script, run by bash with elastic_run.sh replaced by echo."""
    import subprocess

    (job,) = [d for d in load("indexed-job.yaml") if d["kind"] == "Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    script = container["args"][0].replace("exec /opt/elastic_det/launch/elastic_run.sh", "echo")
    run_env = {"PATH": "/usr/bin:/bin", **values, "RDZV_ID": "uid", "JOB_COMPLETION_INDEX": str(index), **env}
    return subprocess.run(["bash", "-c", script], env=run_env, capture_output=True, text=True, check=True).stdout


def test_the_launch_files_meet_at_the_external_store_by_default():
    service = _store()["Service"]
    endpoint = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for index in (0, 1):  # pod 0 included: no pod hosts the store
        line = _indexed_job_command(index)
        assert f"--rdzv-endpoint={endpoint}" in line and "is_host=0" in line, line
    first_node = _indexed_job_command(0, RDZV_MODE="first-node", RDZV_HOST="elastic-det-0.elastic-det")
    assert "is_host=1" in first_node and "elastic-det-0.elastic-det:29400" in first_node
    assert "is_host=0" in _indexed_job_command(1, RDZV_MODE="first-node")

    runtime = next(d for d in load("trainjob.yaml") if d["kind"] == "TrainingRuntime")
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in node["containers"][0]["env"]}
    assert env["PET_RDZV_BACKEND"]["value"] == "c10d" and env["PET_RDZV_ENDPOINT"]["value"] == endpoint
    assert "is_host=false" in env["PET_RDZV_CONF"]["value"].split(",")
    assert "uid" in env["PET_RDZV_ID"]["valueFrom"]["fieldRef"]["fieldPath"]  # unique per TrainJob
