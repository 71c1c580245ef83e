#![allow(dead_code)]
//! Kubernetes test harness: the emulated API server (`tests/kmock/apiserver.py`), `kubectl`, the
//! controller binary, and a stand-in kubelet that runs a sync Job's command on this machine.
//!
//! Included with `#[path]` by the e2e tests that need it (not through `support/mod.rs`, so other
//! test binaries don't compile it).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `profiles-sync` binary built for this test run, copied aside on first use: other builds
/// sharing the target directory may replace the original while the test runs.
pub fn binary() -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_profiles-sync"));
        let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        remove_stale_copies(&scratch);
        // A hard link in cargo's scratch directory: same file system, no copy of 300 MB.
        let copy = scratch.join(format!("profiles-sync-e2e-{}", std::process::id()));
        let _ = std::fs::remove_file(&copy);
        std::fs::hard_link(&built, &copy)
            .map(|_| copy)
            .unwrap_or(built)
    })
    .clone()
}

/// Removes the copies earlier test processes left (each keeps an old 400 MB binary alive once
/// a rebuild replaced the original): those whose process is gone.
fn remove_stale_copies(scratch: &std::path::Path) {
    // Whether a process is alive is read from /proc (Linux, where the tests run).
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return;
    };
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("profiles-sync-e2e-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The emulated API server, stopped when dropped (EOF on its stdin).
pub struct ApiServer {
    child: Child,
    stdin: Option<ChildStdin>,
    /// A kubeconfig for it.
    pub kubeconfig: PathBuf,
    /// kubectl's cache directory.
    pub cache: PathBuf,
}

impl ApiServer {
    /// Starts the server (the venv comes from `tests/kmock/install.sh`, which `make deps` runs).
    pub fn start(dir: &Path) -> ApiServer {
        let python = repo().join(".venv-kmock/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run tests/kmock/install.sh (make deps does)",
            python.display()
        );
        let log = dir.join("apiserver.log");
        let mut child = Command::new(&python)
            .arg(repo().join("tests/kmock/apiserver.py"))
            .args(["--port", "0", "--verbose"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("apiserver log"))
            .spawn()
            .expect("start tests/kmock/apiserver.py");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read READY");
        let port: u16 = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "apiserver did not print READY: {line:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kmock\n  cluster:\n    server: http://127.0.0.1:{port}\n\
                 contexts:\n- name: kmock\n  context: {{cluster: kmock, user: kmock, namespace: default}}\n\
                 current-context: kmock\nusers:\n- name: kmock\n  user: {{}}\n"
            ),
        )
        .expect("write kubeconfig");
        let stdin = child.stdin.take();
        ApiServer {
            child,
            stdin,
            kubeconfig,
            cache: dir.join("kube-cache"),
        }
    }

    /// A kubectl bound to this server.
    pub fn kubectl(&self) -> Kubectl {
        Kubectl {
            kubeconfig: self.kubeconfig.clone(),
            cache: self.cache.clone(),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// `kubectl` with a given kubeconfig.
#[derive(Clone)]
pub struct Kubectl {
    /// The kubeconfig.
    pub kubeconfig: PathBuf,
    /// The discovery cache directory.
    pub cache: PathBuf,
}

impl Kubectl {
    /// Runs kubectl; returns (success, stdout, stderr).
    pub fn try_run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut cmd = Command::new("kubectl");
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", &self.cache)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run kubectl (is it on PATH?)");
        if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            input.write_all(text.as_bytes()).expect("kubectl stdin");
        }
        let out = child.wait_with_output().expect("kubectl output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs kubectl and returns its stdout; panics when it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.try_run(args, None);
        assert!(ok, "kubectl {} failed:\n{err}{out}", args.join(" "));
        out
    }

    /// `kubectl apply -f -` with `yaml`.
    pub fn apply(&self, yaml: &str) -> String {
        let (ok, out, err) = self.try_run(&["apply", "-f", "-"], Some(yaml));
        assert!(ok, "kubectl apply failed:\n{err}{out}\n---\n{yaml}");
        out
    }

    /// A jsonpath of one object (empty when absent).
    pub fn jsonpath(&self, kind_name: &[&str], path: &str) -> String {
        let mut args: Vec<&str> = vec!["get"];
        args.extend_from_slice(kind_name);
        let jp = format!("jsonpath={path}");
        args.extend(["-o", &jp]);
        let (_, out, _) = self.try_run(&args, None);
        out
    }

    /// A kube client for the same cluster.
    pub async fn client(&self) -> Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("kubeconfig");
        Client::try_from(cfg).expect("kube client")
    }
}

/// The controller process, stopped (SIGKILL) when dropped unless stopped gracefully before.
pub struct ControllerProcess {
    child: Option<Child>,
    /// Its /metrics, /healthz and /readyz address.
    pub listen: String,
    /// Its log file.
    pub log: PathBuf,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl ControllerProcess {
    /// Starts `profiles-sync controller` against `kubeconfig`.
    pub fn start(
        dir: &Path,
        kubeconfig: &Path,
        engine_url: &str,
        token_file: &Path,
        extra: &[&str],
    ) -> ControllerProcess {
        let log = dir.join("controller.log");
        let child = Command::new(binary())
            .arg("controller")
            .args(["--engine-url", engine_url])
            .arg("--engine-token-file")
            .arg(token_file)
            // Port 0: the address it bound is read from its log (a probed free port could be
            // taken by another process before the controller binds it).
            .args([
                "--sync-image",
                "profiles-sync:e2e",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("controller log"))
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .expect("controller log"),
            )
            .spawn()
            .expect("start the controller");
        let mut process = ControllerProcess {
            child: Some(child),
            listen: String::new(),
            log,
        };
        process.listen = process.bound_address();
        process
    }

    /// The address the controller bound, from its log line `controller serving /metrics…`
    /// (JSON, its stderr being a file); waits for it up to a minute, and fails when the
    /// controller exits first.
    fn bound_address(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self.log().lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v["message"]
                    .as_str()?
                    .starts_with("controller serving")
                    .then(|| v["listen"].as_str().map(String::from))?
            });
            if let Some(listen) = found {
                return listen;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "the controller never said where it listens ({exited:?}):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The controller's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the controller's HTTP endpoint.
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let r = reqwest::get(format!("http://{}{path}", self.listen))
            .await
            .map_err(|e| e.to_string())?;
        let code = r.status().as_u16();
        Ok((code, r.text().await.unwrap_or_default()))
    }

    /// Sends SIGTERM and waits (bounded) for the exit; returns whether it exited successfully.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Stands in for the kubelet and the Job controller of a real cluster (kmock runs neither): runs
/// each new sync Job's command on this machine with the mounted ConfigMap and Secrets as files,
/// then writes the pod (with its termination message) and the Job's completion through the API.
pub struct Kubelet {
    /// Jobs it ran, in order.
    pub ran: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    /// Starts polling for Jobs.
    pub fn start(client: Client, dir: PathBuf) -> Kubelet {
        let ran = Arc::new(Mutex::new(vec![]));
        let seen = ran.clone();
        let task = tokio::spawn(async move {
            let mut started: HashSet<String> = HashSet::new();
            loop {
                let jobs: Api<Job> = Api::all(client.clone());
                if let Ok(list) = jobs
                    .list(
                        &ListParams::default()
                            .labels("app.kubernetes.io/managed-by=profiles-sync-controller"),
                    )
                    .await
                {
                    for job in list.items {
                        let key =
                            format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
                        let finished = job
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| !c.is_empty());
                        if finished || !started.insert(key.clone()) {
                            continue;
                        }
                        if let Err(e) = run_job(&client, &job, &dir).await {
                            eprintln!("kubelet: job {key}: {e}");
                        }
                        seen.lock().expect("lock").push(job.name_any());
                    }
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        Kubelet { ran, task }
    }

    /// How many Jobs it ran.
    pub fn count(&self) -> usize {
        self.ran.lock().expect("lock").len()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_job(client: &Client, job: &Job, dir: &Path) -> Result<(), String> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let work = dir.join(format!("pod-{name}"));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let pod_spec = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .ok_or("no pod template")?;
    let container = pod_spec.containers.first().cloned().ok_or("no container")?;
    // Volumes become directories holding what a kubelet would project into them.
    let mut mounts: Vec<(String, PathBuf)> = vec![];
    for m in container.volume_mounts.clone().unwrap_or_default() {
        let host = work.join(&m.name);
        std::fs::create_dir_all(&host).map_err(|e| e.to_string())?;
        let volume = pod_spec
            .volumes
            .as_ref()
            .and_then(|v| v.iter().find(|v| v.name == m.name))
            .ok_or("mount without volume")?;
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        if let Some(cm) = &volume.config_map {
            // The controller creates the ConfigMap right after the Job: wait for it as a kubelet does.
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            let deadline = Instant::now() + Duration::from_secs(20);
            let found = loop {
                if let Ok(Some(c)) = api.get_opt(&cm.name).await {
                    break c;
                }
                if Instant::now() > deadline {
                    return Err(format!("ConfigMap {} never appeared", cm.name));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            files.extend(
                found
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
        }
        if let Some(s) = &volume.secret {
            let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
            let secret = api
                .get(s.secret_name.as_deref().unwrap_or_default())
                .await
                .map_err(|e| format!("Secret: {e}"))?;
            let data = secret.data.unwrap_or_default();
            match &s.items {
                Some(items) => {
                    for i in items {
                        if let Some(v) = data.get(&i.key) {
                            files.insert(i.path.clone(), v.0.clone());
                        }
                    }
                }
                None => files.extend(data.into_iter().map(|(k, v)| (k, v.0))),
            }
        }
        for (file, bytes) in files {
            std::fs::write(host.join(file), bytes).map_err(|e| e.to_string())?;
        }
        mounts.push((m.mount_path.clone(), host));
    }
    let termination = work.join("termination-log");
    let term_path = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    let command = container.command.clone().ok_or("no command")?;
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| {
            if *a == term_path {
                return termination.display().to_string();
            }
            for (mount, host) in &mounts {
                if let Some(rest) = a.strip_prefix(mount.as_str()) {
                    return format!("{}{rest}", host.display());
                }
            }
            a.clone()
        })
        .collect();
    let started = jiff::Timestamp::now();
    let out = tokio::process::Command::new(binary())
        .args(&args)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    std::fs::write(
        work.join("output.log"),
        [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
    )
    .map_err(|e| e.to_string())?;
    let message = std::fs::read_to_string(&termination).ok();
    let ok = out.status.success();
    let now = jiff::Timestamp::now();

    // The pod, as the Job controller would create it and the kubelet report it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{name}-k1"),
            "labels": {"job-name": name, "batch.kubernetes.io/job-name": name},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                 "uid": job.uid().unwrap_or_default(), "controller": true}]
        },
        "spec": pod_spec,
    }))
    .map_err(|e| e.to_string())?;
    pods.create(&PostParams::default(), &pod)
        .await
        .map_err(|e| format!("create pod: {e}"))?;
    let terminated = json!({"exitCode": out.status.code().unwrap_or(1), "reason": if ok { "Completed" } else { "Error" },
                            "message": message, "startedAt": started.to_string(), "finishedAt": now.to_string()});
    pods.patch_status(
        &format!("{name}-k1"),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": if ok { "Succeeded" } else { "Failed" },
            "containerStatuses": [{"name": container.name, "image": container.image, "imageID": "", "ready": false,
                                   "restartCount": 0, "state": {"terminated": terminated}}]}})),
    )
    .await
    .map_err(|e| format!("pod status: {e}"))?;

    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let condition = json!({"type": if ok { "Complete" } else { "Failed" }, "status": "True",
                           "reason": if ok { "Completed" } else { "BackoffLimitExceeded" },
                           "lastTransitionTime": now.to_string(), "lastProbeTime": now.to_string()});
    let mut status =
        json!({"startTime": started.to_string(), "conditions": [condition], "active": 0});
    if ok {
        status["succeeded"] = json!(1);
        status["completionTime"] = json!(now.to_string());
    } else {
        status["failed"] = json!(1);
    }
    jobs.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .map_err(|e| format!("job status: {e}"))?;
    Ok(())
}
