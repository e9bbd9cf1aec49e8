{{/* Labels of every monitoring object: the chart's labels plus monitoring.labels. */}}
{{- define "deepseek-operator.monitoringLabels" -}}
{{ include "deepseek-operator.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The Triton Services the operator creates carry these labels (operator/naming.py). */}}
{{- define "deepseek-operator.tritonServiceLabels" -}}
app.kubernetes.io/component: triton
app.kubernetes.io/part-of: deepseek-operator
{{- end -}}

{{/* Namespaces with Triton Services: monitoring.serviceMonitors.namespaces, else watchNamespaces, else any. */}}
{{- define "deepseek-operator.tritonNamespaceSelector" -}}
{{- $namespaces := .Values.monitoring.serviceMonitors.namespaces | default .Values.watchNamespaces -}}
{{- if $namespaces }}
matchNames:
{{- range $namespaces }}
  - {{ . | quote }}
{{- end }}
{{- else }}
any: true
{{- end }}
{{- end -}}
