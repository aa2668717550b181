{{/* Names, labels and the shared pieces of every CareCanvas pod. */}}

{{- define "carecanvas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name, truncated so that "-<component>-<suffix>" still fits the 63-character DNS label limit. */}}
{{- define "carecanvas.fullname" -}}
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

{{- define "carecanvas.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "carecanvas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "carecanvas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "carecanvas.labels" -}}
helm.sh/chart: {{ include "carecanvas.chart" . }}
{{ include "carecanvas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: carecanvas
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: call with (dict "root" $ "component" "api"). */}}
{{- define "carecanvas.componentLabels" -}}
{{ include "carecanvas.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "carecanvas.componentSelectorLabels" -}}
{{ include "carecanvas.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "carecanvas.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "carecanvas.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "carecanvas.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* GPU workers run the CUDA build of the same image (the Dockerfile's TORCH_VARIANT): <tag><workerTagSuffix>. */}}
{{- define "carecanvas.workerImage" -}}
{{- if .Values.image.digest }}
{{- if not .Values.image.workerDigest }}
{{- fail "image.digest is set: set image.workerDigest too (the CUDA build's digest; a digest takes no tag suffix)" }}
{{- end }}
{{- printf "%s@%s" .Values.image.repository .Values.image.workerDigest }}
{{- else }}
{{- printf "%s:%s%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) .Values.image.workerTagSuffix }}
{{- end }}
{{- end }}

{{/* Two ConfigMaps: envFrom would also export file keys such as ehrs.json as variables. */}}
{{- define "carecanvas.envConfigMapName" -}}
{{- printf "%s-env" (include "carecanvas.fullname" .) }}
{{- end }}

{{- define "carecanvas.filesConfigMapName" -}}
{{- printf "%s-files" (include "carecanvas.fullname" .) }}
{{- end }}

{{/* Two Secrets for the same reason: one read with envFrom, one mounted as files. */}}
{{- define "carecanvas.envSecretName" -}}
{{- default (printf "%s-env" (include "carecanvas.fullname" .)) .Values.secrets.existingEnvSecret }}
{{- end }}

{{- define "carecanvas.filesSecretName" -}}
{{- default (printf "%s-files" (include "carecanvas.fullname" .)) .Values.secrets.existingFilesSecret }}
{{- end }}

{{- define "carecanvas.modelsClaimName" -}}
{{- default (printf "%s-models" (include "carecanvas.fullname" .)) .Values.models.volume.existingClaim }}
{{- end }}

{{- define "carecanvas.checkpointsClaimName" -}}
{{- default (printf "%s-audit-checkpoints" (include "carecanvas.fullname" .)) .Values.audit.checkpoints.persistence.existingClaim }}
{{- end }}

{{/* Where mounted files live inside every container. */}}
{{- define "carecanvas.configDir" -}}/etc/carecanvas/config{{- end }}
{{- define "carecanvas.secretsDir" -}}/etc/carecanvas/secrets{{- end }}
{{- define "carecanvas.dataDir" -}}/var/lib/carecanvas/data{{- end }}

{{/* The install must name its secrets: either values for the chart-managed Secrets or existing Secrets. */}}
{{- define "carecanvas.validateSecrets" -}}
{{- if not .Values.secrets.existingEnvSecret }}
{{- if not .Values.secrets.databaseUrl }}
{{- fail "secrets.databaseUrl is required (a postgresql+psycopg:// URL), or set secrets.existingEnvSecret to a Secret holding CARECANVAS_DATABASE_URL" }}
{{- else if not (hasPrefix "postgres" .Values.secrets.databaseUrl) }}
{{- fail "secrets.databaseUrl must be a PostgreSQL URL (postgresql+psycopg://...); SQLite is for the single-machine demo only" }}
{{- end }}
{{- end }}
{{- if not .Values.secrets.existingFilesSecret }}
{{- if not .Values.secrets.kekKeyring }}
{{- fail "secrets.kekKeyring is required (the keyring JSON from `carecanvas keys generate`), or set secrets.existingFilesSecret" }}
{{- end }}
{{- if not .Values.secrets.auditSigningKey }}
{{- fail "secrets.auditSigningKey is required (the Ed25519 PEM from `carecanvas audit keygen`; it signs audit checkpoints and is never in the keyring), or set secrets.existingFilesSecret" }}
{{- end }}
{{- range .Values.ehrs }}
{{- if and (eq (default "public" .client_auth) "private_key_jwt") (not (hasKey $.Values.secrets.ehrPrivateKeys .name)) }}
{{- fail (printf "EHR %q uses private_key_jwt: add its PEM key as secrets.ehrPrivateKeys.%s, or set secrets.existingFilesSecret" .name .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- range .Values.ehrs }}
{{- if eq (default "public" .client_auth) "client_secret_basic" }}
{{- if $.Values.secrets.existingEnvSecret }}
{{- fail (printf "EHR %q uses client_secret_basic: with secrets.existingEnvSecret, put its whole registration (with client_secret) into CARECANVAS_EHRS of that Secret and remove it from ehrs" .name) }}
{{- end }}
{{- if not (hasKey $.Values.secrets.ehrClientSecrets .name) }}
{{- fail (printf "EHR %q uses client_secret_basic: add its secret as secrets.ehrClientSecrets.%s" .name .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* EHR registrations that can live in a ConfigMap (no client secret), with key paths filled in. */}}
{{- define "carecanvas.ehrsFileJson" -}}
{{- $entries := list }}
{{- range .Values.ehrs }}
{{- $auth := default "public" .client_auth }}
{{- if ne $auth "client_secret_basic" }}
{{- $entry := deepCopy . }}
{{- if eq $auth "private_key_jwt" }}
{{- $_ := set $entry "private_key_file" (printf "%s/ehr-%s-private-key.pem" (include "carecanvas.secretsDir" $) .name) }}
{{- end }}
{{- $entries = append $entries $entry }}
{{- end }}
{{- end }}
{{- toPrettyJson $entries }}
{{- end }}

{{/* EHR registrations that carry a client secret; passed as CARECANVAS_EHRS through the env Secret. */}}
{{- define "carecanvas.ehrsSecretJson" -}}
{{- $entries := list }}
{{- range .Values.ehrs }}
{{- if eq (default "public" .client_auth) "client_secret_basic" }}
{{- $entry := deepCopy . }}
{{- $_ := set $entry "client_secret" (get $.Values.secrets.ehrClientSecrets .name) }}
{{- $entries = append $entries $entry }}
{{- end }}
{{- end }}
{{- if $entries }}{{ toJson $entries }}{{ end }}
{{- end }}

{{/* Annotations that restart pods when their configuration changes. */}}
{{- define "carecanvas.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secrets: {{ include (print .Template.BasePath "/secrets.yaml") . | sha256sum }}
{{- end }}

{{/* Volumes shared by api and worker pods. */}}
{{- define "carecanvas.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "carecanvas.filesConfigMapName" . }}
    items:
      - key: ehrs.json
        path: ehrs.json
      - key: models.json
        path: models.json
- name: secret-files
  secret:
    secretName: {{ include "carecanvas.filesSecretName" . }}
    defaultMode: 0440
- name: data
  emptyDir:
    sizeLimit: 1Gi
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
- name: audit-checkpoints
{{- if .Values.audit.checkpoints.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "carecanvas.checkpointsClaimName" . }}
{{- else }}
  # Not durable: checkpoints vanish with the pod. Only for trials; NOTES.txt warns about it.
  emptyDir:
    sizeLimit: 256Mi
{{- end }}
{{- end }}

{{- define "carecanvas.commonVolumeMounts" -}}
- name: config
  mountPath: {{ include "carecanvas.configDir" . }}
  readOnly: true
- name: secret-files
  mountPath: {{ include "carecanvas.secretsDir" . }}
  readOnly: true
- name: data
  mountPath: {{ include "carecanvas.dataDir" . }}
- name: tmp
  mountPath: /tmp
- name: audit-checkpoints
  mountPath: {{ .Values.audit.checkpoints.mountPath }}
{{- end }}

{{- define "carecanvas.envFrom" -}}
- configMapRef:
    name: {{ include "carecanvas.envConfigMapName" . }}
- secretRef:
    name: {{ include "carecanvas.envSecretName" . }}
{{- end }}

{{- define "carecanvas.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "carecanvas.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{- define "carecanvas.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* NetworkPolicy egress every CareCanvas pod needs: cluster DNS and PostgreSQL. */}}
{{- define "carecanvas.egressDnsAndDatabase" -}}
{{- $np := .Values.networkPolicy -}}
- to:
    - namespaceSelector:
        {{- toYaml $np.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml $np.dns.podSelector | nindent 8 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- /* With no PostgreSQL peers named, the port alone restricts the rule. */}}
- ports:
    - {protocol: TCP, port: {{ $np.postgresql.port }}}
  {{- if or $np.postgresql.cidrs $np.postgresql.namespaceSelector $np.postgresql.podSelector }}
  to:
    {{- range $np.postgresql.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
    {{- if or $np.postgresql.namespaceSelector $np.postgresql.podSelector }}
    - {{- with $np.postgresql.namespaceSelector }}
      namespaceSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $np.postgresql.podSelector }}
      podSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
  {{- end }}
{{- end }}
{{- define "carecanvas.prometheusPeer" -}}
- namespaceSelector:
    {{- toYaml .Values.networkPolicy.prometheus.namespaceSelector | nindent 4 }}
  podSelector:
    {{- toYaml .Values.networkPolicy.prometheus.podSelector | nindent 4 }}
{{- end }}
