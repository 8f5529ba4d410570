//! Spreads the recurring jobs of many shops evenly over their interval.
//!
//! Each shop has a stable phase per kind of job (a hash of its name). A job's
//! next run is the first instant at that phase that lies at least half an
//! interval ahead, so the gap between runs averages one interval and stays
//! between half and one and a half of it. Random jitter alone would keep a
//! burst together: a thousand shops added in one minute, each rescheduled at
//! "interval + up to 10%", would go on probing within the same few seconds.
//! With hashed phases they land evenly over the interval after their first
//! run, whatever the order they arrived in.

use std::time::Duration;

/// The kinds of recurring work with a phase of their own (so that a shop's
/// probe and its sync do not always start together).
#[derive(Debug, Clone, Copy)]
pub enum Recurring {
    Probe,
    Sync,
    FullSync,
}

/// When the next occurrence of `what` for `shop` is due, as milliseconds
/// since the epoch, given that the previous one ended at `now_ms`.
pub fn next_due_ms(shop: &str, what: Recurring, now_ms: u64, interval: Duration) -> u64 {
    let period = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    if period < 2 {
        return now_ms.saturating_add(period);
    }
    let phase = phase(shop, what) % period;
    let earliest = now_ms.saturating_add(period / 2);
    let offset = (phase + period - earliest % period) % period;
    earliest.saturating_add(offset)
}

/// When the first occurrence of `what` for `shop` is due when nothing is
/// scheduled yet (a new shop, or a database from before the job existed):
/// the shop's slot within the coming interval, so that a restart with a
/// thousand shops spreads their work over one interval.
pub fn first_due_ms(shop: &str, what: Recurring, now_ms: u64, interval: Duration) -> u64 {
    let period = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    next_due_ms(shop, what, now_ms.saturating_sub(period / 2), interval).max(now_ms)
}

/// A well-mixed 64-bit number for (shop, kind): FNV-1a over the name, then
/// the splitmix64 finaliser, because similar names ("shop-0001", "shop-0002")
/// would otherwise fall into neighbouring phases.
fn phase(shop: &str, what: Recurring) -> u64 {
    let salt = match what {
        Recurring::Probe => 0x9e37_79b9_7f4a_7c15,
        Recurring::Sync => 0xbf58_476d_1ce4_e5b9,
        Recurring::FullSync => 0x94d0_49bb_1331_11eb,
    };
    let mut z = shop_hash(shop) ^ salt;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable per-shop number (FNV-1a).
pub fn shop_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn gap_stays_between_half_and_one_and_a_half_intervals() {
        let interval = Duration::from_secs(60);
        for i in 0..500u64 {
            let now = 1_700_000_000_000 + i * 7_919;
            let due = next_due_ms(&format!("shop-{i}"), Recurring::Probe, now, interval);
            assert!(
                due >= now + MIN / 2 && due < now + MIN * 3 / 2,
                "{i}: {}",
                due - now
            );
        }
    }

    #[test]
    fn a_shop_keeps_its_phase() {
        let interval = Duration::from_secs(60);
        let a = next_due_ms("acme", Recurring::Probe, 1_000_000, interval);
        let b = next_due_ms("acme", Recurring::Probe, a + 1_234, interval);
        assert_eq!((b - a) % MIN, 0);
        assert_eq!(b - a, MIN);
    }

    #[test]
    fn a_burst_of_shops_spreads_over_the_interval() {
        // 1,000 shops finishing their first probe within the same second.
        let interval = Duration::from_secs(30);
        let now = 1_700_000_000_000;
        let mut per_second = [0u32; 30];
        for i in 0..1_000 {
            let due = next_due_ms(&format!("shop-{i:04}"), Recurring::Probe, now + i, interval);
            per_second[((due / 1000) % 30) as usize] += 1;
        }
        // Evenly spread is 33.3 a second; a hash is not perfectly even, but
        // no second may hold more than 6% of the shops.
        let max = per_second.iter().copied().max().unwrap_or(0);
        assert!(
            max <= 60,
            "busiest second holds {max} of 1000: {per_second:?}"
        );
    }

    #[test]
    fn first_runs_fall_within_one_interval() {
        let interval = Duration::from_secs(60);
        let now = 1_700_000_000_123;
        for i in 0..500 {
            let due = first_due_ms(&format!("s{i}"), Recurring::Sync, now, interval);
            assert!(
                due >= now && due < now + MIN,
                "{i}: {}",
                due as i64 - now as i64
            );
        }
    }

    #[test]
    fn tiny_intervals_do_not_divide_by_zero() {
        assert_eq!(next_due_ms("a", Recurring::Sync, 10, Duration::ZERO), 10);
        assert_eq!(
            next_due_ms("a", Recurring::Sync, 10, Duration::from_millis(1)),
            11
        );
    }
}
