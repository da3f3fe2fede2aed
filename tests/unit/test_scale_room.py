"""`rlrelay scale` warns when the cluster's free resources cannot hold the new workers now
(they wait for room rather than being refused, which on a fixed cluster is for ever)."""

from __future__ import annotations

from cluster.control import room_warning


def test_no_warning_when_every_new_worker_fits_or_the_pool_shrinks():
    assert room_warning(2, {"CPU": 0.5}, {"CPU": 1.0}) is None  # exactly enough
    assert room_warning(0, {"CPU": 4.0}, {}) is None
    assert room_warning(-3, {"CPU": 4.0}, {}) is None
    # 0.3 / 0.1 is 2.9999999999999996 in floats: three workers of 0.1 CPU fit in 0.3 free.
    assert room_warning(3, {"CPU": 0.1}, {"CPU": 0.3}) is None
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


def test_an_explicit_scale_outside_the_autoscale_bounds_is_refused_naming_them():
    # Taken, it was undone by the autoscaler at the next step, though the README says an
    # explicit request wins over the rule.
    import pytest

    from cluster.control import JobControl

    control = JobControl("run", autoscale_bounds=(2, 6))
    for n in (1, 7):
        with pytest.raises(ValueError, match=rf"job 'run' autoscales .* within \[2, 6\] .*; {n} is outside them"):
            control.request_scale(n)
    assert control.take_scale_request() is None  # nothing taken by a refusal
    control.request_scale(6)
    assert control.take_scale_request() == 6
    fixed = JobControl("run")  # no autoscaling: any size of at least one
    fixed.request_scale(12)
    assert fixed.take_scale_request() == 12
    with pytest.raises(ValueError, match="at least 1 worker"):
        fixed.request_scale(0)
