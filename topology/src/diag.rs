//! Diagnostics: what the loader says about a topology document, with the line and column of
//! the field it is about. Errors make a document invalid; warnings are printed but do not.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One problem found in a topology document. `line` and `column` are 1-based and point at the
/// field (key or value) the message is about; both are 0 when the problem concerns the document
/// as a whole (for example its size).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub message: String,
}

impl Diagnostic {
    pub fn error(line: usize, column: usize, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            line,
            column,
            message: message.into(),
        }
    }
    pub fn warning(line: usize, column: usize, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            line,
            column,
            message: message.into(),
        }
    }
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
    /// The form operators see: `FILE:LINE:COL: error: message`.
    /// Problems with the whole document (line 0) print as `FILE: error: message`.
    pub fn display(&self, file: &str) -> String {
        if self.line == 0 {
            format!("{file}: {}: {}", self.severity, self.message)
        } else {
            format!("{file}:{self}")
        }
    }
}

impl fmt::Display for Diagnostic {
    /// `LINE:COL: severity: message`, the form pinned by the golden files.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.line, self.column, self.severity, self.message
        )
    }
}
