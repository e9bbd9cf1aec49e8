"""The emulator's server-side apply (kube_harness): the rules the operator's drift repair relies on."""

from __future__ import annotations

import pytest

from kube_harness import Conflict, managers, record_update, server_side_apply

DEP = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "n"},
       "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "t", "image": "a"}]}}}}


def without_replicas(obj: dict) -> dict:
    spec = {k: v for k, v in obj["spec"].items() if k != "replicas"}
    return {**obj, "spec": spec}


def test_apply_creates_and_records_the_managers_fields():
    live = server_side_apply(None, DEP, "op", force=True)
    assert live["spec"] == DEP["spec"]
    assert ("spec", "replicas") in managers(live)[("op", "Apply")]


def test_a_field_the_manager_drops_is_removed_unless_another_manager_owns_it():
    live = server_side_apply(None, DEP, "op", force=True)
    assert "replicas" not in server_side_apply(live, without_replicas(DEP), "op", force=True)["spec"]
    # The HPA changed the count: it owns it now, and the operator's apply without replicas leaves it.
    scaled = dict(live)
    scaled.update({"spec": {**live["spec"], "replicas": 5}})
    scaled["metadata"] = {**live["metadata"], **record_update(live, {"spec": {"replicas": 5}}, "hpa")["metadata"]}
    after = server_side_apply(scaled, without_replicas(DEP), "op", force=True)
    assert after["spec"]["replicas"] == 5


def test_force_takes_back_a_hand_edit_and_without_force_it_conflicts():
    live = server_side_apply(None, DEP, "op", force=True)
    edit = {"spec": {"template": {"spec": {"containers": [{"name": "t", "image": "evil"}]}}}}
    edited = {**live, "spec": {**live["spec"], "template": edit["spec"]["template"]},
              "metadata": {**live["metadata"], **record_update(live, edit, "kubectl")["metadata"]}}
    assert server_side_apply(edited, DEP, "op", force=True)["spec"]["template"] == DEP["spec"]["template"]
    with pytest.raises(Conflict):
        server_side_apply(edited, DEP, "op", force=False)


def test_an_unchanged_apply_changes_nothing():
    live = server_side_apply(None, DEP, "op", force=True)
    assert server_side_apply(live, DEP, "op", force=True) == live
