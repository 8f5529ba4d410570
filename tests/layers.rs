//! The module graph has no cycles (ARCHITECTURE.md, "Layers").
//!
//! Reads every `src/**/*.rs`, takes the `crate::x` paths it names (in `use`
//! items and in expressions, grouped `use crate::{a, b::c}` included), and
//! builds the graph of top-level modules: `src/sync/m2.rs` is `sync`, and an
//! edge `sync → store` means some file of `sync` names `crate::store`.
//! Comments and `#[cfg(test)] mod tests` blocks do not count (a doc link or a
//! unit test's fixture is not a dependency). Every strongly connected set of
//! two or more modules is a cycle, reported with one path through it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level module graph: module → modules it names.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// Edges that close a cycle today and are being removed; nothing may be
/// added here. Each is left out of the graph, so any other cycle fails.
const KNOWN_BACK_EDGES: &[(&str, &str)] = &[
    // `Store::open` migrates schema-1 mirrors (`mirror::migrate_layout1`).
    ("store", "mirror"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/x.rs` and `src/x/**` are module `x`; the crate roots are none.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The text without comments and without unit-test modules.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|l| l.trim_start().starts_with("mod "))
        {
            // A unit-test module runs to the end of the file by convention
            // here; skip it (its line and everything after).
            break;
        }
        let code = match line.find("//") {
            // A `//` inside a string ("http://...") is rare in paths that
            // matter; cutting there only loses the rest of that line.
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules a text names through `crate::`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes: Vec<char> = code.chars().collect();
    let text: String = bytes.iter().collect();
    let mut from = 0;
    while let Some(i) = text[from..].find("crate::") {
        let at = from + i;
        from = at + "crate::".len();
        // `$crate::` in a macro, or a longer identifier ending in `crate`.
        if at > 0
            && text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| is_ident(c) || c == '$')
        {
            continue;
        }
        let rest = &text[from..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first identifier of each
            // item at depth 1.
            let mut depth = 1;
            let mut item_start = true;
            let mut ident = String::new();
            for c in group.chars() {
                if depth == 1 && item_start && is_ident(c) {
                    ident.push(c);
                    continue;
                }
                if !ident.is_empty() {
                    out.insert(std::mem::take(&mut ident));
                    item_start = false;
                }
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    _ => {}
                }
            }
        } else {
            let ident: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            if !ident.is_empty() {
                out.insert(ident);
            }
        }
    }
    out
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(src, f)).collect();
    let mut g = Graph::new();
    for f in &files {
        let Some(m) = module_of(src, f) else { continue };
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let deps = g.entry(m.clone()).or_default();
        for d in named_modules(&code_only(&text)) {
            // `crate::Foo` (a re-export at the root) is no module edge.
            if d != m && modules.contains(&d) {
                deps.insert(d);
            }
        }
    }
    g
}

/// Tarjan's strongly connected components, each sorted.
fn components(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// One cycle through `start` inside its component (breadth-first, so the
/// shortest), as `a → b → a`.
fn a_cycle(g: &Graph, comp: &[String], start: &str) -> String {
    let inside: BTreeSet<&str> = comp.iter().map(String::as_str).collect();
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in g.get(v).into_iter().flatten().map(String::as_str) {
            if !inside.contains(w) {
                continue;
            }
            if w == start {
                let mut path = vec![start, v];
                let mut at = v;
                while at != start {
                    at = prev[at];
                    path.push(at);
                }
                path.reverse();
                return path.join(" → ");
            }
            if !prev.contains_key(w) && w != start {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("{start} is in a strongly connected component")
}

#[test]
fn no_module_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g = graph(&src);
    for (from, to) in KNOWN_BACK_EDGES {
        if let Some(deps) = g.get_mut(*from) {
            deps.remove(*to);
        }
    }
    let cycles = components(&g);
    let report: Vec<String> = cycles
        .iter()
        .map(|c| format!("{{{}}}: e.g. {}", c.join(", "), a_cycle(&g, c, &c[0])))
        .collect();
    assert!(
        report.is_empty(),
        "module cycles (a module may only name modules below it; see ARCHITECTURE.md, Layers):\n{}",
        report.join("\n")
    );
}

#[test]
fn the_parser_sees_every_form_of_path() {
    let code = code_only(
        "use crate::a::B;\nuse crate::{b, c::D, d::{e, f}};\n// crate::g\nfn x() { crate::h::y(); $crate::i::z(); }\n/// [`crate::j`]\n#[cfg(test)]\nmod tests { use crate::k; }\n",
    );
    let got: Vec<String> = named_modules(&code).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "d", "h"]);
    let mut g = Graph::new();
    for (a, b) in [("x", "y"), ("y", "z"), ("z", "x"), ("z", "w")] {
        g.entry(a.into()).or_default().insert(b.into());
        g.entry(b.into()).or_default();
    }
    let comps = components(&g);
    assert_eq!(comps, [vec!["x", "y", "z"]]);
    assert_eq!(a_cycle(&g, &comps[0], "x"), "x → y → z → x");
}
