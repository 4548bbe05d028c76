//! Secret redaction: every value read from the environment through `${env:VAR}` is
//! registered here, and every message weir prints passes through [`redact`].

use std::sync::RwLock;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Marks `value` as secret. Values shorter than 4 characters are not registered: replacing
/// them everywhere would mangle ordinary text while hiding almost nothing.
pub fn register_secret(value: &str) {
    if value.len() < 4 {
        return;
    }
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !secrets.iter().any(|s| s == value) {
        secrets.push(value.to_string());
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Replaces every registered secret in `text` with `***`.
pub fn redact(text: &str) -> String {
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_string();
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_longest_first() {
        register_secret("abcd");
        register_secret("abcdefgh");
        assert_eq!(redact("x abcdefgh y abcd"), "x *** y ***");
        assert_eq!(redact("abc"), "abc");
    }
}
