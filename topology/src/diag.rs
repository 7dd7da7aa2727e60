//! Diagnostics: what the loader says about a topology document, with the line and column of
//! the field it is about. Errors make a document invalid; warnings are printed but do not.

use std::fmt;

/// The first `shown` of `names`, joined with commas, and how many more there are (`a, b and 3
/// more`): a message names a few of a long list, not all of it (10,000 services named in
/// every message of 50,000 edges were 32 GB).
pub fn first_few<'a>(names: impl ExactSizeIterator<Item = &'a str>, shown: usize) -> String {
    let total = names.len();
    let mut text = names.take(shown).collect::<Vec<_>>().join(", ");
    if total > shown {
        text.push_str(&format!(" and {} more", total - shown));
    }
    text
}

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
    /// On the entry that ends a capped list ([`Diagnostic::not_shown`]): the errors and
    /// warnings the list left out, which [`tally`] counts.
    pub not_shown: Option<(usize, usize)>,
}

impl Diagnostic {
    pub fn error(line: usize, column: usize, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            line,
            column,
            message: message.into(),
            not_shown: None,
        }
    }
    pub fn warning(line: usize, column: usize, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            line,
            column,
            message: message.into(),
            not_shown: None,
        }
    }
    /// The entry that ends a list capped at [`crate::MAX_DIAGNOSTICS`], counting the `errors`
    /// and `warnings` it left out (an error if any error was).
    pub(crate) fn not_shown(errors: usize, warnings: usize) -> Self {
        let message = format!(
            "{} more problems not shown ({errors} errors, {warnings} warnings): only {} are \
             listed, errors first",
            errors + warnings,
            crate::MAX_DIAGNOSTICS
        );
        let d = if errors > 0 {
            Diagnostic::error(0, 0, message)
        } else {
            Diagnostic::warning(0, 0, message)
        };
        Diagnostic {
            not_shown: Some((errors, warnings)),
            ..d
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

/// How many errors and warnings `diags` stand for: those listed, plus those a capped list's
/// last entry counts as not shown (that entry itself is not counted), so that a summary line
/// ("invalid: N errors") gives the document's numbers, not the list's.
pub fn tally(diags: &[Diagnostic]) -> (usize, usize) {
    diags.iter().fold((0, 0), |(e, w), d| match d.not_shown {
        Some((more_e, more_w)) => (e + more_e, w + more_w),
        None if d.is_error() => (e + 1, w),
        None => (e, w + 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The capped list's last entry counts what it left out; the entries listed count one each.
    #[test]
    fn a_tally_counts_what_a_capped_list_left_out() {
        let listed = [
            Diagnostic::error(3, 1, "a"),
            Diagnostic::warning(4, 1, "b"),
            Diagnostic::error(5, 1, "c"),
        ];
        assert_eq!(tally(&listed), (2, 1));
        let mut capped = listed.to_vec();
        capped.push(Diagnostic::not_shown(7, 2));
        assert_eq!(tally(&capped), (9, 3));
        // A document-wide problem that only looks like it is one problem.
        let other = Diagnostic::error(0, 0, "document is 20 MB, over the limit");
        assert_eq!(tally(&[other]), (1, 0));
    }
}
