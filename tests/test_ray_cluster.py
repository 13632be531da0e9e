"""Ray Serve across nodes, for real, on one machine: ``ray.cluster_utils.Cluster`` starts a head and a worker
node (1 CPU each, loopback only); stopped at the end. Its own module: ``tests/test_ray_serve.py`` holds a
local Ray for its whole module."""

from __future__ import annotations

import pytest
from conftest import free_port
from test_ray_serve import TEXTS, _deploy, _load

from toolkit.server.ray import DEPLOYMENT, ScaleOptions

serve = pytest.importorskip("ray.serve", reason="Ray Serve (the [serve] extra) is not installed")


def test_a_two_node_cluster_serves_from_both_nodes(tiny_artifact, tiny):
    """``ray.cluster_utils.Cluster``: a head and a worker node of 1 CPU each on this machine; two 1-CPU replicas
    land one per node, and the proxy's answers are right."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _deploy(tiny_artifact, ScaleOptions(replicas=2))
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "SERVE_REPLICA" in a["name"] and DEPLOYMENT in a["name"]]
        nodes = {ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).__ray_call__.remote(
            lambda self: ray.get_runtime_context().get_node_id()), timeout=30) for a in replicas}
        assert len(replicas) == 2 and len(nodes) == 2 and nodes <= {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        results = _load(f"http://127.0.0.1:{port}", tiny.embed(TEXTS), seconds=3, clients=2, limit=20)
        assert results and all(status == 200 and ok for status, ok in results)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
