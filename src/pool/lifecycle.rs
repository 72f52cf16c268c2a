//! The node state machine: which events move a backend from which state to which, and
//! what each move does besides (slow start, drain deadline, ejection period, probe
//! streaks). Every writer (health checker, passive ejection, admin API, autoscaler) moves
//! backends through [`apply`], so the rules live in this one place.
//!
//! [`target`] is the table; [`apply`] performs one move on a member being prepared for
//! publication (inside [`super::Pool::update`], which may run it more than once, so it
//! only stores values and never counts).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Member, State};

/// Something that may change a backend's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `rise` consecutive successful health checks (after any ejection period).
    HealthRise,
    /// `fall` consecutive failed health checks.
    HealthFall,
    /// Consecutive failed requests (passive ejection) until the given instant.
    Eject { until: Instant },
    /// An operator or the autoscaler drains it: bound carts may reach it until `deadline`.
    Drain { deadline: Instant },
    /// An operator ends a drain or a maintenance.
    Undrain,
    /// An operator takes it out at once: no traffic, no health checks.
    Maint,
    /// The autoscaler puts a warm spare into service.
    Promote,
    /// The autoscaler keeps a drained node as a spare instead of releasing it.
    Park,
}

/// Every state, for tables and tests.
pub const STATES: [State; 6] = [
    State::Warming,
    State::InService,
    State::Draining,
    State::Down,
    State::Maint,
    State::Standby,
];

/// The state `event` moves a backend in `from` to, or `None` when the event does not
/// apply there (the backend stays as it is).
pub fn target(from: State, event: Event) -> Option<State> {
    use State::*;
    match (event, from) {
        (Event::HealthRise, Warming | Down) => Some(InService),
        (Event::HealthFall, InService) => Some(Down),
        (Event::Eject { .. }, InService) => Some(Down),
        // Draining again keeps the first deadline: not a move.
        (Event::Drain { .. }, Warming | InService | Down | Maint | Standby) => Some(Draining),
        (Event::Undrain, Draining) => Some(InService),
        // Back from maintenance a node first proves itself healthy.
        (Event::Undrain, Maint) => Some(Warming),
        (Event::Maint, Warming | InService | Draining | Down | Standby) => Some(Maint),
        (Event::Promote, Standby) => Some(InService),
        (Event::Park, Draining) => Some(Standby),
        _ => None,
    }
}

/// Moves `m` for `event` at `now` with the move's side effects; returns the new state,
/// or `None` (and changes nothing) when the event does not apply.
pub fn apply(m: &mut Member, event: Event, now: Instant) -> Option<State> {
    let next = target(m.state, event)?;
    if event == Event::Promote && m.backend.probe_failures.load(Ordering::Relaxed) > 0 {
        // A spare failing its checks would take traffic it cannot serve.
        return None;
    }
    m.state = next;
    m.since = now;
    m.drain_deadline = match event {
        Event::Drain { deadline } => Some(deadline),
        _ => None,
    };
    m.down_until = match event {
        Event::Eject { until } => Some(until),
        _ => None,
    };
    match (event, next) {
        (Event::HealthRise, State::InService) => {
            // A clean slate: the next ejection is the short one again.
            m.backend.ejections.store(0, Ordering::Relaxed);
            m.backend.consecutive_failures.store(0, Ordering::Relaxed);
            m.slow_start = true;
        }
        (Event::Undrain | Event::Promote, State::InService) => m.slow_start = true,
        (Event::Undrain, State::Warming) => {
            // Checks were off during maintenance: the old streak proves nothing.
            m.backend.probe_successes.store(0, Ordering::Relaxed);
        }
        _ => {}
    }
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use State::*;

    fn events(now: Instant) -> [(Event, &'static str); 8] {
        [
            (Event::HealthRise, "rise"),
            (Event::HealthFall, "fall"),
            (Event::Eject { until: now }, "eject"),
            (Event::Drain { deadline: now }, "drain"),
            (Event::Undrain, "undrain"),
            (Event::Maint, "maint"),
            (Event::Promote, "promote"),
            (Event::Park, "park"),
        ]
    }

    /// Every (state, event) pair: the state it leads to, `-` where it is refused.
    const TABLE: &str = "
        state       rise        fall  eject  drain     undrain     maint  promote     park
        warming     in_service  -     -      draining  -           maint  -           -
        in_service  -           down  down   draining  -           maint  -           -
        draining    -           -     -      -         in_service  maint  -           standby
        down        in_service  -     -      draining  -           maint  -           -
        maint       -           -     -      draining  warming     -      -           -
        standby     -           -     -      draining  -           maint  in_service  -
    ";

    #[test]
    fn every_allowed_and_refused_transition() {
        let now = Instant::now();
        let rows: Vec<Vec<&str>> = TABLE
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|r| !r.is_empty())
            .collect();
        let header = &rows[0][1..];
        assert_eq!(rows.len(), 1 + STATES.len());
        for row in &rows[1..] {
            let from = STATES
                .iter()
                .copied()
                .find(|s| s.as_str() == row[0])
                .expect("a state name");
            for (col, (event, name)) in events(now).iter().enumerate() {
                assert_eq!(header[col], *name);
                let got = target(from, *event).map_or("-", State::as_str);
                assert_eq!(got, row[col + 1], "{} --{name}-->", from.as_str());
            }
        }
    }

    use crate::pool::testing::member;

    #[test]
    fn moves_carry_their_side_effects() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(30);
        let mut m = member(InService);
        assert_eq!(
            apply(&mut m, Event::Drain { deadline }, now),
            Some(Draining)
        );
        assert_eq!(m.drain_deadline, Some(deadline));
        assert_eq!(apply(&mut m, Event::Undrain, now), Some(InService));
        assert_eq!(m.drain_deadline, None);
        assert!(m.slow_start, "back in service ramps up");

        let until = now + Duration::from_secs(10);
        assert_eq!(apply(&mut m, Event::Eject { until }, now), Some(Down));
        assert_eq!(m.down_until, Some(until));
        m.backend.consecutive_failures.store(5, Ordering::Relaxed);
        assert_eq!(apply(&mut m, Event::HealthRise, now), Some(InService));
        assert_eq!(m.down_until, None);
        assert_eq!(m.backend.consecutive_failures(), 0);

        let mut m = member(Maint);
        m.backend.probe_successes.store(9, Ordering::Relaxed);
        assert_eq!(apply(&mut m, Event::Undrain, now), Some(Warming));
        assert_eq!(m.backend.probe_streak().0, 0, "checks start over");

        // Refused: nothing changes.
        let mut m = member(Warming);
        let since = m.since;
        assert_eq!(
            apply(&mut m, Event::Park, now + Duration::from_secs(1)),
            None
        );
        assert_eq!((m.state, m.since), (Warming, since));
    }

    #[test]
    fn a_failing_spare_is_not_promoted() {
        let now = Instant::now();
        let mut m = member(Standby);
        m.backend.probe_failures.store(1, Ordering::Relaxed);
        assert_eq!(apply(&mut m, Event::Promote, now), None);
        m.backend.probe_failures.store(0, Ordering::Relaxed);
        assert_eq!(apply(&mut m, Event::Promote, now), Some(InService));
        assert!(m.slow_start);
    }
}
