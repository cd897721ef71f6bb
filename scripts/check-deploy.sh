#!/usr/bin/env bash
# Validates deploy/k8s against the Kubernetes schemas, offline: kubernetes-validate (PyPI) ships
# the schemas of every Kubernetes release. Installed into target/ci-venv on first use.
# (deploy/systemd is checked by the test suite with systemd-analyze verify.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/ci-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'kubernetes-validate==1.37.0'
fi
# --strict rejects unknown fields (a typo'd key would otherwise be ignored by the API server).
# kustomization.yaml is kustomize's own format, not a Kubernetes resource.
"$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 \
  deploy/k8s/configmap.yaml deploy/k8s/deployment.yaml deploy/k8s/pdb.yaml \
  deploy/k8s/service.yaml deploy/k8s/secret.example.yaml
