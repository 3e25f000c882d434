//! The SQL text of one `INSERT … VALUES` for a small batch of events.
//!
//! A small batch goes in the same query string as the rest of its transaction, so the whole
//! commit is one round trip (a COPY needs one of its own). Building that text here, with the
//! values inline, costs a few microseconds where binding the same values client-side in
//! Python cost a few hundred, with the interpreter's lock held.
//!
//! Every text value is written as an escape string constant, `E'…'`, with `\` and `'`
//! doubled: its meaning does not depend on `standard_conforming_strings`. The values were
//! validated when the request was parsed (UTF-8, no NUL, JSON by jsonb's rules), and uuids are
//! written from their bytes.

use std::fmt::Write;

use crate::copy_in::{self, CopyInError};
use crate::request::AppendRequest;
use crate::uuids;

pub const PREFIX: &str = "INSERT INTO events (event_id, stream_id, stream_type, version, \
event_type, data, metadata, position, created_at) VALUES ";

/// `INSERT INTO events … VALUES (…), …;` storing every event of `requests`: request `i`'s
/// events at versions `first_versions[i]..`, all of them at consecutive positions from
/// `first_position`, each created at `created_at` (a timestamptz literal's text).
pub fn insert_sql(
    requests: &[&AppendRequest],
    first_versions: &[i64],
    first_position: i64,
    created_at: &str,
) -> Result<String, CopyInError> {
    let plan = copy_in::plan(requests, first_versions, first_position)?;
    if plan.rows == 0 {
        return Err(CopyInError("requests: at least one event is needed".into()));
    }
    let mut sql = String::with_capacity(PREFIX.len() + plan.len * 2 + plan.rows * 160);
    sql.push_str(PREFIX);
    let mut created = String::new();
    put_text(&mut created, created_at);
    let mut position = first_position;
    for (req, &first_version) in requests.iter().zip(first_versions) {
        let stream_id = uuids::to_text(req.stream_id());
        let mut stream_type = String::new();
        put_text(&mut stream_type, req.stream_type());
        let mut version = first_version;
        for ev in req.events() {
            if position != first_position {
                sql.push(',');
            }
            sql.push_str("('");
            sql.push_str(&uuids::to_text(&ev.id));
            sql.push_str("','");
            sql.push_str(&stream_id);
            sql.push_str("',");
            sql.push_str(&stream_type);
            // Writing to a String cannot fail.
            let _ = write!(sql, ",{version},");
            put_text(&mut sql, ev.event_type);
            sql.push(',');
            put_json(&mut sql, ev.data);
            sql.push(',');
            match ev.metadata {
                Some(m) => put_json(&mut sql, m),
                None => sql.push_str("NULL"),
            }
            let _ = write!(sql, ",{position},");
            sql.push_str(&created);
            sql.push(')');
            // `plan` proved neither sequence overflows.
            version = version.wrapping_add(1);
            position = position.wrapping_add(1);
        }
    }
    sql.push(';');
    Ok(sql)
}

/// `E'…'` holding `text`.
fn put_text(sql: &mut String, text: &str) {
    crate::literals::put_escaped(sql, text);
}

/// JSON text (validated UTF-8) as `E'…'`.
fn put_json(sql: &mut String, json: &[u8]) {
    match std::str::from_utf8(json) {
        Ok(text) => put_text(sql, text),
        // Unreachable for a parsed request; NULL would make the insert fail loudly.
        Err(_) => sql.push_str("NULL"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{parsed_request as request, STREAM};

    #[test]
    fn rows_in_order_with_quotes_and_backslashes_escaped() {
        let one = request(
            "it's",
            &[
                (
                    "00000000-0000-4000-8000-000000000001",
                    "a\\b",
                    r#"{"s": "o'k \\ \"q\""}"#,
                    "",
                ),
                (
                    "00000000-0000-4000-8000-000000000002",
                    "B",
                    "1",
                    r#"{"m": 2}"#,
                ),
            ],
        );
        let two = request(
            "T",
            &[("00000000-0000-4000-8000-000000000003", "C", "[]", "")],
        );
        let sql = insert_sql(&[&one, &two], &[5, 1], 41, "2026-11-29 01:02:03.000004+00").unwrap();
        let at = "E'2026-11-29 01:02:03.000004+00'";
        assert_eq!(
            sql,
            format!(
                "{PREFIX}\
                 ('00000000-0000-4000-8000-000000000001','{STREAM}',E'it''s',5,E'a\\\\b',\
                 E'{{\"s\": \"o''k \\\\\\\\ \\\\\"q\\\\\"\"}}',NULL,41,{at}),\
                 ('00000000-0000-4000-8000-000000000002','{STREAM}',E'it''s',6,E'B',E'1',\
                 E'{{\"m\": 2}}',42,{at}),\
                 ('00000000-0000-4000-8000-000000000003','{STREAM}',E'T',1,E'C',E'[]',NULL,\
                 43,{at});"
            )
        );
    }

    #[test]
    fn arguments_are_checked_as_for_copy() {
        let req = request("T", &[("", "t", "1", "")]);
        assert_eq!(
            insert_sql(&[&req], &[0], 1, "now").unwrap_err().0,
            "first_versions[0]: must be at least 1, got 0"
        );
        assert_eq!(
            insert_sql(&[], &[], 1, "now").unwrap_err().0,
            "requests: at least one event is needed"
        );
    }
}
