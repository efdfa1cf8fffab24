//! The module graph of src/ (DESIGN.md "The flow, and the layout that shows it"): arrows
//! between top-level modules point down the flow and never back, so there is no cycle.
//! Read from the source text (`crate::module` paths outside `#[cfg(test)]` modules).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module's layer: a module may use only modules of a lower layer.
const LAYERS: &[(&str, u8)] = &[
    ("bridge", 10),
    ("admin", 9),
    ("smtp", 8),
    ("relay", 7),
    ("oauth", 6),
    ("metrics", 5),
    ("telemetry", 4),
    ("config", 3),
    ("reply", 1),
    ("secret", 1),
    ("fsutil", 1),
    ("clock", 1),
    ("sync", 1),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module -> the top-level modules its non-test code names.
fn arrows() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if ["main", "lib", "cli"].contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]\nmod ").next().unwrap();
        let used = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name != module && !name.is_empty() {
                used.insert(name);
            }
        }
    }
    graph
}

#[test]
fn top_level_arrows_point_down_and_every_module_has_a_layer() {
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let graph = arrows();
    let mut wrong = Vec::new();
    for (from, tos) in &graph {
        let Some(&lf) = layer.get(from.as_str()) else {
            wrong.push(format!("{from}: no layer in tests/it/layout.rs"));
            continue;
        };
        for to in tos {
            match layer.get(to.as_str()) {
                Some(&lt) if lt < lf => {}
                Some(_) => wrong.push(format!("{from} -> {to} runs up (or sideways)")),
                None => wrong.push(format!("{from} -> {to}: unknown module")),
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\nthe graph: {graph:#?}");
    // The arrows DESIGN.md names explicitly.
    assert!(!graph["relay"].contains("smtp"), "relay never imports smtp");
    assert!(
        !graph["oauth"].contains("relay"),
        "oauth never imports relay"
    );
    assert!(
        !graph["config"].contains("oauth"),
        "config never imports oauth"
    );
    assert!(
        graph["smtp"].contains("relay"),
        "the graph was read (smtp uses relay)"
    );
}
