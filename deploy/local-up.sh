#!/usr/bin/env bash
# facesvc on a local Kubernetes cluster, in one command: deploy/local-up.sh
#
# Needs docker, kind, helm and kubectl on PATH (and `make venv`'s .venv, which it creates).
# Creates a kind cluster (FACESVC_KIND_CLUSTER, default "facesvc") unless it exists,
# builds and loads the image, installs the Redis Cluster from the chart pinned in
# deploy/versions.env, creates the Secrets once (keys made here, never committed), applies
# deploy/overlays/local and waits for the rollout. Re-running it updates what changed and
# keeps the Secrets. Production: README "Deploying".
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/versions.env
. deploy/versions.env

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "local-up: $1 is not on PATH ($2)" >&2; exit 1; }
}
need docker "the image is built locally"
need kind "https://kind.sigs.k8s.io; or point kubectl at another cluster and set FACESVC_NO_KIND=1"
need helm "installs the Redis chart"
need kubectl "applies the manifests"

cluster=${FACESVC_KIND_CLUSTER:-facesvc}
ns=facesvc
if [ -z "${FACESVC_NO_KIND:-}" ]; then
    kind get clusters 2>/dev/null | grep -qx "$cluster" || kind create cluster --name "$cluster"
    kubectl config use-context "kind-$cluster" >/dev/null
fi

docker build -t facesvc:local .
[ -n "${FACESVC_NO_KIND:-}" ] || kind load docker-image facesvc:local --name "$cluster"

kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -

# Secrets: made once; a re-run keeps them (tokens in flight and templates stay valid).
secret_exists() { kubectl -n "$ns" get secret "$1" >/dev/null 2>&1; }
make venv >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! secret_exists facesvc-redis; then
    # Hex: the password goes into the service's redis+cluster:// URL unescaped.
    kubectl -n "$ns" create secret generic facesvc-redis \
        --from-literal=redis-password="$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(24))')"
fi
if ! secret_exists facesvc-token-keys; then
    FACESVC_TOKENS_KEY_DIR="$work/tokens" .venv/bin/facesvc keys generate
    kubectl -n "$ns" create secret generic facesvc-token-keys --from-file="$work/tokens"
fi
if ! secret_exists facesvc-template-keys; then
    FACESVC_TEMPLATES_KEY_FILE="$work/templates.key" .venv/bin/facesvc templates keygen
    kubectl -n "$ns" create secret generic facesvc-template-keys \
        --from-literal=templates.key="$(cat "$work/templates.key")"
fi
if ! secret_exists facesvc-api-keys; then
    FACESVC_SECURITY_API_KEYS_FILE="$work/api-keys.json" \
        .venv/bin/facesvc apikeys add --name local-admin --role admin --tenant local \
        | tee "$work/admin-key.txt"
    kubectl -n "$ns" create secret generic facesvc-api-keys --from-file="$work/api-keys.json"
    echo "local-up: the admin API key above is shown once; keep it." >&2
fi

# Without prometheus-operator's CRDs the chart's ServiceMonitor could not be created.
monitors=false
kubectl get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1 && monitors=true

helm upgrade --install "$REDIS_RELEASE" "$REDIS_CHART" --version "$REDIS_CHART_VERSION" \
    --namespace "$ns" -f deploy/redis/values.yaml -f deploy/redis/values-local.yaml \
    --set metrics.serviceMonitor.enabled="$monitors" \
    --wait --timeout 15m

kubectl apply -k deploy/overlays/local
kubectl -n "$ns" rollout status deployment/facesvc --timeout 15m

cat <<DONE
facesvc runs in namespace $ns. From this machine:
  kubectl -n $ns port-forward service/facesvc-grpc 50051:50051 &
  kubectl -n $ns port-forward service/facesvc-http 8080:8080 &
then call 127.0.0.1:50051 with the admin API key printed on the first run.
DONE
