"""The Kubernetes manifests validated file by file with kubernetes-validate,
no cluster and no kubectl; kustomize renders them as a whole in
tests/programs/test_deploy_tools.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.harness.deploy import (
    K8S,
    KUSTOMIZATIONS,
    ROOT,
    k8s_errors,
)

# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------


def kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))


def resource_files(folder: Path) -> Iterator[Path]:
    """The manifest files a kustomization lists, following bases."""
    for entry in kustomization(folder).get("resources") or []:
        path = (folder / entry).resolve()
        if path.is_dir():
            yield from resource_files(path)
        else:
            yield path


def test_every_manifest_file_is_valid_kubernetes() -> None:
    """Each file the kustomizations list, on its own: no kustomize needed."""
    files = sorted({p for folder in KUSTOMIZATIONS.values() for p in resource_files(folder)})
    docs = [
        (path, doc)
        for path in files
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    ]
    assert len(files) >= 8 and docs
    errors = [f"{path.relative_to(ROOT)}: {e}" for path, doc in docs if (e := k8s_errors(doc))]
    assert errors == []


def test_kubernetes_validate_does_reject_a_bad_manifest() -> None:
    doc = yaml.safe_load((K8S / "base" / "router.yaml").read_text(encoding="utf-8").split("---")[0])
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    assert k8s_errors(doc)


def test_envoy_configmap_sources_are_current_copies() -> None:
    for copy, source in (
        ("envoy.yaml", "envoy/envoy.k8s.yaml"),
        ("llmmesh.binpb", "gen/llmmesh.binpb"),
    ):
        assert (K8S / "base" / "envoy" / copy).read_bytes() == (ROOT / source).read_bytes(), (
            f"stale copy; run: cp {source} deploy/k8s/base/envoy/{copy}"
        )
