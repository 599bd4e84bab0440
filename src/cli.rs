//! What the offline subcommands (`bench-providers`, `roi`) share: their flag syntax, the routing
//! config loaded as the sidecar loads it, the process settings they need (connect timeout,
//! extra CA), and how they write a result file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::layers::{self, Layers};
use crate::config::{ConfigSource, Snapshot, EMBEDDED_DEFAULT};
use crate::env::Env;
use crate::settings::Settings;

/// Exit code for bad usage or settings (EX_USAGE), as for the sidecar itself.
pub const EXIT_USAGE: u8 = 64;

/// The flags of one command line: `--name value`, `--name=value`, or a bare `--switch`.
#[derive(Debug, Default)]
pub struct Flags {
    values: BTreeMap<String, String>,
    switches: Vec<String>,
}

impl Flags {
    /// Parses `args`; `valued` and `switches` are every flag the command knows (with `--`).
    pub fn parse(args: &[String], valued: &[&str], switches: &[&str]) -> Result<Flags, String> {
        let mut flags = Flags::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            if switches.contains(&name) && inline.is_none() {
                flags.switches.push(name.to_string());
            } else if valued.contains(&name) {
                let value = match inline {
                    Some(v) => v,
                    None => it.next().cloned().ok_or(format!("{name} needs a value"))?,
                };
                flags.values.insert(name.to_string(), value);
            } else {
                return Err(format!("unexpected argument `{arg}`"));
            }
        }
        Ok(flags)
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    /// A flag read with `parse`, or `default` when absent; the error names the flag.
    pub fn parsed<T>(
        &self,
        name: &str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, String> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => parse(v).map_err(|why| format!("{name} {v}: {why}")),
        }
    }
}

/// A whole number of at least 1.
pub fn positive(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

/// A token count such as `500M`, `2B`, `750k` or `1.5B` (k = thousand, M = million,
/// B or G = billion, T = trillion; no suffix: the number itself).
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let text = raw.trim().replace('_', "");
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let scale = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "m" | "M" => 1e6,
        "b" | "B" | "g" | "G" => 1e9,
        "t" | "T" => 1e12,
        _ => return Err(format!("unknown suffix `{suffix}` (use k, M, B or T)")),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| "expected a number such as 500M, 2B or 750k".to_string())?;
    if !n.is_finite() || n < 0.0 || n * scale > 1e18 {
        return Err("out of range".into());
    }
    Ok((n * scale).round() as u64)
}

/// The settings the tools use (connect timeout, extra CA, `LLM_SIDECAR_CONFIG`), read as the
/// sidecar reads them: every bad variable is reported.
pub fn settings(env: &dyn Env) -> Result<Settings, String> {
    Settings::from_env(env).map_err(|errors| format!("invalid settings: {}", errors.join("; ")))
}

/// The routing config as the sidecar would load it from `path` (`--config`, else
/// `LLM_SIDECAR_CONFIG`), or the embedded default; keys come from `env` or their key files,
/// and `HOLY_SHEEP_ENABLED` applies as it does in the sidecar.
pub fn load_config(path: Option<&Path>, env: &dyn Env) -> Result<Snapshot, String> {
    let (text, source) = match path {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?,
            ConfigSource::File(PathBuf::from(path)),
        ),
        None => (EMBEDDED_DEFAULT.to_string(), ConfigSource::Embedded),
    };
    let env_override = layers::env_override(env)?;
    Layers {
        base_text: text,
        base_source: source.clone(),
        configmap: None,
        env_override,
    }
    .compile(1, env)
    .map_err(|e| format!("invalid routing config ({source}): {e}"))
}

/// Writes a result file (`--json OUT`, `--markdown OUT`); `-` is stdout.
pub fn write_output(path: &str, text: &str) -> Result<(), String> {
    if path == "-" {
        print!("{text}");
        return Ok(());
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {path}: {e}"))
}

/// A USD amount for a table: cents for amounts from a dollar, more digits below.
pub fn usd(amount: f64) -> String {
    let abs = amount.abs();
    let sign = if amount < 0.0 { "-" } else { "" };
    if abs >= 1.0 {
        let cents = format!("{abs:.2}");
        let (whole, frac) = cents.split_once('.').unwrap_or((&cents, "00"));
        let mut grouped = String::new();
        for (i, c) in whole.chars().enumerate() {
            if i > 0 && (whole.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        format!("{sign}${grouped}.{frac}")
    } else if abs == 0.0 {
        "$0".to_string()
    } else {
        // Six significant digits: enough to compare small runs, no noise beyond them.
        let decimals = (5 - abs.log10().floor() as i32).clamp(0, 9) as usize;
        let text = format!("{abs:.decimals$}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        format!("{sign}${text}")
    }
}

/// A plain text table: columns padded to their widest cell, `right` ones aligned right.
pub fn table(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let width = |c: usize| {
        rows.iter()
            .filter_map(|r| r.get(c))
            .map(|cell| cell.chars().count())
            .chain(std::iter::once(header[c].chars().count()))
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (c, cell) in cells.iter().enumerate() {
            let pad = widths[c].saturating_sub(cell.chars().count());
            if c > 0 {
                out.push_str("  ");
            }
            if right.get(c).copied().unwrap_or(false) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if c + 1 < cells.len() {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A Markdown table with the same cells.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let mut out = format!("| {} |\n|", header.join(" | "));
    for c in 0..header.len() {
        out.push_str(if right.get(c).copied().unwrap_or(false) {
            " ---: |"
        } else {
            " --- |"
        });
    }
    out.push('\n');
    for row in rows {
        let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sizes_read_like_an_operator_writes_them() {
        for (text, n) in [
            ("500M", 500_000_000),
            ("2B", 2_000_000_000),
            ("750k", 750_000),
            ("1.5B", 1_500_000_000),
            ("1_000", 1000),
            ("42", 42),
            ("3T", 3_000_000_000_000),
        ] {
            assert_eq!(parse_size(text), Ok(n), "{text}");
        }
        for bad in ["", "M", "5X", "-1M", "1e30"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_take_both_spellings_and_refuse_strangers() {
        let f = Flags::parse(
            &args(&["--iterations", "5", "--stream", "--json=out.json"]),
            &["--iterations", "--json"],
            &["--stream"],
        )
        .unwrap();
        assert_eq!(f.value("--iterations"), Some("5"));
        assert_eq!(f.value("--json"), Some("out.json"));
        assert!(f.switch("--stream"));
        assert!(Flags::parse(&args(&["--nope"]), &[], &[]).is_err());
        assert!(Flags::parse(&args(&["--json"]), &["--json"], &[]).is_err());
        assert_eq!(
            f.parsed("--iterations", 1, positive).unwrap(),
            5,
            "parsed value"
        );
        let err = Flags::parse(&args(&["--iterations", "0"]), &["--iterations"], &[])
            .unwrap()
            .parsed("--iterations", 1, positive)
            .unwrap_err();
        assert!(err.starts_with("--iterations 0:"), "{err}");
    }

    #[test]
    fn usd_amounts_are_grouped_and_small_ones_keep_their_digits() {
        assert_eq!(usd(4040.0), "$4,040.00");
        assert_eq!(usd(48480.5), "$48,480.50");
        assert_eq!(usd(1_234_567.891), "$1,234,567.89");
        assert_eq!(usd(0.000123), "$0.000123");
        assert_eq!(usd(0.0), "$0");
        assert_eq!(usd(0.628061538), "$0.628062");
        assert_eq!(usd(0.00002457), "$0.00002457");
        assert_eq!(usd(-12.5), "-$12.50");
    }

    #[test]
    fn tables_line_up() {
        let rows = vec![
            vec!["a".to_string(), "1.5".to_string()],
            vec!["long-name".to_string(), "10".to_string()],
        ];
        assert_eq!(
            table(&["name", "n"], &rows, &[false, true]),
            "name         n\na          1.5\nlong-name   10\n"
        );
        assert_eq!(
            markdown_table(&["name", "n"], &rows[..1], &[false, true]),
            "| name | n |\n| --- | ---: |\n| a | 1.5 |\n"
        );
    }
}
