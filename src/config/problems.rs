//! Collecting validation problems under their key paths, and finding the line each key is
//! on so that every message reads `file:line: key: reason`.

use std::fmt;
use std::path::PathBuf;

/// One semantic problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `pool.backends[1].address`.
    pub key: String,
    /// 1-based line of the key (or of its nearest enclosing table) in the file; 0 when the
    /// key is not in the file at all (a default value, or a missing section).
    pub line: usize,
    pub reason: String,
}

/// The problems found so far, and the key path the current check is inside.
#[derive(Debug, Default)]
pub struct Problems {
    /// Key path of the section or item being checked, e.g. `pool.backends[2]`.
    prefix: String,
    list: Vec<Problem>,
}

impl Problems {
    /// Records that `key` (relative to the current path; `""` for the path itself) is
    /// wrong because of `reason`.
    pub fn bad(&mut self, key: &str, reason: impl Into<String>) {
        let key = join(&self.prefix, key);
        self.list.push(Problem {
            key,
            line: 0,
            reason: reason.into(),
        });
    }

    /// Runs `check` with `key` appended to the current path (`"backends[1]"`, `"health"`).
    pub fn within<R>(&mut self, key: &str, check: impl FnOnce(&mut Problems) -> R) -> R {
        let saved = self.prefix.len();
        self.prefix = join(&self.prefix, key);
        let result = check(self);
        self.prefix.truncate(saved);
        result
    }

    /// The full key path of `key` under the current path (for messages that name a
    /// sibling key, such as "at most pool.health.interval").
    pub fn path(&self, key: &str) -> String {
        join(&self.prefix, key)
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn into_list(self) -> Vec<Problem> {
        self.list
    }
}

fn join(prefix: &str, key: &str) -> String {
    match (prefix.is_empty(), key.is_empty()) {
        (_, true) => prefix.to_owned(),
        (true, false) => key.to_owned(),
        (false, false) if key.starts_with('[') => format!("{prefix}{key}"),
        (false, false) => format!("{prefix}.{key}"),
    }
}

/// What names in surge (pool names, backend ids) may be made of. The pool name becomes a
/// provider tag value and backend ids travel in cookies and URLs, so no spaces, quotes or
/// separators.
pub const NAME_RULE: &str = "must be non-empty and use only letters, digits, - _ .";

/// Whether `name` is acceptable as a pool name or backend id (see [`NAME_RULE`]).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// 1-based line of byte `offset` in `text`.
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Fills in each problem's line from where its key (or the nearest enclosing table that
/// is in the file) is, then orders the problems as they appear in the file, the ones
/// about keys absent from the file last.
pub(super) fn locate(text: &str, problems: &mut [Problem]) {
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return;
    };
    for p in problems.iter_mut() {
        p.line = line_of(text, doc.as_table(), &p.key).unwrap_or(0);
    }
    problems.sort_by_key(|p| if p.line == 0 { usize::MAX } else { p.line });
}

/// One step of a key path.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if !name.is_empty() {
            out.push(Step::Key(name));
        }
        while let Some((index, after)) = rest.split_once(']') {
            if let Ok(i) = index.parse() {
                out.push(Step::Index(i));
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    out
}

/// The line of the deepest part of `path` present in the document.
fn line_of(text: &str, root: &toml_edit::Table, path: &str) -> Option<usize> {
    use toml_edit::{ArrayOfTables, Item, TableLike, Value};
    /// Where the walk is: something with keys, something with indices, or a plain value.
    enum Node<'d> {
        Keys(&'d dyn TableLike),
        Tables(&'d ArrayOfTables),
        Value(&'d Value),
    }
    fn of_item(item: &Item) -> Option<Node<'_>> {
        match item {
            Item::ArrayOfTables(a) => Some(Node::Tables(a)),
            Item::Value(v) => Some(of_value(v)),
            other => other.as_table_like().map(Node::Keys),
        }
    }
    fn of_value(value: &Value) -> Node<'_> {
        match value {
            Value::InlineTable(t) => Node::Keys(t),
            other => Node::Value(other),
        }
    }
    let mut node = Node::Keys(root);
    let mut line = None;
    for step in steps(path) {
        let (span, next) = match (step, node) {
            (Step::Key(k), Node::Keys(t)) => match t.get_key_value(k) {
                Some((key, child)) => (key.span().or_else(|| child.span()), of_item(child)),
                None => break,
            },
            (Step::Index(i), Node::Tables(a)) => match a.get(i) {
                Some(t) => (t.span(), Some(Node::Keys(t))),
                None => break,
            },
            (Step::Index(i), Node::Value(Value::Array(a))) => match a.get(i) {
                Some(v) => (v.span(), Some(of_value(v))),
                None => break,
            },
            _ => break,
        };
        if let Some(s) = span {
            line = Some(line_at(text, s.start));
        }
        match next {
            Some(n) => node = n,
            None => break,
        }
    }
    line
}

/// Every problem, one per line: `file:line: key: reason` (`file: key: reason` for a key
/// not in the file).
pub(super) struct Listing<'a>(pub &'a PathBuf, pub &'a [Problem]);

impl fmt::Display for Listing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.1.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                0 => write!(f, "{}: {}: {}", self.0.display(), p.key, p.reason)?,
                line => write!(f, "{}:{line}: {}: {}", self.0.display(), p.key, p.reason)?,
            }
        }
        Ok(())
    }
}
