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
The sidecar container, as the injector adds it to a pod. Without `restartPolicy`: the injector
adds `restartPolicy: Always` in native mode, and so does the test pod. Its probes run the binary
(`probe ready|live`) because both ports listen on 127.0.0.1, which the kubelet's httpGet cannot
reach.
*/}}
{{- define "llm-sidecar.sidecarContainer" -}}
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
The injector's template: the `sidecar.yaml` key of the `<fullname>-inject` ConfigMap. Its
checksum rolls the injector when it changes. tests/golden/inject/sidecar.yaml is this document
for the default values; `make chart-test` compares them.
*/}}
{{- define "llm-sidecar.injectTemplate" -}}
mode: {{ .Values.sidecar.mode }}
port: {{ int .Values.sidecar.ports.data }}
container:
  {{- include "llm-sidecar.sidecarContainer" . | nindent 2 }}
{{- end }}
