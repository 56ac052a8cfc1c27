//! `barrage config defaults ROLE` and `barrage config check ROLE FILE`.
//!
//! The defaults come from the role's `Default`; the comment above each field comes from the
//! role's commented example in `examples/` (compiled in), which `tests/examples.rs` already holds
//! to documenting every field. So a new field needs its comment written once, in the example.

use crate::exit::Exit;
use net::config::{Layered, Sources};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ConfigCommand {
    /// Print a complete, commented config file holding every default.
    Defaults {
        #[arg(value_enum)]
        role: Role,
    },
    /// Load a file as the role would and say which field is wrong and why (exit 2), or "ok".
    Check {
        #[arg(value_enum)]
        role: Role,
        file: PathBuf,
        /// Also apply this shell's BARRAGE_<ROLE>_* variables, as the service would.
        #[arg(long)]
        env: bool,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Edge,
    Broker,
    Control,
    Up,
}

pub fn run(args: ConfigArgs) -> anyhow::Result<Exit> {
    match args.command {
        ConfigCommand::Defaults { role } => {
            print!("{}", defaults(role)?);
            Ok(Exit::Ok)
        }
        ConfigCommand::Check { role, file, env } => {
            let mut sources = Sources::file(&file);
            if env {
                sources.env = std::env::vars().collect();
            }
            let checked = match role {
                Role::Edge => check::<edge::Config>(&sources),
                Role::Broker => check::<broker::Config>(&sources),
                Role::Control => check::<control::Config>(&sources),
                Role::Up => check::<crate::up::UpConfig>(&sources),
            };
            match checked {
                Ok(()) => {
                    println!("ok: {} is a valid {role:?} config", file.display());
                    Ok(Exit::Ok)
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    Ok(Exit::Usage)
                }
            }
        }
    }
}

/// Loads the config as the role would, then checks its secrets as the role does at start (a
/// weak secret on a public address stops the role, so `config check` says so first).
fn check<C: Secrets>(sources: &Sources) -> Result<(), String> {
    let c = net::config::load::<C>(sources).map_err(|e| e.to_string())?;
    c.secrets()
}

/// A role config's start-time secret check.
trait Secrets: Layered {
    fn secrets(&self) -> Result<(), String>;
}

impl Secrets for edge::Config {
    fn secrets(&self) -> Result<(), String> {
        self.check_secrets().map_err(|e| e.to_string())
    }
}
impl Secrets for broker::Config {
    fn secrets(&self) -> Result<(), String> {
        self.check_secrets().map(|_| ()).map_err(|e| e.to_string())
    }
}
impl Secrets for control::Config {
    fn secrets(&self) -> Result<(), String> {
        self.check_secrets().map_err(|e| e.to_string())
    }
}
impl Secrets for crate::up::UpConfig {
    fn secrets(&self) -> Result<(), String> {
        self.control
            .secrets()
            .map_err(|e| format!("[control] {e}"))?;
        self.broker.secrets().map_err(|e| format!("[broker] {e}"))?;
        self.edge.secrets().map_err(|e| format!("[edge] {e}"))
    }
}

/// The complete commented defaults of `role`.
pub fn defaults(role: Role) -> anyhow::Result<String> {
    Ok(match role {
        Role::Edge => commented::<edge::Config>(
            include_str!("../examples/edge.toml"),
            "edge: client connections",
        )?,
        Role::Broker => commented::<broker::Config>(
            include_str!("../examples/broker.toml"),
            "broker: ingest, aggregation, distribution",
        )?,
        Role::Control => commented::<control::Config>(
            include_str!("../examples/control.toml"),
            "control: tokens, edge registry, discovery",
        )?,
        Role::Up => {
            let example = include_str!("../examples/up.toml");
            let mut out = String::from(
                "# barrage up: control, broker and one edge in one process (complete defaults).\n\
                 # Environment: BARRAGE_UP_<SECTION>__<FIELD>, e.g. BARRAGE_UP_EDGE__SHARDS=2.\n",
            );
            let up = crate::up::UpConfig::default();
            for (section, value) in [
                ("control", toml::Value::try_from(&up.control)?),
                ("broker", toml::Value::try_from(&up.broker)?),
                ("edge", toml::Value::try_from(&up.edge)?),
            ] {
                out.push_str(&format!("\n[{section}]\n"));
                let comments = field_comments(example, Some(section));
                out.push_str(&render(&value, &comments, &format!("UP_{section}__")));
            }
            out
        }
    })
}

fn commented<C: Layered>(example: &str, what: &str) -> anyhow::Result<String> {
    let role = C::ROLE;
    let mut out = format!(
        "# barrage {what} (`barrage {role} --config FILE`): every field with its default.\n\
         # Layers: these defaults < this file < environment BARRAGE_{ROLE}_<FIELD> < --set FIELD=VALUE.\n\
         # Any field X can be read from a file instead: X_file = \"/run/credentials/...\" (secrets).\n",
        ROLE = role.to_ascii_uppercase()
    );
    let value = toml::Value::try_from(C::default())?;
    out.push('\n');
    out.push_str(&render(
        &value,
        &field_comments(example, None),
        &format!("{role}_"),
    ));
    Ok(out)
}

/// `key = value` lines of one table, in the order the struct declares them, each under its
/// comment and the environment variable that sets it; arrays of tables stay inline (`[]` by
/// default), and fields without a default (optional ones) are shown commented out, with the
/// example's value.
fn render(value: &toml::Value, comments: &BTreeMap<String, Entry>, env_infix: &str) -> String {
    let mut out = String::new();
    let Some(table) = value.as_table() else {
        return out;
    };
    let mut lines: Vec<(String, String)> = Vec::new();
    for (k, v) in table {
        lines.push((k.clone(), format!("{k} = {v}")));
    }
    // Struct order: toml's map is sorted, so take the example's order, then any others.
    lines.sort_by_key(|(k, _)| comments.get(k).map_or(usize::MAX, |e| e.order));
    let env = |k: &str| {
        format!(
            "BARRAGE_{}{}",
            env_infix.to_ascii_uppercase(),
            k.to_ascii_uppercase()
        )
    };
    for (k, line) in &lines {
        if let Some(e) = comments.get(k) {
            for c in &e.comment {
                out.push_str(c);
                out.push('\n');
            }
        }
        out.push_str(&format!("# env: {}\n{line}\n\n", env(k)));
    }
    // Optional fields: in the example, absent from the defaults.
    let mut optional: Vec<(&String, &Entry)> = comments
        .iter()
        .filter(|(k, _)| !table.contains_key(*k))
        .collect();
    optional.sort_by_key(|(_, e)| e.order);
    for (k, e) in optional {
        for c in &e.comment {
            out.push_str(c);
            out.push('\n');
        }
        out.push_str(&format!("# env: {}\n# {}\n\n", env(k), e.line));
    }
    out
}

/// A field's comment in an example file, its position and its `key = value` line.
#[derive(Debug)]
struct Entry {
    order: usize,
    comment: Vec<String>,
    line: String,
}

/// The comment block right above each top-level `key = ...` of `example` (or of its
/// `[section]`), without the "example:" markers.
fn field_comments(example: &str, section: Option<&str>) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut in_scope = section.is_none();
    let mut block: Vec<String> = Vec::new();
    for raw in example.lines() {
        let line = raw.trim();
        if line.starts_with('[') {
            // `[[api_keys]]` (or `[[broker.api_keys]]` in up's file): its comment documents
            // the array field; the keys below it belong to the entry, not to the top level.
            // `[http]` (or `[edge.http]`) likewise: its comment documents the table field.
            let array = line
                .strip_prefix("[[")
                .and_then(|l| l.strip_suffix("]]"))
                .or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')));
            let key = match (array, section) {
                (Some(name), None) if !name.contains('.') => Some(name.to_string()),
                (Some(name), Some(s)) => name.strip_prefix(&format!("{s}.")).map(str::to_string),
                _ => None,
            };
            if let Some(key) = key.filter(|k| !out.contains_key(k)) {
                let order = out.len();
                out.insert(
                    key.clone(),
                    Entry {
                        order,
                        comment: std::mem::take(&mut block),
                        line: format!("{key} = []  # entries: see the example file"),
                    },
                );
            }
            in_scope = section.is_some_and(|s| line == format!("[{s}]"));
            block.clear();
            continue;
        }
        if line.is_empty() {
            block.clear();
            continue;
        }
        if line.starts_with('#') {
            if line.trim_start_matches('#').trim() != "example:" {
                block.push(line.to_string());
            }
            continue;
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim().to_string();
            if in_scope && !out.contains_key(&key) {
                let order = out.len();
                out.insert(
                    key,
                    Entry {
                        order,
                        comment: std::mem::take(&mut block),
                        line: line.to_string(),
                    },
                );
            }
        }
        block.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrips<C: Layered>(role: Role) {
        let text = defaults(role).unwrap();
        let loaded: C = net::config::load(&Sources::text(&text))
            .unwrap_or_else(|e| panic!("{role:?} defaults do not load: {e}\n{text}"));
        assert_eq!(
            toml::Value::try_from(&loaded).unwrap(),
            toml::Value::try_from(C::default()).unwrap(),
            "{role:?}"
        );
        // Every field line has a comment of its own above its env line.
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if !l.starts_with('#') && l.contains(" = ") {
                assert!(lines[i - 1].starts_with("# env: BARRAGE_"), "{l}");
                assert!(
                    i >= 2 && lines[i - 2].starts_with('#') && !lines[i - 2].starts_with("# env"),
                    "{role:?}: {l} has no comment"
                );
            }
        }
    }

    #[test]
    fn defaults_are_complete_commented_and_load_back() {
        roundtrips::<edge::Config>(Role::Edge);
        roundtrips::<broker::Config>(Role::Broker);
        roundtrips::<control::Config>(Role::Control);
        roundtrips::<crate::up::UpConfig>(Role::Up);
        let edge = defaults(Role::Edge).unwrap();
        assert!(
            edge.contains("# env: BARRAGE_EDGE_TOKEN_KEYS\ntoken_keys = \"\""),
            "{edge}"
        );
        // An optional field shows up commented out.
        assert!(edge.contains("\n# control_addr = "), "{edge}");
        let up = defaults(Role::Up).unwrap();
        assert!(up.contains("# env: BARRAGE_UP_EDGE__SHARDS"), "{up}");
    }

    #[test]
    fn check_names_the_field() {
        let dir = std::env::temp_dir().join(format!("barrage-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("edge.toml");
        std::fs::write(&bad, "shards = 2\nheartbeat_timeout_ms = \"soon\"\n").unwrap();
        let e = check::<edge::Config>(&Sources::file(&bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat_timeout_ms"), "{e}");
        // The file is named (figment may print it relative to the working directory).
        let named = format!("barrage-check-{}/edge.toml", std::process::id());
        assert!(e.contains(&named), "{e}");
        std::fs::write(&bad, "timer_tick_ms = 0\n").unwrap();
        let e = check::<edge::Config>(&Sources::file(&bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains("timer_tick_ms"), "{e}");
        std::fs::write(&bad, "pin = \"2-1\"\n").unwrap();
        let e = check::<edge::Config>(&Sources::file(&bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pin"), "{e}");
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        // The example edge binds 0.0.0.0 with `change-me-...` secrets: refused as the edge
        // itself would refuse to start with them (docs/operations.md, Secrets).
        let e = check::<edge::Config>(&Sources::file(&examples.join("edge.toml"))).unwrap_err();
        assert!(e.contains("non-loopback"), "{e}");
        check::<crate::up::UpConfig>(&Sources::file(&examples.join("up.toml"))).unwrap();
    }
}
