//! YAML text to a generic tree whose every node carries its line and column.
//!
//! Built directly from the event stream of `granit-parser` (the parser under `serde-saphyr`,
//! re-exported by it): a serde `Deserialize` with `Spanned` wrappers was three times slower on
//! the 10,000-node benchmark, and serde stops at the first problem anyway. Scalars are resolved
//! with the YAML 1.2 core schema (so `NO` stays a string: Norway, not false).
//!
//! Hostile input is refused while reading, before anything is expanded: nesting deeper than
//! [`MAX_DEPTH`], more than [`MAX_YAML_NODES`] nodes (a copy of each anchored node included),
//! more than [`MAX_ALIASES`] aliases, aliases
//! that would copy more than [`MAX_ALIAS_REPLAYED_EVENTS`] nodes in total (billion laughs),
//! anchors and aliases that would copy more than [`MAX_ANCHOR_COPY_BYTES`] of scalar text in
//! total (an alias to a long scalar), more than one document, and YAML tags (none are
//! meaningful in a topology).

use std::borrow::Cow;
use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Options, Parser, ScalarStyle, ScanError, Span, Tag};

use crate::diag::Diagnostic;
use crate::yaml::{
    MAX_ALIAS_REPLAYED_EVENTS, MAX_ALIASES, MAX_ANCHOR_COPY_BYTES, MAX_DEPTH, MAX_DOCUMENT_BYTES,
    MAX_YAML_NODES,
};

/// Source position of a YAML node (1-based line and column, in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

/// A YAML node with its position. Scalars keep the type the core schema resolves them to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct YNode<'a> {
    pub pos: Pos,
    pub value: YValue<'a>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum YValue<'a> {
    Null,
    Bool(bool),
    Int(i128),
    /// An integer (decimal, `0x`, `0o`) too long for an `i128`, as written: out of range
    /// wherever an integer is read (it was a float, or a string).
    TooBig(Cow<'a, str>),
    Float(f64),
    /// Borrowed from the input unless escapes or folding changed it.
    Str(Cow<'a, str>),
    Seq(Vec<YNode<'a>>),
    Map(Vec<(YNode<'a>, YNode<'a>)>),
}

impl YValue<'_> {
    /// What the value is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self {
            YValue::Null => "nothing (null)",
            YValue::Bool(_) => "a boolean",
            YValue::Int(_) | YValue::TooBig(_) => "an integer",
            YValue::Float(_) => "a number",
            YValue::Str(_) => "a string",
            YValue::Seq(_) => "a list",
            YValue::Map(_) => "a mapping",
        }
    }
    /// A scalar's text, for fields parsed from text: numbers are passed on as written so that
    /// `latency: 12` gets the unit parser's "has no unit" message.
    pub fn scalar_text(&self) -> Option<String> {
        match self {
            YValue::Str(s) | YValue::TooBig(s) => Some(s.to_string()),
            YValue::Int(i) => Some(i.to_string()),
            YValue::Float(f) => Some(f.to_string()),
            YValue::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

fn pos(span: &Span) -> Pos {
    Pos {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(text: Cow<'_, str>) -> YValue<'_> {
    let s: &str = &text;
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return YValue::Null,
        "true" | "True" | "TRUE" => return YValue::Bool(true),
        "false" | "False" | "FALSE" => return YValue::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return YValue::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return YValue::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return YValue::Float(f64::NAN),
        _ => {}
    }
    let b = s.as_bytes();
    let digits = b
        .strip_prefix(b"-")
        .or_else(|| b.strip_prefix(b"+"))
        .unwrap_or(b);
    if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
        return match s.parse::<i128>() {
            Ok(i) => YValue::Int(i),
            Err(_) => YValue::TooBig(text),
        };
    }
    // Digits only after the prefix (YAML 1.2's core schema: `0x[0-9a-fA-F]+`, `0o[0-7]+`);
    // `from_str_radix` alone also took a sign there (`0x+50`, `0x-1`), which makes a string.
    for (prefix, radix) in [("0x", 16), ("0o", 8)] {
        if let Some(rest) = s.strip_prefix(prefix)
            && !rest.is_empty()
            && rest.chars().all(|c| c.is_digit(radix))
        {
            return match i128::from_str_radix(rest, radix) {
                Ok(i) => YValue::Int(i),
                Err(_) => YValue::TooBig(text),
            };
        }
    }
    if b.iter().any(u8::is_ascii_digit)
        && b.iter()
            .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'+' | b'e' | b'E'))
        && let Ok(f) = s.parse::<f64>()
    {
        return YValue::Float(f);
    }
    YValue::Str(text)
}

/// What a node costs to copy: its nodes, and the bytes of its scalars' text.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    nodes: usize,
    bytes: usize,
}

impl std::ops::AddAssign for Size {
    fn add_assign(&mut self, o: Size) {
        self.nodes += o.nodes;
        self.bytes += o.bytes;
    }
}

struct Builder<'a> {
    parser: Parser<'a, serde_saphyr::granit_parser::StrInput<'a>>,
    /// Anchored nodes, with their size (what an alias to them costs).
    /// Each anchored node, its size and its [`height`] (taken once, when it is anchored).
    anchors: HashMap<usize, (YNode<'a>, Size, usize)>,
    nodes: usize,
    aliases: usize,
    replayed: usize,
    /// Scalar bytes copied for anchors and aliases.
    copied: usize,
}

type Built<'a> = Result<(YNode<'a>, Size), Diagnostic>;

impl<'a> Builder<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), Diagnostic> {
        loop {
            match self.parser.next_event() {
                Some(Ok((Event::Comment(..), _))) => continue,
                Some(Ok(ev)) => return Ok(ev),
                Some(Err(e)) => return Err(scan_error(&e)),
                None => return Err(Diagnostic::error(0, 0, "YAML: unexpected end of input")),
            }
        }
    }

    /// A collection takes no tag: `!!str` makes a scalar a string, and makes no list one (it
    /// was ignored there, and the list loaded as a list).
    fn refuse_collection_tag(tag: Option<&Tag>, span: &Span, what: &str) -> Result<(), Diagnostic> {
        match tag {
            Some(t) if t.is_yaml_core_schema_tag("str") => {
                let p = pos(span);
                Err(Diagnostic::error(
                    p.line,
                    p.column,
                    format!("YAML tag \"!!str\" applies to a single value, not to a {what}"),
                ))
            }
            _ => Self::refuse_tag(tag, span).map(|_| ()),
        }
    }

    fn refuse_tag(tag: Option<&Tag>, span: &Span) -> Result<bool, Diagnostic> {
        match tag {
            None => Ok(false),
            Some(t) if t.is_yaml_core_schema_tag("str") => Ok(true),
            Some(t) => {
                let p = pos(span);
                Err(Diagnostic::error(
                    p.line,
                    p.column,
                    format!(
                        "YAML tag {:?} is not supported in topology files",
                        t.original()
                    ),
                ))
            }
        }
    }

    fn count(&mut self, span: &Span) -> Result<(), Diagnostic> {
        self.nodes += 1;
        if self.nodes > MAX_YAML_NODES {
            let p = pos(span);
            return Err(Diagnostic::error(
                p.line,
                p.column,
                format!("more than {MAX_YAML_NODES} YAML nodes are refused"),
            ));
        }
        Ok(())
    }

    /// Counts `bytes` of scalar text copied (for an anchor or an alias) at `p` in `copied`
    /// (the builder's; a field, so that an anchor may stay borrowed meanwhile).
    fn copy_bytes(copied: &mut usize, bytes: usize, p: Pos) -> Result<(), Diagnostic> {
        *copied += bytes;
        if *copied > MAX_ANCHOR_COPY_BYTES {
            return Err(Diagnostic::error(
                p.line,
                p.column,
                format!(
                    "anchors and aliases copy more than {} MiB of text; aliases are for sharing \
                     small settings (write the values out instead)",
                    MAX_ANCHOR_COPY_BYTES / (1024 * 1024)
                ),
            ));
        }
        Ok(())
    }

    /// Builds the node that starts with `ev`; returns it with its size.
    fn node(&mut self, ev: Event<'a>, span: Span, depth: usize) -> Built<'a> {
        let p = pos(&span);
        let (node, size, anchor) = match ev {
            Event::Scalar(text, style, anchor, tag) => {
                self.count(&span)?;
                let forced_str = Self::refuse_tag(tag.as_deref(), &span)?;
                let value = if style == ScalarStyle::Plain && !forced_str {
                    resolve_plain(text)
                } else {
                    YValue::Str(text)
                };
                // Text an alias copies: a string's, and an integer too long to read (kept as
                // written, and quoted by the messages about it).
                let bytes = match &value {
                    YValue::Str(s) | YValue::TooBig(s) => s.len(),
                    _ => 0,
                };
                (YNode { pos: p, value }, Size { nodes: 1, bytes }, anchor)
            }
            Event::SequenceStart(_, anchor, tag) => {
                self.count(&span)?;
                Self::refuse_collection_tag(tag.as_deref(), &span, "list")?;
                if depth >= MAX_DEPTH {
                    return Err(Diagnostic::error(p.line, p.column, nesting_message()));
                }
                let mut items = Vec::new();
                let mut size = Size { nodes: 1, bytes: 0 };
                loop {
                    let (ev, sp) = self.next()?;
                    if matches!(ev, Event::SequenceEnd) {
                        break;
                    }
                    let (n, s) = self.node(ev, sp, depth + 1)?;
                    size += s;
                    items.push(n);
                }
                (
                    YNode {
                        pos: p,
                        value: YValue::Seq(items),
                    },
                    size,
                    anchor,
                )
            }
            Event::MappingStart(_, anchor, tag) => {
                self.count(&span)?;
                Self::refuse_collection_tag(tag.as_deref(), &span, "mapping")?;
                if depth >= MAX_DEPTH {
                    return Err(Diagnostic::error(p.line, p.column, nesting_message()));
                }
                let mut entries = Vec::new();
                let mut size = Size { nodes: 1, bytes: 0 };
                loop {
                    let (ev, sp) = self.next()?;
                    if matches!(ev, Event::MappingEnd) {
                        break;
                    }
                    let (k, ks) = self.node(ev, sp, depth + 1)?;
                    let (ev, sp) = self.next()?;
                    let (v, vs) = self.node(ev, sp, depth + 1)?;
                    size += ks;
                    size += vs;
                    entries.push((k, v));
                }
                (
                    YNode {
                        pos: p,
                        value: YValue::Map(entries),
                    },
                    size,
                    anchor,
                )
            }
            Event::Alias(id) => {
                self.aliases += 1;
                if self.aliases > MAX_ALIASES {
                    return Err(Diagnostic::error(
                        p.line,
                        p.column,
                        format!("more than {MAX_ALIASES} aliases are refused"),
                    ));
                }
                let Some((target, size, h)) = self.anchors.get(&id) else {
                    return Err(Diagnostic::error(
                        p.line,
                        p.column,
                        "YAML: alias to an unknown anchor",
                    ));
                };
                let (size, h) = (*size, *h);
                // The copy nests as deep as its anchored node, from here: within the limit too
                // (an alias inside as deep a list built 28 levels, and chained anchors ~550).
                if h > 0 && depth + h > MAX_DEPTH {
                    return Err(Diagnostic::error(p.line, p.column, nesting_message()));
                }
                self.replayed += size.nodes;
                if self.replayed > MAX_ALIAS_REPLAYED_EVENTS {
                    return Err(Diagnostic::error(
                        p.line,
                        p.column,
                        format!(
                            "aliases expand to more than {MAX_ALIAS_REPLAYED_EVENTS} YAML nodes; \
                             alias expansion bombs are refused (write the values out instead)"
                        ),
                    ));
                }
                Self::copy_bytes(&mut self.copied, size.bytes, p)?;
                self.nodes += size.nodes;
                // The copy is positioned where it is used, every node of it (not only its top):
                // a problem inside it is the alias's (a duplicate id in a copied node is at the
                // alias, not at the anchored node's id). Bounded like the copy itself.
                return Ok((placed(target, p), size));
            }
            other => {
                return Err(Diagnostic::error(
                    p.line,
                    p.column,
                    format!("YAML: unexpected {other:?}"),
                ));
            }
        };
        if anchor != 0 {
            if self.anchors.len() >= MAX_ALIASES {
                return Err(Diagnostic::error(
                    p.line,
                    p.column,
                    format!("more than {MAX_ALIASES} anchors are refused"),
                ));
            }
            // The anchored node is copied (for its aliases), used or not: the copy counts against
            // the node limit, so that anchors nested around a large node cannot copy it once
            // per level, unbounded by any alias.
            Self::copy_bytes(&mut self.copied, size.bytes, p)?;
            self.nodes += size.nodes;
            if self.nodes > MAX_YAML_NODES {
                return Err(Diagnostic::error(
                    p.line,
                    p.column,
                    format!(
                        "more than {MAX_YAML_NODES} YAML nodes, counting a copy of each anchored \
                         node, are refused (anchor smaller parts, or write the values out)"
                    ),
                ));
            }
            let h = height(&node);
            self.anchors.insert(anchor, (node.clone(), size, h));
        }
        Ok((node, size))
    }
}

/// How many levels of lists and mappings `n` nests (0 for a scalar). Recursion is as deep as
/// that, at most [`MAX_DEPTH`] (aliases are checked against it where they are used).
fn height(n: &YNode<'_>) -> usize {
    match &n.value {
        YValue::Seq(items) => 1 + items.iter().map(height).max().unwrap_or(0),
        YValue::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| height(k).max(height(v)))
                .max()
                .unwrap_or(0)
        }
        _ => 0,
    }
}

/// A copy of `n` with every node of it at position `p` (an alias's copy), made in one walk.
/// Recursion is as deep as the copied node, at most [`MAX_DEPTH`].
fn placed<'a>(n: &YNode<'a>, p: Pos) -> YNode<'a> {
    let value = match &n.value {
        YValue::Seq(items) => YValue::Seq(items.iter().map(|i| placed(i, p)).collect()),
        YValue::Map(entries) => YValue::Map(
            entries
                .iter()
                .map(|(k, v)| (placed(k, p), placed(v, p)))
                .collect(),
        ),
        scalar => scalar.clone(),
    };
    YNode { pos: p, value }
}

pub(crate) fn nesting_message() -> String {
    format!("nesting deeper than {MAX_DEPTH} levels is refused (format v1 needs at most 5)")
}

fn scan_error(e: &ScanError) -> Diagnostic {
    let m = e.marker();
    let info = e.info();
    if info.contains("recursion limit") || info.contains("nesting") {
        return Diagnostic::error(m.line(), m.col() + 1, nesting_message());
    }
    Diagnostic::error(m.line(), m.col() + 1, format!("YAML: {info}"))
}

/// Text to tree. Hostile input is refused here, before any of it is expanded.
pub(crate) fn parse_tree(text: &str) -> Result<YNode<'_>, Diagnostic> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(Diagnostic::error(
            0,
            0,
            format!(
                "document is {} bytes, over the limit of {} bytes ({} MiB)",
                text.len(),
                MAX_DOCUMENT_BYTES,
                MAX_DOCUMENT_BYTES / (1024 * 1024)
            ),
        ));
    }
    let mut options = Options::default();
    options.emit_comments = false;
    // The parser's own limits sit just above ours, so ours (with the better message) trip first
    // in block style; flow style trips the parser's, which we word the same way.
    options.flow_nesting_limit = MAX_DEPTH + 1;
    options.block_nesting_limit = MAX_DEPTH + 2;
    let mut b = Builder {
        parser: Parser::new_from_str_with_options(text, options),
        anchors: HashMap::new(),
        nodes: 0,
        aliases: 0,
        replayed: 0,
        copied: 0,
    };
    let mut root = None;
    loop {
        let (ev, span) = b.next()?;
        match ev {
            Event::StreamStart | Event::DocumentEnd => {}
            Event::StreamEnd => break,
            Event::DocumentStart(..) if root.is_some() => {
                let p = pos(&span);
                return Err(Diagnostic::error(
                    p.line,
                    p.column,
                    "only one YAML document is allowed per file",
                ));
            }
            Event::DocumentStart(..) => {
                let (ev, span) = b.next()?;
                root = Some(b.node(ev, span, 0)?.0);
            }
            other => {
                let p = pos(&span);
                return Err(Diagnostic::error(
                    p.line,
                    p.column,
                    format!("YAML: unexpected {other:?}"),
                ));
            }
        }
    }
    match root {
        Some(YNode {
            value: YValue::Null,
            ..
        })
        | None => Err(Diagnostic::error(
            1,
            1,
            "empty document (expected a mapping with `version: 1`)",
        )),
        Some(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_keeps_positions_and_core_schema_types() {
        let t = parse_tree(
            "a: 1\nb:\n  - \"x\"\n  - 2.5\nc: NO\nd: [0x1f, 1e3, 12ms, ~, \"1\", 127.0.0.1:70, 0x+1f, 0o-7, 0o17]\n",
        )
        .unwrap_or_else(|d| panic!("{d}"));
        let YValue::Map(m) = &t.value else {
            panic!("not a map: {t:?}")
        };
        assert_eq!(m[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(m[0].1.pos, Pos { line: 1, column: 4 });
        assert_eq!(m[0].1.value, YValue::Int(1));
        assert_eq!(
            m[1].1.value,
            YValue::Seq(vec![
                YNode {
                    pos: Pos { line: 3, column: 5 },
                    value: YValue::Str("x".into())
                },
                YNode {
                    pos: Pos { line: 4, column: 5 },
                    value: YValue::Float(2.5)
                },
            ])
        );
        assert_eq!(m[2].1.value, YValue::Str("NO".into()));
        let YValue::Seq(d) = &m[3].1.value else {
            panic!()
        };
        let values: Vec<&YValue> = d.iter().map(|n| &n.value).collect();
        assert_eq!(
            values,
            [
                &YValue::Int(31),
                &YValue::Float(1000.0),
                &YValue::Str("12ms".into()),
                &YValue::Null,
                &YValue::Str("1".into()),
                &YValue::Str("127.0.0.1:70".into()),
                // A sign after the prefix makes a string, as in YAML 1.2's core schema.
                &YValue::Str("0x+1f".into()),
                &YValue::Str("0o-7".into()),
                &YValue::Int(15)
            ]
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let t = parse_tree("k: [\"日本語\", x]\n").unwrap_or_else(|d| panic!("{d}"));
        let YValue::Map(m) = &t.value else { panic!() };
        let YValue::Seq(items) = &m[0].1.value else {
            panic!()
        };
        assert_eq!(
            items[1].pos,
            Pos {
                line: 1,
                column: 12
            }
        );
    }

    #[test]
    fn one_document_per_file() {
        let d = parse_tree("a: 1\n---\nb: 2\n").expect_err("two documents");
        assert_eq!((d.line, d.column), (2, 1));
        assert!(d.message.contains("only one YAML document"), "{d}");
    }

    #[test]
    fn tags_are_refused_except_str() {
        assert!(parse_tree("a: !!str 12\n").is_ok());
        let d = parse_tree("a: !!binary AAAA\n").expect_err("binary tag");
        assert!(d.message.contains("not supported"), "{d}");
        // `!!str` makes no list or mapping a string (it was ignored there).
        for (text, what) in [
            ("a: !!str [1, 2]\n", "list"),
            ("a: !!str {b: 1}\n", "mapping"),
        ] {
            let d = parse_tree(text).expect_err(text);
            assert_eq!(
                d.message,
                format!("YAML tag \"!!str\" applies to a single value, not to a {what}")
            );
            assert_eq!((d.line, d.column), (1, 10), "{d}");
        }
        let d = parse_tree("a: !!binary [1]\n").expect_err("binary tag on a list");
        assert!(d.message.contains("not supported"), "{d}");
    }

    /// An alias nests its anchored node as deep as it is used: past the limit, refused at the
    /// alias. (Copied without its depth, an alias inside as deep a list built 28 levels.)
    #[test]
    fn an_alias_counts_its_depth_where_it_is_used() {
        let open = "[".repeat(14);
        let close = "]".repeat(14);
        let text = format!("x: &a {open}1{close}\ny: {open}*a{close}\n");
        let d = parse_tree(&text).expect_err("28 levels through an alias");
        assert_eq!(d.message, nesting_message());
        assert_eq!(d.line, 2, "{d}");
        // Within the limit, the same alias is taken.
        let shallow = format!("x: &a {open}1{close}\ny: [*a]\n");
        parse_tree(&shallow).unwrap_or_else(|d| panic!("{d}"));
    }

    #[test]
    fn aliases_are_copied_at_their_use() {
        let t = parse_tree("a: &x {k: [1]}\nb: *x\n").unwrap_or_else(|d| panic!("{d}"));
        let YValue::Map(m) = &t.value else { panic!() };
        let at = Pos { line: 2, column: 4 };
        assert_eq!(m[1].1.pos, at);
        // Every node of the copy is at the alias; the values are the anchored node's.
        let YValue::Map(copy) = &m[1].1.value else {
            panic!()
        };
        let YValue::Seq(items) = &copy[0].1.value else {
            panic!()
        };
        assert_eq!((copy[0].0.pos, copy[0].1.pos, items[0].pos), (at, at, at));
        let anchored = placed(&m[0].1, at);
        assert_eq!(m[1].1, anchored);
    }
}
