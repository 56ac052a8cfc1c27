//! Where barrage keeps state on this host (the broker's reach log, `up`'s self-signed
//! certificate), when the config names no place.
//!
//! In order: `$STATE_DIRECTORY` (set by systemd for a unit with `StateDirectory=barrage`:
//! `/var/lib/barrage`), `$XDG_STATE_HOME/barrage`, `$HOME/.local/state/barrage`, else
//! `./.barrage`. Callers add a per-process part (the broker: its node id and port) so several
//! processes on one host never share a directory.

use std::path::PathBuf;

/// The state directory of this host's barrage processes (see the module docs).
pub fn dir() -> PathBuf {
    dir_from(|k| std::env::var_os(k))
}

/// [`dir`] with the environment read through `var` (tests).
pub fn dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    let set = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = set("STATE_DIRECTORY") {
        // systemd may list several, separated by ':'; the first is this unit's.
        let first = d.to_string_lossy().split(':').next().map(PathBuf::from);
        if let Some(f) = first.filter(|f| !f.as_os_str().is_empty()) {
            return f;
        }
    }
    if let Some(x) = set("XDG_STATE_HOME") {
        return x.join("barrage");
    }
    if let Some(h) = set("HOME") {
        return h.join(".local/state/barrage");
    }
    PathBuf::from(".barrage")
}

/// `name` with every byte outside `[A-Za-z0-9._-]` replaced by `_`, so a node id can name a
/// directory (no separators, no `..` walking out of the state directory).
pub fn path_part(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        format!("_{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn systemd_then_xdg_then_home_then_cwd() {
        let all = [
            ("STATE_DIRECTORY", "/var/lib/barrage:/var/lib/other"),
            ("XDG_STATE_HOME", "/x"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(dir_from(env(&all)), PathBuf::from("/var/lib/barrage"));
        assert_eq!(dir_from(env(&all[1..])), PathBuf::from("/x/barrage"));
        assert_eq!(
            dir_from(env(&[("XDG_STATE_HOME", ""), ("HOME", "/home/u")])),
            PathBuf::from("/home/u/.local/state/barrage")
        );
        assert_eq!(dir_from(env(&[])), PathBuf::from(".barrage"));
    }

    #[test]
    fn a_node_id_cannot_walk_out() {
        assert_eq!(path_part("broker-1"), "broker-1");
        assert_eq!(path_part("../../etc"), ".._.._etc");
        assert_eq!(path_part(".."), "_..");
        assert_eq!(path_part(""), "_");
        assert_eq!(path_part("a/b c"), "a_b_c");
    }
}
