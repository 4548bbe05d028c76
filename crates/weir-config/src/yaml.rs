//! Strict YAML parsing with errors that point at the file, line and key.

use std::path::Path;

use serde::de::DeserializeOwned;
use weir_common::Error;

/// A config document type and every key it accepts, as dotted paths (`source.csv.quote`),
/// so that a key written in the wrong section can be pointed to its right place.
pub trait ConfigKeys {
    const KEYS: &'static [&'static str];
    /// A top-level section whose `${env:NAME}` values may be unset until used: a missing
    /// variable there stays as written, and whoever uses the value reports it (so that
    /// `weir query` needs no database password, for instance).
    const DEFERRED_ENV: Option<&'static str> = None;
}

/// Parses `text` (the contents of `file`) into `T`, turning serde errors into messages that
/// name the file, line, column and offending key, with the closest valid key as a hint.
pub fn parse_yaml<T: DeserializeOwned + ConfigKeys>(file: &Path, text: &str) -> Result<T, Error> {
    let text = interpolate_env(file, text, T::DEFERRED_ENV)?;
    serde_yaml_ng::from_str(&text).map_err(|err| yaml_error(file, &err, T::KEYS))
}

/// The key path elsewhere in the document whose last part is nearest to `found`, for a
/// key written in the wrong section (`delimiter` under `source:` is `source.csv.delimiter`).
fn misplaced<'a>(found: &str, section: Option<&str>, keys: &[&'a str]) -> Option<&'a str> {
    let section = section.unwrap_or("");
    let elsewhere: Vec<(&str, String)> = keys
        .iter()
        .filter_map(|k| {
            let (parent, last) = k.rsplit_once('.').unwrap_or(("", k));
            (parent != section).then(|| (*k, last.to_string()))
        })
        .collect();
    let lasts: Vec<String> = elsewhere.iter().map(|(_, l)| l.clone()).collect();
    let best = closest(found, &lasts)?;
    elsewhere.iter().find(|(_, l)| l == best).map(|(k, _)| *k)
}

fn yaml_error(file: &Path, err: &serde_yaml_ng::Error, keys: &[&str]) -> Error {
    let place = match err.location() {
        Some(loc) => format!("{}:{}:{}", file.display(), loc.line(), loc.column()),
        None => file.display().to_string(),
    };
    let raw = err.to_string();
    // serde_yaml appends " at line X column Y"; we print the place ourselves.
    let msg = match raw.find(" at line ") {
        Some(i) => raw[..i].to_string(),
        None => raw.clone(),
    };
    // serde_yaml_ng prefixes the path of the offending node: "source.csv: unknown field ...".
    let (path, msg) = match msg
        .find(": unknown ")
        .or_else(|| msg.find(": missing field"))
    {
        Some(i) if !msg[..i].contains(' ') => {
            (Some(msg[..i].to_string()), msg[i + 2..].to_string())
        }
        _ => (None, msg),
    };
    let place = match &path {
        Some(p) => format!("`{p}` in {place}"),
        None => place,
    };
    for (prefix, what) in [("unknown field", "key"), ("unknown variant", "value")] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let (found, expected) = split_expected(rest);
            let mut e = Error::user(format!("unknown {what} `{found}` in {place}"));
            let elsewhere = if what == "key" {
                misplaced(&found, path.as_deref(), keys)
            } else {
                None
            };
            let hint = match (closest(&found, &expected), elsewhere) {
                (Some(best), _) => format!(
                    "did you mean `{best}`? valid {what}s here: {}",
                    expected.join(", ")
                ),
                (None, Some(full)) => format!(
                    "did you mean `{full}`? it belongs in another section; valid {what}s here: {}",
                    expected.join(", ")
                ),
                (None, None) if expected.is_empty() => format!("this {what} takes no options"),
                (None, None) => format!("valid {what}s here: {}", expected.join(", ")),
            };
            e = e.with_hint(hint);
            return e;
        }
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        return Error::user(format!("missing key {rest} in {place}"))
            .with_hint("add the key; see `weir init` for a complete example");
    }
    Error::user(format!("invalid config in {place}: {msg}"))
}

/// Splits "` `foo`, expected one of `a`, `b`" into ("foo", ["a", "b"]).
fn split_expected(rest: &str) -> (String, Vec<String>) {
    let ticks: Vec<&str> = rest.split('`').collect();
    // Odd indices are inside backticks.
    let quoted: Vec<String> = ticks
        .iter()
        .skip(1)
        .step_by(2)
        .map(|s| s.to_string())
        .collect();
    match quoted.split_first() {
        Some((found, expected)) => (found.clone(), expected.to_vec()),
        None => (rest.trim().to_string(), vec![]),
    }
}

/// The valid choice nearest to `found` by edit distance, if it is near enough to be a typo.
pub fn closest<'a>(found: &str, choices: &'a [String]) -> Option<&'a str> {
    choices
        .iter()
        .map(|c| (strsim::damerau_levenshtein(found, c), c))
        .filter(|(d, c)| *d <= (c.len().max(found.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

/// Replaces `${env:NAME}` with the variable's value and registers the value as a secret.
/// A missing variable is an error naming file and line, except inside the top-level
/// section `deferred`, where it is left as written.
pub fn interpolate_env(file: &Path, text: &str, deferred: Option<&str>) -> Result<String, Error> {
    if !text.contains("${env:") {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    let mut in_deferred = false;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if !line.starts_with([' ', '\t', '#', '\n', '\r']) {
            in_deferred = deferred.is_some_and(|d| line.starts_with(&format!("{d}:")));
        }
        let mut rest = line;
        while let Some(start) = rest.find("${env:") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 6..];
            let Some(end) = after.find('}') else {
                return Err(Error::user(format!(
                    "unterminated `${{env:` in {}:{}",
                    file.display(),
                    n + 1
                ))
                .with_hint("write `${env:NAME}`"));
            };
            let name = after[..end].trim();
            match std::env::var(name) {
                Ok(value) => {
                    weir_common::register_secret(&value);
                    out.push_str(&value);
                }
                Err(_) if in_deferred => {
                    out.push_str(&rest[start..start + 6 + end + 1]);
                }
                Err(_) => {
                    return Err(Error::user(format!(
                        "environment variable `{name}` is not set (used in {}:{})",
                        file.display(),
                        n + 1
                    ))
                    .with_hint(format!("export {name}=... before running weir")))
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PipelineConfig;

    #[test]
    fn closest_finds_typos_only() {
        let keys: Vec<String> = ["source", "sink", "transform"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(closest("sourse", &keys), Some("source"));
        assert_eq!(closest("snk", &keys), Some("sink"));
        assert_eq!(closest("zzzzzzzz", &keys), None);
    }

    #[test]
    fn env_values_are_interpolated_and_redacted() {
        std::env::set_var("WEIR_TEST_SECRET_XYZ", "s3cr3t-value");
        let out = interpolate_env(
            Path::new("weir.yaml"),
            "password: ${env:WEIR_TEST_SECRET_XYZ}\n",
            None,
        )
        .unwrap();
        assert_eq!(out, "password: s3cr3t-value\n");
        assert_eq!(weir_common::redact("pw=s3cr3t-value"), "pw=***");
        let err = interpolate_env(
            Path::new("weir.yaml"),
            "a: 1\nb: ${env:WEIR_SURELY_UNSET_VAR}\n",
            Some("connections"),
        )
        .unwrap_err();
        assert!(err.message.contains("weir.yaml:2"), "{}", err.message);
        // Inside the deferred section an unset variable stays for its user to report.
        let out = interpolate_env(
            Path::new("weir.yaml"),
            "connections:\n  db:\n    password: ${env:WEIR_SURELY_UNSET_VAR}\nlake: x\n",
            Some("connections"),
        )
        .unwrap();
        assert!(
            out.contains("password: ${env:WEIR_SURELY_UNSET_VAR}\n"),
            "{out}"
        );
    }

    #[test]
    fn unknown_key_names_line_and_closest() {
        let text = "source:\n  type: files\n  path: x.csv\nsinc:\n  table: raw.x\n";
        let err = parse_yaml::<PipelineConfig>(Path::new("pipelines/x.yaml"), text).unwrap_err();
        assert_eq!(err.message, "unknown key `sinc` in pipelines/x.yaml:4:1");
        assert!(err
            .hint
            .as_deref()
            .unwrap()
            .starts_with("did you mean `sink`?"));
    }
}
