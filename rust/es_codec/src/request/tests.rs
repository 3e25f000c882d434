use super::*;
use crate::testutil::{AppendEventsRequest as Req, AppendEventsResponse, NewEvent};
use prost::Message as _;

const STREAM: &str = "6f9b1c2d-3e4f-4051-8263-748596a7b8c9";
const ID_A: &str = "00000000-0000-4000-8000-00000000000a";
const ID_B: &str = "00000000-0000-4000-8000-00000000000b";
const ID_C: &str = "00000000-0000-4000-8000-00000000000c";
const LIMITS: Limits = Limits {
    max_events: 10,
    max_event_bytes: 1000,
};

fn ev(id: &str, ty: &str, data: &str, meta: &str) -> NewEvent {
    NewEvent::new(id, ty, data, meta)
}

fn req(events: Vec<NewEvent>) -> Req {
    Req {
        stream_id: STREAM.into(),
        stream_type: b"order".to_vec(),
        events,
        expected_version: None,
    }
}

fn one_event() -> Req {
    req(vec![ev("", "created", "{}", "")])
}

fn parse(r: &Req) -> AppendRequest {
    AppendRequest::parse(&r.encode(), LIMITS).unwrap_or_else(|e| panic!("rejected: {e}"))
}

fn reject_raw(raw: &[u8]) -> RequestError {
    match AppendRequest::parse(raw, LIMITS) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    }
}

fn reject(r: &Req) -> String {
    let e = reject_raw(&r.encode());
    assert_eq!(e.kind, ErrorKind::Invalid, "{}", e.message);
    e.message
}

fn reject_too_large(r: &Req) -> String {
    let e = reject_raw(&r.encode());
    assert_eq!(e.kind, ErrorKind::TooLarge, "{}", e.message);
    e.message
}

fn text(id: &[u8; 16]) -> String {
    uuids::to_text(id)
}

#[test]
fn parses_a_valid_request() {
    let mut r = req(vec![
        ev(ID_A, "created", r#"{"a": 1}"#, r#"{"by": "me"}"#),
        ev("", "renamed", "\"x\"", ""),
        ev(&ID_C.to_uppercase(), "deleted", "[1, 2]", " {} "),
    ]);
    r.expected_version = Some(3);
    let p = parse(&r);
    assert_eq!(text(p.stream_id()), STREAM);
    assert_eq!(p.stream_type(), "order");
    assert_eq!(p.expected_version(), Some(3));
    assert_eq!(p.event_count(), 3);
    assert_eq!(p.payload_bytes(), 8 + 12 + 3 + 6 + 4);
    assert!(p.has_client_ids());

    let ids: Vec<String> = p.event_ids().map(text).collect();
    assert_eq!(ids[0], ID_A);
    assert_eq!(ids[2], ID_C);
    let generated = uuid::Uuid::parse_str(&ids[1]).unwrap();
    assert_eq!(generated.get_version_num(), 4);
    assert_eq!(ids[1], ids[1].to_lowercase());
    let client: Vec<String> = p.client_event_ids().map(text).collect();
    assert_eq!(client, [ID_A, ID_C]);

    let e0 = p.event(0).unwrap();
    assert_eq!(e0.event_type, "created");
    assert_eq!(e0.data, br#"{"a": 1}"#);
    assert_eq!(e0.metadata, Some(&br#"{"by": "me"}"#[..]));
    assert!(e0.client_id);
    let e1 = p.event(1).unwrap();
    assert_eq!(e1.metadata, None);
    assert!(!e1.client_id);
    assert_eq!(p.event(2).unwrap().metadata, Some(&b" {} "[..]));
    assert!(p.event(3).is_none());
    assert_eq!(p.events().len(), 3);
}

#[test]
fn without_client_ids_every_id_is_generated_and_distinct() {
    let r = req((0..10).map(|_| ev("", "t", "1", "")).collect());
    let p = parse(&r);
    assert!(!p.has_client_ids());
    assert_eq!(p.client_event_ids().count(), 0);
    let mut ids: Vec<_> = p.event_ids().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10);
}

#[test]
fn many_generated_ids_span_several_random_fills() {
    let limits = Limits {
        max_events: 1000,
        max_event_bytes: 10,
    };
    let mut events: Vec<NewEvent> = (0..300).map(|_| ev("", "t", "1", "")).collect();
    events[70].event_id = ID_A.into();
    let p = AppendRequest::parse(&req(events).encode(), limits).unwrap();
    let mut ids: Vec<_> = p.event_ids().copied().collect();
    assert_eq!(text(&ids[70]), ID_A);
    assert!(ids.iter().all(|id| *id != [0; 16]));
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 300);
}

#[test]
fn expected_version_presence_matters() {
    let mut r = one_event();
    assert_eq!(parse(&r).expected_version(), None);
    for v in [0, -1, 1, i64::MAX] {
        r.expected_version = Some(v);
        assert_eq!(parse(&r).expected_version(), Some(v));
    }
    for v in [-2, -5, i64::MIN] {
        r.expected_version = Some(v);
        assert_eq!(
            reject(&r),
            format!("expected_version: must be -1, 0 or a positive version, got {v}")
        );
    }
}

#[test]
fn stream_id_in_any_case_but_only_in_canonical_form() {
    let mut r = one_event();
    r.stream_id = STREAM.to_uppercase().into();
    assert_eq!(text(parse(&r).stream_id()), STREAM);
    for spelling in [
        STREAM.replace('-', ""),
        format!("{{{STREAM}}}"),
        format!("urn:uuid:{STREAM}"),
    ] {
        r.stream_id = spelling.clone().into();
        assert_eq!(
            reject(&r),
            format!(r#"stream_id: not a UUID: "{spelling}""#)
        );
    }
}

#[test]
fn stream_id_must_be_a_uuid() {
    let mut r = one_event();
    r.stream_id = b"abc".to_vec();
    assert_eq!(reject(&r), r#"stream_id: not a UUID: "abc""#);
    r.stream_id = Vec::new();
    assert_eq!(reject(&r), r#"stream_id: not a UUID: """#);
    r.stream_id = b"a\"b\\c\nd\0".to_vec();
    assert_eq!(
        reject(&r),
        r#"stream_id: not a UUID: "a\"b\\c\u000ad\u0000""#
    );
    r.stream_id = b"\xffx".to_vec();
    assert_eq!(reject(&r), "stream_id: not a UUID: \"\u{fffd}x\"");
    r.stream_id = "é".repeat(100).into();
    assert_eq!(
        reject(&r),
        format!("stream_id: not a UUID: \"{}\"… (200 bytes)", "é".repeat(64))
    );
}

#[test]
fn stream_type_rules() {
    let mut r = one_event();
    r.stream_type = Vec::new();
    assert_eq!(reject(&r), "stream_type: must be 1-255 characters, got 0");
    // 255 two-byte characters are 510 bytes but 255 characters, as VARCHAR(255) counts.
    r.stream_type = "é".repeat(255).into();
    assert_eq!(parse(&r).stream_type(), "é".repeat(255));
    r.stream_type = "é".repeat(256).into();
    assert_eq!(reject(&r), "stream_type: must be 1-255 characters, got 256");
    r.stream_type = "😀".repeat(255).into();
    parse(&r);
    r.stream_type = b"a\0b".to_vec();
    assert_eq!(reject(&r), "stream_type: must not contain U+0000");
    r.stream_type = b"a\xc3".to_vec();
    assert_eq!(reject(&r), "stream_type: not valid UTF-8");
}

#[test]
fn event_count_rules() {
    assert_eq!(
        reject(&req(vec![])),
        "events: at least one event is required"
    );
    let ten: Vec<_> = (0..10).map(|_| ev("", "t", "1", "")).collect();
    parse(&req(ten.clone()));
    let mut eleven = ten;
    eleven.push(ev("", "t", "1", ""));
    assert_eq!(
        reject_too_large(&req(eleven)),
        "events: 11 events, over the limit of 10"
    );
}

#[test]
fn event_id_must_be_a_uuid() {
    let r = req(vec![ev(ID_A, "t", "1", ""), ev("nope", "t", "1", "")]);
    assert_eq!(reject(&r), r#"events[1].event_id: not a UUID: "nope""#);
    let braced = format!("{{{ID_A}}}");
    let r = req(vec![ev(&braced, "t", "1", "")]);
    assert_eq!(
        reject(&r),
        format!(r#"events[0].event_id: not a UUID: "{braced}""#)
    );
    let long = "x".repeat(300);
    let r = req(vec![ev(&long, "t", "1", "")]);
    assert_eq!(
        reject(&r),
        format!(
            "events[0].event_id: not a UUID: \"{}\"… (300 bytes)",
            "x".repeat(64)
        )
    );
}

#[test]
fn duplicate_event_ids() {
    let r = req(vec![ev(ID_A, "t", "1", ""), ev(ID_A, "t", "1", "")]);
    assert_eq!(
        reject(&r),
        "events[1].event_id: duplicate of events[0].event_id"
    );
    // The same id in another letter case is the same id.
    let r = req(vec![
        ev(ID_B, "t", "1", ""),
        ev("", "t", "1", ""),
        ev(&ID_B.to_uppercase(), "t", "1", ""),
    ]);
    assert_eq!(
        reject(&r),
        "events[2].event_id: duplicate of events[0].event_id"
    );
    // The first repetition in request order is reported.
    let r = req(vec![
        ev(ID_A, "t", "1", ""),
        ev(ID_B, "t", "1", ""),
        ev(ID_B, "t", "1", ""),
        ev(ID_A, "t", "1", ""),
    ]);
    assert_eq!(
        reject(&r),
        "events[2].event_id: duplicate of events[1].event_id"
    );
    let r = req(vec![
        ev(ID_C, "t", "1", ""),
        ev(ID_A, "t", "1", ""),
        ev(ID_C, "t", "1", ""),
        ev(ID_A, "t", "1", ""),
        ev(ID_C, "t", "1", ""),
    ]);
    assert_eq!(
        reject(&r),
        "events[2].event_id: duplicate of events[0].event_id"
    );
    let r = req(vec![
        ev(ID_A, "t", "1", ""),
        ev(ID_B, "t", "1", ""),
        ev(ID_C, "t", "1", ""),
    ]);
    assert_eq!(parse(&r).event_count(), 3);
}

#[test]
fn event_type_rules() {
    let r = req(vec![ev("", "ok", "1", ""), ev("", "", "1", "")]);
    assert_eq!(
        reject(&r),
        "events[1].event_type: must be 1-255 characters, got 0"
    );
    let r = req(vec![ev("", &"ж".repeat(256), "1", "")]);
    assert_eq!(
        reject(&r),
        "events[0].event_type: must be 1-255 characters, got 256"
    );
    let r = req(vec![ev("", &"ж".repeat(255), "1", "")]);
    assert_eq!(parse(&r).event(0).unwrap().event_type, "ж".repeat(255));
    let r = req(vec![ev("", "a\0", "1", "")]);
    assert_eq!(reject(&r), "events[0].event_type: must not contain U+0000");
    let mut r = req(vec![ev("", "a", "1", "")]);
    r.events[0].event_type = b"\xfe".to_vec();
    assert_eq!(reject(&r), "events[0].event_type: not valid UTF-8");
}

#[test]
fn data_is_required_json() {
    let r = req(vec![ev("", "t", "1", ""), ev("", "t", "", "")]);
    assert_eq!(
        reject(&r),
        "events[1].data: must not be empty (a JSON value is required)"
    );
    let r = req(vec![
        ev("", "t", "1", ""),
        ev("", "t", "1", ""),
        ev("", "t", "x", ""),
    ]);
    assert_eq!(
        reject(&r),
        "events[2].data: invalid JSON: expected value at line 1 column 1"
    );
    let r = req(vec![ev("", "t", "{} {}", "")]);
    assert_eq!(
        reject(&r),
        "events[0].data: invalid JSON: trailing characters at line 1 column 4"
    );
    let r = req(vec![ev("", "t", r#"{"a": "\u0000"}"#, "")]);
    assert_eq!(
        reject(&r),
        "events[0].data: invalid JSON: strings must not contain \\u0000 (PostgreSQL jsonb \
         rejects it) at line 1 column 14"
    );
    let r = req(vec![ev("", "t", r#"["\udead"]"#, "")]);
    assert_eq!(
        reject(&r),
        "events[0].data: invalid JSON: lone leading surrogate in hex escape at line 1 column 8"
    );
    let r = req(vec![ev("", "t", r#"{"k": "\ud800"}"#, "")]);
    assert_eq!(
        reject(&r),
        "events[0].data: invalid JSON: unexpected end of hex escape at line 1 column 14"
    );
    let mut r = req(vec![ev("", "t", "1", "")]);
    r.events[0].data = b"\"\xff\"".to_vec();
    assert_eq!(
        reject(&r),
        "events[0].data: invalid JSON: invalid unicode code point at line 1 column 2"
    );
    let deep = "[".repeat(200) + &"]".repeat(200);
    let r = req(vec![ev("", "t", &deep, "")]);
    assert!(reject(&r).starts_with("events[0].data: invalid JSON: recursion limit exceeded"));
    // Any JSON value will do.
    for data in ["0", "\"s\"", "null", "[]", "true", "1e400"] {
        parse(&req(vec![ev("", "t", data, "")]));
    }
}

#[test]
fn metadata_is_an_optional_json_object() {
    let r = req(vec![ev("", "t", "1", "[]")]);
    assert_eq!(reject(&r), "events[0].metadata: must be a JSON object");
    let r = req(vec![ev("", "t", "1", "{}"), ev("", "t", "1", "1")]);
    assert_eq!(reject(&r), "events[1].metadata: must be a JSON object");
    let r = req(vec![ev("", "t", "1", "{")]);
    assert_eq!(
        reject(&r),
        "events[0].metadata: invalid JSON: EOF while parsing an object at line 1 column 1"
    );
    let r = req(vec![ev("", "t", "1", r#"{"\u0000": 1}"#)]);
    assert!(reject(&r).starts_with("events[0].metadata: invalid JSON: strings must not contain"));
    // Whitespace only is not "no metadata": only zero bytes is.
    let r = req(vec![ev("", "t", "1", " ")]);
    assert!(reject(&r).starts_with("events[0].metadata: invalid JSON: EOF"));
    let p = parse(&req(vec![ev("", "t", "1", "\n{\"a\": {\"b\": []}}\n")]));
    assert_eq!(
        p.event(0).unwrap().metadata,
        Some(&b"\n{\"a\": {\"b\": []}}\n"[..])
    );
}

#[test]
fn event_size_limit() {
    let data = format!("\"{}\"", "x".repeat(498)); // 500 bytes
    let meta = format!("{{\"m\": \"{}\"}}", "y".repeat(491)); // 500 bytes
    assert_eq!(meta.len(), 500);
    let p = parse(&req(vec![ev("", "t", &data, &meta)]));
    assert_eq!(p.payload_bytes(), 1000);
    let r = req(vec![
        ev("", "t", "1", ""),
        ev("", "t", "1", ""),
        ev("", "t", "1", ""),
        ev(
            "",
            "t",
            &data,
            &format!("{{\"m\": \"{}\"}}", "y".repeat(492)),
        ),
    ]);
    assert_eq!(
        reject_too_large(&r),
        "events[3]: data and metadata are 1001 bytes, over the limit of 1000"
    );
    // Size is checked before JSON validity.
    let r = req(vec![ev("", "t", &"x".repeat(1001), "")]);
    assert_eq!(
        reject_too_large(&r),
        "events[0]: data and metadata are 1001 bytes, over the limit of 1000"
    );
}

#[test]
fn not_a_message() {
    for raw in [
        &b"\xff\xff\xff"[..],
        b"\x0a\x10abc",
        b"\x1a\x03\x0a\x05a",
        b"\x08\x01",
    ] {
        let e = reject_raw(raw);
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert_eq!(
            e.message,
            "request: not a valid AppendEventsRequest message"
        );
    }
    // An empty message is a valid (empty) request: the first problem is its stream id.
    assert_eq!(reject_raw(b"").message, r#"stream_id: not a UUID: """#);
}

#[test]
fn unknown_fields_are_ignored() {
    let mut raw = one_event().encode();
    raw.extend_from_slice(&[0x78, 0x05, 0x82, 0x01, 0x02, b'h', b'i']); // fields 15 and 16
    let p = AppendRequest::parse(&raw, LIMITS).unwrap();
    assert_eq!(p.event_count(), 1);
}

#[test]
fn cheap_checks_come_first() {
    // A JSON error in event 0 loses to a type error in event 1, and to the event count.
    let r = req(vec![ev("", "t", "x", ""), ev("", "", "1", "")]);
    assert_eq!(
        reject(&r),
        "events[1].event_type: must be 1-255 characters, got 0"
    );
    let r = req((0..11).map(|_| ev("", "t", "x", "")).collect());
    assert_eq!(
        reject_too_large(&r),
        "events: 11 events, over the limit of 10"
    );
    // The stream comes before its events.
    let mut r = req(vec![ev("bad", "t", "1", "")]);
    r.stream_type = Vec::new();
    assert_eq!(reject(&r), "stream_type: must be 1-255 characters, got 0");
    // Duplicates before JSON.
    let r = req(vec![ev(ID_A, "t", "x", ""), ev(ID_A, "t", "1", "")]);
    assert_eq!(
        reject(&r),
        "events[1].event_id: duplicate of events[0].event_id"
    );
}

fn decode_response(p: &AppendRequest, fv: i64, fp: i64, t: i64) -> AppendEventsResponse {
    let bytes = p.response(fv, fp, t).unwrap().to_vec();
    let decoded = AppendEventsResponse::decode(&bytes[..]).unwrap();
    // Byte-identical to the reference encoder.
    assert_eq!(decoded.encode_to_vec(), bytes);
    decoded
}

#[test]
fn response_fields() {
    let p = parse(&req(vec![
        ev(ID_A, "t", "1", ""),
        ev("", "t", "1", ""),
        ev(ID_B, "t", "1", ""),
    ]));
    let r = decode_response(&p, 5, 100, 0);
    assert_eq!(r.next_expected_version, 7);
    assert_eq!(r.first_position, 100);
    assert_eq!(r.last_position, 102);
    let ids: Vec<String> = p.event_ids().map(text).collect();
    assert_eq!(r.event_ids, ids);
    assert!(!r.snapshot_due);
}

#[test]
fn snapshot_due_when_versions_cross_a_multiple() {
    let three = parse(&req((0..3).map(|_| ev("", "t", "1", "")).collect()));
    let one = parse(&one_event());
    // (first_version, threshold, due) for 3 events: versions first..first+2.
    for (fv, t, due) in [
        (1, 10, false),  // 1..3
        (8, 10, true),   // 8..10
        (9, 10, true),   // 9..11
        (10, 10, true),  // 10..12
        (11, 10, false), // 11..13
        (18, 10, true),  // 18..20
        (1, 3, true),    // 1..3
        (1, 0, false),
        (1, -4, false),
        (5, 1, true),
    ] {
        assert_eq!(
            decode_response(&three, fv, 1, t).snapshot_due,
            due,
            "{fv} {t}"
        );
    }
    assert!(decode_response(&one, 10, 1, 10).snapshot_due);
    assert!(!decode_response(&one, 11, 1, 10).snapshot_due);
}

#[test]
fn response_rejects_bad_arguments() {
    let p = parse(&one_event());
    assert!(p.response(0, 1, 0).is_err());
    assert!(p.response(1, 0, 0).is_err());
    let two = parse(&req(vec![ev("", "t", "1", ""), ev("", "t", "1", "")]));
    assert!(two.response(i64::MAX, 1, 0).is_err());
    assert!(two.response(1, i64::MAX, 0).is_err());
    assert!(p.response(i64::MAX, i64::MAX, 7).is_ok());
}

#[test]
fn quote_escapes_and_truncates() {
    assert_eq!(quote(b"abc"), "\"abc\"");
    assert_eq!(quote(b"\x7f\t"), "\"\\u007f\\u0009\"");
    assert_eq!(quote(&[b'a'; 64]), format!("\"{}\"", "a".repeat(64)));
    assert_eq!(
        quote(&[b'a'; 65]),
        format!("\"{}\"… (65 bytes)", "a".repeat(64))
    );
}

mod properties {
    use super::*;
    use crate::testutil::{arb_json, arb_json_object};
    use proptest::prelude::*;
    use proptest::sample::Index;

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(
            raw in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let _ = AppendRequest::parse(&raw, LIMITS);
        }

        #[test]
        fn parse_never_panics_on_corrupted_requests(
            flips in proptest::collection::vec((any::<Index>(), any::<u8>()), 1..4),
            cut in any::<Index>(),
        ) {
            let mut raw = req(vec![
                ev(ID_A, "created", r#"{"a": [1, "x"]}"#, r#"{"m": null}"#),
                ev("", "renamed", "2", ""),
            ])
            .encode();
            for (at, byte) in flips {
                let i = at.index(raw.len());
                raw[i] = byte;
            }
            let _ = AppendRequest::parse(&raw, LIMITS);
            let _ = AppendRequest::parse(&raw[..cut.index(raw.len())], LIMITS);
        }

        #[test]
        fn valid_requests_round_trip(
            events in proptest::collection::vec(
                ("[^\u{0}]{1,30}", arb_json(), proptest::option::of(arb_json_object())),
                1..10,
            ),
            expected in proptest::option::of(-1i64..100),
        ) {
            let mut r = req(events
                .iter()
                .map(|(t, d, m)| ev("", t, d, m.as_deref().unwrap_or("")))
                .collect());
            r.expected_version = expected;
            let limits = Limits { max_events: 10, max_event_bytes: 1 << 20 };
            let p = AppendRequest::parse(&r.encode(), limits)
                .map_err(|e| TestCaseError::fail(e.message))?;
            prop_assert_eq!(p.expected_version(), expected);
            prop_assert_eq!(p.event_count(), events.len());
            for (view, (t, d, m)) in p.events().zip(&events) {
                prop_assert_eq!(view.event_type, t.as_str());
                prop_assert_eq!(view.data, d.as_bytes());
                prop_assert_eq!(view.metadata, m.as_deref().map(str::as_bytes));
            }
        }
    }
}

const CALLER: &[u8] = br#"{"name":"vocabulary","key_id":"9f2c4e1a7b3d5e60"}"#;

fn metadata_with_caller(meta: &str) -> serde_json::Value {
    let r = req(vec![ev("", "created", "{}", meta)]);
    let parsed = AppendRequest::parse_with_caller(&r.encode(), LIMITS, Some(CALLER))
        .unwrap_or_else(|e| panic!("rejected: {e}"));
    let doc = parsed.event(0).and_then(|e| e.metadata).expect("metadata");
    assert_eq!(
        json::validate(doc),
        Ok(TopLevel::Object),
        "{}",
        String::from_utf8_lossy(doc)
    );
    serde_json::from_slice(doc).expect("json")
}

#[test]
fn records_the_caller_in_metadata() {
    let caller: serde_json::Value = serde_json::from_slice(CALLER).expect("json");
    assert_eq!(
        metadata_with_caller(""),
        serde_json::json!({ CALLER_KEY: caller })
    );
    assert_eq!(
        metadata_with_caller("{}"),
        serde_json::json!({ CALLER_KEY: caller })
    );
    assert_eq!(
        metadata_with_caller(" \n{ \t} "),
        serde_json::json!({ CALLER_KEY: caller })
    );
    assert_eq!(
        metadata_with_caller(r#" { "a" : [1, {"b": null}], "c": "}" } "#),
        serde_json::json!({ CALLER_KEY: caller, "a": [1, {"b": null}], "c": "}" })
    );
}

#[test]
fn counts_recorded_metadata_in_the_payload_even_when_it_shrinks() {
    // Leading blanks longer than what the caller adds: the metadata gets shorter.
    let meta = format!("{}{{}}", " ".repeat(200));
    let r = req(vec![ev("", "created", "{}", &meta)]);
    let parsed = AppendRequest::parse_with_caller(&r.encode(), LIMITS, Some(CALLER))
        .unwrap_or_else(|e| panic!("rejected: {e}"));
    let doc = parsed.event(0).and_then(|e| e.metadata).expect("metadata");
    assert_eq!(parsed.payload_bytes(), 2 + doc.len());
}

#[test]
fn leaves_metadata_alone_without_a_caller() {
    let r = req(vec![
        ev("", "created", "{}", r#"{"a":1}"#),
        ev("", "x", "{}", ""),
    ]);
    let parsed = parse(&r);
    assert_eq!(
        parsed.event(0).and_then(|e| e.metadata),
        Some(&br#"{"a":1}"#[..])
    );
    assert_eq!(parsed.event(1).and_then(|e| e.metadata), None);
}

#[test]
fn refuses_the_reserved_metadata_key_however_spelled() {
    for meta in [
        r#"{"$eventstore.caller": "me"}"#,
        r#"{"a": 1, "\u0024eventstore.caller": {"name": "admin"}}"#,
        r#"{"a": 1, "$eventstore.caller": 1, "a": 2}"#,
    ] {
        let r = req(vec![
            ev("", "created", "{}", "{}"),
            ev("", "created", "{}", meta),
        ]);
        let message = reject(&r);
        assert!(
            message.starts_with("events[1].metadata: the key"),
            "{message}"
        );
        let e = AppendRequest::parse_with_caller(&r.encode(), LIMITS, Some(CALLER))
            .expect_err("rejected");
        assert_eq!(e.kind, ErrorKind::Invalid);
    }
    // Only the top level is reserved.
    parse(&req(vec![ev(
        "",
        "created",
        "{}",
        r#"{"a": {"$eventstore.caller": 1}}"#,
    )]));
}
