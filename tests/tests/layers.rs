//! The layering, checked: no import cycle between the modules of any crate, and a protocol
//! core that depends on no runtime.
//!
//! Crate boundaries already make cycles *between* crates impossible (cargo refuses them);
//! inside a crate nothing stops `a` from importing `b` while `b` imports `a`. This test reads
//! every library module of the workspace's crates, collects the modules each one names
//! through `crate::...` and `super::...` paths (imports and fully qualified uses alike),
//! and fails on any cycle, printing it. Test code (`tests.rs`, `*_tests.rs`, anything after
//! a top-level `#[cfg(test)]`) is left out: a test may reach anywhere.
//!
//! It is a text scan, not a compiler pass: a path through a `use` alias or a glob re-export
//! is seen as the module it names first. That is the price of a check that costs nothing
//! to run; docs/architecture.md says which way every arrow goes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file under `src/` ("" for lib.rs): `a/b.rs` and `a/b/mod.rs` are
/// `a::b`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

/// The code of a file without comments, string literals and its test module.
fn code_of(text: &str) -> String {
    let text = match text.find("\n#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        // Drop string literals (paths in messages are not imports).
        let mut in_str = false;
        let mut prev = ' ';
        for c in line.chars() {
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                out.push(c);
            }
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// Paths after `prefix` in `code`: `crate::a::b::{c, d}` gives ["a::b"] (a brace group
/// stops the path; its members are items or submodules of `a::b`, resolved below).
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut segs = Vec::new();
        let mut s = rest;
        loop {
            let end = s
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(s.len());
            if end == 0 {
                break;
            }
            segs.push(s[..end].to_string());
            s = &s[end..];
            if let Some(t) = s.strip_prefix("::") {
                s = t;
            } else {
                break;
            }
        }
        if !segs.is_empty() {
            out.push(segs);
        }
    }
    out
}

/// The module graph of one crate's library: module → modules it names.
fn graph(src: &Path, skip: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.retain(|f| {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        name != "tests.rs" && !name.ends_with("_tests.rs") && name != "main.rs"
    });
    let modules: BTreeMap<String, PathBuf> = files
        .iter()
        .map(|f| (module_of(src, f), f.clone()))
        .filter(|(m, _)| {
            !skip
                .iter()
                .any(|s| m == s || m.starts_with(&format!("{s}::")))
        })
        .collect();
    // The longest module path that `segs` starts with.
    let resolve = |segs: &[String]| -> Option<String> {
        (1..=segs.len())
            .rev()
            .map(|n| segs[..n].join("::"))
            .find(|m| modules.contains_key(m))
    };
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, f) in &modules {
        let code = code_of(&std::fs::read_to_string(f).expect("read source"));
        let mut deps = BTreeSet::new();
        for segs in paths_after(&code, "crate::") {
            if let Some(d) = resolve(&segs) {
                deps.insert(d);
            }
        }
        // `super::x` from `a::b` (file a/b.rs) is `a::x`; from `a` (a/mod.rs) it is `x`.
        let parent: Vec<String> = {
            let mut p: Vec<String> = m.split("::").map(str::to_string).collect();
            p.pop();
            p
        };
        for segs in paths_after(&code, "super::") {
            let mut full = parent.clone();
            full.extend(segs);
            if let Some(d) = resolve(&full) {
                deps.insert(d);
            }
        }
        deps.remove(m);
        deps.remove("");
        g.insert(m.clone(), deps);
    }
    g
}

/// A cycle in `g`, if any, as the list of modules around it.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let at = stack.iter().position(|s| s == n).unwrap_or(0);
                let mut c = stack[at..].to_vec();
                c.push(n.to_string());
                return Some(c);
            }
            None => {}
        }
        marks.insert(n.to_string(), Mark::Open);
        stack.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(n.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in g.keys() {
        let mut stack = Vec::new();
        if let Some(c) = visit(n, g, &mut marks, &mut stack) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_module_cycles_in_any_crate() {
    let root = workspace();
    let mut checked = 0;
    for krate in ["smtp", "milter", "engine", "queue", "loadgen", "tests"] {
        // The binary's command-line modules sit beside the library in engine/src/cli; they
        // are a crate of their own (the binary), checked on their own below.
        let skip: &[&str] = if krate == "engine" { &["cli"] } else { &[] };
        let g = graph(&root.join(krate).join("src"), skip);
        assert!(!g.is_empty(), "{krate}: no modules found");
        checked += g.len();
        if let Some(c) = find_cycle(&g) {
            panic!("{krate}: import cycle {}", c.join(" -> "));
        }
    }
    assert!(checked > 50, "only {checked} modules read");
}

#[test]
fn the_checker_finds_a_cycle() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    let c = find_cycle(&g).expect("a cycle");
    assert_eq!(c.first(), c.last());
    assert_eq!(c.len(), 4);
    let code = "use crate::a::b::{c, d};\nlet x = super::e::f(1); // crate::zz\n\"crate::no\"";
    assert_eq!(
        paths_after(&code_of(code), "crate::"),
        vec![vec!["a".to_string(), "b".to_string()]]
    );
    assert_eq!(
        paths_after(&code_of(code), "super::"),
        vec![vec!["e".to_string(), "f".to_string()]]
    );
}

/// The protocol core depends on no runtime: its manifest names only pure libraries.
#[test]
fn protocol_core_depends_on_no_runtime() {
    let manifest = std::fs::read_to_string(workspace().join("smtp/Cargo.toml")).expect("manifest");
    let deps = manifest
        .split("\n[dependencies]\n")
        .nth(1)
        .expect("[dependencies]")
        .split("\n[")
        .next()
        .unwrap_or("");
    let allowed = [
        "bytes",
        "memchr",
        "base64",
        "md-5",
        "hmac",
        "sha2",
        "rand",
        "thiserror",
        "ipnet",
        "rkyv",
    ];
    for line in deps
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let name = line.split(['=', '.', ' ']).next().unwrap_or("").trim();
        assert!(
            allowed.contains(&name),
            "tern-smtp depends on {name:?}: the protocol core takes no runtime, no I/O and no \
             other tern crate (allowed: {allowed:?})"
        );
    }
    let lib = std::fs::read_to_string(workspace().join("smtp/src/lib.rs")).expect("lib.rs");
    assert!(lib.contains("#![forbid(unsafe_code)]"));
}

/// The milter client core is sans-I/O too: bytes, memchr, thiserror and nothing else.
#[test]
fn milter_core_depends_on_no_runtime() {
    let manifest =
        std::fs::read_to_string(workspace().join("milter/Cargo.toml")).expect("manifest");
    let deps = manifest
        .split("\n[dependencies]\n")
        .nth(1)
        .expect("[dependencies]")
        .split("\n[")
        .next()
        .unwrap_or("");
    let allowed = ["bytes", "memchr", "thiserror"];
    for line in deps
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let name = line.split(['=', '.', ' ']).next().unwrap_or("").trim();
        assert!(
            allowed.contains(&name),
            "tern-milter depends on {name:?} (allowed: {allowed:?})"
        );
    }
    let lib = std::fs::read_to_string(workspace().join("milter/src/lib.rs")).expect("lib.rs");
    assert!(lib.contains("#![forbid(unsafe_code)]"));
}
