//! Remarks about the input: what was skipped, and what was read with a caveat. A leaf module, so
//! that the readers and the report can both use it.

use serde::Serialize;
use std::fmt;

/// What kind of note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoteKind {
    /// A section or a figure was left out because its file is missing.
    Skipped,
    /// Something was read with a caveat (a torn last line, an empty file, a stale summary).
    Warning,
}

/// A remark about the input: what was skipped, and what was read with a caveat.
///
/// ```
/// use profilemate_cli::{Note, NoteKind};
/// let n = Note::skipped("no preemption_events.csv");
/// assert_eq!(n.kind, NoteKind::Skipped);
/// assert_eq!(n.to_string(), "skipped: no preemption_events.csv");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Note {
    /// Skipped or warning.
    pub kind: NoteKind,
    /// What happened.
    pub message: String,
}

impl Note {
    /// A "skipped" note.
    pub fn skipped(message: impl Into<String>) -> Note {
        Note { kind: NoteKind::Skipped, message: message.into() }
    }

    /// A warning.
    pub fn warning(message: impl Into<String>) -> Note {
        Note { kind: NoteKind::Warning, message: message.into() }
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            NoteKind::Skipped => write!(f, "skipped: {}", self.message),
            NoteKind::Warning => write!(f, "warning: {}", self.message),
        }
    }
}
