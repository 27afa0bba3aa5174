{{/*
Named templates for the Outrigger sidecar.

Public:
  outrigger.sidecar         the container spec (one list item) for `initContainers:`
                            (native sidecar, the default), or for `containers:` with
                            nativeSidecar: false
  outrigger.volumes         the volumes it needs (list items) for `volumes:`
  outrigger.podAnnotations  for the pod template's `annotations:`: a checksum of the
                            restart-only config keys, so only a change Outrigger cannot
                            hot-reload rolls the pods
  outrigger.servicePort     a port (list item) for your Service's `ports:`, the one
                            metrics.serviceMonitor scrapes

Both take the root context `.`. They work when this chart is installed on
its own and when it is a dependency of an app chart (values under
`outrigger:`), in which case they use the subchart's values and metadata.
*/}}

{{- define "outrigger.name" -}}outrigger{{- end -}}

{{- define "outrigger.configMapName" -}}
{{- default (printf "%s-outrigger" .Release.Name) .Values.configMapName | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outrigger.labels" -}}
app.kubernetes.io/name: {{ include "outrigger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "outrigger.image" -}}
{{- $tag := .Values.image.tag -}}
{{- if and (not $tag) (eq .Chart.Name "outrigger") -}}
{{- $tag = .Chart.AppVersion -}}
{{- end -}}
{{- if not $tag -}}
{{- fail "outrigger: set outrigger.image.tag" -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "outrigger.adminPort" -}}
{{- (.Values.config.admin | default dict).port | default 15000 -}}
{{- end -}}

{{- define "outrigger.dataClaimName" -}}
{{- $pvc := .Values.data.persistentVolumeClaim -}}
{{- if $pvc.claimName -}}
{{- $pvc.claimName -}}
{{- else if $pvc.create -}}
{{- printf "%s-outrigger-data" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- fail "outrigger: data.volume persistentVolumeClaim needs data.persistentVolumeClaim.claimName or create: true" -}}
{{- end -}}
{{- end -}}

{{/* The config keys the running proxy hot-reloads (everything else needs a restart:
     proxy/reload.py RESTART_ONLY, and any key this list does not know yet). */}}
{{- define "outrigger.hotReloadedKeys" -}}
policy_dirs unknown_hosts defaults reload_poll_interval
{{- end -}}

{{- define "outrigger.restartChecksum" -}}
{{- $hot := splitList " " (include "outrigger.hotReloadedKeys" .) -}}
{{- $restart := dict -}}
{{- range $key, $value := .Values.config -}}
{{- if and (eq $key "webhooks") (kindIs "map" $value) -}}
{{- $_ := set $restart "webhooks.listen" (get $value "listen") -}}{{/* routes and secrets hot-reload */}}
{{- else if not (has $key $hot) -}}
{{- $_ := set $restart $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $restart | sha256sum -}}
{{- end -}}

{{/* Values that cannot work together fail the render instead of a pod. */}}
{{- define "outrigger.check" -}}
{{- $dataDir := .Values.config.data_dir -}}
{{- if and $dataDir (ne (toString $dataDir) .Values.data.mountPath) -}}
{{- fail (printf "outrigger: config.data_dir (%v) must be data.mountPath (%s), the only writable path" $dataDir .Values.data.mountPath) -}}
{{- end -}}
{{- end -}}

{{/* URL of an admin endpoint, as seen from inside the pod. */}}
{{- define "outrigger.adminUrl" -}}
{{- $admin := .ctx.Values.config.admin | default dict -}}
{{- $host := $admin.host | default "127.0.0.1" | toString -}}
{{- if or (eq $host "0.0.0.0") (eq $host "::") -}}
{{- $host = "127.0.0.1" -}}
{{- else if contains ":" $host -}}
{{- $host = printf "[%s]" $host -}}
{{- end -}}
{{- printf "http://%s:%v%s" $host ($admin.port | default 15000) .path -}}
{{- end -}}

{{- define "outrigger.probe" -}}
{{- if eq .ctx.Values.probes.mode "httpGet" -}}
httpGet:
  path: {{ .path }}
  port: outrigger-admin
{{- else if eq .ctx.Values.probes.mode "exec" -}}
# Runs inside the pod, so it reaches the loopback-only admin listener.
exec:
  command:
    - python
    - -I                         # isolated, no site: a stdlib-only probe starts fastest
    - -S
    - -c
    - {{ printf "import sys, urllib.request as u; sys.exit(0 if u.build_opener(u.ProxyHandler({})).open('%s', timeout=2).status == 200 else 1)" (include "outrigger.adminUrl" .) | quote }}
{{- else -}}
{{- fail "outrigger: probes.mode must be exec or httpGet" -}}
{{- end }}
{{- with .settings }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/* The container, from a resolved context. */}}
{{- define "outrigger.sidecarFor" -}}
{{- include "outrigger.check" . -}}
{{- $v := .Values -}}
- name: outrigger
  image: {{ include "outrigger.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args: ["run", "-c", "/etc/outrigger/config.yaml"]
  ports:
    - name: outrigger-admin
      containerPort: {{ include "outrigger.adminPort" . }}
  {{- if $v.nativeSidecar }}
  # Native sidecar (Kubernetes >= 1.29): list this under initContainers. It stops only
  # after the app has exited, so no preStop hook is needed; on SIGTERM it drains itself.
  restartPolicy: Always
  {{- end }}
  {{- with $v.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if not $v.nativeSidecar }}
  # Classic sidecar: SIGTERM reaches the app and Outrigger together. Sleeping first keeps
  # the listeners open while the app makes its last calls; then Outrigger drains.
  lifecycle:
    preStop:
      exec:
        command:
          - python
          - -c
          - {{ printf "import time; time.sleep(%v)" (($v.classicSidecar | default dict).preStopSleepSeconds | default 10) | quote }}
  {{- end }}
  # Readiness and liveness wait for this; as a native sidecar the app's containers do too,
  # so Outrigger is ready before the app's first call.
  startupProbe:
    {{- include "outrigger.probe" (dict "ctx" . "path" "/readyz" "settings" $v.probes.startup) | nindent 4 }}
  readinessProbe:
    {{- include "outrigger.probe" (dict "ctx" . "path" "/readyz" "settings" $v.probes.readiness) | nindent 4 }}
  livenessProbe:
    {{- include "outrigger.probe" (dict "ctx" . "path" "/healthz" "settings" $v.probes.liveness) | nindent 4 }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    # Whole-directory mounts only, never subPath: a subPath mount is a copy
    # that never sees ConfigMap/Secret updates. Kubelet updates these
    # directories by swapping a symlink; Outrigger polls the files by
    # content hash and hot-reloads (config, policies and ${file:} secrets).
    - name: outrigger-config
      mountPath: /etc/outrigger
      readOnly: true
    - name: outrigger-tmp
      mountPath: /tmp
    - name: outrigger-data
      mountPath: {{ $v.data.mountPath }}
    {{- range $i, $s := $v.secrets }}
    - name: {{ printf "outrigger-secret-%d" $i }}
      mountPath: {{ required "outrigger: each secrets[] entry needs mountPath" $s.mountPath }}
      readOnly: true
    {{- end }}
{{- end -}}

{{/* The volumes, from a resolved context. */}}
{{- define "outrigger.volumesFor" -}}
{{- $v := .Values -}}
- name: outrigger-config
  configMap:
    name: {{ include "outrigger.configMapName" . }}
    # Keys cannot contain "/", so items place the policies in policies/.
    # Items do not stop updates (only subPath does); adding or removing a
    # policy file changes this list and so rolls the pods.
    items:
      - key: config.yaml
        path: config.yaml
      {{- range $file, $_ := $v.policies }}
      - key: {{ printf "policy.%s" $file }}
        path: {{ printf "policies/%s" $file }}
      {{- end }}
- name: outrigger-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- if eq $v.data.volume "emptyDir" }}
- name: outrigger-data
  emptyDir:
    {{- toYaml $v.data.emptyDir | nindent 4 }}
{{- else if eq $v.data.volume "persistentVolumeClaim" }}
- name: outrigger-data
  persistentVolumeClaim:
    claimName: {{ include "outrigger.dataClaimName" . }}
{{- else if ne $v.data.volume "external" }}
{{- fail "outrigger: data.volume must be emptyDir, persistentVolumeClaim or external" }}
{{- end }}
{{- range $i, $s := $v.secrets }}
- name: {{ printf "outrigger-secret-%d" $i }}
  secret:
    secretName: {{ required "outrigger: each secrets[] entry needs secretName" $s.secretName }}
    {{- with $s.items }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- end -}}

{{/*
outrigger.resolve: prints nothing; sets .out.ctx to the context to render
with (templates cannot return objects):
  - values under `outrigger:` (this chart is a dependency of an app chart):
    .Subcharts.outrigger, i.e. this chart's own values and metadata;
    without .Subcharts (older Helm), a dict built from .Values.outrigger
  - otherwise `.` itself
*/}}
{{- define "outrigger.resolve" -}}
{{- $root := .root -}}
{{- $ctx := $root -}}
{{- if hasKey $root.Values "outrigger" -}}
{{- $sub := dict -}}
{{- if $root.Subcharts -}}
{{- $sub = index $root.Subcharts "outrigger" | default dict -}}
{{- end -}}
{{- if $sub -}}
{{- $ctx = $sub -}}
{{- else -}}
{{- $ctx = dict "Values" $root.Values.outrigger "Release" $root.Release "Chart" $root.Chart -}}
{{- end -}}
{{- end -}}
{{- $_ := set .out "ctx" $ctx -}}
{{- end -}}

{{- define "outrigger.sidecar" -}}
{{- $r := dict -}}
{{- include "outrigger.resolve" (dict "root" . "out" $r) -}}
{{- include "outrigger.sidecarFor" $r.ctx -}}
{{- end -}}

{{- define "outrigger.volumes" -}}
{{- $r := dict -}}
{{- include "outrigger.resolve" (dict "root" . "out" $r) -}}
{{- include "outrigger.volumesFor" $r.ctx -}}
{{- end -}}

{{- define "outrigger.podAnnotations" -}}
{{- $r := dict -}}
{{- include "outrigger.resolve" (dict "root" . "out" $r) -}}
checksum/outrigger-restart: {{ include "outrigger.restartChecksum" $r.ctx }}
{{- end -}}

{{- define "outrigger.servicePort" -}}
{{- $r := dict -}}
{{- include "outrigger.resolve" (dict "root" . "out" $r) -}}
- name: outrigger-admin
  port: {{ include "outrigger.adminPort" $r.ctx }}
  targetPort: outrigger-admin
  protocol: TCP
{{- end -}}
