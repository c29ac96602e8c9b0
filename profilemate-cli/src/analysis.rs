//! Builds a [`Report`]: its sections, then the insights evaluated over them. The top of the
//! report's modules: it depends on `report` and `insights`, which do not depend on each other's
//! construction.

use crate::data::RunData;
use crate::insights::{evaluate, Thresholds};
use crate::report::Report;
use crate::ReportError;
use std::path::Path;

impl Report {
    /// Reads `dir` and builds the report with the default [`Thresholds`].
    ///
    /// # Errors
    ///
    /// As [`RunData::load`]: no contract file in `dir`, a file that cannot be read, or a
    /// malformed file (the error names the file, the line and the column).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Report, ReportError> {
        Ok(Report::from_data(&RunData::load(dir)?, &Thresholds::default()))
    }

    /// Builds the report from data already read.
    ///
    /// ```
    /// use profilemate_cli::{Report, RunData, Thresholds};
    /// let data = RunData::default();
    /// let report = Report::from_data(&data, &Thresholds::default());
    /// assert!(report.forward_pass.is_none());
    /// assert_eq!(report.notes.len(), 9); // every section skipped, and the step timeline
    /// ```
    pub fn from_data(data: &RunData, thresholds: &Thresholds) -> Report {
        let mut report = Report::sections(data, thresholds);
        report.insights = evaluate(&report, thresholds);
        report
    }
}
