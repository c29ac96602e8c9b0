//! The output budget (`PROFILEMATE_MAX_OUTPUT_MB`): the CSV and Parquet tables of a run roll
//! over into numbered files, and the oldest are removed before a write would take the tables
//! past the budget on disk.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// The disk budget shared by the table sinks of one run (the CSV and Parquet files together).
///
/// A sink asks for room before every write ([`reserve`](Self::reserve)); when the files on disk
/// plus the write would exceed the budget, the oldest rolled-over file of the table that holds
/// the most bytes on disk is removed first, and so on until the write fits. The file a table is
/// writing now is never removed, so the newest rows are always kept; each table rolls its file
/// over once it reaches [`segment_bytes`](Self::segment_bytes), a share of the budget small
/// enough that the files being written always fit in it together.
///
/// ```
/// use profilemate_sinks::OutputBudget;
/// let budget = OutputBudget::new(1 << 20, 4);
/// assert_eq!(budget.max_bytes(), 1 << 20);
/// assert!(budget.segment_bytes() <= (1 << 20) / 8);
/// ```
#[derive(Debug)]
pub struct OutputBudget {
    max_bytes: u64,
    segment_bytes: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes on disk of every table file, live or rolled.
    on_disk: u64,
    /// Bytes of each table's file being written, by table key (its file name).
    live: BTreeMap<String, u64>,
    /// Rolled-over files still on disk, oldest first.
    segments: Vec<Segment>,
    rolled: Vec<(String, String)>,
    removed: Vec<(String, String)>,
}

#[derive(Debug)]
struct Segment {
    key: String,
    path: PathBuf,
    bytes: u64,
}

impl OutputBudget {
    /// A budget of `max_bytes` for `tables` table files written at once (every sink's together).
    pub fn new(max_bytes: u64, tables: usize) -> OutputBudget {
        // Half the budget for the files being written, shared evenly; the rest holds rolled files.
        let segment_bytes = (max_bytes / (2 * tables.max(1) as u64)).max(4096);
        OutputBudget { max_bytes, segment_bytes, state: Mutex::new(State::default()) }
    }

    /// The budget, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The size at which a table's file rolls over.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Bytes on disk now, as the sinks accounted them.
    pub fn bytes_on_disk(&self) -> u64 {
        self.lock().on_disk
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for `bytes` more in the file of table `key` (a file name), removing the oldest
    /// rolled files as needed, and accounts them.
    ///
    /// # Errors
    ///
    /// When the files being written alone leave no room (nothing is written then).
    pub fn reserve(&self, key: &str, bytes: u64) -> std::io::Result<()> {
        let mut s = self.lock();
        while s.on_disk + bytes > self.max_bytes {
            // The table with the most bytes in rolled files gives up its oldest one.
            let mut per_key: BTreeMap<&str, u64> = BTreeMap::new();
            for seg in &s.segments {
                *per_key.entry(seg.key.as_str()).or_default() += seg.bytes;
            }
            let Some(heaviest) = per_key.iter().max_by_key(|(_, b)| **b).map(|(k, _)| k.to_string()) else {
                return Err(std::io::Error::other(format!(
                    "output budget of {} bytes exhausted by the files being written ({} bytes on disk, {bytes} more \
                     for {key}): raise PROFILEMATE_MAX_OUTPUT_MB",
                    self.max_bytes, s.on_disk
                )));
            };
            let at = s.segments.iter().position(|seg| seg.key == heaviest).expect("the key has a segment");
            let seg = s.segments.remove(at);
            match std::fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let msg = format!("cannot remove {} to stay within the output budget: {e}", seg.path.display());
                    s.segments.insert(at, seg);
                    return Err(std::io::Error::new(e.kind(), msg));
                }
            }
            s.on_disk -= seg.bytes;
            let name = file_name(&seg.path);
            s.removed.push((seg.key, name));
        }
        s.on_disk += bytes;
        *s.live.entry(key.to_string()).or_default() += bytes;
        Ok(())
    }

    /// Table `key`'s file being written was closed and renamed to `path`: it becomes the newest
    /// rolled file, removable to make room.
    pub fn rolled(&self, key: &str, path: PathBuf) {
        let mut s = self.lock();
        let bytes = s.live.insert(key.to_string(), 0).unwrap_or(0);
        let name = file_name(&path);
        s.rolled.push((key.to_string(), name));
        s.segments.push(Segment { key: key.to_string(), path, bytes });
    }

    /// Rolled and removed files of the tables whose keys `mine` accepts, oldest first.
    pub fn files(&self, mine: impl Fn(&str) -> bool) -> (Vec<String>, Vec<String>) {
        let s = self.lock();
        let pick = |v: &[(String, String)]| v.iter().filter(|(k, _)| mine(k)).map(|(_, n)| n.clone()).collect();
        (pick(&s.rolled), pick(&s.removed))
    }
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_rolled_file_of_the_heaviest_table_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let budget = OutputBudget::new(100_000, 2);
        let seg = |name: &str, bytes: usize| {
            let p = dir.path().join(name);
            std::fs::write(&p, vec![b'x'; bytes]).unwrap();
            p
        };
        budget.reserve("a.csv", 30_000).unwrap();
        budget.rolled("a.csv", seg("a.1.csv", 30_000));
        budget.reserve("b.csv", 10_000).unwrap();
        budget.rolled("b.csv", seg("b.1.csv", 10_000));
        budget.reserve("a.csv", 30_000).unwrap();
        budget.rolled("a.csv", seg("a.2.csv", 30_000));
        assert_eq!(budget.bytes_on_disk(), 70_000);
        budget.reserve("a.csv", 40_000).unwrap();
        assert_eq!(budget.bytes_on_disk(), 80_000);
        assert!(!dir.path().join("a.1.csv").exists() && dir.path().join("a.2.csv").exists());
        assert!(dir.path().join("b.1.csv").exists(), "the lighter table keeps its file");
        let (rolled, removed) = budget.files(|k| k == "a.csv");
        assert_eq!((rolled, removed), (vec!["a.1.csv".to_string(), "a.2.csv".into()], vec!["a.1.csv".to_string()]));
        assert!(budget.reserve("b.csv", 200_000).is_err(), "more than the budget itself");
    }
}
