//! deploy/prometheus/rules/*.yml, read without a YAML parser (the suite
//! carries none): the rules' names, queries and runbook links.

use std::collections::BTreeSet;

use super::repo;

/// One rule of a rule file: an alert or a recording rule.
pub(super) struct Rule {
    pub(super) file: String,
    pub(super) alert: Option<String>,
    pub(super) record: Option<String>,
    pub(super) expr: String,
    pub(super) runbook_url: Option<String>,
}

impl Rule {
    pub(super) fn place(&self) -> String {
        let name = self.alert.as_ref().or(self.record.as_ref());
        format!(
            "deploy/prometheus/rules/{} rule {}",
            self.file,
            name.map_or("?", |s| s)
        )
    }
}

pub(super) struct RuleFile {
    pub(super) name: String,
    pub(super) rules: Vec<Rule>,
}

/// deploy/prometheus/rules/*.yml, when the directory exists.
pub(super) struct Rules {
    pub(super) files: Option<Vec<RuleFile>>,
}

impl Rules {
    pub(super) fn load() -> Self {
        let dir = repo("deploy/prometheus/rules");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Self { files: None };
        };
        let mut files: Vec<RuleFile> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&p).unwrap();
                RuleFile {
                    rules: parse_rules(&name, &text),
                    name,
                }
            })
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Self { files: Some(files) }
    }

    /// The recording rules' names.
    pub(super) fn recorded(&self) -> BTreeSet<String> {
        self.files
            .iter()
            .flatten()
            .flat_map(|f| &f.rules)
            .filter_map(|r| r.record.clone())
            .collect()
    }
}

/// The rules of a Prometheus rule file. Reads the part of YAML such files
/// use (`- alert:`/`- record:` items, `expr:` inline, quoted or as a block
/// scalar, `runbook_url:` among the annotations); the suite carries no YAML
/// parser, and `promtool check rules` (scripts/prometheus.sh) checks the
/// rest of the syntax.
pub(super) fn parse_rules(file: &str, text: &str) -> Vec<Rule> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules: Vec<Rule> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let body = trimmed.strip_prefix("- ").map_or(trimmed, str::trim_start);
        let key_indent = line.len() - body.len();
        let Some((key, value)) = body.split_once(':') else {
            continue;
        };
        if !matches!(key, "alert" | "record" | "expr" | "runbook_url") {
            continue;
        }
        // A scalar's value goes on over the lines indented deeper than its key.
        let mut more = Vec::new();
        while i < lines.len() {
            let next = lines[i];
            let t = next.trim_start();
            if !t.is_empty() && next.len() - t.len() <= key_indent {
                break;
            }
            more.push(next.trim());
            i += 1;
        }
        let value = value.trim();
        let value = if value.starts_with('|') || value.starts_with('>') {
            more.join("\n")
        } else {
            let mut v = unquote(value);
            for m in more.iter().filter(|m| !m.is_empty()) {
                v = format!("{v} {}", unquote(m));
            }
            v
        };
        match key {
            "alert" | "record" => rules.push(Rule {
                file: file.to_owned(),
                alert: (key == "alert").then(|| value.clone()),
                record: (key == "record").then_some(value),
                expr: String::new(),
                runbook_url: None,
            }),
            "expr" => {
                if let Some(r) = rules.last_mut() {
                    r.expr = value;
                }
            }
            _ => {
                if let Some(r) = rules.last_mut() {
                    r.runbook_url = Some(value);
                }
            }
        }
    }
    rules
}

/// A YAML inline scalar's text: quotes taken off, a comment after it
/// dropped.
fn unquote(v: &str) -> String {
    let mut chars = v.char_indices().peekable();
    match chars.next() {
        Some((_, '\'')) => {
            let mut out = String::new();
            while let Some((_, c)) = chars.next() {
                match (c, chars.peek()) {
                    ('\'', Some((_, '\''))) => {
                        out.push('\'');
                        chars.next();
                    }
                    ('\'', _) => break,
                    _ => out.push(c),
                }
            }
            out
        }
        Some((_, '"')) => {
            let mut out = String::new();
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next().map(|(_, c)| c)),
                    '"' => break,
                    _ => out.push(c),
                }
            }
            out
        }
        _ => v.split(" #").next().unwrap_or_default().trim().to_owned(),
    }
}
