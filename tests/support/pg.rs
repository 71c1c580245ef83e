//! A throwaway PostgreSQL server for tests: `initdb` in a temporary directory, started on a free
//! random port from the installed binaries, stopped and removed when dropped — or, for the
//! server shared by one test binary, when that process exits.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root (CI) the server runs as the
//! `postgres` user that Debian's package creates.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// A running throwaway PostgreSQL server.
pub struct PgServer {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    run_as_postgres: bool,
    /// Holds the write end of the watchdog's stdin: when this process ends, the pipe closes and
    /// the watchdog stops the server and removes its directory.
    watchdog: Mutex<Option<Child>>,
}

/// The PostgreSQL binaries directory: `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
fn bindir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(dir) = candidates
        .into_iter()
        .rev()
        .find(|d| d.join("initdb").exists())
    {
        return dir;
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("PostgreSQL is not installed: run `make test` (it installs it) or apt-get install postgresql");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free local port")
}

/// A command running a PostgreSQL program, as `postgres` when this process is root.
fn pg_command(bindir: &Path, run_as_postgres: bool, program: &str) -> Command {
    let path = bindir.join(program);
    if run_as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// Runs `openssl` with `args`, panicking with its error output when it fails.
fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a self-signed CA certificate `<name>.crt` (and its key `<name>.key`) in `dir`, for
/// TLS tests; returns the certificate's path.
pub fn make_ca(dir: &Path, name: &str) -> std::path::PathBuf {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let subject = format!("/CN=profiles-sync {name}");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &subject,
        "-keyout",
        &key.display().to_string(),
        "-out",
        &crt.display().to_string(),
    ]);
    crt
}

impl PgServer {
    /// Starts a new server. Panics with the server's log when it can't start.
    pub fn start() -> PgServer {
        Self::start_with(false, false)
    }

    /// Starts a new server that makes every commit durable, as a production server does
    /// (`fsync`, `synchronous_commit` and `full_page_writes` at their defaults): for benches
    /// whose figures must compare with an `fsync` per commit on SQLite.
    pub fn start_durable() -> PgServer {
        Self::start_with(false, true)
    }

    /// Starts a new server that also accepts TLS, with a certificate for `localhost` signed by a
    /// test CA of its own (see [`PgServer::ca_cert`]).
    pub fn start_tls() -> PgServer {
        Self::start_with(true, false)
    }

    fn start_with(tls: bool, durable: bool) -> PgServer {
        let bindir = bindir();
        let run_as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("profiles-sync-pg-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        let mut tls_opts = String::new();
        if tls {
            let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            // A test CA (`ca.crt`, see `ca_cert`) and a server certificate it signs for
            // `localhost` only, so `verify-full` to 127.0.0.1 has a name to refuse.
            let ext = dir.path().join("server.ext");
            std::fs::write(&ext, "subjectAltName=DNS:localhost\n").expect("write ext");
            let p = |name: &str| dir.path().join(name).display().to_string();
            make_ca(dir.path(), "ca");
            for args in [
                vec![
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=localhost",
                    "-keyout",
                    &p("server.key"),
                    "-out",
                    &p("server.csr"),
                ],
                vec![
                    "x509",
                    "-req",
                    "-in",
                    &p("server.csr"),
                    "-CA",
                    &p("ca.crt"),
                    "-CAkey",
                    &p("ca.key"),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &p("server.ext"),
                    "-out",
                    &p("server.crt"),
                ],
            ] {
                openssl(&args);
            }
            let mut perms = std::fs::metadata(&key).expect("key").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
            std::fs::set_permissions(&key, perms).expect("chmod key");
            tls_opts = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        if run_as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "chown of the test server's directory to postgres failed"
            );
        }
        let out = pg_command(&bindir, run_as_postgres, "initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A port can be taken between probing and binding; try a few.
        for _ in 0..5 {
            let port = free_port();
            let log = dir.path().join("server.log");
            // Tests need no durability; a durable server keeps the defaults.
            let fast = if durable {
                ""
            } else {
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            };
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1{fast} -c max_connections=200{tls_opts}",
                dir.path().display()
            );
            let out = pg_command(&bindir, run_as_postgres, "pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-l"])
                .arg(&log)
                .args(["-o", &opts, "-w", "-t", "60", "start"])
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                let pg = PgServer {
                    dir,
                    bindir,
                    port,
                    run_as_postgres,
                    watchdog: Mutex::new(None),
                };
                pg.arm_watchdog();
                return pg;
            }
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            if !log.contains("could not bind") && !log.contains("already in use") {
                panic!(
                    "PostgreSQL did not start: {}\n{log}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        panic!("PostgreSQL did not find a free port in 5 tries");
    }

    /// Starts a shell that waits for its stdin to close (this process exiting) and then stops the
    /// server and removes its files, so a server held in a static does not outlive the tests.
    fn arm_watchdog(&self) {
        let script = format!(
            "cat >/dev/null; {stop}; rm -rf '{dir}'",
            stop = self.stop_command_line(),
            dir = self.dir.path().display()
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the test server's watchdog");
        *self.watchdog.lock().expect("watchdog lock") = Some(child);
    }

    fn stop_command_line(&self) -> String {
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.dir.path().join("data");
        let inner = format!(
            "'{}' -D '{}' -m immediate stop",
            pg_ctl.display(),
            data.display()
        );
        if self.run_as_postgres {
            format!("runuser -u postgres -- {inner} >/dev/null 2>&1")
        } else {
            format!("{inner} >/dev/null 2>&1")
        }
    }

    /// Stops the server as a crash would (`-m immediate`: no checkpoint, what its WAL buffers
    /// held is lost) and starts it again on the same port and options.
    pub fn crash_and_restart(&self) {
        let out = pg_command(&self.bindir, self.run_as_postgres, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            // The log file, else the server holds this output's pipe open.
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-m", "immediate", "-w", "-t", "60", "restart"])
            .output()
            .expect("run pg_ctl restart");
        assert!(
            out.status.success(),
            "pg_ctl restart failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The PEM certificate of the CA that signed a TLS server's certificate.
    pub fn ca_cert(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca.crt")).expect("a TLS server's CA")
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory's parent (holds the socket and the log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `postgres://` URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Connects to `database` as the superuser.
    pub fn connect(&self, database: &str) -> postgres::Client {
        postgres::Client::connect(&self.url(database), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to the test server: {e}"))
    }

    /// Creates a fresh, uniquely named database and returns its name.
    pub fn create_database(&self, prefix: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.connect("postgres")
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create database");
        name
    }

    /// The path of a PostgreSQL client program (`psql`, `pg_dump`) of the same version.
    pub fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .args(["-c", &self.stop_command_line()])
            .status();
        if let Ok(mut w) = self.watchdog.lock()
            && let Some(mut child) = w.take()
        {
            if let Some(stdin) = child.stdin.as_mut() {
                let _ = stdin.flush();
            }
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// The server shared by every test in this test binary (started on first use).
pub fn shared() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}
