{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetune.minioName" -}}{{ .Release.Name }}-minio{{- end -}}

{{- define "kubetune.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "kubetune.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "kubetune.minioCredentials" -}}
- name: MINIO_ROOT_USER
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3Credentials.name }}, key: AWS_ACCESS_KEY_ID}
- name: MINIO_ROOT_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3Credentials.name }}, key: AWS_SECRET_ACCESS_KEY}
{{- end -}}
