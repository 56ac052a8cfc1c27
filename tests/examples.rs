//! The example config files parse, and document every field the roles have (a new config field
//! fails this test until it is added to the example with its comment).

use std::collections::BTreeSet;
use std::path::Path;

fn keys(v: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            let name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            // Arrays of tables (api_keys, regions, rooms) are examples, not defaults.
            if v.is_table() {
                keys(v, &name, out);
            } else {
                out.insert(name);
            }
        }
    }
}

fn example(name: &str) -> (String, toml::Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (text, v)
}

fn assert_covers(name: &str, defaults: &impl serde::Serialize) {
    let (_, file) = example(name);
    let want = toml::Value::try_from(defaults).unwrap();
    let (mut have_keys, mut want_keys) = (BTreeSet::new(), BTreeSet::new());
    keys(&file, "", &mut have_keys);
    keys(&want, "", &mut want_keys);
    let missing: Vec<_> = want_keys.difference(&have_keys).collect();
    assert!(missing.is_empty(), "{name} does not document {missing:?}");
}

#[test]
fn examples_parse_and_cover_every_field() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let c = control::Config::from_toml_file(&dir.join("control.toml")).unwrap();
    assert!(!c.token_keys.is_empty());
    broker::Config::from_toml_file(&dir.join("broker.toml")).unwrap();
    edge::Config::from_toml_file(&dir.join("edge.toml")).unwrap();
    assert_covers("control.toml", &control::Config::default());
    assert_covers("broker.toml", &broker::Config::default());
    assert_covers("edge.toml", &edge::Config::default());
}

#[test]
fn up_example_has_all_three_sections() {
    let (_, v) = example("up.toml");
    for (section, defaults) in [
        (
            "control",
            toml::Value::try_from(control::Config::default()).unwrap(),
        ),
        (
            "broker",
            toml::Value::try_from(broker::Config::default()).unwrap(),
        ),
        (
            "edge",
            toml::Value::try_from(edge::Config::default()).unwrap(),
        ),
    ] {
        let got = v.get(section).unwrap_or_else(|| panic!("no [{section}]"));
        let (mut have, mut want) = (BTreeSet::new(), BTreeSet::new());
        keys(got, "", &mut have);
        keys(&defaults, "", &mut want);
        let missing: Vec<_> = want.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "up.toml [{section}] does not document {missing:?}"
        );
    }
    // The sections deserialize as the role configs do.
    let text = example("up.toml").0;
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    let control: control::Config = parsed["control"].clone().try_into().unwrap();
    assert_eq!(control.rooms.len(), 1);
    let _: broker::Config = parsed["broker"].clone().try_into().unwrap();
    let edge: edge::Config = parsed["edge"].clone().try_into().unwrap();
    assert_eq!(edge.tcp_addr, "127.0.0.1:2243");
}
