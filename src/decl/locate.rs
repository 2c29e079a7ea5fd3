//! Finding the line of a field in declaration text, for problems found after parsing.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Seg;

pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line of the deepest part of `path` present in `text` (the field itself, or the
/// table that lacks it).
pub fn line_for(text: &str, path: &[Seg]) -> usize {
    deepest(text, path).map_or(1, |(line, _)| line)
}

/// Whether `path` itself is written in `text` (not just a table above it).
pub fn is_written(text: &str, path: &[Seg]) -> bool {
    deepest(text, path).is_some_and(|(_, depth)| depth == path.len())
}

/// The line of the deepest part of `path` present, and how many segments of it were found.
fn deepest(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    let Ok(root) = DeTable::parse(text) else { return None };
    let mut depth = 0;
    let mut span = None;
    let mut current: Option<&Spanned<DeValue<'_>>> = None;
    for seg in path {
        let next = match (seg, current) {
            (Seg::Key(k), None) => {
                root.get_ref().iter().find(|(name, _)| name.get_ref() == k).map(|(_, v)| v)
            }
            (Seg::Key(k), Some(v)) => match v.get_ref() {
                DeValue::Table(t) => t.iter().find(|(name, _)| name.get_ref() == k).map(|(_, v)| v),
                _ => None,
            },
            (Seg::Index(i), Some(v)) => v.get_ref().get(*i),
            (Seg::Index(_), None) => None,
        };
        match next {
            Some(v) => {
                span = Some(v.span());
                current = Some(v);
                depth += 1;
            }
            None => break,
        }
    }
    span.map(|s| (line_of(text, s.start), depth))
}
