//! Test-only: the contract's messages as prost structs, an independent implementation of the
//! wire format to build inputs with and to check our hand-rolled encoders against.
//! String fields that tests must be able to fill with invalid UTF-8 are declared `bytes`
//! (same wire type, same bytes).

#![allow(clippy::pedantic)]

use proptest::prelude::*;

#[derive(Clone, PartialEq, prost::Message)]
pub struct NewEvent {
    #[prost(bytes = "vec", tag = "1")]
    pub event_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub event_type: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub metadata: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AppendEventsRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub stream_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub stream_type: Vec<u8>,
    #[prost(message, repeated, tag = "3")]
    pub events: Vec<NewEvent>,
    #[prost(int64, optional, tag = "4")]
    pub expected_version: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AppendEventsResponse {
    #[prost(int64, tag = "1")]
    pub next_expected_version: i64,
    #[prost(int64, tag = "2")]
    pub first_position: i64,
    #[prost(int64, tag = "3")]
    pub last_position: i64,
    #[prost(string, repeated, tag = "4")]
    pub event_ids: Vec<String>,
    #[prost(bool, tag = "5")]
    pub snapshot_due: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(string, tag = "1")]
    pub event_id: String,
    #[prost(string, tag = "2")]
    pub stream_id: String,
    #[prost(string, tag = "3")]
    pub stream_type: String,
    #[prost(int64, tag = "4")]
    pub version: i64,
    #[prost(string, tag = "5")]
    pub event_type: String,
    #[prost(bytes = "vec", tag = "6")]
    pub data: Vec<u8>,
    #[prost(bytes = "vec", tag = "7")]
    pub metadata: Vec<u8>,
    #[prost(message, optional, tag = "8")]
    pub created_at: Option<Timestamp>,
    #[prost(int64, tag = "9")]
    pub position: i64,
}

/// `GetEventsResponse`/`ReadAllResponse`/`EventBatch` reduced to their field 1.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventList {
    #[prost(message, repeated, tag = "1")]
    pub events: Vec<Event>,
}

impl NewEvent {
    pub fn new(event_id: &str, event_type: &str, data: &str, metadata: &str) -> NewEvent {
        NewEvent {
            event_id: event_id.into(),
            event_type: event_type.into(),
            data: data.into(),
            metadata: metadata.into(),
        }
    }
}

impl AppendEventsRequest {
    pub fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(self)
    }
}

/// A JSON text jsonb accepts.
pub fn arb_json() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        any::<String>().prop_map(|s| serde_json::to_string(&s.replace('\0', "")).unwrap()),
        any::<String>().prop_map(|s| escape_all(&s.replace('\0', ""))),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec((".{0,6}", inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| {
                        format!(
                            "{}: {v}",
                            serde_json::to_string(&k.replace('\0', "")).unwrap()
                        )
                    })
                    .collect();
                format!(" {{{}}} ", body.join(", "))
            }),
        ]
    })
}

pub fn arb_json_object() -> impl Strategy<Value = String> {
    proptest::collection::vec(("[a-z]{0,5}", arb_json()), 0..3).prop_map(|kv| {
        let body: Vec<String> = kv
            .into_iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

/// A JSON string literal with every character as `\uXXXX` escapes (surrogate pairs beyond
/// the BMP), which serde_json's own writer never produces.
pub fn escape_all(s: &str) -> String {
    let mut out = String::from("\"");
    let mut units = [0u16; 2];
    for c in s.chars() {
        for u in c.encode_utf16(&mut units) {
            out.push_str(&format!("\\u{u:04X}"));
        }
    }
    out.push('"');
    out
}

/// A stream id for tests that need one.
pub const STREAM: &str = "6f9b1c2d-3e4f-4051-8263-748596a7b8c9";

/// A parsed request on [`STREAM`] with `events` as (event id, type, data, metadata); an
/// empty id is generated, empty metadata is none.
pub fn parsed_request(
    stream_type: &str,
    events: &[(&str, &str, &str, &str)],
) -> crate::request::AppendRequest {
    let r = AppendEventsRequest {
        stream_id: STREAM.into(),
        stream_type: stream_type.as_bytes().to_vec(),
        events: events
            .iter()
            .map(|(id, t, d, m)| NewEvent::new(id, t, d, m))
            .collect(),
        expected_version: None,
    };
    let limits = crate::request::Limits {
        max_events: 100,
        max_event_bytes: 1 << 20,
    };
    crate::request::AppendRequest::parse(&r.encode(), limits).unwrap()
}
