//! The Parquet tables read back by the parquet crate: the same rows and values as the CSV tables
//! of the same rows, nulls where the CSV is empty, typed columns, bounded row groups.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "parquet")]

mod common;

use parquet::basic::{LogicalType, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use profilemate_core::{Config, Phase, Session, Sink, SinkKind, Table};
use profilemate_sinks::{CsvSink, ParquetSink};
use std::path::Path;

/// The CSV table: header and records.
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header = reader.headers().unwrap().iter().map(str::to_string).collect();
    let records = reader.records().map(|r| r.unwrap().iter().map(str::to_string).collect()).collect();
    (header, records)
}

/// The Parquet table: column names and rows of fields.
fn read_parquet(path: &Path) -> (Vec<String>, Vec<Vec<Field>>, SerializedFileReader<std::fs::File>) {
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let names = reader.metadata().file_metadata().schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    let rows = reader
        .get_row_iter(None)
        .unwrap()
        .map(|r| r.unwrap().get_column_iter().map(|(_, f)| f.clone()).collect())
        .collect();
    (names, rows, reader)
}

/// Asserts every table of `dir` holds in Parquet what it holds in CSV, plus `host` and `rank`;
/// returns the rows compared per table.
fn assert_parquet_matches_csv(dir: &Path, host: &str, rank: Option<i64>) -> Vec<(Table, usize)> {
    let mut counts = Vec::new();
    for table in Table::ALL {
        let (header, records) = read_csv(&dir.join(table.file_name()));
        let path = dir.join(format!("{}.parquet", table.name()));
        let (names, rows, reader) = read_parquet(&path);
        assert_eq!(names[..header.len()], header[..], "{table:?}");
        assert_eq!(names[header.len()..], ["host", "rank"], "{table:?}");
        assert_eq!(rows.len(), records.len(), "{table:?}: row count");
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        for (r, (record, row)) in records.iter().zip(&rows).enumerate() {
            for (c, (text, field)) in record.iter().zip(row).enumerate() {
                let at = format!("{table:?} row {r} column {}", header[c]);
                match field {
                    Field::Null => assert_eq!(text, "", "{at}: null where the CSV has a value"),
                    Field::Double(v) => assert_eq!(text.parse::<f64>().unwrap(), *v, "{at}"),
                    Field::Long(v) => assert_eq!(text, &v.to_string(), "{at}"),
                    Field::Str(s) => {
                        assert!(!s.is_empty(), "{at}: empty text is null");
                        assert_eq!(text, s, "{at}");
                    }
                    other => panic!("{at}: unexpected {other:?}"),
                }
                // Integers stay integers, numbers with a point are doubles, text is UTF-8.
                let column = schema.column(c);
                let expected = if text.is_empty() {
                    column.physical_type()
                } else if text.parse::<i64>().is_ok() && !text.contains('.') {
                    PhysicalType::INT64
                } else if text.parse::<f64>().is_ok() {
                    PhysicalType::DOUBLE
                } else {
                    PhysicalType::BYTE_ARRAY
                };
                assert_eq!(column.physical_type(), expected, "{at}: {text:?}");
                if expected == PhysicalType::BYTE_ARRAY {
                    assert_eq!(column.logical_type_ref(), Some(&LogicalType::String), "{at}");
                }
            }
            assert_eq!(row[header.len()], Field::Str(host.to_string()), "{table:?} host");
            assert_eq!(row[header.len() + 1], rank.map_or(Field::Null, Field::Long), "{table:?} rank");
        }
        counts.push((table, rows.len()));
    }
    counts
}

#[test]
fn parquet_holds_the_csv_values_with_nulls_where_the_csv_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::default();
    let mut csv = CsvSink::create(dir.path(), &config).unwrap();
    let mut parquet =
        ParquetSink::create(dir.path(), &config).unwrap().with_row_group_rows(3).with_host("node-7").with_rank(Some(5));
    for b in 0..4 {
        let rows = common::rows(b);
        csv.write_rows(&rows).unwrap();
        parquet.write_rows(&rows).unwrap();
        csv.flush().unwrap();
        parquet.flush().unwrap();
    }
    let manifest = common::manifest();
    csv.finish(&manifest).unwrap();
    parquet.finish(&manifest).unwrap();
    let counts = assert_parquet_matches_csv(dir.path(), "node-7", Some(5));
    assert!(counts.iter().all(|(_, n)| *n > 0), "every table has rows: {counts:?}");

    // Bounded row groups: 3 rows each, the last one holding what was left at shutdown.
    let (_, rows, reader) = read_parquet(&dir.path().join("cpu_operations_timing.parquet"));
    assert_eq!(rows.len(), 20);
    let groups: Vec<i64> = reader.metadata().row_groups().iter().map(|g| g.num_rows()).collect();
    assert_eq!(groups, [3, 3, 3, 3, 3, 3, 2]);
    let compression = reader.metadata().row_group(0).column(0).compression();
    assert_eq!(compression, parquet::basic::Compression::SNAPPY);
}

#[test]
fn rows_reach_the_file_a_row_group_at_a_time_and_the_file_is_renamed_into_place_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("forward_pass_timing.parquet.partial");
    let done = dir.path().join("forward_pass_timing.parquet");
    std::fs::write(&done, b"an earlier run").unwrap();
    let mut parquet =
        ParquetSink::create(dir.path(), &Config::default()).unwrap().with_row_group_rows(100).with_rank(None);
    assert!(!done.exists(), "an earlier run's file is removed");
    let size = || std::fs::metadata(&partial).unwrap().len();
    let start = size();
    // 33 batches of 3 forward passes: 99 rows stay in memory, the 100th writes a row group.
    for b in 0..33 {
        parquet.write_rows(&common::rows(b)).unwrap();
    }
    assert_eq!(size(), start, "99 rows are buffered");
    parquet.write_rows(&common::rows(33)).unwrap();
    let after = size();
    // The BufWriter may keep the tail of the row group; most of it is on disk.
    assert!(after > start, "a row group was written: {start} -> {after}");
    parquet.finish(&common::manifest()).unwrap();
    assert!(!partial.exists() && done.exists());
    let (_, rows, reader) = read_parquet(&done);
    assert_eq!(rows.len(), 102);
    assert_eq!(reader.metadata().num_row_groups(), 2);
    let rank = rows[0].last().unwrap();
    assert_eq!(*rank, Field::Null, "no rank: null");
}

#[test]
fn a_long_text_bounds_the_row_group_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut parquet = ParquetSink::create(dir.path(), &Config::default()).unwrap().with_row_group_bytes(64 * 1024);
    let mut rows = profilemate_core::Rows::default();
    for i in 0..100u64 {
        rows.cpu_operations.push(profilemate_core::CpuOperationRow {
            step: None,
            timestamp_ns: i,
            operation: "scheduling".into(),
            duration_ns: 1,
            context: "x".repeat(4000),
        });
    }
    parquet.write_rows(&rows).unwrap();
    parquet.finish(&common::manifest()).unwrap();
    let (_, read, reader) = read_parquet(&dir.path().join("cpu_operations_timing.parquet"));
    assert_eq!(read.len(), 100);
    assert!(reader.metadata().num_row_groups() >= 6, "{} row groups", reader.metadata().num_row_groups());
}

#[test]
fn a_session_with_every_format_writes_parquet_that_matches_its_csv() {
    let dir = tempfile::tempdir().unwrap();
    let session = Session::builder()
        .dir(dir.path())
        .sinks(&[SinkKind::Csv, SinkKind::Json, SinkKind::Parquet, SinkKind::Perfetto])
        .sink_factory(profilemate_sinks::standard_sinks)
        .build()
        .unwrap();
    let (forward, cpu, requests) = (session.forward_pass(), session.cpu_timing(), session.requests());
    for step in 0..500u32 {
        cpu.time_with(profilemate_core::CpuOp::SCHEDULING, if step % 2 == 0 { "" } else { "k=v" }, || {});
        forward.start(if step == 0 { Phase::Prefill } else { Phase::Decode }, 4, 4 + step).stop();
        if step % 50 == 0 {
            requests.started(&format!("r{step}"));
            requests.preempted(&format!("r{step}"), "RECOMPUTE", "");
        }
    }
    let manifest = session.shutdown().unwrap();
    assert_eq!(manifest.sinks, ["csv", "json", "parquet", "perfetto"]);
    let host = gethostname_for_test();
    let rank = profilemate_sinks::rank_from_env().unwrap();
    let counts = assert_parquet_matches_csv(dir.path(), &host, rank);
    assert!(counts.contains(&(Table::ForwardPass, 500)), "{counts:?}");
    assert!(counts.contains(&(Table::RequestLifecycle, 10)), "{counts:?}");
    assert!(dir.path().join("profilemate_trace.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn gethostname_for_test() -> String {
    let manifest = common::manifest();
    manifest.host
}

/// The CSV and Parquet tables of four batches of rows of every table, as a process killed after
/// its last flush leaves them: the CSV tables whole, every Parquet table `.partial`.
fn killed_run(dir: &Path) {
    let config = Config::default();
    let mut csv = CsvSink::create(dir, &config).unwrap();
    let mut parquet = ParquetSink::create(dir, &config).unwrap().with_row_group_rows(3);
    for b in 0..4 {
        let rows = common::rows(b);
        csv.write_rows(&rows).unwrap();
        parquet.write_rows(&rows).unwrap();
        csv.flush().unwrap();
        parquet.flush().unwrap();
    }
    // Killed: no footer, nothing renamed.
    std::mem::forget(parquet);
    drop(csv);
    for table in Table::ALL {
        assert!(dir.join(format!("{}.parquet.partial", table.name())).exists(), "{table:?}");
    }
}

#[test]
fn recovery_completes_every_tables_partial_parquet_file_from_its_csv_table() {
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path());
    let done = ParquetSink::complete_partial(dir.path(), "node-7", Some(5)).unwrap();
    let every: Vec<String> = Table::ALL.iter().map(|t| format!("{}.parquet", t.name())).collect();
    assert_eq!(done.completed, every);
    assert!(done.not_completed.is_empty(), "{:?}", done.not_completed);
    // Each table, the request lifecycle and the step timeline included: every row, every value
    // (nulls where the CSV is empty), host and rank as given.
    let counts = assert_parquet_matches_csv(dir.path(), "node-7", Some(5));
    assert!(counts.iter().all(|(_, n)| *n > 0), "every table has rows: {counts:?}");
    assert!(counts.contains(&(Table::RequestLifecycle, 8)), "{counts:?}");
    assert!(counts.contains(&(Table::StepTimeline, 8)), "{counts:?}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Again: nothing left to complete.
    assert_eq!(ParquetSink::complete_partial(dir.path(), "node-7", Some(5)).unwrap(), Default::default());
}

#[test]
fn a_partial_parquet_file_recovery_cannot_rebuild_stays_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path());
    // No CSV table to rebuild the step timeline from; a request lifecycle line that does not parse.
    std::fs::remove_file(dir.path().join("step_timeline.csv")).unwrap();
    let lifecycle = dir.path().join("request_lifecycle.csv");
    let mut text = std::fs::read_to_string(&lifecycle).unwrap();
    text.push_str("r9,not-a-number,,,,,,0,finished\n");
    std::fs::write(&lifecycle, text).unwrap();
    let done = ParquetSink::complete_partial(dir.path(), "node-7", None).unwrap();
    assert_eq!(done.completed.len(), Table::ALL.len() - 2, "{:?}", done.completed);
    let why = |f: &str| done.not_completed.get(f).cloned().unwrap_or_default();
    assert!(why("step_timeline.parquet.partial").contains("no step_timeline.csv"), "{:?}", done.not_completed);
    assert!(why("request_lifecycle.parquet.partial").contains("1 line(s) of request_lifecycle.csv do not parse"));
    assert!(dir.path().join("step_timeline.parquet.partial").exists());
    assert!(dir.path().join("request_lifecycle.parquet.partial").exists());
    assert!(!dir.path().join("request_lifecycle.parquet").exists());
}
