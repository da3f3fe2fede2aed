"""Learner ranks follow the nodes their bundles landed on, whatever order Ray lists them in."""

from __future__ import annotations

from cluster.learner_group import ranks_by_node


def test_interleaved_bundles_are_ranked_node_by_node_with_bundle_zeros_node_first():
    # Bundle 0 sits on node B: B's bundles take ranks 0 and 1 (bundle 0 stays rank 0: its node
    # is the rendezvous), then the other nodes in name order.
    assert ranks_by_node(["B", "A", "B", "A"]) == [0, 2, 1, 3]
    assert ranks_by_node(["B", "C", "A", "C", "B", "A"]) == [0, 4, 2, 5, 1, 3]


def test_bundles_already_grouped_keep_their_order():
    assert ranks_by_node(["A", "A", "B", "B"]) == [0, 1, 2, 3]
    assert ranks_by_node(["X"]) == [0]
