{{/* The engine's pod template, shared by its StatefulSet (SQLite) and Deployment (PostgreSQL). */}}
{{- define "profiles-sync.enginePodTemplate" -}}
{{- $e := .Values.engine -}}
metadata:
  labels:
    {{- include "profiles-sync.selectorLabels" (dict "ctx" . "component" "engine") | nindent 4 }}
    {{- with $e.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # The engine reads its rules at start, and its sources again when their Secret changes (a
    # minute or so later, as the kubelet updates it): roll it so a change of either takes effect at once.
    checksum/sources: {{ toJson .Values.sources | sha256sum }}
    checksum/identity-rules: {{ toJson .Values.identityRules | sha256sum }}
    {{- with $e.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "profiles-sync.engineName" . }}
  automountServiceAccountToken: false
  # After SIGTERM: 5 s still serving (not ready) while endpoints and ingresses let go, up to
  # 25 s finishing requests in flight, then the writer's last commit.
  terminationGracePeriodSeconds: 45
  securityContext:
    {{- include "profiles-sync.podSecurityContext" . | nindent 4 }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $e.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  containers:
    - name: engine
      image: {{ include "profiles-sync.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - engine
        - --listen=0.0.0.0:8080
        {{- if eq .Values.store.type "sqlite" }}
        - --store=sqlite:///var/lib/profiles-sync/store.db
        {{- end }}
        - --sources=/etc/profiles-sync/sources/sources.yaml
        - --feed-token-file=/etc/profiles-sync/feed-token/token
        - --queue-capacity={{ $e.queueCapacity }}
        - --queue-events={{ dig "queueEvents" 100000 $e | int }}
        - --reading-capacity={{ $e.readingCapacity }}
        - --stall-timeout-secs={{ $e.stallTimeoutSeconds }}
        - --body-timeout-secs={{ $e.bodyTimeoutSeconds }}
        - --header-timeout-secs={{ $e.headerTimeoutSeconds }}
        - --max-connections={{ $e.maxConnections }}
        - --feed-readers={{ $e.feedReaders }}
        {{- with $e.eventRetention }}
        - --event-retention={{ . }}
        - --retention-interval-secs={{ $e.retentionIntervalSeconds }}
        {{- end }}
        {{- if .Values.identityRules }}
        - --rules=/etc/profiles-sync/rules/rules.yaml
        {{- end }}
      env:
        - name: RUST_LOG
          value: {{ $e.logLevel | quote }}
        {{- if eq .Values.store.type "postgres" }}
        # The URL carries the password: only ever from the Secret.
        - name: PROFILES_SYNC_STORE
          valueFrom:
            secretKeyRef:
              name: {{ .Values.store.postgres.existingSecret }}
              key: {{ .Values.store.postgres.key }}
        {{- if .Values.store.postgres.caCertSecret }}
        # The CAs to verify the store's server against (sslmode=verify-ca / verify-full).
        - name: PGSSLROOTCERT
          value: /etc/profiles-sync/store-ca/ca.crt
        {{- end }}
        {{- end }}
      ports:
        - name: http
          containerPort: 8080
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: 2
        failureThreshold: 60
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: 20
        failureThreshold: 3
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        periodSeconds: 5
      resources:
        {{- toYaml $e.resources | nindent 8 }}
      securityContext:
        {{- include "profiles-sync.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        - name: sources
          mountPath: /etc/profiles-sync/sources
          readOnly: true
        - name: feed-token
          mountPath: /etc/profiles-sync/feed-token
          readOnly: true
        {{- if .Values.identityRules }}
        - name: identity-rules
          mountPath: /etc/profiles-sync/rules
          readOnly: true
        {{- end }}
        {{- if eq .Values.store.type "sqlite" }}
        - name: store
          mountPath: /var/lib/profiles-sync
        {{- end }}
        {{- if and (eq .Values.store.type "postgres") .Values.store.postgres.caCertSecret }}
        - name: store-ca
          mountPath: /etc/profiles-sync/store-ca
          readOnly: true
        {{- end }}
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: sources
      secret:
        secretName: {{ include "profiles-sync.sourcesSecret" . }}
        items:
          - key: {{ .Values.sources.key }}
            path: sources.yaml
    - name: feed-token
      secret:
        secretName: {{ include "profiles-sync.feedTokenSecret" . }}
        items:
          - key: {{ .Values.feedToken.key }}
            path: token
    {{- if .Values.identityRules }}
    - name: identity-rules
      configMap:
        name: {{ include "profiles-sync.fullname" . }}-identity-rules
    {{- end }}
    {{- if and (eq .Values.store.type "postgres") .Values.store.postgres.caCertSecret }}
    - name: store-ca
      secret:
        secretName: {{ .Values.store.postgres.caCertSecret }}
        items:
          - key: {{ .Values.store.postgres.caCertKey }}
            path: ca.crt
    {{- end }}
    {{- if and (eq .Values.store.type "sqlite") (not .Values.store.sqlite.persistence.enabled) }}
    - name: store
      emptyDir: {}
    {{- end }}
    - name: tmp
      emptyDir: {}
  {{- with $e.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $e.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $e.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $e.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
