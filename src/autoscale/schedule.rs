//! Known events (a sale opening, a TV spot): raise the minimum ahead of them, because bare
//! metal takes minutes to arrive and the rush takes seconds.
//!
//! An event is one RFC 3339 instant with its offset, or a cron line read in a named time
//! zone (so "8:00 in Paris" stays 8:00 across daylight-saving changes). It is active from
//! `lead` before its start until `duration` after it. Pure: the time is passed in.

use chrono::{DateTime, TimeZone, Utc};

pub use crate::config::{Event, ScheduleError, Start};

impl Event {
    /// Whether the event holds at `now`: some start lies in `(now - duration, now + lead]`.
    pub fn active(&self, now: DateTime<Utc>) -> bool {
        let (Ok(duration), Ok(lead)) = (
            chrono::Duration::from_std(self.duration),
            chrono::Duration::from_std(self.lead),
        ) else {
            return false;
        };
        match &self.start {
            Start::At(t) => {
                let t = t.with_timezone(&Utc);
                t - lead <= now && now < t + duration
            }
            Start::Cron(schedule, tz) => {
                let from = tz.from_utc_datetime(&(now - duration).naive_utc());
                schedule
                    .after(&from)
                    .next()
                    .is_some_and(|start| start.with_timezone(&Utc) - lead <= now)
            }
        }
    }
}

/// The highest minimum among the events active at `now`, with the event's name.
pub fn min_at(events: &[Event], now: DateTime<Utc>) -> Option<(usize, &str)> {
    events
        .iter()
        .filter(|e| e.active(now))
        .max_by_key(|e| e.min)
        .map(|e| (e.min, e.name.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_one_off_sale_raises_min_from_lead_to_end() {
        let e = Event {
            name: "black-friday".into(),
            start: Start::at("2026-11-27T08:00:00+01:00").unwrap(),
            duration: Duration::from_secs(4 * 3600),
            lead: Duration::from_secs(20 * 60),
            min: 8,
        };
        let events = [e];
        assert_eq!(min_at(&events, utc("2026-11-27T06:39:00Z")), None);
        assert_eq!(
            min_at(&events, utc("2026-11-27T06:40:00Z")),
            Some((8, "black-friday"))
        );
        assert_eq!(
            min_at(&events, utc("2026-11-27T10:59:59Z")),
            Some((8, "black-friday"))
        );
        assert_eq!(min_at(&events, utc("2026-11-27T11:00:00Z")), None);
    }

    #[test]
    fn a_weekly_cron_follows_paris_time_across_daylight_saving() {
        // Fridays 08:00 in Paris: 06:00 UTC in summer, 07:00 UTC in winter.
        let e = Event {
            name: "friday-drop".into(),
            start: Start::cron("0 0 8 * * Fri", "Europe/Paris").unwrap(),
            duration: Duration::from_secs(3600),
            lead: Duration::from_secs(600),
            min: 5,
        };
        let events = [e];
        assert_eq!(
            min_at(&events, utc("2026-07-03T05:55:00Z")).map(|m| m.0),
            Some(5)
        );
        assert_eq!(
            min_at(&events, utc("2026-07-03T06:30:00Z")).map(|m| m.0),
            Some(5)
        );
        assert_eq!(min_at(&events, utc("2026-07-03T07:05:00Z")), None);
        assert_eq!(
            min_at(&events, utc("2026-11-27T06:30:00Z")),
            None,
            "winter: not yet"
        );
        assert_eq!(
            min_at(&events, utc("2026-11-27T06:55:00Z")).map(|m| m.0),
            Some(5)
        );
        assert_eq!(
            min_at(&events, utc("2026-11-26T07:00:00Z")),
            None,
            "a Thursday"
        );
    }

    #[test]
    fn bad_lines_are_refused_with_the_reason() {
        assert!(matches!(
            Start::at("next friday"),
            Err(ScheduleError::BadTime(_))
        ));
        assert!(
            matches!(
                Start::at("2026-11-27T08:00:00"),
                Err(ScheduleError::BadTime(_))
            ),
            "offset required"
        );
        assert!(matches!(
            Start::cron("every day", "Europe/Paris"),
            Err(ScheduleError::BadCron(..))
        ));
        assert!(matches!(
            Start::cron("0 0 8 * * Fri", "Mars/Olympus"),
            Err(ScheduleError::BadZone(_))
        ));
    }
}
