//! The emulated API server's own checks: `tests/kmock/api_check.py` exercises, over raw HTTP,
//! each API behaviour `tests/kmock/README.md` claims for it (watches, resource versions,
//! patches, status subresources, exit on stdin EOF and SIGTERM, …), which the controller and
//! install tests rely on. A change of the server that breaks one fails here, not as a puzzling
//! failure of those tests.

use std::path::Path;
use std::process::Command;

#[test]
fn the_emulated_api_server_behaves_as_its_readme_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv-kmock/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run tests/kmock/install.sh (make deps does)",
        python.display()
    );
    let out = Command::new(&python)
        .arg(root.join("tests/kmock/api_check.py"))
        .output()
        .expect("run tests/kmock/api_check.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let summary = text
        .lines()
        .rev()
        .find(|l| l.ends_with(" failed"))
        .unwrap_or_else(|| panic!("no summary line:\n{text}"));
    let passed: u32 = summary
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(
        passed > 0 && summary.ends_with(" 0 failed"),
        "{summary}\n{text}"
    );
}
