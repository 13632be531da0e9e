"""The deployment files in ``deploy/``, checked offline: the Kubernetes objects against Kubernetes' own schemas
(the ``kubernetes-validate`` package bundles them), the RayService's pod templates likewise (KubeRay's CRD schema
is not bundled) and its ``serveConfigV2`` against ``toolkit.server.ray:app``'s own arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = "1.37.0"


def test_the_kubernetes_form_validates_and_probes_real_routes():
    from typer.testing import CliRunner

    from toolkit.cli import app
    from toolkit.server.app import create_app
    from toolkit.server.models import ModelRegistry

    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S, strict=True)
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    routes = {r.path for r in create_app(ModelRegistry([])).routes}
    assert {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")} <= routes
    assert container["args"][:2] == ["toolkit", "serve"]
    usage = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"}).output
    assert all(flag in usage for flag in container["args"] if flag.startswith("--"))
    broken = docs[0]
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        kubernetes_validate.validate(broken, K8S, strict=True)


def test_the_rayservice_pod_templates_validate_and_its_serve_config_is_accepted():
    from toolkit.server.ray import parse_args

    doc = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    cluster = doc["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, K8S, strict=True)
    (application,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "toolkit.server.ray:app"
    paths, names, server, runtime, scale = parse_args(application["args"], check_files=False)
    assert len(paths) == 2 and scale.autoscaling()["max_replicas"] == 8 and scale.models_per_replica == 2
    with pytest.raises(Exception, match="valid ones are"):
        parse_args({**application["args"], "replica": "2"}, check_files=False)
