"""Three-way patches: what the operator applied and no longer renders is removed; others' fields are kept."""

from __future__ import annotations

import pytest

from deepseek_operator.k8s import KEEP_WHEN_DROPPED, three_way_patch


@pytest.mark.parametrize(
    "last, desired, keep, expected",
    [
        ({}, {"a": 1}, (), {"a": 1}),
        ({"a": 1, "b": 2}, {"a": 1}, (), {"a": 1, "b": None}),
        ({"spec": {"nodeSelector": {"x": "1"}, "image": "i"}}, {"spec": {"image": "j"}}, (),
         {"spec": {"image": "j", "nodeSelector": None}}),
        ({"spec": {"nodeSelector": {"x": "1", "y": "2"}}}, {"spec": {"nodeSelector": {"x": "1"}}}, (),
         {"spec": {"nodeSelector": {"x": "1", "y": None}}}),
        ({"spec": {"list": [1, 2]}}, {"spec": {"list": [1]}}, (), {"spec": {"list": [1]}}),
        ({"spec": {"replicas": 3, "x": 1}}, {"spec": {"x": 1}}, KEEP_WHEN_DROPPED["Deployment"], {"spec": {"x": 1}}),
        ({"spec": {"replicas": 3}}, {"spec": {"replicas": 2}}, KEEP_WHEN_DROPPED["Deployment"],
         {"spec": {"replicas": 2}}),
    ],
)
def test_three_way_patch(last, desired, keep, expected):
    assert three_way_patch(last, desired, keep) == expected


def test_fields_nobody_applied_are_not_touched():
    patch = three_way_patch({"spec": {"a": 1}}, {"spec": {"a": 2}})
    assert patch == {"spec": {"a": 2}}  # e.g. a Service's clusterIP, set by the API server, is not in the patch
