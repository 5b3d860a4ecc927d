{{/* Names, labels and shared pieces of the deltavault chart. */}}

{{- define "deltavault.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "deltavault.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels every resource carries; "component" is store, compressor or minio. */}}
{{- define "deltavault.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "deltavault.selectorLabels" . }}
{{- end -}}

{{- define "deltavault.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deltavault.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "deltavault.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "deltavault.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image of a component: "cuda" selects the CUDA variant's tag. */}}
{{- define "deltavault.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .cuda -}}
{{- $tag = .root.Values.image.cudaTag | default (printf "%s-cuda" .root.Chart.AppVersion) -}}
{{- end -}}
{{- printf "%s:%s" .root.Values.image.repository $tag -}}
{{- end -}}

{{- define "deltavault.storeAddress" -}}
{{- printf "%s-store:%d" (include "deltavault.fullname" .) (int .Values.store.port) -}}
{{- end -}}

{{/* The S3 endpoint and the Secret holding its credentials (name, access key, secret key). */}}
{{- define "deltavault.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s-minio:9000" (include "deltavault.fullname" .) -}}
{{- else -}}
{{- required "s3.endpoint is required when minio.enabled is false" .Values.s3.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "deltavault.minioSecretName" -}}
{{- .Values.minio.existingSecret | default (printf "%s-minio" (include "deltavault.fullname" .)) -}}
{{- end -}}

{{- define "deltavault.s3SecretName" -}}
{{- if .Values.minio.enabled -}}
{{- include "deltavault.minioSecretName" . -}}
{{- else -}}
{{- required "s3.existingSecret is required when minio.enabled is false" .Values.s3.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "deltavault.s3AccessKeyKey" -}}
{{- if .Values.minio.enabled -}}root-user{{- else -}}{{ .Values.s3.accessKeyKey }}{{- end -}}
{{- end -}}

{{- define "deltavault.s3SecretKeyKey" -}}
{{- if .Values.minio.enabled -}}root-password{{- else -}}{{ .Values.s3.secretKeyKey }}{{- end -}}
{{- end -}}

{{/* Prometheus scrape annotations, when no ServiceMonitor does the scraping. */}}
{{- define "deltavault.scrapeAnnotations" -}}
{{- if and .root.Values.metrics.podAnnotations (not .root.Values.metrics.serviceMonitor.enabled) }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* With tls.enabled: a server's TLS flags and, for the compressor, its client TLS to the store. */}}
{{- define "deltavault.tlsEnv" -}}
{{- if .root.Values.tls.enabled }}
- name: DELTAVAULT_{{ .prefix }}_TLS_CERT
  value: /etc/deltavault/tls/tls.crt
- name: DELTAVAULT_{{ .prefix }}_TLS_KEY
  value: /etc/deltavault/tls/tls.key
{{- if .root.Values.tls.mutual }}
- name: DELTAVAULT_{{ .prefix }}_TLS_CLIENT_CA
  value: /etc/deltavault/tls/ca.crt
{{- end }}
- name: DELTAVAULT_{{ .prefix }}_HEALTH_PORT
  value: {{ .healthPort | quote }}
{{- if .client }}
- name: DELTAVAULT_TLS_CA
  value: /etc/deltavault/tls/ca.crt
{{- if .root.Values.tls.mutual }}
- name: DELTAVAULT_TLS_CERT
  value: /etc/deltavault/tls/tls.crt
- name: DELTAVAULT_TLS_KEY
  value: /etc/deltavault/tls/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The gRPC probes: on the service port, or on the plaintext health port under TLS. */}}
{{- define "deltavault.probes" -}}
{{- $port := ternary .healthPort .port .root.Values.tls.enabled -}}
startupProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: 2
  failureThreshold: {{ .startupFailures }}
livenessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: 5
  failureThreshold: 2
{{- end -}}

{{/* With auth.enabled: the tokens file and, for the compressor, its own token for the store. */}}
{{- define "deltavault.authEnv" -}}
{{- if .root.Values.auth.enabled }}
- name: DELTAVAULT_{{ .prefix }}_AUTH_TOKENS
  value: /etc/deltavault/auth/tokens.json
{{- if .client }}
- name: DELTAVAULT_TOKEN_FILE
  value: /etc/deltavault/auth/compressor-token
{{- end }}
{{- end }}
{{- end -}}

{{/* The auth Secret's volume: the tokens file, and the compressor's token only where it is used. */}}
{{- define "deltavault.authVolume" -}}
{{- if .root.Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ .root.Values.auth.existingSecret }}
    items:
      - key: tokens.json
        path: tokens.json
      {{- if .client }}
      - key: compressor-token
        path: compressor-token
      {{- end }}
{{- end }}
{{- end -}}

{{/* Admission-limit environment of a service: prefix STORE or COMPRESSOR, limits its values. */}}
{{- define "deltavault.limitsEnv" -}}
- name: DELTAVAULT_{{ .prefix }}_MAX_STREAMS
  value: {{ .limits.maxStreams | int64 | quote }}
- name: DELTAVAULT_{{ .prefix }}_MAX_STREAMS_PER_CLIENT
  value: {{ .limits.maxStreamsPerClient | int64 | quote }}
- name: DELTAVAULT_{{ .prefix }}_MAX_STREAM_BYTES
  value: {{ .limits.maxStreamBytes | int64 | quote }}
- name: DELTAVAULT_{{ .prefix }}_MAX_STREAM_BYTES_PER_CLIENT
  value: {{ .limits.maxStreamBytesPerClient | int64 | quote }}
{{- end -}}
