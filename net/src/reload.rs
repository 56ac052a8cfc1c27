//! Live reload: values a role swaps while it runs ([`Live`]) and the hooks that swap them
//! ([`Hooks`]), run on SIGHUP and on `POST /admin/reload`.
//!
//! A role owns one [`Hooks`] and hands clones to whoever has something to reload: the binary
//! registers "config" (re-reads the config layers, applies the fields that can change live),
//! the TLS code registers "tls" (re-reads certificates). Running the hooks runs each in
//! registration order and reports every outcome: one failing hook (a bad file) keeps the old
//! value of what it guards and does not stop the others.
//!
//! Invariants: a reader of a [`Live`] sees either the old or the new value, whole; a reload
//! never blocks a reader.

use std::sync::{Arc, Mutex};

/// A value readers take a snapshot of (`load`) and a reload replaces whole (`store`).
///
/// An `arc_swap::ArcSwap`: a load touches no shared reference count and takes no lock, so the
/// broker's ingest threads (every push loads the policy) and the edge's shards (every client
/// packet loads the token keys) do not contend on one cache line.
#[derive(Debug)]
pub struct Live<T>(arc_swap::ArcSwap<T>);

impl<T: Default> Default for Live<T> {
    fn default() -> Live<T> {
        Live::new(T::default())
    }
}

impl<T> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live(arc_swap::ArcSwap::from_pointee(value))
    }

    /// The current value; hold it briefly (a long-held guard makes later loads slower).
    pub fn load(&self) -> arc_swap::Guard<Arc<T>> {
        self.0.load()
    }

    /// Replaces the value; readers that loaded the old one keep it until they drop it.
    pub fn store(&self, value: T) {
        self.0.store(Arc::new(value));
    }
}

/// One reload step: `Ok(what changed)` or `Err(why nothing changed)`.
pub type Hook = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// The outcome of one hook.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub name: String,
    pub ok: bool,
    /// What changed, or why the hook kept the old state.
    pub detail: String,
}

/// The reload hooks of one role (cheap to clone; every clone shares the list).
#[derive(Clone, Default)]
pub struct Hooks(Arc<Mutex<Vec<(String, Hook)>>>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Hooks {
    /// Adds a hook; a second hook with the same name replaces the first.
    pub fn register(
        &self,
        name: &str,
        hook: impl Fn() -> Result<String, String> + Send + Sync + 'static,
    ) {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|(n, _)| n != name);
        list.push((name.to_string(), Box::new(hook)));
    }

    /// Registered hook names, in run order.
    pub fn names(&self) -> Vec<String> {
        let list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Runs every hook in order (one reload at a time: the list stays locked meanwhile) and
    /// logs each outcome.
    pub fn run(&self) -> Vec<Outcome> {
        let list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        list.iter()
            .map(|(name, hook)| {
                let (ok, detail) = match hook() {
                    Ok(d) => (true, d),
                    Err(e) => (false, e),
                };
                if ok {
                    tracing::info!(hook = %name, %detail, "reloaded");
                } else {
                    tracing::warn!(hook = %name, error = %detail, "reload failed; kept the old state");
                }
                Outcome {
                    name: name.clone(),
                    ok,
                    detail,
                }
            })
            .collect()
    }

    /// Runs the hooks and answers as `POST /admin/reload` does: 200 when every hook
    /// succeeded, 500 (with each outcome) when one failed.
    pub fn respond(&self) -> crate::http::Response {
        let outcomes = self.run();
        let ok = outcomes.iter().all(|o| o.ok);
        crate::http::Response::json(
            if ok { 200 } else { 500 },
            &serde_json::json!({"ok": ok, "reloaded": outcomes}),
        )
    }
}

/// What `barrage` sets once at start so a reload can change the log filter
/// (`tracing_subscriber`'s reload handle lives in the binary).
static LOG_FILTER: std::sync::OnceLock<LogFilterFn> = std::sync::OnceLock::new();

/// Swaps the process's log filter (`RUST_LOG` syntax).
type LogFilterFn = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the function that swaps the process's log filter (once; later calls are ignored).
pub fn set_log_filter_fn(f: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) {
    let _ = LOG_FILTER.set(Box::new(f));
}

/// Swaps the log filter (`RUST_LOG` syntax); empty goes back to the filter the process
/// started with. Without an installed function (a role embedded in a test), nothing changes.
pub fn set_log_filter(filter: &str) -> Result<(), String> {
    match LOG_FILTER.get() {
        Some(f) => f(filter),
        None => Ok(()),
    }
}

/// Top-level fields whose values differ between the running config and a newly loaded one,
/// leaving out `live` (the ones a reload applies): what a reload cannot change, so the
/// operator is told a restart is needed for them.
pub fn fields_needing_restart<C: serde::Serialize>(
    running: &C,
    loaded: &C,
    live: &[&str],
) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(running), serde_json::to_value(loaded))
    else {
        return Vec::new();
    };
    a.iter()
        .filter(|(k, v)| !live.contains(&k.as_str()) && b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The `Ok` line of a "config" hook: what it applied, then what still needs a restart.
pub fn summary(applied: &[String], restart: &[String]) -> String {
    let mut s = if applied.is_empty() {
        "nothing live changed".to_string()
    } else {
        format!("applied: {}", applied.join(", "))
    };
    if !restart.is_empty() {
        s.push_str(&format!(
            "; changed but needs a restart: {}",
            restart.join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn fields_needing_restart_leave_out_the_live_ones() {
        #[derive(serde::Serialize)]
        struct C {
            shards: u32,
            token_keys: String,
            addr: String,
        }
        let a = C {
            shards: 1,
            token_keys: "1:a".into(),
            addr: "x".into(),
        };
        let b = C {
            shards: 2,
            token_keys: "2:b".into(),
            addr: "x".into(),
        };
        assert_eq!(fields_needing_restart(&a, &b, &["token_keys"]), ["shards"]);
        assert_eq!(
            summary(&["token_keys".into()], &["shards".into()]),
            "applied: token_keys; changed but needs a restart: shards"
        );
    }

    #[test]
    fn live_readers_keep_their_snapshot() {
        let l = Live::new(1);
        let old = l.load();
        l.store(2);
        assert_eq!((**old, **l.load()), (1, 2));
    }

    #[test]
    fn hooks_run_in_order_and_a_failure_does_not_stop_the_rest() {
        let hooks = Hooks::default();
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        hooks.register("config", move || {
            n2.fetch_add(1, Ordering::Relaxed);
            Ok("token keys 2".into())
        });
        hooks.register("tls", || Err("cert.pem: no such file".into()));
        let n3 = n.clone();
        hooks.clone().register("later", move || {
            n3.fetch_add(10, Ordering::Relaxed);
            Ok(String::new())
        });
        let out = hooks.run();
        assert_eq!(n.load(Ordering::Relaxed), 11);
        assert_eq!(
            out.iter()
                .map(|o| (o.name.as_str(), o.ok))
                .collect::<Vec<_>>(),
            [("config", true), ("tls", false), ("later", true)]
        );
        assert_eq!(hooks.respond().status, 500);
        // Same name replaces: the failing hook is fixed.
        hooks.register("tls", || Ok("cert reloaded".into()));
        assert_eq!(hooks.names(), ["config", "later", "tls"]);
        assert_eq!(hooks.respond().status, 200);
    }
}
