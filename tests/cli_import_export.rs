//! `profiles-sync import` and `export` as a user runs them.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_profiles-sync"))
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run profiles-sync");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sample() -> String {
    [
        json!({"type": "page", "messageId": "m1", "anonymousId": "a1", "name": "Home"}).to_string(),
        json!({"type": "identify", "messageId": "m2", "anonymousId": "a1", "traits": {"email": "jane@example.com"}}).to_string(),
        "{broken json".to_string(),
        json!({"type": "track", "messageId": "m3", "anonymousId": "a2"}).to_string(),
        String::new(),
        json!({"batch": [
            {"type": "page", "messageId": "m4", "anonymousId": "a2", "name": "Pricing"},
            {"type": "identify", "messageId": "m5", "anonymousId": "a2", "traits": {"email": "jane@example.com", "plan": "pro"}},
            {"type": "alias", "messageId": "m6", "userId": "u1"}
        ]})
        .to_string(),
        json!({"type": "track", "messageId": "m7", "userId": "u1", "event": "Order Completed", "properties": {"total": 5}}).to_string(),
        json!({"type": "page", "messageId": "m1", "anonymousId": "a1", "name": "Home"}).to_string(),
    ]
    .join("\n")
}

fn import(store: &str, input: &std::path::Path) -> (Option<i32>, String, String) {
    let out = bin()
        .args(["import", "--json", "--store", store])
        .arg(input)
        .output()
        .expect("run profiles-sync");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn export(store: &str, table: &str, extra: &[&str]) -> String {
    let (ok, out, err) = run(bin()
        .args(["export", "--store", store, "--table", table])
        .args(extra));
    assert!(ok, "export {table}: {err}");
    out
}

fn check(store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, sample()).unwrap();
    // Some lines are refused: the good ones are stored, the summary printed, and the exit
    // status says that not everything was imported.
    let (code, out, err) = import(store, &input);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("refused and not imported"), "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["accepted"], 5);
    assert_eq!(summary["duplicates"], 1);
    assert_eq!(summary["profiles_created"], 3);
    assert_eq!(summary["merges"], 1);
    assert_eq!(summary["rejected"]["malformed JSON"], 1);
    let rejected = summary["rejected"].as_object().unwrap();
    let count = |prefix: &str| -> u64 {
        rejected
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        (count("event: "), count("previousId: ")),
        (1, 1),
        "{summary}"
    );
    // Errors name the line (and the index inside a batch line).
    assert!(err.contains("line 3: malformed JSON"), "{err}");
    assert!(err.contains("line 4: event: "), "{err}");
    assert!(err.contains("line 6 (batch[2]): previousId: "), "{err}");

    let graph: Vec<Value> = export(store, "id_graph_updates", &[])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(graph.len(), 4, "a1, a2 and u1 created, a2's profile merged");
    let merge = &graph[2];
    assert_ne!(merge["segment_id"], merge["canonical_segment_id"]);
    let after = graph[1]["seq"].as_i64().unwrap();
    let later = export(
        store,
        "id_graph_updates",
        &["--after-seq", &after.to_string()],
    );
    assert_eq!(later.lines().count(), 2);

    let orders = export(store, "order_completed", &[]);
    assert_eq!(orders.lines().count(), 1);
    let csv = export(store, "pages", &["--format", "csv"]);
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("seq,segment_id,event_source_id,type,messageId")
    );
    assert_eq!(lines.count(), 2);

    // One row per profile (three created): the merged one names its survivor, the others
    // themselves.
    let merges: Vec<Value> = export(store, "profile_merges", &[])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(merges.len(), 3, "{merges:?}");
    let merged = merges
        .iter()
        .filter(|m| m["segment_id"] != m["canonical_segment_id"])
        .count();
    assert_eq!(merged, 1, "{merges:?}");
    let traits: Vec<Value> = export(store, "user_traits", &[])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = traits.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["email", "plan"]);

    let (ok, _, err) = run(bin().args(["export", "--store", store, "--table", "nope"]));
    assert!(!ok);
    assert!(
        err.contains("unknown table \"nope\"") && err.contains("order_completed"),
        "{err}"
    );
}

/// Messages without a `messageId` get one derived from their line (its text and place), so
/// that running the same file again — after an interrupted import, or to store the lines fixed
/// since — stores none of them twice; two equal lines stay two events. The engine's random ids
/// stored every such message again on each run.
#[test]
fn a_file_imported_twice_stores_its_messages_without_ids_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let input = dir.path().join("no-ids.jsonl");
    let call = json!({"type": "track", "anonymousId": "a1", "event": "Clicked", "timestamp": "2026-01-01T00:00:00Z"});
    let batch = json!({"batch": [
        {"type": "page", "anonymousId": "a2", "name": "Home"},
        {"type": "page", "anonymousId": "a2", "name": "Home", "messageId": null}
    ]});
    std::fs::write(
        &input,
        [call.to_string(), call.to_string(), batch.to_string()].join("\n"),
    )
    .unwrap();
    // The first run stores four events (two equal lines are two); the second, none again.
    for (run, expected) in [("first", (4, 0)), ("again", (0, 4))] {
        let (code, out, err) = import(&store, &input);
        assert_eq!(code, Some(0), "{err}");
        let summary: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (&summary["accepted"], &summary["duplicates"]),
            (&json!(expected.0), &json!(expected.1)),
            "{run}: {summary}"
        );
    }
    let ids: Vec<String> = export(&store, "events", &[])
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["messageId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 4);
    assert!(ids.iter().all(|id| id.starts_with("import-")), "{ids:?}");
}

#[test]
fn import_and_export_with_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    check(&format!(
        "sqlite://{}",
        dir.path().join("store.db").display()
    ));
}

#[test]
fn import_and_export_with_postgres() {
    let pg = support::pg::shared();
    check(&pg.url(&pg.create_database("cli")));
}

#[test]
fn import_reads_stdin_and_refuses_a_bad_store_url() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let mut child = bin()
        .args(["import", "--json", "--store", &store, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            json!({"type": "track", "userId": "u", "event": "E"})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["accepted"], 1);

    let (ok, _, err) = run(bin().args(["export", "--store", "mysql://x", "--table", "events"]));
    assert!(!ok);
    assert!(err.contains("unsupported store URL"), "{err}");
}

/// `import` reads a batch line as the Tracking API does (the batch's context merged into each
/// message) but without its 32 KB limit per message: a large message is imported in a batch
/// line as it is alone on a line.
/// A whole export written as one JSON array, or a line past 16 MB, was parsed whole (a 125 MB
/// array took 1.9 GB before "expected an object"): such lines are refused, saying why, without
/// being held, and the lines after them import.
#[test]
fn a_json_array_or_an_overlong_line_is_refused_and_the_rest_imports() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let input = dir.path().join("events.jsonl");
    let msg = |id: &str| json!({"type": "track", "messageId": id, "userId": "u", "event": "A"});
    let mut text = format!("{}\n", json!([msg("in-array")]));
    text.push_str(&format!(
        "{{\"batch\": [{}], \"pad\": \"{}\"}}\n",
        msg("in-long-line"),
        "x".repeat(17 << 20)
    ));
    text.push_str(&format!("{}\n", msg("after")));
    std::fs::write(&input, text).unwrap();
    let (code, out, err) = import(&store, &input);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("line 1: malformed JSON: a JSON array"),
        "{err}"
    );
    assert!(err.contains("line 2: line too long"), "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (summary["lines"].as_u64(), summary["accepted"].as_u64()),
        (Some(3), Some(1)),
        "{summary}"
    );
    let tracks = export(&store, "tracks", &[]);
    assert!(
        tracks.contains("\"after\"") && !tracks.contains("in-long-line"),
        "{tracks}"
    );
}

/// An event received more than a day ahead of the importer's clock (a typo in the year) is
/// refused naming `receivedAt` — it would hold every later event back from retention until
/// then; a day ahead passes (clocks disagree), as does any past receipt.
#[test]
fn an_event_received_in_the_future_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let input = dir.path().join("events.jsonl");
    let at = |hours: i64| {
        jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_hours(hours))
            .unwrap()
            .to_string()
    };
    let msg = |id: &str, received: String| json!({"type": "track", "messageId": id, "userId": "u", "event": "A", "receivedAt": received});
    let text = [
        msg("typo", "2099-01-01T00:00:00Z".into()),
        msg("ahead", at(23)),
        msg("past", at(-24 * 400)),
    ]
    .iter()
    .map(|m| format!("{m}\n"))
    .collect::<String>();
    std::fs::write(&input, text).unwrap();
    let (code, out, err) = import(&store, &input);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("line 1: receivedAt"), "{err}");
    assert!(err.contains("future"), "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["accepted"].as_u64(), Some(2), "{summary}");
}

#[test]
fn import_takes_large_messages_in_batch_lines() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let big = "x".repeat(40 * 1024);
    let lines = [
        json!({"context": {"ip": "1.2.3.4"}, "batch": [
            {"type": "track", "messageId": "b1", "userId": "u1", "event": "Big",
             "properties": {"blob": big}},
            {"type": "track", "messageId": "b2", "userId": "u1", "event": "Small"}
        ]})
        .to_string(),
        json!({"type": "track", "messageId": "b3", "userId": "u1", "event": "Big",
               "properties": {"blob": big}})
        .to_string(),
    ];
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let (code, out, err) = import(&store, &input);
    assert_eq!(code, Some(0), "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["accepted"], 3, "{summary} {err}");
    let events: Vec<Value> = export(&store, "events", &[])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    assert!(
        events
            .iter()
            .take(2)
            .all(|e| e.to_string().contains("1.2.3.4")),
        "the batch's context reaches each message"
    );
}

/// A line that is not UTF-8 is reported with its number and skipped; the good lines before
/// and after it are stored (it ended the import, and the lines read since the last group were
/// lost). CRLF line ends read as LF.
#[test]
fn a_line_that_is_not_utf8_is_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let input = dir.path().join("events.jsonl");
    let mut bytes = json!({"type": "track", "messageId": "u1", "userId": "u", "event": "A"})
        .to_string()
        .into_bytes();
    bytes.extend_from_slice(
        b"\r\n{\"type\":\"track\",\"messageId\":\"u2\",\"userId\":\"u\",\"event\":\"\xff\"}\n",
    );
    bytes.extend_from_slice(
        json!({"type": "track", "messageId": "u3", "userId": "u", "event": "C"})
            .to_string()
            .as_bytes(),
    );
    std::fs::write(&input, bytes).unwrap();
    let (code, out, err) = import(&store, &input);
    assert_eq!(code, Some(1), "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["lines"], 3);
    assert_eq!(summary["accepted"], 2, "{summary}");
    assert_eq!(summary["rejected"]["malformed JSON"], 1, "{summary}");
    assert!(err.contains("line 2: malformed JSON: not UTF-8"), "{err}");
}

/// A CSV export with no rows still has its header: the columns the table's rows would have
/// (it was an empty file).
#[test]
fn a_csv_export_of_an_empty_table_has_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let input = dir.path().join("events.jsonl");
    std::fs::write(
        &input,
        json!({"type": "track", "messageId": "t1", "userId": "u", "event": "A"}).to_string(),
    )
    .unwrap();
    let (code, _, err) = import(&store, &input);
    assert_eq!(code, Some(0), "{err}");
    for (table, first, after) in [
        ("screens", "seq,", "1000"),
        (
            "id_graph_updates",
            "seq,segment_id,canonical_segment_id",
            "1000",
        ),
        ("user_traits", "canonical_segment_id,", "0"),
    ] {
        let out = export(&store, table, &["--format", "csv", "--after-seq", after]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{table}: {out:?}");
        assert!(
            lines[0].starts_with(first) && !lines[0].is_empty(),
            "{table}: {out:?}"
        );
    }
    // A current-state table has no seq to start after: asking is an error, not ignored.
    let (ok, _, err) = run(bin().args([
        "export",
        "--store",
        &store,
        "--table",
        "user_traits",
        "--after-seq",
        "5",
    ]));
    assert!(!ok && err.contains("current-state table"), "{err}");
    // A negative seq is a usage error (it read as 0).
    let (ok, _, err) = run(bin().args([
        "export",
        "--store",
        &store,
        "--table",
        "tracks",
        "--after-seq=-5",
    ]));
    assert!(!ok && err.contains("--after-seq"), "{err}");
    // With rows, the header is the rows' (unchanged).
    let tracks = export(&store, "tracks", &["--format", "csv"]);
    assert_eq!(tracks.lines().count(), 2, "{tracks}");
}

/// `export … | head`: the reader going away ends the export quietly with status 0, as for any
/// Unix filter (it printed "error: Broken pipe" and exited 1 — after the demo suggested it).
#[test]
fn an_export_whose_reader_goes_away_ends_quietly() {
    // Far more than a pipe's buffer of output.
    export_into_a_reader_that_goes_away(3000, 100);
}

/// As above with rows longer than stdout's 1 KB line buffer: the broken pipe then surfaces
/// inside `serde_json::to_writer`, as a `serde_json::Error` whose `source()` is not the
/// `io::Error`, and the export printed "error: Broken pipe (os error 32)" with status 1.
#[test]
fn an_export_of_long_rows_whose_reader_goes_away_ends_quietly() {
    export_into_a_reader_that_goes_away(300, 5000);
}

/// Imports `rows` events with a `pad`-byte property, exports them into a reader that reads one
/// line and goes away: the export ends with status 0 and says nothing.
fn export_into_a_reader_that_goes_away(rows: usize, pad: usize) {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let input = dir.path().join("events.jsonl");
    let lines: Vec<String> = (0..rows)
        .map(|i| {
            json!({"type": "track", "messageId": format!("t{i}"), "userId": format!("u{i}"), "event": "A", "properties": {"pad": "x".repeat(pad)}})
                .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let (code, _, err) = import(&store, &input);
    assert_eq!(code, Some(0), "{err}");
    let mut child = bin()
        .args(["export", "--store", &store, "--table", "tracks"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"seq\""), "{first}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
}

/// (review) `export --table events` then `import` of that output into a fresh store keeps each
/// event's `event_source_id` (it became the importer's `--source-id`, "import").
#[test]
fn an_exported_event_keeps_its_source_when_imported_again() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        format!("sqlite://{}", dir.path().join("a.db").display()),
        format!("sqlite://{}", dir.path().join("b.db").display()),
    );
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        json!({"type": "track", "messageId": "m1", "userId": "u", "event": "A"}).to_string(),
    )
    .unwrap();
    let (ok, _, err) = run(bin()
        .args(["import", "--source-id", "web", "--store", &a])
        .arg(&input));
    assert!(ok, "{err}");
    let exported = dir.path().join("out.jsonl");
    std::fs::write(&exported, export(&a, "events", &[])).unwrap();
    let (code, _, err) = import(&b, &exported);
    assert_eq!(code, Some(0), "{err}");
    let row: Value = serde_json::from_str(export(&b, "events", &[]).trim()).unwrap();
    assert_eq!(row["event_source_id"], "web", "{row}");
}

/// An SDK's payload without `receivedAt` (sent in 2023) imports with its own time, and keeps it
/// when the store's row is read back: the clock-skew correction counted from the import's time
/// and re-dated it to now (review).
#[test]
fn an_sdk_payload_without_its_receipt_keeps_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        json!({"type": "track", "messageId": "m1", "userId": "u", "event": "A",
            "timestamp": "2023-01-01T00:00:00Z", "sentAt": "2023-01-01T00:00:05Z"})
        .to_string(),
    )
    .unwrap();
    let (code, _, err) = import(&store, &input);
    assert_eq!(code, Some(0), "{err}");
    let row: Value = serde_json::from_str(export(&store, "events", &[]).trim()).unwrap();
    assert_eq!(row["timestamp"], "2023-01-01T00:00:00Z", "{row}");
    assert_eq!(row["sentAt"], "2023-01-01T00:00:05Z", "{row}");
    let received = row["receivedAt"].as_str().unwrap_or_default();
    assert!(received > "2026", "received at the import: {row}");
}

/// (review) The import summary to a stdout that cannot be written (`> /dev/full`, a closed
/// pipe) is an error with status 1, not a panic with status 101.
#[test]
fn an_import_summary_that_cannot_be_written_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        json!({"type": "track", "messageId": "m1", "userId": "u", "event": "A"}).to_string(),
    )
    .unwrap();
    let out = bin()
        .args(["import", "--store", &store])
        .arg(&input)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A byte-order mark before the first line (Windows tools write one) is not JSON to refuse;
/// and an event sent without a time shows its receipt's in the CSV `timestamp` column, as the
/// store and the warehouse hold it (the cell was empty).
#[test]
fn a_bom_first_line_imports_and_a_timeless_event_exports_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let input = dir.path().join("in.jsonl");
    let mut bytes = "\u{feff}".as_bytes().to_vec();
    bytes.extend(
        json!({"type": "track", "messageId": "bom", "userId": "u", "event": "A"})
            .to_string()
            .as_bytes(),
    );
    std::fs::write(&input, bytes).unwrap();
    let (code, out, err) = import(&store, &input);
    assert_eq!(code, Some(0), "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["accepted"], 1, "{summary}");
    let csv = export(&store, "tracks", &["--format", "csv"]);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    let at = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert!(!at("timestamp").is_empty(), "{csv}");
    assert_eq!(at("timestamp"), at("receivedAt"), "{csv}");
}
