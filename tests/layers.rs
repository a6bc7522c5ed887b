//! The tree is the architecture: the folders (and top-level modules) of `src/` import one
//! another in one direction only. This test reads every `crate::<module>` path in the code
//! (comments left out) and fails on any cycle between them, naming the edges that close it
//! with a file and line for each. The lowest layers also have a rule of their own: `wire`
//! imports nothing of the crate, `redis` only `wire`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where one module's file uses another module: (file, line).
type Evidence = (String, usize);
/// unit → unit → first place the first imports the second.
type Graph = BTreeMap<String, BTreeMap<String, Evidence>>;

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The unit a file belongs to: its folder under `src/`, or its own name at the top.
fn unit_of(rel: &Path) -> String {
    let first = rel.components().next().expect("non-empty path");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// The modules `crate::<module>` names in `code`, with their line numbers; comments and
/// string literals are skipped.
fn crate_paths(code: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let code_part = strip_comment_and_strings(line);
        let mut rest = code_part.as_str();
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            let after = &rest[i + "crate::".len()..];
            let ident: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `wsbus_crate::x` or `$crate::x` are not this crate's paths.
            let own = !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
            if own && !ident.is_empty() {
                found.push((ident, n + 1));
            }
            rest = after;
        }
    }
    found
}

/// `line` without its `//` comment and with string literals blanked.
fn strip_comment_and_strings(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_str = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

/// The import graph of the crate under `src`.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("below src").to_path_buf();
        // main.rs is the binary: it reaches the library as `wsbus::`, lib.rs only declares.
        if rel == Path::new("main.rs") || rel == Path::new("lib.rs") {
            continue;
        }
        let from = unit_of(&rel);
        let code = std::fs::read_to_string(&file).expect("read file");
        let edges = graph.entry(from.clone()).or_default();
        for (to, line) in crate_paths(&code) {
            if to != from {
                let place = (format!("src/{}", rel.display()), line);
                edges.entry(to).or_insert(place);
            }
        }
    }
    graph
}

/// Strongly connected components with more than one unit (Tarjan).
fn cycles(graph: &Graph) -> Vec<BTreeSet<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        let nexts: Vec<&'g str> = s
            .graph
            .get(v)
            .map(|e| e.keys().map(String::as_str).collect())
            .unwrap_or_default();
        for w in nexts {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.insert(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.out
}

/// A report of every cycle: the edges inside each component, with where they are.
fn describe(graph: &Graph, found: &[BTreeSet<String>]) -> String {
    let mut text = String::new();
    for component in found {
        let names: Vec<&str> = component.iter().map(String::as_str).collect();
        text.push_str(&format!("cycle between {}:\n", names.join(", ")));
        for from in component {
            for (to, (file, line)) in &graph[from] {
                if component.contains(to) {
                    text.push_str(&format!("  {from} -> {to}  ({file}:{line})\n"));
                }
            }
        }
    }
    text
}

#[test]
fn folders_import_each_other_in_one_direction() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    assert!(
        graph.len() >= 10,
        "read too few modules: {:?}",
        graph.keys()
    );
    let found = cycles(&graph);
    assert!(found.is_empty(), "{}", describe(&graph, &found));
}

#[test]
fn the_lowest_layers_import_no_feature() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    let allowed: [(&str, &[&str]); 2] = [("wire", &[]), ("redis", &["wire"])];
    let mut wrong = Vec::new();
    for (unit, may) in allowed {
        let edges = graph.get(unit).unwrap_or_else(|| panic!("no src/{unit}/"));
        for (to, (file, line)) in edges {
            if !may.contains(&to.as_str()) {
                wrong.push(format!("{unit} -> {to} ({file}:{line})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "a low layer imports upward:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checker_sees_a_cycle_and_names_its_edges() {
    let mut graph = Graph::new();
    let at = |f: &str| (f.to_owned(), 1);
    graph
        .entry("a".into())
        .or_default()
        .insert("b".into(), at("src/a.rs"));
    graph
        .entry("b".into())
        .or_default()
        .insert("c".into(), at("src/b/x.rs"));
    graph
        .entry("c".into())
        .or_default()
        .insert("a".into(), at("src/c.rs"));
    graph
        .entry("c".into())
        .or_default()
        .insert("d".into(), at("src/c.rs"));
    graph.entry("d".into()).or_default();
    let found = cycles(&graph);
    assert_eq!(found.len(), 1);
    let text = describe(&graph, &found);
    assert!(text.contains("c -> a  (src/c.rs:1)"), "{text}");
    assert!(!text.contains("-> d"), "d is outside the cycle: {text}");
    // Comments, strings and other crates' paths are not imports.
    let paths = crate_paths(
        "use crate::wire::ids; // crate::node\nlet s = \"crate::edge\"; $crate::x; crate::redis::keys",
    );
    let names: Vec<&str> = paths.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["wire", "redis"]);
}
