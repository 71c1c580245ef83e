//! `profiles-sync demo` runs the whole pipeline from nothing, twice in the same directory.

use std::process::{Command, Output};

/// Runs `demo --people <people> --dir <dir>`.
fn demo(people: &str, dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_profiles-sync"))
        .args(["demo", "--people", people, "--dir"])
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn the_demo_runs_end_to_end_and_again() {
    let dir = tempfile::tempdir().unwrap();
    for run in 0..2 {
        let out = demo("60", dir.path());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {run}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for expected in [
            "[1/4]",
            "[4/4]",
            "kubectl get whc",
            "Success",
            "user_identifiers",
            "One profile's identifiers",
            "Merges",
            "order_completed",
        ] {
            assert!(
                text.contains(expected),
                "run {run}: {expected:?} missing from:\n{text}"
            );
        }
        assert!(
            !text.contains("\x1b["),
            "no terminal escapes when stdout is not a terminal"
        );
        // NEXT SYNC as `kubectl get whc` shows it: the next hourly slot, in UTC (it showed
        // the schedule, "1h").
        let row = text
            .lines()
            .skip_while(|l| !l.contains("NEXT SYNC"))
            .nth(1)
            .unwrap_or_default();
        let next = row.split_whitespace().last().unwrap_or_default();
        let at: jiff::Timestamp = next
            .parse()
            .unwrap_or_else(|e| panic!("NEXT SYNC {next:?}: {e}"));
        assert_eq!(at.as_second() % 3600, 0, "{next}");
        let now = jiff::Timestamp::now().as_second();
        assert!((now - 60..=now + 3600).contains(&at.as_second()), "{next}");
        assert!(dir.path().join("warehouse.db").exists() && dir.path().join("store.db").exists());
        // The second run starts fresh: the same sample gives the same number of rows.
        let conn = rusqlite::Connection::open(dir.path().join("warehouse.db")).unwrap();
        let tracks: i64 = conn
            .query_row("SELECT count(*) FROM tracks", [], |r| r.get(0))
            .unwrap();
        assert!(tracks > 60, "{tracks}");
        let pages: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'pages'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(pages, 0, "the example SelectiveSync turns pages off");
        // The merges shown are the profiles merged away (profile_merges also maps each live
        // profile to itself).
        let shown: i64 = text
            .lines()
            .skip_while(|l| !l.contains("MERGED PROFILES"))
            .nth(1)
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no merge count in:\n{text}"));
        let merged: i64 = conn
            .query_row(
                "SELECT count(*) FROM profile_merges WHERE segment_id <> canonical_segment_id",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(shown, merged);
    }
}

/// A small sample (`--people 0` or `3`: no screens, no orders) runs to the end too, its tour
/// skipping the queries of tables it has none of (it stopped on "no such table" after the sync
/// had succeeded).
#[test]
fn the_demo_runs_with_a_small_sample() {
    for (people, expected) in [("0", "no profiles"), ("3", "no order_completed table")] {
        let dir = tempfile::tempdir().unwrap();
        let out = demo(people, dir.path());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "--people {people}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("[4/4]") && text.contains(expected),
            "--people {people}: {text}"
        );
    }
}
