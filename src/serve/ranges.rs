//! The `Range` header, judged before a response is built. `http-serve` answers ranges as RFC
//! 9110 says but serves whatever it is asked; RFC 9110 §14.2 lets a server refuse "a
//! ranges-specifier with more than two overlapping ranges, or a set of many small ranges",
//! the shapes of a denial-of-service attack (one request making the server send a file many
//! times over, or seek thousands of times). We refuse, with `416`: more than `max` ranges,
//! overlapping ranges, or a header that does not parse. The leaf's client asks for at most
//! 64 sorted, disjoint ranges, and on a `416` to several ranges falls back to one per request.

use http::HeaderValue;
use http_range_header::{EndPosition, StartPosition};

/// Why a `Range` header is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    TooMany { count: usize, max: usize },
    Overlapping,
    Malformed,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TooMany { count, max } => write!(f, "{count} ranges (at most {max})"),
            Refusal::Overlapping => f.write_str("overlapping ranges"),
            Refusal::Malformed => f.write_str("malformed Range header"),
        }
    }
}

/// Check `range` (the request's `Range` header, if any) for a representation of `len` bytes.
/// Headers in another unit than `bytes` are left alone (they are ignored when serving).
pub fn check(range: Option<&HeaderValue>, len: u64, max: usize) -> Result<(), Refusal> {
    let Some(v) = range else { return Ok(()) };
    let Ok(s) = v.to_str() else {
        return Err(Refusal::Malformed);
    };
    if !s.starts_with("bytes=") {
        return Ok(());
    }
    // Counted before parsing: the parser's overlap check is quadratic.
    let count = s.bytes().filter(|&b| b == b',').count() + 1;
    if count > max {
        return Err(Refusal::TooMany { count, max });
    }
    let parsed = http_range_header::parse_range_header(s).map_err(|_| Refusal::Malformed)?;
    let mut spans = Vec::with_capacity(parsed.ranges.len());
    for r in &parsed.ranges {
        let span = match (r.start, r.end) {
            (StartPosition::Index(a), EndPosition::Index(b)) => {
                if b < a {
                    return Err(Refusal::Malformed);
                }
                (a, b.saturating_add(1).min(len))
            }
            (StartPosition::Index(a), EndPosition::LastByte) => (a, len),
            (StartPosition::FromLast(n), _) => (len.saturating_sub(n), len),
        };
        // An unsatisfiable range takes no part in overlaps (it is dropped when serving).
        if span.0 < span.1 {
            spans.push(span);
        }
    }
    spans.sort_unstable();
    if spans.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(Refusal::Overlapping);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str, len: u64) -> Result<(), Refusal> {
        check(Some(&HeaderValue::from_str(s).unwrap()), len, 4)
    }

    #[test]
    fn sorted_disjoint_ranges_pass() {
        assert_eq!(c("bytes=0-9,20-29,30-39", 100), Ok(()));
        assert_eq!(c("bytes=0-0,-1", 100), Ok(()));
        assert_eq!(c("bytes=90-", 100), Ok(()));
        assert_eq!(check(None, 100, 1), Ok(()));
        // Not ours to judge: served as if there were no Range.
        assert_eq!(c("items=0-9", 100), Ok(()));
        // Unsatisfiable parts do not overlap anything.
        assert_eq!(c("bytes=0-9,200-300,250-400", 100), Ok(()));
    }

    #[test]
    fn too_many_overlapping_or_malformed_are_refused() {
        assert_eq!(
            c("bytes=0-1,2-3,4-5,6-7,8-9", 100),
            Err(Refusal::TooMany { count: 5, max: 4 })
        );
        assert_eq!(c("bytes=0-50,40-60", 100), Err(Refusal::Overlapping));
        assert_eq!(c("bytes=40-60,0-50", 100), Err(Refusal::Overlapping));
        assert_eq!(c("bytes=0-99,-10", 100), Err(Refusal::Overlapping));
        assert_eq!(c("bytes=9-0", 100), Err(Refusal::Malformed));
        assert_eq!(c("bytes=a-b", 100), Err(Refusal::Malformed));
        assert_eq!(c("bytes=", 100), Err(Refusal::Malformed));
    }
}
