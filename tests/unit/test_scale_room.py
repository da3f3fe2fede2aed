"""`rlrelay scale` warns when the cluster's free resources cannot hold the new workers now
(they wait for room rather than being refused, which on a fixed cluster is for ever)."""

from __future__ import annotations

from cluster.control import room_warning


def test_no_warning_when_every_new_worker_fits_or_the_pool_shrinks():
    assert room_warning(2, {"CPU": 0.5}, {"CPU": 1.0}) is None  # exactly enough
    assert room_warning(0, {"CPU": 4.0}, {}) is None
    assert room_warning(-3, {"CPU": 4.0}, {}) is None
    assert room_warning(3, {"CPU": 0.1}, {"CPU": 0.30000000000000004}) is None  # float sums of 0.1


def test_warning_names_how_many_fit_and_the_short_resource():
    warning = room_warning(4, {"CPU": 1.0}, {"CPU": 2.5, "memory": 1e9})
    assert warning is not None
    assert "room for 2 of the 4 new rollout worker(s)" in warning
    assert "CPU 4 needed, 2.5 free" in warning and "the other 2 wait" in warning


def test_the_scarcest_resource_decides_and_only_short_ones_are_named():
    warning = room_warning(3, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 1.0})
    assert "room for 1 of the 3" in warning
    assert "GPU 3 needed, 1 free" in warning and "CPU" not in warning.split("(")[1]


def test_a_resource_the_cluster_lacks_means_no_room():
    warning = room_warning(1, {"CPU": 0.5, "GPU": 1.0}, {"CPU": 8.0})
    assert "room for 0 of the 1" in warning and "GPU 1 needed, 0 free" in warning
