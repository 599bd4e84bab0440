{{/*
Names, labels and the one sidecar container spec of the chart. The sidecar container is rendered
by `llm-sidecar.sidecarContainer` only: the injector's template ConfigMap and the `helm test`
pod both include it, so what gets injected is exactly what the chart renders and tests.
*/}}

{{- define "llm-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Base name of every resource. A release whose name already contains the chart name (the usual
`helm install llm-sidecar ...`) is not repeated: `llm-sidecar`, not `llm-sidecar-llm-sidecar`.
Kept to 52 characters so that `<fullname>-injector-tls` still fits a 63-character name.
*/}}
{{- define "llm-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-sidecar.labels" -}}
helm.sh/chart: {{ include "llm-sidecar.chart" . }}
{{ include "llm-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-sidecar
{{- end }}

{{- define "llm-sidecar.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The routing ConfigMap every sidecar watches. */}}
{{- define "llm-sidecar.configMapName" -}}
{{- default (include "llm-sidecar.fullname" .) .Values.configMap.name }}
{{- end }}

{{/* The Secret the sidecar takes its provider keys from (envFrom). */}}
{{- define "llm-sidecar.secretName" -}}
{{- if .Values.providerKeys.create }}
{{- printf "%s-provider-keys" (include "llm-sidecar.fullname" .) }}
{{- else }}
{{- .Values.providerKeys.existingSecret }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.serviceAccountName" -}}
{{- include "llm-sidecar.fullname" . }}
{{- end }}

{{- define "llm-sidecar.injectorName" -}}
{{- printf "%s-injector" (include "llm-sidecar.fullname" .) }}
{{- end }}

{{- define "llm-sidecar.injectorTlsSecretName" -}}
{{- printf "%s-injector-tls" (include "llm-sidecar.fullname" .) }}
{{- end }}

{{- define "llm-sidecar.injectTemplateName" -}}
{{- printf "%s-inject" (include "llm-sidecar.fullname" .) }}
{{- end }}

{{- define "llm-sidecar.injectorSelectorLabels" -}}
{{ include "llm-sidecar.selectorLabels" . }}
app.kubernetes.io/component: injector
{{- end }}

{{/* Pod-level securityContext of the pods the chart runs itself (injector, test). */}}
{{- define "llm-sidecar.podSecurityContext" -}}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Redis for shared budgets (`budgets.redis`): whether it is on, the checks the schema cannot make
(they fail the render with the value to fix), and the password Secret's volume. The sidecar
partial and every pod that carries it use these; nothing set means no LLM_SIDECAR_REDIS_* at all.
*/}}
{{- define "llm-sidecar.redisEnabled" -}}
{{- with .Values.budgets.redis }}{{ if or .url .urlSecret }}true{{ end }}{{ end }}
{{- end }}

{{- define "llm-sidecar.redisPasswordVolume" -}}llm-sidecar-redis-password{{- end }}
{{- define "llm-sidecar.redisPasswordDir" -}}/etc/llm-sidecar/redis{{- end }}

{{- define "llm-sidecar.validateBudgets" -}}
{{- $r := .Values.budgets.redis }}
{{- if and $r.url $r.urlSecret }}
{{- fail "budgets.redis: set url or urlSecret, not both" }}
{{- end }}
{{- if regexMatch "^rediss?://[^/@]*:[^/@]*@" $r.url }}
{{- fail "budgets.redis.url carries a password: put the whole URL in a Secret (budgets.redis.urlSecret) or the password alone (budgets.redis.passwordSecret)" }}
{{- end }}
{{- /* the schema says so too; this holds when it is skipped (--skip-schema-validation) */}}
{{- range $field := list "urlSecret" "passwordSecret" }}
{{- $ref := get $r $field }}
{{- if and $ref (not (and $ref.name $ref.key)) }}
{{- fail (printf "budgets.redis.%s needs both name and key (the Secret and its key), got %s" $field (toJson $ref)) }}
{{- end }}
{{- end }}
{{- if not (include "llm-sidecar.redisEnabled" .) }}
{{- if $r.passwordSecret }}
{{- fail "budgets.redis.passwordSecret needs budgets.redis.url or budgets.redis.urlSecret (the sidecar refuses a password file without a URL)" }}
{{- end }}
{{- if $r.timeout }}
{{- fail "budgets.redis.timeout needs budgets.redis.url or budgets.redis.urlSecret" }}
{{- end }}
{{- end }}
{{- if $r.timeout }}
{{- $n := regexFind "^[0-9]+" $r.timeout | atoi }}
{{- $ms := ternary $n (mul $n 1000) (hasSuffix "ms" $r.timeout) }}
{{- if or (le $ms 0) (gt $ms 5000) }}
{{- fail (printf "budgets.redis.timeout=%s: must be more than 0 and at most 5s" $r.timeout) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pod volumes the sidecar partial mounts, as a YAML list; empty when it mounts none. */}}
{{- define "llm-sidecar.sidecarVolumes" -}}
{{- with .Values.budgets.redis.passwordSecret -}}
- name: {{ include "llm-sidecar.redisPasswordVolume" $ }}
  secret:
    secretName: {{ .name | quote }}
    items:
      - key: {{ .key | quote }}
        path: password
{{- end }}
{{- end }}

{{/*
The sidecar container, as the injector adds it to a pod. Without `restartPolicy`: the injector
adds `restartPolicy: Always` in native mode, and so does the test pod. Its probes run the binary
(`probe ready|live`) because both ports listen on 127.0.0.1, which the kubelet's httpGet cannot
reach.
*/}}
{{- define "llm-sidecar.sidecarContainer" -}}
{{- include "llm-sidecar.validateBudgets" . -}}
name: llm-sidecar
image: {{ include "llm-sidecar.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["run"]
env:
  {{- /* span resource attributes (k8s.pod.name, ...) and the pod's own namespace */}}
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  - name: NODE_NAME
    valueFrom:
      fieldRef:
        fieldPath: spec.nodeName
  - name: LLM_SIDECAR_LISTEN
    value: {{ printf "127.0.0.1:%d" (int .Values.sidecar.ports.data) | quote }}
  - name: LLM_SIDECAR_ADMIN_LISTEN
    value: {{ printf "%s:%d" (ternary "0.0.0.0" "127.0.0.1" (.Values.sidecar.exposeAdmin | default false)) (int .Values.sidecar.ports.admin) | quote }}
  - name: LLM_SIDECAR_CONFIGMAP
    value: {{ include "llm-sidecar.configMapName" . | quote }}
  {{- /* the routing ConfigMap lives in the release namespace, not in the pod's */}}
  - name: LLM_SIDECAR_CONFIGMAP_NAMESPACE
    value: {{ .Release.Namespace | quote }}
  - name: LLM_SIDECAR_LOG_FORMAT
    value: {{ .Values.sidecar.logFormat | quote }}
  - name: LLM_SIDECAR_SHUTDOWN_GRACE
    value: {{ .Values.sidecar.shutdownGrace | quote }}
  {{- with .Values.tracing }}
  {{- if .endpoint }}
  - name: OTEL_EXPORTER_OTLP_ENDPOINT
    value: {{ .endpoint | quote }}
  - name: OTEL_EXPORTER_OTLP_PROTOCOL
    value: {{ .protocol | quote }}
  - name: OTEL_TRACES_SAMPLER
    value: parentbased_traceidratio
  - name: OTEL_TRACES_SAMPLER_ARG
    value: {{ .samplerRatio | toString | quote }}
  {{- end }}
  {{- end }}
  {{- if include "llm-sidecar.redisEnabled" . }}
  {{- with .Values.budgets.redis }}
  {{- if .url }}
  - name: LLM_SIDECAR_REDIS_URL
    value: {{ .url | quote }}
  {{- else }}
  {{- /* a URL with credentials: only the Secret holds it */}}
  - name: LLM_SIDECAR_REDIS_URL
    valueFrom:
      secretKeyRef:
        name: {{ .urlSecret.name | quote }}
        key: {{ .urlSecret.key | quote }}
  {{- end }}
  {{- if .passwordSecret }}
  - name: LLM_SIDECAR_REDIS_PASSWORD_FILE
    value: {{ printf "%s/password" (include "llm-sidecar.redisPasswordDir" $) | quote }}
  {{- end }}
  {{- if .timeout }}
  - name: LLM_SIDECAR_REDIS_TIMEOUT
    value: {{ .timeout | quote }}
  {{- end }}
  {{- end }}
  {{- end }}
  {{- with .Values.sidecar.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
envFrom:
  - secretRef:
      name: {{ include "llm-sidecar.secretName" . | quote }}
      optional: {{ .Values.providerKeys.optional }}
ports:
  - name: llm-http
    containerPort: {{ int .Values.sidecar.ports.data }}
    protocol: TCP
  - name: llm-admin
    containerPort: {{ int .Values.sidecar.ports.admin }}
    protocol: TCP
{{- if .Values.budgets.redis.passwordSecret }}
volumeMounts:
  - name: {{ include "llm-sidecar.redisPasswordVolume" . }}
    mountPath: {{ include "llm-sidecar.redisPasswordDir" . }}
    readOnly: true
{{- end }}
{{- with .Values.sidecar.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
startupProbe:
  exec:
    command: ["/usr/local/bin/llm-sidecar", "probe", "ready"]
  periodSeconds: 1
  timeoutSeconds: 2
  failureThreshold: 30
readinessProbe:
  exec:
    command: ["/usr/local/bin/llm-sidecar", "probe", "ready"]
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 3
livenessProbe:
  exec:
    command: ["/usr/local/bin/llm-sidecar", "probe", "live"]
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
{{- end }}

{{/*
The injector's template: the `sidecar.yaml` key of the `<fullname>-inject` ConfigMap, with the
pod volumes the container mounts (only when it mounts any: the Redis password Secret). Its
checksum rolls the injector when it changes. tests/golden/inject/sidecar.yaml is this document
for the default values; `make chart-test` compares them.
*/}}
{{- define "llm-sidecar.injectTemplate" -}}
mode: {{ .Values.sidecar.mode }}
port: {{ int .Values.sidecar.ports.data }}
container:
  {{- include "llm-sidecar.sidecarContainer" . | nindent 2 }}
{{- with include "llm-sidecar.sidecarVolumes" . }}
volumes:
  {{- . | nindent 2 }}
{{- end }}
{{- end }}
