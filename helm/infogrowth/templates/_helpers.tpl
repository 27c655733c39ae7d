{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "infogrowth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Truncated to 52 characters so that suffixes ("-select", the
StatefulSet's controller-revision hash, PVC names) still fit in 63.
*/}}
{{- define "infogrowth.fullname" -}}
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

{{- define "infogrowth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "infogrowth.labels" -}}
helm.sh/chart: {{ include "infogrowth.chart" . }}
{{ include "infogrowth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: infogrowth
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (release-wide).
*/}}
{{- define "infogrowth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "infogrowth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Component-scoped labels; call with (dict "root" $ "role" "embed").
*/}}
{{- define "infogrowth.componentLabels" -}}
{{ include "infogrowth.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "infogrowth.componentSelectorLabels" -}}
{{ include "infogrowth.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{/*
Name of one workload (and of its Service): the full name in mode all, "<fullname>-<role>" in split.
*/}}
{{- define "infogrowth.workloadName" -}}
{{- if eq .role "all" }}
{{- include "infogrowth.fullname" .root }}
{{- else }}
{{- printf "%s-%s" (include "infogrowth.fullname" .root) .role }}
{{- end }}
{{- end }}

{{/*
The roles this release runs.
*/}}
{{- define "infogrowth.roles" -}}
{{- if eq .Values.mode "split" }}embed select{{ else }}all{{ end }}
{{- end }}

{{/*
The role that autoscaling targets: only ever the stateless embed Deployment (mode split). A
stateful pod added or removed moves select partitions, each restored on its new owner.
*/}}
{{- define "infogrowth.scaledRole" -}}
embed
{{- end }}

{{- define "infogrowth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "infogrowth.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "infogrowth.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the drain timeout (rounded up) plus the extra margin, so that the
service's own watchdog fires before the kubelet's SIGKILL.
*/}}
{{- define "infogrowth.terminationGracePeriod" -}}
{{- add (ceil .Values.kafka.drainTimeoutSeconds | int) .Values.terminationGraceExtraSeconds }}
{{- end }}

{{/*
Keys of `config` that the chart sets itself; setting them in `config` fails the install.
*/}}
{{- define "infogrowth.validateConfig" -}}
{{- $c := .Values.config | default dict }}
{{- $k := get $c "kafka" | default dict }}
{{- range $key := list "bootstrap_servers" "drain_timeout_s" "instance_id" "static_membership" }}
{{- if hasKey $k $key }}
{{- fail (printf "config.kafka.%s is set by the chart: use kafka.bootstrapServers / kafka.drainTimeoutSeconds / kafka.staticMembership (instance_id is the pod name)" $key) }}
{{- end }}
{{- end }}
{{- if hasKey $c "serve" }}
{{- fail "config.serve is set by the chart: use metrics.port" }}
{{- end }}
{{- if hasKey (get $c "snapshot" | default dict) "directory" }}
{{- fail "config.snapshot.directory is set by the chart (/var/lib/infogrowth/state on the workload's volume)" }}
{{- end }}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling.hpa.enabled and autoscaling.keda.enabled are exclusive: KEDA creates and owns the HPA" }}
{{- end }}
{{- if and (ne .Values.mode "split") (or .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled) }}
{{- fail "autoscaling scales the stateless embed Deployment of mode: split only; the StatefulSet of mode: all holds select state (every scale step would move and restore partitions): set mode: split or turn autoscaling off" }}
{{- end }}
{{- if and .Values.kafka.secretKeys (not .Values.kafka.existingSecret) }}
{{- fail "kafka.secretKeys needs kafka.existingSecret (the Secret holding those keys)" }}
{{- end }}
{{- if and .Values.autoscaling.keda.kafka.authParams (not .Values.kafka.existingSecret) }}
{{- fail "autoscaling.keda.kafka.authParams needs kafka.existingSecret (the Secret holding those keys)" }}
{{- end }}
{{- if and .Values.autoscaling.keda.enabled (eq .Values.autoscaling.keda.trigger "prometheus") (not .Values.autoscaling.keda.prometheus.serverAddress) }}
{{- fail "autoscaling.keda.trigger=prometheus needs autoscaling.keda.prometheus.serverAddress" }}
{{- end }}
{{- if and (not .Values.model.offline) (not .Values.model.volume) }}
{{- fail "model.offline=false downloads models at start: it needs a writable model.volume (the image's model cache is read-only)" }}
{{- end }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/*
The service's config.yaml: `config` plus the keys the chart owns.
*/}}
{{- define "infogrowth.configYaml" -}}
{{- include "infogrowth.validateConfig" . }}
{{- $managed := dict
  "kafka" (dict
    "bootstrap_servers" .Values.kafka.bootstrapServers
    "drain_timeout_s" .Values.kafka.drainTimeoutSeconds)
  "serve" (dict "host" "0.0.0.0" "port" (int .Values.metrics.port))
  "snapshot" (dict "directory" "/var/lib/infogrowth/state") }}
{{- $cfg := mustMergeOverwrite (deepCopy (.Values.config | default dict)) $managed }}
{{- toYaml $cfg }}
{{- end }}

{{/*
A nested config value with the service's default: (dict "root" $ "path" (list "kafka" "topics" "ingest") "default" "infogrowth.ingest").
*/}}
{{- define "infogrowth.configValue" -}}
{{- $node := .root.Values.config | default dict }}
{{- $found := true }}
{{- range $key := .path }}
{{- if and $found (kindIs "map" $node) (hasKey $node $key) }}
{{- $node = get $node $key }}
{{- else }}
{{- $found = false }}
{{- end }}
{{- end }}
{{- if $found }}{{ $node }}{{ else }}{{ .default }}{{ end }}
{{- end }}

{{/*
Environment shared by the service and the topics Job.
*/}}
{{- define "infogrowth.env" -}}
- name: INFOGROWTH_KAFKA__INSTANCE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- range $option, $key := .Values.kafka.secretKeys }}
- name: {{ printf "INFOGROWTH_KAFKA__CLIENT__%s" $option | quote }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.kafka.existingSecret | quote }}
      key: {{ $key | quote }}
{{- end }}
- name: HF_HOME
  value: {{ .Values.model.cacheDir | quote }}
- name: HF_HUB_OFFLINE
  value: {{ ternary "1" "0" .Values.model.offline | quote }}
- name: TRANSFORMERS_OFFLINE
  value: {{ ternary "1" "0" .Values.model.offline | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volume mounts shared by the service and the topics Job.
*/}}
{{- define "infogrowth.commonMounts" -}}
- name: config
  mountPath: /etc/infogrowth
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.tlsSecret }}
- name: kafka-tls
  mountPath: /etc/infogrowth/kafka-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "infogrowth.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- if .Values.kafka.tlsSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tlsSecret | quote }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/*
A workload's pod template; call with (dict "root" $ "role" "all|embed|select").
*/}}
{{- define "infogrowth.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $c := index $v .role }}
{{- $gpus := int (default 0 $c.gpus) }}
{{- $resources := deepCopy ($c.resources | default dict) }}
{{- if gt $gpus 0 }}
{{- $limits := mustMergeOverwrite (get $resources "limits" | default dict) (dict $v.gpuResourceName $gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- $stateful := ne .role "embed" -}}
metadata:
  labels:
    {{- include "infogrowth.componentLabels" . | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "infogrowth.configYaml" $root | sha256sum }}
    kubectl.kubernetes.io/default-container: infogrowth
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "infogrowth.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountServiceAccountToken }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ include "infogrowth.terminationGracePeriod" $root }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $v.runtimeClassName $c.runtimeClassName) }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with (default $v.nodeSelector $c.nodeSelector) }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $v.tolerations $c.tolerations) }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $v.affinity $c.affinity) }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $v.topologySpreadConstraints $c.topologySpreadConstraints) }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  containers:
    - name: infogrowth
      image: {{ include "infogrowth.image" $root | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        - run
        - --role
        - {{ .role }}
        - --config
        - /etc/infogrowth/config.yaml
        {{- range $c.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        {{- include "infogrowth.env" $root | nindent 8 }}
        {{- /* Static membership (group.instance.id = <group>-<pod name>) for the StatefulSet
        pods, whose names survive a restart; never for the Deployment's random pod names, whose
        dead members would hold partitions until the session timeout. */}}
        - name: INFOGROWTH_KAFKA__STATIC_MEMBERSHIP
          value: {{ and $stateful $v.kafka.staticMembership | quote }}
      {{- with $v.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: metrics
          containerPort: {{ $v.metrics.port }}
          protocol: TCP
      {{- if $v.probes.startup.enabled }}
      startupProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: {{ $v.probes.startup.periodSeconds }}
        timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
        failureThreshold: {{ $v.probes.startup.failureThreshold }}
      {{- end }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: {{ $v.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ $v.probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: {{ $v.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ $v.probes.readiness.failureThreshold }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "infogrowth.commonMounts" $root | nindent 8 }}
        {{- if $stateful }}
        - name: state
          mountPath: /var/lib/infogrowth
        {{- end }}
        {{- if $v.model.volume }}
        - name: models
          mountPath: {{ $v.model.cacheDir }}
          {{- if $v.model.offline }}
          readOnly: true
          {{- end }}
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "infogrowth.fullname" $root }}
    {{- include "infogrowth.commonVolumes" $root | nindent 4 }}
    {{- if and $stateful (not $c.persistence.enabled) }}
    - name: state
      emptyDir: {}
    {{- end }}
    {{- with $v.model.volume }}
    - name: models
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
The pipeline's topics as `infogrowth topics create` lays them out (kafka/admin.py topic_specs,
kafka/clients.py record_limit), from `config` and the service's defaults: a YAML list of
{role, name, partitions, replicas, cleanup, maxMessageBytes}. A name shared by several roles
(one output topic for all decisions) is listed once.
*/}}
{{- define "infogrowth.topicSpecs" -}}
{{- $k := get (.Values.config | default dict) "kafka" | default dict }}
{{- $t := get $k "topics" | default dict }}
{{- $limits := get (.Values.config | default dict) "limits" | default dict }}
{{- $size := max (add (int64 (default 16777216 (get $limits "max_message_bytes"))) 65536) 1048588 }}
{{- $rf := int64 (default 1 (get $t "replication_factor")) }}
{{- $embedded := int64 (default 1 (get $t "embedded_partitions")) }}
{{- $outputs := int64 (default 1 (get $t "output_partitions")) }}
{{- $rows := list
  (list "ingest" (int64 (default 1 (get $t "ingest_partitions"))) "delete")
  (list "embedded" $embedded "delete")
  (list "changelog" $embedded "compact")
  (list "control" 1 "compact")
  (list "accepted" $outputs "delete")
  (list "relabeled" $outputs "delete")
  (list "rejected" $outputs "delete") }}
{{- if get $t "dead_letter" }}
{{- $rows = append $rows (list "dead_letter" $outputs "delete") }}
{{- end }}
{{- $seen := dict }}
{{- range $rows }}
{{- $role := index . 0 }}
{{- $name := default (printf "infogrowth.%s" $role) (get $t $role) }}
{{- if not (hasKey $seen $name) }}
{{- $_ := set $seen $name true }}
- role: {{ $role | replace "_" "-" }}
  name: {{ $name | quote }}
  partitions: {{ index . 1 }}
  replicas: {{ $rf }}
  cleanup: {{ index . 2 }}
  maxMessageBytes: {{ $size }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The ACLs the service's principal needs (docs/deploy.md lists them for clusters without
Strimzi): a YAML list of {type, name, pattern, operations}.
*/}}
{{- define "infogrowth.serviceAcls" -}}
{{- $k := get (.Values.config | default dict) "kafka" | default dict }}
{{- $t := get $k "topics" | default dict }}
{{- $prefix := default "infogrowth" (get $k "transactional_id_prefix") }}
{{- $topic := dict
  "ingest" (list "Read" "Describe")
  "embedded" (list "Read" "Write" "Describe")
  "changelog" (list "Read" "Write" "Describe")
  "control" (list "Read" "Describe")
  "accepted" (list "Write" "Describe")
  "relabeled" (list "Write" "Describe")
  "rejected" (list "Write" "Describe") }}
{{- range $role := list "ingest" "embedded" "changelog" "control" "accepted" "relabeled" "rejected" }}
- type: topic
  name: {{ default (printf "infogrowth.%s" $role) (get $t $role) | quote }}
  pattern: literal
  operations: {{ get $topic $role | toJson }}
{{- end }}
{{- with get $t "dead_letter" }}
- type: topic
  name: {{ . | quote }}
  pattern: literal
  operations: ["Write", "Describe"]
{{- end }}
- type: group
  name: {{ default "infogrowth-embed" (get $k "embed_group") | quote }}
  pattern: literal
  operations: ["Read"]
- type: group
  name: {{ default "infogrowth-select" (get $k "select_group") | quote }}
  pattern: literal
  operations: ["Read"]
- type: group
  name: "infogrowth-reader-"
  pattern: prefix
  operations: ["Read"]
{{- range $stage := list "embed" "select" }}
- type: transactionalId
  name: {{ printf "%s-%s-" $prefix $stage | quote }}
  pattern: prefix
  operations: ["Write", "Describe"]
{{- end }}
{{- end }}
