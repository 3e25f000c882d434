//! Parameters bound client-side as SQL literals, for the writer's multi-statement queries
//! (Python: `eventstore.db.literals.bind`).
//!
//! The writer sends each commit as one query string, so its parameters are written into the
//! text. Binding them in Python cost about a third of building a one-event commit's statement,
//! with the interpreter's lock held; here it is a few string pushes.
//!
//! Text is written as an escape string constant, `E'…'`, with `\` and `'` doubled: its meaning
//! does not depend on `standard_conforming_strings` (the rule of [`crate::insert_sql`] too).
//! Text never holds NUL (PostgreSQL's text cannot); one that does is refused. A negative
//! integer is written in parentheses: `-9223372036854775808::int8` casts before it negates
//! (and overflows), and after a minus sign a bare `-5` would open a comment. Arrays are written
//! untyped (`ARRAY[…]`, or `'{}'` when empty): the query casts them, as in `%s::uuid[]`.

use std::fmt::Write;

/// A value to bind.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    /// A timestamptz, as the text of its ISO 8601 form.
    Timestamp(&'a str),
    Array(Vec<Literal<'a>>),
}

/// A query or a value that cannot be bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindError(pub String);

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BindError {}

/// The text of `query` between its `%s` placeholders (`%%` stands for `%`): one piece more
/// than there are placeholders. Any other `%` is refused.
pub fn pieces(query: &str) -> Result<Vec<String>, BindError> {
    let mut out = vec![String::new()];
    let mut chars = query.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.last_mut().expect("never empty").push(c);
            continue;
        }
        match chars.next() {
            Some('s') => out.push(String::new()),
            Some('%') => out.last_mut().expect("never empty").push('%'),
            other => {
                return Err(BindError(format!(
                    "query: unsupported placeholder %{}",
                    other.map(String::from).unwrap_or_default()
                )))
            }
        }
    }
    Ok(out)
}

pub fn put_null(sql: &mut String) {
    sql.push_str("NULL");
}

pub fn put_int(sql: &mut String, value: i64) {
    // Writing to a String cannot fail.
    let _ = if value >= 0 {
        write!(sql, "{value}")
    } else {
        write!(sql, "({value})")
    };
}

pub fn put_text(sql: &mut String, text: &str) -> Result<(), BindError> {
    if text.contains('\0') {
        return Err(BindError("text cannot hold NUL".into()));
    }
    put_escaped(sql, text);
    Ok(())
}

/// `text`, known to hold no NUL, as `E'…'`.
pub fn put_escaped(sql: &mut String, text: &str) {
    sql.reserve(text.len() + 3);
    sql.push_str("E'");
    for c in text.chars() {
        match c {
            '\'' => sql.push_str("''"),
            '\\' => sql.push_str("\\\\"),
            c => sql.push(c),
        }
    }
    sql.push('\'');
}

pub fn put_timestamp(sql: &mut String, iso: &str) -> Result<(), BindError> {
    put_text(sql, iso)?;
    sql.push_str("::timestamptz");
    Ok(())
}

/// Open an array of `len` items: the items follow, each after `put_separator`, then
/// `close_array`. An empty one is complete as it is (returns false).
pub fn open_array(sql: &mut String, len: usize) -> bool {
    if len == 0 {
        sql.push_str("'{}'");
        return false;
    }
    sql.push_str("ARRAY[");
    true
}

pub fn put_separator(sql: &mut String, index: usize) {
    if index > 0 {
        sql.push(',');
    }
}

pub fn close_array(sql: &mut String) {
    sql.push(']');
}

pub fn put_literal(sql: &mut String, value: &Literal<'_>) -> Result<(), BindError> {
    match value {
        Literal::Null => put_null(sql),
        Literal::Int(v) => put_int(sql, *v),
        Literal::Text(t) => put_text(sql, t)?,
        Literal::Timestamp(t) => put_timestamp(sql, t)?,
        Literal::Array(items) => {
            if open_array(sql, items.len()) {
                for (i, item) in items.iter().enumerate() {
                    put_separator(sql, i);
                    put_literal(sql, item)?;
                }
                close_array(sql);
            }
        }
    }
    Ok(())
}

/// Check that `pieces` (of [`pieces`]) has room for exactly `count` parameters.
pub fn check_count(pieces: &[String], count: usize) -> Result<(), BindError> {
    let wanted = pieces.len() - 1;
    if wanted == count {
        Ok(())
    } else {
        Err(BindError(format!(
            "query: {wanted} placeholders for {count} parameters"
        )))
    }
}

/// `query` with each `%s` replaced by the literal of the next parameter.
pub fn bind(query: &str, params: &[Literal<'_>]) -> Result<String, BindError> {
    let pieces = pieces(query)?;
    check_count(&pieces, params.len())?;
    let mut sql = String::with_capacity(query.len() + 32 * params.len());
    sql.push_str(&pieces[0]);
    for (param, piece) in params.iter().zip(&pieces[1..]) {
        put_literal(&mut sql, param)?;
        sql.push_str(piece);
    }
    Ok(sql)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn binds_each_kind() {
        let sql = bind(
            "SELECT %s, %s, %s, %s, %s, %s::int8[], %s, 100%%",
            &[
                Literal::Null,
                Literal::Int(42),
                Literal::Int(i64::MIN),
                Literal::Text("it's a \\ test"),
                Literal::Timestamp("2026-11-29T06:01:52.610253+00:00"),
                Literal::Array(vec![Literal::Int(1), Literal::Int(-2)]),
                Literal::Array(vec![]),
            ],
        )
        .unwrap();
        assert_eq!(
            sql,
            "SELECT NULL, 42, (-9223372036854775808), E'it''s a \\\\ test', \
             E'2026-11-29T06:01:52.610253+00:00'::timestamptz, ARRAY[1,(-2)]::int8[], '{}', 100%"
        );
    }

    #[test]
    fn refuses_what_cannot_be_bound() {
        assert!(bind("SELECT %s", &[Literal::Text("a\0b")]).is_err());
        assert!(bind("SELECT %s, %s", &[Literal::Int(1)]).is_err());
        assert!(bind("SELECT %s", &[Literal::Int(1), Literal::Int(2)]).is_err());
        assert!(bind("SELECT %d", &[Literal::Int(1)]).is_err());
        assert!(bind("SELECT 5%", &[]).is_err());
        assert_eq!(bind("", &[]).unwrap(), "");
    }

    proptest! {
        /// Text comes out as one constant whose doubled quotes and backslashes undo to the
        /// input, and nothing after it is part of it.
        #[test]
        fn text_round_trips(text in "[^\u{0}]{0,40}") {
            let sql = bind("%s|", &[Literal::Text(&text)]).unwrap();
            prop_assert!(sql.starts_with("E'") && sql.ends_with("'|"));
            let inner = &sql[2..sql.len() - 2];
            prop_assert_eq!(inner.replace("''", "'").replace("\\\\", "\\"), text.clone());
            // Every quote inside is doubled: the constant does not end early.
            prop_assert_eq!(inner.replace("''", "").matches('\'').count(), 0);
        }
    }
}
