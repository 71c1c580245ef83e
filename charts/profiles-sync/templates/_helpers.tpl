{{/* The chart name, or nameOverride. */}}
{{- define "profiles-sync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object's name: the release name when it contains the chart name. */}}
{{- define "profiles-sync.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select one component's pods: call with (dict "ctx" $ "component" "engine"). */}}
{{- define "profiles-sync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "profiles-sync.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every object's labels: call with (dict "ctx" $ "component" "engine"). */}}
{{- define "profiles-sync.labels" -}}
{{ include "profiles-sync.selectorLabels" . }}
app.kubernetes.io/part-of: profiles-sync
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The image of the engine and the controller. */}}
{{- define "profiles-sync.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The image of the sync Jobs: controller.syncImage's digest or tag, else the chart's image
     version (image.digest, else image.tag, else appVersion), from controller.syncImage.repository
     (a mirror keeps a pinned digest) or image.repository. */}}
{{- define "profiles-sync.syncImage" -}}
{{- $s := .Values.controller.syncImage }}
{{- $repository := default .Values.image.repository $s.repository }}
{{- if $s.digest }}
{{- printf "%s@%s" $repository $s.digest }}
{{- else if $s.tag }}
{{- printf "%s:%s" $repository $s.tag }}
{{- else if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "profiles-sync.engineName" -}}
{{ include "profiles-sync.fullname" . }}-engine
{{- end }}

{{- define "profiles-sync.controllerName" -}}
{{ include "profiles-sync.fullname" . }}-controller
{{- end }}

{{- define "profiles-sync.sourcesSecret" -}}
{{- default (printf "%s-sources" (include "profiles-sync.fullname" .)) .Values.sources.existingSecret }}
{{- end }}

{{- define "profiles-sync.feedTokenSecret" -}}
{{- default (printf "%s-feed-token" (include "profiles-sync.fullname" .)) .Values.feedToken.existingSecret }}
{{- end }}

{{/* The engine's URL as the controller and the sync Jobs (in other namespaces) reach it. */}}
{{- define "profiles-sync.engineURL" -}}
{{- printf "http://%s.%s.svc:%d" (include "profiles-sync.engineName" .) .Release.Namespace (int .Values.engine.service.port) }}
{{- end }}

{{/* The pod-level security context: the restricted Pod Security Standard. */}}
{{- define "profiles-sync.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ .runAsGroup }}
{{- end }}
{{- if not (kindIs "invalid" .fsGroup) }}
fsGroup: {{ .fsGroup }}
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The container-level security context; not configurable on purpose. */}}
{{- define "profiles-sync.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Rules of a shared ClusterRole file under files/rbac/. */}}
{{- define "profiles-sync.rulesOf" -}}
{{- $role := .ctx.Files.Get .file | fromYaml }}
{{- if not $role.rules }}
{{- fail (printf "%s has no rules" .file) }}
{{- end }}
{{- toYaml $role.rules }}
{{- end }}

{{/* Fails with a clear message when values contradict each other. */}}
{{- define "profiles-sync.validate" -}}
{{- if and (eq .Values.store.type "sqlite") (ne (int .Values.engine.replicas) 1) }}
{{- fail "engine.replicas must be 1 with store.type sqlite (one SQLite file has one writer); use store.type postgres to scale the engine" }}
{{- end }}
{{- if and (eq .Values.store.type "postgres") (not .Values.store.postgres.existingSecret) }}
{{- fail "store.postgres.existingSecret is required with store.type postgres: a Secret whose key store.postgres.key holds the postgres:// URL" }}
{{- end }}
{{- if not .Values.sources.existingSecret }}
{{- $ids := dict }}
{{- range .Values.sources.list }}
{{- if hasKey $ids .id }}
{{- fail (printf "sources.list: the id %q is used twice" .id) }}
{{- end }}
{{- $_ := set $ids .id true }}
{{- end }}
{{- end }}
{{- end }}
