//! containerd's filter syntax for Walk/List, as far as its clients use it.
//!
//! A request carries a list of filters, any of which may match (OR); each
//! filter is a comma-separated list of terms that must all match (AND). A
//! term is `FIELD`, `FIELD==VALUE` or `FIELD!=VALUE`; FIELD is `name`,
//! `parent`, `kind` or `labels.KEY` (KEY may be quoted, `labels."a.b/c"`,
//! or bare with dots); VALUE may be quoted. A bare FIELD tests presence
//! (a non-empty value). `~=` (regular expressions) is refused with
//! InvalidArgument rather than matched wrongly.

use crate::{
    error::{Error, Result},
    keys::Snapshot,
};

#[derive(Debug, PartialEq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
}

#[derive(Debug, PartialEq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, PartialEq)]
struct Term {
    field: Field,
    op: Op,
}

/// Parsed filters: any conjunction may match; none means everything.
#[derive(Debug, Default)]
pub struct Filters(Vec<Vec<Term>>);

impl Filters {
    /// Parses the request's filter strings (empty strings are ignored).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] on syntax or unknown fields.
    pub fn parse(filters: &[String]) -> Result<Filters> {
        let mut out = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            let terms = split_unquoted(f, ',')
                .into_iter()
                .map(|t| parse_term(t.trim(), f))
                .collect::<Result<Vec<_>>>()?;
            out.push(terms);
        }
        Ok(Filters(out))
    }

    /// Whether `s` passes.
    pub fn matches(&self, s: &Snapshot) -> bool {
        self.0.is_empty() || self.0.iter().any(|c| c.iter().all(|t| t.matches(s)))
    }
}

impl Term {
    fn matches(&self, s: &Snapshot) -> bool {
        let value = match &self.field {
            Field::Name => Some(s.key.as_str()),
            Field::Parent => s.parent.as_deref(),
            Field::Kind => Some(s.kind.name()),
            Field::Label(k) => s.labels.get(k).map(String::as_str),
        };
        match &self.op {
            Op::Present => value.is_some_and(|v| !v.is_empty()),
            Op::Eq(want) => value.unwrap_or_default() == want,
            Op::Ne(want) => value.unwrap_or_default() != want,
        }
    }
}

fn bad(filter: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("filter `{filter}`: {why}"))
}

/// Splits at `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// Removes surrounding quotes and backslash escapes.
fn unquote(s: &str, filter: &str) -> Result<String> {
    let s = s.trim();
    let Some(inner) = s.strip_prefix('"') else {
        return Ok(s.to_owned());
    };
    let inner = inner
        .strip_suffix('"')
        .ok_or_else(|| bad(filter, "unterminated quote"))?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn parse_term(t: &str, filter: &str) -> Result<Term> {
    if t.is_empty() {
        return Err(bad(filter, "empty term"));
    }
    // The operator is the first of ==, !=, ~= outside quotes.
    let mut quoted = false;
    let mut at = None;
    let bytes = t.as_bytes();
    for i in 0..bytes.len() {
        match bytes[i] {
            b'"' => quoted = !quoted,
            b'=' | b'!' | b'~' if !quoted && bytes.get(i + 1) == Some(&b'=') => {
                at = Some(i);
                break;
            }
            _ => {}
        }
    }
    let (selector, op) = match at {
        None => (t, Op::Present),
        Some(i) => {
            let value = unquote(&t[i + 2..], filter)?;
            let op = match bytes[i] {
                b'=' => Op::Eq(value),
                b'!' => Op::Ne(value),
                _ => return Err(bad(filter, "regular expressions (~=) are not supported")),
            };
            (&t[..i], op)
        }
    };
    let parts: Vec<String> = split_unquoted(selector.trim(), '.')
        .into_iter()
        .map(|p| unquote(p, filter))
        .collect::<Result<_>>()?;
    let field = match parts.first().map(String::as_str) {
        Some("name") if parts.len() == 1 => Field::Name,
        Some("parent") if parts.len() == 1 => Field::Parent,
        Some("kind") if parts.len() == 1 => Field::Kind,
        Some("labels") if parts.len() > 1 => Field::Label(parts[1..].join(".")),
        _ => {
            return Err(bad(
                filter,
                "unknown field; use name, parent, kind or labels.KEY",
            ));
        }
    };
    Ok(Term { field, op })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Kind;
    use std::{collections::BTreeMap, time::SystemTime};

    fn snap(key: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            key: key.into(),
            layer: "ctrd-1".into(),
            kind,
            parent: parent.map(Into::into),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            created: SystemTime::now(),
            updated: SystemTime::now(),
            mapped_at_create: None,
            own_bytes: None,
            bind: false,
        }
    }

    fn f(list: &[&str]) -> Filters {
        Filters::parse(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn filters_match() {
        let a = snap(
            "default/1/a",
            None,
            Kind::Committed,
            &[("containerd.io/gc.root", "x"), ("k", "v,w")],
        );
        let b = snap("default/2/b", Some("default/1/a"), Kind::Active, &[]);
        assert!(f(&[]).matches(&a) && f(&[""]).matches(&b));
        assert!(f(&["kind==committed"]).matches(&a));
        assert!(!f(&["kind==committed"]).matches(&b));
        assert!(f(&["parent==default/1/a"]).matches(&b));
        assert!(f(&[r#"parent=="default/1/a""#]).matches(&b));
        assert!(f(&["name!=default/1/a"]).matches(&b));
        assert!(f(&[r#"labels."containerd.io/gc.root""#]).matches(&a));
        assert!(f(&["labels.containerd.io/gc.root==x"]).matches(&a));
        assert!(!f(&["labels.containerd.io/gc.root"]).matches(&b));
        assert!(f(&[r#"labels.k=="v,w",kind==committed"#]).matches(&a));
        assert!(!f(&["labels.k==v,kind==committed"]).matches(&a));
        // OR across filters, AND within one.
        assert!(f(&["kind==view", "name==default/2/b"]).matches(&b));
        assert!(!f(&["kind==active,name==default/1/a"]).matches(&b));
    }

    #[test]
    fn bad_filters_are_refused() {
        for bad in ["bogus==1", "labels", "name~=a.*", "name==\"open", "a,,b"] {
            let e = Filters::parse(&[bad.to_owned()]).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
    }
}
