//! Sizes and durations as people write them on a command line or in a URL: one grammar for
//! every flag and option (`--cache-size 256M`, `--grace 1h`, `?timeout=500ms`).

use std::time::Duration;

/// A byte count with an optional K, M, G or T suffix (powers of 1024; `B` or `iB` may follow).
pub fn parse_size<T: TryFrom<u64>>(s: &str) -> Result<T, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 64K, 256M, 10G)"))?;
    n.checked_mul(mul)
        .and_then(|v| T::try_from(v).ok())
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A duration: a number (fractions allowed) with `ms`, `s`, `m`, `h` or `d`, or a bare number
/// of seconds. Zero is allowed (`--grace 0s`); a duration past ~115 days is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mul) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else if let Some(n) = t.strip_suffix('d') {
        (n, 86400.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 15m, 1h, 2d)"))?;
    if !v.is_finite() || v < 0.0 || v * mul > 1e7 {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

/// [`parse_duration`] refusing zero, for deadlines and intervals.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("duration {s:?} must be more than zero")),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size::<u64>("3M").unwrap(), 3 << 20);
        assert_eq!(parse_size::<u64>("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size::<u64>("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size::<u64>(" 512 ").unwrap(), 512);
        assert!(parse_size::<u32>("8G").is_err());
        assert!(parse_size::<u64>("x").is_err());
        assert!(parse_size::<u64>("99999999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e9h").is_err());
    }
}
