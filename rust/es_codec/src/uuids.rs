//! UUID text in and out: clients send the canonical hyphenated form in any letter case (API.md:
//! "a UUID in canonical text form"), we always answer with it in lower case (what PostgreSQL's
//! `uuid` type prints, so ids compare equal as strings across the API).

use uuid::{Builder, Uuid};

/// Length of the canonical text form, `8-4-4-4-12`.
pub const TEXT_LEN: usize = 36;

/// Parses a UUID in the canonical hyphenated form (`8-4-4-4-12` hex digits), in any letter
/// case. The other spellings the `uuid` crate (and PostgreSQL) read — 32 bare digits, braced,
/// URN — are not UUIDs to the API: another server of the same contract would refuse them.
pub fn parse(text: &[u8]) -> Option<[u8; 16]> {
    if text.len() != TEXT_LEN {
        return None;
    }
    // At this length the crate reads only the hyphenated form.
    Uuid::try_parse_ascii(text).ok().map(Uuid::into_bytes)
}

/// Writes the canonical lower-case hyphenated text of `id`.
pub fn write_text(id: &[u8; 16], dst: &mut [u8; TEXT_LEN]) {
    Uuid::from_bytes(*id).hyphenated().encode_lower(dst);
}

/// The canonical lower-case hyphenated text of `id`.
pub fn to_text(id: &[u8; 16]) -> String {
    Uuid::from_bytes(*id).hyphenated().to_string()
}

/// Fills `ids` with random (version 4) UUIDs.
///
/// One `getrandom` call per 64 ids instead of one per id: a request of thousands of events
/// without client ids would otherwise pay a system call per event.
pub fn fill_v4(ids: &mut [[u8; 16]]) -> Result<(), getrandom::Error> {
    let mut random = [0u8; 16 * 64];
    for chunk in ids.chunks_mut(64) {
        let bytes = &mut random[..chunk.len() * 16];
        getrandom::fill(bytes)?;
        for (id, raw) in chunk.iter_mut().zip(bytes.chunks_exact(16)) {
            let mut b = [0u8; 16];
            b.copy_from_slice(raw);
            *id = Builder::from_random_bytes(b).into_uuid().into_bytes();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 16] = [
        0x6f, 0x9b, 0x1c, 0x2d, 0x3e, 0x4f, 0x40, 0x51, 0x82, 0x63, 0x74, 0x85, 0x96, 0xa7, 0xb8,
        0xc9,
    ];

    #[test]
    fn accepts_the_canonical_form_in_any_case() {
        for text in [
            "6f9b1c2d-3e4f-4051-8263-748596a7b8c9",
            "6F9B1C2D-3E4F-4051-8263-748596A7B8C9",
            "6f9B1c2D-3e4F-4051-8263-748596a7B8c9",
        ] {
            assert_eq!(parse(text.as_bytes()), Some(ID), "{text}");
        }
    }

    #[test]
    fn rejects_non_uuids() {
        for text in [
            "",
            "abc",
            "6f9b1c2d-3e4f-4051-8263-748596a7b8c",
            "6f9b1c2d-3e4f-4051-8263-748596a7b8c9a",
            "6f9b1c2d-3e4f-4051-8263-748596a7b8cg",
            "6f9b1c2d_3e4f_4051_8263_748596a7b8c9",
            " 6f9b1c2d-3e4f-4051-8263-748596a7b8c9",
            "{6f9b1c2d-3e4f-4051-8263-748596a7b8c9",
            "6f9b1c2d-3e4f-4051-8263-748596a7b8c9\0",
            // Spellings that are not the canonical text form.
            "6f9b1c2d3e4f40518263748596a7b8c9",
            "{6f9b1c2d-3e4f-4051-8263-748596a7b8c9}",
            "urn:uuid:6f9b1c2d-3e4f-4051-8263-748596a7b8c9",
            "URN:UUID:6F9B1C2D-3E4F-4051-8263-748596A7B8C9",
            "6f9b1c2d3-e4f-4051-8263-748596a7b8c9",
            "6f9b1c2d+3e4f+4051+8263+748596a7b8c9",
        ] {
            assert_eq!(parse(text.as_bytes()), None, "{text:?}");
        }
        assert_eq!(parse(&[0xff; 36]), None);
    }

    #[test]
    fn writes_canonical_lower_case() {
        let mut buf = [0u8; TEXT_LEN];
        write_text(&ID, &mut buf);
        assert_eq!(&buf, b"6f9b1c2d-3e4f-4051-8263-748596a7b8c9");
        assert_eq!(to_text(&ID), "6f9b1c2d-3e4f-4051-8263-748596a7b8c9");
    }

    #[test]
    fn generates_distinct_v4_ids() {
        let mut ids = vec![[0u8; 16]; 200];
        fill_v4(&mut ids).unwrap();
        for id in &ids {
            let u = Uuid::from_bytes(*id);
            assert_eq!(u.get_version_num(), 4);
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
    }
}
