//! The workspace's shape, checked: no import loops between the modules of
//! any crate, and the crates depend on each other in one direction.
//!
//! An import loop is counted between sibling modules (children of the same
//! module): `a` depends on `b` when any file under `a` names anything under
//! `b` (`use crate::b::…`, `super::b::…` or a path in code). A parent and
//! its own children are not siblings, so `mod.rs` re-exporting a child and
//! the child using its parent's types is not a loop. Test code (a trailing
//! `#[cfg(test)]` module, `tests.rs`, `testing.rs`) is not counted.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace's library and binary crates with a `src/` folder.
const CRATES: &[&str] = &["proto", "router", "server", "trainer", "bench", "demo"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `src/a/b.rs` -> `["a", "b"]`; `src/a/mod.rs` -> `["a"]`; `lib.rs`/`main.rs` -> `[]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !(stem == "mod" || (parts.is_empty() && (stem == "lib" || stem == "main"))) {
        parts.push(stem.to_string());
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's text without its trailing test module and without comments.
fn production_code(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t == "#[cfg(test)]" && lines.peek().is_some_and(|next| next.trim_start().starts_with("mod ")) {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// Expand a use tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap().trim();
        return if path.is_empty() {
            vec![]
        } else {
            vec![path.to_string()]
        };
    };
    let prefix = tree[..open].trim_end_matches("::");
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .flat_map(expand)
        .map(|p| {
            if p == "self" {
                prefix.to_string()
            } else {
                format!("{prefix}::{p}")
            }
        })
        .collect()
}

/// Every path the code names that starts with `crate::` or `super::`.
fn named_paths(code: &str) -> Vec<String> {
    let use_stmt = regex::Regex::new(r"(?s)\buse\s+((?:crate|super)::[^;]*);").unwrap();
    let inline = regex::Regex::new(r"\b((?:crate|super)(?:::(?:super|[A-Za-z_][A-Za-z0-9_]*))+)").unwrap();
    let mut paths: Vec<String> = use_stmt
        .captures_iter(code)
        .flat_map(|c| expand(&c[1].split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect();
    let rest = use_stmt.replace_all(code, "");
    paths.extend(inline.captures_iter(&rest).map(|c| c[1].to_string()));
    paths
}

/// The module a path names (the longest known module prefix), resolved
/// from the module `from`.
fn target(path: &str, from: &[String], modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    let mut segs = path.split("::");
    let mut base: Vec<String> = match segs.next()? {
        "crate" => Vec::new(),
        "super" => {
            let mut b = from.to_vec();
            b.pop();
            b
        }
        _ => return None,
    };
    let mut best = base.clone();
    for seg in segs {
        if seg == "super" {
            base.pop();
            best = base.clone();
            continue;
        }
        base.push(seg.to_string());
        if modules.contains(&base) {
            best = base.clone();
        } else {
            break;
        }
    }
    Some(best)
}

/// Sibling-module loops of one crate, each as `a -> b -> a` under its parent.
fn import_loops(krate: &str) -> Vec<String> {
    let src = workspace_root().join(krate).join("src");
    if !src.is_dir() {
        return Vec::new();
    }
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(&src, f)).collect();
    // parent -> (child -> children it depends on)
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy();
        if name == "tests.rs" || name == "testing.rs" || name == "main.rs" {
            continue;
        }
        let from = module_path(&src, file);
        let code = production_code(&std::fs::read_to_string(file).unwrap());
        for path in named_paths(&code) {
            let Some(to) = target(&path, &from, &modules) else {
                continue;
            };
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common < from.len() && common < to.len() {
                graphs
                    .entry(from[..common].to_vec())
                    .or_default()
                    .entry(from[common].clone())
                    .or_default()
                    .insert(to[common].clone());
            }
        }
    }
    let mut loops = Vec::new();
    for (parent, graph) in &graphs {
        let at = if parent.is_empty() {
            "crate".to_string()
        } else {
            parent.join("::")
        };
        for group in tangles(graph) {
            let sub: BTreeMap<String, BTreeSet<String>> = group
                .iter()
                .map(|n| (n.clone(), graph[n].intersection(&group).cloned().collect()))
                .collect();
            let cycle = find_cycle(&sub).unwrap_or_default();
            loops.push(format!(
                "{krate}: under `{at}`, {{{}}} import each other, e.g. {}",
                group.iter().cloned().collect::<Vec<_>>().join(", "),
                cycle.join(" -> ")
            ));
        }
    }
    loops
}

/// The groups of modules that all reach each other (strongly connected
/// components of more than one module).
fn tangles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for next in graph.get(&n).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = graph.keys().map(|k| (k, reach(k))).collect();
    let mut groups: Vec<BTreeSet<String>> = Vec::new();
    for (node, seen) in &reaches {
        let group: BTreeSet<String> = seen
            .iter()
            .filter(|other| reaches.get(other).is_some_and(|r| r.contains(*node)))
            .cloned()
            .collect();
        if group.len() > 1 && !groups.contains(&group) {
            groups.push(group);
        }
    }
    groups
}

/// One cycle of a directed graph, if it has any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_loop() {
    let loops: Vec<String> = CRATES.iter().flat_map(|k| import_loops(k)).collect();
    assert!(loops.is_empty(), "import loops:\n{}", loops.join("\n"));
}

#[test]
fn the_checker_finds_a_loop_and_expands_use_trees() {
    assert_eq!(
        expand("crate::a::{b, c::{d, e as f}, self}"),
        ["crate::a::b", "crate::a::c::d", "crate::a::c::e", "crate::a"]
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let mut acyclic = graph.clone();
    acyclic.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&acyclic), None);
}

#[test]
fn the_trainer_does_not_depend_on_the_server() {
    let manifest = std::fs::read_to_string(workspace_root().join("trainer/Cargo.toml")).unwrap();
    let deps: toml::Table = toml::from_str(&manifest).unwrap();
    for table in ["dependencies", "dev-dependencies"] {
        let named = deps
            .get(table)
            .and_then(|t| t.as_table())
            .is_some_and(|t| t.contains_key("flywheel-server"));
        assert!(!named, "trainer/Cargo.toml [{table}] names flywheel-server");
    }
}
