//! The optimistic-concurrency check for a batch of appends, done in one call.
//!
//! The writer takes a batch of requests, reads the current version of each distinct stream
//! once, and decides here which requests go in. Requests are decided in order and an accepted
//! one moves its stream forward, so two appends to the same stream in one batch behave as if
//! they had been sent one after the other.

use std::fmt;

/// Inconsistent arguments: a bug in the caller, not a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionArgsError(pub String);

impl fmt::Display for VersionArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decides each request of a batch.
///
/// * `current[s]`: the version of distinct stream `s` now (0: the stream does not exist).
/// * `stream_index[i]`: which stream request `i` appends to.
/// * `expected[i]`: `None` any version; `Some(0)` the stream must not exist yet (be at 0);
///   `Some(-1)` it must exist (be above 0); `Some(n)` it must be exactly at `n`.
/// * `counts[i]`: how many events request `i` appends (at least 1).
///
/// Returns, per request, the version of its first event (≥ 1) when accepted, or
/// `-(actual + 1)` when rejected, `actual` being the stream's version at that point of the
/// batch (so 0, "no stream", is still distinguishable from a rejection).
pub fn check_versions(
    current: &[i64],
    stream_index: &[i64],
    expected: &[Option<i64>],
    counts: &[i64],
) -> Result<Vec<i64>, VersionArgsError> {
    let n = stream_index.len();
    if expected.len() != n || counts.len() != n {
        return Err(VersionArgsError(format!(
            "stream_index, expected and counts must have the same length, got {n}, {} and {}",
            expected.len(),
            counts.len()
        )));
    }
    if let Some((s, v)) = current.iter().enumerate().find(|(_, v)| **v < 0) {
        return Err(VersionArgsError(format!(
            "current[{s}]: a version cannot be negative, got {v}"
        )));
    }
    let mut versions = current.to_vec();
    let mut results = Vec::with_capacity(n);
    for i in 0..n {
        let (s, want, count) = (stream_index[i], expected[i], counts[i]);
        let Some(version) = usize::try_from(s).ok().and_then(|s| versions.get_mut(s)) else {
            return Err(VersionArgsError(format!(
                "stream_index[{i}]: {s} is not an index of current (length {})",
                current.len()
            )));
        };
        if count < 1 {
            return Err(VersionArgsError(format!(
                "counts[{i}]: must be at least 1, got {count}"
            )));
        }
        let accepted = match want {
            None => true,
            Some(-1) => *version > 0,
            Some(w) if w >= 0 => *version == w,
            Some(w) => {
                return Err(VersionArgsError(format!(
                    "expected[{i}]: must be None, -1, 0 or a positive version, got {w}"
                )))
            }
        };
        if accepted {
            let Some(last) = version.checked_add(count) else {
                return Err(VersionArgsError(format!(
                    "counts[{i}]: version {version} + {count} events overflows"
                )));
            };
            results.push(*version + 1);
            *version = last;
        } else {
            // `version` is non-negative, so this cannot overflow.
            results.push(-(*version + 1));
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(current: &[i64], reqs: &[(i64, Option<i64>, i64)]) -> Vec<i64> {
        let idx: Vec<i64> = reqs.iter().map(|r| r.0).collect();
        let exp: Vec<Option<i64>> = reqs.iter().map(|r| r.1).collect();
        let cnt: Vec<i64> = reqs.iter().map(|r| r.2).collect();
        check_versions(current, &idx, &exp, &cnt).unwrap()
    }

    fn actual_of(code: i64) -> i64 {
        assert!(code < 0, "{code} is not a rejection");
        -code - 1
    }

    #[test]
    fn single_requests() {
        // Any version.
        assert_eq!(check(&[0], &[(0, None, 3)]), [1]);
        assert_eq!(check(&[7], &[(0, None, 1)]), [8]);
        // Must not exist.
        assert_eq!(check(&[0], &[(0, Some(0), 2)]), [1]);
        assert_eq!(check(&[4], &[(0, Some(0), 2)]), [-5]);
        // Must exist.
        assert_eq!(check(&[4], &[(0, Some(-1), 1)]), [5]);
        assert_eq!(check(&[0], &[(0, Some(-1), 1)]), [-1]);
        assert_eq!(actual_of(-1), 0);
        // Exact version.
        assert_eq!(check(&[4], &[(0, Some(4), 1)]), [5]);
        assert_eq!(check(&[4], &[(0, Some(3), 1)]), [-5]);
        assert_eq!(check(&[4], &[(0, Some(5), 1)]), [-5]);
        assert_eq!(check(&[0], &[(0, Some(1), 1)]), [-1]);
    }

    #[test]
    fn several_requests_to_one_stream_see_each_other() {
        let r = check(
            &[0],
            &[
                (0, Some(0), 2),  // creates the stream: versions 1-2
                (0, Some(2), 3),  // sees version 2: versions 3-5
                (0, None, 1),     // version 6
                (0, Some(-1), 1), // exists: version 7
                (0, Some(0), 1),  // no longer new: rejected at 7
            ],
        );
        assert_eq!(r, [1, 3, 6, 7, -8]);
        assert_eq!(actual_of(r[4]), 7);
    }

    #[test]
    fn zero_on_a_stream_created_earlier_in_the_batch_is_rejected() {
        let r = check(&[0], &[(0, None, 1), (0, Some(0), 1)]);
        assert_eq!(r, [1, -2]);
        assert_eq!(actual_of(r[1]), 1);
    }

    #[test]
    fn minus_one_on_a_new_stream_is_rejected_until_it_exists() {
        let r = check(&[0], &[(0, Some(-1), 1), (0, Some(0), 1), (0, Some(-1), 2)]);
        assert_eq!(r, [-1, 1, 2]);
    }

    #[test]
    fn a_conflict_in_the_middle_does_not_affect_the_others() {
        let r = check(
            &[3, 0, 10],
            &[
                (0, Some(3), 1),  // stream 0: 3 -> 4
                (1, None, 2),     // stream 1: 0 -> 2
                (0, Some(3), 5),  // stream 0 is at 4 now: conflict, unchanged
                (2, Some(10), 1), // stream 2: 10 -> 11
                (0, Some(4), 1),  // stream 0 still at 4: 4 -> 5
                (1, Some(2), 1),  // stream 1: 2 -> 3
            ],
        );
        assert_eq!(r, [4, 1, -5, 11, 5, 3]);
        assert_eq!(actual_of(r[2]), 4);
    }

    #[test]
    fn rejected_requests_do_not_advance_the_stream() {
        let r = check(
            &[5],
            &[(0, Some(1), 100), (0, Some(0), 100), (0, Some(5), 1)],
        );
        assert_eq!(r, [-6, -6, 6]);
    }

    #[test]
    fn empty_batch() {
        assert_eq!(check(&[], &[]), Vec::<i64>::new());
        assert_eq!(check(&[1, 2], &[]), Vec::<i64>::new());
    }

    #[test]
    fn argument_errors() {
        let err = |cur: &[i64], idx: &[i64], exp: &[Option<i64>], cnt: &[i64]| {
            check_versions(cur, idx, exp, cnt).unwrap_err().0
        };
        assert_eq!(
            err(&[0], &[0], &[None, None], &[1]),
            "stream_index, expected and counts must have the same length, got 1, 2 and 1"
        );
        assert!(err(&[0], &[0], &[None], &[]).contains("same length"));
        assert_eq!(
            err(&[0], &[1], &[None], &[1]),
            "stream_index[0]: 1 is not an index of current (length 1)"
        );
        assert_eq!(
            err(&[0], &[-1], &[None], &[1]),
            "stream_index[0]: -1 is not an index of current (length 1)"
        );
        assert_eq!(
            err(&[0], &[0], &[None], &[0]),
            "counts[0]: must be at least 1, got 0"
        );
        assert_eq!(
            err(&[0], &[0], &[Some(-2)], &[1]),
            "expected[0]: must be None, -1, 0 or a positive version, got -2"
        );
        assert_eq!(
            err(&[-3], &[], &[], &[]),
            "current[0]: a version cannot be negative, got -3"
        );
        assert!(err(&[i64::MAX], &[0], &[None], &[1]).contains("overflows"));
    }

    #[test]
    fn matches_a_sequential_model() {
        // A small exhaustive-ish model check: every combination of expectations over two
        // streams and three requests, against the obvious sequential definition.
        let expectations = [None, Some(-1), Some(0), Some(1), Some(2), Some(3)];
        for s0 in 0..3 {
            for e1 in expectations {
                for e2 in expectations {
                    for e3 in expectations {
                        let reqs = [(0, e1, 1), (1, e2, 2), (0, e3, 1)];
                        let got = check(&[s0, 1], &reqs);
                        let mut cur = [s0, 1];
                        for (k, &(s, e, c)) in reqs.iter().enumerate() {
                            let v = cur[usize::try_from(s).unwrap()];
                            let ok = match e {
                                None => true,
                                Some(-1) => v > 0,
                                Some(x) => v == x,
                            };
                            if ok {
                                assert_eq!(got[k], v + 1);
                                cur[usize::try_from(s).unwrap()] += c;
                            } else {
                                assert_eq!(got[k], -(v + 1));
                            }
                        }
                    }
                }
            }
        }
    }
}
