{{/*
Names and labels shared by every template of the chart.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "mailrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource name prefix: fullnameOverride, or the release name plus the chart name (just the
release name when it already contains the chart name). Truncated to 63 characters (DNS label).
*/}}
{{- define "mailrelay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "name-version" of the chart, for the helm.sh/chart label. */}}
{{- define "mailrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels every object of the release carries (Kubernetes recommended labels). */}}
{{- define "mailrelay.labels" -}}
helm.sh/chart: {{ include "mailrelay.chart" . }}
{{ include "mailrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailrelay
{{- end }}

{{/* The labels that select the operator pods; never change them (Deployment selectors are immutable). */}}
{{- define "mailrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's labels: the common ones plus the component. */}}
{{- define "mailrelay.operatorLabels" -}}
{{ include "mailrelay.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "mailrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailrelay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "mailrelay.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* True ("true") when the operator watches every namespace (no watchNamespaces listed). */}}
{{- define "mailrelay.clusterWide" -}}
{{- if not .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
One MailRelay or RelayRoute declared in values. Called with (dict "root" $ "kind" KIND "item" ITEM
"list" "relays"|"routes"). The item's own labels win over the chart's labels.
*/}}
{{- define "mailrelay.customObject" -}}
{{- $item := .item }}
{{- $where := printf "%s[name=%v]" .list ($item.name | default "?") }}
{{- $labels := merge (dict) ($item.labels | default dict) (include "mailrelay.labels" .root | fromYaml) }}
apiVersion: mailrelay.dev/v1alpha1
kind: {{ .kind }}
metadata:
  name: {{ required (printf "%s: name is required" .list) $item.name }}
  namespace: {{ $item.namespace | default .root.Release.Namespace }}
  labels:
    {{- toYaml $labels | nindent 4 }}
  {{- with $item.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- toYaml (required (printf "%s: spec is required" $where) $item.spec) | nindent 2 }}
{{- end }}
