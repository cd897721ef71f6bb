#!/usr/bin/env bash
# Checks deploy/ offline:
# - deploy/k8s against the Kubernetes schemas (kubernetes-validate, PyPI, ships the schemas of
#   every release) and against checkov's policies (PyPI; each finding left on purpose is skipped
#   with its reason in an annotation or comment beside it). Both live in target/ci-venv,
#   installed on first use.
# - deploy/k8s/networkpolicy.yaml: every egress rule names its peers (not a port alone).
# - deploy/prometheus: promtool (Debian package `prometheus`, installed like scripts/services.sh
#   installs the servers) checks the rule file and runs its unit tests; the PrometheusRule must
#   hold the same groups as the rule file.
# (deploy/systemd is checked by the test suite with systemd-analyze verify.)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

venv=target/ci-venv
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/checkov" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'kubernetes-validate==1.37.0' 'checkov==3.3.30'
fi
# --strict rejects unknown fields (a typo'd key would otherwise be ignored by the API server).
# kustomization.yaml is kustomize's own format, not a Kubernetes resource.
"$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 \
  deploy/k8s/namespace.yaml deploy/k8s/networkpolicy.yaml deploy/k8s/configmap.yaml \
  deploy/k8s/deployment.yaml deploy/k8s/pdb.yaml deploy/k8s/service.yaml \
  deploy/k8s/secret.example.yaml
# --skip-download: offline, with the policies the package ships. Exits non-zero on a finding.
"$venv/bin/checkov" -d deploy/k8s --quiet --compact --skip-download

if ! command -v promtool >/dev/null; then
  echo "check-deploy: installing prometheus (for promtool)" >&2
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null || true
fi
if ! command -v promtool >/dev/null; then
  echo "check-deploy: promtool is missing (Debian package prometheus); cannot check deploy/prometheus" >&2
  exit 1
fi
promtool check rules deploy/prometheus/alerts.yaml
(cd deploy/prometheus && promtool test rules alerts.test.yaml)
"$venv/bin/python" - <<'PY'
import sys, yaml
rules = yaml.safe_load(open("deploy/prometheus/alerts.yaml"))
operator = yaml.safe_load(open("deploy/prometheus/prometheusrule.yaml"))
if rules["groups"] != operator["spec"]["groups"]:
    sys.exit("deploy/prometheus/prometheusrule.yaml does not hold the same rules as alerts.yaml")
print("prometheusrule.yaml holds the same rules as alerts.yaml")
# Egress by port alone would let the pods reach any host on 6379/3306: every egress rule must
# name its peers (selectors, or an ipBlock narrower than the whole Internet).
policy = yaml.safe_load(open("deploy/k8s/networkpolicy.yaml"))
for i, rule in enumerate(policy["spec"]["egress"]):
    peers = rule.get("to") or []
    if not peers:
        sys.exit(f"networkpolicy.yaml: egress rule {i} allows its ports to any peer; add a `to:`")
    for peer in peers:
        cidr = (peer.get("ipBlock") or {}).get("cidr", "")
        if cidr.endswith("/0"):
            sys.exit(f"networkpolicy.yaml: egress rule {i} allows {cidr}; narrow it")
print("networkpolicy.yaml: every egress rule names its peers")
PY
