use std::path::{Path, PathBuf};

/// Why a data set could not be read or written. Every variant names the file, and where
/// it applies the row (1-based, header excluded) and the column, so the user can go
/// straight to the bad cell.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened, read, written or renamed.
    // The OS error is part of the message rather than a `source`, so that reports that
    // print the error chain (anyhow's `{:#}`) do not say it twice.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The file is not a readable Parquet or CSV file.
    #[error("{path}: unreadable: {message}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What the decoder reported.
        message: String,
    },
    /// A required column is absent.
    #[error("{path}: missing column `{column}`")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
    },
    /// A column has the wrong type.
    #[error("{path}: column `{column}` has type {found}, expected {expected}")]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// The type found.
        found: String,
        /// The type required.
        expected: String,
    },
    /// A cell holds a value that is not allowed.
    #[error("{path}: row {row}, column `{column}`: {message}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// 1-based row.
        row: u64,
        /// The column.
        column: String,
        /// What is wrong with it.
        message: String,
    },
}

impl DataError {
    pub(crate) fn io(path: &Path, cause: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            cause,
        }
    }

    pub(crate) fn unreadable(path: &Path, message: impl ToString) -> Self {
        Self::Unreadable {
            path: path.to_owned(),
            message: message.to_string(),
        }
    }

    pub(crate) fn bad_value(
        path: &Path,
        row: u64,
        column: &str,
        message: impl Into<String>,
    ) -> Self {
        Self::BadValue {
            path: path.to_owned(),
            row,
            column: column.to_owned(),
            message: message.into(),
        }
    }
}
