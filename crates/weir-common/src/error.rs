//! One error type for the libraries, with a domain and a retry hint.

use std::fmt;

/// Who is at fault for an error; decides retries and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// The user's input or configuration is wrong; retrying cannot help.
    User,
    /// An external system (disk, network, object store, database) failed; a retry may help.
    External,
    /// A bug in weir.
    Internal,
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Domain::User => "user",
            Domain::External => "external",
            Domain::Internal => "internal",
        })
    }
}

/// A weir error: a message for people, an optional `hint:` line, its domain and whether a
/// retry can help.
#[derive(Debug)]
pub struct Error {
    pub domain: Domain,
    pub message: String,
    pub hint: Option<String>,
    pub retryable: bool,
    /// Another writer committed to the same table first: nothing was written, and trying
    /// again (soon, at a random moment) is how optimistic concurrency resolves it.
    pub conflict: bool,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn user(message: impl Into<String>) -> Self {
        Self::new(Domain::User, message, false)
    }

    pub fn external(message: impl Into<String>) -> Self {
        Self::new(Domain::External, message, true)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Domain::Internal, message, false)
    }

    fn new(domain: Domain, message: impl Into<String>, retryable: bool) -> Self {
        Self {
            domain,
            message: message.into(),
            hint: None,
            retryable,
            conflict: false,
            source: None,
        }
    }

    /// Marks a write conflict (see [`Error::conflict`]).
    pub fn conflicting(mut self) -> Self {
        self.conflict = true;
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn not_retryable(mut self) -> Self {
        self.retryable = false;
        self
    }

    /// Prefixes the message with context (`reading orders.csv: ...`), keeping domain and hint.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// An I/O error: a missing file is the user's mistake, anything else is external.
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        match err.kind() {
            std::io::ErrorKind::NotFound => Error::user(format!("{what}: not found"))
                .with_hint("check the path and that the file exists"),
            std::io::ErrorKind::PermissionDenied => {
                Error::user(format!("{what}: permission denied"))
            }
            _ => Error::external(format!("{what}: {err}")),
        }
    }

    /// The full text for people: message (redacted), source chain, hint.
    pub fn render(&self) -> String {
        let mut out = format!("error: {}", self.message);
        let mut source = self.source.as_deref().map(|s| s as &dyn std::error::Error);
        while let Some(s) = source {
            let text = s.to_string();
            if !self.message.contains(&text) {
                out.push_str(&format!("\n  caused by: {text}"));
            }
            source = s.source();
        }
        if self.domain == Domain::Internal {
            out.push_str("\n  this is a bug in weir; please report it");
        }
        if let Some(hint) = &self.hint {
            out.push_str(&format!("\nhint: {hint}"));
        }
        crate::redact(&out)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact(&self.message))
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_hint_and_redacts() {
        crate::register_secret("hunter2-secret");
        let err = Error::user("bad password `hunter2-secret`").with_hint("set PG_PASSWORD");
        let text = err.render();
        assert!(!text.contains("hunter2-secret"), "{text}");
        assert!(text.contains("hint: set PG_PASSWORD"));
    }

    #[test]
    fn missing_file_is_user_error() {
        let err = Error::io(
            "reading x.csv",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(err.domain, Domain::User);
        assert!(!err.retryable);
        let err = Error::io(
            "reading x.csv",
            std::io::Error::from(std::io::ErrorKind::TimedOut),
        );
        assert_eq!(err.domain, Domain::External);
        assert!(err.retryable);
    }
}
