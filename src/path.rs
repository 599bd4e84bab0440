//! Request paths made safe to forward: percent-decoded where RFC 3986 allows it, dot segments
//! removed (§5.2.4), and refused when they would leave `/v1/` or hide a separator or a control
//! character in an escape. Also the operator's pass-through allowlist.
//!
//! The sidecar appends the client's path to a provider's base path and sends it with the
//! provider's key, so a path that an upstream, CDN or load balancer would resolve differently
//! from the sidecar is a way around the configured `base_url`. Forwarding only the normalised
//! form leaves nothing for anyone downstream to resolve.

use std::borrow::Cow;

/// The prefix every path the sidecar serves or forwards starts with.
pub const API_PREFIX: &str = "/v1/";

/// Why a path is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path escapes {API_PREFIX} once its dot segments are resolved")]
    Escapes,
    #[error("the path holds an encoded {0}")]
    EncodedForbidden(&'static str),
    #[error("the path holds a {0}")]
    Forbidden(&'static str),
    #[error("the path holds a malformed percent escape")]
    BadEscape,
}

/// A path as the sidecar will use and forward it.
#[derive(Debug, PartialEq, Eq)]
pub enum Normalized<'a> {
    /// Under `/v1/`: the path to serve (borrowed when it needed no change).
    Api(Cow<'a, str>),
    /// Somewhere else, without dot segments: not the sidecar's (a 404, not an attack).
    Elsewhere,
}

/// Normalises a request path (without its query): decodes the escapes of unreserved characters,
/// removes dot segments, and checks that the result is under [`API_PREFIX`].
pub fn normalize(raw: &str) -> Result<Normalized<'_>, PathError> {
    let decoded = decode_unreserved(raw)?;
    let had_dots = decoded.split('/').any(|s| s == "." || s == "..");
    let path = if had_dots {
        Cow::Owned(remove_dot_segments(&decoded))
    } else {
        decoded
    };
    if path.starts_with(API_PREFIX) {
        Ok(Normalized::Api(path))
    } else if had_dots {
        Err(PathError::Escapes)
    } else {
        Ok(Normalized::Elsewhere)
    }
}

/// Decodes `%XX` escapes of unreserved characters (RFC 3986 §2.3) and upper-cases the hex digits of
/// the others; refuses escapes of `/`, `\`, NUL and control characters, raw `\` and raw control
/// characters, and malformed escapes.
fn decode_unreserved(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = raw.as_bytes();
    if let Some(&b) = bytes.iter().find(|&&b| b == b'\\' || b.is_ascii_control()) {
        return Err(PathError::Forbidden(describe(b)));
    }
    if !bytes.contains(&b'%') {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest
            .get(at + 1..at + 3)
            .filter(|e| e.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(PathError::BadEscape)?;
        let byte = u8::from_str_radix(escape, 16).map_err(|_| PathError::BadEscape)?;
        if byte == b'/' || byte == b'\\' || byte.is_ascii_control() {
            return Err(PathError::EncodedForbidden(describe(byte)));
        }
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push_str(&escape.to_ascii_uppercase());
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

fn describe(byte: u8) -> &'static str {
    match byte {
        b'/' => "slash",
        b'\\' => "backslash",
        0 => "NUL",
        _ => "control character",
    }
}

/// RFC 3986 §5.2.4 on an absolute path: `.` segments go, `..` removes the segment before it
/// (never above the root), and a path ending in a dot segment keeps its trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." | ".." => {
                if *segment == ".." {
                    kept.pop();
                }
                if i == last {
                    kept.push("");
                }
            }
            other => kept.push(other),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in kept {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Which paths other than the model endpoints may be passed through to a provider. `None`
/// (the default) passes every `/v1/*` path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    patterns: Option<Vec<Pattern>>,
}

/// `/v1/files` (that path only) or `/v1/files*` (every path that starts with `/v1/files`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    text: String,
    prefix: bool,
}

impl Allowlist {
    /// Checks the operator's patterns: each starts with `/v1/`, is already normalised, and has
    /// `*` only at its end. `Err` names the pattern's index and what is wrong.
    pub fn new(patterns: &[String]) -> Result<Allowlist, Vec<(usize, String)>> {
        let mut errors = Vec::new();
        let mut compiled = Vec::with_capacity(patterns.len());
        for (i, raw) in patterns.iter().enumerate() {
            let (text, prefix) = match raw.strip_suffix('*') {
                Some(text) => (text, true),
                None => (raw.as_str(), false),
            };
            let problem = if !text.starts_with(API_PREFIX) {
                Some(format!("`{raw}` must start with {API_PREFIX}"))
            } else if text.contains('*') {
                Some(format!("`{raw}` may hold `*` only at its end"))
            } else if !matches!(normalize(text), Ok(Normalized::Api(p)) if p == text) {
                Some(format!(
                    "`{raw}` is not a normalised path (no dot segments or escapes)"
                ))
            } else {
                None
            };
            match problem {
                Some(message) => errors.push((i, message)),
                None => compiled.push(Pattern {
                    text: text.to_string(),
                    prefix,
                }),
            }
        }
        if errors.is_empty() {
            Ok(Allowlist {
                patterns: Some(compiled),
            })
        } else {
            Err(errors)
        }
    }

    /// Whether a normalised path may be passed through.
    pub fn allows(&self, path: &str) -> bool {
        match &self.patterns {
            None => true,
            Some(patterns) => patterns.iter().any(|p| {
                if p.prefix {
                    path.starts_with(&p.text)
                } else {
                    path == p.text
                }
            }),
        }
    }

    /// The patterns as written, for `/config` and error messages; `None` when every path passes.
    pub fn describe(&self) -> Option<Vec<String>> {
        self.patterns.as_ref().map(|patterns| {
            patterns
                .iter()
                .map(|p| format!("{}{}", p.text, if p.prefix { "*" } else { "" }))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(path: &str) -> String {
        match normalize(path) {
            Ok(Normalized::Api(p)) => p.into_owned(),
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn clean_paths_are_borrowed_unchanged() {
        for path in [
            "/v1/chat/completions",
            "/v1/files/file-abc",
            "/v1/models/x:y",
        ] {
            assert_eq!(normalize(path), Ok(Normalized::Api(Cow::Borrowed(path))));
        }
    }

    #[test]
    fn paths_that_leave_v1_are_refused() {
        for path in [
            "/v1/../../etc/passwd",
            "/v1/%2e%2e/%2e%2e/x",
            "/v1/%2E%2E",
            "/v1/./../secret",
            "/v1/..",
            "/v1/.%2e/x",
            "/v1//../../x",
            "/v1/a/../../b",
        ] {
            assert_eq!(normalize(path), Err(PathError::Escapes), "{path}");
        }
    }

    #[test]
    fn encoded_separators_and_control_characters_are_refused() {
        for (path, what) in [
            (
                "/v1/files/..%2f..%2fx",
                PathError::EncodedForbidden("slash"),
            ),
            ("/v1/files/%2F", PathError::EncodedForbidden("slash")),
            ("/v1/a%5cb", PathError::EncodedForbidden("backslash")),
            ("/v1/a%00", PathError::EncodedForbidden("NUL")),
            (
                "/v1/a%0d%0aX: y",
                PathError::EncodedForbidden("control character"),
            ),
            ("/v1/a%7f", PathError::EncodedForbidden("control character")),
            ("/v1/a\\..\\b", PathError::Forbidden("backslash")),
            ("/v1/a\tb", PathError::Forbidden("control character")),
            ("/v1/a%2", PathError::BadEscape),
            ("/v1/a%zz", PathError::BadEscape),
            ("/v1/a%+1", PathError::BadEscape),
        ] {
            assert_eq!(normalize(path), Err(what), "{path}");
        }
    }

    #[test]
    fn dot_segments_inside_v1_resolve_and_unreserved_escapes_decode() {
        assert_eq!(api("/v1/files/../models"), "/v1/models");
        assert_eq!(api("/v1/./files/./x"), "/v1/files/x");
        assert_eq!(api("/v1/files/.."), "/v1/");
        assert_eq!(api("/v1/files/."), "/v1/files/");
        assert_eq!(api("/../v1/models"), "/v1/models");
        assert_eq!(api("/v1/%66iles/%7e%41"), "/v1/files/~A");
        // Reserved characters stay escaped, in one spelling.
        assert_eq!(api("/v1/files/a%3fb%3a"), "/v1/files/a%3Fb%3A");
        // Empty segments are kept (RFC 3986 keeps them) but have nothing left to resolve.
        assert_eq!(api("/v1//.."), "/v1/");
    }

    #[test]
    fn paths_elsewhere_without_dots_are_not_ours() {
        assert_eq!(normalize("/v2/x"), Ok(Normalized::Elsewhere));
        assert_eq!(normalize("/v1"), Ok(Normalized::Elsewhere));
        assert_eq!(normalize("/"), Ok(Normalized::Elsewhere));
    }

    #[test]
    fn the_allowlist_matches_exact_paths_and_prefixes() {
        let all = Allowlist::default();
        assert!(all.allows("/v1/anything"));
        assert_eq!(all.describe(), None);

        let some = Allowlist::new(&["/v1/files*".into(), "/v1/batches".into()]).unwrap();
        assert!(some.allows("/v1/files"));
        assert!(some.allows("/v1/files/file-1/content"));
        assert!(some.allows("/v1/batches"));
        assert!(!some.allows("/v1/batches/b1"));
        assert!(!some.allows("/v1/assistants"));
        assert_eq!(
            some.describe(),
            Some(vec!["/v1/files*".into(), "/v1/batches".into()])
        );

        let errors = Allowlist::new(&[
            "/v1/ok".into(),
            "/files".into(),
            "/v1/*/x".into(),
            "/v1/a/../b".into(),
            "/v1/%61".into(),
        ])
        .unwrap_err();
        let indexes: Vec<usize> = errors.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [1, 2, 3, 4]);
    }
}
