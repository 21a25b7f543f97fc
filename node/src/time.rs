//! Parsing times given by users: Unix milliseconds or RFC 3339.

/// Why a time could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is neither Unix milliseconds nor an RFC 3339 time (e.g. 2025-01-31T12:00:00Z): {why}")]
pub struct TimeError {
    pub input: String,
    pub why: &'static str,
}

/// Parses Unix milliseconds (`1700000000000`) or RFC 3339 (`2025-01-31T12:00:00.250Z`,
/// `2025-01-31T13:00:00+01:00`) into Unix milliseconds.
pub fn parse_time_ms(input: &str) -> Result<u64, TimeError> {
    let err = |why| TimeError {
        input: input.to_owned(),
        why,
    };
    let s = input.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().map_err(|_| err("number out of range"));
    }
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(err("too short"));
    }
    let num = |from: usize, to: usize| -> Result<i64, TimeError> {
        let part = s.get(from..to).ok_or_else(|| err("bad layout"))?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(err("expected digits"));
        }
        part.parse::<i64>().map_err(|_| err("expected digits"))
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(err("bad layout"));
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(err("field out of range"));
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(err("empty fraction"));
        }
        let frac = &s[start..i.min(start + 3)];
        millis = frac.parse::<i64>().map_err(|_| err("bad fraction"))?
            * 10i64.pow(3 - frac.len() as u32);
    }
    let offset_min = match b.get(i) {
        Some(b'Z') | Some(b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let h = num(i + 1, i + 3)?;
            let m = num(i + 4, i + 6)?;
            if h > 23 || m > 59 {
                return Err(err("offset out of range"));
            }
            let total = h * 60 + m;
            if *sign == b'-' {
                -total
            } else {
                total
            }
        }
        _ => return Err(err("expected Z or an offset like +01:00")),
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second.min(59) - offset_min * 60;
    let ms = secs * 1_000 + millis;
    u64::try_from(ms).map_err(|_| err("before 1970"))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_millis_and_rfc3339() {
        assert_eq!(parse_time_ms("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time_ms("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time_ms("2023-11-14T22:13:20.5Z"),
            Ok(1_700_000_000_500)
        );
        assert_eq!(
            parse_time_ms("2023-11-14T23:13:20+01:00"),
            Ok(1_700_000_000_000)
        );
        assert!(parse_time_ms("yesterday").is_err());
        assert!(parse_time_ms("2023-13-14T22:13:20Z").is_err());
        assert!(parse_time_ms("").is_err());
    }
}
