#!/usr/bin/env bash
# End to end on a local kind cluster: the image, the Helm chart, the injector and a routing flip.
#
#   make e2e-kind            (or: bash scripts/e2e-kind.sh)
#
# 1. builds the sidecar's image (`make image`) and the fake provider's (`make image-fake`, the
#    Dockerfile's `fake-provider` target: the sidecar's image has no fake provider in it, which
#    is checked), and loads both into a kind cluster (Kubernetes 1.33, deploy/kind/cluster.yaml),
#    created unless it exists;
# 2. runs the fake provider (its image, `llm-sidecar-fake-provider --listen 0.0.0.0:9000`) in
#    the cluster as Deployment + Service `fake-provider.llm-sidecar.svc:9000`;
# 3. installs charts/llm-sidecar in namespace `llm-sidecar`, every provider's base_url pointed at
#    http://fake-provider.llm-sidecar.svc:9000/<provider>/v1, routing on the relay;
# 4. labels an app namespace for injection, creates dummy provider keys there, starts a pod
#    labelled `llm-sidecar.io/inject: "true"` (a curl image as the app), checks the sidecar was
#    injected as a native sidecar and the app got OPENAI_BASE_URL;
# 5. sends a chat request through $OPENAI_BASE_URL (answered by the relay, holysheep), flips
#    holy_sheep_routing_enabled to "false" in the ConfigMap, and shows the next answer coming
#    from the official provider (deepseek) without a restart; then runs `helm test`.
#
# The cluster is kept for a look around; the last lines say how to delete it.
# Needs docker (running), kind, kubectl and helm on PATH. Settings (environment):
#   CLUSTER     kind cluster name                     (llm-sidecar-e2e)
#   IMAGE       image to build and load               (ghcr.io/llm-sidecar/llm-sidecar:<Cargo.toml version>)
#   FAKE_IMAGE  the fake provider's image             (ghcr.io/llm-sidecar/llm-sidecar-fake-provider:<version>)
#   SKIP_BUILD  1: use IMAGE and FAKE_IMAGE already in docker (unset)
#   APP_NS      the app namespace                     (e2e-apps)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER=${CLUSTER:-llm-sidecar-e2e}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
IMAGE=${IMAGE:-ghcr.io/llm-sidecar/llm-sidecar:$VERSION}
FAKE_IMAGE=${FAKE_IMAGE:-ghcr.io/llm-sidecar/llm-sidecar-fake-provider:$VERSION}
APP_NS=${APP_NS:-e2e-apps}
RELEASE_NS=llm-sidecar
RELEASE=llm-sidecar
FAKE_URL="http://fake-provider.$RELEASE_NS.svc:9000"
CURL_IMAGE=curlimages/curl:8.14.1

step() { printf '\n== %s\n' "$*"; }
die() { printf 'e2e-kind: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------- tools
missing=()
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  die "missing on PATH: ${missing[*]}. Install them first:
  docker   https://docs.docker.com/engine/install/
  kind     https://kind.sigs.k8s.io/docs/user/quick-start/#installation
  kubectl  https://kubernetes.io/docs/tasks/tools/
  helm     https://helm.sh/docs/intro/install/"
fi
docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer (is it running? may this user use it?)"

# Everything below talks to the kind cluster only, never to the current kubectl context.
CONTEXT="kind-$CLUSTER"
k() { kubectl --context "$CONTEXT" "$@"; }
h() { helm --kube-context "$CONTEXT" "$@"; }

WORK=$(mktemp -d)
CLUSTER_UP=

# What went wrong, when something did.
diagnose() {
  local status=$?
  [ "$status" -eq 0 ] && return
  [ -n "$CLUSTER_UP" ] || return
  printf '\n== FAILED (exit %s); cluster state:\n' "$status" >&2
  k get pods -A -o wide >&2 || true
  k -n "$APP_NS" describe pod app >&2 || true
  k -n "$APP_NS" logs app -c llm-sidecar --tail=50 >&2 || true
  k -n "$RELEASE_NS" logs -l app.kubernetes.io/component=injector --tail=50 >&2 || true
  k -n "$RELEASE_NS" logs deploy/fake-provider --tail=20 >&2 || true
  printf '\nThe cluster is kept; delete it with: kind delete cluster --name %s\n' "$CLUSTER" >&2
}
trap 'diagnose; rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------- image
if [ "${SKIP_BUILD:-}" = 1 ]; then
  step "using the existing images $IMAGE and $FAKE_IMAGE (SKIP_BUILD=1)"
  for image in "$IMAGE" "$FAKE_IMAGE"; do
    docker image inspect "$image" >/dev/null 2>&1 || die "no image $image in docker; run without SKIP_BUILD"
  done
else
  step "building $IMAGE (make image) and $FAKE_IMAGE (make image-fake)"
  make -C "$ROOT" image IMAGE="$IMAGE"
  make -C "$ROOT" image-fake IMAGE_FAKE="$FAKE_IMAGE"
fi
# The sidecar's image has no fake provider: `fake-provider` is an unknown command there (exit 64).
# (An unparsable --listen, so that an image which still had it would fail at once, not serve.)
fake_status=0
docker run --rm "$IMAGE" fake-provider --listen not-an-address >/dev/null 2>"$WORK/fake-in-sidecar.err" || fake_status=$?
[ "$fake_status" = 64 ] && grep -q "unknown command \`fake-provider\`" "$WORK/fake-in-sidecar.err" ||
  die "the sidecar's image $IMAGE still answers \`fake-provider\` (exit $fake_status): $(cat "$WORK/fake-in-sidecar.err")"
REPO=${IMAGE%:*}
TAG=${IMAGE##*:}
[ "$REPO" != "$IMAGE" ] || die "IMAGE must carry a tag (repository:tag), got $IMAGE"

# ---------------------------------------------------------------------------- cluster
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  step "reusing kind cluster $CLUSTER"
else
  step "creating kind cluster $CLUSTER (deploy/kind/cluster.yaml)"
  kind create cluster --name "$CLUSTER" --config "$ROOT/deploy/kind/cluster.yaml" --wait 120s
fi
CLUSTER_UP=1
k version
step "loading $IMAGE and $FAKE_IMAGE into the cluster"
kind load docker-image "$IMAGE" "$FAKE_IMAGE" --name "$CLUSTER"

# ---------------------------------------------------------------------------- namespaces, keys
step "namespaces: $RELEASE_NS (chart) and $APP_NS (app, labelled for injection)"
for ns in "$RELEASE_NS" "$APP_NS"; do
  k create namespace "$ns" --dry-run=client -o yaml | k apply -f -
done
k label namespace "$APP_NS" llm-sidecar.io/inject=enabled --overwrite

# Dummy keys (the fake provider takes any), in the app namespace and in the release namespace,
# where `helm test` runs its injected pod.
for ns in "$APP_NS" "$RELEASE_NS"; do
  k -n "$ns" create secret generic llm-sidecar-provider-keys \
    --from-literal=HOLYSHEEP_API_KEY=e2e-relay-key \
    --from-literal=DEEPSEEK_API_KEY=e2e-deepseek-key \
    --from-literal=MOONSHOT_API_KEY=e2e-moonshot-key \
    --from-literal=MINIMAX_API_KEY=e2e-minimax-key \
    --from-literal=GEMINI_API_KEY=e2e-gemini-key \
    --from-literal=OPENAI_API_KEY=e2e-openai-key \
    --dry-run=client -o yaml | k apply -f -
done

# ---------------------------------------------------------------------------- fake provider
step "fake provider: $FAKE_URL"
k apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: fake-provider
  namespace: $RELEASE_NS
  labels: {app.kubernetes.io/name: fake-provider}
spec:
  replicas: 1
  selector:
    matchLabels: {app.kubernetes.io/name: fake-provider}
  template:
    metadata:
      labels: {app.kubernetes.io/name: fake-provider}
    spec:
      automountServiceAccountToken: false
      containers:
        - name: fake-provider
          image: $FAKE_IMAGE
          imagePullPolicy: IfNotPresent
          args: ["--listen", "0.0.0.0:9000"]
          ports:
            - {name: http, containerPort: 9000}
          readinessProbe:
            tcpSocket: {port: http}
            periodSeconds: 2
          securityContext:
            runAsNonRoot: true
            runAsUser: 65532
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: ["ALL"]}
---
apiVersion: v1
kind: Service
metadata:
  name: fake-provider
  namespace: $RELEASE_NS
spec:
  selector: {app.kubernetes.io/name: fake-provider}
  ports:
    - {name: http, port: 9000, targetPort: http}
EOF
k -n "$RELEASE_NS" rollout status deployment/fake-provider --timeout=120s

# ---------------------------------------------------------------------------- chart
step "helm install $RELEASE ./charts/llm-sidecar -n $RELEASE_NS (providers -> the fake provider)"
# The embedded default routing with every base_url at $FAKE_URL/<provider>/v1, printed by the
# image itself (`llm-sidecar default-config --upstream URL`).
docker run --rm "$IMAGE" default-config --upstream "$FAKE_URL" >"$WORK/routing.yaml"
grep -q "base_url: $FAKE_URL/holysheep/v1" "$WORK/routing.yaml" ||
  die "default-config --upstream did not point the relay at $FAKE_URL"
h upgrade --install "$RELEASE" "$ROOT/charts/llm-sidecar" -n "$RELEASE_NS" \
  --set image.repository="$REPO" \
  --set image.tag="$TAG" \
  --set flags.holy_sheep_routing_enabled=true \
  --set-file routing="$WORK/routing.yaml" \
  --set providerKeys.existingSecret=llm-sidecar-provider-keys \
  --set webhook.enabled=true \
  --wait --timeout 5m
k -n "$RELEASE_NS" get configmap llm-sidecar -o jsonpath='{.data.holy_sheep_routing_enabled}{"\n"}' |
  grep -qx true || die "the routing ConfigMap does not say holy_sheep_routing_enabled: \"true\""

# ---------------------------------------------------------------------------- app pod
step "app pod in $APP_NS, labelled llm-sidecar.io/inject: \"true\""
k -n "$APP_NS" delete pod app --ignore-not-found --wait=true
k apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: app
  namespace: $APP_NS
  labels:
    app.kubernetes.io/name: e2e-app
    llm-sidecar.io/inject: "true"
spec:
  terminationGracePeriodSeconds: 30
  containers:
    - name: app
      image: $CURL_IMAGE
      command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 2; done"]
      securityContext:
        runAsNonRoot: true
        runAsUser: 100
        allowPrivilegeEscalation: false
        capabilities: {drop: ["ALL"]}
EOF
k -n "$APP_NS" wait --for=condition=Ready pod/app --timeout=180s

step "checking the injection"
init=$(k -n "$APP_NS" get pod app -o jsonpath='{.spec.initContainers[*].name}')
policy=$(k -n "$APP_NS" get pod app -o jsonpath='{.spec.initContainers[?(@.name=="llm-sidecar")].restartPolicy}')
echo "  init containers: $init"
[[ " $init " == *" llm-sidecar "* ]] || die "no llm-sidecar init container: the injector did not inject"
[ "$policy" = Always ] || die "llm-sidecar has restartPolicy '$policy', not Always: not a native sidecar"
base_url=$(k -n "$APP_NS" exec app -c app -- printenv OPENAI_BASE_URL) || die "the app container has no OPENAI_BASE_URL"
echo "  app container: OPENAI_BASE_URL=$base_url"
# The sidecar's own check, in the distroless sidecar container: GET <base url>/models.
k -n "$APP_NS" exec app -c llm-sidecar -- /usr/local/bin/llm-sidecar probe models

# One chat completion from the app container through $OPENAI_BASE_URL (the script runs in the
# app container's shell); prints "provider path reason" from the response headers.
ask() {
  # shellcheck disable=SC2016 # expanded by the app container's shell, not here
  k -n "$APP_NS" exec app -c app -- sh -c '
    curl -sS --fail-with-body -D /tmp/headers -o /tmp/body --max-time 30 \
      "$OPENAI_BASE_URL/chat/completions" -H "content-type: application/json" \
      -H "authorization: Bearer ${OPENAI_API_KEY:-unused}" \
      -d "{\"model\":\"deepseek-v3.2\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello.\"}]}" ||
      { cat /tmp/body >&2; exit 1; }
    header() { tr -d "\r" </tmp/headers | sed -n "s/^$1: //p" | head -n 1; }
    echo "$(header x-llm-sidecar-provider) $(header x-llm-sidecar-path) $(header x-llm-sidecar-reason)"'
}

step "a request through \$OPENAI_BASE_URL (routing on: the relay answers)"
out=$(ask) || die "the request through the sidecar failed"
read -r provider path reason <<<"$out"
echo "  x-llm-sidecar-provider: $provider   x-llm-sidecar-path: $path   x-llm-sidecar-reason: $reason"
[ "$provider" = holysheep ] || die "expected the relay (holysheep) to answer, got '$provider'"

step "flip: kubectl -n $RELEASE_NS patch configmap llm-sidecar ... holy_sheep_routing_enabled=false"
k -n "$RELEASE_NS" patch configmap llm-sidecar --type merge -p '{"data":{"holy_sheep_routing_enabled":"false"}}'
flipped=
for _ in $(seq 40); do
  out=$(ask) || out=
  read -r provider path reason <<<"$out" || true
  if [ "$provider" = deepseek ]; then flipped=1; break; fi
  sleep 0.5
done
echo "  x-llm-sidecar-provider: $provider   x-llm-sidecar-path: $path   x-llm-sidecar-reason: $reason"
[ -n "$flipped" ] || die "after the flip the answer still comes from '$provider', not deepseek"
echo "  the official provider answers now, and the pod was not restarted:"
k -n "$APP_NS" get pod app -o jsonpath='  restarts of llm-sidecar: {.status.initContainerStatuses[?(@.name=="llm-sidecar")].restartCount}{"\n"}'

step "helm test $RELEASE -n $RELEASE_NS"
h test "$RELEASE" -n "$RELEASE_NS" --logs

step "passed"
cat <<EOF
The cluster is still running (kubectl context $CONTEXT). Look around:
  kubectl --context $CONTEXT -n $APP_NS get pod app -o yaml
  kubectl --context $CONTEXT -n $APP_NS logs app -c llm-sidecar
Routing is now off (official providers); helm upgrade, or another run, sets it back.
Delete the cluster:
  kind delete cluster --name $CLUSTER
EOF
