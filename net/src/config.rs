//! One layered config loader for every role.
//!
//! A role's config is a plain serde struct with a `Default`; this module reads it from four
//! layers, each overriding the one before:
//!
//! 1. the struct's `Default`,
//! 2. a TOML file (`--config FILE`),
//! 3. environment variables `BARRAGE_<ROLE>_<FIELD>` (`BARRAGE_EDGE_SHARDS=4`; a nested field
//!    joins its path with `__`: `BARRAGE_UP_EDGE__SHARDS`),
//! 4. flags (`--set FIELD=VALUE`, repeatable).
//!
//! Values in the environment and in flags are read as TOML-like literals (`4`, `true`,
//! `[1, 2]`, anything else is a string).
//!
//! **Secrets from files.** In any layer, a field named `X_file` is replaced by the contents of
//! that file as field `X` (trailing whitespace trimmed; when `X` defaults to a list, one entry
//! per non-empty line). That works for every field, present and future, so systemd credentials
//! (`LoadCredential=` + `BARRAGE_EDGE_TOKEN_KEYS_FILE=%d/token_keys`) and
//! `[[api_keys]] key_file = "..."` need no code per secret. Because the suffix is reserved, a
//! config field that really holds a path is named `_path`. Giving both `X` and `X_file` in one
//! layer is an error; a higher layer's `X_file` overrides a lower layer's `X`.
//!
//! Unknown fields stay an error in every layer (the structs are `deny_unknown_fields`), and the
//! loaded value goes through the role's [`Layered::check`] before anyone sees it.
//!
//! figment does the merging: it remembers which layer gave each value, so an error names the
//! field *and* where it came from (`in TOML file /etc/barrage/edge.toml`,
//! `in BARRAGE_EDGE_SHARDS`), which is what an operator needs from `barrage config check`.

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Suffix that turns a field into "read field `X` from this file".
pub const FILE_SUFFIX: &str = "_file";

/// Fields renamed for one vocabulary across roles (issue 15): old name, new name, what to do with
/// the value. An old name in any layer is refused with a message naming the new one, never
/// silently ignored or mapped: for a duration the unit changed with the name, so carrying the
/// number over would be wrong by a factor of 1000.
pub const RENAMED: &[(&str, &str, &str)] = &[
    (
        "token_ttl_s",
        "token_ttl_ms",
        "milliseconds: multiply the value by 1000",
    ),
    ("pin_cores", "pin", "same values"),
];

/// Largest secret file read (a key set or a list of API keys is a few KiB at most).
pub const SECRET_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// A role's configuration, loadable by [`load`].
pub trait Layered: Serialize + DeserializeOwned + Default {
    /// The role's name in environment variables: `BARRAGE_<ROLE>_` (written upper-case).
    const ROLE: &'static str;

    /// Checks values that parse but would make the role misbehave; the message names the field.
    fn check(&self) -> Result<(), String>;
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A `--set` flag is not `FIELD=VALUE`.
    #[error("--set {0:?}: expected FIELD=VALUE")]
    Flag(String),
    /// A value has the wrong type, a field is unknown, or a secret file is unreadable; one
    /// line per problem, each naming the field and the layer it came from.
    #[error("{}", .0.join("\n"))]
    Layer(Vec<String>),
    /// Every value parsed, but the role refused the combination.
    #[error("{0}")]
    Invalid(String),
}

/// Where a config comes from, lowest layer first (defaults come from the type).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// TOML text instead of a file (tests, `up`'s sections).
    pub text: Option<String>,
    /// Environment variables to look through (all of them; only `BARRAGE_<ROLE>_*` are used).
    pub env: Vec<(String, String)>,
    /// `FIELD=VALUE` overrides, in order.
    pub set: Vec<String>,
}

impl Sources {
    /// Just a file: what the roles' `from_toml_file` read.
    pub fn file(path: &Path) -> Sources {
        Sources {
            file: Some(path.to_path_buf()),
            ..Sources::default()
        }
    }

    /// Just TOML text.
    pub fn text(text: &str) -> Sources {
        Sources {
            text: Some(text.to_string()),
            ..Sources::default()
        }
    }

    /// A file (optional), this process's environment and `--set` flags: what a server reads.
    pub fn process(file: Option<&Path>, set: &[String]) -> Sources {
        Sources {
            file: file.map(Path::to_path_buf),
            text: None,
            env: std::env::vars().collect(),
            set: set.to_vec(),
        }
    }
}

/// `BARRAGE_<ROLE>_`.
pub fn env_prefix(role: &str) -> String {
    format!("BARRAGE_{}_", role.to_ascii_uppercase())
}

/// The environment variable that sets `path` (e.g. `["token_keys"]` -> `BARRAGE_EDGE_TOKEN_KEYS`).
pub fn env_name(role: &str, path: &[&str]) -> String {
    format!(
        "{}{}",
        env_prefix(role),
        path.join("__").to_ascii_uppercase()
    )
}

/// Loads `C` from `sources` and checks it.
pub fn load<C: Layered>(sources: &Sources) -> Result<C, ConfigError> {
    let defaults = Serialized::defaults(C::default());
    let default_dict = defaults
        .data()
        .ok()
        .and_then(|mut m| m.remove(&Profile::Default));
    let default_dict = default_dict.unwrap_or_default();
    let mut fig = Figment::from(defaults);
    if let Some(path) = &sources.file {
        // figment treats a missing file as empty; a missing config file is an operator's mistake.
        if let Err(source) = std::fs::metadata(path) {
            return Err(ConfigError::Read {
                path: path.clone(),
                source,
            });
        }
        fig = fig.merge(Secrets::new(Toml::file_exact(path), &default_dict));
    }
    if let Some(text) = &sources.text {
        fig = fig.merge(Secrets::new(Toml::string(text), &default_dict));
    }
    let env = EnvLayer::new(C::ROLE, &sources.env);
    if !env.pairs.is_empty() {
        fig = fig.merge(Secrets::new(env, &default_dict));
    }
    if !sources.set.is_empty() {
        fig = fig.merge(Secrets::new(FlagLayer::new(&sources.set)?, &default_dict));
    }
    let config: C = fig.extract().map_err(layer_error)?;
    config.check().map_err(ConfigError::Invalid)?;
    Ok(config)
}

/// One line per figment error: what is wrong, with which field, from which layer.
fn layer_error(e: figment::Error) -> ConfigError {
    ConfigError::Layer(
        e.into_iter()
            .map(|e| {
                let field = e.path.join(".");
                let kind = match &e.kind {
                    figment::error::Kind::UnknownField(name, _) => renamed(name)
                        .map(|(new, hint)| format!("`{name}` was renamed `{new}` ({hint})"))
                        .unwrap_or_else(|| e.kind.to_string()),
                    kind => kind.to_string(),
                };
                let from = e
                    .metadata
                    .as_ref()
                    .map(|m| match &m.source {
                        Some(s) => format!(" (in {} {s})", m.name),
                        // Env and flags name the variable or flag that gave the value.
                        None if !e.path.is_empty() => {
                            format!(
                                " (in {} {})",
                                m.name,
                                m.interpolate(&Profile::Default, &e.path)
                            )
                        }
                        None => format!(" (in {})", m.name),
                    })
                    .unwrap_or_default();
                if field.is_empty() {
                    format!("{kind}{from}")
                } else {
                    format!("{field}: {kind}{from}")
                }
            })
            .collect(),
    )
}

/// The new name of a field in [`RENAMED`], and what to do with its value.
pub fn renamed(old: &str) -> Option<(&'static str, &'static str)> {
    RENAMED
        .iter()
        .find(|(o, _, _)| *o == old)
        .map(|(_, new, hint)| (*new, *hint))
}

/// `BARRAGE_<ROLE>_*` variables as a layer.
struct EnvLayer {
    role: String,
    /// (path below the prefix, raw value), e.g. (["token_keys"], "1:abc").
    pairs: Vec<(Vec<String>, String)>,
}

impl EnvLayer {
    fn new(role: &str, env: &[(String, String)]) -> EnvLayer {
        let prefix = env_prefix(role);
        let pairs = env
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(&prefix)?;
                let path = rest
                    .split("__")
                    .map(|s| s.to_ascii_lowercase())
                    .collect::<Vec<_>>();
                (!path.iter().any(String::is_empty)).then(|| (path, v.clone()))
            })
            .collect();
        EnvLayer {
            role: role.to_string(),
            pairs,
        }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        let role = self.role.clone();
        Metadata::named("environment variable").interpolater(move |_, path| env_name(&role, path))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (path, raw) in &self.pairs {
            insert_path(&mut dict, path, literal(raw));
        }
        Ok(Map::from([(Profile::Default, dict)]))
    }
}

/// `--set FIELD=VALUE` flags as a layer (`FIELD` may be dotted: `edge.shards`).
struct FlagLayer {
    pairs: Vec<(Vec<String>, String)>,
}

impl FlagLayer {
    fn new(set: &[String]) -> Result<FlagLayer, ConfigError> {
        let pairs = set
            .iter()
            .map(|s| {
                let (k, v) = s
                    .split_once('=')
                    .ok_or_else(|| ConfigError::Flag(s.clone()))?;
                let path: Vec<String> = k.trim().split('.').map(str::to_string).collect();
                if path.iter().any(String::is_empty) {
                    return Err(ConfigError::Flag(s.clone()));
                }
                Ok((path, v.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(FlagLayer { pairs })
    }
}

impl Provider for FlagLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("--set flag").interpolater(|_, path| path.join("."))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (path, raw) in &self.pairs {
            insert_path(&mut dict, path, literal(raw));
        }
        Ok(Map::from([(Profile::Default, dict)]))
    }
}

/// A TOML-like literal: `4`, `true`, `[1, 2]`, or else the string itself.
fn literal(raw: &str) -> Value {
    match raw.parse::<Value>() {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = dict;
    for p in parents {
        let entry = at
            .entry(p.clone())
            .or_insert_with(|| Value::from(Dict::new()));
        if entry.as_dict().is_none() {
            *entry = Value::from(Dict::new());
        }
        at = match entry {
            Value::Dict(_, d) => d,
            _ => return,
        };
    }
    at.insert(last.clone(), value);
}

/// Wraps a layer so its `X_file` fields become `X` (see the module docs).
struct Secrets<P> {
    inner: P,
    /// The defaults, to tell a list field (one entry per line) from a string field.
    defaults: Dict,
}

impl<P: Provider> Secrets<P> {
    fn new(inner: P, defaults: &Dict) -> Secrets<P> {
        Secrets {
            inner,
            defaults: defaults.clone(),
        }
    }
}

impl<P: Provider> Provider for Secrets<P> {
    fn metadata(&self) -> Metadata {
        self.inner.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut data = self.inner.data()?;
        for dict in data.values_mut() {
            resolve_files(dict, Some(&self.defaults), &mut Vec::new()).map_err(|e| *e)?;
        }
        Ok(data)
    }
}

fn resolve_files(
    dict: &mut Dict,
    defaults: Option<&Dict>,
    path: &mut Vec<String>,
) -> Result<(), Box<figment::Error>> {
    let file_keys: Vec<String> = dict
        .keys()
        .filter(|k| k.len() > FILE_SUFFIX.len() && k.ends_with(FILE_SUFFIX))
        .cloned()
        .collect();
    for key in file_keys {
        let field = key[..key.len() - FILE_SUFFIX.len()].to_string();
        let at = || {
            let mut p = path.clone();
            p.push(key.clone());
            p.join(".")
        };
        if dict.contains_key(&field) {
            return Err(Box::new(
                figment::Error::from(format!("both {field} and {key} are set; keep one"))
                    .with_path(&at()),
            ));
        }
        let Some(Value::String(_, file)) = dict.remove(&key) else {
            return Err(Box::new(
                figment::Error::from(format!("{key} must be a file path")).with_path(&at()),
            ));
        };
        let text = read_secret(Path::new(&file))
            .map_err(|e| Box::new(figment::Error::from(format!("{file}: {e}")).with_path(&at())))?;
        let is_list = matches!(defaults.and_then(|d| d.get(&field)), Some(Value::Array(..)));
        let value = if is_list {
            Value::from(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| Value::from(l.to_string()))
                    .collect::<Vec<_>>(),
            )
        } else {
            Value::from(text.trim_end().to_string())
        };
        dict.insert(field, value);
    }
    // Nested tables and arrays of tables (`[[api_keys]] key_file = ...`).
    for (k, v) in dict.iter_mut() {
        let sub_defaults = defaults.and_then(|d| d.get(k)).and_then(Value::as_dict);
        path.push(k.clone());
        match v {
            Value::Dict(_, d) => resolve_files(d, sub_defaults, path)?,
            Value::Array(_, items) => {
                for item in items.iter_mut() {
                    if let Value::Dict(_, d) = item {
                        resolve_files(d, None, path)?;
                    }
                }
            }
            _ => {}
        }
        path.pop();
    }
    Ok(())
}

fn read_secret(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut text = String::new();
    f.take(SECRET_FILE_BYTES_MAX + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > SECRET_FILE_BYTES_MAX {
        return Err(std::io::Error::other(format!(
            "larger than {SECRET_FILE_BYTES_MAX} bytes"
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        shards: usize,
        name: String,
        token_keys: String,
        api_keys: Vec<String>,
        keys: Vec<Key>,
        inner: Inner,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Key {
        key: String,
        #[serde(default)]
        rate_per_s: f64,
    }

    #[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        depth: u32,
    }

    impl Default for Demo {
        fn default() -> Self {
            Demo {
                shards: 1,
                name: "n".into(),
                token_keys: String::new(),
                api_keys: Vec::new(),
                keys: Vec::new(),
                inner: Inner::default(),
            }
        }
    }

    impl Layered for Demo {
        const ROLE: &'static str = "demo";
        fn check(&self) -> Result<(), String> {
            if self.shards > 64 {
                return Err("shards must be at most 64".into());
            }
            Ok(())
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn tmp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("barrage-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn layers_override_in_order() {
        let s = Sources {
            text: Some("shards = 2\nname = \"file\"\n[inner]\ndepth = 3\n".into()),
            env: env(&[
                ("BARRAGE_DEMO_SHARDS", "4"),
                ("BARRAGE_DEMO_INNER__DEPTH", "5"),
                ("BARRAGE_OTHER_SHARDS", "9"),
                ("PATH", "/bin"),
            ]),
            set: vec!["shards=6".into()],
            ..Sources::default()
        };
        let c: Demo = load(&s).unwrap();
        assert_eq!((c.shards, c.name.as_str(), c.inner.depth), (6, "file", 5));
        let c: Demo = load(&Sources {
            set: vec![],
            ..s.clone()
        })
        .unwrap();
        assert_eq!(c.shards, 4);
        let c: Demo = load(&Sources::default()).unwrap();
        assert_eq!(c, Demo::default());
    }

    #[test]
    fn errors_name_the_field_and_the_layer() {
        let e = load::<Demo>(&Sources::text("shardz = 2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shardz"), "{e}");
        let e = load::<Demo>(&Sources {
            env: env(&[("BARRAGE_DEMO_SHARDS", "many")]),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("shards") && e.contains("BARRAGE_DEMO_SHARDS"),
            "{e}"
        );
        let e = load::<Demo>(&Sources::text("shards = 65")).unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid(ref m) if m.contains("shards")),
            "{e}"
        );
        let e = load::<Demo>(&Sources::file(Path::new("/nonexistent/x.toml"))).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        let e = load::<Demo>(&Sources {
            set: vec!["shards".into()],
            ..Sources::default()
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::Flag(_)), "{e}");
    }

    #[test]
    fn a_renamed_field_is_refused_naming_its_new_name() {
        for sources in [
            Sources::text("token_ttl_s = 5"),
            Sources {
                env: env(&[("BARRAGE_DEMO_TOKEN_TTL_S", "5")]),
                ..Sources::default()
            },
            Sources {
                set: vec!["token_ttl_s=5".into()],
                ..Sources::default()
            },
        ] {
            let e = load::<Demo>(&sources).unwrap_err().to_string();
            assert!(
                e.contains("`token_ttl_s` was renamed `token_ttl_ms`"),
                "{e}"
            );
        }
        let e = load::<Demo>(&Sources::text("[inner]\ntoken_ttl_s = 5"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("renamed `token_ttl_ms`"), "{e}");
    }

    #[test]
    fn secrets_come_from_files_in_any_layer() {
        let tk = tmp("token_keys", "1:aaaaaaaaaaaaaaaa\n");
        let ak = tmp("api_keys", "k1\n\n  k2  \n");
        let one = tmp("one_key", "sekrit\n");
        let text =
            format!("token_keys_file = {tk:?}\n[[keys]]\nkey_file = {one:?}\nrate_per_s = 5\n");
        let c: Demo = load(&Sources {
            text: Some(text.clone()),
            env: env(&[("BARRAGE_DEMO_API_KEYS_FILE", ak.to_str().unwrap())]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(c.token_keys, "1:aaaaaaaaaaaaaaaa");
        assert_eq!(c.api_keys, vec!["k1".to_string(), "k2".to_string()]);
        assert_eq!(c.keys[0].key, "sekrit");
        // A higher layer's X_file overrides a lower layer's X.
        let c: Demo = load(&Sources {
            text: Some("token_keys = \"inline\"".into()),
            env: env(&[("BARRAGE_DEMO_TOKEN_KEYS_FILE", tk.to_str().unwrap())]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(c.token_keys, "1:aaaaaaaaaaaaaaaa");
        // Both in one layer, or an unreadable file: errors naming the field.
        let both = format!("token_keys = \"x\"\ntoken_keys_file = {tk:?}");
        let e = load::<Demo>(&Sources::text(&both)).unwrap_err().to_string();
        assert!(e.contains("token_keys_file"), "{e}");
        let e = load::<Demo>(&Sources::text("token_keys_file = \"/nonexistent/k\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token_keys_file") && e.contains("/nonexistent/k"),
            "{e}"
        );
        // A `_file` field the struct has no `X` for is still an unknown field.
        let e = load::<Demo>(&Sources::text(&format!("bogus_file = {tk:?}")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
