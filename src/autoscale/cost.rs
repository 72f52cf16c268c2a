//! What the servers cost, from the order ledger: Elastic Metal bills by started hour, so
//! a server placed at `t0` and released at `t1` costs its hourly price for every hour
//! started in `[t0, t1)`. Pure arithmetic over the ledger and the clock.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;

use super::ledger::{Order, OrderState};

/// One billing hour.
const HOUR: Duration = Duration::from_secs(3600);

/// The cost view of `GET /v1/autoscaler`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cost {
    /// Servers provisioned now (ordered and not released).
    pub servers: usize,
    /// Their hourly prices added up.
    pub per_hour: f64,
    /// Started hours since this process started, times their price.
    pub since_start: f64,
    /// Started hours since midnight in the budget's time zone, times their price.
    pub today: f64,
}

/// Hours of `o` started within `[from, now]`, times its price.
fn spent(o: &Order, from: SystemTime, now: SystemTime) -> f64 {
    if matches!(o.state, OrderState::Refused | OrderState::Lost) {
        return 0.0;
    }
    let end = o.released_at.unwrap_or(now).min(now);
    let mut started = 0u32;
    let mut hour = o.placed_at;
    while hour < end {
        if hour >= from {
            started += 1;
        }
        hour += HOUR;
    }
    f64::from(started) * o.price_per_hour
}

/// The cost of `orders` at `now`, for a process started at `started`, "today" being
/// since midnight in `zone`.
pub fn cost(orders: &[Order], started: SystemTime, zone: Tz, now: SystemTime) -> Cost {
    let midnight = midnight(zone, now);
    let billed: Vec<&Order> = orders.iter().filter(|o| o.billed()).collect();
    Cost {
        servers: billed.len(),
        per_hour: billed.iter().map(|o| o.price_per_hour).sum(),
        since_start: orders.iter().map(|o| spent(o, started, now)).sum(),
        today: orders.iter().map(|o| spent(o, midnight, now)).sum(),
    }
}

/// The last midnight before `now` in `zone`.
fn midnight(zone: Tz, now: SystemTime) -> SystemTime {
    let local = DateTime::<Utc>::from(now).with_timezone(&zone);
    local
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .and_then(|m| zone.from_local_datetime(&m).earliest())
        .map_or(now, |m| SystemTime::from(m.with_timezone(&Utc)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(placed_at: SystemTime, released_at: Option<SystemTime>) -> Order {
        Order {
            request_id: "r".into(),
            zone: "fr-par-2".into(),
            offer: "EM".into(),
            placed_at,
            device_id: Some("d".into()),
            state: if released_at.is_some() {
                OrderState::Released
            } else {
                OrderState::Seen
            },
            price_per_hour: 0.25,
            released_at,
            reason: String::new(),
        }
    }

    #[test]
    fn every_started_hour_is_paid() {
        // 2026-11-27 12:00 UTC.
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_780_800);
        let min = Duration::from_secs(60);
        let now = t0 + 3 * HOUR;
        // Released 10 minutes in: one started hour; 61 minutes in: two.
        let short = order(t0, Some(t0 + 10 * min));
        let longer = order(t0, Some(t0 + 61 * min));
        let running = order(t0 + 30 * min, None);
        let c = cost(&[short, longer, running], t0, Tz::UTC, now);
        assert_eq!(c.servers, 1);
        assert!((c.per_hour - 0.25).abs() < 1e-9);
        // 1 + 2 + 3 (the running one started hours at 10:30, 11:30, 12:30).
        assert!((c.since_start - 6.0 * 0.25).abs() < 1e-9, "{c:?}");
        assert!((c.today - c.since_start).abs() < 1e-9);
        // Since a start after all the orders: only hours started since.
        let later = cost(&[order(t0, None)], t0 + 2 * HOUR, Tz::UTC, now);
        assert!((later.since_start - 0.25).abs() < 1e-9, "{later:?}");
    }

    #[test]
    fn today_starts_at_midnight_in_the_budget_zone() {
        // 2026-11-27 00:30 in Paris is 2026-11-26 23:30 UTC.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_735_800);
        let m = midnight(Tz::Europe__Paris, now);
        assert_eq!(now.duration_since(m).unwrap(), Duration::from_secs(30 * 60));
        let m = midnight(Tz::UTC, now);
        assert_eq!(
            now.duration_since(m).unwrap(),
            Duration::from_secs(23 * 3600 + 30 * 60)
        );
    }
}
