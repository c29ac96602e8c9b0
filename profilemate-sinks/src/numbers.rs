//! The numbers every sink writes, computed once from the integer nanoseconds and counts.
//!
//! The CSV writer prints these integers with a decimal point put in place; the Parquet and trace
//! writers turn them into `f64` by one division of two exact integers, which IEEE 754 rounds
//! correctly, so a Parquet value is bit for bit the `f64` a CSV reader parses from the same row.

/// Nanoseconds rounded to the microsecond (half up): seconds with 6 decimals.
pub(crate) fn round_us(ns: u64) -> u64 {
    ns / 1000 + u64::from(ns % 1000 >= 500)
}

/// Seconds, rounded to the microsecond as `timestamp_sec` and the `*_sec` columns are.
#[cfg(any(feature = "parquet", test))]
pub(crate) fn sec(ns: u64) -> f64 {
    round_us(ns) as f64 / 1e6
}

/// Milliseconds, exact to the nanosecond as the `*_ms` columns are.
#[cfg(any(feature = "parquet", test))]
pub(crate) fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// `num / max * 100` clamped to 100, in units of 10^-4 percent (rounded half up); `None` when
/// `max` is 0.
pub(crate) fn pct_e4(num: u32, max: u32) -> Option<u64> {
    if max == 0 {
        return None;
    }
    let num = u64::from(num.min(max));
    let max = u64::from(max);
    Some((num * 1_000_000 + max / 2) / max)
}

/// The percentage as the CSV writes it (4 decimals).
#[cfg(any(feature = "parquet", test))]
pub(crate) fn pct(num: u32, max: u32) -> Option<f64> {
    pct_e4(num, max).map(|p| p as f64 / 1e4)
}

/// `tokens / ns * 10^9` tokens per second as `(scaled, decimals)`: the value is
/// `scaled / 10^decimals`, rounded half up, with at least 6 significant digits and at least 3
/// decimals (at most 12: `0.000556` is written `0.000555556`, not `0.001`); `None` when `ns` is
/// 0.
pub(crate) fn throughput_fixed(tokens: u32, ns: u64) -> Option<(u64, u32)> {
    if ns == 0 {
        return None;
    }
    let ns = u128::from(ns);
    let scaled = |decimals: u32| (u128::from(tokens) * 10u128.pow(9 + decimals) + ns / 2) / ns;
    // Digits before the decimal point (negative: zeros after it before the first digit).
    let at12 = scaled(12);
    let digits = if at12 == 0 { 0 } else { at12.ilog10() as i64 + 1 };
    let int_digits = digits - 12;
    let decimals = (6 - int_digits).clamp(3, 12) as u32;
    Some((u64::try_from(scaled(decimals)).unwrap_or(u64::MAX), decimals))
}

/// The throughput as the CSV writes it ([`throughput_fixed`]).
#[cfg(any(feature = "parquet", test))]
pub(crate) fn throughput(tokens: u32, ns: u64) -> Option<f64> {
    throughput_fixed(tokens, ns).map(|(t, d)| t as f64 / 10f64.powi(d as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_the_ones_a_reader_parses_from_the_csv_text() {
        for ns in [0u64, 1, 499, 500, 1_234_567_499, 1_234_567_500, 3_600_000_000_123, 987_654_321_987] {
            let us = round_us(ns);
            let text = format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
            assert_eq!(sec(ns), text.parse::<f64>().unwrap(), "{ns}");
            let text = format!("{}.{:06}", ns / 1_000_000, ns % 1_000_000);
            assert_eq!(ms(ns), text.parse::<f64>().unwrap(), "{ns}");
        }
        for (num, max) in [(1u32, 3u32), (2, 3), (24, 256), (300, 256), (8191, 8192)] {
            let p = pct_e4(num, max).unwrap();
            assert_eq!(pct(num, max), Some(format!("{}.{:04}", p / 10_000, p % 10_000).parse().unwrap()));
        }
        assert_eq!(pct(1, 0), None);
        assert_eq!(throughput(1, 0), None);
        assert_eq!(throughput(256, 45_234_000), Some(5659.46));
        for (tokens, ns) in
            [(1u32, 1_798_561_151_079u64), (256, 45_234_000), (3, 7_000_000), (1, 3), (7, 1_000_000_000)]
        {
            let (t, d) = throughput_fixed(tokens, ns).unwrap();
            let scale = 10u64.pow(d);
            let text = format!("{}.{:0width$}", t / scale, t % scale, width = d as usize);
            assert_eq!(throughput(tokens, ns), Some(text.parse::<f64>().unwrap()), "{text}");
        }
    }

    /// Small throughputs keep their significant digits (0.000556, not 0.001); large ones keep
    /// 3 decimals.
    #[test]
    fn throughput_keeps_six_significant_digits() {
        let text = |tokens, ns| {
            let (t, d) = throughput_fixed(tokens, ns).unwrap();
            let scale = 10u64.pow(d);
            format!("{}.{:0width$}", t / scale, t % scale, width = d as usize)
        };
        // 1 token in 1798.56 s: 0.000556 tokens/s.
        assert_eq!(text(1, 1_798_561_151_079), "0.000556000");
        assert_eq!(text(256, 45_234_000), "5659.460");
        assert_eq!(text(3, 7_000_000), "428.571");
        assert_eq!(text(7, 1_000_000_000), "7.00000");
        assert_eq!(text(1, 3), "333333333.333");
        assert_eq!(text(1, u64::MAX), "0.000000000054", "at most 12 decimals");
    }
}
