"""Learner placement on a multi-node Ray cluster (several raylets on this machine): the ranks'
bundles are packed per node, rank order follows the nodes, and a learner the cluster cannot
hold fails with a clear error instead of waiting for ever."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import remove_placement_group

from cluster.actor_set import WorkerFailure
from cluster.learner_group import learner_placement

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def three_nodes():
    # 1 CPU on the head, 2 on each of two more nodes: 5 CPUs over 3 nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="rlrelay-tests")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_ranks_are_packed_per_node_and_ordered_by_node(three_nodes):
    placement = learner_placement(world_size=4, num_cpus=1.0, num_gpus=0.0, timeout_s=60)
    try:
        nodes = placement.nodes
        assert sorted(placement.rank_bundles) == [0, 1, 2, 3]
        # PACK fills nodes before spilling: 4 one-CPU bundles on the two 2-CPU nodes, the
        # 1-CPU head left out (SPREAD would use all three nodes).
        assert len(set(nodes)) == 2 and all(nodes.count(n) == 2 for n in nodes), nodes
        # Ranks of a node are consecutive, and rank 0 is on the node of bundle 0 (the rendezvous).
        runs = [n for i, n in enumerate(nodes) if i == 0 or nodes[i - 1] != n]
        assert len(runs) == len(set(nodes)), nodes
        assert placement.rank_bundles[0] == 0
    finally:
        remove_placement_group(placement.group)


def test_ranks_that_fit_one_node_share_it(three_nodes):
    placement = learner_placement(world_size=2, num_cpus=1.0, num_gpus=0.0, timeout_s=60)
    try:
        assert len(set(placement.nodes)) == 1, placement.nodes  # SPREAD would put them on two nodes
    finally:
        remove_placement_group(placement.group)


def test_a_learner_the_cluster_cannot_hold_fails_with_a_clear_error(three_nodes):
    with pytest.raises(WorkerFailure, match=r"could not be placed within 3 s.*lacks free resources"):
        learner_placement(world_size=2, num_cpus=4.0, num_gpus=0.0, timeout_s=3)
