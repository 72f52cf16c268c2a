//! The documents that claim to be complete are held to it: `docs/architecture.md` names
//! every module file under `src/`, and `docs/configuration.md` documents exactly the keys
//! the config loader accepts (found by asking the loader itself, not by reading source).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use surge::config::Config;

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_architecture_map_names_every_module_file() {
    let map = repo_file("docs/architecture.md");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 50, "src/ holds {} files?", files.len());
    let missing: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(&src)
                .expect("under src")
                .to_string_lossy()
                .into_owned()
        })
        .filter(|rel| !map.contains(&format!("`{rel}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md does not name these module files (as `path/under/src.rs`): {missing:?}"
    );
}

/// What the loader said about a table that holds an unknown key `__probe`.
enum Probe {
    /// A table: the keys it accepts.
    Table(Vec<String>),
    /// An array of tables, not a table.
    Array,
    /// Neither: a value (string, number, duration...).
    Leaf,
}

/// The TOML that puts `__probe = 1` into the table at `path` (`arrays`: which of its
/// segments are arrays of tables).
fn probe_text(path: &[String], arrays: &[bool]) -> String {
    let mut text = String::new();
    for i in 0..path.len() {
        let name = path[..=i].join(".");
        if arrays[i] {
            text.push_str(&format!("[[{name}]]\n"));
        } else if i + 1 == path.len() {
            text.push_str(&format!("[{name}]\n"));
        }
    }
    text.push_str("__probe = 1\n");
    text
}

fn probe(path: &[String], arrays: &[bool]) -> Probe {
    let text = probe_text(path, arrays);
    let err = match Config::parse(&text, Path::new("probe.toml")) {
        Ok(_) => panic!("the loader accepted an unknown key:\n{text}"),
        Err(e) => e.to_string(),
    };
    if let Some(at) = err.find("unknown field `__probe`") {
        let rest = &err[at..];
        if rest.contains("there are no fields") {
            return Probe::Table(Vec::new());
        }
        let names = rest
            .split('`')
            .skip(3)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        return Probe::Table(names);
    }
    if err.contains("expected a sequence") || err.contains("expected an array") {
        return Probe::Array;
    }
    Probe::Leaf
}

/// Every key the loader accepts, as its dotted path (arrays of tables by their name), and
/// every table on the way.
fn accepted_keys() -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut leaves, mut tables) = (BTreeSet::new(), BTreeSet::new());
    let mut todo: Vec<(Vec<String>, Vec<bool>)> = Vec::new();
    let Probe::Table(top) = probe(&[], &[]) else {
        panic!("the top level is not a table");
    };
    for key in top {
        todo.push((vec![key], vec![false]));
    }
    while let Some((path, mut arrays)) = todo.pop() {
        assert!(
            path.len() < 8,
            "config nests deeper than expected: {path:?}"
        );
        let mut found = probe(&path, &arrays);
        if matches!(found, Probe::Array) {
            *arrays.last_mut().expect("a path") = true;
            found = probe(&path, &arrays);
        }
        match found {
            Probe::Table(keys) => {
                tables.insert(path.join("."));
                for key in keys {
                    let mut next = path.clone();
                    next.push(key);
                    let mut flags = arrays.clone();
                    flags.push(false);
                    todo.push((next, flags));
                }
            }
            Probe::Array | Probe::Leaf => {
                leaves.insert(path.join("."));
            }
        }
    }
    (leaves, tables)
}

/// The keys `docs/configuration.md` documents: the first cell of each table row, a
/// dotted key in backticks.
fn documented_keys(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|line| line.trim_start().strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|key| {
            key.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_configuration_reference_documents_exactly_the_accepted_keys() {
    let (leaves, tables) = accepted_keys();
    assert!(
        leaves.len() > 100,
        "only {} keys found: {leaves:?}",
        leaves.len()
    );
    let documented = documented_keys(&repo_file("docs/configuration.md"));
    let undocumented: Vec<&String> = leaves.difference(&documented).collect();
    let unknown: Vec<&String> = documented
        .iter()
        .filter(|k| !leaves.contains(*k) && !tables.contains(*k))
        .collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/configuration.md is out of step with src/config:\n  accepted but not documented: \
         {undocumented:?}\n  documented but not accepted: {unknown:?}"
    );
}

#[test]
fn the_probe_tells_tables_arrays_and_values_apart() {
    // The loader's own answers, as the two tests above read them.
    assert!(
        matches!(probe(&["proxy".into()], &[false]), Probe::Table(k) if k.contains(&"idle_timeout".to_owned()))
    );
    assert!(matches!(
        probe(&["listeners".into()], &[false]),
        Probe::Array
    ));
    assert!(matches!(
        probe(&["proxy".into(), "idle_timeout".into()], &[false, false]),
        Probe::Leaf
    ));
}

/// Longest a function outside tests may be: a reader holds it whole.
const MAX_FUNCTION_LINES: usize = 120;

/// Functions longer than `limit` lines in `text`: (name, first line, length). A function
/// runs from its `fn` line to the first `}` at the same indentation; test modules
/// (`mod tests {` to its closing brace) are skipped.
fn long_functions(text: &str, limit: usize) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let body = line.trim_start();
        let closing = format!("{}}}", " ".repeat(indent(line)));
        let end = || (i + 1..lines.len()).find(|&j| lines[j] == closing);
        if body.starts_with("mod tests {") {
            i = end().map_or(lines.len(), |j| j + 1);
            continue;
        }
        let words: Vec<&str> = body.split_whitespace().collect();
        let at_fn = words
            .iter()
            .take_while(|w| {
                matches!(**w, "pub" | "async" | "const" | "unsafe" | "fn") || w.starts_with("pub(")
            })
            .position(|w| *w == "fn");
        if let Some(k) = at_fn {
            let name = words
                .get(k + 1)
                .map_or("?", |w| w.split(['(', '<']).next().unwrap_or(w));
            // Declarations without a body (trait items) end on their own line.
            if !body.trim_end().ends_with(';') {
                if let Some(j) = end() {
                    if j - i + 1 > limit {
                        found.push((name.to_owned(), i + 1, j - i + 1));
                    }
                }
            }
        }
        i += 1;
    }
    found
}

#[test]
fn no_function_outside_tests_is_longer_than_a_reader_can_hold() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for file in files.iter().filter(|f| !f.ends_with("tests.rs")) {
        let text = std::fs::read_to_string(file).expect("source file");
        for (name, line, len) in long_functions(&text, MAX_FUNCTION_LINES) {
            let rel = file
                .strip_prefix(&src)
                .expect("under src")
                .display()
                .to_string();
            long.push(format!("src/{rel}:{line} {name} ({len} lines)"));
        }
    }
    assert!(
        long.is_empty(),
        "functions longer than {MAX_FUNCTION_LINES} lines outside tests:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_length_check_finds_a_long_function_and_skips_test_modules() {
    let long_fn = |name: &str, indent: &str, n: usize| {
        let mut f = format!("{indent}pub(crate) async fn {name}(x: u8) -> u8 {{\n");
        for _ in 0..n {
            f.push_str(&format!("{indent}    let _ = x;\n"));
        }
        f.push_str(&format!("{indent}}}\n"));
        f
    };
    let text = format!(
        "{}impl A {{\n{}}}\n#[cfg(test)]\nmod tests {{\n{}}}\n",
        long_fn("short", "", 3),
        long_fn("method", "    ", 130),
        long_fn("in_test", "    ", 200)
    );
    let found = long_functions(&text, MAX_FUNCTION_LINES);
    assert_eq!(found, vec![("method".to_owned(), 7, 132)]);
}
