//! JSON validation by PostgreSQL jsonb's rules, without building a document tree.
//!
//! Event data and metadata are stored as jsonb exactly as the client sent them, so anything
//! jsonb would refuse must be refused here, at request time, as a client error — not later as a
//! failed COPY that takes the whole batch down with it. jsonb is stricter than RFC 8259 in
//! three ways we check beyond serde_json's syntax, UTF-8 and surrogate checks:
//!
//! * no string (key or value) may contain U+0000;
//! * numbers are PostgreSQL `numeric`s: at most 16383 digits after the decimal point and a
//!   magnitude below 10^131072 (`value overflows numeric format` otherwise);
//! * nesting is limited by the server's stack; serde_json's limit of 128 levels is stricter,
//!   so that one is what we enforce.
//!
//! serde_json is built with `arbitrary_precision`, so numbers that do not fit an `i64`/`u64`
//! reach the visitor as their text (as a one-entry map keyed by [`NUMBER_TOKEN`]) instead of
//! being rejected for not fitting an `f64`: `1e400` is fine for jsonb.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// The key under which serde_json (with `arbitrary_precision`) hands over a number's text.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// PostgreSQL's `NUMERIC_DSCALE_MAX`: digits after the decimal point.
const PG_MAX_DSCALE: i64 = 0x3FFF;
/// Highest decimal exponent of a numeric's leading digit: the base-10000 weight is an int16.
const PG_MAX_DECIMAL_WEIGHT: i64 = 4 * (i16::MAX as i64) + 3;
/// `numeric_in` refuses an exponent above `PG_INT32_MAX / 2` in either direction.
const PG_MAX_EXPONENT: i64 = (i32::MAX / 2) as i64;

/// What the top level of a valid document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopLevel {
    Object,
    Other,
}

/// Why a document is not valid for jsonb: a plain phrase such as
/// `expected value at line 1 column 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError(pub String);

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks that `doc` is one JSON value (surrounding whitespace allowed) that jsonb accepts.
pub fn validate(doc: &[u8]) -> Result<TopLevel, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(doc);
    Check { number_text: false }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| JsonError(e.to_string()))?;
    // The document is valid, so its first non-blank byte says what the top level is. (Asking
    // the visitor instead would mistake a big number, delivered as a map, for an object.)
    let first = doc
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    Ok(if first == Some(&b'{') {
        TopLevel::Object
    } else {
        TopLevel::Other
    })
}

/// Whether the top level of `doc`, a document `validate` accepted as an object, has the key
/// `key` (compared after JSON unescaping, so `"\u0024x"` is the key `$x`).
pub fn object_has_key(doc: &[u8], key: &str) -> bool {
    struct Find<'k>(&'k str);

    impl<'de> Visitor<'de> for Find<'_> {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut found = false;
            while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                found |= k == self.0;
                map.next_value::<de::IgnoredAny>()?;
            }
            Ok(found)
        }
    }

    let mut de = serde_json::Deserializer::from_slice(doc);
    de::Deserializer::deserialize_map(&mut de, Find(key)).unwrap_or(false)
}

/// Walks one value. `number_text`: the value is (almost surely) a number's text handed over by
/// serde_json under [`NUMBER_TOKEN`], to be checked against numeric's limits.
#[derive(Clone, Copy)]
struct Check {
    number_text: bool,
}

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        check_str(v)?;
        if self.number_text && !numeric_in_range(v) {
            return Err(E::custom(
                "number out of range for PostgreSQL numeric (jsonb)",
            ));
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Check { number_text: false })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(is_number) = map.next_key_seed(Key)? {
            map.next_value_seed(Check {
                number_text: is_number,
            })?;
        }
        Ok(())
    }
}

/// Walks one object key; yields whether it is serde_json's number marker.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for Key {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        check_str(v)?;
        Ok(v == NUMBER_TOKEN)
    }
}

fn check_str<E: de::Error>(v: &str) -> Result<(), E> {
    if v.as_bytes().contains(&0) {
        return Err(E::custom(
            "strings must not contain \\u0000 (PostgreSQL jsonb rejects it)",
        ));
    }
    Ok(())
}

/// Whether PostgreSQL's `numeric_in` (which jsonb uses for numbers) accepts this number text.
///
/// Mirrors `set_var_from_str` + `make_result`: the display scale (digits after the point,
/// after applying the exponent) must fit 14 bits and the base-10000 weight of the leading
/// non-zero digit an int16. Text that is not a JSON number passes: it can only come from an
/// object whose key happens to be serde_json's marker, and it is a plain string then.
fn numeric_in_range(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let int_start = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int_digits = &b[int_start..i];
    let mut frac_digits: &[u8] = &[];
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac_digits = &b[start..i];
    }
    let mut exponent: i64 = 0;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let negative = b.get(i) == Some(&b'-');
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !b.get(i).is_some_and(u8::is_ascii_digit) {
            return true; // not a number
        }
        while let Some(d) = b.get(i).filter(|d| d.is_ascii_digit()) {
            exponent = exponent * 10 + i64::from(d - b'0');
            if exponent > PG_MAX_EXPONENT {
                return false;
            }
            i += 1;
        }
        if negative {
            exponent = -exponent;
        }
    }
    if int_digits.is_empty() || i != b.len() {
        return true; // not a number
    }
    // Both lengths are bounded by the document size and the exponent by PG_MAX_EXPONENT, so
    // none of this arithmetic can overflow an i64.
    let (Ok(int_len), Ok(frac_len)) = (
        i64::try_from(int_digits.len()),
        i64::try_from(frac_digits.len()),
    ) else {
        return false;
    };
    if frac_len - exponent > PG_MAX_DSCALE {
        return false;
    }
    match int_digits
        .iter()
        .chain(frac_digits)
        .position(|&d| d != b'0')
    {
        None => true, // zero: its weight is 0 whatever the exponent
        Some(k) => {
            let Ok(k) = i64::try_from(k) else {
                return false;
            };
            int_len - 1 - k + exponent <= PG_MAX_DECIMAL_WEIGHT
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(doc: &str) -> TopLevel {
        validate(doc.as_bytes()).unwrap_or_else(|e| panic!("{doc:?} rejected: {e}"))
    }

    fn err(doc: &[u8]) -> String {
        match validate(doc) {
            Ok(_) => panic!("{:?} accepted", String::from_utf8_lossy(doc)),
            Err(e) => e.0,
        }
    }

    #[test]
    fn accepts_any_json_value() {
        assert_eq!(ok("{}"), TopLevel::Object);
        assert_eq!(
            ok(" \t\r\n{\"a\": [1, 2.5, -3e-7, true, false, null, \"x\"]} \n"),
            TopLevel::Object
        );
        for doc in [
            "[]",
            "[{}]",
            "0",
            "-0",
            "1.5",
            "\"\"",
            "\"text\"",
            "null",
            "true",
            "false",
            "[1,[2,[3]]]",
        ] {
            assert_eq!(ok(doc), TopLevel::Other, "{doc}");
        }
    }

    #[test]
    fn accepts_unicode_and_valid_surrogate_pairs() {
        ok("\"\\ud83d\\ude00 😀 é \\u00e9 \\u0001 \\\" \\\\ \\/ \\b\\f\\n\\r\\t\"");
        ok("{\"\\ud83d\\ude00\": \"ключ\"}");
    }

    #[test]
    fn rejects_syntax_errors_with_position() {
        assert_eq!(err(b""), "EOF while parsing a value at line 1 column 0");
        assert_eq!(err(b"   "), "EOF while parsing a value at line 1 column 3");
        assert_eq!(err(b"nope"), "expected ident at line 1 column 2");
        assert_eq!(err(b"x"), "expected value at line 1 column 1");
        assert_eq!(err(b"{\"a\":1,}"), "trailing comma at line 1 column 8");
        assert_eq!(err(b"{'a':1}"), "key must be a string at line 1 column 2");
        assert_eq!(err(b"[1,2"), "EOF while parsing a list at line 1 column 4");
        assert_eq!(err(b"01"), "invalid number at line 1 column 2");
        assert_eq!(err(b"1."), "EOF while parsing a value at line 1 column 2");
        assert_eq!(err(b"NaN"), "expected value at line 1 column 1");
        assert_eq!(
            err(b"\"a\nb\""),
            "control character (\\u0000-\\u001F) found while parsing a string at line 2 column 0"
        );
    }

    #[test]
    fn rejects_trailing_garbage() {
        assert_eq!(err(b"{} x"), "trailing characters at line 1 column 4");
        assert_eq!(err(b"1 2"), "trailing characters at line 1 column 3");
        assert_eq!(err(b"{}{}"), "trailing characters at line 1 column 3");
        assert_eq!(err(b"{}\0"), "trailing characters at line 1 column 3");
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert!(err(b"\"\xff\"").starts_with("invalid unicode code point"));
        assert!(err(b"{\"\xc3\x28\": 1}").starts_with("invalid unicode code point"));
        // Overlong encoding of '/' and an encoded surrogate are not UTF-8 either.
        assert!(err(b"\"\xc0\xaf\"").starts_with("invalid unicode code point"));
        assert!(err(b"\"\xed\xa0\x80\"").starts_with("invalid unicode code point"));
        assert!(err(b"\xef\xbb\xbf{}").starts_with("expected value"));
    }

    #[test]
    fn rejects_lone_surrogate_escapes() {
        // serde_json's wording: a lone *leading* surrogate is an "unexpected end", a lone
        // trailing one or a leading one followed by a non-surrogate a "lone leading".
        assert_eq!(
            err(br#""\ud800""#),
            "unexpected end of hex escape at line 1 column 8"
        );
        assert!(err(br#"{"\ud800x": 1}"#).starts_with("unexpected end of hex escape"));
        assert_eq!(
            err(br#""\udc00""#),
            "lone leading surrogate in hex escape at line 1 column 7"
        );
        assert!(err(br#"["\ud83d\u0041"]"#).starts_with("lone leading surrogate in hex escape"));
        assert!(err(br#"["\ude00\ud83d"]"#).starts_with("lone leading surrogate in hex escape"));
    }

    #[test]
    fn rejects_nul_in_values_and_keys() {
        let nul = "strings must not contain \\u0000 (PostgreSQL jsonb rejects it)";
        assert_eq!(err(br#""a\u0000b""#), format!("{nul} at line 1 column 10"));
        assert_eq!(
            err(br#"{"k\u0000": 1}"#),
            format!("{nul} at line 1 column 10")
        );
        assert_eq!(
            err(br#"[[{"a": ["\u0000"]}]]"#),
            format!("{nul} at line 1 column 17")
        );
        // \u0000 spelled with upper-case hex, and inside an escape-heavy string.
        assert!(err(br#""\\\u0000""#).starts_with(nul));
        // A raw NUL byte inside a string is a control character for serde_json already.
        assert!(err(b"\"a\0b\"").starts_with("control character"));
        // An escaped backslash followed by "u0000" is not a NUL.
        ok(r#""\\u0000""#);
    }

    #[test]
    fn nesting_limit() {
        let deep_ok = "[".repeat(127) + &"]".repeat(127);
        ok(&deep_ok);
        let too_deep = "[".repeat(129) + &"]".repeat(129);
        assert!(err(too_deep.as_bytes()).starts_with("recursion limit exceeded"));
        let too_deep_obj = "{\"a\":".repeat(200) + "1" + &"}".repeat(200);
        assert!(err(too_deep_obj.as_bytes()).starts_with("recursion limit exceeded"));
    }

    #[test]
    fn numbers_beyond_f64_are_fine_for_jsonb() {
        for doc in [
            "1e400",
            "-1e400",
            "1e-400",
            "123456789012345678901234567890",
            "-123456789012345678901234567890.5",
            "18446744073709551616",
            "-9223372036854775809",
            "[1E+308, 2e308]",
            "{\"n\": 1e131071}",
            "9.9999e131071",
            "1e-16383",
            "10e-16383",
            "0.1e-16382",
            "0.00001e131076",
            "0e1073741823",
            "0e-16383",
            "1001e131068",
        ] {
            ok(doc);
        }
    }

    #[test]
    fn numbers_beyond_pg_numeric_are_rejected() {
        let msg = "number out of range for PostgreSQL numeric (jsonb)";
        for doc in [
            "1e131072",
            "-1e131072",
            "1e-16384",
            "0e-16384",
            "0.1e-16383",
            "0.00001e131077",
            "0e1073741824",
            "1e99999999999999999999999",
            "1e-1073741824",
        ] {
            assert!(err(doc.as_bytes()).starts_with(msg), "{doc}");
        }
        assert_eq!(err(b"[1, 1e131072]"), format!("{msg} at line 1 column 12"));
        let long_fraction = format!("0.{}", "1".repeat(16384));
        assert!(err(long_fraction.as_bytes()).starts_with(msg));
        let ok_fraction = format!("0.{}", "1".repeat(16383));
        ok(&ok_fraction);
    }

    #[test]
    fn the_number_marker_as_a_real_key_is_harmless() {
        assert_eq!(
            ok(r#"{"$serde_json::private::Number": "abc"}"#),
            TopLevel::Object
        );
        assert_eq!(
            ok(r#"{"$serde_json::private::Number": {"a": 1}}"#),
            TopLevel::Object
        );
    }

    #[test]
    fn escaped_everything_is_fine() {
        let s = "a\u{1}é😀\u{ffff}\u{10ffff}";
        ok(&crate::testutil::escape_all(s));
    }

    /// Bytes that make up JSON, and some that break it.
    const SOUP: &[u8] = b"{}[]\",:\\u0123456789abcdefxnultrs .-+eE\n\xff\xc3\xa9";

    proptest::proptest! {
        #[test]
        fn generated_json_is_accepted(doc in crate::testutil::arb_json()) {
            proptest::prop_assert!(validate(doc.as_bytes()).is_ok(), "{}", doc);
        }

        #[test]
        fn strings_are_rejected_exactly_when_they_hold_nul(s in ".{0,20}") {
            let plain = serde_json::to_string(&s).unwrap();
            let escaped = crate::testutil::escape_all(&s);
            let has_nul = s.contains('\0');
            proptest::prop_assert_eq!(validate(plain.as_bytes()).is_err(), has_nul);
            proptest::prop_assert_eq!(validate(escaped.as_bytes()).is_err(), has_nul);
        }

        #[test]
        fn agrees_with_serde_json_on_syntax(bytes in proptest::collection::vec(
            proptest::sample::select(SOUP.to_vec()),
            0..24,
        )) {
            // No panics on byte soup, and no syntax accepted that serde_json rejects.
            if validate(&bytes).is_ok() {
                let v: Result<serde::de::IgnoredAny, _> = serde_json::from_slice(&bytes);
                proptest::prop_assert!(v.is_ok());
            }
        }
    }

    #[test]
    fn numeric_range_directly() {
        assert!(numeric_in_range("0"));
        assert!(numeric_in_range("-0.000"));
        assert!(numeric_in_range("1e+131071"));
        assert!(!numeric_in_range("1e+131072"));
        assert!(numeric_in_range("not a number"));
        assert!(numeric_in_range("1e"));
        assert!(numeric_in_range("1x"));
    }
}
