//! The emulated API server of tests/kmock, started for one test: `apiserver.py --port 0`, its
//! `READY <port>` line read from stdout, and stopped by closing its stdin (see tests/kmock/README.md).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};

use super::{kubectl, repo};

/// A running emulated API server and a kubeconfig pointing at it.
pub struct ApiServer {
    child: Child,
    stdin: Option<ChildStdin>,
    dir: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl ApiServer {
    /// Starts a server that serves every built-in kind of kmock's bundled discovery data
    /// (StatefulSets and PersistentVolumeClaims included) and the CRDs in `crd_dirs` only: a
    /// cluster where nothing of ours is installed yet.
    pub fn start(crd_dirs: &[&Path]) -> ApiServer {
        let python = repo().join(".venv-kmock/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run `make deps` (or tests/kmock/install.sh)",
            python.display()
        );
        let mut cmd = Command::new(python);
        cmd.arg(repo().join("tests/kmock/apiserver.py"))
            .args(["--port", "0", "--all-builtins"]);
        for dir in crd_dirs {
            cmd.arg("--crds").arg(dir);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tests/kmock/apiserver.py");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the READY line");
        let port = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| {
                let status = child.wait().ok();
                panic!("the API server did not start (exit {status:?}); it printed {line:?}")
            });
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kmock\n  cluster:\n    server: http://127.0.0.1:{port}\n\
                 contexts:\n- name: kmock\n  context: {{cluster: kmock, user: kmock, namespace: default}}\n\
                 current-context: kmock\nusers:\n- name: kmock\n  user: {{}}\n"
            ),
        )
        .expect("write kubeconfig");
        ApiServer {
            child,
            stdin,
            dir,
            port,
        }
    }

    /// Runs kubectl against this server.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        kubectl()
            .args(args)
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("KUBECACHEDIR", self.dir.path().join("cache"))
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl and fails the test, with its output, unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// `kubectl apply -f` of a manifest stream with extra flags; returns stdout.
    pub fn apply(&self, manifest: &str, flags: &[&str]) -> String {
        let path = self.dir.path().join("manifest.yaml");
        let mut f = std::fs::File::create(&path).expect("manifest file");
        f.write_all(manifest.as_bytes()).expect("write manifest");
        let path = path.to_str().expect("UTF-8 path");
        let mut args = vec!["apply", "-f", path];
        args.extend_from_slice(flags);
        self.kubectl_ok(&args)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // EOF on stdin stops the server (it exits within 5 s in every case).
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}
