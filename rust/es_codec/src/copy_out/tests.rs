use super::*;
use crate::copy_in;
use crate::request::{AppendRequest, Limits};
use crate::testutil::{self, arb_json, arb_json_object, AppendEventsRequest, EventList, NewEvent};
use crate::uuids;
use proptest::prelude::*;
use prost::Message as _;

/// A row as the test owns it, to build COPY input from and compare decoded output with.
#[derive(Debug, Clone, PartialEq)]
struct TestRow {
    event_id: [u8; 16],
    stream_id: [u8; 16],
    stream_type: String,
    version: i64,
    event_type: String,
    data: Vec<u8>,
    metadata: Option<Vec<u8>>,
    created_at_us: i64,
    position: i64,
}

fn sample_row(n: u8) -> TestRow {
    TestRow {
        event_id: [n; 16],
        stream_id: [0xab; 16],
        stream_type: "order".into(),
        version: i64::from(n) + 1,
        event_type: "created".into(),
        data: br#"{"n": 1}"#.to_vec(),
        metadata: n.is_multiple_of(2).then(|| br#"{"m": true}"#.to_vec()),
        created_at_us: 800_000_000_000_000 + i64::from(n),
        position: 1000 + i64::from(n),
    }
}

fn put_field(buf: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(v) => {
            buf.extend_from_slice(&i32::try_from(v.len()).unwrap().to_be_bytes());
            buf.extend_from_slice(v);
        }
    }
}

fn jsonb(json: &[u8]) -> Vec<u8> {
    let mut v = vec![1u8];
    v.extend_from_slice(json);
    v
}

fn header() -> Vec<u8> {
    let mut buf = SIGNATURE.to_vec();
    buf.extend_from_slice(&[0; 8]);
    buf
}

fn put_row(buf: &mut Vec<u8>, r: &TestRow) {
    buf.extend_from_slice(&9i16.to_be_bytes());
    put_field(buf, Some(&r.event_id));
    put_field(buf, Some(&r.stream_id));
    put_field(buf, Some(r.stream_type.as_bytes()));
    put_field(buf, Some(&r.version.to_be_bytes()));
    put_field(buf, Some(r.event_type.as_bytes()));
    put_field(buf, Some(&jsonb(&r.data)));
    put_field(buf, r.metadata.as_deref().map(jsonb).as_deref());
    put_field(buf, Some(&r.created_at_us.to_be_bytes()));
    put_field(buf, Some(&r.position.to_be_bytes()));
}

/// What `COPY ... TO STDOUT (FORMAT BINARY)` sends for these rows.
fn copy_of(rows: &[TestRow]) -> Vec<u8> {
    let mut buf = header();
    for r in rows {
        put_row(&mut buf, r);
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    buf
}

fn owned(row: &Row<'_>) -> TestRow {
    TestRow {
        event_id: row.event_id,
        stream_id: row.stream_id,
        stream_type: row.stream_type.to_owned(),
        version: row.version,
        event_type: row.event_type.to_owned(),
        data: row.data.to_vec(),
        metadata: row.metadata.map(<[u8]>::to_vec),
        created_at_us: row.created_at_us,
        position: row.position,
    }
}

/// The `Event` a row should become, computed independently of `proto.rs`.
fn expected_event(r: &TestRow) -> testutil::Event {
    let unix_us = i128::from(r.created_at_us) + 946_684_800_000_000;
    testutil::Event {
        event_id: uuids::to_text(&r.event_id),
        stream_id: uuids::to_text(&r.stream_id),
        stream_type: r.stream_type.clone(),
        version: r.version,
        event_type: r.event_type.clone(),
        data: r.data.clone(),
        metadata: r.metadata.clone().unwrap_or_default(),
        created_at: Some(testutil::Timestamp {
            seconds: i64::try_from(unix_us.div_euclid(1_000_000)).unwrap(),
            nanos: i32::try_from(unix_us.rem_euclid(1_000_000) * 1000).unwrap(),
        }),
        position: r.position,
    }
}

fn err_of(buf: &[u8]) -> String {
    match rows(buf).and_then(Iterator::collect::<Result<Vec<_>, _>>) {
        Ok(rows) => panic!("accepted {} rows", rows.len()),
        Err(e) => e.0,
    }
}

// ----------------------------------------------------------------------------------------
// Well-formed input

#[test]
fn decodes_rows() {
    let rows_in = [sample_row(0), sample_row(1), sample_row(2)];
    let buf = copy_of(&rows_in);
    let decoded: Vec<TestRow> = all_rows(&buf).unwrap().iter().map(owned).collect();
    assert_eq!(decoded, rows_in);
}

#[test]
fn empty_result() {
    assert_eq!(all_rows(&copy_of(&[])).unwrap(), vec![]);
    let (bytes, page) = encode_page(&copy_of(&[]), 10, 1000).unwrap();
    assert!(bytes.is_empty());
    assert_eq!(page, Page::default());
}

#[test]
fn header_extension_and_non_critical_flags_are_skipped() {
    let mut buf = SIGNATURE.to_vec();
    buf.extend_from_slice(&0x0000_0001u32.to_be_bytes());
    buf.extend_from_slice(&3i32.to_be_bytes());
    buf.extend_from_slice(b"xyz");
    put_row(&mut buf, &sample_row(4));
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    assert_eq!(owned(&all_rows(&buf).unwrap()[0]), sample_row(4));
}

#[test]
fn event_bytes_match_the_reference_encoder() {
    let rows_in = [sample_row(0), sample_row(1)];
    let (bytes, page) = encode_page(&copy_of(&rows_in), 10, usize::MAX).unwrap();
    assert_eq!(page.rows, 2);
    assert_eq!(page.len, bytes.len());
    assert_eq!((page.last_version, page.last_position), (2, 1001));
    assert!(!page.more);
    let expected = EventList {
        events: rows_in.iter().map(expected_event).collect(),
    };
    assert_eq!(bytes, expected.encode_to_vec());
    let decoded = EventList::decode(&bytes[..]).unwrap();
    assert_eq!(decoded, expected);
}

#[test]
fn defaults_are_omitted_and_created_at_is_always_present() {
    let row = TestRow {
        event_id: [0; 16],
        stream_id: [0; 16],
        stream_type: String::new(),
        version: 0,
        event_type: String::new(),
        data: Vec::new(),
        metadata: None,
        created_at_us: -946_684_800_000_000, // the Unix epoch: seconds 0, nanos 0
        position: 0,
    };
    let rows_in = [row];
    let buf = copy_of(&rows_in);
    let ev = encode_event(&all_rows(&buf).unwrap()[0]);
    let mut expected = vec![0x0a, 36];
    expected.extend_from_slice(b"00000000-0000-0000-0000-000000000000");
    expected.extend_from_slice(&[0x12, 36]);
    expected.extend_from_slice(b"00000000-0000-0000-0000-000000000000");
    expected.extend_from_slice(&[0x42, 0x00]);
    assert_eq!(ev, expected);
    assert_eq!(ev, expected_event(&rows_in[0]).encode_to_vec());
}

#[test]
fn event_list_entries_are_bare_events() {
    let rows_in = [sample_row(5), sample_row(6)];
    let buf = copy_of(&rows_in);
    for (row, r) in all_rows(&buf).unwrap().iter().zip(&rows_in) {
        assert_eq!(encode_event(row), expected_event(r).encode_to_vec());
        assert_eq!(row.position, r.position);
    }
}

#[test]
fn page_limits() {
    let rows_in: Vec<TestRow> = (0..5).map(sample_row).collect();
    let buf = copy_of(&rows_in);
    let sizes: Vec<usize> = rows_in
        .iter()
        .map(|r| {
            let ev = expected_event(r).encode_to_vec();
            1 + prost::length_delimiter_len(ev.len()) + ev.len()
        })
        .collect();
    let (full, page) = encode_page(&buf, 5, usize::MAX).unwrap();
    assert_eq!((page.rows, page.more), (5, false));
    assert_eq!(full.len(), sizes.iter().sum::<usize>());

    // Count limit.
    let (bytes, page) = encode_page(&buf, 2, usize::MAX).unwrap();
    assert_eq!((page.rows, page.more), (2, true));
    assert_eq!((page.last_version, page.last_position), (2, 1001));
    assert_eq!(bytes, full[..sizes[0] + sizes[1]]);

    // Byte limit: exactly three rows fit.
    let three = sizes[0] + sizes[1] + sizes[2];
    let (bytes, page) = encode_page(&buf, 100, three).unwrap();
    assert_eq!((page.rows, page.more, bytes.len()), (3, true, three));
    let (_, page) = encode_page(&buf, 100, three - 1).unwrap();
    assert_eq!(page.rows, 2);

    // The first row always goes, however small the byte limit.
    let (bytes, page) = encode_page(&buf, 100, 0).unwrap();
    assert_eq!((page.rows, page.more, bytes.len()), (1, true, sizes[0]));

    // A count of 0 encodes nothing but reports that rows remain.
    let (bytes, page) = encode_page(&buf, 0, usize::MAX).unwrap();
    assert_eq!((page.rows, page.more, bytes.len()), (0, true, 0));
    assert_eq!((page.last_version, page.last_position), (0, 0));
}

#[test]
fn rows_after_the_page_are_still_validated() {
    let mut buf = header();
    put_row(&mut buf, &sample_row(0));
    put_row(&mut buf, &sample_row(1));
    buf.extend_from_slice(&[0, 8]); // a third row of 8 columns
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    assert_eq!(
        plan_page(&buf, 1, usize::MAX).unwrap_err().0,
        "COPY data: row 2: expected 9 columns, got 8"
    );
}

// ----------------------------------------------------------------------------------------
// Malformed input

#[test]
fn rejects_bad_headers() {
    assert_eq!(err_of(b""), "COPY data: missing the binary COPY signature");
    assert_eq!(
        err_of(b"PGCOPY\n\xff\r\n"),
        "COPY data: missing the binary COPY signature"
    );
    assert_eq!(
        err_of(b"PGCOPY\n\xff\r\n\x01\0\0\0\0"),
        "COPY data: missing the binary COPY signature"
    );
    assert_eq!(
        err_of(b"PGCOPY\n\xff\r\n\0\0\0"),
        "COPY data: header truncated"
    );
    assert_eq!(
        err_of(b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0"),
        "COPY data: header truncated"
    );
    let mut oids = SIGNATURE.to_vec();
    oids.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    assert_eq!(
        err_of(&oids),
        "COPY data: unsupported header flags 0x00010000"
    );
    let mut neg = SIGNATURE.to_vec();
    neg.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xfe]);
    assert_eq!(
        err_of(&neg),
        "COPY data: invalid header extension length -2"
    );
    let mut long = SIGNATURE.to_vec();
    long.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 9, 1, 2]);
    assert_eq!(err_of(&long), "COPY data: header extension truncated");
}

#[test]
fn rejects_missing_or_extra_trailer() {
    let mut buf = copy_of(&[sample_row(0)]);
    buf.truncate(buf.len() - 2);
    assert_eq!(
        err_of(&buf),
        "COPY data: input ends after 1 rows without the end-of-data marker"
    );
    let mut buf = copy_of(&[sample_row(0)]);
    buf.push(0);
    assert_eq!(
        err_of(&buf),
        "COPY data: 1 bytes after the end-of-data marker"
    );
    // A lone byte where a column count should be.
    let mut buf = header();
    buf.push(0);
    assert_eq!(
        err_of(&buf),
        "COPY data: input ends after 0 rows without the end-of-data marker"
    );
}

#[test]
fn rejects_every_truncation() {
    let buf = copy_of(&[sample_row(0), sample_row(1), sample_row(2)]);
    for n in 0..buf.len() {
        let cut = &buf[..n];
        assert!(
            rows(cut)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .is_err(),
            "{n}"
        );
        assert!(plan_page(cut, 10, 1000).is_err());
    }
}

fn row_with(edit: impl FnOnce(&mut Vec<Option<Vec<u8>>>)) -> Vec<u8> {
    let r = sample_row(0);
    let mut cols: Vec<Option<Vec<u8>>> = vec![
        Some(r.event_id.to_vec()),
        Some(r.stream_id.to_vec()),
        Some(r.stream_type.into_bytes()),
        Some(r.version.to_be_bytes().to_vec()),
        Some(r.event_type.into_bytes()),
        Some(jsonb(&r.data)),
        r.metadata.as_deref().map(jsonb),
        Some(r.created_at_us.to_be_bytes().to_vec()),
        Some(r.position.to_be_bytes().to_vec()),
    ];
    edit(&mut cols);
    let mut buf = header();
    buf.extend_from_slice(&i16::try_from(cols.len()).unwrap().to_be_bytes());
    for c in &cols {
        put_field(&mut buf, c.as_deref());
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    buf
}

#[test]
fn rejects_wrong_column_counts() {
    assert_eq!(
        err_of(&row_with(|c| {
            c.pop();
        })),
        "COPY data: row 0: expected 9 columns, got 8"
    );
    assert_eq!(
        err_of(&row_with(|c| c.push(None))),
        "COPY data: row 0: expected 9 columns, got 10"
    );
    let mut zero = header();
    zero.extend_from_slice(&[0, 0, 0xff, 0xff]);
    assert_eq!(err_of(&zero), "COPY data: row 0: expected 9 columns, got 0");
    // The second row is the bad one.
    let mut buf = header();
    put_row(&mut buf, &sample_row(0));
    buf.extend_from_slice(&[0x7f, 0xff]);
    assert_eq!(
        err_of(&buf),
        "COPY data: row 1: expected 9 columns, got 32767"
    );
}

#[test]
fn rejects_bad_values() {
    type Edit = Box<dyn FnOnce(&mut Vec<Option<Vec<u8>>>)>;
    let cases: [(Edit, &str); 12] = [
        (
            Box::new(|c| c[0] = Some(vec![1; 15])),
            "row 0, column event_id: a uuid is 16 bytes, got 15",
        ),
        (
            Box::new(|c| c[1] = None),
            "row 0, column stream_id: unexpected NULL",
        ),
        (
            Box::new(|c| c[2] = Some(vec![0xff])),
            "row 0, column stream_type: not valid UTF-8",
        ),
        (
            Box::new(|c| c[2] = None),
            "row 0, column stream_type: unexpected NULL",
        ),
        (
            Box::new(|c| c[3] = Some(vec![0; 4])),
            "row 0, column version: an int8 is 8 bytes, got 4",
        ),
        (
            Box::new(|c| c[4] = Some(b"a\xc3".to_vec())),
            "row 0, column event_type: not valid UTF-8",
        ),
        (
            Box::new(|c| c[5] = None),
            "row 0, column data: unexpected NULL",
        ),
        (
            Box::new(|c| c[5] = Some(vec![])),
            "row 0, column data: empty jsonb value",
        ),
        (
            Box::new(|c| c[5] = Some(b"\x02{}".to_vec())),
            "row 0, column data: unknown jsonb version 2",
        ),
        (
            Box::new(|c| c[6] = Some(b"{}".to_vec())),
            "row 0, column metadata: unknown jsonb version 123",
        ),
        (
            Box::new(|c| c[7] = Some(vec![0; 9])),
            "row 0, column created_at: an int8 is 8 bytes, got 9",
        ),
        (
            Box::new(|c| c[8] = None),
            "row 0, column position: unexpected NULL",
        ),
    ];
    for (edit, msg) in cases {
        assert_eq!(err_of(&row_with(edit)), format!("COPY data: {msg}"));
    }
    // A NULL metadata is fine.
    let buf = row_with(|c| c[6] = None);
    assert_eq!(all_rows(&buf).unwrap()[0].metadata, None);
}

#[test]
fn rejects_bad_lengths() {
    // A negative length other than -1.
    let mut buf = header();
    buf.extend_from_slice(&9i16.to_be_bytes());
    buf.extend_from_slice(&(-2i32).to_be_bytes());
    assert_eq!(
        err_of(&buf),
        "COPY data: row 0, column event_id: invalid length -2"
    );
    // A length past the end.
    let mut buf = header();
    buf.extend_from_slice(&9i16.to_be_bytes());
    buf.extend_from_slice(&i32::MAX.to_be_bytes());
    buf.extend_from_slice(&[0; 20]);
    assert_eq!(
        err_of(&buf),
        "COPY data: row 0, column event_id: truncated: 2147483647 bytes announced, 20 left"
    );
    // A length field cut short.
    let mut buf = header();
    buf.extend_from_slice(&9i16.to_be_bytes());
    put_field(&mut buf, Some(&[0; 16]));
    buf.extend_from_slice(&[0, 0]);
    assert_eq!(
        err_of(&buf),
        "COPY data: row 0, column stream_id: truncated before its length"
    );
}

// ----------------------------------------------------------------------------------------
// Properties

fn arb_row() -> impl Strategy<Value = TestRow> {
    (
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        ".{0,12}",
        any::<i64>(),
        ".{0,12}",
        proptest::collection::vec(any::<u8>(), 0..40),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        any::<i64>(),
        any::<i64>(),
    )
        .prop_map(
            |(
                event_id,
                stream_id,
                stream_type,
                version,
                event_type,
                data,
                metadata,
                created,
                pos,
            )| {
                TestRow {
                    event_id,
                    stream_id,
                    stream_type,
                    version,
                    event_type,
                    data,
                    metadata,
                    created_at_us: created,
                    position: pos,
                }
            },
        )
}

/// (event_id or empty, event_type, data, metadata or empty)
type ArbEvent = (Option<[u8; 16]>, String, String, Option<String>);

fn arb_request() -> impl Strategy<Value = ([u8; 16], String, Vec<ArbEvent>)> {
    (
        any::<[u8; 16]>(),
        "[^\u{0}]{1,20}",
        proptest::collection::vec(
            (
                proptest::option::of(any::<[u8; 16]>()),
                "[^\u{0}]{1,20}",
                arb_json(),
                proptest::option::of(arb_json_object()),
            ),
            1..6,
        ),
    )
}

proptest! {
    #[test]
    fn copy_in_round_trips_through_the_copy_out_decoder(
        reqs in proptest::collection::vec(arb_request(), 0..5),
        first_versions in proptest::collection::vec(1i64..1_000_000, 5),
        first_position in 1i64..i64::MAX / 2,
        created_at_us in any::<i64>(),
    ) {
        let parsed: Vec<AppendRequest> = reqs
            .iter()
            .map(|(sid, st, evs)| {
                let msg = AppendEventsRequest {
                    // Client ids in upper case: the stored ids are the bytes either way.
                    stream_id: uuids::to_text(sid).to_uppercase().into_bytes(),
                    stream_type: st.clone().into_bytes(),
                    events: evs
                        .iter()
                        .enumerate()
                        .map(|(k, (id, ty, data, meta))| NewEvent {
                            // Make client ids distinct within the request.
                            event_id: id
                                .map(|mut id| {
                                    id[0] = u8::try_from(k).unwrap();
                                    uuids::to_text(&id).into_bytes()
                                })
                                .unwrap_or_default(),
                            event_type: ty.clone().into_bytes(),
                            data: data.clone().into_bytes(),
                            metadata: meta.clone().unwrap_or_default().into_bytes(),
                        })
                        .collect(),
                    expected_version: None,
                };
                let limits = Limits { max_events: 100, max_event_bytes: 1 << 20 };
                AppendRequest::parse(&msg.encode(), limits)
                    .map_err(|e| e.message)
            })
            .collect::<Result<_, _>>()
            .map_err(TestCaseError::fail)?;
        let refs: Vec<&AppendRequest> = parsed.iter().collect();
        let fvs = &first_versions[..refs.len()];
        let bytes = copy_in::encode(&refs, fvs, first_position, created_at_us).unwrap();
        let decoded = all_rows(&bytes).unwrap();

        let mut k = 0usize;
        let mut position = first_position;
        for (((sid, st, evs), req), fv) in reqs.iter().zip(&parsed).zip(fvs) {
            for (j, (id, ty, data, meta)) in evs.iter().enumerate() {
                let row = &decoded[k];
                let got_id = row.event_id;
                if let Some(id) = id {
                    let mut want = *id;
                    want[0] = u8::try_from(j).unwrap();
                    prop_assert_eq!(got_id, want);
                } else {
                    prop_assert_eq!(uuid::Uuid::from_bytes(got_id).get_version_num(), 4);
                }
                prop_assert_eq!(got_id, req.event(j).unwrap().id);
                prop_assert_eq!(row.stream_id, *sid);
                prop_assert_eq!(row.stream_type, st.as_str());
                prop_assert_eq!(row.version, fv + i64::try_from(j).unwrap());
                prop_assert_eq!(row.event_type, ty.as_str());
                prop_assert_eq!(row.data, data.as_bytes());
                prop_assert_eq!(row.metadata, meta.as_deref().map(str::as_bytes));
                prop_assert_eq!(row.created_at_us, created_at_us);
                prop_assert_eq!(row.position, position);
                k += 1;
                position += 1;
            }
        }
        prop_assert_eq!(k, decoded.len());
    }

    #[test]
    fn events_decode_to_the_same_values(rows_in in proptest::collection::vec(arb_row(), 0..8)) {
        let buf = copy_of(&rows_in);
        let (bytes, page) = encode_page(&buf, usize::MAX, usize::MAX).unwrap();
        prop_assert_eq!(page.rows, rows_in.len());
        prop_assert!(!page.more);
        let decoded = EventList::decode(&bytes[..]).unwrap();
        let expected: Vec<testutil::Event> = rows_in.iter().map(expected_event).collect();
        prop_assert_eq!(&decoded.events, &expected);
        // Byte-identical to a reference proto3 encoder, not just equivalent.
        prop_assert_eq!(&bytes, &EventList { events: expected }.encode_to_vec());
        if let Some(last) = rows_in.last() {
            prop_assert_eq!((page.last_version, page.last_position), (last.version, last.position));
        }
        for (row, r) in all_rows(&buf).unwrap().iter().zip(&rows_in) {
            prop_assert_eq!(encode_event(row), expected_event(r).encode_to_vec());
        }
    }

    #[test]
    fn pages_are_greedy_prefixes(
        rows_in in proptest::collection::vec(arb_row(), 0..8),
        max_count in 0usize..10,
        max_bytes in 0usize..2000,
    ) {
        let buf = copy_of(&rows_in);
        let (full, _) = encode_page(&buf, usize::MAX, usize::MAX).unwrap();
        let (bytes, page) = encode_page(&buf, max_count, max_bytes).unwrap();
        prop_assert!(full.starts_with(&bytes));
        prop_assert_eq!(page.len, bytes.len());
        prop_assert!(page.rows <= max_count);
        prop_assert_eq!(page.more, page.rows < rows_in.len());
        if page.rows > 1 {
            prop_assert!(bytes.len() <= max_bytes);
        }
        if page.more && page.rows < max_count {
            // Stopped by size: one more row would not have fit.
            let (next, _) = encode_page(&buf, page.rows + 1, usize::MAX).unwrap();
            prop_assert!(next.len() > max_bytes);
        }
        if page.rows == 0 {
            prop_assert!(max_count == 0 || rows_in.is_empty());
        }
    }

    #[test]
    fn garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut buf = header();
        buf.extend_from_slice(&tail);
        let _ = all_rows(&buf);
        let _ = plan_page(&buf, 3, 100);
        let _ = all_rows(&tail);
    }

    #[test]
    fn corruption_never_panics(
        rows_in in proptest::collection::vec(arb_row(), 1..4),
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<proptest::sample::Index>(),
    ) {
        let mut buf = copy_of(&rows_in);
        for (at, byte) in flips {
            let i = at.index(buf.len());
            buf[i] = byte;
        }
        let _ = encode_page(&buf, 10, 10_000);
        let n = cut.index(buf.len());
        let _ = encode_page(&buf[..n], 10, 10_000);
    }
}
