//! What the Redis server is set to keep, read at start: each setting that
//! can lose an acknowledged write is named, with what it loses.

use std::collections::HashMap;

use super::{Engine, EngineError};

/// A Redis setting that can lose acknowledged writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Risk {
    /// The setting (`appendonly`, `appendfsync`, `maxmemory-policy`).
    pub setting: &'static str,
    /// Its value on the server.
    pub value: String,
    /// What it can lose.
    pub loses: &'static str,
    /// Whether `--require-durable-redis` refuses to start on it (a warning
    /// otherwise).
    pub refused: bool,
}

/// Names the settings of `config` (CONFIG GET's answer) that can lose
/// acknowledged writes.
pub fn risks(config: &HashMap<String, String>) -> Vec<Risk> {
    let get = |k: &str| config.get(k).map(String::as_str).unwrap_or("");
    let mut out = Vec::new();
    let policy = get("maxmemory-policy");
    if policy != "noeviction" {
        out.push(Risk {
            setting: "maxmemory-policy",
            value: policy.to_owned(),
            loses: "keys evicted under memory pressure: stock, orders, due-queue entries, flow records",
            refused: true,
        });
    }
    if get("appendonly") != "yes" {
        out.push(Risk {
            setting: "appendonly",
            value: get("appendonly").to_owned(),
            loses: "every write since the last snapshot when Redis restarts",
            refused: true,
        });
    } else {
        match get("appendfsync") {
            "always" => {}
            "everysec" => out.push(Risk {
                setting: "appendfsync",
                value: "everysec".into(),
                loses: "about the last second of writes if the host crashes",
                refused: false,
            }),
            other => out.push(Risk {
                setting: "appendfsync",
                value: other.to_owned(),
                loses:
                    "the writes the OS has not flushed (often tens of seconds) if the host crashes",
                refused: true,
            }),
        }
    }
    out
}

impl Engine {
    /// The server's settings that can lose acknowledged writes (of every
    /// primary, on a cluster; each risk named once).
    pub async fn durability_risks(&self) -> Result<Vec<Risk>, EngineError> {
        let mut c = self.conn.clone();
        let configs: Vec<HashMap<String, String>> = self
            .timed(async move {
                c.query_primaries(
                    redis::cmd("CONFIG")
                        .arg("GET")
                        .arg("appendonly")
                        .arg("appendfsync")
                        .arg("maxmemory-policy"),
                )
                .await
            })
            .await?;
        let mut out: Vec<Risk> = Vec::new();
        for risk in configs.iter().flat_map(risks) {
            if !out
                .iter()
                .any(|r| r.setting == risk.setting && r.value == risk.value)
            {
                out.push(risk);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn each_losing_setting_is_named_and_only_everysec_passes() {
        let safe = config(&[
            ("appendonly", "yes"),
            ("appendfsync", "always"),
            ("maxmemory-policy", "noeviction"),
        ]);
        assert!(risks(&safe).is_empty());
        let everysec = config(&[
            ("appendonly", "yes"),
            ("appendfsync", "everysec"),
            ("maxmemory-policy", "noeviction"),
        ]);
        let r = risks(&everysec);
        assert_eq!(r.len(), 1);
        assert!(!r[0].refused);
        let bad = config(&[
            ("appendonly", "no"),
            ("appendfsync", "everysec"),
            ("maxmemory-policy", "allkeys-lru"),
        ]);
        let names: Vec<_> = risks(&bad).iter().map(|r| (r.setting, r.refused)).collect();
        assert_eq!(names, [("maxmemory-policy", true), ("appendonly", true)]);
    }
}
